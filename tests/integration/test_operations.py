"""Operations: request-scoped logs, redaction, the log citation, and the health snapshot."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import types
from pathlib import Path

import pytest
from conftest import Events
from helpers import body, stream

from openrouter_responses_pipe import Pipe, Usage, flush_logs

GPT4O, CLAUDE = "openai/gpt-4o", "anthropic/claude-sonnet-4"
PIPE_SOURCE = (Path(__file__).resolve().parents[2] / "openrouter_responses_pipe.py").read_text()
KEY = "sk-or-v1-0123456789abcdefSECRET"


def configure(pipe, emulator, **valves):
    pipe.valves = pipe.Valves(BASE_URL=emulator.base_url, API_KEY=KEY, **valves)


def log_citations(events):
    return [d for d in events.of("citation") if d["source"]["name"].startswith("Pipe log")]


async def test_each_turn_log_holds_only_its_own_lines(pipe, emulator, events):
    configure(pipe, emulator, REQUEST_LOG_CITATION="always")
    other_events = type(events)()
    slow = "[emu:text delay_ms=20 deltas=6]"
    await asyncio.gather(
        stream(pipe, body(GPT4O, f"{slow} from alice"), __event_emitter__=events,
               __user__={"id": "alice", "role": "user"}),
        stream(pipe, body(CLAUDE, f"{slow} from bob"), __event_emitter__=other_events,
               __user__={"id": "bob", "role": "user"}))
    (mine,), (theirs,) = log_citations(events), log_citations(other_events)
    my_log, their_log = mine["document"][0], theirs["document"][0]
    assert f"model={GPT4O}" in my_log and CLAUDE not in my_log
    assert f"model={CLAUDE}" in their_log and GPT4O not in their_log
    assert mine["source"]["name"] != theirs["source"]["name"]
    assert "Done:" in my_log and "Done:" in their_log


async def test_error_attaches_the_turns_log_and_a_reference(pipe, emulator, events):
    configure(pipe, emulator)                                 # default: citation on errors
    out = await stream(pipe, body(GPT4O, "[emu:http_error status=402] hi"),
                       __event_emitter__=events)
    (citation,) = log_citations(events)
    reference = citation["source"]["name"].removeprefix("Pipe log ")
    assert reference in out.error
    assert "Turn failed (UpstreamStatusError, HTTP 402)" in citation["document"][0]
    assert "Insufficient credits" in citation["document"][0]


async def test_no_citation_for_a_good_turn_unless_asked(pipe, emulator, events):
    configure(pipe, emulator)
    await stream(pipe, body(GPT4O, "fine"), __event_emitter__=events)
    assert log_citations(events) == []


async def test_secrets_never_reach_any_log(pipe, emulator, events):
    server_log: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            server_log.append(self.format(record))

    root = logging.getLogger()
    capture, old_level = Capture(logging.DEBUG), root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        configure(pipe, emulator, LOG_LEVEL="DEBUG", REQUEST_LOG_CITATION="always")
        image = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUg" * 20
        msg = [{"type": "text", "text": f"my key is {KEY}, Authorization: Bearer {KEY}"},
               {"type": "image_url", "image_url": {"url": image}}]
        await stream(pipe, {"model": f"openrouter.{GPT4O}", "stream": True,
                            "messages": [{"role": "user", "content": msg}]},
                     __event_emitter__=events, __user__={"id": "admin", "role": "admin"})
        await stream(pipe, body(GPT4O, "[emu:http_error status=401] x"),
                     __event_emitter__=events)
        flush_logs()
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    everything = "\n".join(server_log + [c["document"][0] for c in log_citations(events)])
    assert "Request body" in everything                      # DEBUG lines were written
    assert KEY not in everything and "0123456789abcdef" not in everything
    assert "iVBORw0KGgoAAAANSUhEUgiVBORw0KGgo" not in everything


async def test_only_admins_can_raise_their_own_log_level(pipe, emulator, events):
    configure(pipe, emulator, REQUEST_LOG_CITATION="always")
    debug = Pipe.UserValves(LOG_LEVEL="DEBUG")
    await stream(pipe, body(GPT4O, "x"), __event_emitter__=events,
                 __user__={"id": "u", "role": "user", "valves": debug})
    await stream(pipe, body(GPT4O, "x"), __event_emitter__=events,
                 __user__={"id": "a", "role": "admin", "valves": debug})
    user_log, admin_log = (c["document"][0] for c in log_citations(events))
    assert "Request body" not in user_log and "Request body" in admin_log


def test_usage_is_summed_across_rounds():
    total = Usage(10, 5, 1, 2, 0.001)
    total.add(Usage(20, 7, 3, 0, 0.002))
    total.add(Usage(1, 1, 0, 0, None))
    assert (total.input_tokens, total.output_tokens, total.reasoning_tokens,
            total.cached_tokens) == (31, 13, 4, 2)
    assert total.cost == pytest.approx(0.003) and total.total_tokens == 44


async def health(pipe, text="report", role="admin", stream_=False):
    return await pipe.pipe(body={"model": "openrouter._health", "stream": stream_,
                                 "messages": [{"role": "user", "content": text}]},
                           __user__={"id": "admin", "role": role})


async def test_health_snapshot_counts_a_burst_of_traffic(pipe, emulator):
    configure(pipe, emulator, MAX_RETRIES=0)
    prompts = (["ok"] * 8 + ["[emu:http_error status=500] x"] * 3
               + ["[emu:http_error status=402] x"] * 2)
    await asyncio.gather(*(stream(pipe, body(GPT4O, p), __user__={"id": f"u{i}"})
                           for i, p in enumerate(prompts)))
    data = json.loads(await health(pipe, "json"))
    assert data["requests"]["total"] == 13 and data["requests"]["in_flight"] == 0
    # 8 answers + the one catalog fetch that the first turn triggered
    assert data["upstream"]["responses_by_status"] == {"200": 9, "500": 3, "402": 2}
    assert data["requests"]["failed_by_kind"] == {"UpstreamStatusError": 5}
    assert data["upstream"]["window"] == 14 and data["upstream"]["latency_ms_p95"] > 0
    assert data["upstream"]["first_token_ms_p50"] is not None
    assert data["catalog"]["models"] >= 10 and data["catalog"]["last_error"] is None


async def test_health_shows_in_flight_and_busy_rejections(pipe, emulator):
    configure(pipe, emulator, MAX_CONCURRENT_REQUESTS=1, MAX_QUEUED_REQUESTS=0)
    hanging = await pipe.pipe(body=body(GPT4O, "[emu:hang] x"), __user__={"id": "a"})
    holder = asyncio.create_task(anext(hanging))
    await asyncio.sleep(0.05)
    await stream(pipe, body(GPT4O, "y"), __user__={"id": "b"})
    data = json.loads(await health(pipe, "json"))
    assert data["requests"]["in_flight"] == 1 and data["requests"]["rejected_busy"] == 1
    report = await health(pipe)
    assert "1 in flight" in report and "1 turned away as busy" in report
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    await hanging.aclose()


async def test_health_is_for_admins_and_can_fetch_a_turns_log(pipe, emulator, events):
    configure(pipe, emulator)
    with pytest.raises(Exception, match="admins only"):
        await health(pipe, role="user")
    out = await stream(pipe, body(GPT4O, "[emu:http_error status=403] x"),
                       __event_emitter__=events)
    reference = out.error.rsplit("reference ", 1)[1].rstrip(")")
    log_text = await health(pipe, f"log {reference}")
    assert "Turn failed (UpstreamStatusError, HTTP 403)" in log_text
    streamed = await health(pipe, stream_=True)
    chunks = [c async for c in streamed]
    assert "pipe health" in chunks[0]["choices"][0]["delta"]["content"]


def test_a_broken_log_call_never_raises_into_a_chat():
    from openrouter_responses_pipe import LOG

    LOG.warning("bad format %d", "not a number")  # getMessage() raises inside the filter
    LOG.warning("still logging")


class ExplodingTransport:
    """A transport with a bug in it: the pipe must still answer in words."""

    async def request(self, method, url, **kwargs):
        raise RuntimeError("kaboom in transport")

    async def aclose(self):
        pass


async def test_an_unexpected_bug_becomes_a_readable_error_with_its_log(events):
    pipe = Pipe(transport=ExplodingTransport())
    pipe.valves = pipe.Valves(API_KEY=KEY)
    out = await stream(pipe, body(GPT4O, "hi"), __event_emitter__=events)
    assert "unexpected internal error" in out.error and "reference req-" in out.error
    (citation,) = log_citations(events)  # an ordinary user: no traceback, a reference
    assert "Turn failed with an unexpected RuntimeError" in citation["document"][0]
    assert "kaboom" not in citation["document"][0]
    assert "[traceback: admin only]" in citation["document"][0]
    admin_events = type(events)()
    await stream(pipe, body(GPT4O, "hi"), __event_emitter__=admin_events,
                 __user__={"id": "a1", "role": "admin"})
    (citation,) = log_citations(admin_events)
    assert "RuntimeError: kaboom in transport" in citation["document"][0]  # the traceback
    with pytest.raises(Exception, match="unexpected internal error"):
        await pipe.pipe(body=body(GPT4O, "hi", stream=False), __user__={"id": "u"})


async def test_two_installed_copies_share_logging_and_redaction(emulator, events):
    """Admins may install this file twice (two keys); Open WebUI re-execs it on updates."""
    copy = types.ModuleType("function_openrouter_second_copy")
    sys.modules[copy.__name__] = copy                # Open WebUI registers it the same way
    exec(compile(PIPE_SOURCE, "second_copy.py", "exec"), copy.__dict__)
    first = Pipe()                                   # the imported module's copy
    first.valves = first.Valves(BASE_URL=emulator.base_url, API_KEY=KEY,
                                REQUEST_LOG_CITATION="always")
    out = await stream(first, body(GPT4O, f"key {KEY} please"), __event_emitter__=events)
    (citation,) = log_citations(events)
    assert "model=openai/gpt-4o" in citation["document"][0]        # turn log still collected
    copy.LOG.info("second copy logs the first key: %s", KEY)
    flush_logs()
    assert KEY not in citation["document"][0] and out.error is None
    assert KEY not in copy.redact(f"x {KEY} y")                     # secrets are shared
    await first.close()
    del sys.modules[copy.__name__]


async def test_health_counts_network_failures(sleeps):
    pipe = Pipe(sleep=sleeps)
    pipe.valves = pipe.Valves(BASE_URL="http://127.0.0.1:9/api/v1", API_KEY=KEY, MAX_RETRIES=1)
    out = await stream(pipe, body(GPT4O, "hi"))
    assert "Couldn't reach OpenRouter" in out.error and "Tried 2 times" in out.error
    data = json.loads(await health(pipe, "json"))
    assert data["upstream"]["responses_by_status"] == {"network": 2}
    assert data["catalog"]["last_error"] is not None
    await pipe.close()


async def test_an_unreachable_openrouter_is_named_without_its_address(sleeps):
    """An ordinary user reads the kind of failure; the host and port are for the admin."""
    pipe = Pipe(sleep=sleeps)
    pipe.valves = pipe.Valves(BASE_URL="http://127.0.0.1:9/internal-gw/api/v1", API_KEY=KEY,
                              MAX_RETRIES=0, REQUEST_LOG_CITATION="always")
    seen = {}
    for role in ("user", "admin"):
        events = Events()
        out = await stream(pipe, body(GPT4O, "hi"), __event_emitter__=events,
                           __user__={"id": "u1", "role": role, "valves": None})
        (citation,) = log_citations(events)
        seen[role] = (out.error, citation["document"][0])
    error, user_log = seen["user"]
    assert error.startswith("Couldn't reach OpenRouter (connection refused).")
    assert "127.0.0.1" not in error + user_log and "internal-gw" not in error + user_log
    assert "Cannot connect to host 127.0.0.1:9" in seen["admin"][1]
    await pipe.close()
