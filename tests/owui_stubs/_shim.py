"""Call shim: ``get_function_models`` + ``generate_function_chat_completion``.

Re-implements, per flavour, what Open WebUI does between an HTTP request and the pipe:

* ``list_models`` <- ``get_function_models`` (W06 functions.py:59-133;
  OW functions.py:53-151).
* ``call_pipe``   <- ``generate_function_chat_completion`` (W06 functions.py:136-329;
  OW functions.py:154-338), including the conversion of the return value into SSE
  frames / a completion dict, and the reading of those frames the way the chat
  middleware does (``.text``, ``.reasoning``, ``.usage``, ``.error``).

The templates and the JSON codec come from the *installed* stub modules
(``open_webui.utils.misc`` / ``open_webui.utils.json_codec``), exactly as the real
``functions.py`` imports them -- so ``install(flavour)`` first.

Not reproduced: workspace-model overrides (``Models.get_model_by_id``: base-model
substitution, params and system prompt), access control, OAuth token lookup (pass
``oauth_token``), building ``__event_emitter__``/``__event_call__`` from socket metadata
(pass them; the real server builds them whenever metadata has the *keys* ``session_id``,
``chat_id`` and ``message_id``), and 0.6.28's ``get_tools`` (pass ``tools``).
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from numbers import Number
from typing import Any

from pydantic import BaseModel

log = logging.getLogger("owui_stubs.shim")

_UNSET: Any = object()

try:  # the real code tests isinstance(res, starlette StreamingResponse)
    from starlette.responses import StreamingResponse as _StreamingResponse
except ImportError:  # pragma: no cover
    _StreamingResponse = None


def _is_streaming_response(obj: Any) -> bool:
    if _StreamingResponse is not None:
        return isinstance(obj, _StreamingResponse)
    return hasattr(obj, "body_iterator")  # pragma: no cover


# --------------------------------------------------------------------------- helpers


def _resolve_flavour(flavour: str | None) -> str:
    from ._install import installed_flavour

    active = installed_flavour()
    if active is None:
        raise RuntimeError("owui_stubs.install(flavour, data_dir=...) must be called first")
    if flavour is not None and flavour != active:
        raise RuntimeError(f"flavour {flavour!r} requested but {active!r} stubs are installed")
    return active


def _misc() -> Any:
    return sys.modules["open_webui.utils.misc"]


def _dumps(flavour: str) -> Any:
    """``JSONCodec.dumps`` (0.12, orjson by default) or ``json.dumps`` (0.6.28)."""
    if flavour == "async":
        return sys.modules["open_webui.utils.json_codec"].JSONCodec.dumps
    return json.dumps


def _user_dump(user: Any, flavour: str) -> dict:
    """``user.model_dump() if isinstance(user, UserModel) else {}`` -- a dict is first
    completed with defaults and validated into the flavour's ``UserModel``."""
    from ._install import make_user

    user_model = sys.modules["open_webui.models.users"].UserModel
    if isinstance(user, user_model):
        return user.model_dump()
    if isinstance(user, BaseModel):
        return {}  # not the installed UserModel -> the real code passes {}
    if isinstance(user, dict):
        known = set(user_model.model_fields)
        data = {**make_user(flavour, user.get("id", "user-1")), **user}
        extra = set(data) - known
        if extra:
            raise TypeError(f"UserModel ({flavour}) has no field(s) {sorted(extra)}")
        return user_model(**data).model_dump()
    return {}


def _apply_valves(instance: Any, stored: dict | None, flavour: str) -> None:
    """``function_module.valves = Valves(**stored)`` -- only if the instance already has
    ``valves`` (and the class ``Valves``).  0.12 drops ``None`` values and uses
    ``Valves()`` for an empty/absent dict (OW functions.py:56-67); 0.6.28 passes the dict
    through unchanged (W06 functions.py:62-64).  Validation errors propagate."""
    if not (hasattr(instance, "valves") and hasattr(instance, "Valves")):
        return
    if flavour == "async":
        if stored:
            instance.valves = instance.Valves(**{k: v for k, v in stored.items() if v is not None})
        else:
            instance.valves = instance.Valves()
    else:
        instance.valves = instance.Valves(**(stored if stored else {}))


# --------------------------------------------------------------------------- models


