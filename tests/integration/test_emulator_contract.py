"""Contract tests: the local OpenRouter emulator vs. the SDK schema and the real captures.

Every stream is parsed with the reference ``parse_sse`` and every event is validated with the
official SDK's models (strictly: unknown keys and silent "Unknown" fallbacks fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT / "tools", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from captures import CAPTURE_DIR, capture_files  # noqa: E402
from openrouter_emulator import (  # noqa: E402
    ERROR_BODIES,
    SCENARIOS,
    UNKNOWN_EVENT_TYPES,
    Emulator,
    EmulatorThread,
)
from sdk_validation import (  # noqa: E402
    SchemaError,
    parse_sse,
    validate_models_list,
    validate_request,
    validate_response,
    validate_stream_event,
)

CAPTURES = CAPTURE_DIR
AUTH = {"Authorization": "Bearer sk-or-v1-test0000000000000000000000000000000000abc"}
TERMINALS = {"response.completed", "response.incomplete", "response.failed"}
GPT4O, NANO, CLAUDE, R1 = (
    "openai/gpt-4o", "openai/gpt-5-nano", "anthropic/claude-sonnet-4", "deepseek/deepseek-r1")


# ----------------------------------------------------------------------------- fixtures/helpers


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


@dataclass
class Reply:
    status: int
    headers: dict
    raw: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.raw)


async def post(http, emu, body: dict, scenario: str | None = None, headers: dict | None = None,
               auth: bool = True) -> Reply:
    hdrs = {**(AUTH if auth else {}), **(headers or {})}
    if scenario:
        hdrs["X-Emulator-Scenario"] = scenario
    async with http.post(f"{emu.base_url}/responses", json=body, headers=hdrs) as r:
        return Reply(r.status, dict(r.headers), await r.read())


def body(model: str = GPT4O, text: str = "Olá, ação 😀 hello", stream: bool = True, **kw) -> dict:
    return {"model": model, "input": [{"role": "user", "content": text}], "store": False,
            "stream": stream, **kw}


def check_stream(reply: Reply, *, done: bool = True, allow_unknown=(), skip=()) -> list[dict]:
    """Status/headers, SDK validation of every event, contiguous sequence numbers."""
    assert reply.status == 200, reply.raw[:500]
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert reply.headers["Cache-Control"] == "no-cache"
    events = parse_sse(reply.raw)
    for ev in events:
        if ev["type"] not in skip:
            validate_stream_event(ev, allow_unknown=allow_unknown)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert reply.raw.rstrip().endswith(b"data: [DONE]") is done
    gen_id = reply.headers["X-Generation-Id"]
    assert re.fullmatch(r"gen-\d{10}-[A-Za-z0-9]{20}", gen_id)
    assert events[0]["type"] == "response.created" and events[0]["response"]["id"] == gen_id
    return events


def check_body(reply: Reply) -> dict:
    assert reply.status == 200, reply.raw[:500]
    obj = reply.json
    validate_response(obj)
    assert obj["id"] == reply.headers["X-Generation-Id"]
    return obj


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def collapse(seq: list[str]) -> list[str]:
    return [t for i, t in enumerate(seq) if i == 0 or seq[i - 1] != t]


def final_text(obj: dict) -> str:
    return "".join(p["text"] for it in obj["output"] if it["type"] == "message"
                   for p in it["content"])


def captures() -> list[tuple[str, dict, bytes]]:
    out = []
    for f in capture_files():
        for i in yaml.safe_load(f.read_text())["interactions"]:
            if i["request"]["method"] == "POST":
                out.append((f.name, json.loads(i["request"]["body"]),
                            i["response"]["body"]["string"].encode()))
    return out


# ----------------------------------------------------------------------------- catalogue & misc


async def test_models_catalog_validates_and_has_variants(emu, http):
    async with http.get(f"{emu.base_url}/models") as r:  # no auth needed
        assert r.status == 200
        assert r.headers["Cache-Control"].startswith("public, max-age=300")
        data = await r.json()
    validate_models_list(data)
    assert data["links"] == {"next": None} and data["total_count"] == len(data["data"])
    by_id = {m["id"]: m for m in data["data"]}
    for real in ("openai/gpt-4o", "openai/gpt-4.1-mini", "openai/gpt-3.5-turbo", NANO, CLAUDE):
        assert real in by_id
    assert by_id["deepseek/deepseek-r1:free"]["pricing"]["prompt"] == "0"
    assert "meta-llama/llama-3.3-70b-instruct:nitro" in by_id
    assert "openai/gpt-4o-2024-08-06" in by_id
    assert by_id[R1]["reasoning"] == {"mandatory": True, "supported_efforts": None,
                                      "default_enabled": True}
    assert "reasoning" in by_id[CLAUDE]
    assert "tools" not in by_id["mistralai/mistral-7b-instruct"]["supported_parameters"]
    assert set(by_id["google/gemini-2.5-flash"]["architecture"]["input_modalities"]) == {
        "text", "image", "file", "audio", "video"}
    assert by_id["google/gemini-2.5-flash-image"]["architecture"]["output_modalities"] == [
        "image", "text"]
    wanted = {"temperature", "top_p", "top_k", "stop", "seed", "frequency_penalty",
              "presence_penalty", "parallel_tool_calls", "response_format", "structured_outputs"}
    assert wanted <= set(by_id["meta-llama/llama-3.3-70b-instruct"]["supported_parameters"])
    assert "black-forest-labs/flux.2-pro" not in by_id  # image-only: hidden by default


@pytest.mark.parametrize(("query", "present", "absent"), [
    ("output_modalities=image", "black-forest-labs/flux.2-pro", GPT4O),
    ("output_modalities=all", "black-forest-labs/flux.2-pro", None),
    ("supported_parameters=reasoning", R1, GPT4O),
])
async def test_models_filters(emu, http, query, present, absent):
    async with http.get(f"{emu.base_url}/models?{query}") as r:
        ids = {m["id"] for m in (await r.json())["data"]}
    assert present in ids and absent not in ids


async def test_extra_models_for_benchmarks(http):
    async with Emulator(extra_models=400) as e, http.get(f"{e.base_url}/models") as r:
        data = await r.json()
    assert data["total_count"] >= 400 and data["data"][-1]["id"] == "synthetic/model-0400"
    validate_models_list(data)


async def test_key_generation_and_404(emu, http):
    async with http.get(f"{emu.base_url}/key") as r:
        assert r.status == 401
    async with http.get(f"{emu.base_url}/key", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["data"]["label"].startswith("sk-or-v1-")
    reply = await post(http, emu, body(stream=False))
    gen = reply.headers["X-Generation-Id"]
    async with http.get(f"{emu.base_url}/generation", params={"id": gen}, headers=AUTH) as r:
        data = (await r.json())["data"]
    assert data["id"] == gen and data["total_cost"] == reply.json["usage"]["cost"]
    async with http.get(f"{emu.base_url}/generation", params={"id": "gen-1-x"}, headers=AUTH) as r:
        assert r.status == 404
    async with http.get(f"{emu.base_url}/chat/nowhere") as r:
        assert r.status == 404
        assert await r.json() == {"error": {"code": 404, "message": "Resource not found"}}


# ----------------------------------------------------------------------------- auth & validation


async def test_auth_errors(emu, http):
    r = await post(http, emu, body(), auth=False)
    assert (r.status, r.json) == (401, {"error": {"message": "No auth credentials found",
                                                  "code": 401}})
    r = await post(http, emu, body(), headers={"Authorization": "Bearer "}, auth=False)
    assert r.status == 401
    async with Emulator(api_keys={"good"}) as e:
        r = await post(http, e, body(), headers={"Authorization": "Bearer bad"}, auth=False)
        assert (r.status, r.json["error"]["message"]) == (401, "User not found.")
        r = await post(http, e, body(), headers={"Authorization": "Bearer good"}, auth=False)
        assert r.status == 200


@pytest.mark.parametrize(("payload", "needle"), [
    ({"model": GPT4O}, "input"),
    ({**body(), "store": True}, "store"),
    ({**body(), "previous_response_id": "resp_1"}, "previous_response_id"),
    (body(model="acme/fake-1.0"), "acme/fake-1.0 is not a valid model ID"),
    (body(model=R1, reasoning={"effort": "none"}), "Reasoning is mandatory"),
    (body(model=NANO, reasoning={"enabled": False}), "Reasoning is mandatory"),
])
async def test_validation_errors(emu, http, payload, needle):
    r = await post(http, emu, payload)
    assert r.status == 400 and needle in r.json["error"]["message"]
    if "valid model" in needle:
        assert r.json["error"]["availability"]["code"] == "model_not_found"


async def test_invalid_json(emu, http):
    async with http.post(f"{emu.base_url}/responses", data=b"{nope", headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == 400


async def test_unknown_scenario_or_option_is_400(emu, http):
    assert (await post(http, emu, body(), scenario="nope")).status == 400
    assert (await post(http, emu, body(), scenario="text bogus=1")).status == 400


# ----------------------------------------------------------------------------- scenarios


# spec, model, stream terminal type (None = no terminal event), [DONE] expected, body status
CASES = [
    ("default", GPT4O, "response.completed", True, "completed"),
    ("text deltas=7", GPT4O, "response.completed", True, "completed"),
    ("flood deltas=500", GPT4O, "response.completed", True, "completed"),
    ("slow delay_ms=5", GPT4O, "response.completed", True, "completed"),
    ("reasoning style=summary", NANO, "response.completed", True, "completed"),
    ("reasoning style=raw", CLAUDE, "response.completed", True, "completed"),
    ("tool_call n=2", GPT4O, "response.completed", True, "completed"),
    ("web_search annotation_events=1", GPT4O, "response.completed", True, "completed"),
    ("incomplete", GPT4O, "response.incomplete", True, "incomplete"),
    ("mid_stream_failure", GPT4O, "response.failed", True, "failed"),
    ("failed_200", GPT4O, "response.failed", True, "failed"),
    ("error_event", GPT4O, None, False, "failed"),
    ("error_event form=nested done=1", GPT4O, None, True, "failed"),
    ("truncate", GPT4O, None, False, None),
    ("fail_then_ok times=0", GPT4O, "response.completed", True, "completed"),
]


@pytest.mark.parametrize(("spec", "model", "terminal", "done", "status"), CASES,
                         ids=[c[0] for c in CASES])
async def test_scenario_stream(emu, http, spec, model, terminal, done, status):
    skip = ("error",) if "nested" in spec else ()
    events = check_stream(await post(http, emu, body(model), spec), done=done, skip=skip)
    found = [e for e in events if e["type"] in TERMINALS]
    assert [e["type"] for e in found] == ([terminal] if terminal else [])
    if terminal:
        final = found[0]["response"]
        assert final["status"] == status and final["id"] == events[0]["response"]["id"]
    if spec.startswith("error_event"):
        assert events[-1]["type"] == "error"
    if "nested" in spec:  # the nested form is not in the SDK schema (docs-prose form)
        assert "error" in events[-1]
        with pytest.raises(SchemaError):
            validate_stream_event(events[-1])


@pytest.mark.parametrize(("spec", "model", "terminal", "done", "status"), CASES,
                         ids=[c[0] for c in CASES])
async def test_scenario_non_stream(emu, http, spec, model, terminal, done, status):
    if status is None:  # truncate: the body is cut mid-JSON
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(http, emu, body(model, stream=False), spec)
        return
    obj = check_body(await post(http, emu, body(model, stream=False), spec))
    assert obj["status"] == status
    if status == "failed":
        assert obj["error"]["code"] == "server_error" and obj["error_type"]
    if status == "incomplete":
        assert obj["incomplete_details"] == {"reason": "max_output_tokens"}


def test_every_registered_scenario_is_covered():
    covered = {c[0].split()[0] for c in CASES} | {"http_error", "hang", "wrong_body"}
    covered |= {"primary_down", "provider_retry", "unavailable",
                "free_limit"}  # issue #12: test_emulator_routing.py
    covered |= {"image", "image_refusal"}  # test_emulator_images.py (issue #14)
    assert set(SCENARIOS) == covered


@pytest.mark.parametrize(("kind", "ctype"), [("html", "text/html"),
                                             ("json", "application/json"),
                                             ("text", "text/plain")])
async def test_wrong_body_answers_200_without_a_stream(emu, http, kind, ctype):
    """issue #11: a proxy page / a non-streamed error object where a stream was asked for."""
    async with http.post(emu.base_url + "/responses", json=body(GPT4O),
                         headers={**AUTH, "X-Emulator-Scenario": f"wrong_body kind={kind}"}
                         ) as resp:
        assert resp.status == 200 and resp.content_type == ctype
        data = await resp.read()
    assert b"data:" not in data
    if kind == "json":
        assert json.loads(data)["error"]["message"] == "Provider returned error"


