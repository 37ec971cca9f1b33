"""Local, offline emulator of OpenRouter's HTTP API (``/api/v1``) for tests and benchmarks.

It mimics the wire contract described in ``OPENROUTER_API.md`` and the real captures:
``data:``-only SSE framing, ``sequence_number`` from 0, ``data: [DONE]``, ``gen-…`` ids,
default echo fields in capture key order, ``usage.cost`` from catalogue pricing, error
bodies shaped like OpenRouter's, plus scriptable failures and stream quirks.
Runtime dependencies: stdlib + aiohttp (orjson is used when installed).

Contents
  1. Constants, ids, JSON helpers
  2. Model catalogue                       (GET /models; data in emulator_models.json)
  3. Request inspection                    (last user text, directives, task prompts, tools)
  4. Plans                                 (what one response contains)
  5. Scenario registry                     (name -> handler building a Plan)
  6. Event assembly                        (Plan -> ordered event dicts + final object)
  7. Error bodies                          (HTTP errors with realistic bodies)
  8. SSE writer                            (framing quirks: comments, CRLF, split writes)
  9. Emulator (aiohttp app), EmulatorThread, CLI

Scenario selection for ``POST /responses`` (first match wins):
  1. ``emulator.enqueue(name, **opts)``  -- consumed by the next valid POST /responses
  2. header ``X-Emulator-Scenario: name key=val key2=val2``
  3. directive in the LAST user message: ``[emu:name key=val ...]`` (stripped from the echo)
  4. default: task prompt JSON / tool-result quote / "You said: <last user text>"
Values may be shell-quoted (``text="hello world"``). Unknown names/options -> HTTP 400.

CLI: ``python tools/openrouter_emulator.py [--host H] [--port P] [--extra-models N]
[--api-key K ...]`` prints ``EMULATOR_URL=<base url>`` and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import random
import re
import shlex
import signal
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

try:  # optional speed-up; output is byte-identical in key order and compactness
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


# =========================================================================== 1. constants, ids

API_PREFIX = "/api/v1"
MODELS_FILE = Path(__file__).with_name("emulator_models.json")
UNKNOWN_EVENT_TYPES = ("response.openrouter.unknown_probe",)  # unknown to the SDK on purpose
TERMINAL_TYPES = ("response.completed", "response.incomplete", "response.failed")
ROUTING_VARIANTS = ("nitro", "floor", "online", "exacto", "extended", "thinking")
USER_ID = "user_2emuLAT0R000000000000000000"
EXPOSE = "X-Generation-Id,X-Provider-Name,cf-ray"
PROVIDERS = {"openai": "OpenAI", "anthropic": "Anthropic", "google": "Google AI Studio",
             "deepseek": "DeepSeek", "meta-llama": "DeepInfra", "mistralai": "Mistral"}

_ALNUM = string.ascii_letters + string.digits
_B36 = string.ascii_lowercase + string.digits
_rng = random.SystemRandom()


def _rand(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def new_gen_id() -> str:
    return f"gen-{int(time.time())}-{_rand(_ALNUM, 20)}"


def new_reasoning_id(vendor: str) -> str:
    return "rs_" + _rand("0123456789abcdef", 50) if vendor == "openai" else "rs_tmp_" + _rand(_B36, 11)


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def _ev(etype: str, **fields: Any) -> dict:
    return {"type": etype, **fields}


# =========================================================================== 2. catalogue


@cache
def _catalog_file() -> dict:
    return json.loads(MODELS_FILE.read_text("utf-8"))


def synthetic_model(i: int) -> dict:
    """A generated catalogue row (``synthetic/model-0001`` …) for large-catalogue benchmarks."""
    slug = f"synthetic/model-{i:04d}"
    return {
        "id": slug, "canonical_slug": slug, "hugging_face_id": "",
        "name": f"Synthetic: Model {i:04d}", "created": 1735689600 + i,
        "description": f"Generated catalogue entry number {i} for benchmarks.",
        "context_length": 32768,
        "architecture": {"modality": "text->text", "input_modalities": ["text"],
                         "output_modalities": ["text"], "tokenizer": "Other",
                         "instruct_type": None},
        "pricing": {"prompt": "0.0000001", "completion": "0.0000002"},
        "top_provider": {"context_length": 32768, "max_completion_tokens": 8192,
                         "is_moderated": False},
        "per_request_limits": None,
        "supported_parameters": ["max_tokens", "temperature", "tool_choice", "tools", "top_p"],
        "default_parameters": {}, "supported_voices": None, "knowledge_cutoff": None,
        "expiration_date": None, "links": {"details": f"/api/v1/models/{slug}/endpoints"},
    }


def load_catalog(extra_models: int = 0) -> list[dict]:
    data = _catalog_file()
    rows = [*data["captured"], *data["synthetic"]]
    return json.loads(json.dumps(rows)) + [synthetic_model(i + 1) for i in range(extra_models)]


def filter_models(rows: list[dict], query: Any) -> list[dict]:
    """Apply ``output_modalities`` (default ``text``), ``input_modalities`` and
    ``supported_parameters`` query filters like the real endpoint."""
    out_q = _csv(query.get("output_modalities") or "text")
    if "all" not in out_q:
        rows = [m for m in rows if out_q & set(m["architecture"]["output_modalities"])]
    if in_q := _csv(query.get("input_modalities", "")):
        rows = [m for m in rows if in_q <= set(m["architecture"]["input_modalities"])]
    if params := _csv(query.get("supported_parameters", "")):
        rows = [m for m in rows if params <= set(m["supported_parameters"])]
    return rows


def _csv(value: str) -> set[str]:
    return {v.strip() for v in value.split(",") if v.strip()}


# =========================================================================== 3. request inspection

_DIRECTIVE = re.compile(r"\[emu:([^\]]*)\]")
TASK_ANSWERS = (  # checked in this order; Open WebUI puts the template in a user message
    ("follow_ups", {"follow_ups": ["Tell me more?"]}),
    ("tags", {"tags": ["General"]}),
    ("title", {"title": "Emulated chat title"}),
)


def _part_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _last_user_index(items: list) -> int:
    for i in range(len(items) - 1, -1, -1):
        it = items[i]
        if isinstance(it, dict) and it.get("role") == "user" and it.get("type", "message") == "message":
            return i
    return -1


def last_user_text(inp: Any) -> str:
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list) and (i := _last_user_index(inp)) >= 0:
        return _part_text(inp[i].get("content"))
    return ""


def trailing_tool_outputs(inp: Any) -> list[dict]:
    """``function_call_output`` items after the last user message (the current turn)."""
    if not isinstance(inp, list):
        return []
    start = _last_user_index(inp) + 1
    return [it for it in inp[start:] if isinstance(it, dict)
            and it.get("type") == "function_call_output"]


def input_tokens(body: dict) -> int:
    """Rough native-token estimate: chars/4 per text field plus 8 per item."""
    inp = body.get("input")
    items = [{"content": inp}] if isinstance(inp, str) else (inp or [])
    total = _tokens(body.get("instructions") or "")
    for it in items:
        if not isinstance(it, dict):
            continue
        texts = [_part_text(it.get("content")), _part_text(it.get("output")),
                 str(it.get("arguments") or "")]
        total += 8 + sum(_tokens(t) for t in texts)
    return max(total, 1)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name k=v k2='a b'"`` -> ("name", {"k": "v", "k2": "a b"}); bare words become "1"."""
    parts = shlex.split(spec.strip())
    if not parts:
        return "", {}
    opts = dict(p.split("=", 1) if "=" in p else (p, "1") for p in parts[1:])
    return parts[0], opts