async def list_models(instance: Any, function_id: str, *, stored_valves: dict | None = None,
                      flavour: str | None = None, function_name: str | None = None,
                      function_type: str = "pipe", created_at: int | None = None) -> list[dict]:
    """What ``get_function_models`` lists for one active pipe Function.

    0.12: ``{id, name, object, created, owned_by, pipe, has_user_valves}`` per entry and
    any exception (valves, ``pipes()`` result shape, ...) silently drops this pipe's
    models.  0.6.28: no ``has_user_valves``; a failing ``pipes()`` call yields no models
    but valves errors and malformed entries raise.  Manifold entries: id
    ``"<function_id>.<entry id>"``, name ``f"{instance.name}{entry name}"`` when the
    instance has ``name`` (no separator), ``pipe = {"type": function_type}``.  Without
    ``pipes``: a single model named ``function_name`` (the DB name).
    """
    flavour = _resolve_flavour(flavour)
    created = created_at if created_at is not None else int(time.time())
    db_name = function_name if function_name is not None else function_id

    async def collect() -> list[dict]:
        _apply_valves(instance, stored_valves, flavour)
        extra = {"has_user_valves": hasattr(instance, "UserValves")} if flavour == "async" else {}
        models: list[dict] = []
        if hasattr(instance, "pipes"):
            try:
                if callable(instance.pipes):
                    if inspect.iscoroutinefunction(instance.pipes):
                        entries = await instance.pipes()
                    else:
                        entries = instance.pipes()
                else:
                    entries = instance.pipes
            except Exception as exc:
                log.exception(exc)
                entries = []
            for entry in entries:
                name = entry["name"]
                if hasattr(instance, "name"):
                    name = f"{instance.name}{name}"
                models.append({
                    "id": f"{function_id}.{entry['id']}",
                    "name": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "openai",
                    "pipe": {"type": function_type},
                    **extra,
                })
        else:
            models.append({
                "id": function_id,
                "name": db_name,
                "object": "model",
                "created": created,
                "owned_by": "openai",
                "pipe": {"type": "pipe"},
                **extra,
            })
        return models

    if flavour == "sync":
        return await collect()
    try:
        return await collect()
    except Exception as exc:
        log.exception(exc)
        return []


# --------------------------------------------------------------------------- result


def _normalize_usage(usage: dict) -> dict:
    """OW utils/response.py:13-47 -- adds input_tokens/output_tokens/total_tokens."""
    if not usage:
        return {}
    input_tokens = (usage.get("input_tokens") or usage.get("prompt_tokens")
                    or usage.get("prompt_eval_count"))
    if input_tokens is None:
        input_tokens = int(usage.get("prompt_n") or 0) + int(usage.get("cache_n") or 0)
    output_tokens = (usage.get("output_tokens") or usage.get("completion_tokens")
                     or usage.get("eval_count") or usage.get("predicted_n") or 0)
    total = usage.get("total_tokens") or (input_tokens + output_tokens)
    return {**usage, "input_tokens": int(input_tokens), "output_tokens": int(output_tokens),
            "total_tokens": int(total)}


_SUMMED_USAGE_KEYS = {"input_tokens", "output_tokens", "total_tokens", "cost", "total_cost",
                      "input_cost", "output_cost", "prompt_cost", "completion_cost"}
_DETAIL_USAGE_KEYS = {"prompt_tokens_details", "completion_tokens_details",
                      "input_tokens_details", "output_tokens_details"}


