"""ToolRunner: parallelism bounds, timeouts, no retries, breakers per (user, tool)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from openrouter_responses_pipe import (
    FunctionCall,
    ToolBreakers,
    ToolRunner,
    ToolSettings,
    final_answer_payload,
    next_payload,
    tool_set,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tools(**fns: Any) -> Any:
    return tool_set({n: {"callable": f, "spec": {"name": n, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}} for n, f in fns.items()},
        (), strict=True, runnable_only=True)


def calls(name: str, n: int) -> list[FunctionCall]:
    return [FunctionCall(f"call_{i}", name, json.dumps({"x": i})) for i in range(n)]


class Gauge:
    """Counts tools running at once (observed through the tools themselves)."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()

    async def tool(self, x: int | None = None) -> str:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await self.release.wait()
        self.running -= 1
        return str(x)


async def _settle(gauge: Gauge, expected: int) -> None:
    for _ in range(200):
        if gauge.running >= expected:
            break
        await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_per_request_bound() -> None:
    gauge, runner = Gauge(), ToolRunner(Clock())
    ts = ToolSettings(per_request=3, global_limit=100)
    task = asyncio.create_task(runner.run_round(calls("g", 7), tools(g=gauge.tool), ts, "u"))
    await _settle(gauge, 3)
    assert gauge.running == 3
    gauge.release.set()
    outcomes = await task
    assert gauge.peak == 3
    assert [o.output for o in outcomes] == [str(i) for i in range(7)]  # call order kept


async def test_global_bound_across_requests() -> None:
    gauge, runner = Gauge(), ToolRunner(Clock())
    ts = ToolSettings(per_request=4, global_limit=5)
    ts_tools = tools(g=gauge.tool)
    tasks = [asyncio.create_task(runner.run_round(calls("g", 4), ts_tools, ts, f"u{i}"))
             for i in range(3)]
    await _settle(gauge, 5)
    assert gauge.running == 5 and runner.limiter.active == 5
    gauge.release.set()
    results = await asyncio.gather(*tasks)
    assert gauge.peak == 5 and runner.limiter.active == 0
    assert all(len(r) == 4 and all(o.ok for o in r) for r in results)


async def test_timeout_reports_and_frees_the_slot() -> None:
    runner = ToolRunner(Clock())
    never = asyncio.Event()

    async def hang(x: int | None = None) -> str:
        await never.wait()
        return "never"

    ts = ToolSettings(timeout=0.01, global_limit=1)
    [outcome] = await runner.run_round(calls("hang", 1), tools(hang=hang), ts, "u")
    assert not outcome.ok and "did not finish within 0.01 seconds" in outcome.output
    assert runner.limiter.active == 0


async def test_sync_tools_run_off_the_event_loop_and_are_not_retried() -> None:
    runner = ToolRunner(Clock())
    threads: list[str] = []

    def sync_tool(x: int | None = None) -> str:
        threads.append(threading.current_thread().name)
        raise OSError("disk full")

    [outcome] = await runner.run_round(calls("s", 1), tools(s=sync_tool), ToolSettings(), "u")
    assert threads and threads[0] != threading.main_thread().name
    assert len(threads) == 1  # one attempt only
    assert "OSError: disk full" in outcome.output


async def test_unknown_tool_and_bad_arguments() -> None:
    runner = ToolRunner(Clock())

    async def ok(x: int | None = None) -> str:
        return "ran"

    ts_tools = tools(ok=ok)
    [unknown] = await runner.run_round([FunctionCall("c", "nope", "{}")], ts_tools,
                                       ToolSettings(), "u")
    assert "no tool named `nope`" in unknown.output and "ok" in unknown.output
    [bad] = await runner.run_round([FunctionCall("c", "ok", "[1]")], ts_tools,
                                   ToolSettings(), "u")
    assert "must be a JSON object" in bad.output and not bad.ok


async def test_breaker_is_per_user_and_tool() -> None:
    clock = Clock()
    runner = ToolRunner(clock)
    ran: list[str] = []

    async def flaky(x: int | None = None) -> str:
        ran.append("flaky")
        raise RuntimeError("boom")

    async def steady(x: int | None = None) -> str:
        ran.append("steady")
        return "fine"

    ts = ToolSettings(breaker_threshold=3, breaker_window=60)
    both = tools(flaky=flaky, steady=steady)
    for _ in range(4):
        await runner.run_round([FunctionCall("a", "flaky", "{}"),
                                FunctionCall("b", "steady", "{}")], both, ts, "alice")
    assert ran.count("flaky") == 3 and ran.count("steady") == 4
    [paused] = await runner.run_round([FunctionCall("a", "flaky", "{}")], both, ts, "alice")
    assert "paused for 60 seconds" in paused.output
    await runner.run_round([FunctionCall("a", "flaky", "{}")], both, ts, "bob")
    assert ran.count("flaky") == 4  # bob's breaker is his own
    assert runner.breakers.snapshot()["alice/flaky"] == {"failures": 3, "open": True}
    clock.now += 61  # after the window the tool gets another chance
    await runner.run_round([FunctionCall("a", "flaky", "{}")], both, ts, "alice")
    assert ran.count("flaky") == 5


