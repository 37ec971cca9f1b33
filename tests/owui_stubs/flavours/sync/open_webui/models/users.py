"""Stub of ``open_webui.models.users`` for the "sync" flavour (0.6.28).

* ``User`` table / ``UserModel`` fields as W06 models/users.py:24-82 (``profile_image_url``
  is a *required* ``str``; ``api_key`` and ``oauth_sub`` are present; no ``oauth``/``scim``).
* ``UserSettings`` allows extra keys (W06 :52-55).
* ``Users.insert_new_user(id, name, email, profile_image_url="/user.png",
  role="pending", oauth_sub=None)`` (W06 :144-174) and ``Users.get_user_by_id(id)``
  (W06 :176-182): synchronous, no ``db`` parameter, ``None`` when missing;
  ``Users.get_super_admin_user()`` (W06 :439-445): the first admin or ``None``.
"""

import datetime
import time
from typing import Optional

from open_webui.internal.db import Base, JSONField, get_db
from pydantic import BaseModel, ConfigDict
from sqlalchemy import BigInteger, Column, Date, String, Text


class User(Base):
    __tablename__ = "user"

    id = Column(String, primary_key=True)
    name = Column(String)
    email = Column(String)
    username = Column(String(50), nullable=True)
    role = Column(String)
    profile_image_url = Column(Text)
    bio = Column(Text, nullable=True)
    gender = Column(Text, nullable=True)
    date_of_birth = Column(Date, nullable=True)
    info = Column(JSONField, nullable=True)
    settings = Column(JSONField, nullable=True)
    api_key = Column(String, nullable=True, unique=True)
    oauth_sub = Column(Text, unique=True)
    last_active_at = Column(BigInteger)
    updated_at = Column(BigInteger)
    created_at = Column(BigInteger)


class UserSettings(BaseModel):
    ui: Optional[dict] = {}  # noqa: UP045
    model_config = ConfigDict(extra="allow")


class UserModel(BaseModel):
    id: str
    name: str
    email: str
    username: Optional[str] = None  # noqa: UP045
    role: str = "pending"
    profile_image_url: str
    bio: Optional[str] = None  # noqa: UP045
    gender: Optional[str] = None  # noqa: UP045
    date_of_birth: Optional[datetime.date] = None  # noqa: UP045
    info: Optional[dict] = None  # noqa: UP045
    settings: Optional[UserSettings] = None  # noqa: UP045
    api_key: Optional[str] = None  # noqa: UP045
    oauth_sub: Optional[str] = None  # noqa: UP045
    last_active_at: int
    updated_at: int
    created_at: int

    model_config = ConfigDict(from_attributes=True)


class UsersTable:
    def insert_new_user(
        self,
        id: str,
        name: str,
        email: str,
        profile_image_url: str = "/user.png",
        role: str = "pending",
        oauth_sub: Optional[str] = None,  # noqa: UP045
    ) -> Optional[UserModel]:  # noqa: UP045
        now = int(time.time())
        user = UserModel(
            id=id,
            name=name,
            email=email,
            role=role,
            profile_image_url=profile_image_url,
            last_active_at=now,
            created_at=now,
            updated_at=now,
            oauth_sub=oauth_sub,
        )
        with get_db() as db:
            row = User(**user.model_dump())
            db.add(row)
            db.commit()
            return user

    def get_user_by_id(self, id: str) -> Optional[UserModel]:  # noqa: UP045
        try:
            with get_db() as db:
                row = db.query(User).filter_by(id=id).first()
                return UserModel.model_validate(row)
        except Exception:
            return None

    def get_super_admin_user(self) -> Optional[UserModel]:  # noqa: UP045
        with get_db() as db:
            user = db.query(User).filter_by(role="admin").first()
            return UserModel.model_validate(user) if user else None


Users = UsersTable()
