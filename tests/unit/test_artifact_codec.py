"""Artifact codec (JSON -> LZ4/zlib -> Fernet with a header byte) and marker lines (issue #5)."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import openrouter_responses_pipe as orp
from openrouter_responses_pipe import (
    ArtifactCodec,
    ArtifactStoreError,
    artifact_table_name,
    marker_block,
    marker_ids,
    safe_json,
    split_markers,
    strip_markers,
)

# any text, including lone surrogates and unpaired halves of emoji
TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20)
ITEM_TYPES = st.sampled_from(["reasoning", "function_call", "function_call_output"])
CODECS = st.builds(ArtifactCodec, keys=st.sampled_from([(), ("k1",), ("k2", "k1")]),
                   encrypt_all=st.booleans(), compress_min=st.sampled_from([0, 1, 64, 4096]))


def _item(kind: str, payload: object) -> dict:
    return {"type": kind, "payload": payload}


@settings(max_examples=300, deadline=None)
@given(codec=CODECS, kind=ITEM_TYPES, payload=JSON)
def test_round_trip_of_any_json_including_lone_surrogates(codec, kind, payload):
    item = _item(kind, payload)
    blob = codec.encode(item)
    assert codec.decode(blob) == safe_json(item)
    # what comes back can always be sent to OpenRouter as UTF-8 JSON
    json.dumps(codec.decode(blob), ensure_ascii=False).encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(payload=JSON, kind=ITEM_TYPES)
def test_encrypted_blobs_never_contain_the_plaintext(payload, kind):
    secret = "PLAINTEXT-MARKER-Σ"
    codec = ArtifactCodec(("key",), encrypt_all=True, compress_min=0)
    blob = codec.encode(_item(kind, [secret, payload]))
    assert blob[0] & 0x04
    assert secret.encode() not in blob and b"PLAINTEXT" not in blob


def test_reasoning_is_encrypted_with_a_key_other_items_only_with_encrypt_all():
    codec = ArtifactCodec(("key",), encrypt_all=False, compress_min=0)
    assert codec.encode({"type": "reasoning", "x": "secret"})[0] & 0x04
    assert not codec.encode({"type": "function_call_output", "output": "sun"})[0] & 0x04
    assert b"sun" in codec.encode({"type": "function_call_output", "output": "sun"})
    assert not ArtifactCodec(()).encode({"type": "reasoning", "x": "y"})[0] & 0x04


def test_large_items_are_compressed_and_say_so_in_the_header():
    item = {"type": "function_call_output", "output": "abc " * 2000}
    blob = ArtifactCodec(compress_min=1024).encode(item)
    assert blob[0] & 0x03 and len(blob) < 2000
    assert ArtifactCodec().decode(blob) == item
    small = ArtifactCodec(compress_min=1024).encode({"type": "x", "output": "tiny"})
    assert small[0] == 0


def test_wrong_key_is_a_typed_error_and_rotation_reads_old_rows():
    old = ArtifactCodec(("old-key",)).encode({"type": "reasoning", "id": "rs_1"})
    with pytest.raises(ArtifactStoreError, match="another key"):
        ArtifactCodec(("new-key",)).decode(old)
    with pytest.raises(ArtifactStoreError, match="no ARTIFACT_ENCRYPTION_KEY"):
        ArtifactCodec(()).decode(old)
    rotated = ArtifactCodec(("new-key", "old-key"))
    assert rotated.decode(old) == {"type": "reasoning", "id": "rs_1"}
    fresh = rotated.encode({"type": "reasoning", "id": "rs_2"})
    assert ArtifactCodec(("new-key",)).decode(fresh)["id"] == "rs_2"


@settings(max_examples=200, deadline=None)
@given(codec=CODECS, payload=JSON, cut=st.integers(0, 400))
def test_truncated_or_garbled_payloads_raise_the_typed_error(codec, payload, cut):
    blob = codec.encode(_item("reasoning", payload))
    if cut >= len(blob):
        return
    try:
        got = codec.decode(blob[:cut])
    except ArtifactStoreError:
        return
    # a cut can only "succeed" if it still is a complete JSON object (e.g. legacy rows)
    assert isinstance(got, dict)


def test_legacy_header_less_json_is_accepted():
    assert ArtifactCodec().decode(b'{"type":"reasoning","id":"rs_9"}')["id"] == "rs_9"
    assert ArtifactCodec().decode(b' {"a":1}') == {"a": 1}
    with pytest.raises(ArtifactStoreError):
        ArtifactCodec().decode(b"[1,2]")
    with pytest.raises(ArtifactStoreError):
        ArtifactCodec().decode(b"")


def test_zlib_is_used_when_lz4_is_missing(monkeypatch):
    monkeypatch.setattr(orp, "_lz4", None)
    item = {"type": "function_call_output", "output": "xyz " * 1000}
    blob = ArtifactCodec(compress_min=10).encode(item)
    assert blob[0] == 0x02 and zlib.decompress(blob[1:])
    assert ArtifactCodec().decode(blob) == item


IDS = st.lists(st.uuids().map(lambda u: u.hex), min_size=1, max_size=4)


@settings(max_examples=200)
@given(before=TEXT, after=TEXT, ids=IDS)
def test_markers_round_trip_through_any_text(before, after, ids):
    before, after = before.replace("[orp:", "[orp"), after.replace("[orp:", "[orp")
    text = before + marker_block(ids) + after
    assert marker_ids(text) == ids
    segments = split_markers(text)
    assert segments[0] == (before + "\n\n", tuple(ids))
    assert segments[-1] == ("\n" + after, ())
    assert marker_ids(strip_markers(text)) == []
    assert before in strip_markers(text) and after in strip_markers(text)


def test_marker_look_alikes_are_not_markers():
    assert marker_ids("see [orp:abc]: # here") == []  # not alone on its line
    assert marker_ids("[orp:ABCDEF0123]: #") == []     # ids are lowercase hex
    assert marker_ids("text\n[orp:0123456789abcdef]: #\n") == ["0123456789abcdef"]


def test_marker_block_is_set_off_by_blank_lines():
    block = marker_block(["a" * 32, "b" * 32])
    assert block.startswith("\n\n") and block.endswith("\n\n")
    assert block.strip().splitlines() == [f"[orp:{'a' * 32}]: #", f"[orp:{'b' * 32}]: #"]
    assert marker_block([]) == ""


@given(st.text(min_size=1, max_size=200))
def test_table_names_are_short_safe_identifiers(function_id):
    name = artifact_table_name(function_id)
    assert len(name) <= 48 and name.replace("_", "").isalnum() and name.isascii()
    assert name == artifact_table_name(function_id)


def test_distinct_pipes_get_distinct_tables():
    assert artifact_table_name("openrouter") == "orp_artifacts_openrouter"
    assert artifact_table_name("Open-Router") != artifact_table_name("open_router")
    assert artifact_table_name("x" * 100) != artifact_table_name("x" * 99)


def test_write_behind_only_for_several_workers_on_redis():
    from openrouter_responses_pipe import redis_url_for_write_behind as wb

    url = "redis://r:6379/0"
    assert wb({"REDIS_URL": url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": 2}) == url
    assert wb({"REDIS_URL": url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": "4"}) == url
    assert wb({"REDIS_URL": url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": 1}) is None
    assert wb({"REDIS_URL": url, "WEBSOCKET_MANAGER": "", "UVICORN_WORKERS": 2}) is None
    assert wb({"REDIS_URL": "", "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": 2}) is None
    assert wb({"REDIS_URL": url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": "x"}) is None


def test_unencodable_text_is_repaired_and_everything_else_kept_as_is():
    from openrouter_responses_pipe import safe_text

    assert safe_text("plain ascii") == "plain ascii"
    assert safe_text("naïve — 😀 ok") == "naïve — 😀 ok"
    assert safe_text("lone \ud800 half") == "lone \ufffd half"
    assert safe_text("split pair \ud83d\ude00") == "split pair 😀"  # joined, not replaced
