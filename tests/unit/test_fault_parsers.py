"""Pure parsers added for issue #11 (items 8, 10, 15, 16), table-driven and fuzzed."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    SSEEvent,
    StreamState,
    StreamTiming,
    UpstreamStreamError,
    UpstreamUnexpectedBody,
    Usage,
    base64_size,
    final_status_line,
    has_socket_session,
    html_snippet,
    reduce_events,
    retrieval_gap,
    stored_size,
    unexpected_body,
    usage_payload,
)


@pytest.mark.parametrize(("ctype", "body", "expected"), [
    ("text/html", b"<html><head><title>Access &amp; denied</title></head><body>x</body>",
     "OpenRouter answered with an HTML page, not a stream: “Access & denied”."),
    ("", b"<!DOCTYPE html><p>Blocked   by\n policy</p>",
     "OpenRouter answered with an HTML page, not a stream: “Blocked by policy”."),
    ("application/json", b'{"error": {"message": "No endpoints", "code": 404}}',
     "OpenRouter answered with an error instead of a stream (code 404): No endpoints."),
    ("text/plain", b"bad gateway", "OpenRouter answered with text/plain, not a stream: "
     "“bad gateway”."),
    ("application/json", b'{"id": "resp_1"}', "OpenRouter answered with application/json, "
     "not a stream: “{\"id\": \"resp_1\"}”."),
])
def test_unexpected_bodies_are_described(ctype, body, expected):
    err = unexpected_body(ctype, body, "a stream")
    assert isinstance(err, UpstreamUnexpectedBody) and err.message == expected


@given(st.text(max_size=3000), st.sampled_from(["text/html", "", "text/plain",
                                                "application/json; charset=utf-8"]))
@settings(max_examples=200, deadline=None)
def test_any_body_gives_a_bounded_message_and_never_raises(text, ctype):
    err = unexpected_body(ctype, text.encode("utf-8", "surrogatepass"), "a stream")
    assert isinstance(err, UpstreamUnexpectedBody)
    assert len(err.message) < 1200


@given(st.binary(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_any_bytes_give_a_message(body):
    assert unexpected_body("text/html", body, "JSON").message.startswith("OpenRouter answered")


def test_html_snippets_are_linear_on_adversarial_pages():
    def cost(n: int) -> float:
        page = "<title" + "<" * n + "<a" * n
        started = time.perf_counter()
        html_snippet(page)
        return time.perf_counter() - started

    small, big = min(cost(20_000) for _ in range(3)), min(cost(80_000) for _ in range(3))
    assert big < small * 12 + 0.05  # 4x input: ~4x time (quadratic would be ~16x)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["type", "error", "message", "code",
                                                       "metadata", "raw"]), inner, max_size=4),
                    max_leaves=20))
@settings(max_examples=300, deadline=None)
def test_any_json_event_is_reduced_without_raising(value):
    state = StreamState()
    reduce_events(state, [SSEEvent(json.dumps(value))])
    if state.terminal == "failed":
        assert isinstance(state.error, UpstreamStreamError) and state.error.message


def test_a_typeless_error_event_fails_the_stream_with_the_providers_words():
    state = StreamState()
    reduce_events(state, [SSEEvent(json.dumps({"error": {
        "message": "Rate limited upstream", "code": 429,
        "metadata": {"raw": "slow down", "provider_name": "Acme"}}}))])
    assert state.terminal == "failed" and state.error is not None
    assert state.error.message == "Rate limited upstream Provider said (Acme): slow down"
    assert state.error.code == "429"


def test_status_line_and_usage_payload_without_usage():
    timing = StreamTiming(started=0.0, ended_at=1.5)
    assert final_status_line(None, timing) == "1.50s · usage unavailable"
    assert usage_payload(None, timing) == {"usage_unavailable": True, "response_time_s": 1.5}
    assert "0 tokens" in final_status_line(Usage(), timing)  # a real zero is still shown


@pytest.mark.parametrize(("meta", "expected"), [
    ({"session_id": "s", "chat_id": "c", "message_id": "m"}, True),
    ({"session_id": None, "chat_id": "c", "message_id": "m"}, False),  # API client
    ({"chat_id": "c", "message_id": "m"}, False),
    ({}, False),
])
def test_socket_session_detection(meta, expected):
    assert has_socket_session(meta) is expected


class Record:
    def __init__(self, data=None, meta=None, user_id="u1"):
        self.data, self.meta, self.user_id = data, meta, user_id


@pytest.mark.parametrize(("item", "data", "expected"), [
    ({}, {"status": "completed", "content": "text"}, None),
    ({}, {"status": "failed", "error": "boom"}, "processing failed: boom"),
    ({}, {"status": "failed"}, "processing failed: no reason given"),
    ({"error": "upload failed"}, {"status": "completed", "content": "x"},
     "processing failed: upload failed"),
    ({}, {"status": "pending"}, "it was still being processed"),
    ({}, {"status": "completed", "content": ""}, "no text could be extracted"),
    ({}, {}, "no text could be extracted"),          # uploaded with process=false
    ({}, None, "no text could be extracted"),
])
def test_retrieval_gaps(item, data, expected):
    full = {"context": "full", "file": {"data": {"content": "the text"}}}
    assert retrieval_gap(full, Record(data)) is None  # Open WebUI used the item's own text
    assert retrieval_gap(item, Record(data)) == expected
    assert retrieval_gap(item, None) is None


def test_stored_sizes_are_told_only_for_readable_files():
    assert stored_size(Record(meta={"size": 10}), "u1", "user") == 10
    assert stored_size(Record(meta={"size": 10}, user_id="u2"), "u1", "user") is None
    assert stored_size(Record(meta={"size": 10}, user_id="u2"), "u1", "admin") == 10
    for bad in ({"size": "10"}, {"size": True}, {"size": -1}, {}, None):
        assert stored_size(Record(meta=bad), "u1", "user") is None
    assert base64_size(10 * 1024 * 1024) == 13981016 + 48
