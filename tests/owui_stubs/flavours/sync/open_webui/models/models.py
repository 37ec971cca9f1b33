"""Stub of ``open_webui.models.models`` for the "sync" flavour (0.6.28).

* ``Model`` table with the ``access_control`` JSON column (``None`` = every user may read,
  ``{}`` = owner only, else ``{"read": {"group_ids", "user_ids"}, "write": {...}}``),
  ``ModelMeta`` (``profile_image_url`` defaults to ``/static/favicon.png``; extra keys
  allowed), ``ModelModel`` and ``ModelForm`` as W06 models/models.py:19-140.
* ``Models.insert_new_model(form_data, user_id)`` returns ``None`` on any failure (a
  duplicate id included; W06 :147-171); ``update_model_by_id(id, model)`` overwrites every
  form field, access_control and is_active included, no version check, ``None`` on failure
  (W06 :243-259); ``get_all_models()``, ``get_model_by_id(id)`` (``None`` when missing).
"""

import time
from typing import Optional

from open_webui.internal.db import Base, JSONField, get_db
from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, BigInteger, Boolean, Column, Text


class ModelParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    pass


class ModelMeta(BaseModel):
    profile_image_url: Optional[str] = "/static/favicon.png"  # noqa: UP045
    description: Optional[str] = None  # noqa: UP045
    capabilities: Optional[dict] = None  # noqa: UP045
    model_config = ConfigDict(extra="allow")
    pass


class Model(Base):
    __tablename__ = "model"

    id = Column(Text, primary_key=True)
    user_id = Column(Text)
    base_model_id = Column(Text, nullable=True)
    name = Column(Text)
    params = Column(JSONField)
    meta = Column(JSONField)
    access_control = Column(JSON, nullable=True)
    is_active = Column(Boolean, default=True)
    updated_at = Column(BigInteger)
    created_at = Column(BigInteger)


class ModelModel(BaseModel):
    id: str
    user_id: str
    base_model_id: Optional[str] = None  # noqa: UP045
    name: str
    params: ModelParams
    meta: ModelMeta
    access_control: Optional[dict] = None  # noqa: UP045
    is_active: bool
    updated_at: int
    created_at: int
    model_config = ConfigDict(from_attributes=True)


class ModelForm(BaseModel):
    id: str
    base_model_id: Optional[str] = None  # noqa: UP045
    name: str
    meta: ModelMeta
    params: ModelParams
    access_control: Optional[dict] = None  # noqa: UP045
    is_active: bool = True


class ModelsTable:
    def insert_new_model(
        self, form_data: ModelForm, user_id: str
    ) -> Optional[ModelModel]:  # noqa: UP045
        model = ModelModel(**{**form_data.model_dump(), "user_id": user_id,
                              "created_at": int(time.time()), "updated_at": int(time.time())})
        try:
            with get_db() as db:
                row = Model(**model.model_dump())
                db.add(row)
                db.commit()
                db.refresh(row)
                return ModelModel.model_validate(row)
        except Exception:
            return None

    def get_all_models(self) -> list[ModelModel]:
        with get_db() as db:
            return [ModelModel.model_validate(m) for m in db.query(Model).all()]

    def get_model_by_id(self, id: str) -> Optional[ModelModel]:  # noqa: UP045
        try:
            with get_db() as db:
                return ModelModel.model_validate(db.get(Model, id))
        except Exception:
            return None

    def update_model_by_id(self, id: str, model: ModelForm) -> Optional[ModelModel]:  # noqa: UP045
        try:
            with get_db() as db:
                db.query(Model).filter_by(id=id).update(model.model_dump(exclude={"id"}))
                db.commit()
                row = db.get(Model, id)
                db.refresh(row)
                return ModelModel.model_validate(row)
        except Exception:
            return None


Models = ModelsTable()
