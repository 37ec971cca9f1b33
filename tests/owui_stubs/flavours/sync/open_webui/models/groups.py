"""Stub of ``open_webui.models.groups`` for the "sync" flavour (0.6.28): the ``group``
table's id/name/description and ``Groups.get_groups()`` (W06 :122-127, synchronous)."""

import time

from open_webui.internal.db import Base, get_db
from pydantic import BaseModel, ConfigDict
from sqlalchemy import BigInteger, Column, Text


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
    def get_groups(self) -> list[GroupModel]:
        with get_db() as db:
            return [GroupModel.model_validate(g) for g in db.query(Group).all()]

    def STUB_add(self, id: str, name: str, user_id: str = "admin") -> None:
        now = int(time.time())
        with get_db() as db:
            db.add(Group(id=id, name=name, description="", user_id=user_id,
                         updated_at=now, created_at=now))
            db.commit()


Groups = GroupTable()
