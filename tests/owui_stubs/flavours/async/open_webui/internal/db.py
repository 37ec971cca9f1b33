"""Stub of ``open_webui.internal.db`` for the "async" flavour (0.12.4).

Exports the names of OW internal/db.py:126-144, 427-541:

* sync (startup-only in the real app): ``JSONField``, ``SQLALCHEMY_DATABASE_URL``,
  ``engine``, ``SessionLocal``, ``metadata_obj``, ``Base``, ``ScopedSession``,
  ``get_session``, ``get_db`` (contextmanager);
* async (all runtime access): ``ASYNC_SQLALCHEMY_DATABASE_URL`` (``sqlite://`` ->
  ``sqlite+aiosqlite://``), ``async_engine``, ``AsyncSessionLocal``,
  ``get_async_session`` (generator), ``get_async_db()`` and
  ``get_async_db_context(db=None)`` (async contextmanagers).  The latter reuses ``db``
  only when it is an ``AsyncSession`` *and* ``DATABASE_ENABLE_SESSION_SHARING`` is on
  (default off), otherwise opens a fresh session.
* ``get_db_context`` does **not** exist in 0.12 (it existed in 0.8.12 only).

JSONField (OW :126-144): ``impl = UnicodeText``; ``None`` stays SQL NULL; values go
through ``JSONCodec.dumps(value, ensure_ascii=False)`` / ``JSONCodec.loads``.

Async driver: with ``greenlet`` and ``aiosqlite`` importable this is a real SQLAlchemy
``AsyncEngine``/``AsyncSession`` on aiosqlite, as in the real app.  Without them (the
project venv at the time of writing) it falls back to
``open_webui.internal._async_fallback``: the same coroutine API executed on a
synchronous SQLite session.  ``STUB_ASYNC_DRIVER`` tells which one is active.
"""

from contextlib import asynccontextmanager, contextmanager
from typing import Any

from open_webui.env import DATABASE_ENABLE_SESSION_SHARING, DATABASE_SCHEMA, DATABASE_URL
from open_webui.utils.json_codec import JSONCodec
from sqlalchemy import Dialect, MetaData, create_engine, types
from sqlalchemy.orm import declarative_base, scoped_session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

try:
    import aiosqlite  # noqa: F401 - probe only
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    STUB_ASYNC_DRIVER = "aiosqlite"
except ImportError:
    from open_webui.internal._async_fallback import (
        AsyncSession,
        async_sessionmaker,
        create_async_engine,
    )

    STUB_ASYNC_DRIVER = "sync-fallback"


class JSONField(types.TypeDecorator):
    impl = types.UnicodeText
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else JSONCodec.dumps(value, ensure_ascii=False)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else JSONCodec.loads(value)

    def copy(self, **kwargs: Any) -> "JSONField":
        return JSONField(length=self.impl.length)


SQLALCHEMY_DATABASE_URL = DATABASE_URL


def _is_memory(url: str) -> bool:
    return url.endswith("://") or ":memory:" in url or "mode=memory" in url


# Stub pools: NullPool (StaticPool for in-memory SQLite) so uninstall() leaves nothing open.
if "sqlite" in SQLALCHEMY_DATABASE_URL:
    engine = create_engine(
        SQLALCHEMY_DATABASE_URL,
        connect_args={"check_same_thread": False},
        poolclass=StaticPool if _is_memory(SQLALCHEMY_DATABASE_URL) else NullPool,
    )
else:
    engine = create_engine(SQLALCHEMY_DATABASE_URL, pool_pre_ping=True)

SessionLocal = sessionmaker(autocommit=False, autoflush=False, bind=engine, expire_on_commit=False)
metadata_obj = MetaData(schema=DATABASE_SCHEMA)
Base = declarative_base(metadata=metadata_obj)
ScopedSession = scoped_session(SessionLocal)


def get_session():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


get_db = contextmanager(get_session)


def _make_async_url(url: str) -> str:
    if url.startswith("sqlite://"):
        return url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    if url.startswith("postgresql://"):
        return url.replace("postgresql://", "postgresql+psycopg://", 1)
    return url


ASYNC_SQLALCHEMY_DATABASE_URL = _make_async_url(SQLALCHEMY_DATABASE_URL)

if STUB_ASYNC_DRIVER == "sync-fallback":
    async_engine = create_async_engine(ASYNC_SQLALCHEMY_DATABASE_URL, sync_engine=engine)
elif "sqlite" in ASYNC_SQLALCHEMY_DATABASE_URL:
    async_engine = create_async_engine(
        ASYNC_SQLALCHEMY_DATABASE_URL,
        connect_args={"check_same_thread": False},
        poolclass=NullPool,
    )
else:
    async_engine = create_async_engine(ASYNC_SQLALCHEMY_DATABASE_URL, pool_pre_ping=True)

AsyncSessionLocal = async_sessionmaker(
    bind=async_engine,
    class_=AsyncSession,
    autocommit=False,
    autoflush=False,
    expire_on_commit=False,
)


async def get_async_session():
    async with AsyncSessionLocal() as db:
        yield db


@asynccontextmanager
async def get_async_db():
    async with AsyncSessionLocal() as db:
        yield db


@asynccontextmanager
async def get_async_db_context(db=None):
    if isinstance(db, AsyncSession) and DATABASE_ENABLE_SESSION_SHARING:
        yield db
    else:
        async with get_async_db() as session:
            yield session
