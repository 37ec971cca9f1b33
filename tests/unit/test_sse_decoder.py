"""SSEDecoder: real captures split at every byte, plus fuzzed framing variants."""

from __future__ import annotations

import itertools
import json

import pytest
from captures import streams
from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import SSEDecoder, SSEEvent


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.finish())
    return events


def split_at(data: bytes, *offsets: int) -> list[bytes]:
    bounds = [0, *sorted(offsets), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("capture", streams(), ids=lambda c: c.name)
def test_capture_decodes_to_json_events_then_done(capture):
    events = decode([capture.body])
    assert events[-1].data == "[DONE]"
    payloads = [json.loads(e.data) for e in events[:-1]]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert payloads[0]["type"] == "response.created"
    assert payloads[-1]["type"] == "response.completed"


@pytest.mark.parametrize("capture", streams(), ids=lambda c: c.name)
def test_capture_split_at_every_byte_offset_gives_identical_events(capture):
    whole = decode([capture.body])
    for offset in range(1, len(capture.body)):
        assert decode(split_at(capture.body, offset)) == whole, offset


@pytest.mark.parametrize("capture", streams()[:2], ids=lambda c: c.name)
def test_capture_fed_one_byte_at_a_time(capture):
    body = capture.body
    assert decode([body[i:i + 1] for i in range(len(body))]) == decode([body])


def test_comments_and_keepalives_are_skipped():
    raw = b": \n\n: OPENROUTER PROCESSING\n\ndata: {\"a\":1}\n\n: ping\n\ndata: [DONE]\n\n"
    assert [e.data for e in decode([raw])] == ['{"a":1}', "[DONE]"]


def test_crlf_and_bare_cr_line_endings():
    raw = b"data: one\r\n\r\ndata: two\r\rdata: three\n\n"
    assert [e.data for e in decode([raw])] == ["one", "two", "three"]


def test_crlf_split_between_cr_and_lf_does_not_create_an_extra_event():
    raw = b"data: a\r\n\r\ndata: b\r\n\r\n"
    for offset in range(1, len(raw)):
        assert [e.data for e in decode(split_at(raw, offset))] == ["a", "b"], offset


def test_multiline_data_is_joined_with_newlines_and_event_field_kept():
    raw = b"event: response.output_text.delta\ndata: {\"x\":\ndata: 1}\n\n"
    (event,) = decode([raw])
    assert event == SSEEvent('{"x":\n1}', "response.output_text.delta")


def test_utf8_character_split_across_reads():
    raw = 'data: {"delta":"ação 😀"}\n\n'.encode()
    cut = raw.index("😀".encode()) + 2  # inside the 4-byte sequence
    assert decode(split_at(raw, cut))[0].data == '{"delta":"ação 😀"}'


def test_incomplete_trailing_event_is_discarded_at_eof():
    assert [e.data for e in decode([b"data: whole\n\ndata: partial"])] == ["whole"]


def test_leading_bom_is_ignored_even_when_split():
    raw = b"\xef\xbb\xbfdata: x\n\n"
    assert [e.data for e in decode(split_at(raw, 1, 2))] == ["x"]


def test_data_without_space_and_field_without_colon():
    assert [e.data for e in decode([b"data:x\ndata\n\n"])] == ["x\n"]


# -- fuzzing -------------------------------------------------------------------------------

_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                        blacklist_characters="\r\n"), max_size=30)


def _encode(payloads: list[str], newline: bytes, comments: bool) -> bytes:
    out = b""
    for p in payloads:
        if comments:
            out += b": keep-alive" + newline + newline
        out += b"data: " + p.encode() + newline + newline
    return out


@settings(max_examples=300, deadline=None)
@given(payloads=st.lists(_texts.filter(bool), min_size=1, max_size=8),
       newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
       comments=st.booleans(), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_fuzz_any_split_any_newline_style(payloads, newline, comments, cuts):
    raw = _encode(payloads, newline, comments)
    offsets = sorted({c % (len(raw) + 1) for c in cuts})
    assert [e.data for e in decode(split_at(raw, *offsets))] == payloads


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
def test_fuzz_garbage_never_raises_and_is_split_invariant(blob, cuts):
    offsets = sorted({c % (len(blob) + 1) for c in cuts})
    assert decode(split_at(blob, *offsets)) == decode([blob])
