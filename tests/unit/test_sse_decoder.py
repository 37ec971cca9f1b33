"""SSEDecoder: real captures split at every byte, plus fuzzed framing variants."""

from __future__ import annotations

import itertools
import json
import time

import pytest
from captures import streams
from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    SSE_MAX_LINE_BYTES,
    SSEDecoder,
    SSEEvent,
    UpstreamStreamError,
)


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


# -- issue #11: split CR/LF pairs, linear time, bounded memory -----------------------------


def test_a_crlf_pair_split_between_reads_is_one_line_end():
    """`data: line1\\r` then `\\ndata: line2\\r\\n\\r\\n` is ONE event with two data lines."""
    raw = b"event: response.output_text.delta\r\ndata: line1\r\ndata: line2\r\n\r\n"
    expected = [SSEEvent("line1\nline2", "response.output_text.delta")]
    assert decode([raw]) == expected
    for offset in range(1, len(raw)):
        assert decode(split_at(raw, offset)) == expected, offset
    assert decode([b"data: line1\r", b"\ndata: line2\r\n\r\n"]) == [SSEEvent("line1\nline2")]
    # a CR that ends a read and is NOT followed by LF still ends the line
    assert decode([b"data: a\r", b"data: b\r", b"\r"]) == [SSEEvent("a\nb")]


_field_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                               blacklist_characters="\r\n"), max_size=12)
_lines = st.one_of(
    _field_values.map(lambda v: "data: " + v), _field_values.map(lambda v: "data:" + v),
    _field_values.map(lambda v: "event: " + v), _field_values.map(lambda v: ": " + v),
    _field_values.map(lambda v: "id: " + v), st.just("data"), st.just(""), _field_values)


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(st.tuples(_lines, st.sampled_from([b"\n", b"\r\n", b"\r"])),
                      max_size=14),
       cuts=st.lists(st.integers(min_value=0), max_size=10), bom=st.booleans())
def test_any_split_of_any_crlf_lf_cr_stream_decodes_like_the_whole(lines, cuts, bom):
    raw = (b"\xef\xbb\xbf" if bom else b"") + b"".join(t.encode() + nl for t, nl in lines)
    whole = decode([raw])
    offsets = sorted({c % (len(raw) + 1) for c in cuts})
    assert decode(split_at(raw, *offsets)) == whole
    # and the result does not depend on the newline style (unless a CR and the next empty
    # line's LF happen to form a CRLF pair, which is one line end)
    pairs = any(a[1] == b"\r" and b == ("", b"\n") for a, b in itertools.pairwise(lines))
    lf = (b"\xef\xbb\xbf" if bom else b"") + b"".join(t.encode() + b"\n" for t, _ in lines)
    assert pairs or whole == decode([lf])


@pytest.mark.parametrize("capture", streams(), ids=lambda c: c.name)
def test_captures_with_crlf_split_at_every_byte_give_identical_events(capture):
    crlf = capture.body.replace(b"\n", b"\r\n")
    whole = decode([capture.body])
    assert decode([crlf]) == whole
    for offset in range(1, len(crlf), 7 if len(crlf) > 20_000 else 1):
        assert decode(split_at(crlf, offset)) == whole, offset


def _cpu(fn) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


@pytest.mark.parametrize("read_size", [4096, 16 * 1024])
def test_a_long_line_costs_linear_time_whatever_the_read_size(read_size):
    """An 8 MB line in small reads costs about what it costs in one read (the old decoder
    re-joined and re-scanned its buffer per read: quadratic, seconds of CPU)."""
    line = b"data: " + b"x" * 8_000_000 + b"\n\n"
    pieces = [line[i:i + read_size] for i in range(0, len(line), read_size)]

    def feed(chunks: list[bytes]) -> None:
        decoder = SSEDecoder()
        assert [len(e.data) for c in chunks for e in decoder.feed(c)] == [8_000_000]

    ratio = _cpu(lambda: feed(pieces)) / max(_cpu(lambda: feed([line])), 1e-4)
    assert ratio < 8, f"{read_size}-byte reads took x{ratio:.1f} the time of one read"


def test_a_line_over_the_cap_is_a_specific_stream_error_not_unbounded_memory():
    decoder = SSEDecoder(max_bytes=1000)
    decoder.feed(b"data: ok\n\n")
    with pytest.raises(UpstreamStreamError, match="over") as err:
        for _ in range(100):
            decoder.feed(b"y" * 100)  # no newline, ever
    assert err.value.code == "sse_too_large"
    assert sum(map(len, decoder._pieces)) <= 1000  # nothing past the cap was buffered
    with pytest.raises(UpstreamStreamError):
        SSEDecoder(max_bytes=1000).feed(b"data: " + b"z" * 2000 + b"\n")
    many = SSEDecoder(max_bytes=1000)  # an event built from many small data lines
    with pytest.raises(UpstreamStreamError, match="event"):
        for _ in range(200):
            many.feed(b"data: 0123456789\n")
    assert SSE_MAX_LINE_BYTES == 16 * 1024 * 1024
    assert SSEDecoder()._max == SSE_MAX_LINE_BYTES


def test_a_raised_cap_applies_from_the_next_feed():
    """§12 grows the cap as pictures stream: a line over the old cap then decodes whole."""
    decoder = SSEDecoder(max_bytes=100)
    assert decoder.feed(b"data: " + b"x" * 60) == []
    decoder.max_bytes = 1000
    (event,) = decoder.feed(b"x" * 300 + b"\n\n")
    assert event.data == "x" * 360
    decoder.max_bytes = 100
    with pytest.raises(UpstreamStreamError, match="over"):
        decoder.feed(b"data: " + b"y" * 200 + b"\n\n")