def task_answer(text: str) -> str | None:
    if "### task" not in text.lower():
        return None
    for key, payload in TASK_ANSWERS:
        if f'"{key}"' in text:
            return json.dumps(payload, ensure_ascii=False)
    return None


def tool_result_answer(outputs: list[dict]) -> str:
    lines = []
    for it in outputs:
        out = it.get("output")
        lines.append(f"Tool result for {it.get('call_id')}: {_part_text(out) if isinstance(out, list) else out}")
    return "\n".join(lines)


def word_deltas(text: str) -> list[str]:
    """Split like real tokenised output: words keep their leading whitespace."""
    parts = re.findall(r"\s*\S+\s*$|\s*\S+", text)
    return parts or [text]


def even_deltas(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text)))
    size, rem = divmod(len(text), n)
    out, pos = [], 0
    for i in range(n):
        step = size + (1 if i < rem else 0)
        out.append(text[pos:pos + step])
        pos += step
    return out


@dataclass
class Ctx:
    """Everything a scenario may look at for one request."""

    body: dict
    model_id: str
    entry: dict
    gen_id: str
    created: int
    user_text: str  # last user text with [emu:…] directives removed
    scenario_key: str = ""

    @property
    def vendor(self) -> str:
        return self.model_id.split("/", 1)[0]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def reasoning_cfg(self) -> dict:
        return self.body.get("reasoning") or {}

    @property
    def reasoning_disabled(self) -> bool:
        cfg = self.reasoning_cfg
        return cfg.get("effort") == "none" or cfg.get("enabled") is False

    @property
    def supports_reasoning(self) -> bool:
        return "reasoning" in self.entry or "reasoning" in self.entry["supported_parameters"]

    def function_tools(self) -> list[dict]:
        return [t for t in self.body.get("tools") or [] if t.get("type") == "function"]


# =========================================================================== 4. plans


@dataclass
class Item:
    kind: str  # "reasoning" | "message" | "function_call"
    id: str
    deltas: list[str] = field(default_factory=list)
    style: str = ""  # reasoning: "encrypted" (added->done) | "summary" | "raw"
    name: str = ""
    call_id: str = ""
    annotations: list[dict] = field(default_factory=list)
    status: str = "completed"

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@dataclass
class HttpError:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    status: str = "completed"  # completed | incomplete | failed
    ending: str = "terminal"  # terminal | error_event | truncate | hang
    cut: int | None = None  # stop the (first) message after this many deltas
    error: dict | None = None
    error_type: str | None = None
    error_form: str = "flat"
    done: bool = True  # send ``data: [DONE]``
    http_error: HttpError | None = None
    delay_ms: int = 0
    first_byte_delay_ms: int = 0
    auto_reasoning: bool = True  # prepend reasoning for reasoning-capable models
    annotation_events: bool = False


@dataclass
class Quirks:
    comments: bool = False
    crlf: bool = False
    split: bool = False
    late_reasoning_close: bool = False
    no_completed: bool = False
    no_done: bool = False
    unknown_events: bool = False
    leading: int = 1  # leading ": " comment blocks


class Opts(dict):
    """Scenario options (strings from headers/directives, any type from ``enqueue``)."""

    def get_int(self, key: str, default: int) -> int:
        value = self.get(key)
        return default if value in (None, "") else int(value)

    def get_str(self, key: str, default: str) -> str:
        value = self.get(key)
        return default if value is None else str(value)

    def flag(self, key: str) -> bool:
        return str(self.get(key, "0")).lower() in ("1", "true", "yes", "on")

    def quirks(self) -> Quirks:
        q = Quirks(**{k: self.flag(k) for k in QUIRK_FLAGS})
        q.leading = self.get_int("leading", 1)
        return q


def message(text: str, deltas: int | None = None, status: str = "completed") -> Item:
    parts = even_deltas(text, deltas) if deltas else word_deltas(text)
    return Item("message", "msg_tmp_" + _rand(_B36, 11), parts, status=status)


def reasoning_item(ctx: Ctx, style: str | None = None) -> Item:
    if style is None:
        wants_summary = ctx.reasoning_cfg.get("summary") and ctx.reasoning_cfg.get("effort") != "minimal"
        style = ("summary" if wants_summary else "encrypted") if ctx.vendor == "openai" else "raw"
    text = ("**Pensando na ação** 😀\n\nThe user wrote something; I will answer it directly."
            if style == "summary" else
            "Let me think about this. A ação certa: answer clearly 😀. Done thinking.")
    deltas = [] if style == "encrypted" else even_deltas(text, 3)
    return Item("reasoning", new_reasoning_id(ctx.vendor), deltas, style=style)