async def test_breaker_half_opens_one_failure_after_the_pause_reopens_it() -> None:
    clock = Clock()
    runner = ToolRunner(clock)
    ran: list[str] = []
    broken = [True]

    async def flaky(x: int | None = None) -> str:
        ran.append("flaky")
        if broken[0]:
            raise RuntimeError("still broken")
        return "works again"

    ts = ToolSettings(breaker_threshold=3, breaker_window=60)
    flaky_only = tools(flaky=flaky)

    async def call() -> str:
        [out] = await runner.run_round([FunctionCall("a", "flaky", "{}")], flaky_only, ts, "u")
        return out.output

    for _ in range(3):
        await call()
    clock.now += 61  # the pause is over: the next call is allowed ...
    assert "still broken" in await call() and len(ran) == 4
    assert "paused for 60 seconds" in await call()  # ... and its failure reopened at once
    assert len(ran) == 4
    clock.now += 61
    broken[0] = False
    assert await call() == "works again"  # a success after the pause closes it
    broken[0] = True
    assert "still broken" in await call() and "still broken" in await call()
    assert len(ran) == 7 and runner.breakers.snapshot()["u/flaky"]["open"] is False


def test_breaker_success_closes_and_old_failures_expire() -> None:
    clock = Clock()
    b = ToolBreakers(clock)
    key = ("u", "t")
    b.record(key, False, 2, 10)
    clock.now += 11
    b.record(key, False, 2, 10)  # the first failure is outside the window
    assert b.snapshot()["u/t"] == {"failures": 1, "open": False}
    b.record(key, True, 2, 10)
    assert b.snapshot() == {}


def test_loop_payloads() -> None:
    payload = {"model": "m", "input": [{"role": "user", "content": "hi"}], "tools": [1]}
    items = [{"type": "reasoning", "id": "rs", "summary": [], "encrypted_content": "E"},
             {"type": "function_call", "call_id": "c1", "name": "t", "arguments": "{}"}]

    class Outcome:
        def item(self) -> dict[str, Any]:
            return {"type": "function_call_output", "call_id": "c1", "output": "r"}

    nxt = next_payload(payload, items, [Outcome()])  # type: ignore[list-item]
    assert nxt["input"] == [*payload["input"], *items, Outcome().item()]
    assert payload["input"] == [{"role": "user", "content": "hi"}]  # not mutated
    final = final_answer_payload({**nxt, "instructions": "Be brief."})
    assert final["tool_choice"] == "none" and final["tools"] == [1]
    assert final["instructions"].startswith("Be brief.\n\nThe tool-call limit")


async def test_limiter_passes_the_slot_on_when_a_woken_waiter_is_cancelled() -> None:
    from openrouter_responses_pipe import ConcurrencyLimiter

    limiter = ConcurrencyLimiter()
    await limiter.acquire(1)
    first = asyncio.create_task(limiter.acquire(1))
    second = asyncio.create_task(limiter.acquire(1))
    await asyncio.sleep(0)
    limiter.release()  # wakes `first`...
    first.cancel()     # ...which is cancelled before it runs
    await asyncio.wait_for(second, 1)  # the slot reaches `second` instead of being lost
    assert first.cancelled() and limiter.active == 1


async def test_a_model_cannot_act_as_another_user_through_reserved_arguments() -> None:
    """Open WebUI binds `__user__` into the callable (functools.partial); a model-sent
    `__user__` would override that binding. It must never reach the tool."""
    import functools

    seen: list[dict[str, Any]] = []

    async def whoami(__user__: dict[str, Any] | None = None, **extra: Any) -> str:
        seen.append({"user": __user__, **extra})
        return str((__user__ or {}).get("id"))

    bound = functools.partial(whoami, __user__={"id": "u-alice", "role": "user"})
    for params in (None, {"type": "object", "properties": {}},
                   {"type": "object", "properties": {"__user__": {"type": "object"}}}):
        ts = tool_set({"whoami": {"callable": bound, "spec": {
            "name": "whoami", "parameters": params}}}, (), strict=True, runnable_only=True)
        evil = json.dumps({"__user__": {"id": "u-bob", "role": "admin"},
                           "__event_emitter__": None, "__request__": 1})
        out = await ToolRunner(Clock()).run_call(FunctionCall("c1", "whoami", evil), ts,
                                                 ToolSettings(), "u-alice")
        assert out.ok and out.output == "u-alice", (params, out)
    assert all(s == {"user": {"id": "u-alice", "role": "user"}} for s in seen)


# -- issue #11 item 14b: timed-out sync tools hold the pipe's threads, not the default pool --


async def test_timed_out_sync_tools_do_not_starve_the_default_executor():
    import concurrent.futures

    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    release = threading.Event()

    def hang(x: int | None = None) -> str:
        release.wait(10)
        return "late"

    runner = ToolRunner(Clock(), threads=2)
    settings = ToolSettings(timeout=0.2)
    try:
        outcomes = await runner.run_round(calls("hang", 2), tools(hang=hang), settings, "u")
        assert [o.ok for o in outcomes] == [False, False]
        assert all("did not finish within 0.2 seconds" in o.output for o in outcomes)
        # Open WebUI's own to_thread users still get a thread at once.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 2) == 42
        # The pipe's pool is full of stuck calls: the next sync tool says so at once.
        [busy] = await runner.run_round(calls("hang", 1), tools(hang=hang), settings, "u")
        assert "tool threads is still busy with an earlier call that timed out" in busy.output
    finally:
        release.set()
        runner.close()
    for _ in range(100):  # the stuck calls return: the pool is usable again
        if runner.stuck == 0:
            break
        await asyncio.sleep(0.02)
    assert runner.stuck == 0
