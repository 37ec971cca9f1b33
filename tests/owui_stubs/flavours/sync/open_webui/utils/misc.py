"""Stub of ``open_webui.utils.misc`` for the "sync" flavour (0.6.28): the OpenAI
message templates ``functions.py`` uses to wrap pipe output.

W06 utils/misc.py:200-260:

* ``openai_chat_message_template(model)`` -> ``{id: "<model>-<uuid4>", created:
  int(time.time()), model, choices: [{index: 0, logprobs: None, finish_reason: None}]}``
* ``openai_chat_chunk_message_template(model, content=None, reasoning_content=None,
  tool_calls=None, usage=None)`` -> object ``chat.completion.chunk`` with
  ``choices[0].delta`` holding only the truthy fields and ``finish_reason="stop"`` when
  none of content/reasoning_content/tool_calls is truthy; ``usage`` added when truthy.
* ``openai_chat_completion_message_template(model, message=None, reasoning_content=None,
  tool_calls=None, usage=None)`` -> object ``chat.completion``; ``choices[0].message`` only
  when ``message is not None``; ``finish_reason`` is always ``"stop"`` in 0.6.28.
"""

import time
import uuid
from typing import Optional


def openai_chat_message_template(model: str):
    return {
        "id": f"{model}-{uuid.uuid4()}",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": None}],
    }


def openai_chat_chunk_message_template(
    model: str,
    content: Optional[str] = None,  # noqa: UP045 - mirrors the real annotation
    reasoning_content: Optional[str] = None,  # noqa: UP045
    tool_calls: Optional[list[dict]] = None,  # noqa: UP045
    usage: Optional[dict] = None,  # noqa: UP045
) -> dict:
    chunk = openai_chat_message_template(model)
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
    message: Optional[str] = None,  # noqa: UP045
    reasoning_content: Optional[str] = None,  # noqa: UP045
    tool_calls: Optional[list[dict]] = None,  # noqa: UP045
    usage: Optional[dict] = None,  # noqa: UP045
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
    choice["finish_reason"] = "stop"
    if usage:
        completion["usage"] = usage
    return completion
