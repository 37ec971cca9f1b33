"""Reducer and renderer over real captures and the quirks OpenRouter is known for."""

from __future__ import annotations

import json

import pytest
from captures import streams

from openrouter_responses_pipe import (
    REASONING,
    TEXT,
    ChunkRenderer,
    SSEDecoder,
    SSEEvent,
    StreamState,
    SurrogateCarry,
    UpstreamStreamError,
    Usage,
    describe_error,
    finish_stream,
    reduce_events,
)


def run(raw_chunks: list[bytes]) -> tuple[StreamState, list]:
    state, decoder, intents = StreamState(), SSEDecoder(), []
    for chunk in raw_chunks:
        intents.extend(reduce_events(state, decoder.feed(chunk)))
        if state.finished:
            break
    return state, intents


def text_of(intents, kind=TEXT) -> str:
    return "".join(t for k, t in intents if k == kind)


def final_output_text(capture) -> str:
    last = [json.loads(line[6:]) for line in capture.body.decode().split("\n")
            if line.startswith("data: {")][-1]
    return "".join(p["text"] for item in last["response"]["output"] if item["type"] == "message"
                   for p in item["content"])


@pytest.mark.parametrize("capture", streams(), ids=lambda c: c.name)
def test_streamed_text_equals_the_final_response_text(capture):
    state, intents = run([capture.body])
    finish_stream(state)
    assert state.terminal == "completed"
    assert text_of(intents) == final_output_text(capture)
    assert state.usage is not None and state.usage.output_tokens > 0
    assert state.usage.cost is not None and state.usage.cost > 0


@pytest.mark.parametrize("capture", streams(), ids=lambda c: c.name)
def test_byte_splits_do_not_change_what_the_user_sees(capture):
    whole_state, whole = run([capture.body])
    for offset in range(1, len(capture.body)):
        state, split = run([capture.body[:offset], capture.body[offset:]])
        assert split == whole, offset                      # same text and thinking, in order
        assert (state.terminal, state.usage) == (whole_state.terminal, whole_state.usage)


def test_reasoning_capture_reports_reasoning_tokens_and_item():
    capture = next(c for c in streams() if c.name.startswith("test_reasoning"))
    state, _ = run([capture.body])
    # the capture's own usage (gpt-5-nano, effort minimal): 20 in, 19 out, of which 0
    # reasoning, $0.0000086; a reducer that lost or invented a number fails here
    assert state.usage == Usage(input_tokens=20, output_tokens=19, reasoning_tokens=0,
                                cached_tokens=0, cost=0.0000086)
    (reasoning,) = [i for i in state.done_items.values() if i.get("type") == "reasoning"]
    assert reasoning["id"] == "rs_067d9e9761f303d7016a72684624808192a8620d7939381d57"
    assert reasoning["encrypted_content"].startswith("gAAAAABqcmhGUY8i3Ww")
    kinds = [item.get("type") for item in state.done_items.values()]
    assert kinds == ["reasoning", "message"]


def ev(payload: dict) -> SSEEvent:
    return SSEEvent(json.dumps(payload))


def test_reasoning_closed_after_the_message_is_tolerated():
    events = [
        ev({"type": "response.output_item.added", "output_index": 0,
            "item": {"id": "rs_1", "type": "reasoning"}}),
        ev({"type": "response.reasoning_summary_text.delta", "output_index": 0,
            "item_id": "rs_1", "delta": "thinking"}),
        ev({"type": "response.output_item.added", "output_index": 1,
            "item": {"id": "msg_1", "type": "message"}}),
        ev({"type": "response.output_text.delta", "output_index": 1, "item_id": "msg_1",
            "delta": "answer"}),
        ev({"type": "response.output_item.done", "output_index": 1,
            "item": {"id": "msg_1", "type": "message",
                     "content": [{"type": "output_text", "text": "answer"}]}}),
        ev({"type": "response.output_item.done", "output_index": 0,
            "item": {"id": "rs_1", "type": "reasoning",
                     "summary": [{"type": "summary_text", "text": "thinking"}]}}),
        SSEEvent("[DONE]"),
    ]
    state = StreamState()
    intents = reduce_events(state, events)
    assert intents == [(REASONING, "thinking"), (TEXT, "answer")]
    finish_stream(state)  # every item closed: complete although response.completed is absent


def test_text_only_in_closing_item_is_still_shown():
    state = StreamState()
    intents = reduce_events(state, [ev({
        "type": "response.output_item.done", "output_index": 0,
        "item": {"id": "m", "type": "message",
                 "content": [{"type": "output_text", "text": "late"}]}})])
    assert intents == [(TEXT, "late")]


def test_eof_with_an_open_item_is_a_cut_off():
    state = StreamState()
    reduce_events(state, [
        ev({"type": "response.output_item.added", "output_index": 0,
            "item": {"id": "m", "type": "message"}}),
        ev({"type": "response.output_text.delta", "item_id": "m", "delta": "par"})])
    with pytest.raises(UpstreamStreamError, match="before the answer was finished"):
        finish_stream(state)


