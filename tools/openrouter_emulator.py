"""Local, offline emulator of OpenRouter's HTTP API (``/api/v1``) for tests and benchmarks.

Mimics the wire contract of ``OPENROUTER_API.md`` and the real captures: ``data:``-only SSE
framing, ``sequence_number`` from 0, ``data: [DONE]``, ``gen-…`` ids, default echo fields in
capture key order, ``usage.cost`` from catalogue pricing, OpenRouter-shaped error bodies, plus
scriptable failures and stream quirks.  Runtime deps: stdlib + aiohttp (orjson if installed).

Contents
  1. Constants, ids, JSON helpers
  2. Model catalogue        GET /models; rows live in emulator_models.json
  3. Request inspection     last user text, [emu:…] directives, task prompts, tool outputs
  4. Plans                  what one response contains (items, status, ending, timing)
  5. Scenario registry      SCENARIOS: name -> handler building a Plan
  6. Event assembly         Plan -> ordered event dicts + final response object
  7. Errors & validation    HTTP error bodies, request checks
  8. SSE writer             framing quirks: comments, CRLF, split writes
  9a. Keys & credits       GET /key, /credits; POST/GET/PATCH/DELETE /keys (issue #13)
  9. Emulator               aiohttp app, observability, EmulatorThread, CLI
 10. Routing (issue #12)    provider filters, `models` fallback, routers/aliases/presets,
                            prompt cache, router metadata, availability and free limits

Scenario selection for ``POST /responses`` (first match wins):
  1. ``emulator.enqueue(name, **opts)``   consumed by the next valid POST /responses
  2. header ``X-Emulator-Scenario: name key=val key2=val2``
  3. directive in the LAST user message: ``[emu:name key=val …]`` (stripped from the echo)
  4. ``default``: task-prompt JSON / tool-result quote / "You said: <last user text>"
Values may be shell-quoted (``text="hello world"``); unknown names or options -> HTTP 400.
Every scenario also takes the timing options ``delay_ms`` / ``first_byte_delay_ms`` /
``tail_delay_ms`` (a pause between the terminal event and ``[DONE]``, as when the tail
arrives in a later TCP segment) and the
stream quirks ``comments crlf split late_reasoning_close no_completed no_done unknown_events``
(flags: ``=1``) and ``leading=N`` (leading ``: `` comment blocks, default 1).

CLI: ``python tools/openrouter_emulator.py [--host H] [--port P] [--extra-models N]
[--api-key K …]`` prints ``EMULATOR_URL=<base url>`` and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import hashlib
import itertools
import json
import math
import random
import re
import shlex
import signal
import string
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

try:  # optional speed-up; same compact output and key order as the json fallback
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

_ALNUM = string.ascii_letters + string.digits
_B36 = string.ascii_lowercase + string.digits
_rng = random.SystemRandom()


def _rand(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def new_gen_id() -> str:
    return f"gen-{int(time.time())}-{_rand(_ALNUM, 20)}"


def new_reasoning_id(vendor: str) -> str:
    if vendor == "openai":  # upstream OpenAI ids pass through
        return "rs_" + _rand("0123456789abcdef", 50)
    return "rs_tmp_" + _rand(_B36, 11)


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def _ev(etype: str, **fields: Any) -> dict:
    return {"type": etype, **fields}


# =========================================================================== 2. catalogue


@cache
def _catalog_file() -> dict:
    return json.loads(MODELS_FILE.read_text("utf-8"))


def synthetic_model(i: int) -> dict:
    """A generated row (``synthetic/model-0001`` …) shaped like a real text-only model."""
    slug = f"synthetic/model-{i:04d}"
    base = next(r for r in _catalog_file()["captured"] if r["id"] == "openai/gpt-3.5-turbo")
    return copy.deepcopy(base) | {
        "id": slug, "canonical_slug": slug, "hugging_face_id": "", "created": 1735689600 + i,
        "name": f"Synthetic: Model {i:04d}", "description": f"Generated benchmark row {i}.",
        "links": {"details": f"/api/v1/models/{slug}/endpoints"}}


def load_catalog(extra_models: int = 0) -> list[dict]:
    """Captured rows + composed synthetic rows (fresh copies) + ``extra_models`` generated."""
    data = _catalog_file()
    rows = copy.deepcopy([*data["captured"], *data["synthetic"]])
    return rows + [synthetic_model(i + 1) for i in range(extra_models)]


def filter_models(rows: list[dict], query: Any) -> list[dict]:
    """``output_modalities`` (default ``text``; ``all``), ``input_modalities`` and
    ``supported_parameters`` filters, like the real endpoint."""
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


def _reasoning_off(cfg: dict) -> bool:
    return cfg.get("effort") == "none" or cfg.get("enabled") is False


def lookup_model(catalog: dict[str, dict], model_id: str) -> dict | None:
    """Exact id, or a known id with a routing suffix such as ``:nitro``."""
    if model_id in catalog:
        return catalog[model_id]
    if (routed := routed_model(catalog, model_id)) is not None:  # issue #12 (section 10)
        return routed
    base, _, variant = model_id.partition(":")
    return catalog.get(base) if variant in ROUTING_VARIANTS else None


# =========================================================================== 3. request inspection

_DIRECTIVE = re.compile(r"\[emu:([^\]]*)\]")
TASK_ANSWERS = (  # checked in this order; Open WebUI sends the template as a user message
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


def _is_user_message(item: Any) -> bool:
    return (isinstance(item, dict) and item.get("role") == "user"
            and item.get("type", "message") == "message")


def _last_user_index(items: list) -> int:
    return next((i for i in range(len(items) - 1, -1, -1) if _is_user_message(items[i])), -1)


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
    return [it for it in inp[_last_user_index(inp) + 1:]
            if isinstance(it, dict) and it.get("type") == "function_call_output"]


def input_tokens(body: dict) -> int:
    """Rough native-token estimate: chars/4 per text field plus 8 per item."""
    inp = body.get("input")
    items = [{"content": inp}] if isinstance(inp, str) else (inp or [])
    total = _tokens(body.get("instructions") or "")
    for it in (i for i in items if isinstance(i, dict)):
        texts = (_part_text(it.get("content")), _part_text(it.get("output")),
                 str(it.get("arguments") or ""))
        total += 8 + sum(_tokens(t) for t in texts)
    return max(total, 1)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name k=v k2='a b'"`` -> ("name", {"k": "v", "k2": "a b"}); bare words mean "1"."""
    parts = shlex.split(spec.strip()) or [""]
    return parts[0], dict(p.split("=", 1) if "=" in p else (p, "1") for p in parts[1:])


def task_answer(text: str) -> str | None:
    if "### task" in text.lower():
        for key, payload in TASK_ANSWERS:
            if f'"{key}"' in text:
                return json.dumps(payload, ensure_ascii=False)
    return None


def tool_result_answer(outputs: list[dict]) -> str:
    return "\n".join(f"Tool result for {it.get('call_id')}: {_part_text(it.get('output'))}"
                     for it in outputs)


def word_deltas(text: str) -> list[str]:
    """Split like tokenised output: words keep their leading whitespace."""
    return re.findall(r"\s*\S+\s*$|\s*\S+", text) or [text]


def even_deltas(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text)))
    bounds = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass
class Ctx:
    """Everything a scenario may look at for one request."""

    body: dict
    model_id: str
    entry: dict
    gen_id: str
    created: int
    user_text: str  # last user text with [emu:…] directives removed
    scenario_key: str = ""  # stable across retries of the same request
    route: Any = None  # issue #12: how the request was routed (section 10, Route)
    api_key: str = ""  # the caller's key: its usage is charged (issue #13)

    @property
    def vendor(self) -> str:
        return self.model_id.split("/", 1)[0]

    @property
    def reasoning_cfg(self) -> dict:
        return self.body.get("reasoning") or {}

    @property
    def supports_reasoning(self) -> bool:
        return "reasoning" in self.entry or "reasoning" in self.entry["supported_parameters"]


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
    cut: int | None = None  # stop the message after this many deltas (failures)
    error: dict | None = None
    error_type: str | None = None
    error_form: str = "flat"
    done: bool = True  # send ``data: [DONE]``
    http_error: HttpError | None = None
    delay_ms: int = 0
    first_byte_delay_ms: int = 0
    tail_delay_ms: int = 0
    auto_reasoning: bool = True  # reasoning-capable models think first
    annotation_events: bool = False
    raw_reply: tuple[int, str, bytes] | None = None  # (status, content type, body): wrong_body


QUIRK_FLAGS = ("comments", "crlf", "split", "late_reasoning_close", "no_completed", "no_done",
               "unknown_events")


@dataclass
class Quirks:
    comments: bool = False  # ": OPENROUTER PROCESSING" after every event
    crlf: bool = False  # \r\n line endings
    split: bool = False  # several writes per event, cut mid-JSON and mid-UTF-8
    late_reasoning_close: bool = False  # reasoning closes after the other items
    no_completed: bool = False  # drop the terminal response.* event
    no_done: bool = False  # no data: [DONE]
    unknown_events: bool = False  # add fusion_call + an SDK-unknown event type
    leading: int = 1  # leading ": " comment blocks


class Opts(dict):
    """Scenario options: strings from headers/directives, any type from ``enqueue``."""

    def get_int(self, key: str, default: int) -> int:
        value = self.get(key)
        return default if value in (None, "") else int(value)

    def get_str(self, key: str, default: str) -> str:
        value = self.get(key)
        return default if value is None else str(value)

    def flag(self, key: str) -> bool:
        return str(self.get(key, "0")).lower() in ("1", "true", "yes", "on")

    def quirks(self) -> Quirks:
        return Quirks(**{k: self.flag(k) for k in QUIRK_FLAGS}, leading=self.get_int("leading", 1))


def message(text: str, deltas: int | None = None, status: str = "completed") -> Item:
    parts = even_deltas(text, deltas) if deltas else word_deltas(text)
    return Item("message", "msg_tmp_" + _rand(_B36, 11), parts, status=status)


def reasoning_item(ctx: Ctx, style: str | None = None) -> Item:
    """OpenAI models: summary events only if a summary was requested (and effort isn't
    minimal), else added->done with encrypted_content; other vendors: raw reasoning_text."""
    if style is None:
        cfg = ctx.reasoning_cfg
        wants_summary = cfg.get("summary") and cfg.get("effort") != "minimal"
        style = ("summary" if wants_summary else "encrypted") if ctx.vendor == "openai" else "raw"
    text = ("**Pensando na ação** 😀\n\nThe user wrote something; I will answer it directly."
            if style == "summary" else
            "Let me think about this. A ação certa: answer clearly 😀. Done thinking.")
    deltas = [] if style == "encrypted" else even_deltas(text, 3)
    return Item("reasoning", new_reasoning_id(ctx.vendor), deltas, style=style)


