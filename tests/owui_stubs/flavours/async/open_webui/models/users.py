"""Stub of ``open_webui.models.users`` for the "async" flavour (0.12.4).

* ``User`` table / ``UserModel`` field names as OW models/users.py:142-231.  Notable:
  ``profile_image_url`` is optional and filled with
  ``/api/v1/users/<id>/profile/image`` by an after-validator; ``variables`` is
  ``exclude=True`` (so it never appears in ``model_dump()`` / ``__user__``); there is no
  ``api_key``/``oauth_sub`` any more but ``oauth``/``scim``, ``timezone``, presence and
  status fields.
* ``await Users.insert_new_user(id, name, email, profile_image_url="/user.png",
  role="pending", username=None, oauth=None, db=None)`` (OW :376-411; the image-URL
  validation is skipped) and ``await Users.get_user_by_id(id, db=None)`` -> ``UserModel |
  None`` (OW :414-422); ``await Users.get_super_admin_user(db=None)`` (OW :896-899).
"""

from __future__ import annotations

import datetime
import time

from open_webui.internal.db import Base, get_async_db_context
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import JSON, BigInteger, Column, Date, String, Text, select

_DEFAULT_PROFILE_IMAGE_URL = "/api/v1/users/{user_id}/profile/image"


class UserSettings(BaseModel):
    ui: dict | None = {}
    model_config = ConfigDict(extra="allow")


class User(Base):
    __tablename__ = "user"

    id = Column(String, primary_key=True, unique=True)
    email = Column(String, unique=True)
    username = Column(String(50), nullable=True)
    role = Column(String, default="pending")
    name = Column(String, nullable=False)
    profile_image_url = Column(Text)
    profile_banner_image_url = Column(Text, nullable=True)
    bio = Column(Text, nullable=True)
    gender = Column(Text, nullable=True)
    date_of_birth = Column(Date, nullable=True)
    timezone = Column(String, nullable=True)
    presence_state = Column(String, nullable=True)
    status_emoji = Column(String, nullable=True)
    status_message = Column(Text, nullable=True)
    status_expires_at = Column(BigInteger, nullable=True)
    info = Column(JSON, nullable=True)
    variables = Column(JSON, nullable=True)
    settings = Column(JSON, nullable=True)
    oauth = Column(JSON, nullable=True)
    scim = Column(JSON, nullable=True)
    last_active_at = Column(BigInteger)
    updated_at = Column(BigInteger)
    created_at = Column(BigInteger)


class UserModel(BaseModel):
    id: str
    email: str
    username: str | None = None
    role: str = "pending"
    name: str
    profile_image_url: str | None = None
    profile_banner_image_url: str | None = None
    bio: str | None = None
    gender: str | None = None
    date_of_birth: datetime.date | None = None
    timezone: str | None = None
    presence_state: str | None = None
    status_emoji: str | None = None
    status_message: str | None = None
    status_expires_at: int | None = None
    info: dict | None = None
    variables: dict = Field(default_factory=dict, exclude=True)
    settings: UserSettings | None = None
    oauth: dict | None = None
    scim: dict | None = None
    last_active_at: int
    updated_at: int
    created_at: int

    model_config = ConfigDict(from_attributes=True)

    @model_validator(mode="after")
    def _ensure_profile_image(self) -> UserModel:
        if not self.profile_image_url:
            self.profile_image_url = _DEFAULT_PROFILE_IMAGE_URL.format(user_id=self.id)
        return self

    @field_validator("variables", mode="before")
    @classmethod
    def normalize_variables(cls, value):
        return value if isinstance(value, dict) else {}


class UsersTable:
    async def insert_new_user(
        self,
        id: str,
        name: str,
        email: str,
        profile_image_url: str = "/user.png",
        role: str = "pending",
        username: str | None = None,
        oauth: dict | None = None,
        db=None,
    ) -> UserModel | None:
        now = int(time.time())
        user = UserModel(
            id=id,
            email=email,
            name=name,
            role=role,
            profile_image_url=profile_image_url,
            last_active_at=now,
            created_at=now,
            updated_at=now,
            username=username,
            oauth=oauth,
        )
        async with get_async_db_context(db) as session:
            row = User(**user.model_dump())
            session.add(row)
            await session.commit()
            return user

    async def get_user_by_id(self, id: str, db=None) -> UserModel | None:
        async with get_async_db_context(db) as session:
            row = await session.get(User, id)
            return UserModel.model_validate(row) if row else None

    async def get_super_admin_user(self, db=None) -> UserModel | None:
        async with get_async_db_context(db) as session:
            rows = (await session.execute(select(User).where(User.role == "admin").limit(1)))
            row = rows.scalars().first()
            return UserModel.model_validate(row) if row else None


Users = UsersTable()