@pytest.mark.parametrize("payload", [
    {"type": "error", "code": "server_error", "message": "Provider disconnected", "param": None},
    {"type": "error", "error": {"code": "server_error", "message": "Provider disconnected"}},
    {"type": "response.failed", "response": {"error": {"code": "server_error",
                                                       "message": "Provider disconnected"},
                                             "error_type": "provider_unavailable"}},
])
def test_failure_events_surface_the_provider_message(payload):
    state = StreamState()
    intents = reduce_events(state, [ev({"type": "response.output_text.delta", "item_id": "m",
                                        "delta": "kept"}), ev(payload)])
    assert intents == [(TEXT, "kept")]
    with pytest.raises(UpstreamStreamError, match="Provider disconnected"):
        finish_stream(state)


_LOST = {"code": "capacity_exhausted", "retryable": True,
         "requested_models": ["anthropic/claude-sonnet-4.5"],
         "fallback_models": ["openai/gpt-5.2", "google/gemini-2.5-pro"]}


@pytest.mark.parametrize("payload", [
    {"type": "response.failed", "response": {
        "error": {"code": "server_error", "message": "No capacity", "availability": _LOST},
        "error_type": "provider_overloaded"}},
    {"type": "error", "error": {"code": "server_error", "message": "No capacity",
                                "availability": _LOST}},
])
def test_a_provider_lost_mid_stream_is_told_in_openrouters_availability_terms(payload):
    """Issue #12 item 6, mid-stream: the same sentences as before the first byte, with the
    models OpenRouter suggests, and its own words kept."""
    state = StreamState()
    reduce_events(state, [ev({"type": "response.output_text.delta", "item_id": "m",
                              "delta": "kept"}), ev(payload)])
    with pytest.raises(UpstreamStreamError) as info:
        finish_stream(state)
    assert describe_error(info.value).split("\n") == [
        "Every provider of anthropic/claude-sonnet-4.5 is at capacity right now.",
        "OpenRouter suggests: openai/gpt-5.2, google/gemini-2.5-pro.",
        "OpenRouter said: No capacity"]


@pytest.mark.parametrize("requested", [None, [], {"a": 1}, 7, [{"id": "x"}], "a/b"])
def test_a_mid_stream_availability_names_the_answering_model_whatever_the_body_holds(
        requested):
    """Odd `requested_models` shapes never break the message; the model that was answering
    (from `response.created`) is named instead."""
    lost = {"code": "capacity_exhausted", "requested_models": requested,
            "fallback_models": {"not": "a list"}, "excluded_by": [None, "zdr"]}
    state = StreamState()
    reduce_events(state, [
        ev({"type": "response.created", "response": {"id": "r", "model": "x-ai/grok-4"}}),
        ev({"type": "error", "error": {"message": "No capacity", "availability": lost}})])
    with pytest.raises(UpstreamStreamError) as info:
        finish_stream(state)
    assert describe_error(info.value).split("\n") == [
        "Every provider of x-ai/grok-4 is at capacity right now.", "Excluded by: zdr.",
        "OpenRouter said: No capacity"]


def test_a_mid_stream_failure_without_availability_reads_as_before():
    state = StreamState()
    reduce_events(state, [ev({"type": "error", "error": {
        "code": "server_error", "message": "Provider disconnected", "availability": "odd"}})])
    with pytest.raises(UpstreamStreamError) as info:
        finish_stream(state)
    assert describe_error(info.value) == "Provider disconnected"


def test_unknown_and_malformed_events_are_ignored():
    state = StreamState()
    intents = reduce_events(state, [SSEEvent("{not json"), ev({"type": "response.fusion_call.x"}),
                                    ev({"type": "response.output_text.delta", "delta": "ok"})])
    assert intents == [(TEXT, "ok")] and state.bad_events == 1


def test_renderer_coalesces_consecutive_deltas_into_one_chunk_per_kind():
    r = ChunkRenderer("openrouter.x/y", 0)
    chunks = r.render([(REASONING, "a"), (REASONING, "b"), (TEXT, "c"), (TEXT, "d")])
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"reasoning_content": "ab"}, {"content": "cd"}]


def test_surrogate_pair_split_across_deltas_is_rejoined():
    carry = SurrogateCarry()
    assert carry.clean("hi \ud83d") == "hi "
    assert carry.clean("\ude00!") == "😀!"


def test_lone_surrogates_become_replacement_characters():
    out = SurrogateCarry().clean("lone \udc00 x")
    assert out == "lone \ufffd x"
    out.encode("utf-8")


def test_empty_completion_with_zero_output_is_reported_not_shown_blank():
    state = StreamState()
    reduce_events(state, [ev({"type": "response.completed", "response": {
        "output": [], "usage": {"input_tokens": 5, "output_tokens": 0}}})])
    with pytest.raises(UpstreamStreamError, match="empty answer"):
        finish_stream(state)
