"""Stub of ``open_webui.models.groups`` for the "sync" flavour (0.6.28): the ``group``
table's id/name/description, ``Groups.get_groups()`` (W06 :122-127, synchronous) and
``get_groups_by_member_id`` (W06 :129)."""

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
    def __init__(self) -> None:
        self._STUB_members: dict[str, set[str]] = {}  # group id -> user ids (`user_ids`)

    def get_groups(self) -> list[GroupModel]:
        with get_db() as db:
            return [GroupModel.model_validate(g) for g in db.query(Group).all()]

    def get_groups_by_member_id(self, user_id: str) -> list[GroupModel]:
        """W06 :129: the groups whose `user_ids` hold the user."""
        return [g for g in self.get_groups() if user_id in self._STUB_members.get(g.id, set())]

    def STUB_add_member(self, group_id: str, user_id: str) -> None:
        self._STUB_members.setdefault(group_id, set()).add(user_id)

    def STUB_add(self, id: str, name: str, user_id: str = "admin") -> None:
        now = int(time.time())
        with get_db() as db:
            db.add(Group(id=id, name=name, description="", user_id=user_id,
                         updated_at=now, created_at=now))
            db.commit()


Groups = GroupTable()