def _is_num(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def _add_maps(a: dict, b: dict) -> dict:
    out = {**a, **b}
    for key in set(a) | set(b):
        x, y = a.get(key, 0), b.get(key, 0)
        if isinstance(x, dict) or isinstance(y, dict):
            out[key] = _add_maps(x if isinstance(x, dict) else {}, y if isinstance(y, dict) else {})
        elif _is_num(x) or _is_num(y):
            out[key] = (x if _is_num(x) else 0) + (y if _is_num(y) else 0)
    return out


def merge_usage(current: dict | None, incoming: dict | None) -> dict:
    """OW utils/response.py:100-143: token counts and costs are **summed** across chunks,
    ``*_details`` maps are summed key-wise, ``prompt_tokens``/``completion_tokens`` take
    the latest value."""
    cur = _normalize_usage(current) if current else {}
    new = _normalize_usage(incoming) if incoming else {}
    if not new:
        return cur
    if not cur:
        return new
    out = {**cur, **new}
    for key in _SUMMED_USAGE_KEYS:
        if key in cur or key in new:
            x, y = cur.get(key, 0), new.get(key, 0)
            if _is_num(x) or _is_num(y):
                out[key] = (x if _is_num(x) else 0) + (y if _is_num(y) else 0)
    for key in _DETAIL_USAGE_KEYS:
        if isinstance(cur.get(key), dict) or isinstance(new.get(key), dict):
            out[key] = _add_maps(cur.get(key) if isinstance(cur.get(key), dict) else {},
                                 new.get(key) if isinstance(new.get(key), dict) else {})
    out["prompt_tokens"] = (new.get("prompt_tokens") or new.get("input_tokens")
                            or cur.get("prompt_tokens", 0))
    out["completion_tokens"] = (new.get("completion_tokens") or new.get("output_tokens")
                                or cur.get("completion_tokens", 0))
    return out


@dataclass
class CallResult:
    """Outcome of one ``call_pipe``.

    * ``frames``: the exact items ``stream_content()`` yielded (``"data: {...}\\n\\n"``,
      the final ``"data: [DONE]"`` has no newline) -- stream mode only.
    * ``sse_payloads``: each frame that starts with ``data:`` minus that prefix, stripped
      (how the chat middleware reads one body_iterator item).
    * ``chunks``: the JSON-decodable payloads other than ``[DONE]``.
    * ``response``: the non-stream return value of ``generate_function_chat_completion``
      (a ``chat.completion`` dict, the pipe's dict, ...).
    * ``exception``: an error raised while the output was being *consumed* (a generator
      failing mid-stream; outside the real try-block, so the server's transport decides
      what the client sees).  An exception raised by ``pipe()`` itself is not stored
      here -- Open WebUI converts it into ``{"error": {"detail": str(e)}}``.
    """

    flavour: str
    stream: bool
    params: dict = field(default_factory=dict)
    raw: Any = None
    frames: list = field(default_factory=list)
    response: Any = None
    exception: BaseException | None = None
    pipe_raised: bool = False

    @property
    def sse_payloads(self) -> list[str]:
        payloads = []
        for frame in self.frames:
            line = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
            if isinstance(line, str) and line.startswith("data:"):
                payloads.append(line[5:].strip())
        return payloads

    @property
    def chunks(self) -> list[dict]:
        out = []
        for payload in self.sse_payloads:
            if payload == "[DONE]":
                continue
            try:
                out.append(json.loads(payload))
            except ValueError:
                continue
        return out

    @property
    def done(self) -> bool:
        return "[DONE]" in self.sse_payloads

    def _deltas(self) -> list[dict]:
        deltas = []
        for chunk in self.chunks:
            if not isinstance(chunk, dict):
                continue
            choices = chunk.get("choices") or []
            if choices and isinstance(choices[0], dict):
                deltas.append(choices[0].get("delta") or {})
        return deltas

    @property
    def text(self) -> str:
        """Concatenated ``choices[0].delta.content`` (stream) or
        ``choices[0].message.content`` (non-stream)."""
        if not self.stream:
            try:
                return self.response["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                return ""
        return "".join(d.get("content") or "" for d in self._deltas())

    @property
    def reasoning(self) -> str:
        """Concatenated ``delta.reasoning_content`` -- or ``reasoning`` / ``thinking``, the
        aliases both versions' middleware accept (W06 middleware.py:2120-2125; OW
        middleware.py:5161-5165)."""
        if not self.stream:
            try:
                return self.response["choices"][0]["message"].get("reasoning_content") or ""
            except (KeyError, IndexError, TypeError, AttributeError):
                return ""
        return "".join(
            d.get("reasoning_content") or d.get("reasoning") or d.get("thinking") or ""
            for d in self._deltas()
        )

    @property
    def finish_reasons(self) -> list[str]:
        reasons = []
        for chunk in self.chunks:
            for choice in chunk.get("choices") or []:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    reasons.append(choice["finish_reason"])
        return reasons

    @property
    def usage(self) -> dict | None:
        """The usage Open WebUI would record.

        0.12 (OW middleware.py:4922-4935): ``usage`` (+ llama.cpp ``timings``) of **every**
        chunk, merged with ``merge_usage`` -- token counts are *summed*.  0.6.28
        (W06 middleware.py:2030-2056): only chunks whose ``choices`` is empty/missing
        count, ``usage`` (+ ``timing``) of the *last* such chunk wins, no normalisation.
        Non-stream: the response's ``usage`` (normalised in 0.12).
        """
        if not self.stream:
            if isinstance(self.response, dict) and self.response.get("usage"):
                usage = self.response["usage"]
                return _normalize_usage(usage) if self.flavour == "async" else usage
            return None
        result: dict | None = None
        for chunk in self.chunks:
            if not isinstance(chunk, dict):
                continue
            if self.flavour == "async":
                kind = chunk.get("type", "")
                if "selected_model_id" in chunk or (
                    isinstance(kind, str) and (kind.startswith("response.") or kind == "error")
                ):
                    continue  # other branches of the 0.12 middleware; usage not read here
                raw = dict(chunk.get("usage") or {})
                raw.update(chunk.get("timings") or {})
                if raw:
                    result = merge_usage(result, raw)
            else:
                if chunk.get("choices"):
                    continue
                raw = dict(chunk.get("usage") or {})
                raw.update(chunk.get("timing") or {})
                if raw:
                    result = raw
        return result

    @property
    def error(self) -> Any:
        """The error Open WebUI would show: the ``error`` of the first chunk without
        ``choices`` (stream), or the response's ``error`` (non-stream); ``None``
        otherwise."""
        if not self.stream:
            return self.response.get("error") if isinstance(self.response, dict) else None
        for chunk in self.chunks:
            if isinstance(chunk, dict) and not chunk.get("choices") and chunk.get("error"):
                return chunk["error"]
        return None

    @property
    def inline_events(self) -> list[dict]:
        """``chunk["event"]`` payloads the middleware forwards to ``__event_emitter__``."""
        return [c["event"] for c in self.chunks if isinstance(c, dict) and "event" in c]


# --------------------------------------------------------------------------- call


async def call_pipe(
    instance: Any,
    *,
    body: dict,
    user: Any,
    stored_valves: dict | None = None,
    user_valves: dict | None = None,
    metadata: dict | None = None,
    tools: dict | None = None,
    files: Any = _UNSET,
    task: str | None = None,
    task_body: dict | None = None,
    event_emitter: Any = None,
    event_call: Any = None,
    request: Any = None,
    chat_id: str | None = None,
    message_id: str | None = None,
    session_id: str | None = None,
    oauth_token: Any = None,
    flavour: str | None = None,
    raise_errors: bool = False,
) -> CallResult:
    """Call ``instance.pipe`` the way ``generate_function_chat_completion`` does.

    * ``body`` is shallow-copied and its ``metadata`` key popped (real behaviour); the
      ``metadata`` argument, if given, replaces it.  ``chat_id``, ``message_id``,
      ``session_id``, ``task``, ``task_body`` and ``files`` are written into that metadata
      when given, and the injected values are then read back from it like the real code:
      ``__files__`` = ``metadata.get("files") or []`` (0.12) / ``metadata.get("files",
      [])`` (0.6.28: may be ``None``); ``__task__``/``__task_body__`` only when metadata is
      non-empty.  ``tools`` becomes ``__tools__`` (and ``metadata["tools"]`` in 0.12).
    * ``user``: the flavour's ``UserModel`` or a (partial) dict completed and validated into
      it; ``__user__`` = its ``model_dump()`` plus ``"valves"`` = ``UserValves(**user_valves)``
      (``UserValves()`` if that fails, e.g. ``user_valves=None``) when the class has
      ``UserValves``.
    * Only parameters named in ``inspect.signature(instance.pipe)`` are passed (``**kwargs``
      receives nothing); ``body`` always, by keyword.  ``pipe`` is awaited only if it is a
      coroutine function (as the real ``execute_pipe``).
    * ``raise_errors=True`` re-raises errors raised while consuming the output instead of
      storing them in ``CallResult.exception``.
    """
    flavour = _resolve_flavour(flavour)
    misc = _misc()
    dumps = _dumps(flavour)

    form_data = dict(body)
    md = form_data.pop("metadata", {})
    if metadata is not None:
        md = dict(metadata)
    for key, value in (("chat_id", chat_id), ("message_id", message_id), ("session_id", session_id),
                       ("task", task), ("task_body", task_body)):
        if value is not None:
            md[key] = value
    if files is not _UNSET:
        md["files"] = files
    if tools is not None and flavour == "async":
        md["tools"] = tools

    task_value = md.get("task", None) if md else None
    task_body_value = md.get("task_body", None) if md else None
    if flavour == "async":
        files_value = md.get("files") or []
        tools_value = md.get("tools", {})
    else:
        files_value = md.get("files", [])
        tools_value = tools if tools is not None else {}

    extra_params = {
        "__event_emitter__": event_emitter,
        "__event_call__": event_call,
        "__chat_id__": md.get("chat_id", None),
        "__session_id__": md.get("session_id", None),
        "__message_id__": md.get("message_id", None),
        "__task__": task_value,
        "__task_body__": task_body_value,
        "__files__": files_value,
        "__user__": _user_dump(user, flavour),
        "__metadata__": md,
        "__oauth_token__": oauth_token,
        "__request__": request,
        "__tools__": tools_value,
    }

    _apply_valves(instance, stored_valves, flavour)
    pipe = instance.pipe
    signature = inspect.signature(pipe)
    params = {"body": form_data} | {
        k: v for k, v in extra_params.items() if k in signature.parameters
    }
    if "__user__" in params and hasattr(instance, "UserValves"):
        try:
            params["__user__"]["valves"] = instance.UserValves(**user_valves)
        except Exception as exc:
            log.debug("UserValves(**%r) failed (%s); using defaults", user_valves, exc)
            params["__user__"]["valves"] = instance.UserValves()

    result = CallResult(flavour=flavour, stream=bool(form_data.get("stream", False)), params=params)

    async def execute() -> Any:
        if inspect.iscoroutinefunction(pipe):
            return await pipe(**params)
        return pipe(**params)

    def content_chunk(text: Any) -> dict:
        return misc.openai_chat_chunk_message_template(form_data["model"], text)

    def wrap_line(line: Any) -> str:
        if isinstance(line, BaseModel):
            line = f"data: {line.model_dump_json()}"
        if isinstance(line, dict):
            line = f"data: {dumps(line)}"
        try:
            line = line.decode("utf-8")
        except Exception:
            pass
        if line.startswith("data:"):
            return f"{line}\n\n"
        return f"data: {dumps(content_chunk(line))}\n\n"

    if result.stream:
        frames = result.frames
        try:
            res = await execute()
            result.raw = res
            if _is_streaming_response(res):
                async for data in res.body_iterator:
                    frames.append(data)
                return result
            if isinstance(res, dict):
                frames.append(f"data: {dumps(res)}\n\n")
                return result
        except Exception as exc:
            result.pipe_raised = True
            frames.append(f"data: {dumps({'error': {'detail': str(exc)}})}\n\n")
            return result

        try:
            if isinstance(res, str):
                frames.append(f"data: {dumps(content_chunk(res))}\n\n")
            if isinstance(res, collections.abc.Iterator):
                for line in res:
                    frames.append(wrap_line(line))
            if isinstance(res, collections.abc.AsyncGenerator):
                async for line in res:
                    frames.append(wrap_line(line))
            # 0.12 appends the finish chunk after *any* non-dict, non-StreamingResponse
            # result (even None or a list); 0.6.28 only after str and sync generators.
            if flavour == "async" or isinstance(res, (str, collections.abc.Generator)):
                finish = misc.openai_chat_chunk_message_template(form_data["model"], "")
                finish["choices"][0]["finish_reason"] = "stop"
                frames.append(f"data: {dumps(finish)}\n\n")
                frames.append("data: [DONE]")
        except Exception as exc:
            if raise_errors:
                raise
            result.exception = exc
        return result

    try:
        res = await execute()
        result.raw = res
    except Exception as exc:
        result.pipe_raised = True
        result.response = {"error": {"detail": str(exc)}}
        return result

    if _is_streaming_response(res) or isinstance(res, dict):
        result.response = res
        return result
    if isinstance(res, BaseModel):
        result.response = res.model_dump()
        return result
    try:
        if isinstance(res, str):
            message = res
        elif isinstance(res, collections.abc.Generator):
            message = "".join(map(str, res))  # the str()-join foot-gun, faithfully
        elif isinstance(res, collections.abc.AsyncGenerator):
            message = "".join([str(item) async for item in res])
        else:
            message = None
    except Exception as exc:
        if raise_errors:
            raise
        result.exception = exc
        return result
    result.response = misc.openai_chat_completion_message_template(form_data["model"], message)
    return result
