"""Stub of ``open_webui.utils.misc`` for the "async" flavour (0.12.4).

OW utils/misc.py:787-848 (templates), :245-265 (``get_output_text``):

* ``openai_chat_message_template(model, message_id=None)`` -> ``id`` is ``message_id``
  if given, else ``"<model>-<uuid4>"``.
* ``openai_chat_chunk_message_template(model, content=None, reasoning_content=None,
  tool_calls=None, usage=None, message_id=None)``: as in 0.6.28 (delta holds only truthy
  fields; ``finish_reason="stop"`` when none is truthy) plus the ``message_id`` keyword.
* ``openai_chat_completion_message_template(model, message=None, reasoning_content=None,
  tool_calls=None, usage=None)``: ``finish_reason`` is ``"tool_calls"`` when
  ``tool_calls`` is truthy, else ``"stop"`` (0.6.28 always said ``"stop"``).
* ``get_output_text(output)`` joins the text parts of ``type == "message"`` output items
  (used by ``Chats.upsert_message_to_chat_by_id_and_message_id``).
"""

import json
import time
import uuid


def openai_chat_message_template(model: str, message_id: str | None = None):
    return {
        "id": message_id if message_id else f"{model}-{uuid.uuid4()}",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": None}],
    }


def openai_chat_chunk_message_template(
    model: str,
    content: str | None = None,
    reasoning_content: str | None = None,
    tool_calls: list[dict] | None = None,
    usage: dict | None = None,
    message_id: str | None = None,
) -> dict:
    chunk = openai_chat_message_template(model, message_id)
    chunk["object"] = "chat.completion.chunk"
    choice = chunk["choices"][0]
    choice["index"] = 0
    delta: dict = {}
    choice["delta"] = delta
    if content:
        delta["content"] = content
    if reasoning_content:
        delta["reasoning_content"] = reasoning_content
    if tool_calls:
        delta["tool_calls"] = tool_calls
    if not (content or reasoning_content or tool_calls):
        choice["finish_reason"] = "stop"
    if usage:
        chunk["usage"] = usage
    return chunk


def openai_chat_completion_message_template(
    model: str,
    message: str | None = None,
    reasoning_content: str | None = None,
    tool_calls: list[dict] | None = None,
    usage: dict | None = None,
) -> dict:
    completion = openai_chat_message_template(model)
    completion["object"] = "chat.completion"
    choice = completion["choices"][0]
    if message is not None:
        reply: dict = {"role": "assistant", "content": message}
        if reasoning_content:
            reply["reasoning_content"] = reasoning_content
        if tool_calls:
            reply["tool_calls"] = tool_calls
        choice["message"] = reply
    choice["finish_reason"] = "tool_calls" if tool_calls else "stop"
    if usage:
        completion["usage"] = usage
    return completion


def get_output_text(output: list | None) -> str:
    if not isinstance(output, list):
        return ""
    texts = []
    for item in output:
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        parts = item.get("content") or []
        if not isinstance(parts, list):
            continue
        text = "".join(
            str(part["text"])
            for part in parts
            if isinstance(part, dict) and part.get("text") is not None
        )
        if text and not text.isspace():
            texts.append(text)
    return "\n".join(texts)


def sanitize_text_for_db(text: str) -> str:
    """Simplified OW misc.py:919-926: drops NUL characters (surrogate stripping omitted)."""
    if not isinstance(text, str):
        return text
    return text.replace("\x00", "")


def sanitize_data_for_db(obj):
    """Simplified OW misc.py:943-965: recursively drops NUL characters from strings.

    Like the real one it returns ``obj`` itself (no copy) when nothing needs cleaning.
    """
    if isinstance(obj, str):
        return sanitize_text_for_db(obj)
    try:
        if "\\u0000" not in json.dumps(obj, ensure_ascii=False):
            return obj
    except (TypeError, ValueError):
        pass
    return _strip_nul_deep(obj)


def _strip_nul_deep(obj):
    if isinstance(obj, str):
        return sanitize_text_for_db(obj)
    if isinstance(obj, dict):
        return {key: _strip_nul_deep(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_strip_nul_deep(value) for value in obj]
    return obj
