"""Stub of ``open_webui.models.access_grants`` for the "async" flavour (0.12.4).

* ``AccessGrant`` table and ``AccessGrantModel`` as OW models/access_grants.py:25-56
  (unique per resource/principal/permission).
* ``await AccessGrants.get_grants_by_resource(resource_type, resource_id, db=None)``,
  ``get_grants_by_resources(resource_type, resource_ids, db=None)`` (-> dict id -> list),
  ``set_access_grants(resource_type, resource_id, access_grants, db=None)`` (commits) and
  ``replace_access_grants(db, resource_type, resource_id, access_grants)`` (caller's
  transaction), as OW :443-483. Grants are normalised like ``normalize_access_grants``
  (valid principal types/permissions only, deduplicated).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from open_webui.internal.db import Base, get_async_db_context
from pydantic import BaseModel, ConfigDict
from sqlalchemy import BigInteger, Column, Text, UniqueConstraint, delete, select


class AccessGrant(Base):
    __tablename__ = "access_grant"

    id = Column(Text, primary_key=True)
    resource_type = Column(Text, nullable=False)
    resource_id = Column(Text, nullable=False)
    principal_type = Column(Text, nullable=False)
    principal_id = Column(Text, nullable=False)
    permission = Column(Text, nullable=False)
    created_at = Column(BigInteger, nullable=False)

    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id", "principal_type", "principal_id",
                         "permission", name="uq_access_grant_grant"),
    )


class AccessGrantModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    resource_type: str
    resource_id: str
    principal_type: str
    principal_id: str
    permission: str
    created_at: int


def normalize_access_grants(access_grants: Optional[list]) -> list[dict]:  # noqa: UP045
    deduped: dict[tuple, dict] = {}
    for grant in access_grants or []:
        if isinstance(grant, BaseModel):
            grant = grant.model_dump()
        if not isinstance(grant, dict):
            continue
        ptype, pid, perm = (grant.get("principal_type"), grant.get("principal_id"),
                            grant.get("permission"))
        if ptype not in ("user", "group", "anyone") or perm not in ("read", "write"):
            continue
        if not isinstance(pid, str) or not pid:
            continue
        deduped[(ptype, pid, perm)] = {"principal_type": ptype, "principal_id": pid,
                                       "permission": perm}
    return list(deduped.values())


class AccessGrantsTable:
    async def get_grants_by_resource(
        self,
        resource_type: str,
        resource_id: str,
        db: Any = None,
    ) -> list[AccessGrantModel]:
        async with get_async_db_context(db) as session:
            rows = (await session.execute(select(AccessGrant).filter_by(
                resource_type=resource_type, resource_id=resource_id))).scalars().all()
            return [AccessGrantModel.model_validate(r) for r in rows]

    async def get_grants_by_resources(
        self,
        resource_type: str,
        resource_ids: list[str],
        db: Any = None,
    ) -> dict[str, list[AccessGrantModel]]:
        out: dict[str, list[AccessGrantModel]] = {rid: [] for rid in resource_ids}
        if not resource_ids:
            return out
        async with get_async_db_context(db) as session:
            rows = (await session.execute(select(AccessGrant).filter(
                AccessGrant.resource_type == resource_type,
                AccessGrant.resource_id.in_(resource_ids)))).scalars().all()
            for r in rows:
                out.setdefault(r.resource_id, []).append(AccessGrantModel.model_validate(r))
            return out

    async def set_access_grants(
        self,
        resource_type: str,
        resource_id: str,
        access_grants: Optional[list],  # noqa: UP045
        db: Any = None,
    ) -> list[AccessGrantModel]:
        async with get_async_db_context(db) as session:
            results = await self.replace_access_grants(session, resource_type, resource_id,
                                                       access_grants)
            await session.commit()
            return [AccessGrantModel.model_validate(g) for g in results]

    async def replace_access_grants(self, db, resource_type, resource_id, access_grants):
        await db.execute(delete(AccessGrant).filter_by(resource_type=resource_type,
                                                       resource_id=resource_id))
        results = []
        for g in normalize_access_grants(access_grants):
            grant = AccessGrant(id=str(uuid.uuid4()), resource_type=resource_type,
                                resource_id=resource_id, created_at=int(time.time()), **g)
            db.add(grant)
            results.append(grant)
        return results


AccessGrants = AccessGrantsTable()
