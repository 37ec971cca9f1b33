"""Write-behind faults (issue #11 items 5, 6, 14a) on the real local PostgreSQL and a real
redis-server of the test's own (frozen with SIGSTOP where the test says so)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from artifact_fixtures import (
    PG_URL,
    FailingRunner,
    drop_table,
    pg_async,
    pg_available,
    pg_sync,
    redis_server,  # noqa: F401 - fixture
    sqlite_sync,
    unique_pipe_id,
)

from openrouter_responses_pipe import (
    ArtifactCodec,
    ArtifactDB,
    ArtifactRow,
    ArtifactStore,
    WriteBehind,
    artifact_table_name,
    new_artifact_id,
)

CODEC = ArtifactCodec(("k",), encrypt_all=True, compress_min=64)
NEEDS_PG = pytest.mark.skipif(not pg_available(), reason="PostgreSQL on 127.0.0.1:5432 is down")


def row(chat: str = "chat-1", message: str = "msg-1", seq: int = 0) -> ArtifactRow:
    item = {"type": "function_call_output", "call_id": f"c{seq}", "output": f"out {seq}"}
    return ArtifactRow(new_artifact_id(), chat, message, seq, item["type"], CODEC.encode(item),
                       1000.0)


def pg_ids(name: str) -> set[str]:
    with sa.create_engine(PG_URL).connect() as conn:
        return {r[0] for r in conn.execute(sa.text(f'SELECT id FROM "{name}"'))}


@pytest.fixture(params=["postgres-sync", "postgres-async"])
async def pg_store(request, redis_server, tmp_path):  # noqa: F811 - fixture
    if not pg_available():
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is down (these tests need it)")
    runner, dispose = (pg_sync if request.param == "postgres-sync" else pg_async)(tmp_path)
    name = artifact_table_name(unique_pipe_id())
    client = aioredis.from_url(redis_server.url, socket_timeout=2.0)
    store = ArtifactStore(ArtifactDB(runner, name), WriteBehind(client, name, batch=20),
                          auto_flush=False)
    yield store
    await store.close()
    await client.aclose()
    dispose()
    drop_table(name)


# -- item 5: one bad row no longer stops write-behind for everyone ------------------------------


@NEEDS_PG
async def test_rows_postgres_refuses_are_set_aside_and_the_rest_of_the_batch_is_written(
        pg_store, caplog):
    store = pg_store
    long_local_chat = "local:" + "x" * 200          # over the 128-character chat_id column
    good = [row(seq=i) for i in range(5)]
    too_long, nul = row(chat=long_local_chat, seq=9), row(message="msg\x00nul", seq=10)
    batch = [*good[:2], too_long, *good[2:4], nul, good[4]]
    for r in batch:
        assert await store.save([r], ttl=0) == [r.id]
    assert await store.redis.depth() == 7
    with caplog.at_level("ERROR", logger="openrouter_responses_pipe"):
        assert await store.redis.flush(store.db) == 5
    assert pg_ids(store.db.table.name) == {r.id for r in good}
    assert await store.redis.depth() == 0
    client = store.redis.redis
    quarantined = await client.lrange(store.redis.quarantine_key, 0, -1)
    assert [ArtifactRow.unpack(v).id for v in quarantined] == [too_long.id, nul.id]
    assert await client.hlen(store.redis.queued_key) == 0
    refused = sorted({r.getMessage() for r in caplog.records
                      if "refused artifact row" in r.getMessage()}, key=lambda m: too_long.id
                     not in m)
    assert len(refused) == 2 and too_long.id in refused[0] and nul.id in refused[1]
    assert "value too long" in refused[0] and "NUL" in refused[1]
    _, health = await store.health()
    assert isinstance(health, dict) and health["quarantined_rows"] == 2
    assert "2 row(s) refused" in health["last_flush_error"]
    later = [row(seq=20 + i) for i in range(3)]      # write-behind keeps working for everyone
    await store.save(later, ttl=0)
    assert await store.drain() == 3
    assert pg_ids(store.db.table.name) == {r.id for r in good + later}


@NEEDS_PG
async def test_a_database_outage_is_not_mistaken_for_bad_rows(redis_server, tmp_path):  # noqa: F811
    runner, dispose = pg_sync(tmp_path)
    failing = FailingRunner(runner)
    name = artifact_table_name(unique_pipe_id())
    client = aioredis.from_url(redis_server.url)
    store = ArtifactStore(ArtifactDB(failing, name), WriteBehind(client, name), auto_flush=False)
    try:
        saved = [row(seq=i) for i in range(4)]
        await store.save(saved, ttl=0)
        failing.failing = True
        assert await store.redis.flush(store.db) == 0
        assert await store.redis.depth() == 4 and await store.redis.quarantined() == 0
        failing.failing = False
        assert await store.drain() == 4
        assert pg_ids(name) == {r.id for r in saved}
    finally:
        await client.aclose()
        dispose()
        drop_table(name)


async def test_a_full_queue_writes_directly_and_drops_nothing(redis_server, tmp_path):  # noqa: F811
    runner, dispose = sqlite_sync(tmp_path)
    name = artifact_table_name(unique_pipe_id())
    client = aioredis.from_url(redis_server.url)
    store = ArtifactStore(ArtifactDB(runner, name), WriteBehind(client, name, max_rows=5),
                          auto_flush=False)
    first, second, third = [row(seq=i) for i in range(3)], [row(seq=3 + i) for i in range(3)], \
        [row(seq=6 + i) for i in range(2)]
    assert await store.save(first, ttl=0) == [r.id for r in first]
    assert await store.redis.depth() == 3
    assert await store.save(second, ttl=0) == [r.id for r in second]  # 3 + 3 > 5: direct
    assert await store.redis.depth() == 3
    assert await store.save(third, ttl=0) == [r.id for r in third]    # 3 + 2 fits: queued
    assert await store.redis.depth() == 5
    with sa.create_engine(f"sqlite:///{tmp_path / 'owui.db'}").connect() as conn:
        direct = {r[0] for r in conn.execute(sa.text(f'SELECT id FROM "{name}"'))}
    assert direct == {r.id for r in second}
    _, health = await store.health()
    assert isinstance(health, dict)
    assert health["direct_writes_queue_full"] == 1 and health["queue_max_rows"] == 5
    assert await store.drain() == 5
    await client.aclose()
    dispose()


class CommandLog:
    """A Redis client proxy that records which commands were sent."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.commands = inner, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr):
            self.commands.append(name)
        return attr


