"""Stub of ``open_webui.models.chats`` for the "async" flavour (0.12.4).

* ``Chat`` table / ``ChatModel`` / ``ChatForm`` field names as OW models/chats.py:131-257.
* All methods are coroutines:

  - ``get_chat_by_id(id, db=None)`` and ``get_chat_by_id_and_user_id(id, user_id,
    db=None)`` -> ``ChatModel | None`` (OW :1870-1927).
  - ``get_message_by_id_and_message_id(id, message_id)`` -> ``None`` when the chat is
    missing, ``{}`` when only the message is (OW :1214-1228).
  - ``upsert_message_to_chat_by_id_and_message_id(id, message_id, message, *,
    touch=True)`` (OW :1338-1375): an empty ``content`` is filled from the text of
    ``message["output"]`` (mutating the caller's dict); a *new* message gets ``id``,
    ``parentId`` (looked up from a parent's ``childrenIds`` when missing),
    ``childrenIds`` (``[]``), ``role`` (``output`` role, else the opposite of the
    parent's role, else ``"assistant"``) and ``timestamp`` defaults and becomes
    ``history.currentId``; an existing one is shallow-merged (``meta`` keeps ``voice``/
    ``task_id``) and ``currentId`` is left alone (0.6.28 always moved it).  The parent's
    ``childrenIds`` gains the id.  Returns ``None`` on any failure instead of raising.
  - ``add_message_status_to_chat_by_id_and_message_id(id, message_id, status)``
    (OW :1417-1447) and ``add_message_files_by_id_and_message_id(id, message_id, files)``
    (OW :1449-1480, returns the message's new file list).

Simplified: the 0.12 ``chat_message`` mirror table, the ``BEGIN IMMEDIATE`` row lock and
``_repair_chat_current_id`` are not reproduced; the chat JSON is the only store.
"""

from __future__ import annotations

import logging
import time

from open_webui.internal.db import Base, get_async_db, get_async_db_context
from open_webui.utils.misc import get_output_text, sanitize_data_for_db
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import JSON, BigInteger, Boolean, Column, String, Text, select
from sqlalchemy.orm.attributes import flag_modified

log = logging.getLogger(__name__)


class Chat(Base):
    __tablename__ = "chat"

    id = Column(String, primary_key=True, unique=True)
    user_id = Column(String, index=True)
    title = Column(Text)
    chat = Column(JSON)
    created_at = Column(BigInteger, index=True)
    updated_at = Column(BigInteger, index=True)
    share_id = Column(Text, unique=True, nullable=True)
    archived = Column(Boolean, default=False)
    pinned = Column(Boolean, default=False, nullable=True)
    meta = Column(JSON, server_default="{}")
    variables = Column(JSON, nullable=True)
    folder_id = Column(Text, nullable=True)
    tasks = Column(JSON, nullable=True)
    summary = Column(Text, nullable=True)
    current_message_id = Column(Text, nullable=True)
    last_read_at = Column(BigInteger, nullable=True)
    timer_at = Column(BigInteger, nullable=True)


class ChatModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    user_id: str
    title: str
    chat: dict
    created_at: int
    updated_at: int
    share_id: str | None = None
    archived: bool = False
    pinned: bool | None = False
    meta: dict = {}
    variables: dict = {}
    folder_id: str | None = None
    tasks: list | None = None
    summary: str | None = None
    current_message_id: str | None = None
    last_read_at: int | None = None
    timer_at: int | None = None

    @field_validator("variables", mode="before")
    @classmethod
    def normalize_variables(cls, value):
        return value if isinstance(value, dict) else {}


class ChatForm(BaseModel):
    chat: dict
    variables: dict | None = None
    folder_id: str | None = None


def _current_message_id(chat: dict | None) -> str | None:
    chat = chat or {}
    history = chat.get("history") if isinstance(chat.get("history"), dict) else {}
    current = history.get("currentId") or chat.get("currentId") or chat.get("branchPointMessageId")
    if current:
        return current
    messages = chat.get("messages")
    if isinstance(messages, list):
        for item in reversed(messages):
            if isinstance(item, dict) and item.get("id"):
                return item["id"]
    return None


def _link_child(messages: dict, parent_id: str | None, child_id: str) -> None:
    parent = messages.get(parent_id) if parent_id else None
    if not isinstance(parent, dict):
        return
    children = parent.get("childrenIds")
    if not isinstance(children, list):
        children = parent["childrenIds"] = []
    if child_id not in children:
        children.append(child_id)