async def test_stream_matches_non_stream_final_object(emu, http):
    events = check_stream(await post(http, emu, body(CLAUDE)))
    final = events[-1]["response"]
    obj = check_body(await post(http, emu, body(CLAUDE, stream=False)))
    assert final_text(final) == final_text(obj) == "You said: Olá, ação 😀 hello"
    assert list(final) == list(obj)


async def test_flood_default_is_20000_deltas(emu, http):
    t0 = time.monotonic()
    events = check_stream(await post(http, emu, body(), "flood"))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 20000
    assert "".join(d["delta"] for d in deltas) == final_text(events[-1]["response"])
    assert time.monotonic() - t0 < 15


async def test_tool_call_options(emu, http):
    args = '{"q":"ação 😀"}'
    events = check_stream(await post(http, emu, body(), f"tool_call name=search args='{args}' n=3"))
    calls = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [c["name"] for c in calls] == ["search"] * 3 and calls[0]["arguments"] == args
    assert all(re.fullmatch(r"fc_tmp_[a-z0-9]{11}", c["id"]) for c in calls)
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c["call_id"]) for c in calls)
    assert len({c["call_id"] for c in calls}) == 3


async def test_web_search_annotations(emu, http):
    events = check_stream(await post(http, emu, body(), "web_search"))
    done = [e for e in events if e["type"] == "response.output_item.done"][-1]["item"]
    part = done["content"][0]
    assert part["annotations"] and all(a["type"] == "url_citation" for a in part["annotations"])
    for a in part["annotations"]:
        assert part["text"][a["start_index"]:a["end_index"]].endswith(f"({a['url']})")
    assert events[-1]["response"]["output"][-1]["content"][0]["annotations"] == part["annotations"]


