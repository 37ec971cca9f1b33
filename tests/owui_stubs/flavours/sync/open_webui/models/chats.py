"""Stub of ``open_webui.models.chats`` for the "sync" flavour (0.6.28).

* ``Chat`` table / ``ChatModel`` / ``ChatForm`` fields as W06 models/chats.py:26-86.
* All methods synchronous, no ``db`` parameter (W06 :188-300, 542-570):

  - ``get_chat_by_id(id)`` / ``get_chat_by_id_and_user_id(id, user_id)`` -> ``None``
    when missing.
  - ``update_chat_by_id(id, chat)`` replaces the whole ``chat`` JSON, sets ``title`` from
    ``chat["title"]`` (``"New Chat"`` if absent) and bumps ``updated_at``.
  - ``get_message_by_id_and_message_id(id, message_id)`` -> ``None`` when the chat is
    missing, ``{}`` when only the message is missing.
  - ``upsert_message_to_chat_by_id_and_message_id(id, message_id, message)`` strips
    NUL characters from a ``str`` ``content`` (mutating the passed dict), shallow-merges
    into an existing message or inserts it as-is (no defaults are added), always sets
    ``history.currentId = message_id``, then ``update_chat_by_id``.  It raises
    ``KeyError`` when the stored chat has no ``history.messages`` dict yet -- as the real
    code does.
  - ``add_message_status_to_chat_by_id_and_message_id(id, message_id, status)`` appends
    to ``statusHistory`` only when the message exists.
"""

import logging
import time
import uuid
from typing import Optional

from open_webui.internal.db import Base, get_db
from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, BigInteger, Boolean, Column, String, Text

log = logging.getLogger(__name__)


class Chat(Base):
    __tablename__ = "chat"

    id = Column(String, primary_key=True)
    user_id = Column(String)
    title = Column(Text)
    chat = Column(JSON)
    created_at = Column(BigInteger)
    updated_at = Column(BigInteger)
    share_id = Column(Text, unique=True, nullable=True)
    archived = Column(Boolean, default=False)
    pinned = Column(Boolean, default=False, nullable=True)
    meta = Column(JSON, server_default="{}")
    folder_id = Column(Text, nullable=True)


class ChatModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    user_id: str
    title: str
    chat: dict
    created_at: int
    updated_at: int
    share_id: Optional[str] = None  # noqa: UP045
    archived: bool = False
    pinned: Optional[bool] = False  # noqa: UP045
    meta: dict = {}
    folder_id: Optional[str] = None  # noqa: UP045


class ChatForm(BaseModel):
    chat: dict
    folder_id: Optional[str] = None  # noqa: UP045


class ChatTable:
    def insert_new_chat(self, user_id: str, form_data: ChatForm) -> Optional[ChatModel]:  # noqa: UP045
        now = int(time.time())
        model = ChatModel(
            id=str(uuid.uuid4()),
            user_id=user_id,
            title=form_data.chat.get("title", "New Chat"),
            chat=form_data.chat,
            folder_id=form_data.folder_id,
            created_at=now,
            updated_at=now,
        )
        with get_db() as db:
            row = Chat(**model.model_dump())
            db.add(row)
            db.commit()
            db.refresh(row)
            return ChatModel.model_validate(row)

    def update_chat_by_id(self, id: str, chat: dict) -> Optional[ChatModel]:  # noqa: UP045
        try:
            with get_db() as db:
                row = db.get(Chat, id)
                row.chat = chat
                row.title = chat.get("title", "New Chat")
                row.updated_at = int(time.time())
                db.commit()
                db.refresh(row)
                return ChatModel.model_validate(row)
        except Exception:
            return None

    def get_message_by_id_and_message_id(self, id: str, message_id: str) -> Optional[dict]:  # noqa: UP045
        found = self.get_chat_by_id(id)
        if found is None:
            return None
        return found.chat.get("history", {}).get("messages", {}).get(message_id, {})

    def upsert_message_to_chat_by_id_and_message_id(
        self, id: str, message_id: str, message: dict
    ) -> Optional[ChatModel]:  # noqa: UP045
        found = self.get_chat_by_id(id)
        if found is None:
            return None
        if isinstance(message.get("content"), str):
            message["content"] = message["content"].replace("\x00", "")
        chat = found.chat
        history = chat.get("history", {})
        if message_id in history.get("messages", {}):
            history["messages"][message_id] = {**history["messages"][message_id], **message}
        else:
            history["messages"][message_id] = message  # KeyError without history.messages
        history["currentId"] = message_id
        chat["history"] = history
        return self.update_chat_by_id(id, chat)

    def add_message_status_to_chat_by_id_and_message_id(
        self, id: str, message_id: str, status: dict
    ) -> Optional[ChatModel]:  # noqa: UP045
        found = self.get_chat_by_id(id)
        if found is None:
            return None
        chat = found.chat
        history = chat.get("history", {})
        target = history.get("messages", {}).get(message_id)
        if target is not None:
            target["statusHistory"] = [*target.get("statusHistory", []), status]
        chat["history"] = history
        return self.update_chat_by_id(id, chat)

    def get_chat_by_id(self, id: str) -> Optional[ChatModel]:  # noqa: UP045
        try:
            with get_db() as db:
                return ChatModel.model_validate(db.get(Chat, id))
        except Exception:
            return None

    def get_chat_by_id_and_user_id(self, id: str, user_id: str) -> Optional[ChatModel]:  # noqa: UP045
        try:
            with get_db() as db:
                row = db.query(Chat).filter_by(id=id, user_id=user_id).first()
                return ChatModel.model_validate(row)
        except Exception:
            return None


Chats = ChatTable()