def function_call(name: str, args: str) -> Item:
    cut = max(1, len(args) // 2)
    deltas = [args[:cut], args[cut:]] if len(args) > 1 else [args]
    return Item("function_call", "fc_tmp_" + _rand(_B36, 11), deltas, name=name,
                call_id="call_" + _rand(_ALNUM, 24))


# =========================================================================== 5. scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    handler: Callable[[Emulator, Ctx, Opts], Plan]
    options: frozenset[str]


QUIRK_FLAGS = ("comments", "crlf", "split", "late_reasoning_close", "no_completed", "no_done",
               "unknown_events")
COMMON_OPTIONS = frozenset({*QUIRK_FLAGS, "leading", "delay_ms", "first_byte_delay_ms"})
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, *options: str, aliases: tuple[str, ...] = ()):
    def register(fn: Callable[[Emulator, Ctx, Opts], Plan]):
        for n in (name, *aliases):
            SCENARIOS[n] = Scenario(n, fn, COMMON_OPTIONS | set(options))
        return fn

    return register


def _timing(plan: Plan, o: Opts, delay_default: int = 0) -> Plan:
    plan.delay_ms = o.get_int("delay_ms", delay_default)
    plan.first_byte_delay_ms = o.get_int("first_byte_delay_ms", 0)
    return plan


def default_text(ctx: Ctx) -> str:
    if (answer := task_answer(ctx.user_text)) is not None:
        return answer
    if outputs := trailing_tool_outputs(ctx.body.get("input")):
        return tool_result_answer(outputs)
    return f"You said: {ctx.user_text}" if ctx.user_text else "Olá! Ação rápida 😀"


