"""Stub of ``open_webui.models.config`` (0.12.4; the module does not exist in 0.6.28 or
0.8.12 -- there the live settings are ``request.app.state.config``).

``Config`` is a per-key table (``key`` TEXT PK, ``value`` JSON, ``updated_at``) with
static coroutine accessors (OW models/config.py:103-236):

* ``await Config.get(key, default=None)`` -> the stored value, else
  ``Config.DEFAULTS.get(key, default)``; keys under ``oauth.`` and everything when
  persistence is disabled come from ``DEFAULTS`` only.
* ``await Config.upsert(updates, *, db=None)`` stores each key (or only updates
  ``DEFAULTS`` for non-persistent keys).

``DEFAULTS`` is filled when ``open_webui.config`` is imported (``Config.configure``).
``StubHandle.set_config()`` writes rows for tests.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from open_webui.internal.db import Base, get_async_db
from sqlalchemy import JSON, BigInteger, Column, Text


class Config(Base):
    __tablename__ = "config"

    key = Column(Text, primary_key=True)
    value = Column(JSON, nullable=False)
    updated_at = Column(BigInteger, nullable=True)

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    PERSISTENT_ENABLED: ClassVar[bool] = True
    OAUTH_PERSISTENT_ENABLED: ClassVar[bool] = False

    @classmethod
    def configure(
        cls,
        *,
        defaults: dict[str, Any] | None = None,
        enable_persistent: bool = True,
        enable_oauth_persistent: bool = False,
    ) -> None:
        cls.DEFAULTS = dict(defaults or {})
        cls.PERSISTENT_ENABLED = enable_persistent
        cls.OAUTH_PERSISTENT_ENABLED = enable_oauth_persistent

    @classmethod
    def default_value(cls, key: str, default: Any = None) -> Any:
        return cls.DEFAULTS.get(key, default)

    @classmethod
    def persistent_enabled_for(cls, key: str) -> bool:
        if not cls.PERSISTENT_ENABLED:
            return False
        return not (key.startswith("oauth.") and not cls.OAUTH_PERSISTENT_ENABLED)

    @staticmethod
    async def get(key: str, default: Any = None) -> Any:
        if not Config.persistent_enabled_for(key):
            return Config.default_value(key, default)
        async with get_async_db() as db:
            row = await db.get(Config, key)
            return row.value if row else Config.default_value(key, default)

    @staticmethod
    async def upsert(updates: dict, *, db=None) -> None:
        persistent = {}
        for key, value in updates.items():
            if Config.persistent_enabled_for(key):
                persistent[key] = value
            else:
                Config.DEFAULTS[key] = value
        if not persistent:
            return
        if db is None:
            async with get_async_db() as session:
                await Config.upsert(persistent, db=session)
                await session.commit()
            return
        now = int(time.time())
        for key, value in persistent.items():
            row = await db.get(Config, key)
            if row:
                row.value = value
                row.updated_at = now
            else:
                db.add(Config(key=key, value=value, updated_at=now))
        await db.flush()
