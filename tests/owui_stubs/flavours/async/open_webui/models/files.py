"""Stub of ``open_webui.models.files`` for the "async" flavour (0.12.4).

* ``File`` table, ``FileModel`` (``id, user_id, hash, filename, path, data, meta,
  created_at, updated_at``), ``FileMeta`` and ``FileForm`` (``id, hash, filename, path,
  data={}, meta={}``) as OW models/files.py:18-112 -- no ``access_control`` any more.
* ``await Files.insert_new_file(user_id, form_data, db=None)`` (OW :115-151): strips
  callables / non-JSON values from ``meta`` (``sanitize_metadata``), returns the
  validated row, or ``None`` after logging when the insert raises.
* ``await Files.get_file_by_id(id, db=None)`` -> ``FileModel | None`` (OW :153-166).
"""

from __future__ import annotations

import json
import logging
import time

from open_webui.internal.db import Base, get_async_db_context
from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, BigInteger, Column, String, Text

log = logging.getLogger(__name__)


class File(Base):
    __tablename__ = "file"

    id = Column(String, primary_key=True, unique=True)
    user_id = Column(String, index=True)
    hash = Column(Text, nullable=True)
    filename = Column(Text)
    path = Column(Text, nullable=True)
    data = Column(JSON, nullable=True)
    meta = Column(JSON, nullable=True)
    created_at = Column(BigInteger, index=True)
    updated_at = Column(BigInteger)


class FileModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    user_id: str
    hash: str | None = None
    filename: str
    path: str | None = None
    data: dict | None = None
    meta: dict | None = None
    created_at: int | None
    updated_at: int | None


class FileMeta(BaseModel):
    name: str | None = None
    content_type: str | None = None
    size: int | None = None

    model_config = ConfigDict(extra="allow")


class FileForm(BaseModel):
    id: str
    hash: str | None = None
    filename: str
    path: str
    data: dict = {}
    meta: dict = {}


def _json_safe(value):
    """Stand-in for ``open_webui.utils.misc.sanitize_metadata`` (OW misc.py:966-1003)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if callable(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items() if not callable(v) and _serialisable(v)}
    if isinstance(value, list):
        return [_json_safe(v) for v in value if not callable(v) and _serialisable(v)]
    return value if _serialisable(value) else None


def _serialisable(value) -> bool:
    if isinstance(value, (str, int, float, bool, type(None), dict, list)):
        return True
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class FilesTable:
    async def insert_new_file(self, user_id: str, form_data: FileForm, db=None) -> FileModel | None:
        async with get_async_db_context(db) as session:
            values = form_data.model_dump()
            if values.get("meta"):
                values["meta"] = _json_safe(values["meta"])
            now = int(time.time())
            record = FileModel(**values, user_id=user_id, created_at=now, updated_at=now)
            try:
                row = File(**record.model_dump())
                session.add(row)
                await session.commit()
                return FileModel.model_validate(row)
            except Exception as e:
                log.exception(f"Error inserting a new file: {e}")
                return None

    async def get_file_by_id(self, id: str, db=None) -> FileModel | None:
        try:
            async with get_async_db_context(db) as session:
                row = await session.get(File, id)
                return FileModel.model_validate(row) if row else None
        except Exception:
            return None


Files = FilesTable()