@scenario("default")
def sc_default(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return _timing(Plan([message(default_text(ctx))]), o)


@scenario("text", "deltas", "text")
def sc_text(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    text = o.get_str("text", default_text(ctx))
    return _timing(Plan([message(text, o.get_int("deltas", 0) or None)]), o)


@scenario("slow", "deltas", "text")
def sc_slow(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return _timing(sc_text(emu, ctx, o), o, delay_default=200)


@scenario("flood", "deltas")
def sc_flood(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    n = o.get_int("deltas", 20000)
    text = "".join("ação 😀"[i % 6] for i in range(n))
    item = Item("message", "msg_tmp_" + _rand(_B36, 11), list(text))
    return _timing(Plan([item], auto_reasoning=False), o)


@scenario("reasoning", "style", "text")
def sc_reasoning(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    style = o.get("style")
    if style not in (None, "summary", "raw"):
        raise ScenarioError(f"reasoning style must be summary|raw, got {style!r}")
    items = [reasoning_item(ctx, style), message(o.get_str("text", default_text(ctx)))]
    return _timing(Plan(items, auto_reasoning=False), o)


@scenario("tool_call", "name", "args", "n")
def sc_tool_call(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    tools = ctx.function_tools()
    name = o.get_str("name", tools[0]["name"] if tools else "get_weather")
    args = o.get_str("args", '{"city":"São Paulo"}')
    items = [function_call(name, args) for _ in range(o.get_int("n", 1))]
    return _timing(Plan(items), o)


WEB_TEXT = ("Lisboa é a capital de Portugal 😀 [wikipedia.org](https://en.wikipedia.org/wiki/Lisbon). "
            "A população ronda 550 mil [example.org](https://example.org/lisboa).")


def url_citations(text: str) -> list[dict]:
    cites = []
    for m in re.finditer(r"\[([^\]]+)\]\((https?://[^)]+)\)", text):
        cites.append({"type": "url_citation", "url": m.group(2), "title": f"Source: {m.group(1)}",
                      "start_index": m.start(), "end_index": m.end(),
                      "content": "Excerpt from the cited page about Lisboa."})
    return cites


@scenario("web_search", "annotation_events")
def sc_web_search(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    item = message(WEB_TEXT)
    item.annotations = url_citations(WEB_TEXT)
    return _timing(Plan([item], annotation_events=o.flag("annotation_events")), o)


@scenario("incomplete", "text", "deltas")
def sc_incomplete(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    text = o.get_str("text", "This answer was cut short by max_output_tokens — ação 😀 and")
    item = message(text, o.get_int("deltas", 0) or None, status="incomplete")
    return _timing(Plan([item], status="incomplete"), o)


@scenario("http_error", "status", "retry_after")
def sc_http_error(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    retry = o.get("retry_after")
    return Plan(http_error=error_response(o.get_int("status", 500), ctx.model_id, retry))


@scenario("fail_then_ok", "status", "times", "retry_after", "key")
def sc_fail_then_ok(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    key = o.get_str("key", ctx.scenario_key)
    emu.fail_counts[key] = emu.fail_counts.get(key, 0) + 1
    if emu.fail_counts[key] <= o.get_int("times", 1):
        status = o.get_int("status", 503)
        return Plan(http_error=error_response(status, ctx.model_id, o.get("retry_after")))
    return sc_default(emu, ctx, o)


def _partial(ctx: Ctx, o: Opts, ending: str, status: str = "failed") -> Plan:
    after = o.get_int("after", 2)
    text = "Partial answer — ação 😀 before the provider went away, sorry about that."
    plan = _timing(Plan([message(text, max(after + 2, 6))], status=status, ending=ending), o)
    plan.cut = after
    plan.error = {"code": "server_error",
                  "message": o.get_str("message", "Provider disconnected unexpectedly")}
    plan.error_type = o.get_str("error_type", "provider_unavailable")
    return plan


@scenario("mid_stream_failure", "after", "error_type", "message")
def sc_mid_stream_failure(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return _partial(ctx, o, "terminal")


@scenario("failed_200", "after", "error_type", "message")
def sc_failed_200(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    plan = _partial(ctx, o, "terminal")
    plan.error = {"code": "server_error", "message": o.get_str("message", "stream closed with reason: error")}
    plan.error_type = o.get_str("error_type", "server")
    return plan


@scenario("error_event", "form", "after", "done", "message")
def sc_error_event(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    plan = _partial(ctx, o, "error_event")
    plan.error_form = o.get_str("form", "flat")
    if plan.error_form not in ("flat", "nested"):
        raise ScenarioError("error_event form must be flat|nested")
    plan.done = o.flag("done")
    return plan


@scenario("truncate", "after")
def sc_truncate(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    plan = _partial(ctx, o, "truncate")
    plan.done = False
    return plan


@scenario("hang")
def sc_hang(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return _timing(Plan(ending="hang", auto_reasoning=False), o)


class ScenarioError(ValueError):
    """Bad scenario name/options: reported to the client as an emulator 400."""


def add_reasoning(ctx: Ctx, plan: Plan) -> None:
    """Models that reason (unless the request disabled it) think before answering."""
    if plan.auto_reasoning and plan.items and ctx.supports_reasoning and not ctx.reasoning_disabled:
        plan.items.insert(0, reasoning_item(ctx))


# =========================================================================== 6. event assembly


def _strict_tools(tools: list[dict]) -> list[dict]:
    out = []
    for t in tools:
        if t.get("type") == "function":
            keys = ("type", "name", "description", "parameters")
            t = {**{k: t[k] for k in keys if k in t}, "strict": t.get("strict"),
                 **{k: v for k, v in t.items() if k not in (*keys, "strict")}}
        out.append(t)
    return out


def _or(body: dict, key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def envelope(ctx: Ctx, status: str, output: list, usage: dict | None, *, final: bool,
             error: dict | None = None, error_type: str | None = None,
             incomplete: dict | None = None) -> dict:
    """Response object with the default echoes, in the live key order (§3.1/§4.1)."""
    b = ctx.body
    text = {"format": {"type": "text"}, **(b.get("text") or {})}
    r: dict[str, Any] = {
        "id": ctx.gen_id, "object": "response", "created_at": ctx.created, "model": ctx.model_id,
        "status": status, "completed_at": int(time.time()) if final and status == "completed" else None,
        "output": output, "error": error}
    if error_type:
        r["error_type"] = error_type
    r |= {"incomplete_details": incomplete, "tools": _strict_tools(b.get("tools") or []),
          "tool_choice": _or(b, "tool_choice", "auto"),
          "parallel_tool_calls": _or(b, "parallel_tool_calls", True),
          "max_output_tokens": b.get("max_output_tokens"), "temperature": _or(b, "temperature", 1),
          "top_p": _or(b, "top_p", 1), "presence_penalty": _or(b, "presence_penalty", 0),
          "frequency_penalty": _or(b, "frequency_penalty", 0),
          "top_logprobs": _or(b, "top_logprobs", 0), "max_tool_calls": b.get("max_tool_calls"),
          "metadata": _or(b, "metadata", {}), "background": False, "previous_response_id": None,
          "service_tier": "default" if final else "auto",
          "truncation": _or(b, "truncation", "disabled"), "store": False,
          "instructions": b.get("instructions"), "text": text, "reasoning": b.get("reasoning"),
          "safety_identifier": b.get("safety_identifier"),
          "prompt_cache_key": b.get("prompt_cache_key"),
          "prompt_cache_options": b.get("prompt_cache_options"), "usage": usage}
    return r


def usage_for(ctx: Ctx, items: list[Item]) -> dict:
    reasoning = sum(_tokens(i.text) or 24 for i in items if i.kind == "reasoning")
    visible = sum(_tokens(i.text) for i in items if i.kind != "reasoning")
    inp, out = input_tokens(ctx.body), visible + reasoning
    price = ctx.entry["pricing"]
    cin, cout = Decimal(price["prompt"]) * inp, Decimal(price["completion"]) * out
    cost = float(cin + cout)
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inp + out, "cost": cost, "is_byok": False,
            "cost_details": {"upstream_inference_cost": cost,
                             "upstream_inference_input_cost": float(cin),
                             "upstream_inference_output_cost": float(cout)}}


@dataclass
class ItemEvents:
    opening: list[dict]
    closing: list[dict]
    final: dict
    stopped: bool = False


def _encrypted(ctx: Ctx) -> str:
    slug = base64.urlsafe_b64encode(json.dumps(
        {"endpoint_slug": f"{ctx.entry['canonical_slug']}|{ctx.vendor}"}).encode()).decode().rstrip("=")
    return "gAAAAAB" + _rand(_ALNUM + "-_", 120) + "=." + slug


def reasoning_events(ctx: Ctx, idx: int, it: Item, cut: int | None) -> ItemEvents:
    ref = {"output_index": idx, "item_id": it.id}
    added = _ev("response.output_item.added", output_index=idx,
                item={"id": it.id, "type": "reasoning", "status": "in_progress", "summary": []})
    done_item: dict[str, Any] = {"id": it.id, "type": "reasoning", "status": "completed", "summary": []}
    opening, closing = [added], []
    if it.style == "summary":
        part = {"type": "summary_text", "text": it.text}
        opening += [_ev("response.reasoning_summary_part.added", **ref, summary_index=0,
                        part={"type": "summary_text", "text": ""})]
        opening += [_ev("response.reasoning_summary_text.delta", **ref, summary_index=0, delta=d)
                    for d in it.deltas]
        closing += [_ev("response.reasoning_summary_text.done", **ref, summary_index=0, text=it.text),
                    _ev("response.reasoning_summary_part.done", **ref, summary_index=0, part=part)]
        done_item["summary"] = [part]
    elif it.style == "raw":
        part = {"type": "reasoning_text", "text": it.text}
        opening += [_ev("response.content_part.added", **ref, content_index=0,
                        part={"type": "reasoning_text", "text": ""})]
        opening += [_ev("response.reasoning_text.delta", **ref, content_index=0, delta=d)
                    for d in it.deltas]
        closing += [_ev("response.reasoning_text.done", **ref, content_index=0, text=it.text),
                    _ev("response.content_part.done", **ref, content_index=0, part=part)]
        done_item["content"] = [part]
    done_item |= _reasoning_provenance(ctx, it)
    closing.append(_ev("response.output_item.done", output_index=idx, item=done_item))
    return ItemEvents(opening, closing, done_item)


def _reasoning_provenance(ctx: Ctx, it: Item) -> dict:
    if ctx.vendor == "openai":
        return {"encrypted_content": _encrypted(ctx), "format": "openai-responses-v1"}
    if ctx.vendor == "anthropic":
        return {"encrypted_content": None, "format": "anthropic-claude-v1",
                "signature": "Er" + _rand(_ALNUM, 86) + "=="}
    if ctx.vendor == "google":
        return {"format": "google-gemini-v1"}
    return {}


def message_events(ctx: Ctx, idx: int, it: Item, cut: int | None, annotation_events: bool = False
                   ) -> ItemEvents:
    ref = {"output_index": idx, "item_id": it.id, "content_index": 0}
    opening = [
        _ev("response.output_item.added", output_index=idx,
            item={"id": it.id, "type": "message", "status": "in_progress", "role": "assistant",
                  "content": []}),
        _ev("response.content_part.added", **ref,
            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]
    deltas = it.deltas if cut is None else it.deltas[:cut]
    opening += [_ev("response.output_text.delta", **ref, delta=d, logprobs=[]) for d in deltas]
    text = "".join(deltas)
    annotations = it.annotations if cut is None else []
    part = {"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}
    status = "incomplete" if cut is not None else it.status
    final = {"id": it.id, "type": "message", "role": "assistant", "status": status, "content": [part]}
    if cut is not None:
        return ItemEvents(opening, [], final, stopped=True)
    if annotation_events:
        opening += [_ev("response.output_text.annotation.added", **ref, annotation_index=i,
                        annotation=a) for i, a in enumerate(annotations)]
    closing = [
        _ev("response.output_text.done", **ref, text=text, logprobs=[]),
        _ev("response.content_part.done", **ref, part=part),
        _ev("response.output_item.done", output_index=idx,
            item={"id": it.id, "type": "message", "status": status, "role": "assistant",
                  "content": [part]})]
    return ItemEvents(opening, closing, final)


def function_call_events(ctx: Ctx, idx: int, it: Item, cut: int | None) -> ItemEvents:
    base = {"id": it.id, "type": "function_call"}
    opening = [_ev("response.output_item.added", output_index=idx,
                   item={**base, "status": "in_progress", "call_id": it.call_id, "name": it.name,
                         "arguments": ""})]
    opening += [_ev("response.function_call_arguments.delta", output_index=idx, item_id=it.id,
                    delta=d) for d in it.deltas]
    final = {**base, "status": "completed", "call_id": it.call_id, "name": it.name,
             "arguments": it.text}
    closing = [_ev("response.function_call_arguments.done", output_index=idx, item_id=it.id,
                   name=it.name, arguments=it.text),
               _ev("response.output_item.done", output_index=idx, item=final)]
    return ItemEvents(opening, closing, final)


def assemble(ctx: Ctx, plan: Plan, q: Quirks) -> tuple[list[dict], dict]:
    """Return (events without sequence numbers, final response object) for a plan."""
    snapshot = envelope(ctx, "in_progress", [], None, final=False)
    events = [_ev("response.created", response=snapshot),
              _ev("response.in_progress", response=snapshot)]
    outputs, held, cut = [], [], plan.cut
    for idx, it in enumerate(plan.items):
        if it.kind == "message":
            ie = message_events(ctx, idx, it, cut, plan.annotation_events)
        elif it.kind == "reasoning":
            ie = reasoning_events(ctx, idx, it, None)
        else:
            ie = function_call_events(ctx, idx, it, None)
        events += ie.opening
        (held if q.late_reasoning_close and it.kind == "reasoning" else events).extend(ie.closing)
        outputs.append(ie.final)
        if ie.stopped:
            break
    events += held
    final = final_object(ctx, plan, outputs)
    events += ending_events(plan, final)
    return apply_event_quirks(events, q), final


def final_object(ctx: Ctx, plan: Plan, outputs: list[dict]) -> dict:
    if plan.status == "incomplete":
        return envelope(ctx, "incomplete", outputs, usage_for(ctx, plan.items), final=True,
                        incomplete={"reason": "max_output_tokens"})
    if plan.status == "failed" or plan.ending != "terminal":
        error = plan.error or {"code": "server_error", "message": "Internal Server Error"}
        return envelope(ctx, "failed", outputs, None, final=True, error=error,
                        error_type=plan.error_type or "server")
    return envelope(ctx, "completed", outputs, usage_for(ctx, plan.items), final=True)


def ending_events(plan: Plan, final: dict) -> list[dict]:
    if plan.ending == "terminal":
        return [_ev(f"response.{final['status']}", response=final)]
    if plan.ending == "error_event":
        err = final["error"]
        if plan.error_form == "nested":
            return [_ev("error", error={"code": err["code"], "message": err["message"]})]
        return [_ev("error", code=err["code"], message=err["message"], param=None)]
    return []  # truncate


def apply_event_quirks(events: list[dict], q: Quirks) -> list[dict]:
    if q.no_completed:
        events = [e for e in events if e["type"] not in TERMINAL_TYPES]
    if q.unknown_events:
        fusion = _ev("response.fusion_call.in_progress", output_index=0,
                     item_id="fusion_tmp_" + _rand(_B36, 11))
        probe = _ev(UNKNOWN_EVENT_TYPES[0], note="forward-compatibility probe")
        events = [*events[:2], fusion, *events[2:]]
        pos = len(events) - (1 if events[-1]["type"] in TERMINAL_TYPES else 0)
        events.insert(pos, probe)
    return events


# =========================================================================== 7. error bodies


def _err(code: int, message: str, **extra: Any) -> dict:
    return {"error": {"code": code, "message": message, **extra}, "user_id": USER_ID}


def _provider_error(code: int, raw: str, provider: str) -> dict:
    return _err(code, "Provider returned error",
                metadata={"raw": raw, "provider_name": provider, "is_byok": False})


ERROR_BODIES: dict[int, Callable[[str], dict]] = {
    400: lambda m: _provider_error(400, '{"error":{"message":"at most 64 tools are allowed"}}', "OpenAI"),
    401: lambda m: {"error": {"message": "User not found.", "code": 401}},
    402: lambda m: _err(402, "Insufficient credits. Add more using https://openrouter.ai/settings/credits"),
    403: lambda m: _err(403, f'{m} requires moderation on OpenAI. Your input was flagged for "harassment".',
                        metadata={"reasons": ["harassment"], "flagged_input": "you are the worst ... go away",
                                  "provider_name": "OpenAI", "model_slug": m}),
    404: lambda m: _err(404, f"No endpoints found for {m}."),
    408: lambda m: _err(408, "Operation timed out. Please try again later."),
    413: lambda m: _err(413, "Request payload too large.", metadata={"error_type": "payload_too_large"}),
    429: lambda m: _err(429, "Rate limit exceeded: free-models-per-min. ",
                        metadata={"headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
                                              "X-RateLimit-Reset": str(_next_minute_ms())}}),
    500: lambda m: _err(500, "Internal Server Error"),
    502: lambda m: _provider_error(502, "upstream connect error or disconnect/reset before headers",
                                   "ExampleCloud"),
    503: lambda m: _err(503, f"All providers for {m} are temporarily unavailable.",
                        error_type="provider_overloaded", http_status=503,
                        availability={"code": "temporarily_unavailable", "retryable": True,
                                      "requested_models": [m], "affected_providers": ["example-cloud"],
                                      "docs_url": "https://openrouter.ai/docs/errors#temporarily_unavailable"},
                        metadata={"previous_errors": [{"provider": "example-cloud", "code": "overloaded",
                                                       "status": 503}]}),
    524: lambda m: _err(524, "Request timed out. Please try again later."),
    529: lambda m: _provider_error(
        529, '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "Anthropic"),
}


def _next_minute_ms() -> int:
    return (int(time.time()) // 60 + 1) * 60_000


def error_response(status: int, model: str, retry_after: Any = None) -> HttpError:
    if status not in ERROR_BODIES:
        raise ScenarioError(f"http_error status {status} not supported: {sorted(ERROR_BODIES)}")
    body, headers = ERROR_BODIES[status](model), {}
    if status == 429:
        retry_after = 1 if retry_after is None else retry_after
        headers |= body["error"]["metadata"]["headers"]
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
        if status == 503:
            body["error"]["availability"]["retry_after"] = int(retry_after)
    return HttpError(status, body, headers)


def validation_error(body: Any, catalog: dict[str, dict]) -> HttpError | None:
    """Request checks done by the real server before anything is generated."""
    if not isinstance(body, dict):
        return HttpError(400, _err(400, "Request body must be a JSON object"))
    if "input" not in body or body["input"] is None:
        return HttpError(400, _err(400, 'Missing required parameter: "input"'))
    if body.get("store") is True:
        return HttpError(400, _err(400, "store: true is not supported: the Responses API is stateless; "
                                        "set store to false or omit it"))
    if body.get("previous_response_id") is not None:
        return HttpError(400, _err(400, "previous_response_id is not supported: the Responses API is "
                                        "stateless; send the full conversation in input"))
    model = body.get("model")
    entry = lookup_model(catalog, model) if isinstance(model, str) else None
    if entry is None:
        return HttpError(400, _err(400, f"{model} is not a valid model ID", error_type="invalid_request",
                                   http_status=400, availability={
                                       "code": "model_not_found", "retryable": False,
                                       "requested_models": [model],
                                       "docs_url": "https://openrouter.ai/docs/errors#model_not_found"}))
    cfg = body.get("reasoning") or {}
    if (entry.get("reasoning") or {}).get("mandatory") and (
            cfg.get("effort") == "none" or cfg.get("enabled") is False):
        return HttpError(400, _err(400, "Reasoning is mandatory for this endpoint and cannot be disabled."))
    return None


def lookup_model(catalog: dict[str, dict], model_id: str) -> dict | None:
    if model_id in catalog:
        return catalog[model_id]
    base, _, variant = model_id.partition(":")
    return catalog.get(base) if variant in ROUTING_VARIANTS else None


def _json_response(status: int, payload: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=dumps(payload), content_type="application/json",
                        headers={"Access-Control-Expose-Headers": EXPOSE, **(headers or {})})


# =========================================================================== 8. SSE writer


class SSEWriter:
    """Frames events as ``data: <json>\\n\\n`` with optional quirks; numbers events from 0."""

    FLUSH_AT = 64 * 1024

    def __init__(self, resp: web.StreamResponse, q: Quirks):
        self.resp, self.q, self.seq, self.buf = resp, q, 0, bytearray()

    async def event(self, ev: dict) -> None:
        ev["sequence_number"] = self.seq
        self.seq += 1
        await self._frame(b"data: " + dumps(ev) + b"\n\n")
        if self.q.comments:
            await self.comment("OPENROUTER PROCESSING")

    async def comment(self, text: str = "") -> None:
        await self._frame(f": {text}\n\n".encode())

    async def done(self) -> None:
        await self._frame(b"data: [DONE]\n\n")

    async def _frame(self, data: bytes) -> None:
        if self.q.crlf:
            data = data.replace(b"\n", b"\r\n")
        if not self.q.split:
            self.buf += data
            if len(self.buf) >= self.FLUSH_AT:
                await self.flush()
            return
        await self.flush()
        for piece in split_points(data):
            await self.resp.write(piece)
            await asyncio.sleep(0.001)

    async def flush(self) -> None:
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            await self.resp.write(data)


def split_points(data: bytes) -> list[bytes]:
    """Cut a frame in 3+ pieces: inside the JSON and inside a multi-byte UTF-8 char if any."""
    cuts = {len(data) // 3, 2 * len(data) // 3}
    multibyte = next((i for i, b in enumerate(data) if b >= 0xC0), None)
    if multibyte is not None:
        cuts.add(multibyte + 1)
    cuts = sorted(c for c in cuts if 0 < c < len(data))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# =========================================================================== 9. emulator


class Emulator:
    """aiohttp server faithful to OpenRouter's ``/api/v1`` (see module docstring)."""

    def __init__(self, *, extra_models: int = 0, api_keys: set[str] | None = None):
        self.models = load_catalog(extra_models)
        self.catalog = {m["id"]: m for m in self.models}
        self.api_keys = set(api_keys) if api_keys else None
        self.requests: list[dict] = []
        self.disconnects: list[float] = []
        self.active_streams = 0
        self.fail_counts: dict[str, int] = {}
        self.generations: dict[str, dict] = {}
        self.base_url = ""
        self._queue: list[tuple[str, dict]] = []
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle / API
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, shutdown_timeout=2.0,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.base_url = f"http://{host}:{bound[1]}{API_PREFIX}"
        return self.base_url

    async def stop(self) -> None:
        if self._closing:
            self._closing.set()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def enqueue(self, name: str, **opts: Any) -> None:
        """Use scenario ``name`` for the next valid ``POST /responses``."""
        self._queue.append((name, opts))

    def reset(self) -> None:
        self.requests.clear()
        self.disconnects.clear()
        self.fail_counts.clear()
        self.generations.clear()
        self._queue.clear()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        p = API_PREFIX
        app.router.add_get(f"{p}/models", self._get_models)
        app.router.add_get(f"{p}/key", self._get_key)
        app.router.add_get(f"{p}/generation", self._get_generation)
        app.router.add_post(f"{p}/responses", self._post_responses)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    # ------------------------------------------------------------------ simple endpoints
    def _record(self, request: web.Request, body: Any = None) -> dict:
        rec = {"path": request.path, "method": request.method, "headers": dict(request.headers),
               "json": body, "scenario": None, "time": time.time()}
        self.requests.append(rec)
        return rec

    def _auth_error(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            return _json_response(401, {"error": {"message": "No auth credentials found", "code": 401}})
        if self.api_keys is not None and key not in self.api_keys:
            return _json_response(401, {"error": {"message": "User not found.", "code": 401}})
        return None

    async def _not_found(self, request: web.Request) -> web.Response:
        self._record(request)
        return _json_response(404, {"error": {"code": 404, "message": "Resource not found"}})

    async def _get_models(self, request: web.Request) -> web.Response:
        self._record(request)
        rows = filter_models(self.models, request.query)
        return _json_response(200, {"data": rows, "total_count": len(rows), "links": {"next": None}},
                              {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"})

    async def _get_key(self, request: web.Request) -> web.Response:
        self._record(request)
        if err := self._auth_error(request):
            return err
        key = request.headers["Authorization"][7:].strip()
        spent = round(sum(g["total_cost"] for g in self.generations.values()), 10)
        return _json_response(200, {"data": {
            "label": f"{key[:11]}...{key[-3:]}", "limit": None, "limit_remaining": None,
            "limit_reset": None, "include_byok_in_limit": False, "usage": spent, "usage_daily": spent,
            "usage_weekly": spent, "usage_monthly": spent, "byok_usage": 0, "byok_usage_daily": 0,
            "byok_usage_weekly": 0, "byok_usage_monthly": 0, "is_free_tier": False,
            "is_management_key": False, "is_provisioning_key": False, "creator_user_id": USER_ID,
            "expires_at": None, "rate_limit": {"requests": -1, "interval": "10s",
                                               "note": "This field is deprecated and safe to ignore."}}})

    async def _get_generation(self, request: web.Request) -> web.Response:
        self._record(request)
        if err := self._auth_error(request):
            return err
        gen = self.generations.get(request.query.get("id", ""))
        if gen is None:
            return _json_response(404, _err(404, "Generation not found"))
        return _json_response(200, {"data": gen})

    def _remember(self, ctx: Ctx, final: dict, streamed: bool, cancelled: bool = False) -> None:
        usage = final.get("usage") or {}
        cost = usage.get("cost", 0)
        finish = {"completed": "stop", "incomplete": "length"}.get(final["status"], "error")
        self.generations[ctx.gen_id] = {
            "id": ctx.gen_id, "upstream_id": "chatcmpl-" + _rand(_ALNUM, 24), "total_cost": cost,
            "usage": cost, "cache_discount": None, "upstream_inference_cost": None,
            "created_at": datetime.fromtimestamp(ctx.created, UTC).isoformat(),
            "model": ctx.model_id, "provider_name": PROVIDERS.get(ctx.vendor, "Emulator"),
            "api_type": "responses", "streamed": streamed, "cancelled": cancelled,
            "latency": 5, "generation_time": 5, "moderation_latency": None,
            "finish_reason": finish, "native_finish_reason": finish,
            "tokens_prompt": usage.get("input_tokens", 0),
            "tokens_completion": usage.get("output_tokens", 0),
            "native_tokens_prompt": usage.get("input_tokens", 0),
            "native_tokens_completion": usage.get("output_tokens", 0),
            "native_tokens_reasoning": (usage.get("output_tokens_details") or {}).get("reasoning_tokens", 0),
            "native_tokens_cached": 0, "num_media_prompt": 0, "num_search_results": 0,
            "is_byok": False, "external_user": ctx.body.get("user"),
            "session_id": ctx.body.get("session_id"), "router": None, "service_tier": "default"}

    # ------------------------------------------------------------------ POST /responses
    async def _post_responses(self, request: web.Request) -> web.StreamResponse:
        rec = self._record(request)
        if err := self._auth_error(request):
            return err
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _json_response(400, _err(400, "Invalid JSON in request body"))
        rec["json"] = body
        if err := validation_error(body, self.catalog):
            return _json_response(err.status, err.body, err.headers)
        ctx, (name, opts) = self._context(request, body)
        rec["scenario"] = name
        try:
            plan, quirks = self._plan(ctx, name, opts)
        except (ScenarioError, ValueError) as exc:
            return _json_response(400, _err(400, f"[emulator] {exc}"))
        if plan.http_error:
            e = plan.http_error
            return _json_response(e.status, e.body, e.headers)
        if plan.first_byte_delay_ms:
            await asyncio.sleep(plan.first_byte_delay_ms / 1000)
        if ctx.stream:
            return await self._stream(request, ctx, plan, quirks)
        return await self._respond(request, ctx, plan, quirks)

    def _context(self, request: web.Request, body: dict) -> tuple[Ctx, tuple[str, dict]]:
        raw_text = last_user_text(body.get("input"))
        directive = _DIRECTIVE.search(raw_text)
        header = request.headers.get("X-Emulator-Scenario", "")
        if self._queue:
            spec = self._queue.pop(0)
        elif header.strip():
            spec = parse_spec(header)
        elif directive:
            spec = parse_spec(directive.group(1))
        else:
            spec = ("default", {})
        text = _DIRECTIVE.sub("", raw_text).strip()
        model_id = body["model"]
        ctx = Ctx(body, model_id, lookup_model(self.catalog, model_id) or {}, new_gen_id(),
                  int(time.time()), text, scenario_key=f"{model_id}|{header}|{raw_text}")
        return ctx, spec

    def _plan(self, ctx: Ctx, name: str, opts: dict) -> tuple[Plan, Quirks]:
        sc = SCENARIOS.get(name)
        if sc is None:
            raise ScenarioError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}")
        if unknown := set(opts) - sc.options:
            raise ScenarioError(f"unknown option(s) {sorted(unknown)} for scenario {name!r}")
        o = Opts(opts)
        plan = sc.handler(self, ctx, o)
        add_reasoning(ctx, plan)
        return plan, o.quirks()

    def _headers(self, ctx: Ctx, content_type: str) -> dict[str, str]:
        return {"Content-Type": content_type, "X-Generation-Id": ctx.gen_id,
                "Access-Control-Expose-Headers": EXPOSE, "Access-Control-Allow-Origin": "*"}

    async def _respond(self, request: web.Request, ctx: Ctx, plan: Plan, q: Quirks
                       ) -> web.StreamResponse:
        if plan.ending == "hang":
            await self._wait_for_disconnect()
            return _json_response(524, _err(524, "Request timed out. Please try again later."))
        _, final = assemble(ctx, plan, q)
        self._remember(ctx, final, streamed=False)
        body = dumps(final)
        if plan.ending != "truncate":
            return web.Response(status=200, body=body, headers=self._headers(ctx, "application/json"))
        resp = web.StreamResponse(status=200, headers=self._headers(ctx, "application/json"))
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()
        return resp

    async def _wait_for_disconnect(self) -> None:
        try:
            assert self._closing is not None
            await self._closing.wait()
        except asyncio.CancelledError:
            self.disconnects.append(time.time())
            raise

    async def _stream(self, request: web.Request, ctx: Ctx, plan: Plan, q: Quirks
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={
            **self._headers(ctx, "text/event-stream"), "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.active_streams += 1
        writer = SSEWriter(resp, q)
        try:
            if plan.ending == "hang":
                await writer.comment("OPENROUTER PROCESSING")
                await writer.flush()
                await self._wait_for_disconnect()
                return resp
            await self._write_events(ctx, plan, q, writer)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            if plan.ending != "hang":
                self.disconnects.append(time.time())
                self._remember_cancel(ctx)
            raise
        finally:
            self.active_streams -= 1
        return resp

    async def _write_events(self, ctx: Ctx, plan: Plan, q: Quirks, writer: SSEWriter) -> None:
        events, final = assemble(ctx, plan, q)
        self._remember(ctx, final, streamed=True)
        for _ in range(q.leading):
            await writer.comment()
        for i, ev in enumerate(events):
            if plan.delay_ms and i:
                await writer.flush()
                await asyncio.sleep(plan.delay_ms / 1000)
            await writer.event(ev)
        if plan.done and not q.no_done:
            await writer.done()
        await writer.flush()

    def _remember_cancel(self, ctx: Ctx) -> None:
        if ctx.gen_id in self.generations:
            self.generations[ctx.gen_id]["cancelled"] = True


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class EmulatorThread:
    """Runs an :class:`Emulator` on its own event loop in a daemon thread (sync callers)."""

    def __init__(self, *, extra_models: int = 0, api_keys: set[str] | None = None):
        self.emulator = Emulator(extra_models=extra_models, api_keys=api_keys)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def _run(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        assert self._loop is not None, "EmulatorThread not started"
        return asyncio.run_coroutine_threadsafe(_call(fn), self._loop).result(timeout)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openrouter-emulator",
                                        daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self.emulator.start(host, port), self._loop)
        self.base_url = fut.result(30)
        return self.base_url

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.emulator.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def enqueue(self, name: str, **opts: Any) -> None:
        self._run(lambda: self.emulator.enqueue(name, **opts))

    def reset(self) -> None:
        self._run(self.emulator.reset)

    @property
    def requests(self) -> list[dict]:
        return self._run(lambda: list(self.emulator.requests))

    @property
    def disconnects(self) -> list[float]:
        return self._run(lambda: list(self.emulator.disconnects))

    @property
    def active_streams(self) -> int:
        return self._run(lambda: self.emulator.active_streams)


# =========================================================================== CLI


async def _serve(args: argparse.Namespace) -> None:
    emu = Emulator(extra_models=args.extra_models, api_keys=set(args.api_key) or None)
    url = await emu.start(args.host, args.port)
    print(f"EMULATOR_URL={url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await emu.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Local OpenRouter API emulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--extra-models", type=int, default=0)
    ap.add_argument("--api-key", action="append", default=[], help="allow-listed key (repeatable)")
    asyncio.run(_serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