@pytest.mark.parametrize("status", sorted(ERROR_BODIES))
async def test_http_errors(emu, http, status):
    for stream in (True, False):
        r = await post(http, emu, body(stream=stream), f"http_error status={status}")
        assert r.status == status and r.headers["Content-Type"].startswith("application/json")
        assert r.json["error"]["code"] == status and r.json["error"]["message"]
        if status == 429:
            assert r.headers["Retry-After"] == "1"
            assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(
                r.headers)
    r = await post(http, emu, body(), "http_error status=503 retry_after=7")
    assert r.headers["Retry-After"] == "7" and r.json["error"]["availability"]["retry_after"] == 7
    assert "metadata" in (await post(http, emu, body(), "http_error status=502")).json["error"]


async def test_fail_then_ok(emu, http):
    spec = "fail_then_ok times=2 status=429 retry_after=0"
    statuses = [(await post(http, emu, body(), spec)).status for _ in range(4)]
    assert statuses == [429, 429, 200, 200]
    assert (await post(http, emu, body(), "fail_then_ok key=other")).status == 503
    assert (await post(http, emu, body(), "fail_then_ok key=other")).status == 200
    # directive form: the retry repeats the same user text, hence the same key
    b = body(text="[emu:fail_then_ok] retry me")
    assert [(await post(http, emu, b)).status for _ in range(2)] == [503, 200]


