"""The emulator's routing block (issue #12) answers as OpenRouter documents; every event and
body validates against the SDK (check_stream / check_body)."""

from __future__ import annotations

import aiohttp
import pytest
from openrouter_emulator import Emulator
from sdk_validation import validate_response
from test_emulator_contract import CLAUDE, GPT4O, R1, body, check_body, check_stream, post

META = {"X-OpenRouter-Metadata": "enabled"}


@pytest.fixture
async def emu():
    e = Emulator()
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_router_metadata_only_when_asked(emu, http):
    final = check_stream(await post(http, emu, body(GPT4O), headers=META))[-1]["response"]
    meta = final["openrouter_metadata"]
    assert meta["requested"] == GPT4O and meta["strategy"] == "direct"
    assert [e["provider"] for e in meta["endpoints"]["available"] if e["selected"]] == ["openai"]
    plain = check_stream(await post(http, emu, body(GPT4O)))[-1]["response"]
    assert "openrouter_metadata" not in plain
    validate_response(check_body(await post(http, emu, body(GPT4O, stream=False),
                                            headers=META)))


@pytest.mark.parametrize(("provider", "status", "code", "text"), [
    ({"only": ["nowhere"]}, 404, "constraint_filtered",
     "No allowed providers are available for the selected model."),
    ({"zdr": True}, 404, "privacy_restricted", "No endpoints found matching your data policy "
                                               "(Zero data retention)"),
    ({"quantizations": ["int4"]}, 404, "constraint_filtered", f"No endpoints found for {R1}."),
    ({"max_price": {"prompt": "0.1"}}, 404, "constraint_filtered", "No endpoints found"),
])
async def test_provider_filters_that_leave_nothing_get_openrouters_404(emu, http, provider,
                                                                       status, code, text):
    reply = await post(http, emu, body(R1, provider=provider))
    assert reply.status == status
    err = reply.json["error"]
    assert err["message"].startswith(text) and err["availability"]["code"] == code


async def test_provider_order_and_data_collection_pick_the_endpoint(emu, http):
    provider = {"order": ["deepinfra"], "data_collection": "deny"}
    final = check_stream(await post(http, emu, body(R1, provider=provider),
                                    headers=META))[-1]["response"]
    available = final["openrouter_metadata"]["endpoints"]["available"]
    assert [e["provider"] for e in available] == ["deepinfra/fp8"]  # together trains: dropped


async def test_models_fallback_serves_and_names_the_fallback(emu, http):
    reply = await post(http, emu, body(CLAUDE, models=[GPT4O]), "primary_down", headers=META)
    final = check_stream(reply)[-1]["response"]
    assert final["model"] == GPT4O
    meta = final["openrouter_metadata"]
    assert meta["strategy"] == "fallback" and meta["requested"] == CLAUDE
    assert [(a["model"], a["status"]) for a in meta["attempts"]] == [(CLAUDE, 502), (GPT4O, 200)]
    assert (await post(http, emu, body(CLAUDE), "primary_down")).status == 502


async def test_provider_retry_lists_the_failed_attempt(emu, http):
    final = check_stream(await post(http, emu, body(R1), "provider_retry",
                                    headers=META))[-1]["response"]
    meta = final["openrouter_metadata"]
    assert [a["provider"] for a in meta["attempts"]] == ["together", "deepinfra/fp8"]
    assert meta["attempt"] == 2


async def test_second_identical_prefix_request_reads_the_cache(emu, http):
    first = [{"role": "user", "content": "a long shared prefix " * 100}]
    req = body(CLAUDE, cache_control={"type": "ephemeral"}, instructions="terse")
    req["input"] = first
    u1 = check_stream(await post(http, emu, req))[-1]["response"]["usage"]
    assert u1["input_tokens_details"] == {"cached_tokens": 0,
                                          "cache_write_tokens": u1["input_tokens"]}
    req["input"] = [*first, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "next"}]
    u2 = check_stream(await post(http, emu, req))[-1]["response"]["usage"]
    cached = u2["input_tokens_details"]["cached_tokens"]
    assert cached > 500 and u2["input_tokens_details"]["cache_write_tokens"] == \
        u2["input_tokens"] - cached
    no_cache = {k: v for k, v in req.items() if k != "cache_control"}
    u3 = check_stream(await post(http, emu, no_cache))[-1]["response"]["usage"]
    assert u3["input_tokens_details"] == {"cached_tokens": 0}
    assert u2["cost"] < u3["cost"]  # reads are cheaper than input


@pytest.mark.parametrize("model", ["openrouter/auto", "~anthropic/claude-sonnet-latest",
                                   "openai/gpt-4o@preset/support", "@preset/support",
                                   "anthropic/claude-sonnet-4:nitro"])
async def test_routers_aliases_and_presets_are_served(emu, http, model):
    req = body(model, plugins=[{"id": "auto-router", "allowed_models": ["anthropic/*"]}])
    final = check_stream(await post(http, emu, req, headers=META))[-1]["response"]
    assert final["openrouter_metadata"]["requested"] == model
    if model == "openrouter/auto":
        assert final["model"] == CLAUDE and final["openrouter_metadata"]["strategy"] == "auto"
    if model.startswith("~"):
        assert final["model"] == CLAUDE


async def test_availability_bodies_and_free_limits(emu, http):
    reply = await post(http, emu, body(GPT4O), "unavailable code=capacity_exhausted")
    avail = reply.json["error"]["availability"]
    assert reply.status == 429 and reply.headers["Retry-After"] == "30"
    assert avail["code"] == "capacity_exhausted" and avail["fallback_models"] == [GPT4O]
    assert avail["retryable"] is True
    day = await post(http, emu, body("deepseek/deepseek-r1:free"), "free_limit window=day")
    assert day.status == 429 and "free-models-per-day" in day.json["error"]["message"]
    assert day.headers["X-RateLimit-Limit"] == "50"
    assert int(day.headers["X-RateLimit-Reset"]) % 86_400_000 == 0
    assert (await post(http, emu, body(GPT4O), "unavailable code=nope")).status == 400
