"""Stub of ``open_webui.internal.db`` for the "sync" flavour (0.6.28 surface).

Exports what W06 internal/db.py:31-164 exports: ``JSONField``, ``engine``,
``SessionLocal``, ``metadata_obj``, ``Base``, ``Session`` (scoped), ``get_session`` and
``get_db`` (a contextmanager).  0.6.28 has **no** ``get_db_context`` and no
``ScopedSession`` -- both arrived by 0.8.12 (W08 internal/db.py:161, 175-181) -- so they
are deliberately absent here.  No peewee migrations run; ``owui_stubs.install()`` creates
the stub tables with ``Base.metadata.create_all(engine)``.

JSONField (W06 :31-50): ``impl = Text``; binds with ``json.dumps`` (so ``None`` is
stored as the text ``"null"``) and loads with ``json.loads``.
"""

import json
from contextlib import contextmanager
from typing import Any

from open_webui.env import DATABASE_SCHEMA, DATABASE_URL
from sqlalchemy import Dialect, MetaData, create_engine, types
from sqlalchemy.orm import declarative_base, scoped_session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool


class JSONField(types.TypeDecorator):
    impl = types.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return json.dumps(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is not None:
            return json.loads(value)
        return None

    def copy(self, **kw: Any) -> "JSONField":
        return JSONField(self.impl.length)

    def db_value(self, value):
        return json.dumps(value)

    def python_value(self, value):
        if value is not None:
            return json.loads(value)
        return None


SQLALCHEMY_DATABASE_URL = DATABASE_URL


def _stub_engine(url: str):
    # The real module uses the default pool; the stub uses NullPool (StaticPool for an
    # in-memory database) so uninstall() leaves no pooled SQLite connections behind.
    if "sqlite" in url:
        memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        return create_engine(
            url,
            connect_args={"check_same_thread": False},
            poolclass=StaticPool if memory else NullPool,
        )
    return create_engine(url, pool_pre_ping=True)


engine = _stub_engine(SQLALCHEMY_DATABASE_URL)

SessionLocal = sessionmaker(autocommit=False, autoflush=False, bind=engine, expire_on_commit=False)
metadata_obj = MetaData(schema=DATABASE_SCHEMA)
Base = declarative_base(metadata=metadata_obj)
Session = scoped_session(SessionLocal)


def get_session():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


get_db = contextmanager(get_session)
