"""The artifact store on SQLite and PostgreSQL (sync and async engines) and behind a real Redis,
including faults: Redis stopped mid-run, the database refusing writes (issue #5)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from artifact_fixtures import (
    BACKENDS,
    PG_URL,
    FailingRunner,
    drop_table,
    pg_available,
    redis_server,  # noqa: F401 - fixture
    redis_values,
    sqlite_sync,
    unique_pipe_id,
)

from openrouter_responses_pipe import (
    ArtifactCodec,
    ArtifactDB,
    ArtifactRow,
    ArtifactStore,
    ArtifactStoreError,
    SyncEngineRunner,
    WriteBehind,
    artifact_table_name,
    new_artifact_id,
)

SECRET = "TOP-SECRET-REASONING-Ω"
CODEC = ArtifactCodec(("admin-key",), encrypt_all=False, compress_min=64)
NEEDS_PG = pytest.mark.skipif(not pg_available(), reason="PostgreSQL on 127.0.0.1:5432 is down")


def rows(n: int, chat: str = "chat-1", now: float = 1000.0) -> list[ArtifactRow]:
    out = []
    for i in range(n):
        item = ({"type": "reasoning", "id": f"rs_{i}", "summary": [],
                 "encrypted_content": f"{SECRET}-{i}"} if i % 2 == 0 else
                {"type": "function_call_output", "call_id": f"call_{i}", "output": f"out {i}"})
        out.append(ArtifactRow(new_artifact_id(), chat, "msg-1", i, item["type"],
                               CODEC.encode(item), now))
    return out


@pytest.fixture(params=list(BACKENDS))
async def db(request, tmp_path: Path):
    if request.param.startswith("postgres") and not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is down")
    runner, dispose = BACKENDS[request.param](tmp_path)
    name = artifact_table_name(unique_pipe_id())
    yield ArtifactDB(runner, name)
    dispose()
    if request.param.startswith("postgres"):
        drop_table(name)


def all_payloads(name: str, url: str) -> list[bytes]:
    with sa.create_engine(url).connect() as conn:
        return [bytes(r[0]) for r in conn.execute(sa.text(f'SELECT payload FROM "{name}"'))]


async def test_rows_round_trip_per_chat_and_other_chats_cannot_read_them(db):
    store = ArtifactStore(db, clock=lambda: 5000.0)
    saved = rows(4)
    assert await store.save(saved, ttl=0) == [r.id for r in saved]
    got = await store.load("chat-1", [r.id for r in saved] + ["f" * 32], ttl=0)
    assert {k: CODEC.decode(v.payload) for k, v in got.items()} == {
        r.id: CODEC.decode(r.payload) for r in saved}
    assert await store.load("chat-2", [r.id for r in saved], ttl=0) == {}
    await db.insert(saved)  # a retried write stores nothing twice
    assert len(await db.fetch("chat-1", [r.id for r in saved], 5000.0)) == 4


async def test_cleanup_deletes_by_last_use_not_by_age(db):
    clock = [1000.0]
    store = ArtifactStore(db, clock=lambda: clock[0])
    old_but_used, old_unused = rows(1, now=1000.0), rows(1, now=1000.0)
    await store.save(old_but_used + old_unused, ttl=0)
    clock[0] = 1000.0 + 80 * 86400
    await store.load("chat-1", [old_but_used[0].id], ttl=0)  # still in use: refreshed
    clock[0] = 1000.0 + 100 * 86400
    assert await store.maybe_cleanup(days=90, interval_hours=24) == 1
    left = await store.load("chat-1", [old_but_used[0].id, old_unused[0].id], ttl=0)
    assert list(left) == [old_but_used[0].id]
    assert await store.maybe_cleanup(days=90, interval_hours=24) == 0  # not due yet
    assert store.next_cleanup is not None
    assert clock[0] + 24 * 3600 <= store.next_cleanup <= clock[0] + 30 * 3600  # jitter


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_many_workers_creating_the_table_at_once(backend, tmp_path):
    if backend.startswith("postgres") and not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is down")
    name = artifact_table_name(unique_pipe_id())
    made = [BACKENDS[backend](tmp_path) for _ in range(6)]
    try:
        dbs = [ArtifactDB(runner, name) for runner, _ in made]
        await asyncio.gather(*(d.ensure_schema() for d in dbs))
        await asyncio.gather(*(d.insert(rows(1)) for d in dbs))
        assert len(await dbs[0].fetch("chat-1", [], 0)) == 0
        await dbs[-1].ensure_schema()
    finally:
        for _, dispose in made:
            dispose()
        if backend.startswith("postgres"):
            drop_table(name)


@NEEDS_PG
def test_worker_processes_racing_create_all_on_postgres():
    """Threads with their own engines hit CREATE TABLE at the same instant."""
    name = artifact_table_name(unique_pipe_id())
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        engine = sa.create_engine(PG_URL)
        try:
            barrier.wait()
            asyncio.run(ArtifactDB(SyncEngineRunner(engine), name).ensure_schema())
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        with sa.create_engine(PG_URL).connect() as conn:
            assert sa.inspect(conn).has_table(name)
    finally:
        drop_table(name)


async def test_database_failure_is_a_typed_error(tmp_path):
    runner, dispose = sqlite_sync(tmp_path)
    failing = FailingRunner(runner)
    failing.failing = True
    store = ArtifactStore(ArtifactDB(failing, "orp_artifacts_x"))
    with pytest.raises(ArtifactStoreError, match="db is down"):
        await store.save(rows(2), ttl=0)
    dispose()


# -- Redis write-behind ------------------------------------------------------------------------


def assert_no_plaintext(blobs: list[bytes]) -> None:
    for blob in blobs:
        assert SECRET.encode() not in blob and b"TOP-SECRET" not in blob


@pytest.fixture
async def wb_store(redis_server, tmp_path):  # noqa: F811 - fixture
    runner, dispose = sqlite_sync(tmp_path)
    failing = FailingRunner(runner)
    client = aioredis.from_url(redis_server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    name = artifact_table_name(unique_pipe_id())
    store = ArtifactStore(ArtifactDB(failing, name), WriteBehind(client, name, batch=3),
                          auto_flush=False)
    yield store, failing, redis_server, tmp_path
    await store.close()
    await client.aclose()
    dispose()


def db_ids(tmp_path: Path, name: str) -> set[str]:
    with sa.create_engine(f"sqlite:///{tmp_path / 'owui.db'}").connect() as conn:
        return {r[0] for r in conn.execute(sa.text(f'SELECT id FROM "{name}"'))}


async def test_write_behind_queues_encrypted_rows_and_flushes_them_in_batches(wb_store):
    store, _, server, tmp = wb_store
    saved = rows(7)
    assert await store.save(saved, ttl=60) == [r.id for r in saved]
    assert await store.redis.depth() == 7
    assert_no_plaintext(redis_values(server.url))
    got = await store.load("chat-1", [r.id for r in saved], ttl=60)  # from the cache
    assert set(got) == {r.id for r in saved}
    assert await store.drain() == 7 and await store.redis.depth() == 0
    assert db_ids(tmp, store.db.table.name) == {r.id for r in saved}
    assert_no_plaintext(all_payloads(store.db.table.name, f"sqlite:///{tmp / 'owui.db'}"))


async def test_a_failed_database_flush_keeps_every_row_queued(wb_store):
    store, failing, _, tmp = wb_store
    saved = rows(5)
    await store.save(saved, ttl=0)
    failing.failing = True
    assert await store.redis.flush(store.db) == 0
    assert await store.redis.depth() == 5
    assert store.redis.last_error and "db is down" in store.redis.last_error
    # still readable from the queue while the database is down (cache TTL 0: no cache)
    got = await store.load("chat-1", [r.id for r in saved], ttl=0)
    assert set(got) == {r.id for r in saved}
    failing.failing = False
    assert await store.drain() == 5
    assert db_ids(tmp, store.db.table.name) == {r.id for r in saved}
    assert store.redis.last_error is None


async def test_drain_backs_off_while_the_database_is_down_then_writes_everything(wb_store):
    store, failing, _, tmp = wb_store
    saved = rows(4)
    await store.save(saved, ttl=0)
    failing.failing = True
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            failing.failing = False

    assert await store.drain(sleep=sleep) == 4
    assert waits == [0.5, 1.0, 2.0]
    assert db_ids(tmp, store.db.table.name) == {r.id for r in saved}


async def test_redis_stopped_mid_run_loses_nothing(wb_store):
    store, _, server, tmp = wb_store
    now = [0.0]
    store.monotonic = lambda: now[0]  # the Redis breaker's clock
    before, during, after = rows(3), rows(3), rows(3)
    assert await store.save(before, ttl=30) == [r.id for r in before]    # queued in Redis
    server.pause()                                                         # Redis stops
    try:
        assert await store.save(during, ttl=30) == [r.id for r in during]  # direct DB write
        assert store.redis_error
        got = await store.load("chat-1", [r.id for r in during], ttl=30)
        assert set(got) == {r.id for r in during}
    finally:
        server.resume()
    now[0] += store.redis_skip_seconds  # Redis is tried again after the breaker's pause
    assert await store.save(after, ttl=30) == [r.id for r in after]
    await store.drain()
    every = {r.id for r in before + during + after}
    assert db_ids(tmp, store.db.table.name) == every
    assert_no_plaintext(redis_values(server.url))


async def test_redis_killed_and_restarted_from_its_append_only_file_loses_nothing(wb_store):
    store, _, server, tmp = wb_store
    now = [0.0]
    store.monotonic = lambda: now[0]  # the Redis breaker's clock
    queued = rows(4)
    await store.save(queued, ttl=30)
    server.stop()                                   # the process dies with rows queued
    direct = rows(2)
    assert await store.save(direct, ttl=30) == [r.id for r in direct]
    server.start()                                  # same port, same append-only file
    now[0] += store.redis_skip_seconds
    with contextlib.suppress(Exception):
        await store.redis.redis.ping()
    await store.drain()
    assert db_ids(tmp, store.db.table.name) == {r.id for r in queued + direct}


async def test_two_workers_share_one_queue_and_lock(redis_server, tmp_path):  # noqa: F811
    runner, dispose = sqlite_sync(tmp_path)
    name = artifact_table_name(unique_pipe_id())
    clients = [aioredis.from_url(redis_server.url) for _ in range(2)]
    stores = [ArtifactStore(ArtifactDB(runner, name), WriteBehind(c, name, batch=2),
                            auto_flush=False) for c in clients]
    saved = rows(5)
    await stores[0].save(saved, ttl=30)
    flushed = await asyncio.gather(stores[0].drain(), stores[1].drain())
    assert sum(flushed) == 5
    assert set(await stores[1].load("chat-1", [r.id for r in saved], ttl=30)) == \
        {r.id for r in saved}
    for c in clients:
        await c.aclose()
    dispose()


async def test_a_flush_whose_lock_expired_does_not_trim_rows_it_did_not_write(
        redis_server, tmp_path):  # noqa: F811
    runner, dispose = sqlite_sync(tmp_path)
    name = artifact_table_name(unique_pipe_id())
    client = aioredis.from_url(redis_server.url)
    wb = WriteBehind(client, name, batch=2)
    store = ArtifactStore(ArtifactDB(runner, name), wb, auto_flush=False)
    saved = rows(4)
    await store.save(saved, ttl=0)

    class LockStolenDuringWrite:
        async def run(self, fn):
            await client.set(wb.lock_key, "another-worker")  # our lock expired; B took it
            return await runner.run(fn)

    store_b = ArtifactDB(LockStolenDuringWrite(), name)
    assert await wb.flush(store_b) == 0
    assert await wb.depth() == 4                 # nothing trimmed by the stale holder
    await client.delete(wb.lock_key)
    assert await store.drain() == 4
    assert db_ids(tmp_path, name) == {r.id for r in saved}
    await client.aclose()
    dispose()


GARBAGE = [b"\xff\xfe not a packed row", b'{"id": "x"}', b'{"id": "y", "chat_id": "c", '
           b'"message_id": "m", "seq": 0, "item_type": "t", "payload": "%%%", "created_at": 1}']


async def test_unreadable_queued_entries_are_quarantined_and_the_rows_behind_them_flush(
        wb_store, caplog):
    store, failing, _, tmp = wb_store
    saved = rows(5)
    await store.save(saved, ttl=0)
    client = store.redis.redis
    await client.lpush(store.redis.pending_key, *reversed(GARBAGE))  # in front of good rows
    failing.failing = True          # reads go to the queue, past the garbage
    got = await store.load("chat-1", [r.id for r in saved], ttl=0)
    assert set(got) == {r.id for r in saved}
    failing.failing = False
    with caplog.at_level("ERROR", logger="openrouter_responses_pipe"):
        assert await store.drain() == 5
    assert db_ids(tmp, store.db.table.name) == {r.id for r in saved}
    assert await store.redis.depth() == 0
    assert await client.lrange(store.redis.quarantine_key, 0, -1) == GARBAGE
    logged = {r.getMessage() for r in caplog.records}
    assert {f"Unreadable queued artifact row ({len(g)} bytes) moved to "
            f"{store.redis.quarantine_key} for inspection" for g in GARBAGE} <= logged
    _, health = await store.health()
    assert isinstance(health, dict) and health["quarantined_rows"] == 3


def test_unpacking_garbage_is_a_typed_error():
    for raw in [*GARBAGE, b"[1]", b'"s"', b"", "\udcff"]:
        with pytest.raises(ArtifactStoreError):
            ArtifactRow.unpack(raw)
    row = rows(1)[0]
    assert ArtifactRow.unpack(row.pack()) == row


async def test_a_background_flush_that_crashes_is_logged_not_swallowed(
        redis_server, tmp_path, caplog):  # noqa: F811
    class Broken:
        async def run(self, fn):
            raise RuntimeError("driver bug")

    client = aioredis.from_url(redis_server.url)
    name = artifact_table_name(unique_pipe_id())
    store = ArtifactStore(ArtifactDB(Broken(), name), WriteBehind(client, name))
    saved = rows(2)
    with caplog.at_level("ERROR", logger="openrouter_responses_pipe"):
        assert await store.save(saved, ttl=0) == [r.id for r in saved]  # queued; flush starts
        flusher = store._flusher
        assert flusher is not None
        await asyncio.wait([flusher])
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
    assert any("orp-artifact-flush failed: RuntimeError: driver bug" in r.getMessage()
               for r in caplog.records)
    assert await store.redis.depth() == 2  # and the rows stay queued
    await store.close()
    await client.aclose()


async def test_a_cleanup_that_crashes_unexpectedly_is_logged_not_swallowed(tmp_path, caplog):
    class Broken:
        async def run(self, fn):
            raise RuntimeError("driver bug in cleanup")

    store = ArtifactStore(ArtifactDB(Broken(), artifact_table_name(unique_pipe_id())))
    with caplog.at_level("ERROR", logger="openrouter_responses_pipe"):
        store.spawn(store.cleanup_logged(30, 24))
        (task,) = store._background
        await asyncio.wait([task])
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
    assert any("orp-artifact-cleanup_logged failed: RuntimeError: driver bug in cleanup"
               in r.getMessage() for r in caplog.records)
    assert not store._background
