"""Stub of ``open_webui.models.files`` for the "sync" flavour (0.6.28).

* ``File`` table, ``FileModel`` and ``FileForm`` field names as W06 models/files.py:18-99
  -- 0.6.28 still carries ``access_control`` on all three (dropped by 0.8.12).
* ``Files.insert_new_file(user_id, form_data)`` (W06 :102-121): builds a ``FileModel``
  with ``created_at``/``updated_at`` = now, inserts it, returns the validated row or
  ``None`` if the insert raised.  ``Files.get_file_by_id(id)`` (W06 :123-129) returns
  ``None`` when missing.  Both synchronous, no ``db`` parameter.
"""

import logging
import time
from typing import Optional

from open_webui.internal.db import Base, get_db
from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, BigInteger, Column, String, Text

log = logging.getLogger(__name__)


class File(Base):
    __tablename__ = "file"

    id = Column(String, primary_key=True)
    user_id = Column(String)
    hash = Column(Text, nullable=True)
    filename = Column(Text)
    path = Column(Text, nullable=True)
    data = Column(JSON, nullable=True)
    meta = Column(JSON, nullable=True)
    access_control = Column(JSON, nullable=True)
    created_at = Column(BigInteger)
    updated_at = Column(BigInteger)


class FileModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    user_id: str
    hash: Optional[str] = None  # noqa: UP045
    filename: str
    path: Optional[str] = None  # noqa: UP045
    data: Optional[dict] = None  # noqa: UP045
    meta: Optional[dict] = None  # noqa: UP045
    access_control: Optional[dict] = None  # noqa: UP045
    created_at: Optional[int]  # noqa: UP045
    updated_at: Optional[int]  # noqa: UP045


class FileMeta(BaseModel):
    name: Optional[str] = None  # noqa: UP045
    content_type: Optional[str] = None  # noqa: UP045
    size: Optional[int] = None  # noqa: UP045

    model_config = ConfigDict(extra="allow")


class FileForm(BaseModel):
    id: str
    hash: Optional[str] = None  # noqa: UP045
    filename: str
    path: str
    data: dict = {}
    meta: dict = {}
    access_control: Optional[dict] = None  # noqa: UP045


class FilesTable:
    def insert_new_file(self, user_id: str, form_data: FileForm) -> Optional[FileModel]:  # noqa: UP045
        now = int(time.time())
        record = FileModel(
            **form_data.model_dump(), user_id=user_id, created_at=now, updated_at=now
        )
        with get_db() as db:
            try:
                row = File(**record.model_dump())
                db.add(row)
                db.commit()
                db.refresh(row)
                return FileModel.model_validate(row)
            except Exception as e:
                log.exception(f"Error inserting a new file: {e}")
                return None

    def get_file_by_id(self, id: str) -> Optional[FileModel]:  # noqa: UP045
        with get_db() as db:
            try:
                return FileModel.model_validate(db.get(File, id))
            except Exception:
                return None


Files = FilesTable()
