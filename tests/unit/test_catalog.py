"""Catalog parsing, MODEL_ID selection and the refresher's TTL / single-flight / backoff."""

from __future__ import annotations

import asyncio
import json

import pytest
from captures import catalogs

from openrouter_responses_pipe import (
    CatalogRegistry,
    RequestSettings,
    UpstreamError,
    Valves,
    build_model_list,
    openrouter_model_id,
    parse_catalog,
    select_models,
)


def capture_payload():
    return json.loads(next(c for c in catalogs() if "reasoning" in c.name).body)


def row(id, **extra):
    base = {"id": id, "name": id, "architecture": {"input_modalities": ["text"],
                                                   "output_modalities": ["text"]},
            "pricing": {"prompt": "0.000001", "completion": "0.000002"},
            "top_provider": {"max_completion_tokens": 1000}, "supported_parameters": []}
    return base | extra


def test_real_catalog_capabilities():
    entries = {e.id: e for e in parse_catalog(capture_payload())}
    nano = entries["openai/gpt-5-nano"]
    assert nano.supports_reasoning and nano.reasoning.mandatory and nano.reasoning_summaries
    assert nano.reasoning.supported_efforts == ("high", "medium", "low", "minimal")
    assert nano.supports_tools and nano.supports_structured_outputs and nano.supports_web_search
    assert nano.accepts("image") and nano.accepts("file") and not nano.accepts("audio")
    assert nano.max_output_tokens == 128000 and nano.context_length == 400000
    claude = entries["anthropic/claude-sonnet-4"]
    assert claude.supports_reasoning and not claude.reasoning_summaries
    assert claude.pricing.prompt == pytest.approx(3e-6)


def test_variants_and_dated_ids_keep_their_own_entries_and_route_to_themselves():
    ids = ["openai/gpt-4o", "openai/gpt-4o-2024-08-06", "deepseek/deepseek-r1",
           "deepseek/deepseek-r1:free", "deepseek/deepseek-r1:nitro"]
    entries = parse_catalog({"data": [row(i) for i in ids]})
    snap_ids = [m["id"] for m in build_model_list(_snap(entries), "auto", "")[0]]
    assert sorted(snap_ids) == sorted(ids)
    for i in ids:
        assert openrouter_model_id(f"openrouter.{i}") == i


def test_image_models_are_kept_and_embeddings_and_malformed_rows_skipped():
    # issue #14: image-only models make pictures in the chat, so they are listed
    payload = {"data": [row("a/text"), {"name": "no id"},
                        row("b/image-only", architecture={"input_modalities": ["text"],
                                                          "output_modalities": ["image"]}),
                        row("c/embed", architecture={"input_modalities": ["text"],
                                                     "output_modalities": ["embeddings"]})]}
    assert [e.id for e in parse_catalog(payload)] == ["a/text", "b/image-only"]


def test_unexpected_shape_is_an_upstream_error():
    with pytest.raises(UpstreamError):
        parse_catalog({"models": []})


def test_model_id_filter_reports_unknown_ids_and_never_widens():
    entries = parse_catalog({"data": [row("a/x"), row("b/y"), row("c/z:free")]})
    selected, unknown = select_models(entries, " a/x, C/Z:FREE ,typo/model")
    assert [e.id for e in selected] == ["a/x", "c/z:free"]
    assert unknown == ("typo/model",)
    only_typos, unknown = select_models(entries, "nope/one")
    assert only_typos == () and unknown == ("nope/one",)
    listed, _ = build_model_list(_snap(entries), "nope/one", "")
    assert len(listed) == 1 and "nope/one" in listed[0]["name"]


def _snap(entries):
    from openrouter_responses_pipe import CatalogSnapshot
    return CatalogSnapshot.of(entries, 0.0)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


SETTINGS = RequestSettings.merge(Valves(API_KEY="k"), None)


async def test_refresh_is_single_flight_and_cached_until_ttl():
    clock, calls = FakeClock(), []

    async def fetch(settings):
        calls.append(1)
        await asyncio.sleep(0.01)
        return {"data": [row("a/x")]}

    reg = CatalogRegistry(fetch, clock)
    snaps = await asyncio.gather(*(reg.get(SETTINGS, 60) for _ in range(10)))
    assert len(calls) == 1 and all(s is snaps[0] for s in snaps)
    clock.now += 30
    assert await reg.get(SETTINGS, 60) is snaps[0] and len(calls) == 1


async def test_stale_catalog_is_served_at_once_while_one_refresh_runs():
    clock, gate, calls = FakeClock(), asyncio.Event(), []

    async def fetch(settings):
        calls.append(1)
        if len(calls) > 1:
            await gate.wait()
        return {"data": [row(f"a/v{len(calls)}")]}

    reg = CatalogRegistry(fetch, clock)
    first = await reg.get(SETTINGS, 60)
    clock.now += 61
    assert await reg.get(SETTINGS, 60) is first      # stale, returned without waiting
    assert await reg.get(SETTINGS, 60) is first      # still one refresh in flight
    await asyncio.sleep(0)
    assert len(calls) == 2
    gate.set()
    await asyncio.sleep(0.01)
    assert [e.id for e in (await reg.get(SETTINGS, 60)).entries] == ["a/v2"]


async def test_failures_back_off_and_keep_serving_the_stale_list():
    clock, outcomes = FakeClock(), ["ok", "fail", "fail", "ok"]

    async def fetch(settings):
        if outcomes.pop(0) == "fail":
            raise UpstreamError("down")
        return {"data": [row("a/x")]}

    reg = CatalogRegistry(fetch, clock)
    first = await reg.get(SETTINGS, 60)
    clock.now += 61
    assert await reg.get(SETTINGS, 60) is first
    await asyncio.sleep(0.01)                         # refresh #1 failed: backoff 5s
    assert reg.last_error is not None
    assert await reg.get(SETTINGS, 60) is first and len(outcomes) == 2  # in backoff: no call
    clock.now += 6
    await reg.get(SETTINGS, 60)
    await asyncio.sleep(0.01)                         # refresh #2 failed: backoff 10s
    clock.now += 6
    await reg.get(SETTINGS, 60)
    await asyncio.sleep(0.01)
    assert len(outcomes) == 1                         # still backing off
    clock.now += 5
    await reg.get(SETTINGS, 60)
    await asyncio.sleep(0.01)
    assert reg.last_error is None and not outcomes


async def test_cold_failure_raises_then_backs_off():
    clock, calls = FakeClock(), []

    async def fetch(settings):
        calls.append(1)
        raise UpstreamError("no network")

    reg = CatalogRegistry(fetch, clock)
    with pytest.raises(UpstreamError):
        await reg.get(SETTINGS, 60)
    with pytest.raises(UpstreamError):
        await reg.get(SETTINGS, 60)
    assert len(calls) == 1
