"""Stub of ``open_webui.models.groups`` for the "async" flavour (0.12.4): the ``group``
table's id/name/description and ``await Groups.get_all_groups(db=None)`` (OW :305-309)."""

from __future__ import annotations

import time
from typing import Any

from open_webui.internal.db import Base, get_async_db_context
from pydantic import BaseModel, ConfigDict
from sqlalchemy import BigInteger, Column, Text, select


class Group(Base):
    __tablename__ = "group"

    id = Column(Text, unique=True, primary_key=True)
    user_id = Column(Text)
    name = Column(Text)
    description = Column(Text)
    updated_at = Column(BigInteger)
    created_at = Column(BigInteger)


class GroupModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    user_id: str
    name: str
    description: str
    updated_at: int
    created_at: int


class GroupTable:
    async def get_all_groups(self, db: Any = None) -> list[GroupModel]:
        async with get_async_db_context(db) as session:
            rows = (await session.execute(select(Group))).scalars().all()
            return [GroupModel.model_validate(r) for r in rows]

    async def STUB_add(self, id: str, name: str, user_id: str = "admin") -> None:
        now = int(time.time())
        async with get_async_db_context() as session:
            session.add(Group(id=id, name=name, description="", user_id=user_id,
                              updated_at=now, created_at=now))
            await session.commit()


Groups = GroupTable()
