"""Stub of ``open_webui.models.models`` for the "async" flavour (0.12.4).

* ``Model`` table (with ``version_id``), ``ModelParams``/``ModelMeta`` (extra keys allowed;
  tags normalised to ``[{"name": ...}]``), ``ModelModel`` (``access_grants`` from the
  ``access_grant`` table) and ``ModelForm`` as OW models/models.py:99-265.
* ``await Models.insert_new_model(form_data, user_id, db=None)``: writes the row and its
  grants; a duplicate id **raises** (the real one re-raises the IntegrityError).
* ``await Models.update_model_by_id(id, model, db=None, user_id=None,
  production_version_id=None)``: ``None`` for a missing row; a new ``version_id`` whenever
  name/params/meta change; ``is_active`` only when the form set it; **grants untouched**;
  ``HTTPException(409)`` when ``version_id`` moved under it (OW :280-331, 620-640).
* ``get_all_models(db=None)``, ``get_model_by_id(id, db=None)`` (``None`` on any error).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from open_webui.internal.db import Base, JSONField, get_async_db_context
from open_webui.models.access_grants import AccessGrant, AccessGrantModel, AccessGrants
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import BigInteger, Boolean, Column, Text, select, update


class STUB_HTTPException(Exception):
    def __init__(self, status_code: int, detail: Any = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def normalize_model_tags(tags: Any) -> list[dict[str, str]]:
    if not isinstance(tags, list):
        return []
    out = []
    for tag in tags:
        name = tag.get("name") if isinstance(tag, dict) else tag
        if isinstance(name, str) and name.strip():
            out.append({"name": name.strip()})
    return out


class ModelParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    model_controls: dict = Field(default_factory=dict, exclude_if=lambda value: not value)


class ModelMeta(BaseModel):
    profile_image_url: str | None = None
    background_image_url: str | None = None
    description: str | None = None
    i18n: dict[str, Any] | None = None
    capabilities: dict | None = None
    knowledge: list[Any] | None = None
    voice: dict | None = None
    voice_avatar: dict | None = None

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def normalize_tags(cls, data):
        if isinstance(data, dict) and "tags" in data:
            data["tags"] = normalize_model_tags(data["tags"])
        return data


class Model(Base):
    __tablename__ = "model"

    id = Column(Text, primary_key=True, unique=True)
    user_id = Column(Text)
    base_model_id = Column(Text, nullable=True)
    name = Column(Text)
    params = Column(JSONField)
    meta = Column(JSONField)
    version_id = Column(Text, nullable=True)
    is_active = Column(Boolean, default=True)
    updated_at = Column(BigInteger)
    created_at = Column(BigInteger)


class ModelModel(BaseModel):
    version_id: str | None = None
    id: str
    user_id: str
    base_model_id: str | None = None

    name: str
    params: ModelParams
    meta: ModelMeta

    access_grants: list[AccessGrantModel] = Field(default_factory=list)

    is_active: bool
    updated_at: int
    created_at: int

    model_config = ConfigDict(from_attributes=True)


class ModelForm(BaseModel):
    commit_message: str | None = None

    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=r"^\S+$")
    base_model_id: str | None = None
    name: str
    meta: ModelMeta
    params: ModelParams
    access_grants: list[dict] | None = None
    is_active: bool = True


class ModelsTable:
    async def _to_model(self, row: Model, session: Any) -> ModelModel:
        model = ModelModel.model_validate(row)
        model.access_grants = await AccessGrants.get_grants_by_resource("model", row.id,
                                                                        db=session)
        return model

    async def insert_new_model(self, form_data: ModelForm, user_id: str, db: Any = None
                               ) -> ModelModel | None:
        async with get_async_db_context(db) as session:
            try:
                data = form_data.model_dump(exclude={"access_grants", "commit_message"})
                now = int(time.time())
                row = Model(**data, user_id=user_id, version_id=str(uuid.uuid4()),
                            created_at=now, updated_at=now)
                session.add(row)
                await AccessGrants.replace_access_grants(session, "model", form_data.id,
                                                         form_data.access_grants)
                await session.commit()
                return await self._to_model(row, session)
            except Exception:
                await session.rollback()
                raise

    async def get_all_models(self, db: Any = None) -> list[ModelModel]:
        async with get_async_db_context(db) as session:
            rows = (await session.execute(select(Model))).scalars().all()
            return [await self._to_model(r, session) for r in rows]

    async def get_model_by_id(self, id: str, db: Any = None) -> ModelModel | None:
        try:
            async with get_async_db_context(db) as session:
                row = await session.get(Model, id)
                return await self._to_model(row, session) if row else None
        except Exception:
            return None

    async def update_model_by_id(
        self,
        id: str,
        model: ModelForm,
        db: Any = None,
        user_id: str | None = None,
        production_version_id: str | None = None,
    ) -> ModelModel | None:
        async with get_async_db_context(db) as session:
            try:
                current = await session.get(Model, id, populate_existing=True)
                if current is None:
                    return None
                values = model.model_dump(exclude={"id", "access_grants", "commit_message"})
                if "is_active" not in model.model_fields_set:
                    values.pop("is_active", None)
                if (values["name"], values["params"], values["meta"]) != (
                        current.name, current.params, current.meta):
                    values["version_id"] = str(uuid.uuid4())
                values["updated_at"] = int(time.time())
                result = await session.execute(
                    update(Model).where(Model.id == id, Model.version_id == current.version_id)
                    .values(**values).execution_options(synchronize_session=False))
                if result.rowcount != 1:
                    raise STUB_HTTPException(409, {"code": "version_conflict"})
                await session.commit()
                row = await session.get(Model, id, populate_existing=True)
                return await self._to_model(row, session)
            except Exception:
                await session.rollback()
                raise


Models = ModelsTable()
__all__ = ["AccessGrant", "Models"]