def _merge_into_history(history: dict, message_id: str, message: dict) -> dict:
    messages = history.setdefault("messages", {})
    if message_id in messages:
        old_meta = messages[message_id].get("meta")
        old_meta = old_meta if isinstance(old_meta, dict) else {}
        new_meta = message.get("meta")
        if isinstance(new_meta, dict):
            if set(new_meta) <= {"voice", "task_id"}:
                merged_meta = {**old_meta, **new_meta}
            else:
                kept = {k: old_meta[k] for k in ("voice", "task_id") if k in old_meta}
                merged_meta = {**kept, **new_meta}
            message = {**message, "meta": merged_meta}
        messages[message_id] = {**messages[message_id], **message}
    else:
        explicit_parent = message.get("parentId")
        parent_id = explicit_parent
        if parent_id is None:
            parent_id = next(
                (mid for mid, m in messages.items() if message_id in m.get("childrenIds", [])),
                None,
            )
        parent = messages.get(parent_id) if parent_id else None
        output_role = next(
            (
                item.get("role")
                for item in (message.get("output") or [])
                if isinstance(item, dict) and item.get("role")
            ),
            None,
        )
        role = message.get("role") or output_role
        if not role:
            parent_role = parent.get("role") if parent else None
            role = {"user": "assistant", "assistant": "user"}.get(parent_role, "assistant")
        children = message.get("childrenIds")
        messages[message_id] = {
            **message,
            "id": message.get("id") or message_id,
            "parentId": explicit_parent if explicit_parent is not None else parent_id,
            "childrenIds": children if isinstance(children, list) else [],
            "role": role,
            "timestamp": message.get("timestamp") or int(time.time()),
        }
        history["currentId"] = message_id
    _link_child(messages, messages[message_id].get("parentId"), message_id)
    return messages[message_id]


class ChatTable:
    async def get_message_by_id_and_message_id(self, id: str, message_id: str) -> dict | None:
        found = await self.get_chat_by_id(id)
        if found is None:
            return None
        messages = (found.chat.get("history") or {}).get("messages") or {}
        return messages.get(message_id, {})

    async def upsert_message_to_chat_by_id_and_message_id(
        self, id: str, message_id: str, message: dict, *, touch: bool = True
    ) -> ChatModel | None:
        if not message.get("content"):
            text = get_output_text(message.get("output"))
            if text:
                message["content"] = text
        message = sanitize_data_for_db(message)
        try:
            async with get_async_db() as session:
                row = await session.get(Chat, id)
                if row is None:
                    return None
                chat = row.chat or {}
                history = chat.get("history", {})
                _merge_into_history(history, message_id, message)
                chat["history"] = history
                row.chat = chat
                row.title = sanitize_data_for_db(chat.get("title", "New Chat"))
                row.current_message_id = _current_message_id(chat)
                flag_modified(row, "chat")
                if touch:
                    row.updated_at = int(time.time())
                result = ChatModel.model_validate(row)
                await session.commit()
            return result
        except Exception:
            log.exception("upsert_message_to_chat_by_id_and_message_id failed")
            return None

    async def add_message_status_to_chat_by_id_and_message_id(
        self, id: str, message_id: str, status: dict
    ) -> ChatModel | None:
        try:
            status = sanitize_data_for_db(status)
            async with get_async_db() as session:
                row = await session.get(Chat, id)
                if row is None:
                    return None
                chat = row.chat or {}
                history = chat.get("history", {})
                target = history.get("messages", {}).get(message_id)
                if target is not None:
                    target["statusHistory"] = [*target.get("statusHistory", []), status]
                chat["history"] = history
                row.chat = chat
                row.title = sanitize_data_for_db(chat.get("title", "New Chat"))
                row.current_message_id = _current_message_id(chat)
                flag_modified(row, "chat")
                result = ChatModel.model_validate(row)
                await session.commit()
                return result
        except Exception:
            return None

    async def add_message_files_by_id_and_message_id(
        self, id: str, message_id: str, files: list[dict]
    ) -> list[dict] | None:
        async with get_async_db() as session:
            row = await session.get(Chat, id)
            if row is None:
                return None
            chat = row.chat or {}
            history = chat.get("history", {})
            new_files: list = []
            target = history.get("messages", {}).get(message_id)
            if target is not None:
                new_files = target.get("files", []) + files
                target["files"] = new_files
            chat["history"] = history
            row.chat = sanitize_data_for_db(chat)
            flag_modified(row, "chat")
            row.updated_at = int(time.time())
            await session.commit()
            return new_files

    async def get_chat_by_id(self, id: str, db=None) -> ChatModel | None:
        try:
            async with get_async_db_context(db) as session:
                row = await session.get(Chat, id)
                if row is None:
                    return None
                found = ChatModel.model_validate(row)
                found.chat = sanitize_data_for_db(found.chat)
                return found
        except Exception:
            return None

    async def get_chat_by_id_and_user_id(self, id: str, user_id: str, db=None) -> ChatModel | None:
        try:
            async with get_async_db_context(db) as session:
                result = await session.execute(select(Chat).filter_by(id=id, user_id=user_id))
                row = result.scalars().first()
                if row is None:
                    return None
                found = ChatModel.model_validate(row)
                found.chat = sanitize_data_for_db(found.chat)
                return found
        except Exception:
            return None


Chats = ChatTable()