def function_call(name: str, args: str) -> Item:
    half = max(1, len(args) // 2)
    deltas = [args[:half], args[half:]] if len(args) > 1 else [args]
    return Item("function_call", "fc_tmp_" + _rand(_B36, 11), deltas, name=name,
                call_id="call_" + _rand(_ALNUM, 24))


# =========================================================================== 5. scenarios


class ScenarioError(ValueError):
    """Bad scenario name/options: reported to the client as an emulator 400."""


@dataclass(frozen=True)
class Scenario:
    name: str
    handler: Callable[[Emulator, Ctx, Opts], Plan]
    options: frozenset[str]


COMMON_OPTIONS = frozenset({*QUIRK_FLAGS, "leading", "delay_ms", "first_byte_delay_ms",
                            "tail_delay_ms"})
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, *options: str):
    """Register a scenario handler under ``name`` with its own option names."""

    def register(fn: Callable[[Emulator, Ctx, Opts], Plan]):
        SCENARIOS[name] = Scenario(name, fn, COMMON_OPTIONS | set(options))
        return fn

    return register


def default_text(ctx: Ctx) -> str:
    if (answer := task_answer(ctx.user_text)) is not None:
        return answer
    if outputs := trailing_tool_outputs(ctx.body.get("input")):
        return tool_result_answer(outputs)
    return f"You said: {ctx.user_text}" if ctx.user_text else "Olá! Ação rápida 😀"


