"""Admission gate: global limit, bounded queue, wait timeout, per-user limit, hand-over."""

from __future__ import annotations

import asyncio

import pytest

from openrouter_responses_pipe import AdmissionGate, AdmissionLimits, AdmissionRejected


def limits(active=1, queued=1, wait=1.0, per_user=5):
    return AdmissionLimits(active, queued, wait, per_user)


async def hold(gate, user, lim, started: asyncio.Event, release: asyncio.Event):
    async with gate.admit(user, lim):
        started.set()
        await release.wait()


async def test_queue_full_is_rejected_immediately():
    gate, lim = AdmissionGate(), limits(active=1, queued=1)
    release = asyncio.Event()
    a = asyncio.create_task(hold(gate, "a", lim, asyncio.Event(), release))
    await asyncio.sleep(0)
    b = asyncio.create_task(hold(gate, "b", lim, asyncio.Event(), release))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(AdmissionRejected, match="busy"):
        async with gate.admit("c", lim):
            pass
    assert loop.time() - t0 < 0.1 and gate.rejected == 1
    release.set()
    await asyncio.gather(a, b)
    assert gate.active == 0 and gate.per_user == {}


async def test_waiting_too_long_is_rejected_with_a_retry_hint():
    gate, lim = AdmissionGate(), limits(active=1, queued=5, wait=0.05)
    release = asyncio.Event()
    a = asyncio.create_task(hold(gate, "a", lim, asyncio.Event(), release))
    await asyncio.sleep(0)
    with pytest.raises(AdmissionRejected, match="retry in a moment"):
        async with gate.admit("b", lim):
            pass
    release.set()
    await a
    assert gate.active == 0 and gate.queued == 0 and gate.per_user == {}


async def test_released_slot_goes_to_the_first_waiter_in_order():
    gate, lim = AdmissionGate(), limits(active=1, queued=5, wait=5)
    order, release = [], asyncio.Event()

    async def worker(name):
        async with gate.admit(name, lim):
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(worker(n)) for n in "abc"]
    await asyncio.sleep(0.01)
    assert order == ["a"] and gate.active == 1 and gate.queued == 2
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and gate.active == 0


async def test_per_user_limit_counts_queued_requests_and_spares_other_users():
    gate, lim = AdmissionGate(), limits(active=1, queued=5, wait=5, per_user=2)
    release = asyncio.Event()
    t1 = asyncio.create_task(hold(gate, "u", lim, asyncio.Event(), release))
    await asyncio.sleep(0)
    t2 = asyncio.create_task(hold(gate, "u", lim, asyncio.Event(), release))  # queued
    await asyncio.sleep(0)
    with pytest.raises(AdmissionRejected, match="already have 2 answers"):
        async with gate.admit("u", lim):
            pass
    other = asyncio.create_task(hold(gate, "v", lim, asyncio.Event(), release))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(t1, t2, other)
    assert gate.per_user == {} and gate.active == 0


async def test_cancelled_waiter_leaves_no_trace():
    gate, lim = AdmissionGate(), limits(active=1, queued=5, wait=5)
    release = asyncio.Event()
    a = asyncio.create_task(hold(gate, "a", lim, asyncio.Event(), release))
    await asyncio.sleep(0)
    b = asyncio.create_task(hold(gate, "b", lim, asyncio.Event(), release))
    await asyncio.sleep(0.01)
    b.cancel()
    await asyncio.gather(b, return_exceptions=True)
    release.set()
    await a
    assert gate.active == 0 and gate.per_user == {} and gate.queued == 0