async def test_hang_records_disconnect(emu):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{emu.base_url}/responses", json=body(), headers={
                **AUTH, "X-Emulator-Scenario": "hang"}) as r:
            assert r.status == 200
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first.startswith(b":")
            assert emu.active_streams == 1
    for _ in range(100):
        if emu.disconnects and emu.active_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert len(emu.disconnects) == 1 and emu.active_streams == 0


async def test_client_disconnect_mid_stream_is_recorded(emu):
    async with aiohttp.ClientSession() as s, s.post(
            f"{emu.base_url}/responses", json=body(),
            headers={**AUTH, "X-Emulator-Scenario": "slow delay_ms=100 deltas=20"}) as r:
        await r.content.readuntil(b"response.in_progress")
    for _ in range(100):
        if emu.disconnects and emu.active_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert len(emu.disconnects) == 1 and emu.active_streams == 0
    gen = r.headers["X-Generation-Id"]
    assert emu.generations[gen]["cancelled"] is True


async def test_stop_releases_hanging_stream():
    e = Emulator()
    await e.start()
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(f"{e.base_url}/responses", json=body(stream=False),
                                          headers={**AUTH, "X-Emulator-Scenario": "hang"}))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await e.stop()
        assert time.monotonic() - t0 < 3
        with contextlib.suppress(aiohttp.ClientError):
            (await task).release()