@scenario("default")
def sc_default(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return Plan([message(default_text(ctx))])


@scenario("text", "deltas", "text")
def sc_text(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return Plan([message(o.get_str("text", default_text(ctx)), o.get_int("deltas", 0) or None)])


@scenario("slow", "deltas", "text")
def sc_slow(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    plan = sc_text(emu, ctx, o)
    plan.delay_ms = 200
    return plan


@scenario("flood", "deltas")
def sc_flood(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    text = "".join("ação 😀"[i % 6] for i in range(o.get_int("deltas", 20000)))
    return Plan([Item("message", "msg_tmp_" + _rand(_B36, 11), list(text))], auto_reasoning=False)


@scenario("reasoning", "style", "text")
def sc_reasoning(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    style = o.get("style")
    if style not in (None, "summary", "raw"):
        raise ScenarioError(f"reasoning style must be summary|raw, got {style!r}")
    items = [reasoning_item(ctx, style), message(o.get_str("text", default_text(ctx)))]
    return Plan(items, auto_reasoning=False)


def tool_rounds_done(inp: Any) -> int:
    """Rounds of tool results in the current turn: runs of function_call_output items
    after the last user message."""
    if not isinstance(inp, list):
        return 0
    runs, prev = 0, False
    for it in inp[_last_user_index(inp) + 1:]:
        out = isinstance(it, dict) and it.get("type") == "function_call_output"
        runs += out and not prev
        prev = out
    return runs


WEB_TEXT_2 = ("Mais sobre Lisboa [example.org](https://example.org/lisboa) e o rio Tejo "
              "[rio.example](https://rio.example/tejo).")


def cited_message(text: str) -> Item:
    item = message(text)
    item.annotations = url_citations(text)
    return item


@scenario("tool_call", "name", "args", "n", "rounds", "chain", "cite")
def sc_tool_call(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    """Call tools for ``rounds`` rounds (default 1; 0 = every request), then answer with the
    results. ``name`` may be a comma list (parallel calls of different tools); ``chain=a,b``
    calls ``a`` in round 1 and ``b`` in round 2; ``cite`` adds cited text to every round.
    ``tool_choice: none`` always gets a text answer."""
    tools = [t for t in ctx.body.get("tools") or [] if t.get("type") == "function"]
    chain = [c for c in o.get_str("chain", "").split(",") if c]
    done = tool_rounds_done(ctx.body.get("input"))
    rounds = len(chain) if chain else o.get_int("rounds", 1)
    if ctx.body.get("tool_choice") == "none" or (rounds and done >= rounds):
        if o.flag("cite"):
            return Plan([cited_message(WEB_TEXT_2)])
        return Plan([message(default_text(ctx))])
    names = [chain[done]] if chain else o.get_str(
        "name", tools[0]["name"] if tools else "get_weather").split(",")
    args = o.get_str("args", '{"city":"São Paulo"}')
    calls = [function_call(n, args) for n in names for _ in range(o.get_int("n", 1))]
    return Plan(([cited_message(WEB_TEXT)] if o.flag("cite") else []) + calls)


WEB_TEXT = ("Lisboa é a capital de Portugal 😀 [wikipedia.org](https://en.wikipedia.org/wiki/"
            "Lisbon). A população ronda 550 mil [example.org](https://example.org/lisboa).")


def url_citations(text: str) -> list[dict]:
    return [{"type": "url_citation", "url": m.group(2), "title": f"Source: {m.group(1)}",
             "start_index": m.start(), "end_index": m.end(),
             "content": "Excerpt from the cited page about Lisboa."}
            for m in re.finditer(r"\[([^\]]+)\]\((https?://[^)]+)\)", text)]


@scenario("web_search", "annotation_events")
def sc_web_search(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    item = message(WEB_TEXT)
    item.annotations = url_citations(WEB_TEXT)
    return Plan([item], annotation_events=o.flag("annotation_events"))


@scenario("incomplete", "text", "deltas")
def sc_incomplete(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    text = o.get_str("text", "This answer was cut short by max_output_tokens — ação 😀 and")
    item = message(text, o.get_int("deltas", 0) or None, status="incomplete")
    return Plan([item], status="incomplete")


@scenario("http_error", "status", "retry_after")
def sc_http_error(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    status = o.get_int("status", 500)
    return Plan(http_error=error_response(status, ctx.model_id, o.get("retry_after")))


@scenario("fail_then_ok", "status", "times", "retry_after", "key")
def sc_fail_then_ok(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    """The first ``times`` requests with the same ``key`` (default: model + header + last
    user text, i.e. a retry of the same request) fail before the first byte."""
    key = o.get_str("key", ctx.scenario_key)
    emu.fail_counts[key] = emu.fail_counts.get(key, 0) + 1
    if emu.fail_counts[key] <= o.get_int("times", 1):
        status = o.get_int("status", 503)
        return Plan(http_error=error_response(status, ctx.model_id, o.get("retry_after")))
    return sc_default(emu, ctx, o)


def _partial(o: Opts, ending: str, message_text: str, error_type: str) -> Plan:
    """Some text deltas (``after``, default 2), then a failure of kind ``ending``."""
    after = o.get_int("after", 2)
    text = "Partial answer — ação 😀 before the provider went away, sorry about that."
    plan = Plan([message(text, max(after + 2, 6))], status="failed", ending=ending, cut=after)
    plan.error = {"code": "server_error", "message": o.get_str("message", message_text)}
    plan.error_type = o.get_str("error_type", error_type)
    return plan


@scenario("mid_stream_failure", "after", "error_type", "message")
def sc_mid_stream_failure(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return _partial(o, "terminal", "Provider disconnected unexpectedly", "provider_unavailable")


@scenario("failed_200", "after", "error_type", "message")
def sc_failed_200(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return _partial(o, "terminal", "stream closed with reason: error", "server")


@scenario("error_event", "form", "after", "done", "message")
def sc_error_event(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    plan = _partial(o, "error_event", "Provider disconnected unexpectedly", "provider_unavailable")
    plan.error_form, plan.done = o.get_str("form", "flat"), o.flag("done")
    if plan.error_form not in ("flat", "nested", "chat"):
        raise ScenarioError("error_event form must be flat|nested|chat")
    return plan


@scenario("truncate", "after")
def sc_truncate(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    plan = _partial(o, "truncate", "Stream truncated", "server")
    plan.done = False
    return plan


@scenario("hang")
def sc_hang(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    return Plan(ending="hang", auto_reasoning=False)


# -- answers in shapes a client must still report (issue #11, hard-fault) ------------------

PROXY_PAGE = (b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n<body>"
              b"<h1>Bad Gateway</h1><p>The corporate proxy could not reach openrouter.ai.</p>"
              b"</body></html>\n")
WRONG_BODIES: dict[str, tuple[str, bytes]] = {
    "html": ("text/html; charset=utf-8", PROXY_PAGE),
    "json": ("application/json", json.dumps({"error": {
        "code": 502, "message": "Provider returned error",
        "metadata": {"raw": "upstream model overloaded", "provider_name": "Emulated"}},
        "user_id": USER_ID}).encode()),
    "text": ("text/plain", b"upstream connect error or disconnect/reset before headers"),
}


@scenario("wrong_body", "kind")
def sc_wrong_body(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    """HTTP 200 whose body is no event stream: ``kind=html`` (a proxy's page), ``json`` (a
    non-streamed error object) or ``text``."""
    kind = o.get_str("kind", "html")
    if kind not in WRONG_BODIES:
        raise ScenarioError(f"wrong_body kind must be {'|'.join(WRONG_BODIES)}")
    ctype, data = WRONG_BODIES[kind]
    return Plan(auto_reasoning=False, raw_reply=(200, ctype, data))


def chat_style_error(err: dict) -> dict:
    """``data: {"error": {...}}`` as chat completions send it mid-stream (no ``type``)."""
    return {"error": {**err, "metadata": {"raw": "provider connection reset",
                                          "provider_name": "Emulated"}}}


def build_plan(emu: Emulator, ctx: Ctx, name: str, opts: dict) -> tuple[Plan, Quirks]:
    sc = SCENARIOS.get(name)
    if sc is None:
        raise ScenarioError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}")
    if unknown := set(opts) - sc.options:
        raise ScenarioError(f"unknown option(s) {sorted(unknown)} for scenario {name!r}")
    o = Opts(opts)
    plan = sc.handler(emu, ctx, o)
    plan.delay_ms = o.get_int("delay_ms", plan.delay_ms)
    plan.first_byte_delay_ms = o.get_int("first_byte_delay_ms", 0)
    plan.tail_delay_ms = o.get_int("tail_delay_ms", 0)
    thinks = ctx.supports_reasoning and not _reasoning_off(ctx.reasoning_cfg)
    if plan.auto_reasoning and plan.items and thinks:
        plan.items.insert(0, reasoning_item(ctx))
    return plan, o.quirks()


# =========================================================================== 6. event assembly


def _echo_tools(tools: list[dict]) -> list[dict]:
    """Function tools are echoed with ``strict`` filled in (null) after ``parameters``."""
    out = []
    for t in tools:
        if t.get("type") == "function":
            head = {k: t[k] for k in ("type", "name", "description", "parameters") if k in t}
            t = {**head, "strict": t.get("strict"), **{k: v for k, v in t.items() if k not in head}}
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
    done_at = int(time.time()) if final and status == "completed" else None
    r: dict[str, Any] = {
        "id": ctx.gen_id, "object": "response", "created_at": ctx.created, "model": ctx.model_id,
        "status": status, "completed_at": done_at, "output": output, "error": error}
    if error_type:
        r["error_type"] = error_type
    return r | {
        "incomplete_details": incomplete, "tools": _echo_tools(b.get("tools") or []),
        "tool_choice": _or(b, "tool_choice", "auto"),
        "parallel_tool_calls": _or(b, "parallel_tool_calls", True),
        "max_output_tokens": b.get("max_output_tokens"), "temperature": _or(b, "temperature", 1),
        "top_p": _or(b, "top_p", 1), "presence_penalty": _or(b, "presence_penalty", 0),
        "frequency_penalty": _or(b, "frequency_penalty", 0),
        "top_logprobs": _or(b, "top_logprobs", 0), "max_tool_calls": b.get("max_tool_calls"),
        "metadata": _or(b, "metadata", {}), "background": False, "previous_response_id": None,
        "service_tier": "default" if final else "auto",
        "truncation": _or(b, "truncation", "disabled"), "store": False,
        "instructions": b.get("instructions"),
        "text": {"format": {"type": "text"}, **(b.get("text") or {})},
        "reasoning": b.get("reasoning"), "safety_identifier": b.get("safety_identifier"),
        "prompt_cache_key": b.get("prompt_cache_key"),
        "prompt_cache_options": b.get("prompt_cache_options"), "usage": usage}


def usage_for(ctx: Ctx, items: list[Item]) -> dict:
    """Token estimate + ``cost`` = input*pricing.prompt + output*pricing.completion."""
    reasoning = sum(_tokens(i.text) or 24 for i in items if i.kind == "reasoning")
    inp = input_tokens(ctx.body)
    out = reasoning + sum(_tokens(i.text) for i in items if i.kind != "reasoning")
    price = ctx.entry["pricing"]
    cin, cout = Decimal(price["prompt"]) * inp, Decimal(price["completion"]) * out
    image_tokens, image_cost = images_cost(ctx, items)  # 6b: pictures (issue #14)
    out, cout = out + image_tokens, cout + image_cost
    cost = float(cin + cout)
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inp + out, "cost": cost, "is_byok": False,
            "cost_details": {"upstream_inference_cost": cost,
                             "upstream_inference_input_cost": float(cin),
                             "upstream_inference_output_cost": float(cout)}}


@dataclass
class ItemEvents:
    opening: list[dict]  # added + deltas
    closing: list[dict]  # *.done events (may be held back by late_reasoning_close)
    final: dict  # the item as it appears in the final response's output
    stopped: bool = False  # a failure cut the stream inside this item


def _provenance(ctx: Ctx) -> dict:
    """Reasoning-item fields that say which provider produced it."""
    if ctx.vendor == "openai":  # OpenAI blob + "." + base64url routing hint, like live traffic
        hint = json.dumps({"endpoint_slug": f"{ctx.entry['canonical_slug']}|openai"}).encode()
        suffix = base64.urlsafe_b64encode(hint).decode().rstrip("=")
        blob = "gAAAAAB" + _rand(_ALNUM + "-_", 120) + "=." + suffix
        if "reasoning.encrypted_content" not in (ctx.body.get("include") or ()):
            blob = None  # like OpenAI: the blob only when `include` asks for it
        return {"encrypted_content": blob, "format": "openai-responses-v1"}
    if ctx.vendor == "anthropic":
        return {"encrypted_content": None, "format": "anthropic-claude-v1",
                "signature": "Er" + _rand(_ALNUM, 86) + "=="}
    return {"format": "google-gemini-v1"} if ctx.vendor == "google" else {}


REASONING_EVENTS = {  # style -> (part type, index key, final-item key, part / text events)
    "summary": ("summary_text", "summary_index", "summary",
                "response.reasoning_summary_part", "response.reasoning_summary_text"),
    "raw": ("reasoning_text", "content_index", "content",
            "response.content_part", "response.reasoning_text"),
}


def reasoning_events(ctx: Ctx, idx: int, it: Item, plan: Plan) -> ItemEvents:
    head = {"id": it.id, "type": "reasoning"}
    opening = [_ev("response.output_item.added", output_index=idx,
                   item={**head, "status": "in_progress", "summary": []})]
    final: dict[str, Any] = {**head, "status": "completed", "summary": []}
    closing: list[dict] = []
    if it.style in REASONING_EVENTS:
        ptype, index_key, final_key, part_ev, text_ev = REASONING_EVENTS[it.style]
        ref = {"output_index": idx, "item_id": it.id, index_key: 0}
        part = {"type": ptype, "text": it.text}
        opening += [_ev(f"{part_ev}.added", **ref, part={"type": ptype, "text": ""})]
        opening += [_ev(f"{text_ev}.delta", **ref, delta=d) for d in it.deltas]
        closing += [_ev(f"{text_ev}.done", **ref, text=it.text),
                    _ev(f"{part_ev}.done", **ref, part=part)]
        final[final_key] = [part]
    final |= _provenance(ctx)
    closing.append(_ev("response.output_item.done", output_index=idx, item=final))
    return ItemEvents(opening, closing, final)


def message_events(ctx: Ctx, idx: int, it: Item, plan: Plan) -> ItemEvents:
    ref = {"output_index": idx, "item_id": it.id, "content_index": 0}
    cut = plan.cut
    opening = [
        _ev("response.output_item.added", output_index=idx, item={
            "id": it.id, "type": "message", "status": "in_progress", "role": "assistant",
            "content": []}),
        _ev("response.content_part.added", **ref,
            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]
    deltas = it.deltas if cut is None else it.deltas[:cut]
    opening += [_ev("response.output_text.delta", **ref, delta=d, logprobs=[]) for d in deltas]
    text, annotations = "".join(deltas), it.annotations if cut is None else []
    part = {"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}
    status = "incomplete" if cut is not None else it.status
    final = {"id": it.id, "type": "message", "role": "assistant", "status": status,
             "content": [part]}  # live order: role before status here, after it in events
    if cut is not None:
        return ItemEvents(opening, [], final, stopped=True)
    if plan.annotation_events:
        opening += [_ev("response.output_text.annotation.added", **ref, annotation_index=i,
                        annotation=a) for i, a in enumerate(annotations)]
    done_item = {"id": it.id, "type": "message", "status": status, "role": "assistant",
                 "content": [part]}
    closing = [_ev("response.output_text.done", **ref, text=text, logprobs=[]),
               _ev("response.content_part.done", **ref, part=part),
               _ev("response.output_item.done", output_index=idx, item=done_item)]
    return ItemEvents(opening, closing, final)


def function_call_events(ctx: Ctx, idx: int, it: Item, plan: Plan) -> ItemEvents:
    ref = {"output_index": idx, "item_id": it.id}
    head = {"id": it.id, "type": "function_call"}
    opening = [_ev("response.output_item.added", output_index=idx, item={
        **head, "status": "in_progress", "call_id": it.call_id, "name": it.name,
        "arguments": ""})]
    opening += [_ev("response.function_call_arguments.delta", **ref, delta=d) for d in it.deltas]
    final = {**head, "status": "completed", "call_id": it.call_id, "name": it.name,
             "arguments": it.text}
    closing = [_ev("response.function_call_arguments.done", **ref, name=it.name,
                   arguments=it.text),
               _ev("response.output_item.done", output_index=idx, item=final)]
    return ItemEvents(opening, closing, final)


ITEM_EVENTS = {"reasoning": reasoning_events, "message": message_events,
               "function_call": function_call_events}


def assemble(ctx: Ctx, plan: Plan, q: Quirks) -> tuple[list[dict], dict]:
    """(events without sequence numbers, final response object) for a plan."""
    snapshot = envelope(ctx, "in_progress", [], None, final=False)
    events = [_ev("response.created", response=snapshot),
              _ev("response.in_progress", response=snapshot)]
    outputs: list[dict] = []
    held: list[dict] = []
    for idx, it in enumerate(plan.items):
        ie = ITEM_EVENTS[it.kind](ctx, idx, it, plan)
        events += ie.opening
        late = q.late_reasoning_close and it.kind == "reasoning"
        (held if late else events).extend(ie.closing)
        outputs.append(ie.final)
        if ie.stopped:
            break
    final = final_object(ctx, plan, outputs)
    events += held + ending_events(plan, final)
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
        err = {"code": final["error"]["code"], "message": final["error"]["message"]}
        if plan.error_form == "nested":  # docs-prose form; not in the SDK schema
            return [_ev("error", error=err)]
        if plan.error_form == "chat":  # chat-completions in-band error: no `type` at all
            return [chat_style_error(err)]
        return [_ev("error", **err, param=None)]
    return []  # truncate: EOF without a terminal event


def apply_event_quirks(events: list[dict], q: Quirks) -> list[dict]:
    if q.no_completed:
        events = [e for e in events if e["type"] not in TERMINAL_TYPES]
    if q.unknown_events:  # one event the SDK knows (fusion) and one it does not
        fusion = _ev("response.fusion_call.in_progress", output_index=0,
                     item_id="fusion_tmp_" + _rand(_B36, 11))
        events = [*events[:2], fusion, *events[2:]]
        pos = len(events) - (events[-1]["type"] in TERMINAL_TYPES)
        events.insert(pos, _ev(UNKNOWN_EVENT_TYPES[0], note="forward-compatibility probe"))
    return events


# =========================================================================== 6b. images (issue #14)
#
# Image models stream `image_generation_call` items (the OpenAI shape the SDK defines) with a
# real PNG made here (zlib + struct), optional partial images, or the other documented
# shapes (selectable: `shape=`); the openrouter:image_generation server tool answers with its
# own item; refusals end as `response.failed` with the SDK's image error codes.
#   [emu:image shape=call|data_url|url|b64 n=1 partials=0 text=…]
#   [emu:image_refusal reason=policy|size]
# A request with `modalities` containing "image", or with the image tool, uses `image` by
# default. Cost: IMAGE_TOKENS output tokens per picture at the model's `image_output` price.

IMAGE_TOKENS = 1290
IMAGE_SHAPES = ("call", "data_url", "url", "b64", "tool_b64", "tool_url")
IMAGE_TOOL_TYPE = "openrouter:image_generation"
IMAGE_COLOURS = ((70, 150, 70), (200, 170, 90), (60, 120, 110), (150, 110, 80))  # ground
# url shapes point here; tests resolve this host to the emulator (GET /emu-images/<name>)
IMAGE_URL_BASE = "http://images.emulator.test/api/v1"


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real, valid RGB PNG of one colour."""
    return png_rows(width, height, [bytes(rgb) * width] * height)


def image_png(index: int, edit: bool = False) -> bytes:
    """Picture number `index` of a response: a small landscape (sky, sun, ground) whose sky
    is blue, or purple when the request carried a picture to edit."""
    return scene(256, 160, IMAGE_COLOURS[index % len(IMAGE_COLOURS)], edit)


@cache
def scene(width: int, height: int, ground: tuple[int, int, int], purple: bool) -> bytes:
    sky_top, sky_low = ((90, 40, 150), (190, 120, 230)) if purple else ((40, 110, 210),
                                                                         (150, 200, 250))
    horizon, (cx, cy, r) = height * 5 // 8, (width * 3 // 4, height // 4, height // 8)
    rows = []
    for y in range(height):
        t = min(y / max(horizon, 1), 1.0)
        sky = bytes(round(a + (b - a) * t) for a, b in zip(sky_top, sky_low, strict=True))
        line = bytearray()
        for x in range(width):
            if y >= horizon:
                line += bytes(ground)
            elif (x - cx) ** 2 + (y - cy) ** 2 <= r * r:
                line += b"\xff\xd8\x40"
            else:
                line += sky
        rows.append(bytes(line))
    return png_rows(width, height, rows)


def png_rows(width: int, height: int, rows: list[bytes]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def partial_png(step: int) -> bytes:
    return png(4 + step, 4 + step, (200, 200, 200 - 40 * (step % 4)))


@dataclass
class ImageItem(Item):
    image: str = ""  # base64, data URL or URL as the item carries it
    partials: list[str] = field(default_factory=list)


def _image_source(shape: str, data: bytes, base: str) -> str:
    b64 = base64.b64encode(data).decode()
    if shape == "data_url":
        return "data:image/png;base64," + b64
    if shape in ("url", "tool_url"):
        return f"{base}/emu-images/{hashlib_hex(data)}.png"
    return b64


def hashlib_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


SERVED_IMAGES: dict[str, bytes] = {}  # url shapes: what GET /emu-images/<name>.png serves


def image_item(ctx: Ctx, index: int, shape: str, partials: int) -> ImageItem:
    edit = has_input_image(ctx.body)
    data = image_png(index, edit)
    SERVED_IMAGES[hashlib_hex(data)] = data
    kind = "tool_image" if shape.startswith("tool_") else "image"
    prefix = "ig_" if kind == "image" else "or_ig_"
    return ImageItem(kind, prefix + _rand(_B36, 20), style=shape,
                     image=_image_source(shape, data, IMAGE_URL_BASE),
                     partials=[base64.b64encode(partial_png(s)).decode()
                               for s in range(partials)])


def has_input_image(body: dict) -> bool:
    items = body.get("input") if isinstance(body.get("input"), list) else []
    return any(isinstance(p, dict) and p.get("type") == "input_image"
               for it in items if isinstance(it, dict)
               for p in (it.get("content") if isinstance(it.get("content"), list) else ()))


def wants_images(body: dict) -> bool:
    return "image" in (body.get("modalities") or ()) or any(
        isinstance(t, dict) and t.get("type") == IMAGE_TOOL_TYPE for t in body.get("tools") or ())


def default_scenario(body: dict) -> str:
    """The scenario when none is chosen: pictures for image requests, else `default`."""
    return "image" if wants_images(body) else "default"


@scenario("image", "shape", "n", "partials", "text")
def sc_image(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    tool = any(t.get("type") == IMAGE_TOOL_TYPE for t in ctx.body.get("tools") or ())
    shape = o.get_str("shape", "tool_b64" if tool else "call")
    if shape not in IMAGE_SHAPES:
        raise ScenarioError(f"shape must be one of {', '.join(IMAGE_SHAPES)}")
    images = [image_item(ctx, i, shape, o.get_int("partials", 0))
              for i in range(o.get_int("n", 1))]
    text_only = "text" not in (ctx.body.get("modalities") or ("text",)) and not tool
    edit = "Edited your picture." if has_input_image(ctx.body) else "Here is your picture."
    text = o.get_str("text", "" if text_only else edit)
    items: list[Item] = [*images, *([message(text)] if text else [])]
    return Plan(items, auto_reasoning=False)


@scenario("image_refusal", "reason")
def sc_image_refusal(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    reason = o.get_str("reason", "policy")
    code, error_type, text = {
        "policy": ("image_content_policy_violation", "content_policy_violation",
                   "Your request was rejected by the safety system"),
        "size": ("image_too_large", "image_too_large",
                 "The requested image size is larger than this model supports"),
    }[reason]
    return Plan([], status="failed", error={"code": code, "message": text},
                error_type=error_type, auto_reasoning=False)


def image_events(ctx: Ctx, idx: int, it: Item, plan: Plan) -> ItemEvents:
    assert isinstance(it, ImageItem)
    if it.kind == "tool_image":
        return tool_image_events(ctx, idx, it)
    ref = {"output_index": idx, "item_id": it.id}
    head = {"id": it.id, "type": "image_generation_call"}
    opening = [_ev("response.output_item.added", output_index=idx,
                   item={**head, "status": "in_progress", "result": None}),
               _ev("response.image_generation_call.in_progress", **ref),
               _ev("response.image_generation_call.generating", **ref)]
    opening += [_ev("response.image_generation_call.partial_image", **ref,
                    partial_image_b64=p, partial_image_index=i)
                for i, p in enumerate(it.partials)]
    final = {**head, "status": "completed", "result": it.image}
    closing = [_ev("response.image_generation_call.completed", **ref),
               _ev("response.output_item.done", output_index=idx, item=final)]
    return ItemEvents(opening, closing, final)


def tool_image_events(ctx: Ctx, idx: int, it: ImageItem) -> ItemEvents:
    """The openrouter:image_generation server tool: added -> done, camelCase keys."""
    head = {"type": IMAGE_TOOL_TYPE, "id": it.id}
    key = "imageUrl" if it.style == "tool_url" else "imageB64"
    final = {**head, "status": "completed", key: it.image, "prompt": ctx.user_text[:200]}
    opening = [_ev("response.output_item.added", output_index=idx,
                   item={**head, "status": "in_progress"})]
    return ItemEvents(opening, [_ev("response.output_item.done", output_index=idx,
                                    item=final)], final)


ITEM_EVENTS["image"] = image_events
ITEM_EVENTS["tool_image"] = image_events


def images_cost(ctx: Ctx, items: list[Item]) -> tuple[int, Decimal]:
    """(output tokens, cost) of the pictures: IMAGE_TOKENS each at the image model's
    `image_output` price (the tool's model for the server tool)."""
    pictures = [i for i in items if isinstance(i, ImageItem)]
    if not pictures:
        return 0, Decimal(0)
    tool = next((t for t in ctx.body.get("tools") or () if t.get("type") == IMAGE_TOOL_TYPE),
                None)
    model = ((tool or {}).get("parameters") or {}).get("model") if tool else None
    entry = _catalog_by_id().get(model or "", ctx.entry) if model else ctx.entry
    price = Decimal((entry.get("pricing") or {}).get("image_output") or "0")
    return IMAGE_TOKENS * len(pictures), price * IMAGE_TOKENS * len(pictures)


def output_modality_error(body: dict, entry: dict) -> HttpError | None:
    """`modalities` the model can't produce: image-only models reject "text" (docs), text
    models have no endpoint for "image"."""
    wanted = set(body.get("modalities") or ())
    offered = set((entry.get("architecture") or {}).get("output_modalities") or ("text",))
    if missing := sorted(wanted - offered):
        return HttpError(404, _err(404, f"No endpoints found that support "
                                        f"{' and '.join(missing)} output"))
    return None


@cache
def _catalog_by_id() -> dict[str, dict]:
    return {m["id"]: m for m in load_catalog()}


#: What GET /images/models says each image model offers (SDK `ImageModelListItem`; enum
#: capability descriptors). Models absent here are unknown: the pipe sends no image_config.
IMAGE_MODEL_OPTIONS: dict[str, dict[str, list[str]]] = {
    "google/gemini-2.5-flash-image": {
        "aspect_ratio": ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9",
                         "21:9"],
        "resolution": ["1K", "2K", "4K"]},
    "black-forest-labs/flux.2-pro": {"aspect_ratio": ["1:1", "16:9", "9:16", "4:3", "3:4"]},
}


def image_models_listing() -> dict:
    rows = []
    for model_id, options in IMAGE_MODEL_OPTIONS.items():
        entry = _catalog_by_id()[model_id]
        arch = entry["architecture"]
        rows.append({
            "id": model_id, "name": entry["name"], "created": entry["created"],
            "description": entry["description"],
            "architecture": {"input_modalities": arch["input_modalities"],
                             "output_modalities": ["image"]},
            "endpoints": f"/api/v1/images/models/{model_id}/endpoints",
            "supported_parameters": {k: {"type": "enum", "values": v}
                                     for k, v in options.items()},
            "supports_streaming": False})
    return {"data": rows}


def add_image_routes(app: web.Application) -> None:
    async def listing(request: web.Request) -> web.Response:
        return _json_response(200, image_models_listing())

    async def serve(request: web.Request) -> web.Response:
        data = SERVED_IMAGES.get(request.match_info["name"].removesuffix(".png"))
        if data is None:
            return _json_response(404, {"error": {"code": 404, "message": "Not found"}})
        return web.Response(body=data, content_type="image/png")

    app.router.add_get(f"{API_PREFIX}/emu-images/{{name}}", serve)
    app.router.add_get(f"{API_PREFIX}/images/models", listing)


# =========================================================================== 7. errors


def _err(code: int, message: str, **extra: Any) -> dict:
    return {"error": {"code": code, "message": message, **extra}, "user_id": USER_ID}


def _provider_error(code: int, raw: str, provider: str) -> dict:
    return _err(code, "Provider returned error",
                metadata={"raw": raw, "provider_name": provider, "is_byok": False})


def _availability(code: str, model: str, retryable: bool, **extra: Any) -> dict:
    return {"code": code, "retryable": retryable, "requested_models": [model], **extra,
            "docs_url": f"https://openrouter.ai/docs/errors#{code}"}


def _next_minute_ms() -> int:
    return (int(time.time()) // 60 + 1) * 60_000


ERROR_BODIES: dict[int, Callable[[str], dict]] = {  # status -> body for model id (§6)
    400: lambda m: _provider_error(
        400, '{"error":{"message":"at most 64 tools are allowed"}}', "OpenAI"),
    401: lambda m: {"error": {"message": "User not found.", "code": 401}},
    402: lambda m: _err(
        402, "Insufficient credits. Add more using https://openrouter.ai/settings/credits"),
    403: lambda m: _err(
        403, f'{m} requires moderation on OpenAI. Your input was flagged for "harassment".',
        metadata={"reasons": ["harassment"], "flagged_input": "you are the worst ... go away",
                  "provider_name": "OpenAI", "model_slug": m}),
    404: lambda m: _err(404, f"No endpoints found for {m}."),
    408: lambda m: _err(408, "Operation timed out. Please try again later."),
    413: lambda m: _err(413, "Request payload too large.",
                        metadata={"error_type": "payload_too_large"}),
    429: lambda m: _err(429, "Rate limit exceeded: free-models-per-min. ", metadata={"headers": {
        "X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(_next_minute_ms())}}),
    500: lambda m: _err(500, "Internal Server Error"),
    502: lambda m: _provider_error(
        502, "upstream connect error or disconnect/reset before headers", "ExampleCloud"),
    503: lambda m: _err(
        503, f"All providers for {m} are temporarily unavailable.",
        error_type="provider_overloaded", http_status=503,
        availability=_availability("temporarily_unavailable", m, True,
                                   affected_providers=["example-cloud"]),
        metadata={"previous_errors": [
            {"provider": "example-cloud", "code": "overloaded", "status": 503}]}),
    524: lambda m: _err(524, "Request timed out. Please try again later."),
    529: lambda m: _provider_error(
        529, '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        "Anthropic"),
}


def error_response(status: int, model: str, retry_after: Any = None) -> HttpError:
    """Realistic pre-stream error; 429 always carries Retry-After (default 1) + X-RateLimit-*."""
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


STATELESS = "the Responses API is stateless"


def validation_error(body: Any, catalog: dict[str, dict]) -> HttpError | None:
    """Request checks the real server makes before generating anything."""
    if not isinstance(body, dict):
        return HttpError(400, _err(400, "Request body must be a JSON object"))
    if body.get("input") is None:
        return HttpError(400, _err(400, 'Missing required parameter: "input"'))
    if body.get("store") is True:
        return HttpError(400, _err(400, f"store: true is not supported: {STATELESS}; "
                                        "set store to false or omit it"))
    if body.get("previous_response_id") is not None:
        return HttpError(400, _err(400, f"previous_response_id is not supported: {STATELESS}; "
                                        "send the full conversation in input"))
    model = body.get("model")
    entry = lookup_model(catalog, model) if isinstance(model, str) else None
    if entry is None:
        return HttpError(400, _err(
            400, f"{model} is not a valid model ID", error_type="invalid_request",
            http_status=400, availability=_availability("model_not_found", model, False)))
    if err := tools_error(body, entry):
        return err
    mandatory = (entry.get("reasoning") or {}).get("mandatory")
    if mandatory and _reasoning_off(body.get("reasoning") or {}):
        return HttpError(400, _err(
            400, "Reasoning is mandatory for this endpoint and cannot be disabled."))
    return modality_error(body, entry) or output_modality_error(body, entry)  # 6b


#: Content part type -> the input modality a model must list to get it. `input_file` is not
#: here: OpenRouter parses PDFs for any model (file-parser plugin), so it never refuses them.
PART_MODALITIES = {"input_image": "image", "input_audio": "audio", "input_video": "video"}


def modality_error(body: dict, entry: dict) -> HttpError | None:
    """Like the real router: no endpoint of a text-only model takes image/audio/video input."""
    accepted = set((entry.get("architecture") or {}).get("input_modalities") or ())
    items = body["input"] if isinstance(body["input"], list) else []
    for item in (i for i in items if isinstance(i, dict)):
        parts = item.get("content") if isinstance(item.get("content"), list) else []
        for part in (p for p in parts if isinstance(p, dict)):
            needed = PART_MODALITIES.get(part.get("type", ""))
            if needed and needed not in accepted:
                return HttpError(404, _err(404, f"No endpoints found that support {needed} "
                                                "input"))
    return None


_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def tools_error(body: dict, entry: dict) -> HttpError | None:
    """What providers reject about tools: bad names, tools for a model without tool use,
    outputs whose call is missing, output statuses other than OpenAI's item statuses."""
    tools = body.get("tools") or []
    for t in tools:
        if t.get("type") == "function" and not _TOOL_NAME.fullmatch(str(t.get("name", ""))):
            return HttpError(400, _provider_error(
                400, f"Invalid 'tools[].name': string does not match pattern "
                     f"'^[a-zA-Z0-9_-]{{1,64}}$' ({t.get('name')!r})", "OpenAI"))
    if any(t.get("type") in ("function", "mcp") for t in tools) \
            and "tools" not in entry["supported_parameters"]:
        return HttpError(404, _err(404, "No endpoints found that support tool use."))
    items = body.get("input") if isinstance(body.get("input"), list) else []
    calls: set[str] = set()
    for it in (i for i in items if isinstance(i, dict)):
        if it.get("type") == "function_call":
            calls.add(it.get("call_id"))
        elif it.get("type") == "function_call_output":
            if it.get("call_id") not in calls:
                return HttpError(400, _err(400, f"No tool call found for function call "
                                                f"output with call_id {it.get('call_id')}."))
            if it.get("status") not in (None, "completed", "incomplete", "in_progress"):
                return HttpError(400, _err(400, f"Invalid input: function_call_output status "
                                                f"{it.get('status')!r}"))
    return None


def _json_response(status: int, payload: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=dumps(payload), content_type="application/json",
                        headers={"Access-Control-Expose-Headers": EXPOSE, **(headers or {})})


# =========================================================================== 8. SSE writer


class SSEWriter:
    """Frames events as ``data: <json>\\n\\n`` with quirks; numbers events from 0."""

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
        for piece in split_frame(data):
            await self.resp.write(piece)
            await asyncio.sleep(0.001)  # let each piece leave as its own chunk

    async def flush(self) -> None:
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            await self.resp.write(data)


def split_frame(data: bytes) -> list[bytes]:
    """Cut a frame in 3+ pieces: inside the JSON and inside a multi-byte UTF-8 char if any."""
    lead = next((i + 1 for i, b in enumerate(data) if b >= 0xC0), 0)
    cuts = {len(data) // 3, 2 * len(data) // 3, lead}
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ====================================================================== 10. routing (issue #12)
#
# Provider routing, model fallbacks, routers/aliases/presets, prompt caching, router metadata,
# availability errors and free-model limits, as OpenRouter documents them. The emulator knows
# a few endpoints per model family (PROVIDER_ENDPOINTS); `provider` filters them and an empty
# result is answered with OpenRouter's 404 bodies. Hooks into the shared code: `lookup_model`
# (routed ids), `Emulator._post_responses` (route_request), the two places that assemble a
# final response (finish_route), `Ctx.route`, `Emulator.route_cache`.


@dataclass(frozen=True)
class Endpoint:
    slug: str  # endpoint tag, as `provider.order/only/ignore` and the metadata name it
    quantization: str = "unknown"
    zdr: bool = False
    trains: bool = False  # stores prompts / may train on them (data_collection: deny drops it)
    price_factor: float = 1.0  # endpoint price vs. the catalogue's price


PROVIDER_ENDPOINTS: dict[str, tuple[Endpoint, ...]] = {  # model id prefix -> endpoints
    "anthropic/": (Endpoint("anthropic", zdr=True), Endpoint("amazon-bedrock", zdr=True),
                   Endpoint("google-vertex", zdr=True)),
    "openai/": (Endpoint("openai", zdr=True), Endpoint("azure", zdr=True)),
    "deepseek/": (Endpoint("together", "fp8", trains=True),
                  Endpoint("deepinfra/fp8", "fp8", price_factor=0.9)),
    "meta-llama/": (Endpoint("together", "fp8"), Endpoint("deepinfra/fp8", "fp8"),
                    Endpoint("groq", "fp16", zdr=True)),
    "google/": (Endpoint("google-vertex", zdr=True), Endpoint("google-ai-studio", trains=True)),
}
PROVIDER_DOCS = "https://openrouter.ai/settings/privacy"


def endpoints_for(model_id: str) -> tuple[Endpoint, ...]:
    for prefix, endpoints in PROVIDER_ENDPOINTS.items():
        if model_id.startswith(prefix):
            return endpoints
    return (Endpoint(model_id.split("/", 1)[0]),)


def _slug_match(wanted: list, ep: Endpoint) -> bool:
    """A base slug (`deepinfra`) matches all its endpoints; a full slug (`deepinfra/fp8`) one."""
    return any(w == ep.slug or w == ep.slug.split("/", 1)[0] for w in wanted)


def _price_ok(ep: Endpoint, entry: dict, caps: dict) -> bool:
    price = entry.get("pricing") or {}
    for key in ("prompt", "completion"):
        if key in caps and float(price.get(key) or 0) * 1e6 * ep.price_factor > float(caps[key]):
            return False
    return True


FILTERS: tuple[tuple[str, Callable[[Endpoint, dict, dict], bool]], ...] = (
    ("allowed_providers", lambda ep, p, e: not p.get("only") or _slug_match(p["only"], ep)),
    ("allowed_providers", lambda ep, p, e: not _slug_match(p.get("ignore") or [], ep)),
    ("data_policy:zdr", lambda ep, p, e: not p.get("zdr") or ep.zdr),
    ("data_policy:training", lambda ep, p, e: p.get("data_collection") != "deny"
     or not ep.trains),
    ("quantization", lambda ep, p, e: not p.get("quantizations")
     or ep.quantization in p["quantizations"]),
    ("max_price", lambda ep, p, e: _price_ok(ep, e, p.get("max_price") or {})),
)


def eligible_endpoints(model_id: str, entry: dict, provider: dict
                       ) -> tuple[list[Endpoint], str]:
    """(endpoints left after `provider`, the filter that removed the last one)."""
    left, reason = list(endpoints_for(model_id)), ""
    for name, keep in FILTERS:
        kept = [ep for ep in left if keep(ep, provider, entry)]
        if left and not kept:
            reason = name
        left = kept
    order = provider.get("order") or []
    left.sort(key=lambda ep: next((i for i, w in enumerate(order) if _slug_match([w], ep)),
                                  len(order)))
    return left, reason


def _availability_error(status: int, message: str, code: str, model: str,
                        **extra: Any) -> HttpError:
    return HttpError(status, _err(status, message, error_type="not_found" if status == 404
                                  else "provider_overloaded", http_status=status,
                                  availability=_availability(code, model, False, **extra)))


def routing_refusal(model: str, reason: str) -> HttpError:
    """OpenRouter's answer when `provider` leaves no endpoint for `model`."""
    if reason == "allowed_providers":
        return _availability_error(404, "No allowed providers are available for the selected "
                                   "model.", "constraint_filtered", model,
                                   excluded_by=["allowed_providers"])
    if reason.startswith("data_policy"):
        label = "Zero data retention" if reason.endswith("zdr") else "Paid model training"
        return _availability_error(404, f"No endpoints found matching your data policy "
                                   f"({label}). Configure: {PROVIDER_DOCS}",
                                   "privacy_restricted", model, excluded_by=[reason])
    return _availability_error(404, f"No endpoints found for {model}.", "constraint_filtered",
                               model, excluded_by=[reason])


def routed_model(catalog: dict[str, dict], model_id: str) -> dict | None:
    """Presets (`x@preset/y`, `@preset/y`), aliases (`~a/b-latest`) and `openrouter/auto`."""
    head = model_id.split("@", 1)[0]
    if model_id.startswith("@preset/"):
        return catalog.get("openai/gpt-4o")
    if head != model_id:
        return lookup_model(catalog, head)
    if model_id.startswith("~"):
        family = model_id[1:].removesuffix("-latest")
        found = [m for i, m in catalog.items() if i.startswith(family) and ":" not in i]
        return max(found, key=lambda m: m.get("created") or 0) if found else None
    if model_id == "openrouter/auto":
        return catalog.get("openai/gpt-4o")
    return None


def served_model(catalog: dict[str, dict], body: dict) -> str:
    """The concrete model a router or alias picks (presets serve their base model)."""
    model = body["model"]
    if model == "openrouter/auto":
        plugin = next((p for p in body.get("plugins") or () if isinstance(p, dict)
                       and p.get("id") == "auto-router"), {})
        for pattern in plugin.get("allowed_models") or ["openai/gpt-4o"]:
            hit = next((i for i in catalog if re.fullmatch(
                re.escape(pattern).replace(r"\*", ".*"), i)), None)
            if hit:
                return hit
        return "openai/gpt-4o"
    if model.startswith("~"):
        entry = routed_model(catalog, model)
        return entry["id"] if entry else model
    if model.startswith("@preset/"):
        return "openai/gpt-4o"
    return model.split("@", 1)[0]


@dataclass
class Route:
    """How one request was routed (becomes `openrouter_metadata` when asked)."""

    requested: str
    strategy: str
    endpoints: list[Endpoint]
    served: Endpoint | None
    attempts: list[tuple[str, str, int]] = field(default_factory=list)  # provider, model, status
    metadata: bool = False

    def as_metadata(self, model: str) -> dict:
        available = [{"provider": ep.slug, "model": model, "selected": ep is self.served}
                     for ep in self.endpoints]
        meta: dict[str, Any] = {
            "requested": self.requested, "strategy": self.strategy, "region": None,
            "summary": f"{self.strategy}: served by {self.served.slug if self.served else '-'}",
            "attempt": max(len(self.attempts), 1), "is_byok": False,
            "endpoints": {"total": len(self.endpoints), "available": available}}
        if self.attempts:
            meta["attempts"] = [{"provider": p, "model": m, "status": s}
                                for p, m, s in self.attempts]
        return meta


STRATEGIES = {"openrouter/auto": "auto"}


def route_request(emu: Emulator, ctx: Ctx, headers: Any) -> HttpError | None:
    """Apply `provider` to the model's endpoints; remember the route on `ctx`."""
    body = ctx.body
    model = served_model(emu.catalog, body)
    if model != ctx.model_id:
        ctx.model_id, ctx.entry = model, lookup_model(emu.catalog, model) or ctx.entry
    provider = body.get("provider") if isinstance(body.get("provider"), dict) else {}
    endpoints, reason = eligible_endpoints(model, ctx.entry, provider)
    if not endpoints:
        return routing_refusal(body["model"], reason)
    requested = body["model"]
    strategy = STRATEGIES.get(requested) or ("alias" if requested.startswith("~") else "direct")
    ctx.route = Route(requested, strategy, endpoints, endpoints[0],
                      metadata=headers.get("X-OpenRouter-Metadata", "") == "enabled")
    return None


def finish_route(emu: Emulator, ctx: Ctx, final: dict) -> None:
    """The final response object: cache tokens and cost, then the router metadata."""
    usage = final.get("usage")
    if usage and ctx.body.get("cache_control"):
        apply_prompt_cache(emu.route_cache, ctx, usage)
    route = ctx.route
    if route is not None and route.metadata and final.get("status") == "completed":
        final["openrouter_metadata"] = route.as_metadata(ctx.model_id)


def _prefix_key(model: str, body: dict, n: int) -> str:
    items = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return f"{model}|{json.dumps([body.get('instructions'), items[:n]], sort_keys=True)}"


def apply_prompt_cache(cache_store: dict[str, float], ctx: Ctx, usage: dict) -> None:
    """Anthropic automatic caching: the longest prefix written before is read (0.1x); the
    rest of the input is written (1.25x for 5m, 2x for 1h) and readable until its TTL."""
    body, now = ctx.body, time.time()
    items = body["input"] if isinstance(body["input"], list) else [body["input"]]
    ttl = 3600 if (body.get("cache_control") or {}).get("ttl") == "1h" else 300
    hit = next((n for n in range(len(items), 0, -1)
                if cache_store.get(_prefix_key(ctx.model_id, body, n), 0) > now), 0)
    cached = input_tokens({**body, "input": items[:hit]}) if hit else 0
    written = max(usage["input_tokens"] - cached, 0)
    cache_store[_prefix_key(ctx.model_id, body, len(items))] = now + ttl
    price = ctx.entry.get("pricing") or {}
    prompt = float(price.get("prompt") or 0)
    read = float(price.get("input_cache_read") or prompt)
    write = float(price.get("input_cache_write") or prompt) * (1.6 if ttl == 3600 else 1)
    delta = cached * (read - prompt) + written * (write - prompt)
    usage["input_tokens_details"] = {"cached_tokens": cached, "cache_write_tokens": written}
    usage["cost"] = round(usage["cost"] + delta, 12)
    details = usage.get("cost_details") or {}
    for key in ("upstream_inference_cost", "upstream_inference_input_cost"):
        if isinstance(details.get(key), float):
            details[key] = round(details[key] + delta, 12)


@scenario("primary_down", "status")
def sc_primary_down(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    """The requested model fails at every provider: the first of `models` answers."""
    status = o.get_int("status", 502)
    fallbacks = [m for m in ctx.body.get("models") or () if lookup_model(emu.catalog, m)]
    if not fallbacks:
        return Plan(http_error=error_response(status, ctx.model_id))
    primary, route = ctx.model_id, ctx.route
    ctx.model_id, ctx.entry = fallbacks[0], lookup_model(emu.catalog, fallbacks[0]) or {}
    endpoints = list(endpoints_for(ctx.model_id))
    failed = route.served.slug if route and route.served else primary.split("/", 1)[0]
    ctx.route = Route(ctx.body["model"], "fallback", endpoints, endpoints[0],
                      [(failed, primary, status), (endpoints[0].slug, ctx.model_id, 200)],
                      metadata=bool(route and route.metadata))
    return Plan([message(default_text(ctx))])


@scenario("provider_retry", "status")
def sc_provider_retry(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    """The first eligible provider fails; OpenRouter retries on the next one."""
    route = ctx.route
    if route is not None and len(route.endpoints) > 1:
        first, second = route.endpoints[0], route.endpoints[1]
        route.served = second
        route.attempts = [(first.slug, ctx.model_id, o.get_int("status", 502)),
                          (second.slug, ctx.model_id, 200)]
    return Plan([message(default_text(ctx))])


AVAILABILITY_STATUS = {"model_not_found": 400, "wrong_endpoint": 400, "no_endpoints": 404,
                       "model_deprecated": 404, "model_unavailable_upstream": 404,
                       "capacity_exhausted": 429, "temporarily_unavailable": 503,
                       "region_restricted": 403, "privacy_restricted": 404,
                       "constraint_filtered": 404, "free_variant_ended": 404}


@scenario("unavailable", "code", "fallbacks")
def sc_unavailable(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    """An availability error: `code` (see AVAILABILITY_STATUS), suggested `fallbacks`."""
    code = o.get_str("code", "model_deprecated")
    if code not in AVAILABILITY_STATUS:
        raise ScenarioError(f"unknown availability code {code!r}")
    status, model = AVAILABILITY_STATUS[code], ctx.body["model"]
    suggested = [f for f in o.get_str("fallbacks", "openai/gpt-4o").split(",") if f]
    message_text = {"free_variant_ended": f"The free variant of {model} is no longer "
                                          "available.",
                    "model_deprecated": f"{model} has been deprecated."
                    }.get(code, f"{model} is unavailable ({code}).")
    extra: dict[str, Any] = {"fallback_models": suggested}
    headers = {}
    if status in (429, 503):
        extra["retry_after"] = 30
        headers["Retry-After"] = "30"
    err = _availability_error(status, message_text, code, model, **extra)
    err.body["error"]["availability"]["retryable"] = status in (429, 503)
    err.headers.update(headers)
    return Plan(http_error=err)


@scenario("free_limit", "window")
def sc_free_limit(emu: Emulator, ctx: Ctx, o: Opts) -> Plan:
    """A `:free` model's platform limit: `window=min` (20/min) or `day` (50/day)."""
    if o.get_str("window", "day") == "min":
        return Plan(http_error=error_response(429, ctx.model_id))
    midnight_ms = (int(time.time()) // 86400 + 1) * 86_400_000
    body = _err(429, "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 "
                     "free model requests per day")
    return Plan(http_error=HttpError(429, body, {
        "X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(midnight_ms)}))



# =========================================================================== 9a. keys & credits
# Spend control (issue #13): GET /key, GET /credits and the management API
# POST/GET /keys, GET/PATCH/DELETE /keys/{hash}, shaped as the SDK's models. Provisioned keys
# really stop: once a key's usage in its limit window reaches its limit, inference answers 402
# with OpenRouter's message. Management keys can't call inference (403).

KEY_LIMIT_MESSAGE = "Key limit exceeded ({reset} limit). Manage it using https://openrouter.ai/settings/keys"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _window_start(window: str, now: float) -> float:
    """Start (epoch) of the UTC day / Monday week / month containing `now`; 0 for all time."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "daily":
        return day.timestamp()
    if window == "weekly":
        return (day - timedelta(days=day.weekday())).timestamp()
    if window == "monthly":
        return day.replace(day=1).timestamp()
    return 0.0


@dataclass
class EmuKey:
    hash: str
    secret: str
    name: str
    limit: float | None = None
    limit_reset: str | None = None
    include_byok_in_limit: bool = False
    disabled: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float | None = None
    last_used_at: float | None = None
    charges: list[tuple[float, float]] = field(default_factory=list)  # (time, cost)

    def usage(self, window: str = "", now: float | None = None) -> float:
        start = _window_start(window, time.time() if now is None else now)
        return round(sum(c for t, c in self.charges if t >= start), 10)

    def limit_remaining(self) -> float | None:
        if self.limit is None:
            return None
        return max(round(self.limit - self.usage(self.limit_reset or ""), 10), 0.0)

    def record(self) -> dict:
        """The SDK's key record (CreateKeysData / GetKeyData / ListData / UpdateKeysData)."""
        usage = {f"usage{w}": self.usage(n) for w, n in (("", ""), ("_daily", "daily"),
                 ("_weekly", "weekly"), ("_monthly", "monthly"))}
        return {"hash": self.hash, "name": self.name, "label": f"{self.secret[:11]}...",
                "disabled": self.disabled, "limit": self.limit,
                "limit_remaining": self.limit_remaining(), "limit_reset": self.limit_reset,
                "include_byok_in_limit": self.include_byok_in_limit, **usage,
                **{f"byok_usage{w}": 0.0 for w in ("", "_daily", "_weekly", "_monthly")},
                "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at),
                "last_used_at": _iso(self.last_used_at), "creator_user_id": USER_ID,
                "external_user": None, "workspace_id": WORKSPACE_ID, "expires_at": None}


WORKSPACE_ID = "00000000-0000-4000-8000-00000000e001"
LIMIT_RESETS = (None, "daily", "weekly", "monthly")


class KeyBook:
    """The account: its credits, management keys and provisioned keys."""

    def __init__(self, credits: float = 100.0) -> None:
        self.total_credits = credits
        self.total_usage = 0.0
        self.management_keys: set[str] = set()
        self.keys: dict[str, EmuKey] = {}      # by hash
        self.by_secret: dict[str, str] = {}    # secret -> hash

    def knows(self, secret: str) -> bool:
        return secret in self.management_keys or secret in self.by_secret

    def create(self, body: dict) -> EmuKey:
        secret = "sk-or-v1-" + _rand("0123456789abcdef", 64)
        key = EmuKey(_rand("0123456789abcdef", 64), secret, str(body["name"]),
                     body.get("limit"), body.get("limit_reset"),
                     bool(body.get("include_byok_in_limit", False)))
        self.keys[key.hash], self.by_secret[secret] = key, key.hash
        return key

    def inference_refusal(self, secret: str) -> web.Response | None:
        """Why this key may not call inference (management, disabled, limit reached)."""
        if secret in self.management_keys:
            return _json_response(403, _err(
                403, "Management keys cannot be used for inference; use a regular API key."))
        key = self.keys.get(self.by_secret.get(secret, ""))
        if key is None:
            return None
        if key.disabled:
            return _json_response(401, {"error": {"message": "User not found.", "code": 401}})
        if key.limit is not None and key.limit_remaining() <= 0:
            reset = key.limit_reset or "total"
            return _json_response(402, _err(402, KEY_LIMIT_MESSAGE.format(reset=reset)))
        return None

    def charge(self, secret: str, cost: float) -> None:
        self.total_usage += cost
        key = self.keys.get(self.by_secret.get(secret, ""))
        if key is not None:
            key.charges.append((time.time(), cost))
            key.last_used_at = time.time()

    def current(self, secret: str, spent_all: float) -> dict:
        """GET /key data (GetCurrentKeyData) for this key."""
        key = self.keys.get(self.by_secret.get(secret, ""))
        rec = key.record() if key else {
            "limit": None, "limit_remaining": None, "limit_reset": None,
            "include_byok_in_limit": False,
            **{f"usage{w}": spent_all for w in ("", "_daily", "_weekly", "_monthly")},
            **{f"byok_usage{w}": 0.0 for w in ("", "_daily", "_weekly", "_monthly")}}
        keep = ("limit", "limit_remaining", "limit_reset", "include_byok_in_limit",
                *(f"{p}usage{w}" for p in ("", "byok_") for w in ("", "_daily", "_weekly",
                                                                  "_monthly")))
        budgets = [self._budget(key)] if key and key.limit is not None else []
        return {**{k: rec[k] for k in keep}, "label": f"{secret[:11]}...{secret[-3:]}",
                "is_free_tier": False, "is_management_key": secret in self.management_keys,
                "is_provisioning_key": secret in self.management_keys,
                "creator_user_id": USER_ID, "organization_id": None,
                "workspace_id": WORKSPACE_ID, "allowed_data_regions": ["global"],
                "budgets": budgets, "effective_budget": budgets[0] if budgets else None,
                "free_model_daily_requests": {"limit": 1000, "used": 0, "remaining": 1000},
                "rate_limit": {"requests": -1, "interval": "10s", "note": "deprecated"},
                "expires_at": None}

    @staticmethod
    def _budget(key: EmuKey) -> dict:
        return {"scope": "api_key", "budget_id": None, "guardrail_id": None,
                "include_byok": key.include_byok_in_limit, "limit_usd": key.limit,
                "spend_usd": key.usage(key.limit_reset or ""),
                "remaining_usd": key.limit_remaining(), "reset_interval": key.limit_reset,
                "resets_at": None}


def key_body_error(body: Any, *, create: bool) -> str | None:
    """What OpenRouter would reject in a POST/PATCH /keys body (None when it is valid)."""
    if not isinstance(body, dict):
        return "Invalid JSON body"
    allowed = ({"name", "limit", "limit_reset", "include_byok_in_limit", "expires_at",
                "workspace_id", "external", "creator_user_id"} if create else
               {"name", "disabled", "limit", "limit_reset", "include_byok_in_limit",
                "workspace_id"})
    if unknown := set(body) - allowed:
        return f"Unrecognized key(s) in object: {', '.join(sorted(unknown))}"
    if create and not (isinstance(body.get("name"), str) and body["name"].strip()):
        return "name: Required"
    limit = body.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)
                              or limit < 0):
        return "limit: Expected a non-negative number"
    if body.get("limit_reset") not in LIMIT_RESETS:
        return "limit_reset: Invalid enum value. Expected 'daily' | 'weekly' | 'monthly'"
    return None


class KeysRoutes:
    """aiohttp handlers for the account endpoints, mixed into Emulator."""

    keys: KeyBook
    generations: dict[str, dict]

    def add_keys_routes(self, app: web.Application) -> None:
        app.router.add_get(f"{API_PREFIX}/credits", self._get_credits)
        app.router.add_get(f"{API_PREFIX}/keys", self._list_keys)
        app.router.add_post(f"{API_PREFIX}/keys", self._create_key)
        app.router.add_route("*", f"{API_PREFIX}/keys/{{hash}}", self._one_key)

    def _management_error(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        secret = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not secret:
            return _json_response(401, {"error": {"message": "No auth credentials found",
                                                  "code": 401}})
        if secret not in self.keys.management_keys:
            return _json_response(403, _err(403, "Only management keys can perform this "
                                                 "operation"))
        return None

    async def _get_credits(self, request: web.Request) -> web.Response:
        self._record(request)  # type: ignore[attr-defined]
        if err := self._management_error(request):
            return err
        return _json_response(200, {"data": {"total_credits": self.keys.total_credits,
                                             "total_usage": round(self.keys.total_usage, 10)}})

    async def _list_keys(self, request: web.Request) -> web.Response:
        self._record(request)  # type: ignore[attr-defined]
        if err := self._management_error(request):
            return err
        show_disabled = request.query.get("include_disabled") == "true"
        offset = int(request.query.get("offset") or 0)
        rows = [k.record() for k in self.keys.keys.values() if show_disabled or not k.disabled]
        return _json_response(200, {"data": rows[offset:offset + 100]})

    async def _create_key(self, request: web.Request) -> web.Response:
        rec = self._record(request)  # type: ignore[attr-defined]
        if err := self._management_error(request):
            return err
        try:
            body = rec["json"] = json.loads(await request.read())
        except ValueError:
            body = None
        if problem := key_body_error(body, create=True):
            return _json_response(400, _err(400, problem))
        key = self.keys.create(body)
        return _json_response(201, {"data": key.record(), "key": key.secret})

    async def _one_key(self, request: web.Request) -> web.Response:
        rec = self._record(request)  # type: ignore[attr-defined]
        if err := self._management_error(request):
            return err
        key = self.keys.keys.get(request.match_info["hash"])
        if key is None:
            return _json_response(404, _err(404, "API key not found"))
        if request.method == "GET":
            return _json_response(200, {"data": key.record()})
        if request.method == "DELETE":
            self.keys.keys.pop(key.hash)
            self.keys.by_secret.pop(key.secret, None)
            return _json_response(200, {"deleted": True})
        if request.method != "PATCH":
            return _json_response(405, _err(405, "Method not allowed"))
        try:
            body = rec["json"] = json.loads(await request.read())
        except ValueError:
            body = None
        if problem := key_body_error(body, create=False):
            return _json_response(400, _err(400, problem))
        for name in ("name", "disabled", "limit", "limit_reset", "include_byok_in_limit"):
            if name in body:
                setattr(key, name, body[name])
        key.updated_at = time.time()
        return _json_response(200, {"data": key.record()})


# =========================================================================== 9b. generation records
# GET /generation?id= answers as OpenRouter does (SDK GenerationResponse, every field): 404
# while the generation is still streaming (the record is written when it ends), then its cost.
# A stream the client stopped is billed for the prompt plus what had been streamed, and the
# record says `cancelled: true` (issue #13: stopped answers are still billed).

GENERATION_NULLABLE = (
    "app_id", "cache_discount", "external_user", "generation_time", "http_referer", "latency",
    "moderation_latency", "native_finish_reason", "native_tokens_cached",
    "native_tokens_completion", "native_tokens_completion_images", "native_tokens_prompt",
    "native_tokens_reasoning", "num_fetches", "num_input_audio_prompt",
    "num_media_completion", "num_media_prompt", "num_search_results", "preset_id",
    "provider_responses", "router", "service_tier", "upstream_id", "upstream_inference_cost",
    "user_agent", "web_search_engine", "workspace_id")


def generation_record(ctx: Ctx, final: dict, streamed: bool) -> dict:
    """The GET /generation data of a finished response (GenerationResponseData)."""
    usage = final.get("usage") or {}
    cost = float(usage.get("cost") or 0)
    finish = {"completed": "stop", "incomplete": "length"}.get(final["status"], "error")
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens", 0)
    return {**dict.fromkeys(GENERATION_NULLABLE), "id": ctx.gen_id, "total_cost": cost,
            "usage": cost, "created_at": datetime.fromtimestamp(ctx.created, UTC).isoformat(),
            "model": ctx.model_id, "provider_name": ctx.vendor.title(), "api_type": "responses",
            "streamed": streamed, "cancelled": False, "finish_reason": finish,
            "native_finish_reason": finish, "tokens_prompt": usage.get("input_tokens", 0),
            "tokens_completion": usage.get("output_tokens", 0),
            "native_tokens_prompt": usage.get("input_tokens", 0),
            "native_tokens_completion": usage.get("output_tokens", 0),
            "native_tokens_reasoning": reasoning, "is_byok": False, "origin": "",
            "data_region": "global",
            "external_user": ctx.body.get("user"), "session_id": ctx.body.get("session_id")}


def streamed_tokens(ev: dict) -> int:
    """Output tokens an event carried to the client (text and reasoning deltas)."""
    if ev.get("type") in ("response.output_text.delta", "response.reasoning_text.delta",
                          "response.reasoning_summary_text.delta"):
        return _tokens(str(ev.get("delta") or ""))
    return 0


def stopped_generation(gen: dict, ctx: Ctx, sent_tokens: int) -> float:
    """Bill a stopped stream: prompt + the tokens already streamed; returns the refund."""
    price = ctx.entry.get("pricing") or {}
    prompt = int(gen.get("tokens_prompt") or 0)
    cost = float(Decimal(str(price.get("prompt", "0"))) * prompt
                 + Decimal(str(price.get("completion", "0"))) * sent_tokens)
    cost = min(cost, float(gen["total_cost"]))
    refund = float(gen["total_cost"]) - cost
    gen.update(total_cost=cost, usage=cost, cancelled=True, finish_reason=None,
               native_finish_reason=None, tokens_completion=sent_tokens,
               native_tokens_completion=sent_tokens)
    return refund


# =========================================================================== 9. emulator


class Emulator(KeysRoutes):
    """aiohttp server faithful to OpenRouter's ``/api/v1`` (see the module docstring).

    Observability: ``requests`` (every request: path, method, headers, json, scenario, time),
    ``disconnects`` (timestamps of clients that went away mid-response), ``active_streams``,
    ``generations`` (GET /generation data by id), ``responses`` (final response objects sent);
    ``reset()`` clears them and the queue.
    """

    def __init__(self, *, extra_models: int = 0, api_keys: set[str] | None = None):
        self.models = load_catalog(extra_models)
        self.catalog = {m["id"]: m for m in self.models}
        self.api_keys = set(api_keys) if api_keys else None
        self.keys = KeyBook()  # issue #13: credits, management and provisioned keys
        self.requests: list[dict] = []
        self.disconnects: list[float] = []
        self.active_streams = 0
        self.fail_counts: dict[str, int] = {}
        self.generations: dict[str, dict] = {}
        self.live_generations: dict[str, int] = {}  # 9b: streaming now -> tokens streamed
        self.responses: list[dict] = []  # every final response object sent, oldest first
        self.base_url = ""
        self._queue: list[tuple[str, dict]] = []
        self.route_cache: dict[str, float] = {}  # issue #12: prompt-cache prefix -> expiry
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle / API
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = any free port); returns ``http://host:port/api/v1``."""
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.app(), handler_cancellation=True,
                                     shutdown_timeout=2.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.base_url = f"http://{host}:{self._runner.addresses[0][1]}{API_PREFIX}"
        return self.base_url

    async def stop(self) -> None:
        if self._closing:
            self._closing.set()  # releases "hang" handlers
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def enqueue(self, name: str, **opts: Any) -> None:
        """Use scenario ``name`` with ``opts`` for the next valid ``POST /responses``."""
        self._queue.append((name, opts))

    def reset(self) -> None:
        for store in (self.requests, self.disconnects, self.fail_counts, self.generations,
                      self._queue, self.responses, self.route_cache, self.live_generations):
            store.clear()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get(f"{API_PREFIX}/models", self._get_models)
        app.router.add_get(f"{API_PREFIX}/key", self._get_key)
        app.router.add_get(f"{API_PREFIX}/generation", self._get_generation)
        app.router.add_post(f"{API_PREFIX}/responses", self._post_responses)
        self.add_keys_routes(app)
        add_image_routes(app)  # 6b (issue #14)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    # ------------------------------------------------------------------ simple endpoints
    def _record(self, request: web.Request) -> dict:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec = {"path": request.path, "method": request.method, "headers": dict(request.headers),
               "json": None, "scenario": None, "time": time.time(),
               "peer": list(peer[:2]) if peer else None}  # same peer = a reused connection
        self.requests.append(rec)
        return rec

    def _auth_error(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            message = "No auth credentials found"
        elif self.api_keys is not None and key not in self.api_keys and not self.keys.knows(key):
            message = "User not found."
        else:
            return None
        return _json_response(401, {"error": {"message": message, "code": 401}})

    async def _not_found(self, request: web.Request) -> web.Response:
        self._record(request)
        return _json_response(404, {"error": {"code": 404, "message": "Resource not found"}})

    async def _get_models(self, request: web.Request) -> web.Response:
        self._record(request)
        rows = filter_models(self.models, request.query)
        payload = {"data": rows, "total_count": len(rows), "links": {"next": None}}
        return _json_response(200, payload, {"Cache-Control": "public, max-age=300",
                                             "Access-Control-Allow-Origin": "*"})

    async def _get_key(self, request: web.Request) -> web.Response:
        self._record(request)
        if err := self._auth_error(request):
            return err
        key = request.headers["Authorization"][7:].strip()
        spent = round(sum(g["total_cost"] for g in self.generations.values()), 10)
        return _json_response(200, {"data": self.keys.current(key, spent)})

    async def _get_generation(self, request: web.Request) -> web.Response:
        self._record(request)
        if err := self._auth_error(request):
            return err
        gen_id = request.query.get("id", "")
        gen = None if gen_id in self.live_generations else self.generations.get(gen_id)
        if gen is None:
            return _json_response(404, _err(404, "Generation not found"))
        return _json_response(200, {"data": gen})

    def _remember(self, ctx: Ctx, final: dict, streamed: bool) -> None:
        """Record what GET /generation?id= returns for this id (§2.5 subset)."""
        self.responses.append(final)
        self.generations[ctx.gen_id] = gen = generation_record(ctx, final, streamed)  # 9b
        self.keys.charge(ctx.api_key, gen["total_cost"])

    # ------------------------------------------------------------------ POST /responses
    async def _post_responses(self, request: web.Request) -> web.StreamResponse:
        rec = self._record(request)
        if err := self._auth_error(request):
            return err
        secret = request.headers["Authorization"][7:].strip()
        if err := self.keys.inference_refusal(secret):
            return err
        try:
            body = rec["json"] = json.loads(await request.read())
        except ValueError:
            return _json_response(400, _err(400, "Invalid JSON in request body"))
        if err := validation_error(body, self.catalog):
            return _json_response(err.status, err.body, err.headers)
        ctx, (name, opts) = self._context(request, body)
        ctx.api_key = secret
        rec["scenario"] = name
        if err := route_request(self, ctx, request.headers):  # issue #12 (section 10)
            return _json_response(err.status, err.body, err.headers)
        try:
            plan, quirks = build_plan(self, ctx, name, opts)
        except ValueError as exc:  # ScenarioError or a non-integer option
            return _json_response(400, _err(400, f"[emulator] {exc}"))
        if e := plan.http_error:
            return _json_response(e.status, e.body, e.headers)
        if plan.raw_reply is not None:  # wrong_body (issue #11)
            status, ctype, data = plan.raw_reply
            return web.Response(status=status, body=data, headers={"Content-Type": ctype})
        if plan.first_byte_delay_ms:
            await asyncio.sleep(plan.first_byte_delay_ms / 1000)
        if body.get("stream"):
            return await self._stream(request, ctx, plan, quirks)
        return await self._respond(request, ctx, plan, quirks)

    def _context(self, request: web.Request, body: dict) -> tuple[Ctx, tuple[str, dict]]:
        raw_text = last_user_text(body.get("input"))
        header = request.headers.get("X-Emulator-Scenario", "").strip()
        directive = _DIRECTIVE.search(raw_text)
        if self._queue:
            spec = self._queue.pop(0)
        elif header:
            spec = parse_spec(header)
        else:
            spec = parse_spec(directive.group(1)) if directive else (default_scenario(body), {})
        model_id = body["model"]
        ctx = Ctx(body, model_id, lookup_model(self.catalog, model_id) or {}, new_gen_id(),
                  int(time.time()), _DIRECTIVE.sub("", raw_text).strip(),
                  scenario_key=f"{model_id}|{header}|{raw_text}")
        return ctx, spec

    def _headers(self, ctx: Ctx, content_type: str) -> dict[str, str]:
        return {"Content-Type": content_type, "X-Generation-Id": ctx.gen_id,
                "Access-Control-Expose-Headers": EXPOSE, "Access-Control-Allow-Origin": "*"}

    async def _respond(self, request: web.Request, ctx: Ctx, plan: Plan, q: Quirks
                       ) -> web.StreamResponse:
        """Non-stream: the final object (HTTP 200 even when failed); truncate cuts it."""
        if plan.ending == "hang":
            await self._wait_for_disconnect()
            return _json_response(524, _err(524, "Request timed out. Please try again later."))
        _, final = assemble(ctx, plan, q)
        finish_route(self, ctx, final)  # issue #12 (section 10)
        self._remember(ctx, final, streamed=False)
        body, headers = dumps(final), self._headers(ctx, "application/json")
        if plan.ending != "truncate":
            return web.Response(status=200, body=body, headers=headers)
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()
        return resp

    async def _wait_for_disconnect(self) -> None:
        """Block until the client goes away (handler cancelled) or the emulator stops."""
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
            if plan.ending == "hang":  # headers + one comment, then silence
                await writer.comment("OPENROUTER PROCESSING")
                await writer.flush()
                await self._wait_for_disconnect()
                return resp
            await self._write_events(ctx, plan, q, writer)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            if plan.ending != "hang":  # (hang already recorded it)
                self.disconnects.append(time.time())
                if gen := self.generations.get(ctx.gen_id):  # 9b: billed what was streamed
                    sent = self.live_generations.get(ctx.gen_id, 0)
                    self.keys.charge(ctx.api_key, -stopped_generation(gen, ctx, sent))
            raise
        finally:
            self.active_streams -= 1
            self.live_generations.pop(ctx.gen_id, None)
        return resp

    async def _write_events(self, ctx: Ctx, plan: Plan, q: Quirks, writer: SSEWriter) -> None:
        events, final = assemble(ctx, plan, q)
        finish_route(self, ctx, final)  # issue #12 (section 10): same dict as the last event
        self._remember(ctx, final, streamed=True)
        self.live_generations[ctx.gen_id] = 0  # 9b
        for _ in range(q.leading):
            await writer.comment()
        for i, ev in enumerate(events):
            if plan.delay_ms and i:
                await writer.flush()
                await asyncio.sleep(plan.delay_ms / 1000)
            await writer.event(ev)
            self.live_generations[ctx.gen_id] += streamed_tokens(ev)  # 9b
        if plan.tail_delay_ms:
            await writer.flush()
            await asyncio.sleep(plan.tail_delay_ms / 1000)
        if plan.done and not q.no_done:
            await writer.done()
        await writer.flush()


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class EmulatorThread:
    """Runs an :class:`Emulator` on its own event loop in a daemon thread, for synchronous
    callers (e.g. e2e tests driving a separate Open WebUI process).  All accessors hop onto
    the emulator's loop, so they are thread-safe."""

    def __init__(self, *, extra_models: int = 0, api_keys: set[str] | None = None):
        self.emulator = Emulator(extra_models=extra_models, api_keys=api_keys)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def _run(self, coro_or_fn: Any, timeout: float = 30) -> Any:
        assert self._loop is not None, "EmulatorThread not started"
        coro = coro_or_fn if asyncio.iscoroutine(coro_or_fn) else _call(coro_or_fn)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="openrouter-emulator")
        self._thread.start()
        self.base_url = self._run(self.emulator.start(host, port))
        return self.base_url

    def stop(self) -> None:
        if self._loop is None:
            return
        self._run(self.emulator.stop())
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

    requests = property(lambda self: self._run(lambda: list(self.emulator.requests)))
    disconnects = property(lambda self: self._run(lambda: list(self.emulator.disconnects)))
    active_streams = property(lambda self: self._run(lambda: self.emulator.active_streams))
    responses = property(lambda self: self._run(lambda: list(self.emulator.responses)))


# =========================================================================== CLI


async def _serve(args: argparse.Namespace) -> None:
    emu = Emulator(extra_models=args.extra_models, api_keys=set(args.api_key) or None)
    print(f"EMULATOR_URL={await emu.start(args.host, args.port)}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await emu.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Local OpenRouter API emulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--extra-models", type=int, default=0, help="append N synthetic models")
    ap.add_argument("--api-key", action="append", default=[], help="allow-listed key (repeat)")
    asyncio.run(_serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
