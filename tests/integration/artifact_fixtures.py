"""Databases and a real redis-server for the artifact store tests (issue #5)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from openrouter_responses_pipe import AsyncEngineRunner, SyncEngineRunner

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_available() -> bool:
    try:
        with sa.create_engine(PG_URL).connect() as conn:
            conn.execute(sa.text("select 1"))
        return True
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own on a free loopback port (append-only file in `workdir`)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def redis_values(url: str) -> list[bytes]:
    """Every list element and string value in a Redis database."""
    client = redis_sync.Redis.from_url(url)
    out: list[bytes] = []
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"list":
            out += client.lrange(key, 0, -1)
        elif kind == b"string":
            out.append(client.get(key))
    client.close()
    return out


def sqlite_sync(tmp: Path) -> tuple[SyncEngineRunner, Callable[[], Any]]:
    engine = sa.create_engine(f"sqlite:///{tmp / 'owui.db'}")
    return SyncEngineRunner(engine), engine.dispose


def sqlite_async(tmp: Path) -> tuple[AsyncEngineRunner, Callable[[], Any]]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp / 'owui.db'}")
    return AsyncEngineRunner(engine), engine.sync_engine.dispose


def pg_sync(tmp: Path) -> tuple[SyncEngineRunner, Callable[[], Any]]:
    engine = sa.create_engine(PG_URL)
    return SyncEngineRunner(engine), engine.dispose


def pg_async(tmp: Path) -> tuple[AsyncEngineRunner, Callable[[], Any]]:
    engine = create_async_engine(PG_URL)
    return AsyncEngineRunner(engine), engine.sync_engine.dispose


BACKENDS = {"sqlite-sync": sqlite_sync, "sqlite-async": sqlite_async,
            "postgres-sync": pg_sync, "postgres-async": pg_async}


def unique_pipe_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def drop_table(name: str) -> None:
    with sa.create_engine(PG_URL).begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))


class FailingRunner:
    """A DB runner whose transactions fail while `failing` is set (like a DB outage)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failing = False
        self.calls = 0

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        self.calls += 1
        if self.failing:
            raise sa.exc.OperationalError("INSERT", {}, ConnectionRefusedError("db is down"))
        return await self.inner.run(fn)