async def test_load_reads_queued_rows_by_id_without_scanning_the_queue(
        redis_server, tmp_path):  # noqa: F811
    runner, dispose = sqlite_sync(tmp_path)
    failing = FailingRunner(runner)
    name = artifact_table_name(unique_pipe_id())
    client = CommandLog(aioredis.from_url(redis_server.url))
    store = ArtifactStore(ArtifactDB(failing, name), WriteBehind(client, name),
                          auto_flush=False)
    backlog = [row(chat="other", seq=i) for i in range(500)]
    mine = [row(seq=i) for i in range(3)]
    await store.save(backlog, ttl=0)
    await store.save(mine, ttl=0)          # no cache (ttl 0): only the queue has them
    failing.failing = True                 # and the database is down
    client.commands.clear()
    got = await store.load("chat-1", [r.id for r in mine], ttl=0)
    assert set(got) == {r.id for r in mine}
    assert "lrange" not in client.commands and "hmget" in client.commands
    assert await store.load("chat-2", [r.id for r in mine], ttl=0) == {}  # other chats: no
    await client.inner.aclose()
    dispose()


# -- item 6: a hung Redis is skipped after one timeout ---------------------------------------


async def test_a_frozen_redis_costs_one_timeout_then_turns_go_to_the_database(
        redis_server, tmp_path):  # noqa: F811
    runner, dispose = sqlite_sync(tmp_path)
    name = artifact_table_name(unique_pipe_id())
    client = aioredis.from_url(redis_server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    now = [0.0]
    store = ArtifactStore(ArtifactDB(runner, name), WriteBehind(client, name),
                          auto_flush=False, monotonic=lambda: now[0], redis_skip_seconds=30)
    queued_before = [row(seq=100)]
    await store.save(queued_before, ttl=60)
    redis_server.pause()                               # SIGSTOP: connections hang
    saved: list[ArtifactRow] = []
    try:
        first = [row(seq=0)]
        await store.save(first, ttl=60)                # waits out one socket timeout
        saved += first
        for turn in range(1, 6):                       # the next turns never wait for Redis
            started = time.monotonic()
            await store.load("chat-1", [r.id for r in saved], ttl=60)
            more = [row(seq=turn)]
            assert await store.save(more, ttl=60) == [more[0].id]
            await store.delete([])
            saved += more
            assert time.monotonic() - started < 0.5, "a turn waited for the frozen Redis"
        got = await store.load("chat-1", [r.id for r in saved], ttl=60)
        assert set(got) == {r.id for r in saved}       # written directly: nothing lost
        _, health = await store.health()
        assert isinstance(health, dict) and health["state"].startswith("skipped for 30s")
        assert "Timeout" in health["last_error"] and health["skipped_operations"] >= 10
    finally:
        redis_server.resume()
    now[0] += 31                                       # the pause is over: Redis again
    later = [row(seq=50)]
    await store.save(later, ttl=60)
    # The frozen server ran the timed-out RPUSH once resumed: that row is queued as well as
    # written directly (a flush skips ids already present, so it is stored once).
    depth = await store.redis.depth()
    assert depth in (2, 3)
    _, health = await store.health()
    assert isinstance(health, dict) and health["state"] == "in use"
    assert await store.drain() == depth
    with sa.create_engine(f"sqlite:///{tmp_path / 'owui.db'}").connect() as conn:
        ids = {r[0] for r in conn.execute(sa.text(f'SELECT id FROM "{name}"'))}
    assert ids == {r.id for r in saved + queued_before + later}
    await client.aclose()
    dispose()


# -- item 14a: close() never swallows its own cancellation ----------------------------------


async def test_close_propagates_a_cancellation_of_itself(tmp_path: Path):
    runner, dispose = sqlite_sync(tmp_path)
    store = ArtifactStore(ArtifactDB(runner, artifact_table_name(unique_pipe_id())))
    cleaning_up = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cleaning_up.set()
            await asyncio.sleep(0.5)                   # a cancelled task that takes a while
            raise

    store.spawn(slow_to_stop())
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(store.close())
    await cleaning_up.wait()
    closing.cancel()                                   # e.g. shutdown gives up waiting
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert closing.cancelled()
    dispose()


# -- item 5, at the source: a long `local:` chat id or a NUL byte no longer makes bad rows ---


@NEEDS_PG
async def test_a_temporary_chat_with_a_long_id_stores_and_replays_on_postgres(
        emulator, sleeps, tmp_path):
    from helpers import posts, stream

    from openrouter_responses_pipe import Pipe

    runner, dispose = pg_sync(tmp_path)
    p = Pipe(sleep=sleeps, artifact_db=runner, env={})
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                        ARTIFACT_ENCRYPTION_KEY="k")
    meta = {"chat_id": "local:" + "s" * 200, "message_id": "m\x00" + "x" * 300}
    model = "openrouter.openai/gpt-5-nano"
    first = await stream(p, {"model": model, "stream": True, "messages": [
        {"role": "user", "content": "What is 2 + 2?"}]}, __metadata__=meta)
    (produced,) = [i for i in emulator.responses[-1]["output"] if i["type"] == "reasoning"]
    await stream(p, {"model": model, "stream": True, "messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "next"}]}, __metadata__=meta)
    assert posts(emulator)[-1]["json"]["input"][1] == produced   # stored and replayed
    table = next(iter(p._stores.values())).db.table.name
    await p.close()
    dispose()
    drop_table(table)


async def test_pipe_turns_keep_their_latency_while_redis_is_frozen(
        emulator, sleeps, redis_server, tmp_path):  # noqa: F811
    from helpers import posts, stream

    from openrouter_responses_pipe import Pipe

    def redis_factory(url: str):
        return aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    runner, dispose = sqlite_sync(tmp_path)
    env = {"REDIS_URL": redis_server.url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": "2"}
    p = Pipe(sleep=sleeps, artifact_db=runner, env=env, redis_factory=redis_factory)
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                        ARTIFACT_ENCRYPTION_KEY="k")
    model, history = "openrouter.openai/gpt-5-nano", []
    meta = {"chat_id": "chat-frozen", "message_id": "m"}

    async def turn(ask: str) -> float:
        started = time.monotonic()
        out = await stream(p, {"model": model, "stream": True,
                               "messages": [*history, {"role": "user", "content": ask}]},
                           __metadata__=meta)
        assert out.error is None and "interrupted" not in out.text
        history.extend([{"role": "user", "content": ask},
                        {"role": "assistant", "content": out.text}])
        return time.monotonic() - started

    await turn("first")                       # Redis works: items queued
    redis_server.pause()
    try:
        await turn("second")                  # one socket timeout, then the database
        for ask in ("third", "fourth"):
            assert await turn(ask) < 0.8, "a turn waited for the frozen Redis"
        sent = posts(emulator)[-1]["json"]["input"]
        assert sum(1 for i in sent if i.get("type") == "reasoning") >= 2  # written directly
        report = await p.pipe(body={"model": "openrouter._health", "stream": False,
                                    "messages": [{"role": "user", "content": "report"}]},
                              __user__={"id": "admin", "role": "admin"})
        assert "state skipped for " in report and "rows go to the database directly" in report
    finally:
        redis_server.resume()
    await p.close()
    dispose()