async def test_hang_non_stream_times_out(emu):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(f"{emu.base_url}/responses", json=body(stream=False),
                         headers={**AUTH, "X-Emulator-Scenario": "hang"})
    for _ in range(100):
        if emu.disconnects:
            break
        await asyncio.sleep(0.02)
    assert emu.disconnects


async def test_timing_options(emu, http):
    t0 = time.monotonic()
    await post(http, emu, body(), "text first_byte_delay_ms=300 deltas=1")
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    events = check_stream(await post(http, emu, body(), "slow deltas=1"))
    assert time.monotonic() - t0 >= 0.2 * (len(events) - 1) * 0.9


# ----------------------------------------------------------------------------- quirks


async def test_quirk_comments_and_leading(emu, http):
    r = await post(http, emu, body(), "text comments=1 leading=2")
    check_stream(r)
    assert r.raw.startswith(b": \n\n: \n\ndata: ")
    assert r.raw.count(b": OPENROUTER PROCESSING\n\n") == len(parse_sse(r.raw))


async def test_quirk_crlf(emu, http):
    r = await post(http, emu, body(), "text crlf=1")
    check_stream(r)
    assert b"\r\n\r\n" in r.raw and re.search(rb"[^\r]\n", r.raw) is None


async def test_quirk_split_writes(emu, http):
    chunks = []
    hdrs = {**AUTH, "X-Emulator-Scenario": "text split=1 deltas=3"}
    async with http.post(f"{emu.base_url}/responses", json=body(), headers=hdrs) as r:
        async for chunk in r.content.iter_any():
            chunks.append(chunk)
    raw = b"".join(chunks)
    events = check_stream(Reply(200, dict(r.headers), raw))
    assert len(chunks) > len(events)  # events arrive in pieces
    with pytest.raises(UnicodeDecodeError):  # at least one piece ends mid-UTF-8
        for c in chunks:
            c.decode("utf-8")


async def test_quirk_late_reasoning_close(emu, http):
    events = check_stream(await post(http, emu, body(NANO), "text late_reasoning_close=1"))
    done = [(e["item"]["type"], e["sequence_number"]) for e in events
            if e["type"] == "response.output_item.done"]
    assert [t for t, _ in done] == ["message", "reasoning"]
    assert [i["type"] for i in events[-1]["response"]["output"]] == ["reasoning", "message"]


async def test_quirk_no_completed_and_no_done(emu, http):
    events = check_stream(await post(http, emu, body(), "text no_completed=1"))
    assert not TERMINALS & set(types(events))
    events = check_stream(await post(http, emu, body(), "text no_done=1"), done=False)
    assert events[-1]["type"] == "response.completed"


async def test_quirk_unknown_events(emu, http):
    r = await post(http, emu, body(), "text unknown_events=1")
    events = check_stream(r, allow_unknown=UNKNOWN_EVENT_TYPES)
    assert {"response.fusion_call.in_progress", *UNKNOWN_EVENT_TYPES} <= set(types(events))
    with pytest.raises(SchemaError):
        check_stream(r)


@pytest.mark.parametrize("quirk", ["comments=1", "crlf=1", "split=1", "late_reasoning_close=1",
                                   "no_completed=1", "no_done=1", "unknown_events=1"])
@pytest.mark.parametrize("spec", ["reasoning style=summary", "tool_call", "mid_stream_failure"])
async def test_quirks_combine_with_scenarios(emu, http, spec, quirk):
    r = await post(http, emu, body(NANO), f"{spec} {quirk}")
    check_stream(r, done="no_done" not in quirk, allow_unknown=UNKNOWN_EVENT_TYPES)
    r = await post(http, emu, body(NANO, stream=False), f"{spec} {quirk}")
    check_body(r)


# ----------------------------------------------------------------------------- default behaviour


async def test_selection_priority_and_directive_stripping(emu, http):
    b = body(text="[emu:text text=from-directive] hi there")
    assert final_text(check_body(await post(http, emu, {**b, "stream": False}))) == "from-directive"
    r = await post(http, emu, {**b, "stream": False}, "text text=from-header")
    assert final_text(check_body(r)) == "from-header"
    emu.enqueue("text", text="from-queue")
    r = await post(http, emu, {**b, "stream": False}, "text text=from-header")
    assert final_text(check_body(r)) == "from-queue"
    r = await post(http, emu, {**b, "stream": False}, "text text='quoted ação 😀'")
    assert final_text(check_body(r)) == "quoted ação 😀"
    r = await post(http, emu, body(text="[emu:default] hi  there", stream=False))
    assert final_text(check_body(r)) == "You said: hi  there"
    assert [q["scenario"] for q in emu.requests] == ["text"] * 4 + ["default"]
    for q in emu.requests:
        validate_request(q["json"])


