"""Stored items are encrypted by default (issue #11, item 4).

With ARTIFACT_ENCRYPTION_KEY empty (the default), a key derived from Open WebUI's
WEBUI_SECRET_KEY encrypts every stored item: a dump of the database or of Redis alone never
shows reasoning, tool arguments or tool output. Setting the valve later takes over; rows
written with the derived key (and older plaintext rows) are still read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from artifact_fixtures import redis_server, redis_values, sqlite_sync  # noqa: F401
from helpers import posts, stream

from openrouter_responses_pipe import (
    ArtifactCodec,
    ArtifactRow,
    ArtifactStoreError,
    Pipe,
    RequestSettings,
    derived_artifact_key,
    marker_ids,
)

NANO = "openai/gpt-5-nano"
CHAT = {"chat_id": "chat-rest", "message_id": "m1"}
CITY = "Zanzibar-Quokka-77"
OUTPUT = "TOOL-OUTPUT-SENTINEL-4411"
PLAINTEXTS = (CITY, OUTPUT, "Pensando", "The user wrote something", "encrypted_content")


def weather_tool() -> dict[str, Any]:
    async def weather(city: str) -> str:
        return f"{OUTPUT}: sunny in {city}"

    return {"weather": {"tool_id": "t", "callable": weather, "spec": {
        "name": "weather", "description": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}}


def db_rows(tmp_path: Path) -> list[bytes]:
    """The raw rows of every artifact table, all columns, as bytes."""
    with sa.create_engine(f"sqlite:///{tmp_path / 'owui.db'}").connect() as conn:
        names = [n for n in sa.inspect(conn).get_table_names() if n.startswith("orp_artifacts")]
        return [b"|".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
                for n in names for row in conn.execute(sa.text(f'SELECT * FROM "{n}"'))]


def redis_dump(url: str) -> list[bytes]:
    """Every Redis value, and the stored payload inside each queued/cached row."""
    out = []
    for raw in redis_values(url):
        out.append(raw)
        with contextlib.suppress(ArtifactStoreError):
            out.append(ArtifactRow.unpack(raw).payload)
    return out


def leaks(blobs: list[bytes]) -> list[str]:
    return [p for p in PLAINTEXTS for b in blobs if p.encode() in b]


async def test_a_database_or_redis_dump_never_shows_reasoning_or_tool_output(
        emulator, sleeps, tmp_path, redis_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WEBUI_SECRET_KEY", "owui-secret-for-this-test")
    env = {"REDIS_URL": redis_server.url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": "2"}
    runner, dispose = sqlite_sync(tmp_path)
    pipe = Pipe(sleep=sleeps, artifact_db=runner, env=env)
    pipe.valves = pipe.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                              COMPRESSION_MIN_BYTES=0)  # no compression hides anything
    args = json.dumps({"city": CITY}, separators=(",", ":"))
    ask = {"role": "user", "content": f"[emu:tool_call name=weather args='{args}'] go"}
    body = {"model": f"openrouter.{NANO}", "stream": True, "messages": [ask]}
    first = await stream(pipe, body, __metadata__=CHAT, __tools__=weather_tool())
    assert first.error is None and len(marker_ids(first.text)) == 4
    sent = posts(emulator)[-1]["json"]["input"]
    assert any(OUTPUT in str(i.get("output")) for i in sent), sent  # the turn had them
    in_redis = redis_dump(redis_server.url)
    assert len(in_redis) >= 8 and not leaks(in_redis), leaks(in_redis)
    for _ in range(500):  # the write-behind flush reaches the database
        if len(db_rows(tmp_path)) >= 4:
            break
        await asyncio.sleep(0.01)
    rows = db_rows(tmp_path)
    assert len(rows) >= 4 and not leaks(rows), leaks(rows)
    assert not leaks(redis_dump(redis_server.url))

    # the admin now sets a key of their own: it takes over, and the derived-key rows still
    # come back in the next turn
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "ARTIFACT_ENCRYPTION_KEY": "admin-key-later"})
    again = {**body, "messages": [ask, {"role": "assistant", "content": first.text},
                                  {"role": "user", "content": "thanks"}]}
    await stream(pipe, again, __metadata__={**CHAT, "message_id": "m2"},
                 __tools__=weather_tool())
    replayed = posts(emulator)[-1]["json"]["input"]
    kinds = [i.get("type") for i in replayed]
    assert kinds.count("reasoning") == 2 and "function_call_output" in kinds
    assert any(OUTPUT in str(i.get("output")) for i in replayed)
    await pipe.close()
    dispose()


def test_keys_default_to_the_derived_key_and_rotation_reads_every_older_row(monkeypatch):
    monkeypatch.setenv("WEBUI_SECRET_KEY", "s3cret")
    derived = derived_artifact_key("s3cret")
    assert derived != "s3cret" and "s3cret" not in derived
    default = RequestSettings.merge(Pipe.Valves(API_KEY="k"), None).artifact_keys
    assert default == (derived,)
    own = RequestSettings.merge(Pipe.Valves(API_KEY="k", ARTIFACT_ENCRYPTION_KEY="new,old"),
                                None).artifact_keys
    assert own == ("new", "old", derived)  # the valve's first key encrypts
    item = {"type": "function_call_output", "call_id": "c", "output": OUTPUT}
    by_derived = ArtifactCodec((derived,), compress_min=0).encode(item)
    by_old = ArtifactCodec(("old",), compress_min=0).encode(item)
    plain = ArtifactCodec((), compress_min=0).encode(item)  # a row from before encryption
    assert OUTPUT.encode() not in by_derived and OUTPUT.encode() not in by_old
    assert OUTPUT.encode() in plain
    rotated = ArtifactCodec(own or ())
    assert [rotated.decode(b) for b in (by_derived, by_old, plain)] == [item] * 3
    fresh = rotated.encode(item)
    assert ArtifactCodec(("new",)).decode(fresh) == item  # written with the valve's key
    for kind in ("reasoning", "function_call", "function_call_output"):
        assert ArtifactCodec((derived,)).encrypts(kind)
