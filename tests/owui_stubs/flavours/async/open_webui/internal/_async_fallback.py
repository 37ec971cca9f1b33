"""Stub-only helper: a greenlet-free stand-in for ``sqlalchemy.ext.asyncio``.

Used by the async-flavour ``internal/db.py`` only when ``greenlet``/``aiosqlite`` are not
installed.  It exposes the subset of the AsyncEngine/AsyncSession coroutine API that Open
WebUI model code and pipes use, executing each call synchronously on an ordinary
SQLAlchemy ``Session``/``Connection`` (SQLite calls are fast; nothing is awaited for
real).  Semantics match SQLAlchemy's: ``await session.execute(...)`` returns a buffered
``Result``, ``async with session:`` closes it, ``session.begin()`` commits on success.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.orm import Session


class AsyncConnection:
    def __init__(self, sync_connection: Any):
        self.sync_connection = sync_connection

    async def execute(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        return self.sync_connection.execute(statement, parameters, **kw)

    async def scalar(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        return self.sync_connection.scalar(statement, parameters, **kw)

    async def run_sync(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return fn(self.sync_connection, *args, **kw)

    async def commit(self) -> None:
        self.sync_connection.commit()

    async def rollback(self) -> None:
        self.sync_connection.rollback()

    async def close(self) -> None:
        self.sync_connection.close()


class AsyncEngine:
    def __init__(self, sync_engine: Any):
        self.sync_engine = sync_engine

    @property
    def url(self) -> Any:
        return self.sync_engine.url

    @property
    def dialect(self) -> Any:
        return self.sync_engine.dialect

    @asynccontextmanager
    async def begin(self):
        with self.sync_engine.begin() as conn:
            yield AsyncConnection(conn)

    @asynccontextmanager
    async def connect(self):
        with self.sync_engine.connect() as conn:
            yield AsyncConnection(conn)

    async def dispose(self, close: bool = True) -> None:
        self.sync_engine.dispose(close=close)


def create_async_engine(url: Any, *, sync_engine: Any = None, **kw: Any) -> AsyncEngine:
    if sync_engine is None:
        from sqlalchemy import create_engine

        sync_engine = create_engine(str(url).replace("+aiosqlite", ""), **kw)
    return AsyncEngine(sync_engine)


class AsyncSession:
    def __init__(self, bind: Any = None, **kw: Any):
        engine = bind.sync_engine if isinstance(bind, AsyncEngine) else bind
        self.bind = engine
        self.sync_session = Session(bind=engine, **kw)

    # -- context management ------------------------------------------------------------
    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @asynccontextmanager
    async def begin(self):
        with self.sync_session.begin() as tx:
            yield tx

    # -- sync passthroughs (these are plain methods on AsyncSession too) ---------------
    def add(self, instance: Any, _warn: bool = True) -> None:
        self.sync_session.add(instance)

    def add_all(self, instances: Any) -> None:
        self.sync_session.add_all(instances)

    def expunge(self, instance: Any) -> None:
        self.sync_session.expunge(instance)

    def expire(self, instance: Any, attribute_names: Any = None) -> None:
        self.sync_session.expire(instance, attribute_names)

    def in_transaction(self) -> bool:
        return self.sync_session.in_transaction()

    @property
    def dirty(self) -> Any:
        return self.sync_session.dirty

    @property
    def new(self) -> Any:
        return self.sync_session.new

    # -- coroutine API -----------------------------------------------------------------
    async def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self.sync_session.execute(statement, params, **kw)

    async def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self.sync_session.scalar(statement, params, **kw)

    async def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self.sync_session.scalars(statement, params, **kw)

    async def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        return self.sync_session.get(entity, ident, **kw)

    async def merge(self, instance: Any, **kw: Any) -> Any:
        return self.sync_session.merge(instance, **kw)

    async def delete(self, instance: Any) -> None:
        self.sync_session.delete(instance)

    async def flush(self, objects: Any = None) -> None:
        self.sync_session.flush(objects)

    async def refresh(self, instance: Any, attribute_names: Any = None, **kw: Any) -> None:
        self.sync_session.refresh(instance, attribute_names, **kw)

    async def commit(self) -> None:
        self.sync_session.commit()

    async def rollback(self) -> None:
        self.sync_session.rollback()

    async def close(self) -> None:
        self.sync_session.close()

    async def run_sync(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return fn(self.sync_session, *args, **kw)


def async_sessionmaker(bind: Any = None, class_: Any = AsyncSession, **kw: Any):
    def factory(**overrides: Any) -> Any:
        return class_(bind=bind, **{**kw, **overrides})

    return factory