@pytest.mark.parametrize(("needle", "expected"), [
    ('"title"', {"title": "Emulated chat title"}),
    ('"tags"', {"tags": ["General"]}),
    ('"follow_ups"', {"follow_ups": ["Tell me more?"]}),
])
async def test_task_prompts(emu, http, needle, expected):
    prompt = f"### Task:\nDo the thing.\n### Output:\nJSON format: {{ {needle}: ... }}"
    obj = check_body(await post(http, emu, body(text=prompt, stream=False)))
    assert json.loads(final_text(obj)) == expected


async def test_tool_result_is_quoted(emu, http):
    b = body(stream=False)
    b["input"] += [
        {"type": "function_call", "call_id": "call_A", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_A", "output": "42 ação"},
        {"type": "function_call", "call_id": "call_B", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_B",
         "output": [{"type": "input_text", "text": "blue"}]}]
    validate_request(b)
    text = final_text(check_body(await post(http, emu, b)))
    assert text == "Tool result for call_A: 42 ação\nTool result for call_B: blue"


@pytest.mark.parametrize(("model", "reasoning", "shape"), [
    (GPT4O, None, None),
    (NANO, None, "encrypted"),
    (NANO, {"summary": "auto", "effort": "low"}, "summary"),
    (NANO, {"summary": "auto", "effort": "minimal"}, "encrypted"),
    (CLAUDE, None, "anthropic"),
    (CLAUDE, {"effort": "none"}, None),
    (R1, None, "raw"),
])
async def test_reasoning_shapes(emu, http, model, reasoning, shape):
    kw = {"reasoning": reasoning} if reasoning else {}
    kw["include"] = ["reasoning.encrypted_content"]
    events = check_stream(await post(http, emu, body(model, **kw)))
    final = events[-1]["response"]
    rs = [i for i in final["output"] if i["type"] == "reasoning"]
    et = set(types(events))
    if shape is None:
        assert not rs and final["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
        return
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    item = rs[0]
    assert final["output"][0] is item or final["output"][0] == item
    has_summary = "response.reasoning_summary_text.delta" in et
    assert has_summary is (shape == "summary")
    assert ("response.reasoning_text.delta" in et) is (shape in ("anthropic", "raw"))
    if shape in ("encrypted", "summary"):
        assert item["format"] == "openai-responses-v1" and "." in item["encrypted_content"]
        assert re.fullmatch(r"rs_[0-9a-f]{50}", item["id"])
    if shape == "anthropic":
        assert item["format"] == "anthropic-claude-v1" and item["signature"]
    if shape in ("anthropic", "raw"):
        assert item["content"][0]["type"] == "reasoning_text"


@pytest.mark.parametrize(("model", "spec"), [
    (NANO, "reasoning style=summary"), (CLAUDE, "reasoning"), (R1, "text"),
    ("google/gemini-2.5-flash", "tool_call"), (GPT4O, "web_search"), (GPT4O, "tool_call n=2")])
async def test_replayed_output_items_validate_as_request_input(emu, http, model, spec):
    """The next turn's input = previous input + output items verbatim (+ tool outputs)."""
    b = body(model, stream=False)
    out = check_body(await post(http, emu, b, spec))["output"]
    outputs = [{"type": "function_call_output", "call_id": o["call_id"], "output": "ok"}
               for o in out if o["type"] == "function_call"]
    follow_up = {**b, "input": b["input"] + out + outputs}
    validate_request(follow_up)
    check_body(await post(http, emu, follow_up))


async def test_usage_cost_and_envelope(emu, http):
    events = check_stream(await post(http, emu, body(GPT4O)))
    final = events[-1]["response"]
    u = final["usage"]
    expected = Decimal("0.0000025") * u["input_tokens"] + Decimal("0.00001") * u["output_tokens"]
    assert u["cost"] == pytest.approx(float(expected))
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert set(u["cost_details"]) == {"upstream_inference_cost", "upstream_inference_input_cost",
                                      "upstream_inference_output_cost"}
    real = next(parse_sse(raw) for name, _, raw in captures() if name == "test_prompt.yaml")
    assert list(final) == list(real[-1]["response"])
    assert list(events[0]["response"]) == list(real[0]["response"])
    msg = final["output"][0]
    assert re.fullmatch(r"msg_tmp_[a-z0-9]{11}", msg["id"])
    assert list(msg) == list(real[-1]["response"]["output"][0])


# ----------------------------------------------------------------------------- captures


@pytest.mark.parametrize(("name", "req", "raw"), captures(), ids=lambda v: v if isinstance(
    v, str) else "")
def test_capture_request_bodies_validate(name, req, raw):
    validate_request(req)
    for ev in parse_sse(raw):
        validate_stream_event(ev)


@pytest.mark.parametrize("bad", [
    {"seed": 1}, {"foo": 1}, {"STORE": False}, {"transforms": ["middle-out"]},
    {"reasoning": {"effort": "low", "sumary": "auto"}},
    {"tools": [{"type": "function", "name": "f", "parameters": {}, "strcit": True}]},
    {"input": [{"type": "function_call_outptu", "call_id": "c", "output": "x"}]},
    {"input": [{"role": "user", "content": [{"type": "input_txt", "text": "x"}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x", "bogus": 1}]}]},
])
def test_invalid_request_bodies_fail(bad):
    good = {"model": GPT4O, "input": "hi", "stream": True}
    validate_request(good)
    with pytest.raises(SchemaError):
        validate_request({**good, **bad})


def test_sdk_schema_request_fields():
    """Facts the pipe relies on (SDK 1.3.84): stop/top_k exist, seed does not."""
    validate_request({"model": GPT4O, "input": "x", "stop": ["\n"], "top_k": 3})
    with pytest.raises(SchemaError):
        validate_request({"model": GPT4O, "input": "x", "seed": 3})


async def test_event_sequence_matches_real_captures(emu, http):
    caps = captures()
    by_name: dict[str, list] = {}
    for name, req, raw in caps:
        by_name.setdefault(name, []).append((req, raw))
    (req, raw), = by_name["test_prompt.yaml"]
    real = types(parse_sse(raw))
    exact = check_stream(await post(http, emu, req, "text deltas=4"))
    assert types(exact) == real
    assert collapse(types(check_stream(await post(http, emu, req)))) == collapse(real)
    for name, spec in [("test_reasoning.yaml", None), ("test_image_prompt.yaml", None)]:
        (req, raw), = by_name[name]
        mine = check_stream(await post(http, emu, req, spec))
        assert collapse(types(mine)) == collapse(types(parse_sse(raw))), name
    (first, raw1), (second, raw2) = by_name["test_tool_calls.yaml"]
    mine = check_stream(await post(http, emu, first, "tool_call args={}"))
    assert types(mine) == types(parse_sse(raw1)) or collapse(types(mine)) == collapse(
        types(parse_sse(raw1)))
    mine = check_stream(await post(http, emu, second))
    assert collapse(types(mine)) == collapse(types(parse_sse(raw2)))
    assert final_text(mine[-1]["response"]).endswith(": 0.0+test")


# ----------------------------------------------------------------------------- thread & CLI


def test_emulator_thread_sync_api():
    with EmulatorThread() as t:
        t.enqueue("text", text="threaded ação")
        req = urllib.request.Request(
            f"{t.base_url}/responses", data=json.dumps(body(stream=False)).encode(),
            headers={**AUTH, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            obj = json.loads(r.read())
        assert final_text(obj) == "threaded ação"
        assert [q["scenario"] for q in t.requests] == ["text"] and t.active_streams == 0
        assert t.disconnects == []
        t.reset()
        assert t.requests == []


def test_cli_prints_url_and_stops_on_sigterm():
    cmd = [sys.executable, str(ROOT / "tools" / "openrouter_emulator.py"), "--port", "0",
           "--extra-models", "3"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            line = proc.stdout.readline().strip()
            assert line.startswith("EMULATOR_URL=http://127.0.0.1:") and line.endswith("/api/v1")
            with urllib.request.urlopen(line.split("=", 1)[1] + "/models", timeout=10) as r:
                assert json.loads(r.read())["data"][-1]["id"] == "synthetic/model-0003"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_encrypted_reasoning_only_when_include_asks(emu, http):
    events = check_stream(await post(http, emu, body(NANO)))
    (item,) = [i for i in events[-1]["response"]["output"] if i["type"] == "reasoning"]
    assert item["encrypted_content"] is None
