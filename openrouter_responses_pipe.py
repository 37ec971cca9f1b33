"""
title: OpenRouter Responses
author: openrouter-responses-pipe contributors
version: 0.1.0
required_open_webui_version: 0.6.28
license: MIT
requirements: aiohttp, cryptography, pydantic
description: OpenRouter's catalog in Open WebUI via the Responses API: streaming, thinking, costs.
"""

# Table of contents. The file reads in the order a request flows through it; `Pipe` is last.
#
#   §1  Imports and constants
#   §2  Errors            one tree rooted at PipeError
#   §3  Settings          Valves, UserValves, EncryptedStr, RequestSettings.merge
#   §4  Wire types        frozen dataclasses for what crosses a boundary
#   §5  Catalog           /models JSON -> CatalogEntry; selection; refresher with TTL and backoff
#   §6  Transformer       Open WebUI chat body -> Responses request (pure)
#   §7  Intake            message content parts -> Responses input parts (pure)
#   §8  Client            transport (injectable), retry policy, upstream error mapping
#   §9  Stream decoding   SSEDecoder.feed(bytes) -> events; reducer = table of handlers
#   §10 Tool executor     tool schemas, strict mode, runner with timeouts and breakers
#   §11 Artifact store    codec, markers, SQLAlchemy store, Redis write-behind
#   §12 Rendering         intents -> Open WebUI chunks; usage; status line; error text
#   §13 Admission         global + per-user concurrency gate with a bounded wait queue
#   §14 Telemetry         redacted request-scoped logs, log pump, counters, health snapshot
#   §15 Pipe              the numbered steps of a request and nothing else

# ─────────────────────────────────────────────────────────────────────────────
# §1 Imports and constants
# ─────────────────────────────────────────────────────────────────────────────
from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import random
import re
import sys
import time
import typing
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, GetCoreSchemaHandler, field_validator
from pydantic_core import core_schema

try:  # Open WebUI ships orjson; it parses SSE payloads several times faster than json.
    import orjson

    _loads: Callable[[str | bytes], Any] = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


LOG = logging.getLogger("openrouter_responses_pipe")

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
EFFORT_ORDER: tuple[str, ...] = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
STATUS_ENTRY_PREFIX = "_status"  # selector entries that explain a configuration problem
_SAMPLING_PARAMS = ("temperature", "top_p", "top_k", "stop", "frequency_penalty",
                    "presence_penalty", "parallel_tool_calls")

# ─────────────────────────────────────────────────────────────────────────────
# §2 Errors
#
#   PipeError                   user-facing message + hint
#   ├── ConfigError             bad or missing valves
#   ├── ModelNotAvailable       not in the catalog / not enabled
#   ├── AdmissionRejected       too busy, or the per-user limit
#   ├── UpstreamError           OpenRouter said no
#   │   ├── UpstreamStatusError     HTTP error before streaming
#   │   ├── UpstreamConnectionError network failure before any response
#   │   └── UpstreamStreamError     failure after the first byte
#   ├── IntakeError             an attachment was refused
#   │   ├── UnsafeURLError
#   │   └── PayloadTooLargeError
#   ├── ToolError
#   └── ArtifactStoreError
#
# `describe_error` (§12) is the one place that turns these into what the user reads.
# ─────────────────────────────────────────────────────────────────────────────


class PipeError(Exception):
    """Base of every error the pipe reports; `message` is for the user, `hint` says what to do."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class ConfigError(PipeError):
    """A valve is missing or malformed; only an admin can fix it."""


class ModelNotAvailable(PipeError):
    """The requested model is not in the catalog or not enabled by MODEL_ID."""


class AdmissionRejected(PipeError):
    """Too many answers in flight; the user should retry shortly."""


class UpstreamError(PipeError):
    """OpenRouter (or the network to it) failed; `attempts` counts the requests sent."""

    attempts: int = 1


@dataclass(eq=False)
class UpstreamStatusError(UpstreamError):
    """OpenRouter answered with an HTTP error before any event was streamed."""

    status: int
    provider_message: str
    raw: str = ""
    provider_name: str = ""
    error_type: str = ""
    retry_after: float | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        PipeError.__init__(self, self.provider_message or f"HTTP {self.status}")


class UpstreamConnectionError(UpstreamError):
    """The request never got an HTTP response (DNS, connect, TLS, read timeout)."""


class UpstreamStreamError(UpstreamError):
    """The stream failed after it started: `response.failed`, an error event, or a cut-off."""

    def __init__(self, message: str, *, code: str = "", error_type: str = "",
                 hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.error_type = error_type


class IntakeError(PipeError):
    """An attachment could not be sent to the model."""


class UnsafeURLError(IntakeError):
    """A remote URL points somewhere the server must not fetch."""


class PayloadTooLargeError(IntakeError):
    """An attachment exceeds a size limit."""


class ToolError(PipeError):
    """A tool call failed (timeout, unknown tool, breaker open, bad arguments)."""


class ArtifactStoreError(PipeError):
    """Database, Redis or crypto trouble in the artifact store; never fatal to a chat."""


# ─────────────────────────────────────────────────────────────────────────────
# §3 Settings
#
# Admin Valves hold every default. UserValves mirror the user-tunable subset; each user field
# defaults to "inherit", which means "use the admin's value". `RequestSettings.merge` resolves
# both once per request into a frozen object; nothing below `pipe()` reads `self.valves`.
# ─────────────────────────────────────────────────────────────────────────────

INHERIT = "inherit"
Effort = Literal["auto", "none", "minimal", "low", "medium", "high", "xhigh", "max"]
SummaryMode = Literal["auto", "concise", "detailed", "disabled"]
TaskEffort = Literal["lowest", "none", "minimal", "low", "medium"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
RetentionMode = Literal["conversation", "next_reply", "disabled"]
_PASSWORD: dict[str, Any] = {"input": {"type": "password"}}


def _fernet_from_secret() -> Any | None:
    """Fernet keyed by Open WebUI's WEBUI_SECRET_KEY, or None when no secret is configured."""
    secret = os.environ.get("WEBUI_SECRET_KEY", "")
    if not secret:
        return None
    from cryptography.fernet import Fernet

    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))


class EncryptedStr(str):
    """A secret valve stored as `encrypted:<fernet token>` keyed by WEBUI_SECRET_KEY.

    Validation encrypts plaintext (so what Open WebUI stores is ciphertext); `reveal()` returns
    the plaintext and raises ConfigError when the secret key changed since it was stored.
    """

    PREFIX = "encrypted:"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler
                                     ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls._encrypt, core_schema.str_schema())

    @classmethod
    def _encrypt(cls, value: str) -> EncryptedStr:
        if not value or value.startswith(cls.PREFIX):
            return cls(value)
        fernet = _fernet_from_secret()
        if fernet is None:
            return cls(value)
        return cls(cls.PREFIX + fernet.encrypt(value.encode()).decode())

    def reveal(self) -> str:
        if not self.startswith(self.PREFIX):
            return str(self)
        from cryptography.fernet import InvalidToken

        fernet = _fernet_from_secret()
        try:
            if fernet is None:
                raise InvalidToken
            return fernet.decrypt(self[len(self.PREFIX):].encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "The stored OpenRouter API key can't be decrypted (WEBUI_SECRET_KEY changed).",
                hint="An admin must re-enter API_KEY in the pipe's valves.") from None


class Valves(BaseModel):
    """Admin settings (Admin → Functions → OpenRouter → Valves)."""

    API_KEY: EncryptedStr = Field(
        default_factory=lambda: EncryptedStr(os.environ.get("OPENROUTER_API_KEY", "")),
        description="OpenRouter API key (sk-or-…). Stored encrypted with WEBUI_SECRET_KEY.",
        json_schema_extra=_PASSWORD)
    BASE_URL: str = Field(
        default_factory=lambda: os.environ.get("OPENROUTER_API_BASE_URL", DEFAULT_BASE_URL),
        description="OpenRouter API base URL. Change only for a proxy or a local emulator.")
    MODEL_ID: str = Field(
        default="auto",
        description="Models to show: `auto` for the whole catalog, or a comma list of "
                    "OpenRouter ids (e.g. `openai/gpt-4o, deepseek/deepseek-r1:free`). "
                    "Unknown ids are reported, never replaced by the whole catalog.")
    MODEL_NAME_PREFIX: str = Field(
        default="", description="Text put before every model name in the selector.")
    MODEL_CATALOG_REFRESH_SECONDS: int = Field(
        default=3600, ge=60, le=86400,
        description="How long the model catalog is cached before it is fetched again.")
    REASONING_EFFORT: Effort = Field(
        default="auto",
        description="Default reasoning effort for reasoning models. `auto` leaves it to the "
                    "model; an effort the model doesn't offer is mapped to the nearest one.")
    REASONING_SUMMARY: SummaryMode = Field(
        default="auto",
        description="Reasoning summaries for models that produce them (shown as the "
                    "thinking block). `disabled` stops requesting them.")
    TASK_REASONING_EFFORT: TaskEffort = Field(
        default="lowest",
        description="Reasoning effort for titles, tags and follow-ups. `lowest` turns "
                    "reasoning off where the model allows it, else uses its lowest effort.")
    SHOW_FINAL_STATUS: bool = Field(
        default=True,
        description="Show a final status line with time, tokens, cost and tokens/s.")
    MAX_RETRIES: int = Field(
        default=2, ge=0, le=6,
        description="Retries for 429/5xx/network errors before the first byte. A stream "
                    "that already started is never retried.")
    RETRY_MAX_WAIT_SECONDS: float = Field(
        default=20.0, ge=0, le=300,
        description="Longest wait before a retry. A Retry-After longer than this is not "
                    "waited for; the user is told when to retry instead.")
    HTTP_CONNECT_TIMEOUT_SECONDS: float = Field(
        default=15.0, ge=1, le=120, description="Timeout to connect to OpenRouter.")
    HTTP_READ_TIMEOUT_SECONDS: float = Field(
        default=300.0, ge=5, le=3600,
        description="Longest silence allowed while reading a response (keep-alives count).")
    MAX_CONCURRENT_REQUESTS: int = Field(
        default=64, ge=1, le=10000, description="Answers generated at once, all users.")
    MAX_QUEUED_REQUESTS: int = Field(
        default=64, ge=0, le=10000,
        description="Requests that may wait for a free slot; beyond that users get 'busy'.")
    QUEUE_WAIT_SECONDS: float = Field(
        default=20.0, ge=0, le=600,
        description="Longest wait for a free slot before the user is told to retry.")
    MAX_CONCURRENT_REQUESTS_PER_USER: int = Field(
        default=4, ge=1, le=1000, description="Answers one user may generate at once.")
    HTTP_REFERER: str = Field(
        default="https://openwebui.com/",
        description="Sent as HTTP-Referer for OpenRouter app attribution.")
    APP_TITLE: str = Field(
        default="Open WebUI", description="Sent as X-OpenRouter-Title for app attribution.")
    LOG_LEVEL: LogLevel = Field(
        default_factory=lambda: _env_log_level(),
        description="Lowest level the pipe logs (server log and each turn's own log). "
                    "Default: Open WebUI's GLOBAL_LOG_LEVEL, else INFO.")
    REQUEST_LOG_CITATION: Literal["off", "errors", "always"] = Field(
        default="errors",
        description="Attach the turn's own log (redacted) to the message as a collapsible "
                    "source: on errors, always (for debugging), or never.")
    SHOW_HEALTH_MODEL: bool = Field(
        default=True,
        description="List an admin-only 'pipe health' entry in the model selector that "
                    "answers with requests in flight, error counts and latencies.")
    STICKY_SESSION_ROUTING: bool = Field(
        default=True,
        description="Send a session_id derived from the chat id so a conversation stays on "
                    "one provider (better prompt-cache hits). The chat id itself is not sent.")

    # ── Tools (issue #3) ──────────────────────────────────────────────────────

    # ── Multimodal intake (issue #4) ──────────────────────────────────────────

    # ── Artifact store and Redis (issue #5) ───────────────────────────────────
    ARTIFACT_ENCRYPTION_KEY: EncryptedStr = Field(
        default=EncryptedStr(""),
        description="Encrypts stored reasoning (everything with ENCRYPT_ALL). Several keys "
                    "separated by commas: the first encrypts, all decrypt (key rotation). "
                    "Empty: nothing is encrypted.",
        json_schema_extra=_PASSWORD)
    ENCRYPT_ALL: bool = Field(
        default=False, description="Encrypt tool calls and results too, not only reasoning.")
    COMPRESSION_MIN_BYTES: int = Field(
        default=1024, ge=0, le=10_000_000,
        description="Stored items at least this large are compressed (LZ4 if installed, "
                    "else zlib).")
    REASONING_RETENTION: RetentionMode = Field(
        default="conversation",
        description="Send the model's earlier reasoning back: for the whole conversation, "
                    "for the next reply only, or never (then it is not stored).")
    TOOL_OUTPUT_RETENTION_TURNS: int = Field(
        default=10, ge=0, le=1000,
        description="Long tool results older than this many replies are shortened (with a "
                    "note the model sees) when the chat is replayed. 0 keeps them whole.")
    ARTIFACT_CLEANUP_DAYS: int = Field(
        default=90, ge=0, le=36500,
        description="Delete stored items not used for this many days (0: never).")
    ARTIFACT_CLEANUP_INTERVAL_HOURS: float = Field(
        default=24.0, ge=0.1, le=720, description="How often the cleanup runs (plus jitter).")
    REDIS_WRITE_BEHIND: bool = Field(
        default=True,
        description="With several workers sharing Redis (REDIS_URL, WEBSOCKET_MANAGER=redis, "
                    "UVICORN_WORKERS>1): queue writes in Redis and flush them in batches.")
    REDIS_CACHE_TTL_SECONDS: int = Field(
        default=600, ge=0, le=86400, description="How long Redis caches stored items.")


class UserValves(BaseModel):
    """Per-user settings; `inherit` uses the admin's value."""

    REASONING_EFFORT: Literal["inherit", "auto", "none", "minimal", "low", "medium", "high",
                              "xhigh", "max"] = Field(
        default="inherit", description="Your reasoning effort (`inherit` = admin default).")
    REASONING_SUMMARY: Literal["inherit", "auto", "concise", "detailed", "disabled"] = Field(
        default="inherit", description="Your reasoning summaries (`inherit` = admin default).")
    SHOW_FINAL_STATUS: Literal["inherit", "on", "off"] = Field(
        default="inherit", description="Your final status line (`inherit` = admin default).")

    # ── Tools (issue #3) ──

    # ── Multimodal intake (issue #4) ──

    # ── Artifact store (issue #5) ──
    REASONING_RETENTION: Literal["inherit", "conversation", "next_reply", "disabled"] = Field(
        default="inherit",
        description="Send the model's earlier reasoning back (`inherit` = admin default).")

    LOG_LEVEL: Literal["inherit", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="inherit",
        description="Your own log level (admins only; `inherit` = admin LOG_LEVEL). Raise it "
                    "to DEBUG and set REQUEST_LOG_CITATION to see each turn's log in chat.")

    @field_validator("*", mode="before")
    @classmethod
    def _normalise_inherit(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", INHERIT)):
            return INHERIT
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().upper() in LEVELS:
            return value.strip().upper()
        return value.strip().lower() if isinstance(value, str) else value


def _env_log_level() -> LogLevel:
    level = os.environ.get("GLOBAL_LOG_LEVEL", "INFO").upper()
    for known in typing.get_args(LogLevel):
        if level == known:
            return known
    return "INFO"


def _artifact_keys(raw: str) -> tuple[str, ...] | None:
    """ARTIFACT_ENCRYPTION_KEY -> its keys (first encrypts); None when it can't be decrypted."""
    try:
        plain = EncryptedStr(raw).reveal()
    except ConfigError:
        LOG.error("ARTIFACT_ENCRYPTION_KEY can't be decrypted (WEBUI_SECRET_KEY changed): "
                  "nothing is stored or replayed until an admin re-enters it")
        return None
    keys = tuple(k.strip() for k in plain.split(",") if k.strip())
    for key in keys:
        register_secret(key)
    return keys


def _pick(user_value: str, admin_value: Any) -> Any:
    return admin_value if user_value == INHERIT else user_value


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_active: int
    max_queued: int
    wait_seconds: float
    per_user: int


@dataclass(frozen=True, slots=True)
class RequestSettings:
    """Everything one request needs from Valves ⊕ UserValves, resolved once."""

    base_url: str
    api_key: str
    reasoning_effort: str
    reasoning_summary: str
    task_reasoning_effort: str
    show_final_status: bool
    max_retries: int
    retry_max_wait: float
    connect_timeout: float
    read_timeout: float
    admission: AdmissionLimits
    http_referer: str
    app_title: str
    sticky_sessions: bool
    session_secret: str
    log_level: int
    log_citation: str
    catalog_ttl: float
    # ── Tools (issue #3) ──

    # ── Multimodal intake (issue #4) ──

    # ── Artifact store (issue #5) ──
    artifact_keys: tuple[str, ...] | None = ()  # None: configured but unreadable
    encrypt_all: bool = False
    compression_min_bytes: int = 1024
    reasoning_retention: str = "conversation"
    tool_output_retention_turns: int = 10
    artifact_cleanup_days: int = 90
    artifact_cleanup_interval_hours: float = 24.0
    redis_write_behind: bool = True
    redis_cache_ttl: int = 600

    @classmethod
    def merge(cls, valves: Valves, user: UserValves | None, user_role: str = "user"
              ) -> RequestSettings:
        user = user or UserValves()
        show = _pick(user.SHOW_FINAL_STATUS, "on" if valves.SHOW_FINAL_STATUS else "off")
        api_key = EncryptedStr(valves.API_KEY).reveal().strip()
        register_secret(api_key)
        register_secret(os.environ.get("WEBUI_SECRET_KEY", ""))
        return cls(
            base_url=valves.BASE_URL.rstrip("/"),
            api_key=api_key,
            reasoning_effort=_pick(user.REASONING_EFFORT, valves.REASONING_EFFORT),
            reasoning_summary=_pick(user.REASONING_SUMMARY, valves.REASONING_SUMMARY),
            task_reasoning_effort=valves.TASK_REASONING_EFFORT,
            show_final_status=show == "on",
            max_retries=valves.MAX_RETRIES,
            retry_max_wait=valves.RETRY_MAX_WAIT_SECONDS,
            connect_timeout=valves.HTTP_CONNECT_TIMEOUT_SECONDS,
            read_timeout=valves.HTTP_READ_TIMEOUT_SECONDS,
            admission=AdmissionLimits(valves.MAX_CONCURRENT_REQUESTS, valves.MAX_QUEUED_REQUESTS,
                                      valves.QUEUE_WAIT_SECONDS,
                                      valves.MAX_CONCURRENT_REQUESTS_PER_USER),
            http_referer=valves.HTTP_REFERER,
            app_title=valves.APP_TITLE,
            sticky_sessions=valves.STICKY_SESSION_ROUTING,
            session_secret=os.environ.get("WEBUI_SECRET_KEY", ""),
            log_level=request_level(valves.LOG_LEVEL, user.LOG_LEVEL, user_role),
            log_citation=valves.REQUEST_LOG_CITATION,
            catalog_ttl=valves.MODEL_CATALOG_REFRESH_SECONDS,
            # ── Tools (issue #3) ──

            # ── Multimodal intake (issue #4) ──

            # ── Artifact store (issue #5) ──
            artifact_keys=_artifact_keys(valves.ARTIFACT_ENCRYPTION_KEY),
            encrypt_all=valves.ENCRYPT_ALL,
            compression_min_bytes=valves.COMPRESSION_MIN_BYTES,
            reasoning_retention=_pick(user.REASONING_RETENTION, valves.REASONING_RETENTION),
            tool_output_retention_turns=valves.TOOL_OUTPUT_RETENTION_TURNS,
            artifact_cleanup_days=valves.ARTIFACT_CLEANUP_DAYS,
            artifact_cleanup_interval_hours=valves.ARTIFACT_CLEANUP_INTERVAL_HOURS,
            redis_write_behind=valves.REDIS_WRITE_BEHIND,
            redis_cache_ttl=valves.REDIS_CACHE_TTL_SECONDS,
        )

    def require_api_key(self) -> str:
        if not self.api_key:
            raise ConfigError("No OpenRouter API key is configured.",
                              hint="An admin must set API_KEY in Admin → Functions → "
                                   "OpenRouter → Valves.")
        return self.api_key


# ─────────────────────────────────────────────────────────────────────────────
# §4 Wire types
# ─────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Pricing:
    """USD per unit as OpenRouter reports it (per token for token prices)."""

    prompt: float = 0.0
    completion: float = 0.0
    request: float = 0.0
    image: float = 0.0
    web_search: float | None = None
    internal_reasoning: float = 0.0
    input_cache_read: float = 0.0


@dataclass(frozen=True, slots=True)
class ReasoningSpec:
    mandatory: bool = False
    supported_efforts: tuple[str, ...] | None = None
    default_effort: str | None = None
    supports_max_tokens: bool = False


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One OpenRouter model with the capabilities the pipe derives from it."""

    id: str
    name: str
    canonical_slug: str
    description: str
    context_length: int | None
    max_output_tokens: int | None
    input_modalities: frozenset[str]
    output_modalities: frozenset[str]
    supported_parameters: frozenset[str]
    pricing: Pricing
    reasoning: ReasoningSpec | None
    created: int = 0

    @property
    def supports_reasoning(self) -> bool:
        return self.reasoning is not None or "reasoning" in self.supported_parameters

    @property
    def reasoning_summaries(self) -> bool:
        """Only OpenAI-style reasoning models return summaries; others stream raw thinking."""
        return self.supports_reasoning and self.id.split("/", 1)[0] in ("openai", "azure")

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.supported_parameters

    @property
    def supports_structured_outputs(self) -> bool:
        return bool({"structured_outputs", "response_format"} & self.supported_parameters)

    @property
    def supports_web_search(self) -> bool:
        return self.pricing.web_search is not None

    @property
    def image_output(self) -> bool:
        return "image" in self.output_modalities

    def accepts(self, modality: str) -> bool:
        return modality in self.input_modalities


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    url: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class UnsupportedPart:
    """A content part the pipe can't send yet; reported to the user, never dropped silently."""

    kind: str


ContentPart = TextPart | ImagePart | UnsupportedPart


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    parts: tuple[ContentPart, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """Open WebUI's chat body and call context, parsed once at the boundary."""

    owui_model_id: str
    model_id: str
    messages: tuple[ChatMessage, ...]
    stream: bool
    params: Mapping[str, Any]
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    response_format: Mapping[str, Any] | None = None
    task: str | None = None
    chat_id: str | None = None
    user_id: str = "anonymous"
    user_role: str = "user"


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost: float | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> Usage | None:
        if not raw:
            return None
        cost = raw.get("cost")
        return cls(
            input_tokens=int(raw.get("input_tokens") or 0),
            output_tokens=int(raw.get("output_tokens") or 0),
            reasoning_tokens=int((raw.get("output_tokens_details") or {})
                                 .get("reasoning_tokens") or 0),
            cached_tokens=int((raw.get("input_tokens_details") or {}).get("cached_tokens") or 0),
            cost=float(cost) if isinstance(cost, int | float) else None)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cached_tokens += other.cached_tokens
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None


# ─────────────────────────────────────────────────────────────────────────────
# §5 Catalog
# ─────────────────────────────────────────────────────────────────────────────


def _price(raw: Mapping[str, Any], key: str) -> float:
    try:
        return max(float(raw.get(key) or 0), 0.0)
    except (TypeError, ValueError):
        return 0.0


def _parse_pricing(raw: Mapping[str, Any] | None) -> Pricing:
    raw = raw or {}
    return Pricing(
        prompt=_price(raw, "prompt"), completion=_price(raw, "completion"),
        request=_price(raw, "request"), image=_price(raw, "image"),
        web_search=_price(raw, "web_search") if "web_search" in raw else None,
        internal_reasoning=_price(raw, "internal_reasoning"),
        input_cache_read=_price(raw, "input_cache_read"))


def _parse_reasoning(raw: Any, params: frozenset[str]) -> ReasoningSpec | None:
    if isinstance(raw, Mapping):
        efforts = raw.get("supported_efforts")
        return ReasoningSpec(
            mandatory=bool(raw.get("mandatory")),
            supported_efforts=tuple(efforts) if isinstance(efforts, list) else None,
            default_effort=raw.get("default_effort"),
            supports_max_tokens=bool(raw.get("supports_max_tokens")))
    return ReasoningSpec() if "reasoning" in params else None


def parse_catalog_entry(raw: Mapping[str, Any]) -> CatalogEntry:
    """One `/models` object -> CatalogEntry. Raises KeyError/TypeError on a malformed entry."""
    arch = raw.get("architecture") or {}
    top = raw.get("top_provider") or {}
    params = frozenset(raw.get("supported_parameters") or ())
    return CatalogEntry(
        id=str(raw["id"]),
        name=str(raw.get("name") or raw["id"]),
        canonical_slug=str(raw.get("canonical_slug") or raw["id"]),
        description=str(raw.get("description") or ""),
        context_length=raw.get("context_length") or top.get("context_length"),
        max_output_tokens=top.get("max_completion_tokens"),
        input_modalities=frozenset(arch.get("input_modalities") or ("text",)),
        output_modalities=frozenset(arch.get("output_modalities") or ("text",)),
        supported_parameters=params,
        pricing=_parse_pricing(raw.get("pricing")),
        reasoning=_parse_reasoning(raw.get("reasoning"), params),
        created=int(raw.get("created") or 0))


def parse_catalog(payload: Any) -> tuple[CatalogEntry, ...]:
    """`/models` JSON -> entries that can produce text, sorted by name; malformed ones skipped."""
    rows = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(rows, list):
        raise UpstreamError("OpenRouter's model list had an unexpected shape.")
    entries: list[CatalogEntry] = []
    for row in rows:
        try:
            entry = parse_catalog_entry(row)
        except (KeyError, TypeError, ValueError, AttributeError):
            LOG.warning("Skipping a malformed catalog entry: %.200r", row)
            continue
        if "text" in entry.output_modalities:
            entries.append(entry)
    entries.sort(key=lambda e: (e.name.lower(), e.id))
    return tuple(entries)


def select_models(entries: Iterable[CatalogEntry], model_ids: str
                  ) -> tuple[tuple[CatalogEntry, ...], tuple[str, ...]]:
    """Apply the MODEL_ID valve. Returns (selected, ids that matched nothing).

    `auto` or empty selects everything; otherwise ids match exactly, then case-insensitively.
    An unknown id is never widened to the whole catalog.
    """
    entries = tuple(entries)
    wanted = [w.strip() for w in model_ids.split(",") if w.strip()]
    if not wanted or [w.lower() for w in wanted] == ["auto"]:
        return entries, ()
    by_id = {e.id: e for e in entries}
    by_lower = {e.id.lower(): e for e in entries}
    selected: dict[str, CatalogEntry] = {}
    unknown: list[str] = []
    for wid in wanted:
        hit = by_id.get(wid) or by_lower.get(wid.lower())
        if hit is None:
            unknown.append(wid)
        else:
            selected.setdefault(hit.id, hit)
    return tuple(selected.values()), tuple(unknown)


def openrouter_model_id(owui_model_id: str) -> str:
    """`<function id>.<openrouter id>` -> `<openrouter id>`; function ids never contain a dot."""
    return owui_model_id.split(".", 1)[1] if "." in owui_model_id else owui_model_id


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    entries: tuple[CatalogEntry, ...]
    by_id: Mapping[str, CatalogEntry]
    fetched_at: float

    @classmethod
    def of(cls, entries: tuple[CatalogEntry, ...], now: float) -> CatalogSnapshot:
        return cls(entries, {e.id: e for e in entries}, now)

    def find(self, model_id: str) -> CatalogEntry | None:
        hit = self.by_id.get(model_id)
        if hit is None:
            lowered = model_id.lower()
            hit = next((e for e in self.entries if e.id.lower() == lowered), None)
        return hit


class CatalogRegistry:
    """Cached catalog: one refresh at a time, stale list served on failure with backoff.

    `get()` never waits when any catalog is cached: a stale one triggers a background refresh
    and is returned at once, so `pipes()` stays fast.
    """

    BACKOFF_BASE = 5.0
    BACKOFF_CAP = 300.0

    def __init__(self, fetch: Callable[[RequestSettings], Awaitable[Any]],
                 clock: Callable[[], float]) -> None:
        self._fetch = fetch
        self._clock = clock
        self.snapshot: CatalogSnapshot | None = None
        self.last_error: PipeError | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._inflight: asyncio.Task[CatalogSnapshot] | None = None

    def is_fresh(self, ttl: float) -> bool:
        return self.snapshot is not None and self._clock() - self.snapshot.fetched_at < ttl

    async def get(self, settings: RequestSettings, ttl: float) -> CatalogSnapshot:
        snap = self.snapshot
        if snap is not None:
            if not self.is_fresh(ttl) and self._clock() >= self._next_attempt:
                self._start_refresh(settings)
            return snap
        if self._clock() < self._next_attempt and self.last_error is not None:
            raise self.last_error
        return await asyncio.shield(self._start_refresh(settings))

    def _start_refresh(self, settings: RequestSettings) -> asyncio.Task[CatalogSnapshot]:
        task = self._inflight
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._refresh(settings))
            task.add_done_callback(_consume_task_exception)
            self._inflight = task
        return task

    async def _refresh(self, settings: RequestSettings) -> CatalogSnapshot:
        try:
            entries = parse_catalog(await self._fetch(settings))
        except PipeError as exc:
            self._record_failure(exc)
            raise
        self.snapshot = CatalogSnapshot.of(entries, self._clock())
        self._failures, self.last_error, self._next_attempt = 0, None, 0.0
        LOG.info("Model catalog refreshed: %d models", len(entries))
        return self.snapshot

    def _record_failure(self, exc: PipeError) -> None:
        self._failures += 1
        delay = min(self.BACKOFF_BASE * 2 ** (self._failures - 1), self.BACKOFF_CAP)
        self._next_attempt = self._clock() + delay
        self.last_error = exc
        LOG.warning("Model catalog refresh failed (%s); next attempt in %.0fs", exc, delay)


def _consume_task_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved; the failure was already logged


# ─────────────────────────────────────────────────────────────────────────────
# §6 Transformer (pure)
#
# Open WebUI body field       → Responses request field
#   system/developer messages → instructions (joined by blank lines)
#   user/assistant/tool       → typed `input` items
#   max_tokens                → max_output_tokens (clamped to the model's limit)
#   reasoning_effort / valve  → reasoning.effort (mapped onto the model's supported efforts)
#   response_format           → text.format
#   sampling params           → same name, only when supported_parameters lists them
# ─────────────────────────────────────────────────────────────────────────────

_REASONING_DETAILS = re.compile(
    r'<details\s+type="reasoning"[^>]*>.*?</details>\s*', re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Transformed:
    """The request to send plus one-line notes for the user about what was left out."""

    payload: dict[str, Any]
    notes: tuple[str, ...] = ()
    replayed_reasoning: tuple[str, ...] = ()  # stored reasoning ids sent back (issue #5)


def nearest_effort(wanted: str, spec: ReasoningSpec) -> str:
    """Map an effort onto what the model supports: mandatory models never get `none`."""
    allowed = list(spec.supported_efforts or EFFORT_ORDER)
    if spec.mandatory and "none" in allowed:
        allowed.remove("none")
    if wanted in allowed or not allowed:
        return wanted
    rank = EFFORT_ORDER.index(wanted) if wanted in EFFORT_ORDER else 3
    return min(allowed, key=lambda e: (abs(EFFORT_ORDER.index(e) - rank)
                                       if e in EFFORT_ORDER else 99, EFFORT_ORDER.index(e)
                                       if e in EFFORT_ORDER else 99))


def lowest_effort(spec: ReasoningSpec) -> str:
    return nearest_effort("none", spec)


def build_reasoning(req: ChatRequest, entry: CatalogEntry, settings: RequestSettings
                    ) -> dict[str, Any] | None:
    """`reasoning` object for this model, or None when the model doesn't reason."""
    if not entry.supports_reasoning:
        return None
    spec = entry.reasoning or ReasoningSpec()
    if req.task:
        wanted = settings.task_reasoning_effort
        return {"effort": lowest_effort(spec) if wanted == "lowest"
                else nearest_effort(wanted, spec)}
    effort = req.reasoning_effort or settings.reasoning_effort
    reasoning: dict[str, Any] = {}
    if effort and effort != "auto":
        reasoning["effort"] = nearest_effort(effort, spec)
    if (entry.reasoning_summaries and settings.reasoning_summary != "disabled"
            and reasoning.get("effort") != "none"):
        reasoning["summary"] = settings.reasoning_summary
    return reasoning or None


def build_text_format(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Chat `response_format` -> Responses `text.format` (flat json_schema)."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        fmt: dict[str, Any] = {"type": "json_schema", "name": spec.get("name") or "response",
                               "schema": spec.get("schema") or {}}
        if "strict" in spec:
            fmt["strict"] = bool(spec["strict"])
        if spec.get("description"):
            fmt["description"] = spec["description"]
        return fmt
    return None


def strip_reasoning_blocks(text: str) -> str:
    """Drop rendered thinking blocks from replayed assistant text."""
    return _REASONING_DETAILS.sub("", text) if "<details" in text else text


def history_items(messages: Iterable[ChatMessage], entry: CatalogEntry
                  ) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """Messages -> (instruction texts, input items, notes about parts left out)."""
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    notes: list[str] = []
    for msg in messages:
        if msg.role in ("system", "developer"):
            if msg.text.strip():
                instructions.append(msg.text)
        elif msg.role == "user":
            parts, left_out = input_parts(msg.parts, entry)
            notes.extend(left_out)
            if parts:
                items.append({"type": "message", "role": "user", "content": parts})
        elif msg.role == "assistant":
            items.extend(assistant_items(msg))
        elif msg.role == "tool" and msg.tool_call_id:
            items.append({"type": "function_call_output", "call_id": msg.tool_call_id,
                          "output": msg.text})
    return instructions, items, notes


def assistant_items(msg: ChatMessage) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    text = strip_reasoning_blocks(msg.text).strip()
    if text:
        out.append({"type": "message", "role": "assistant", "content": text})
    out.extend({"type": "function_call", "call_id": call.id, "name": call.name,
                "arguments": call.arguments or "{}"} for call in msg.tool_calls)
    return out


def _session_id(req: ChatRequest, settings: RequestSettings) -> str | None:
    if not (settings.sticky_sessions and req.chat_id):
        return None
    key = (settings.session_secret or "openrouter-responses-pipe").encode()
    return hmac.new(key, req.chat_id.encode(), hashlib.sha256).hexdigest()[:32]


def build_responses_request(req: ChatRequest, entry: CatalogEntry, settings: RequestSettings,
                            artifacts: Mapping[str, Mapping[str, Any]] | None = None
                            ) -> Transformed:
    """The pure core: a parsed chat request + its catalog entry -> the Responses request.

    `artifacts` are the stored items named by markers in earlier replies (loaded by the
    caller); `replay_items` (§11) puts them back where they happened.
    """
    instructions, items, notes = history_items(req.messages, entry)
    items = replay_items(items, artifacts or {}, ReplayPolicy.of(settings, entry.id))
    if not items:
        items.append({"type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": ""}]})
    payload: dict[str, Any] = {"model": entry.id, "input": items,
                               "stream": req.stream and not req.task, "store": False}
    if instructions:
        payload["instructions"] = "\n\n".join(instructions)
    _apply_limits(payload, req, entry)
    reasoning = build_reasoning(req, entry, settings)
    if reasoning is not None:
        payload["reasoning"] = reasoning
        if not req.task:
            payload["include"] = ["reasoning.encrypted_content"]
    _apply_sampling(payload, req, entry)
    session = _session_id(req, settings)
    if session:
        payload["session_id"] = session
    return Transformed(payload, tuple(notes))


def _apply_limits(payload: dict[str, Any], req: ChatRequest, entry: CatalogEntry) -> None:
    if req.max_tokens:
        cap = entry.max_output_tokens
        payload["max_output_tokens"] = min(req.max_tokens, cap) if cap else req.max_tokens


def _apply_sampling(payload: dict[str, Any], req: ChatRequest, entry: CatalogEntry) -> None:
    supported = entry.supported_parameters
    for name in _SAMPLING_PARAMS:
        if name in req.params:
            if name in supported:
                payload[name] = req.params[name]
            else:
                LOG.debug("Dropping %s: %s does not support it", name, entry.id)
    if "seed" in req.params:
        LOG.debug("Dropping seed: the Responses API has no seed parameter")
    text_format = build_text_format(req.response_format)
    if text_format is not None:
        if entry.supports_structured_outputs:
            payload["text"] = {"format": text_format}
        else:
            LOG.debug("Dropping response_format: %s has no structured outputs", entry.id)


# ─────────────────────────────────────────────────────────────────────────────
# §7 Intake (pure part)
#
# Content parts Open WebUI sends -> Responses input parts, gated by the model's input
# modalities. A part the model can't take is left out with a note the user sees.
# ─────────────────────────────────────────────────────────────────────────────

_PART_LABELS = {"image": "an image", "file": "a file", "audio": "an audio clip",
                "video": "a video"}


def parse_content(content: Any) -> tuple[ContentPart, ...]:
    """Open WebUI message content (str or list of parts) -> typed parts."""
    if content is None:
        return ()
    if isinstance(content, str):
        return (TextPart(content),)
    parts: list[ContentPart] = []
    for raw in content if isinstance(content, list) else [content]:
        parts.append(_parse_part(raw))
    return tuple(parts)


def _parse_part(raw: Any) -> ContentPart:
    if isinstance(raw, str):
        return TextPart(raw)
    if not isinstance(raw, Mapping):
        return UnsupportedPart(type(raw).__name__)
    kind = raw.get("type")
    if kind in ("text", "input_text"):
        return TextPart(str(raw.get("text") or ""))
    if kind in ("image_url", "input_image"):
        image = raw.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        detail = image.get("detail") if isinstance(image, Mapping) else raw.get("detail")
        if isinstance(url, str) and url:
            return ImagePart(url, detail if detail in ("auto", "low", "high") else None)
    return UnsupportedPart(str(kind or "unknown"))


def input_parts(parts: Iterable[ContentPart], entry: CatalogEntry
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """Typed parts -> Responses parts for this model, plus notes for what was left out."""
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append({"type": "input_text", "text": part.text})
        elif isinstance(part, ImagePart) and entry.accepts("image"):
            image: dict[str, Any] = {"type": "input_image", "image_url": part.url,
                                     "detail": part.detail or "auto"}
            out.append(image)
        elif isinstance(part, ImagePart):
            notes.append(f"{entry.name} can't read images, so {_PART_LABELS['image']} "
                         "was left out of the request.")
        else:
            notes.append(f"An attachment of type '{part.kind}' can't be sent to the model "
                         "yet and was left out.")
    return out, notes


# ─────────────────────────────────────────────────────────────────────────────
# §8 Client
#
# `Transport` is the one HTTP seam: the default uses one pooled aiohttp session per event
# loop; tests inject fakes. Retries happen here and only before any byte reaches the user.
# ─────────────────────────────────────────────────────────────────────────────


class TransportResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Transport(Protocol):
    async def request(self, method: str, url: str, *, headers: Mapping[str, str],
                      body: bytes | None, connect_timeout: float, read_timeout: float
                      ) -> TransportResponse: ...

    async def aclose(self) -> None: ...


class _AiohttpResponse:
    __slots__ = ("_read_timeout", "_resp", "headers", "status")

    def __init__(self, resp: Any, read_timeout: float) -> None:
        self._resp = resp
        self._read_timeout = read_timeout
        self.status: int = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read(self) -> bytes:
        return bytes(await self._resp.read())

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TimeoutError as exc:  # aiohttp's read timeout subclasses both
            raise UpstreamStreamError(
                f"OpenRouter sent nothing for {self._read_timeout:.0f} seconds.",
                code="read_timeout", hint="The provider may be overloaded; retry, or raise "
                "HTTP_READ_TIMEOUT_SECONDS for very slow models.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamStreamError(f"The connection to OpenRouter broke ({_exc_text(exc)}).",
                                      code="network_error") from exc

    async def close(self) -> None:
        self._resp.close()


def _exc_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class AiohttpTransport:
    """Pooled aiohttp client; one session per event loop, created on first use."""

    def __init__(self, *, limit: int = 256) -> None:
        self._limit = limit
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300,
                                             keepalive_timeout=60)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
            self._loop = loop
        return self._session

    async def request(self, method: str, url: str, *, headers: Mapping[str, str],
                      body: bytes | None, connect_timeout: float, read_timeout: float
                      ) -> TransportResponse:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                        connect=connect_timeout, sock_read=read_timeout)
        try:
            resp = await self._get_session().request(method, url, headers=dict(headers),
                                                     data=body, timeout=timeout)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectionError(
                f"Couldn't reach OpenRouter ({_exc_text(exc)}).",
                hint="Check the server's network and BASE_URL, then retry.") from exc
        return _AiohttpResponse(resp, read_timeout)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds (number or HTTP date); None when absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def parse_upstream_error(status: int, body: bytes, headers: Mapping[str, str]
                         ) -> UpstreamStatusError:
    """An OpenRouter HTTP error body -> UpstreamStatusError with the provider's own words."""
    try:
        data = _loads(body) if body else {}
    except ValueError:
        data = {}
    found = data.get("error") if isinstance(data, Mapping) else None
    err: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    meta: Mapping[str, Any] = err.get("metadata") or {}
    meta = meta if isinstance(meta, Mapping) else {}
    message = str(err.get("message") or "").strip()
    if not message:
        message = body.decode("utf-8", "replace").strip()[:300] if body else ""
    retry_after = parse_retry_after(headers.get("Retry-After") or headers.get("retry-after"))
    availability: Mapping[str, Any] = err.get("availability") or {}
    availability = availability if isinstance(availability, Mapping) else {}
    if retry_after is None and isinstance(availability.get("retry_after"), int | float):
        retry_after = float(availability["retry_after"])
    return UpstreamStatusError(
        status=status, provider_message=message, raw=str(meta.get("raw") or "")[:500],
        provider_name=str(meta.get("provider_name") or ""),
        error_type=str(err.get("error_type") or meta.get("error_type") or ""),
        retry_after=retry_after, metadata=dict(meta))


def retry_delay(err: UpstreamError, attempt: int, settings: RequestSettings,
                rand: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait before retry `attempt` (0-based), or None when not retryable."""
    if attempt >= settings.max_retries:
        return None
    if isinstance(err, UpstreamStatusError):
        if err.status not in RETRYABLE_STATUSES:
            return None
        if err.retry_after is not None:
            return err.retry_after if err.retry_after <= settings.retry_max_wait else None
    elif not isinstance(err, UpstreamConnectionError):
        return None
    return min(0.5 * 2 ** attempt + rand() * 0.25, settings.retry_max_wait)


class OpenRouterClient:
    """Builds requests, retries before the first byte, maps failures to UpstreamError."""

    def __init__(self, transport: Transport, sleep: Callable[[float], Awaitable[None]], *,
                 observe: Callable[[int | str, float | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._transport = transport
        self._sleep = sleep
        self._observe = observe or (lambda status, seconds: None)
        self._clock = clock

    async def aclose(self) -> None:
        await self._transport.aclose()

    @staticmethod
    def headers(settings: RequestSettings, *, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json",
                   "Accept": "text/event-stream" if stream else "application/json",
                   "HTTP-Referer": settings.http_referer,
                   "X-OpenRouter-Title": settings.app_title, "X-Title": settings.app_title}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        return headers

    async def fetch_models(self, settings: RequestSettings) -> Any:
        resp = await self._send("GET", "/models", None, settings, stream=False)
        try:
            return _loads(await resp.read())
        except ValueError as exc:
            raise UpstreamError("OpenRouter's model list was not valid JSON.") from exc
        finally:
            await resp.close()

    async def open_response(self, payload: Mapping[str, Any], settings: RequestSettings
                            ) -> TransportResponse:
        """POST /responses; returns the open 200 response (caller closes it)."""
        settings.require_api_key()
        stream = bool(payload.get("stream"))
        return await self._send("POST", "/responses", _dumps(payload), settings, stream=stream)

    async def _send(self, method: str, path: str, body: bytes | None,
                    settings: RequestSettings, *, stream: bool) -> TransportResponse:
        url, headers = settings.base_url + path, self.headers(settings, stream=stream)
        attempt = 0
        while True:
            started = self._clock()
            try:
                resp = await self._transport.request(
                    method, url, headers=headers, body=body,
                    connect_timeout=settings.connect_timeout,
                    read_timeout=settings.read_timeout)
                self._observe(resp.status, self._clock() - started)
                if resp.status < 400:
                    return resp
                err: UpstreamError = await self._error_from(resp)
            except UpstreamConnectionError as exc:
                self._observe("network", None)
                err = exc
            delay = retry_delay(err, attempt, settings)
            if delay is None:
                raise _with_attempts(err, attempt + 1)
            LOG.info("OpenRouter %s %s failed (%s); retry %d in %.1fs",
                     method, path, err, attempt + 1, delay)
            await self._sleep(delay)
            attempt += 1

    @staticmethod
    async def _error_from(resp: TransportResponse) -> UpstreamStatusError:
        try:
            body = await resp.read()
        finally:
            await resp.close()
        return parse_upstream_error(resp.status, body, resp.headers)


def _with_attempts(err: UpstreamError, attempts: int) -> UpstreamError:
    err.attempts = attempts
    return err


# ─────────────────────────────────────────────────────────────────────────────
# §9 Stream decoding
#
# bytes ──SSEDecoder.feed──▶ SSEEvent ──json──▶ event dict ──HANDLERS[type]──▶ intents
#
# The decoder is pure and incremental: it buffers partial lines, so UTF-8 split across reads
# is decoded only once its line is complete. The reducer is a table of small handlers that
# update a StreamState and append intents; only the orchestrator (§15) performs them.
# ─────────────────────────────────────────────────────────────────────────────


class SSEDecoder:
    """Incremental Server-Sent-Events parser (WHATWG rules; no I/O, no JSON)."""

    __slots__ = ("_buf", "_data", "_event", "_started")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        if not self._started:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._buf = buf
                return []
            self._started = True
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
        if b"\r" in buf:
            buf = self._normalise_newlines(buf)
        end = buf.rfind(b"\n")
        if end < 0:
            self._buf = buf
            return []
        self._buf = buf[end + 1:]
        events: list[SSEEvent] = []
        for line in buf[:end].split(b"\n"):
            # Hot path inlined: OpenRouter sends only `data: <json>` lines and blank lines.
            if line.startswith(b"data: "):
                self._data.append(line[6:].decode("utf-8", "replace"))
            elif not line and self._data and self._event is None:
                data = self._data
                events.append(SSEEvent(data[0] if len(data) == 1 else "\n".join(data)))
                self._data = []
            else:
                self._line(line, events)
        return events

    @staticmethod
    def _normalise_newlines(buf: bytes) -> bytes:
        # A trailing "\r" may be the first half of "\r\n": keep it raw for the next read.
        tail = b"\r" if buf.endswith(b"\r") else b""
        body = buf[:-1] if tail else buf
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return body + b"\n" + tail if tail else body

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else "\n".join(self._data)
                events.append(SSEEvent(data, self._event))
                self._data = []
            self._event = None
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    def finish(self) -> list[SSEEvent]:
        """End of stream: an event without its closing blank line is discarded (SSE rules)."""
        self._buf, self._data, self._event = b"", [], None
        return []


# Intent kinds produced by the reducer and consumed by the renderer.
TEXT, REASONING = "text", "reasoning"
Intent = tuple[str, str]


@dataclass(slots=True)
class StreamState:
    """What the reducer knows about one Responses stream."""

    response_id: str = ""
    model: str = ""
    streamed_items: set[str] = field(default_factory=set)
    open_items: dict[int, str] = field(default_factory=dict)
    done_items: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    usage: Usage | None = None
    terminal: str | None = None  # completed | incomplete | failed
    incomplete_reason: str = ""
    error: UpstreamStreamError | None = None
    saw_done_marker: bool = False
    bad_events: int = 0

    @property
    def finished(self) -> bool:
        return self.terminal is not None or self.saw_done_marker


Handler = Callable[[StreamState, Mapping[str, Any], list[Intent]], None]


def _on_created(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    resp = ev.get("response") or {}
    state.response_id = resp.get("id") or state.response_id
    state.model = resp.get("model") or state.model


def _on_text_delta(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    state.streamed_items.add(ev.get("item_id", ""))
    out.append((TEXT, ev.get("delta") or ""))


def _on_reasoning_delta(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    state.streamed_items.add(ev.get("item_id", ""))
    out.append((REASONING, ev.get("delta") or ""))


def _on_summary_part_added(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    if ev.get("summary_index", 0) and ev.get("item_id") in state.streamed_items:
        out.append((REASONING, "\n\n"))


def _on_item_added(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    item = ev.get("item") or {}
    state.open_items[int(ev.get("output_index", len(state.open_items)))] = item.get("type", "")


def _on_item_done(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    item = ev.get("item") or {}
    index = int(ev.get("output_index", -1))
    state.open_items.pop(index, None)
    state.done_items[index] = item
    if item.get("id") in state.streamed_items:
        return
    kind = item.get("type")
    if kind == "message":  # the provider sent the text only in the closing item
        text = "".join(p.get("text") or p.get("refusal") or "" for p in item.get("content") or ())
        if text:
            out.append((TEXT, text))
    elif kind == "reasoning":
        text = reasoning_text(item)
        if text:
            out.append((REASONING, text))


def reasoning_text(item: Mapping[str, Any]) -> str:
    """Visible text of a reasoning item: its summaries, else its raw reasoning content."""
    parts = [p.get("text") or "" for p in item.get("summary") or () if isinstance(p, Mapping)]
    if not any(parts):
        parts = [p.get("text") or "" for p in item.get("content") or () if isinstance(p, Mapping)]
    return "\n\n".join(p for p in parts if p)


def _on_completed(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    resp = ev.get("response") or {}
    state.terminal = "completed"
    state.usage = Usage.from_json(resp.get("usage"))


def _on_incomplete(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    resp = ev.get("response") or {}
    state.terminal = "incomplete"
    state.usage = Usage.from_json(resp.get("usage"))
    state.incomplete_reason = str((resp.get("incomplete_details") or {}).get("reason") or "")


def _on_failed(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    resp = ev.get("response") or {}
    err = resp.get("error") or {}
    state.terminal = "failed"
    state.usage = Usage.from_json(resp.get("usage"))
    state.error = UpstreamStreamError(
        str(err.get("message") or "OpenRouter reported that the response failed."),
        code=str(err.get("code") or ""), error_type=str(resp.get("error_type") or ""))


def _on_error(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    inner = ev.get("error")
    nested: Mapping[str, Any] = inner if isinstance(inner, Mapping) else ev
    state.terminal = "failed"
    state.error = UpstreamStreamError(
        str(nested.get("message") or "OpenRouter sent an error event."),
        code=str(nested.get("code") or ""), error_type=str(ev.get("error_type") or ""))


HANDLERS: dict[str, Handler] = {
    "response.created": _on_created,
    "response.in_progress": _on_created,
    "response.output_item.added": _on_item_added,
    "response.output_text.delta": _on_text_delta,
    "response.refusal.delta": _on_text_delta,
    "response.reasoning_text.delta": _on_reasoning_delta,
    "response.reasoning_summary_text.delta": _on_reasoning_delta,
    "response.reasoning_summary_part.added": _on_summary_part_added,
    "response.output_item.done": _on_item_done,
    "response.completed": _on_completed,
    "response.incomplete": _on_incomplete,
    "response.failed": _on_failed,
    "response.error": _on_error,
    "error": _on_error,
}


def reduce_events(state: StreamState, events: Iterable[SSEEvent]) -> list[Intent]:
    """Apply decoded events to `state`; return the intents they produce, in order."""
    out: list[Intent] = []
    for sse in events:
        data = sse.data
        if data == "[DONE]":
            state.saw_done_marker = True
            break
        try:
            event = _loads(data)
            handler = HANDLERS.get(event["type"])
        except (ValueError, KeyError, TypeError):
            state.bad_events += 1
            LOG.warning("Ignoring an unreadable stream event: %.200r", data)
            continue
        if handler is not None:
            handler(state, event, out)
        if state.terminal is not None:
            break
    return out


def finish_stream(state: StreamState) -> None:
    """At end of stream: raise what the user must be told, or return if the answer is whole.

    EOF without a terminal event is a cut-off, except in OpenRouter's known quirk where every
    announced item was closed: then the answer is complete and only the usage is missing.
    """
    if state.terminal == "failed":
        raise state.error or UpstreamStreamError("The response failed.")
    if state.terminal == "completed" and not state.done_items and not state.streamed_items \
            and not (state.usage and state.usage.output_tokens):
        raise UpstreamStreamError(  # OpenRouter's known "network_error as empty completion"
            "The model returned an empty answer.", code="empty",
            hint="This is usually a passing provider problem: retry, or pick another model.")
    if state.terminal is not None:
        return
    if state.done_items and not state.open_items:
        LOG.warning("Stream ended without response.completed; all items were closed")
        return
    raise UpstreamStreamError("OpenRouter closed the stream before the answer was finished.",
                              code="truncated", hint="The answer above is incomplete; retry.")


# ─────────────────────────────────────────────────────────────────────────────
# §10 Tool executor
#
# (Issue #3 fills this section: Open WebUI tools -> Responses function tools, strict schemas,
# the runner with per-call timeouts, bounded parallelism and per-tool breakers.)
# ─────────────────────────────────────────────────────────────────────────────


# ─────────────────────────────────────────────────────────────────────────────
# §11 Artifact store
#
# Reasoning items and tool call/result items are stored so later turns can send them back.
# Each stored item is referenced from the assistant text by an invisible marker line (a
# Markdown link-reference definition `[orp:<id>]: #`), written where the item happened.
#
#   pure      codec (JSON -> LZ4/zlib -> Fernet, one header byte), markers, replay with
#             orphan repair and tool-output pruning, table naming
#   I/O       ArtifactDB (SQLAlchemy Core on Open WebUI's engine; sync <=0.8 in a thread,
#             async >=0.9), WriteBehind (Redis pending list + cache), ArtifactStore (both)
#
# Replay order of one assistant message: for each marker group, its reasoning items, then the
# text written before the group, then its calls and results; text after the last group ends
# the message. That is the order a Responses round produces them (reasoning, message, calls).
# ─────────────────────────────────────────────────────────────────────────────

REASONING_ITEM = "reasoning"
PASSTHROUGH_ITEM = "reasoning_passthrough"  # reasoning before calls Open WebUI runs
STORED_TYPES = frozenset({REASONING_ITEM, "function_call", "function_call_output"})
_SURROGATE_CHARS = re.compile("[\ud800-\udfff]")
_FLAG_LZ4, _FLAG_ZLIB, _FLAG_FERNET = 0x01, 0x02, 0x04
_MARKER_LINE = re.compile(r"^\[orp:([0-9a-z]{8,64})\]: #[ \t]*$", re.MULTILINE)
_MARKER_BLOCK = re.compile(r"(?:^\[orp:[0-9a-z]{8,64}\]: #[ \t]*(?:\n|$))+", re.MULTILINE)
_TOOL_DETAILS = re.compile(r'<details\s+type="tool_calls"[^>]*?\bid="([^"]*)"[^>]*>.*?'
                           r"</details>\s*", re.DOTALL)
PRUNE_MIN_CHARS, PRUNE_HEAD, PRUNE_TAIL = 800, 256, 128
MISSING_OUTPUT = "(no result was recorded for this tool call)"

try:  # Open WebUI does not ship lz4; zlib (stdlib) stands in
    import lz4.frame as _lz4
except ImportError:  # pragma: no cover - depends on the deployment
    _lz4 = None


def new_artifact_id() -> str:
    return uuid.uuid4().hex


def storable(item: Mapping[str, Any], reasoning_retention: str) -> bool:
    """Reasoning (unless retention is disabled), function calls and their results."""
    kind = item.get("type")
    if kind == REASONING_ITEM:
        return reasoning_retention != "disabled"
    return kind in STORED_TYPES


def artifact_scope(req: ChatRequest) -> str:
    """What stored rows are filed under: the chat, else the user (API calls without a chat)."""
    return req.chat_id or f"user:{req.user_id}"


def turn_reasoning(state: StreamState) -> list[dict[str, Any]]:
    """The reasoning items of a finished stream, in output order."""
    return [dict(item) for _, item in sorted(state.done_items.items())
            if item.get("type") == REASONING_ITEM]


def response_reasoning(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reasoning items of a non-streamed response, in output order."""
    return [dict(item) for item in response.get("output") or ()
            if isinstance(item, Mapping) and item.get("type") == REASONING_ITEM]


def passthrough_ids(req: ChatRequest) -> list[str]:
    """Ids under which reasoning before Open WebUI-run tool calls would be stored."""
    scope = artifact_scope(req)
    return [passthrough_id(scope, call.id) for m in req.messages if m.role == "assistant"
            for call in m.tool_calls if call.id]


def passthrough_row_item(reasoning: list[dict[str, Any]], call_id: str) -> dict[str, Any]:
    return {"type": PASSTHROUGH_ITEM, "_call_id": call_id, "items": reasoning}


def passthrough_id(scope: str, call_id: str) -> str:
    """Stable id of the reasoning that preceded a call Open WebUI runs (passthrough mode)."""
    return "p" + hashlib.sha256(f"{scope}\n{call_id}".encode()).hexdigest()[:31]


def marker_block(ids: Iterable[str]) -> str:
    """Marker lines for `ids`, set off by blank lines so Markdown treats them as definitions."""
    lines = [f"[orp:{i}]: #" for i in ids]
    return "\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def marker_ids(text: str) -> list[str]:
    return _MARKER_LINE.findall(text) if "[orp:" in text else []


def strip_markers(text: str) -> str:
    return _MARKER_BLOCK.sub("", text) if "[orp:" in text else text


def split_markers(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Text -> [(text before a marker group, the group's ids)], the last group possibly empty."""
    out: list[tuple[str, tuple[str, ...]]] = []
    pos = 0
    for block in _MARKER_BLOCK.finditer(text):
        out.append((text[pos:block.start()], tuple(_MARKER_LINE.findall(block.group()))))
        pos = block.end()
    out.append((text[pos:], ()))
    return out


def safe_text(value: str) -> str:
    """Lone surrogates -> U+FFFD, surrogate pairs joined: the result always encodes as UTF-8."""
    if value.isascii() or not _SURROGATE_CHARS.search(value):
        return value
    return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def safe_json(value: Any) -> Any:
    """A JSON-ready copy of `value` whose strings (keys too) all encode as UTF-8."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, Mapping):
        return {safe_text(str(k)): safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_json(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class ArtifactCodec:
    """item dict <-> stored bytes: `header byte (flags) + body`; header-less JSON is legacy.

    Flags: 1 = LZ4 frame, 2 = zlib, 4 = Fernet token of the (compressed) JSON. Reasoning is
    encrypted whenever a key is set; other items only with `encrypt_all`.
    """

    keys: tuple[str, ...] = ()
    encrypt_all: bool = False
    compress_min: int = 1024

    @classmethod
    def of(cls, settings: RequestSettings) -> ArtifactCodec:
        return cls(settings.artifact_keys or (), settings.encrypt_all,
                   settings.compression_min_bytes)

    def encrypts(self, item_type: str) -> bool:
        return bool(self.keys) and (self.encrypt_all or item_type.startswith(REASONING_ITEM))

    def encode(self, item: Mapping[str, Any]) -> bytes:
        body = _dumps(safe_json(item))
        flags = 0
        if self.compress_min and len(body) >= self.compress_min:
            packed, flag = _compress(body)
            if len(packed) < len(body):
                body, flags = packed, flag
        if self.encrypts(str(item.get("type") or "")):
            body, flags = _fernet(self.keys).encrypt(body), flags | _FLAG_FERNET
        return bytes([flags]) + body

    def decode(self, blob: bytes) -> dict[str, Any]:
        """Stored bytes -> item; ArtifactStoreError for a wrong key, truncation or garbage."""
        try:
            return self._decode(bytes(blob))
        except (ValueError, TypeError, IndexError, RuntimeError, zlib.error) as exc:
            # corrupt payloads: JSON/UTF-8 errors are ValueErrors, lz4 raises RuntimeError
            raise ArtifactStoreError(f"unreadable stored item ({type(exc).__name__})") from None

    def _decode(self, blob: bytes) -> dict[str, Any]:
        if not blob:
            raise ArtifactStoreError("empty stored item")
        flags, body = blob[0], blob[1:]
        if flags > 0x07:  # legacy: plain JSON without a header byte
            body, flags = blob, 0
        if flags & _FLAG_FERNET:
            body = self._decrypt(body)
        if flags & _FLAG_LZ4:
            if _lz4 is None:
                raise ArtifactStoreError("item is LZ4-compressed but lz4 is not installed")
            body = _lz4.decompress(body)
        elif flags & _FLAG_ZLIB:
            body = zlib.decompress(body)
        item = _loads(body)
        if not isinstance(item, dict):
            raise ArtifactStoreError("stored item is not a JSON object")
        return item

    def _decrypt(self, token: bytes) -> bytes:
        from cryptography.fernet import InvalidToken

        if not self.keys:
            raise ArtifactStoreError("item is encrypted but no ARTIFACT_ENCRYPTION_KEY is set")
        try:
            return _fernet(self.keys).decrypt(token)
        except InvalidToken:
            raise ArtifactStoreError("item was encrypted with another key") from None


def _compress(body: bytes) -> tuple[bytes, int]:
    if _lz4 is not None:
        return _lz4.compress(body), _FLAG_LZ4
    return zlib.compress(body, 6), _FLAG_ZLIB


_FERNETS: dict[tuple[str, ...], Any] = {}


def _fernet(keys: tuple[str, ...]) -> Any:
    """MultiFernet over `keys` (each hashed to a Fernet key): the first encrypts, all decrypt."""
    cached = _FERNETS.get(keys)
    if cached is None:
        from cryptography.fernet import Fernet, MultiFernet

        cached = MultiFernet([Fernet(base64.urlsafe_b64encode(hashlib.sha256(k.encode())
                                                              .digest())) for k in keys])
        _FERNETS[keys] = cached
    return cached


# -- replay (pure) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayPolicy:
    """What `replay_items` keeps: reasoning per retention mode, tool outputs pruned by age."""

    reasoning: str = "conversation"  # conversation | next_reply | disabled
    keep_tool_turns: int = 10        # 0: never prune
    model_id: str = ""               # the model the history goes to

    @classmethod
    def of(cls, settings: RequestSettings, model_id: str = "") -> ReplayPolicy:
        return cls(settings.reasoning_retention, settings.tool_output_retention_turns, model_id)


# Reasoning `format` prefixes by model family; another family's reasoning is not sent (its
# encrypted blob or signature means nothing there). Unknown families and formats pass.
_REASONING_FAMILIES = {"openai": ("openai-", "azure-openai-", "bedrock-openai-"),
                       "anthropic": ("anthropic-",), "google": ("google-",),
                       "x-ai": ("xai-", "bedrock-xai-")}


def reasoning_fits(item: Mapping[str, Any], model_id: str) -> bool:
    fmt = str(item.get("format") or "")
    target = _REASONING_FAMILIES.get(model_id.split("/", 1)[0])
    known = any(fmt.startswith(p) for ps in _REASONING_FAMILIES.values() for p in ps)
    return target is None or not known or fmt.startswith(target)


def wanted_marker_ids(messages: Iterable[ChatMessage]) -> list[str]:
    """Every marker id in the assistant messages of a chat, oldest first."""
    return [i for m in messages if m.role == "assistant" for i in marker_ids(m.text)]


def replay_items(items: list[dict[str, Any]], artifacts: Mapping[str, Mapping[str, Any]],
                 policy: ReplayPolicy) -> list[dict[str, Any]]:
    """Expand assistant text items carrying markers into the stored items, in true order.

    `artifacts` maps marker id -> stored item (ids that failed to load are simply absent).
    The result is orphan-repaired, so OpenRouter accepts it whatever was lost.
    """
    assistants = [i for i, it in enumerate(items) if _is_assistant_text(it)]
    out: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if index not in assistants:
            out.append(_unmarked_user(item) if item.get("role") == "user" else item)
            continue
        age = len(assistants) - 1 - assistants.index(index)  # 0 = the latest reply
        out.extend(_expand(str(item["content"]), artifacts, policy, age))
    return repair_orphans(_attach_passthrough(out, artifacts))


def _unmarked_user(item: dict[str, Any]) -> dict[str, Any]:
    """Task prompts (titles, tags) quote the chat, markers included: drop them there."""
    parts = item.get("content")
    if not isinstance(parts, list) or "[orp:" not in str(parts):
        return item
    return {**item, "content": [{**p, "text": strip_markers(p["text"])}
                                if isinstance(p.get("text"), str) else p for p in parts]}


def _is_assistant_text(item: Mapping[str, Any]) -> bool:
    return item.get("role") == "assistant" and isinstance(item.get("content"), str)


def _expand(text: str, artifacts: Mapping[str, Mapping[str, Any]], policy: ReplayPolicy,
            age: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    segments = split_markers(text)
    calls = {str(artifacts[i].get("call_id")) for _, ids in segments for i in ids
             if i in artifacts and artifacts[i].get("type") == "function_call"}
    for segment, ids in segments:
        found = [dict(artifacts[i]) for i in ids if i in artifacts]
        reasoning = [it for it in found if it.get("type") == REASONING_ITEM
                     and reasoning_fits(it, policy.model_id)]
        if policy.reasoning == "disabled" or (policy.reasoning == "next_reply" and age > 0):
            reasoning = []
        others = [_prune(it, policy, age) for it in found if it.get("type") != REASONING_ITEM]
        clean = strip_tool_cards(segment, calls)
        out.extend(reasoning)
        if clean.strip():
            out.append({"type": "message", "role": "assistant", "content": clean.strip()})
        out.extend(others)
    return out


def strip_tool_cards(text: str, call_ids: set[str]) -> str:
    """Drop rendered tool cards whose calls are replayed as items (they'd be said twice)."""
    if not call_ids or "<details" not in text:
        return text
    return _TOOL_DETAILS.sub(lambda m: "" if m.group(1) in call_ids else m.group(0), text)


def _prune(item: dict[str, Any], policy: ReplayPolicy, age: int) -> dict[str, Any]:
    """Shorten a long tool result older than `keep_tool_turns` replies, saying so inside it."""
    output = item.get("output")
    if (item.get("type") != "function_call_output" or not isinstance(output, str)
            or not policy.keep_tool_turns or age < policy.keep_tool_turns
            or len(output) < PRUNE_MIN_CHARS):
        return item
    removed = len(output) - PRUNE_HEAD - PRUNE_TAIL
    note = (f"\n…[tool output pruned: {removed} characters removed because this result is "
            f"more than {policy.keep_tool_turns} replies old]…\n")
    return {**item, "output": output[:PRUNE_HEAD] + note + output[-PRUNE_TAIL:]}


def _attach_passthrough(items: list[dict[str, Any]], artifacts: Mapping[str, Mapping[str, Any]]
                        ) -> list[dict[str, Any]]:
    """Put reasoning stored under a call id (passthrough mode) before that call."""
    by_call = {str(v.get("_call_id")): v for v in artifacts.values() if v.get("_call_id")}
    if not by_call:
        return items
    out: list[dict[str, Any]] = []
    for item in items:
        stored = by_call.pop(str(item.get("call_id")), None)
        if item.get("type") == "function_call" and stored is not None:
            out.extend(dict(r) for r in stored.get("items") or ())
        out.append(item)
    return out


def repair_orphans(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make a history OpenRouter accepts: every call gets exactly one output right after its
    round (a short synthetic one when lost), outputs without a call and duplicates (calls,
    outputs, reasoning ids) are dropped, and reasoning followed by nothing is dropped."""
    calls = {str(i.get("call_id")) for i in items if i.get("type") == "function_call"}
    out: list[dict[str, Any]] = []
    open_calls: list[str] = []
    seen_calls: set[str] = set()
    answered: set[str] = set()
    seen_reasoning: set[str] = set()
    for item in items:
        kind, call_id = item.get("type"), str(item.get("call_id"))
        if kind == REASONING_ITEM and item.get("id"):
            if item["id"] in seen_reasoning:  # stored twice (marker and passthrough)
                continue
            seen_reasoning.add(item["id"])
        if kind == "function_call_output":
            if call_id in calls and call_id not in answered and call_id in seen_calls:
                answered.add(call_id)
                open_calls = [c for c in open_calls if c != call_id]
                out.append(item)
            continue
        if kind != "function_call":
            _close_calls(out, open_calls, answered)
        elif call_id in seen_calls:
            continue
        else:
            seen_calls.add(call_id)
            open_calls.append(call_id)
        out.append(item)
    _close_calls(out, open_calls, answered)
    return _drop_dangling_reasoning(out)


def _close_calls(out: list[dict[str, Any]], open_calls: list[str], answered: set[str]) -> None:
    for call_id in open_calls:
        out.append({"type": "function_call_output", "call_id": call_id, "output": MISSING_OUTPUT})
        answered.add(call_id)
    open_calls.clear()


def _drop_dangling_reasoning(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep reasoning only when an assistant message or call (maybe after more reasoning)
    follows it: walk backwards, remembering whether what comes next is such an item."""
    kept: list[dict[str, Any]] = []
    followed = False
    for item in reversed(items):
        kind = item.get("type")
        if kind == REASONING_ITEM:
            if not followed:
                continue
        else:
            followed = kind == "function_call" or item.get("role") == "assistant"
        kept.append(item)
    return kept[::-1]


def artifact_table_name(function_id: str) -> str:
    """One table per pipe (function id), a valid identifier of at most 48 characters."""
    base = re.sub(r"[^a-z0-9_]", "_", function_id.lower()).strip("_") or "pipe"
    name = f"orp_artifacts_{base}"
    if len(name) > 48 or base != function_id:
        name = f"{name[:39]}_{hashlib.sha256(function_id.encode()).hexdigest()[:8]}"
    return name


def redis_url_for_write_behind(env: Mapping[str, Any]) -> str | None:
    """REDIS_URL when Open WebUI runs several workers on Redis, else None (direct writes)."""
    url = str(env.get("REDIS_URL") or "")
    manager = str(env.get("WEBSOCKET_MANAGER") or "").lower()
    try:
        workers = int(env.get("UVICORN_WORKERS") or 1)
    except (TypeError, ValueError):
        workers = 1
    return url if url and manager == "redis" and workers > 1 else None


# -- I/O: database -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArtifactRow:
    """One stored item as it travels to the database (payload already encoded)."""

    id: str
    chat_id: str
    message_id: str
    seq: int
    item_type: str
    payload: bytes
    created_at: float

    def pack(self) -> bytes:
        data = {f: getattr(self, f) for f in self.__slots__ if f != "payload"}
        data["payload"] = base64.b64encode(self.payload).decode()
        return _dumps(data)

    @classmethod
    def unpack(cls, raw: bytes | str) -> ArtifactRow:
        data = _loads(raw)
        return cls(str(data["id"]), str(data["chat_id"]), str(data["message_id"]),
                   int(data["seq"]), str(data["item_type"]), base64.b64decode(data["payload"]),
                   float(data["created_at"]))


class DBRunner(Protocol):
    """Runs a function of a SQLAlchemy Connection inside one transaction, off the loop."""

    async def run(self, fn: Callable[[Any], Any]) -> Any: ...


class SyncEngineRunner:
    """Open WebUI <= 0.8 (and tests): a sync Engine, each transaction in a worker thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        def work() -> Any:
            with self.engine.begin() as conn:
                return fn(conn)

        return await asyncio.to_thread(work)


class AsyncEngineRunner:
    """Open WebUI >= 0.9: its AsyncEngine; the sync function runs through `run_sync`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn)


def owui_env() -> dict[str, Any]:
    """Open WebUI's deployment settings (open_webui.env when loaded, else the environment)."""
    names = ("REDIS_URL", "WEBSOCKET_MANAGER", "UVICORN_WORKERS")
    env: dict[str, Any] = {n: os.environ.get(n) for n in names}
    owui = sys.modules.get("open_webui.env")  # never imported here: it may exit the process
    if owui is None:
        return env
    return {n: getattr(owui, n, env[n]) for n in names}


def _redis_from_url(url: str) -> Any:
    import redis.asyncio as aioredis  # ships with Open WebUI

    return aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


def owui_db_runner() -> DBRunner | None:
    """The runner on Open WebUI's own database, or None outside Open WebUI."""
    try:
        import open_webui.internal.db as owui_db
    except ImportError:  # not inside Open WebUI
        return None
    if getattr(owui_db, "async_engine", None) is not None:
        return AsyncEngineRunner(owui_db.async_engine)
    if getattr(owui_db, "engine", None) is not None:
        return SyncEngineRunner(owui_db.engine)
    return None


class ArtifactDB:
    """SQLAlchemy Core access to one pipe's table; every method is one transaction.

    Database failures surface as ArtifactStoreError.
    """

    def __init__(self, runner: DBRunner, table_name: str) -> None:
        import sqlalchemy as sa

        self.runner = runner
        self.metadata = sa.MetaData()
        self.table = sa.Table(
            table_name, self.metadata,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("chat_id", sa.String(128), nullable=False),
            sa.Column("message_id", sa.String(128), nullable=False, default=""),
            sa.Column("seq", sa.Integer, nullable=False, default=0),
            sa.Column("item_type", sa.String(64), nullable=False),
            sa.Column("payload", sa.LargeBinary, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("last_used_at", sa.Float, nullable=False),
            sa.Index(f"{table_name}_chat_ix", "chat_id", "message_id"),
            sa.Index(f"{table_name}_used_ix", "last_used_at"))
        self._ready = False
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[[Any], Any]) -> Any:
        import sqlalchemy.exc as sa_exc

        try:
            return await self.runner.run(fn)
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise ArtifactStoreError(f"database: {type(exc).__name__}: {exc}"[:300]) from exc

    async def ensure_schema(self) -> None:
        """Create the table once; safe when several workers race to create it."""
        if self._ready:
            return
        async with self._lock:
            if not self._ready:
                await self._create()
                self._ready = True

    async def _create(self) -> None:
        import sqlalchemy.exc as sa_exc

        try:
            await self.runner.run(lambda conn: self.metadata.create_all(conn, checkfirst=True))
        except sa_exc.DBAPIError as exc:  # another worker created it in between
            LOG.info("Artifact table creation raced (%s); checking again", type(exc).__name__)
            await self._run(lambda conn: self.metadata.create_all(conn, checkfirst=True))
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise ArtifactStoreError(f"database: {type(exc).__name__}: {exc}"[:300]) from exc

    async def insert(self, rows: list[ArtifactRow]) -> None:
        """Insert rows, skipping ids already present (a retried flush writes nothing twice)."""
        if not rows:
            return
        await self.ensure_schema()
        t = self.table

        def work(conn: Any) -> None:
            ids = [r.id for r in rows]
            present = set(conn.execute(t.select().with_only_columns(t.c.id)
                                       .where(t.c.id.in_(ids))).scalars())
            fresh = [{"id": r.id, "chat_id": r.chat_id, "message_id": r.message_id,
                      "seq": r.seq, "item_type": r.item_type, "payload": r.payload,
                      "created_at": r.created_at, "last_used_at": r.created_at}
                     for r in rows if r.id not in present]
            if fresh:
                conn.execute(t.insert(), fresh)

        await self._run(work)

    async def fetch(self, chat_id: str, ids: list[str], now: float) -> dict[str, ArtifactRow]:
        """Rows of this chat among `ids`; marks them used (at most once an hour)."""
        if not ids:
            return {}
        await self.ensure_schema()
        t = self.table

        def work(conn: Any) -> dict[str, ArtifactRow]:
            found = conn.execute(t.select().where(t.c.chat_id == chat_id, t.c.id.in_(ids)))
            rows = {r.id: ArtifactRow(r.id, r.chat_id, r.message_id, r.seq, r.item_type,
                                      bytes(r.payload), r.created_at) for r in found}
            if rows:
                conn.execute(t.update().where(t.c.id.in_(list(rows)),
                                              t.c.last_used_at < now - 3600)
                             .values(last_used_at=now))
            return rows

        result: dict[str, ArtifactRow] = await self._run(work)
        return result

    async def delete(self, ids: list[str]) -> None:
        if ids:
            await self.ensure_schema()
            await self._run(lambda conn: conn.execute(
                self.table.delete().where(self.table.c.id.in_(ids))))

    async def cleanup(self, unused_since: float) -> int:
        """Delete rows not used since `unused_since`; returns how many."""
        await self.ensure_schema()
        t = self.table
        result = await self._run(
            lambda conn: conn.execute(t.delete().where(t.c.last_used_at < unused_since)).rowcount)
        return int(result or 0)


# -- I/O: Redis write-behind ------------------------------------------------------------------

_RELEASE_LOCK = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                 "return redis.call('del', KEYS[1]) else return 0 end")
# Trim the flushed batch only while still holding the lock: if it expired during a slow write,
# another worker may have flushed (and trimmed) the same rows already.
_TRIM_IF_OWNER = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                  "redis.call('ltrim', KEYS[2], tonumber(ARGV[2]), -1) return 1 else return 0 end")


class WriteBehind:
    """Rows (already encoded, so encrypted ones stay encrypted) queued in a Redis list and
    flushed to the database in batches by whichever worker holds the flush lock.

    A flush reads a batch with LRANGE, writes it, and only then trims it off the list, so a
    failed database write leaves the rows queued. Rows are cached by id for `ttl` seconds.
    """

    def __init__(self, redis: Any, namespace: str, *, batch: int = 100,
                 lock_ms: int = 30_000) -> None:
        self.redis = redis
        self.pending_key = f"orp:{namespace}:pending"
        self.lock_key = f"orp:{namespace}:flush-lock"
        self.cache_prefix = f"orp:{namespace}:item:"
        self.batch = batch
        self.lock_ms = lock_ms
        self.last_error: str | None = None

    async def enqueue(self, rows: list[ArtifactRow], ttl: int) -> None:
        """Queue `rows` durably (one MULTI/EXEC); raises whatever Redis raises."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self.pending_key, *[r.pack() for r in rows])
            if ttl:
                for row in rows:
                    pipe.set(self.cache_prefix + row.id, row.pack(), ex=ttl)
            await pipe.execute()

    async def cached(self, ids: list[str]) -> dict[str, ArtifactRow]:
        if not ids:
            return {}
        raw = await self.redis.mget([self.cache_prefix + i for i in ids])
        return {r.id: r for r in (ArtifactRow.unpack(v) for v in raw if v)}

    async def cache(self, rows: Iterable[ArtifactRow], ttl: int) -> None:
        if ttl:
            async with self.redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.set(self.cache_prefix + row.id, row.pack(), ex=ttl)
                await pipe.execute()

    async def pending(self, ids: set[str] | None = None) -> list[ArtifactRow]:
        rows = [ArtifactRow.unpack(v) for v in await self.redis.lrange(self.pending_key, 0, -1)]
        return [r for r in rows if ids is None or r.id in ids]

    async def depth(self) -> int:
        return int(await self.redis.llen(self.pending_key))

    async def forget(self, ids: list[str]) -> None:
        if ids:
            await self.redis.delete(*[self.cache_prefix + i for i in ids])

    async def flush(self, db: ArtifactDB) -> int:
        """Write up to one batch to the database under the lock; returns rows written."""
        token = uuid.uuid4().hex
        if not await self.redis.set(self.lock_key, token, nx=True, px=self.lock_ms):
            return 0
        try:
            raw = await self.redis.lrange(self.pending_key, 0, self.batch - 1)
            if not raw:
                return 0
            try:
                await db.insert([ArtifactRow.unpack(v) for v in raw])
            except ArtifactStoreError as exc:  # the DB said no: keep every row queued
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                LOG.warning("Artifact flush failed; %d rows stay queued: %s", len(raw),
                            self.last_error)
                return 0
            if not await self.redis.eval(_TRIM_IF_OWNER, 2, self.lock_key, self.pending_key,
                                         token, len(raw)):
                LOG.warning("Artifact flush lock expired during a slow write; not trimming")
                return 0
            self.last_error = None
            return len(raw)
        finally:
            await self.redis.eval(_RELEASE_LOCK, 1, self.lock_key, token)


# -- the store: database, optionally behind Redis -------------------------------------------

_REDIS_ERRORS: list[tuple[type[BaseException], ...]] = []


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis is unreachable or misbehaves (redis imported late)."""
    if not _REDIS_ERRORS:
        errors: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
        try:
            import redis.exceptions as redis_exc

            errors = (*errors, redis_exc.RedisError)
        except ImportError:  # pragma: no cover - redis ships with Open WebUI
            pass
        _REDIS_ERRORS.append(errors)
    return _REDIS_ERRORS[0]


class ArtifactStore:
    """Saves rows (durably written or durably queued) and loads them back by marker id.

    Never raises to a chat except `ArtifactStoreError` from `save` when nothing could be
    stored; loading skips what it can't read, with a log line.
    """

    def __init__(self, db: ArtifactDB, redis: WriteBehind | None = None, *,
                 clock: Callable[[], float] = time.time, auto_flush: bool = True) -> None:
        self.db = db
        self.redis = redis
        self.clock = clock
        self.auto_flush = auto_flush  # off in tests that flush step by step
        self.redis_error: str | None = None
        self.last_cleanup: float | None = None
        self.next_cleanup: float | None = None
        self._flusher: asyncio.Task[int] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def save(self, rows: list[ArtifactRow], ttl: int) -> list[str]:
        """Ids of the rows now durably queued in Redis or written to the database."""
        if not rows:
            return []
        if self.redis is not None:
            try:
                await self.redis.enqueue(rows, ttl)
                self.redis_error = None
                self.kick()
                return [r.id for r in rows]
            except redis_errors() as exc:
                self.redis_error = f"{type(exc).__name__}: {exc}"[:300]
                LOG.warning("Redis unavailable (%s); writing artifacts directly", self.redis_error)
        await self.db.insert(rows)
        return [r.id for r in rows]

    async def load(self, chat_id: str, ids: list[str], ttl: int) -> dict[str, ArtifactRow]:
        """Rows for `ids` in this chat: Redis cache, then the database, then the queue."""
        found: dict[str, ArtifactRow] = {}
        if self.redis is not None:
            found.update(await self._redis_try(self.redis.cached(ids)) or {})
            found = {k: v for k, v in found.items() if v.chat_id == chat_id}
        missing = [i for i in ids if i not in found]
        if missing:
            try:
                fetched = await self.db.fetch(chat_id, missing, self.clock())
            except ArtifactStoreError:
                if self.redis is None:
                    raise
                LOG.warning("Database unavailable for an artifact read; using the queue")
                fetched = {}
            found.update(fetched)
            if self.redis is not None and fetched:
                await self._redis_try(self.redis.cache(fetched.values(), ttl))
        missing_set = {i for i in ids if i not in found}
        if missing_set and self.redis is not None:
            queued = await self._redis_try(self.redis.pending(missing_set)) or []
            found.update({r.id: r for r in queued if r.chat_id == chat_id})
        return found

    async def delete(self, ids: list[str]) -> None:
        await self.db.delete(ids)
        if self.redis is not None:
            await self._redis_try(self.redis.forget(ids))

    async def _redis_try(self, op: Awaitable[Any]) -> Any:
        try:
            return await op
        except redis_errors() as exc:
            self.redis_error = f"{type(exc).__name__}: {exc}"[:300]
            LOG.warning("Redis unavailable for an artifact read: %s", self.redis_error)
            return None

    def kick(self) -> None:
        """Start a background flush of the Redis queue unless one is running."""
        if not self.auto_flush or self.redis is None:
            return
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self.drain())
            self._flusher.add_done_callback(_consume_task_exception)

    async def drain(self, *, max_wait: float = 30.0,
                    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> int:
        """Flush until the queue is empty; backs off (up to `max_wait` s) while the DB fails."""
        if self.redis is None:
            return 0
        written, delay = 0, 0.5
        while True:
            try:
                count = await self.redis.flush(self.db)
                depth = await self.redis.depth()
            except redis_errors() as exc:
                self.redis_error = f"{type(exc).__name__}: {exc}"[:300]
                return written
            written += count
            if not depth:
                return written
            if not count:  # locked by another worker, or the database failed: wait
                await sleep(delay)
                delay = min(delay * 2, max_wait)

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run housekeeping in the background (a turn never waits for it)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_consume_task_exception)

    async def cleanup_logged(self, days: int, interval_hours: float) -> None:
        try:
            await self.maybe_cleanup(days, interval_hours)
        except ArtifactStoreError as exc:
            LOG.warning("Artifact cleanup failed (retried at the next interval): %s", exc)

    async def maybe_cleanup(self, days: int, interval_hours: float) -> int:
        """Delete rows unused for `days` when the (jittered) interval has passed."""
        now = self.clock()
        if not days or (self.next_cleanup is not None and now < self.next_cleanup):
            return 0
        self.next_cleanup = now + interval_hours * 3600 * (1 + random.uniform(0, 0.25))
        deleted = await self.db.cleanup(now - days * 86400)
        self.last_cleanup = now
        if deleted:
            LOG.info("Artifact cleanup deleted %d items unused for %d days", deleted, days)
        return deleted

    async def health(self) -> tuple[dict[str, Any], dict[str, Any] | str]:
        store: dict[str, Any] = {"backend": "database", "table": self.db.table.name,
                                 "last_cleanup": self.last_cleanup}
        if self.redis is None:
            return store, "not used (single worker or REDIS_WRITE_BEHIND off)"
        depth = await self._redis_try(self.redis.depth())
        store["backend"] = "database behind Redis write-behind"
        return store, {"pending_rows": depth, "last_flush_error": self.redis.last_error,
                       "last_error": self.redis_error}

    async def close(self) -> None:
        for task in [self._flusher, *self._background]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


# ─────────────────────────────────────────────────────────────────────────────
# §12 Rendering
#
# Intents become OpenAI-style chunk dicts (text in `delta.content`, thinking in
# `delta.reasoning_content`, which every supported Open WebUI renders as its native
# "Thought for N seconds" block). Consecutive intents of one kind from the same network read
# are joined into one chunk. The emitter only carries status lines and notifications.
# ─────────────────────────────────────────────────────────────────────────────

_SURROGATES = re.compile("[\ud800-\udfff]")


class SurrogateCarry:
    """Holds a trailing high surrogate until its partner arrives; replaces lone ones."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = ""

    def clean(self, text: str) -> str:
        if self._pending:
            text, self._pending = self._pending + text, ""
        if text.isascii() or not _SURROGATES.search(text):
            return text
        if "\ud800" <= text[-1] <= "\udbff":
            text, self._pending = text[:-1], text[-1]
        if not _SURROGATES.search(text):
            return text
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class ChunkRenderer:
    """Turns intents into Open WebUI chunk dicts for one response."""

    def __init__(self, model: str, created: int) -> None:
        self._base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                      "created": created, "model": model}
        self._carry = {TEXT: SurrogateCarry(), REASONING: SurrogateCarry()}
        self.emitted_text = False

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**self._base, "choices": [{"index": 0, "delta": delta,
                                           "finish_reason": finish_reason}]}

    def render(self, intents: list[Intent]) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []
        kind, buf = "", list[str]()
        for ikind, text in intents:
            if ikind != kind and buf:
                self._emit(kind, "".join(buf), chunks)
                buf = []
            kind = ikind
            buf.append(text)
        if buf:
            self._emit(kind, "".join(buf), chunks)
        return chunks

    def _emit(self, kind: str, text: str, chunks: list[dict[str, Any]]) -> None:
        text = self._carry[kind].clean(text)
        if not text:
            return
        if kind == TEXT:
            self.emitted_text = True
            chunks.append(self.chunk({"content": text}))
        else:
            chunks.append(self.chunk({"reasoning_content": text}))

    def text_chunk(self, text: str) -> dict[str, Any]:
        self.emitted_text = True
        return self.chunk({"content": text})

    def finish_chunk(self, reason: str = "stop") -> dict[str, Any]:
        return self.chunk({}, finish_reason=reason)


def usage_payload(usage: Usage | None, timing: StreamTiming | None = None) -> dict[str, Any]:
    """Usage in the OpenAI chat shape Open WebUI stores (plus cost and timings)."""
    usage = usage or Usage()
    payload: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}
    if usage.cost is not None:
        payload["cost"] = round(usage.cost, 8)
    if timing is not None:
        payload["response_time_s"] = round(timing.elapsed, 3)
        if timing.first_token is not None:
            payload["time_to_first_token_s"] = round(timing.first_token, 3)
        if timing.tokens_per_second(usage) is not None:
            payload["tokens_per_second"] = round(timing.tokens_per_second(usage) or 0, 1)
    return payload


@dataclass(slots=True)
class StreamTiming:
    started: float
    first_token_at: float | None = None
    ended_at: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.ended_at or self.started) - self.started

    @property
    def first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def tokens_per_second(self, usage: Usage) -> float | None:
        if self.first_token_at is None or self.ended_at is None or not usage.output_tokens:
            return None
        window = self.ended_at - self.first_token_at
        return usage.output_tokens / window if window > 0.05 else None


def final_status_line(usage: Usage | None, timing: StreamTiming) -> str:
    """`2.31s · first token 0.42s · 1,234 tokens (1,000 in, 234 out, 120 reasoning) · …`"""
    parts = [f"{timing.elapsed:.2f}s"]
    if timing.first_token is not None:
        parts.append(f"first token {timing.first_token:.2f}s")
    if usage is not None:
        detail = [f"{usage.input_tokens:,} in", f"{usage.output_tokens:,} out"]
        if usage.cached_tokens:
            detail.append(f"{usage.cached_tokens:,} cached")
        if usage.reasoning_tokens:
            detail.append(f"{usage.reasoning_tokens:,} reasoning")
        parts.append(f"{usage.total_tokens:,} tokens ({', '.join(detail)})")
        if usage.cost is not None:
            parts.append(f"${usage.cost:.6f}".rstrip("0").rstrip(".") if usage.cost else "$0")
        tps = timing.tokens_per_second(usage)
        if tps is not None:
            parts.append(f"{tps:.1f} tok/s")
    return " · ".join(parts)


_STATUS_ADVICE: dict[int, tuple[str, str]] = {
    400: ("OpenRouter couldn't accept this request", "Check the model's settings and inputs."),
    401: ("OpenRouter rejected the API key",
          "An admin should check API_KEY in the pipe's valves."),
    402: ("The OpenRouter account is out of credits",
          "Add credits at https://openrouter.ai/settings/credits or lower max tokens."),
    403: ("OpenRouter refused this request", "The input was blocked or the key has no access."),
    404: ("OpenRouter found no provider for this model",
          "The model may be gone or excluded by your routing settings; pick another model."),
    408: ("OpenRouter timed out", "Retry in a moment."),
    413: ("The request is too large for OpenRouter", "Shorten the conversation or attachments."),
    422: ("OpenRouter couldn't process this request", "Check the model's settings and inputs."),
    429: ("OpenRouter is rate-limiting this model", "Wait a moment and retry, or pick another."),
}


def describe_error(exc: PipeError) -> str:
    """The one translation point: any PipeError -> what the user reads (markdown)."""
    text = _describe_status(exc) if isinstance(exc, UpstreamStatusError) else str(exc)
    if isinstance(exc, UpstreamError) and exc.attempts > 1:
        text += f"\nTried {exc.attempts} times."
    return text


def _describe_status(exc: UpstreamStatusError) -> str:
    headline, advice = _STATUS_ADVICE.get(
        exc.status, ("OpenRouter's provider is unavailable" if exc.status >= 500
                     else "OpenRouter returned an error", "Retry in a moment."))
    lines = [f"{headline} (HTTP {exc.status}): {exc.provider_message or 'no details given'}"]
    if exc.raw and exc.raw not in exc.provider_message:
        source = f" ({exc.provider_name})" if exc.provider_name else ""
        lines.append(f"Provider said{source}: {exc.raw}")
    reasons = exc.metadata.get("reasons")
    if isinstance(reasons, list) and reasons:
        lines.append("Flagged for: " + ", ".join(map(str, reasons)))
    if exc.retry_after:
        lines.append(f"Retry after about {exc.retry_after:.0f} seconds.")
    lines.append(advice)
    return "\n".join(lines)


def error_chunk(exc: PipeError, reference: str = "") -> dict[str, Any]:
    """A chunk Open WebUI (0.6.28 → 0.12) shows as an error box."""
    suffix = f"\n(reference {reference})" if reference else ""
    return {"error": {"message": describe_error(exc) + suffix}}


def interruption_notice(exc: PipeError, reference: str = "") -> str:
    """Appended to a partial answer so the user keeps the text and sees why it stopped."""
    suffix = f" (reference {reference})" if reference else ""
    return f"\n\n---\n⚠️ **The answer was interrupted.** {describe_error(exc)}{suffix}"


class Emitter:
    """Wraps Open WebUI's event emitter: never raises into a chat, never blocks the stream."""

    def __init__(self, raw: Callable[[dict[str, Any]], Awaitable[Any]] | None) -> None:
        self._raw = raw

    async def emit(self, event: dict[str, Any]) -> None:
        if self._raw is None:
            return
        try:
            await self._raw(event)
        except asyncio.CancelledError:
            raise
        except Exception:  # the emitter is Open WebUI's; a broken socket must not end a chat
            LOG.debug("Event emitter failed for %s", event.get("type"), exc_info=True)

    async def status(self, description: str, *, done: bool, hidden: bool = False) -> None:
        await self.emit({"type": "status", "data": {"description": description, "done": done,
                                                    "hidden": hidden}})

    async def notify(self, content: str, level: str = "warning") -> None:
        await self.emit({"type": "notification", "data": {"type": level, "content": content}})

    async def citation(self, name: str, text: str) -> None:
        """A collapsible source under the message (used for the turn's own log)."""
        await self.emit({"type": "citation", "data": {
            "source": {"name": name}, "document": [text or "(no log lines at this level)"],
            "metadata": [{"source": name, "name": name}]}})


# ─────────────────────────────────────────────────────────────────────────────
# §13 Admission
# ─────────────────────────────────────────────────────────────────────────────


class AdmissionGate:
    """Global concurrency limit with a bounded FIFO wait queue, plus a per-user limit.

    Beyond the per-user limit, a full queue, or the wait timeout, the caller gets
    AdmissionRejected at once instead of waiting without end. Lives on the shared Pipe.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.active = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.per_user: dict[str, int] = {}
        self.rejected = 0
        self._clock = clock

    @property
    def queued(self) -> int:
        return sum(1 for f in self.waiting if not f.done())

    def admit(self, user_id: str, limits: AdmissionLimits) -> _Admission:
        return _Admission(self, user_id, limits)

    async def _acquire(self, user_id: str, limits: AdmissionLimits) -> None:
        if self.per_user.get(user_id, 0) >= limits.per_user:
            self.rejected += 1
            raise AdmissionRejected(
                f"You already have {limits.per_user} answers generating.",
                hint="Wait for one to finish, then retry.")
        if self.active < limits.max_active and not self.queued:
            self._take(user_id)
            return
        if self.queued >= limits.max_queued:
            self.rejected += 1
            raise _busy()
        await self._wait(user_id, limits)

    async def _wait(self, user_id: str, limits: AdmissionLimits) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.per_user[user_id] = self.per_user.get(user_id, 0) + 1  # queued counts too
        try:
            await asyncio.wait_for(asyncio.shield(fut), limits.wait_seconds)
        except (TimeoutError, asyncio.CancelledError) as exc:
            self._abandon(fut, user_id)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.rejected += 1
            raise _busy() from None
        # The releaser already counted the slot as active and the user was counted on entry.

    def _abandon(self, fut: asyncio.Future[None], user_id: str) -> None:
        self._forget_user(user_id)
        if fut.done() and not fut.cancelled():
            self.active -= 1  # a slot was handed to us just as we gave up: pass it on
            self._release_slot()
        else:
            fut.cancel()

    def _take(self, user_id: str) -> None:
        self.active += 1
        self.per_user[user_id] = self.per_user.get(user_id, 0) + 1

    def _forget_user(self, user_id: str) -> None:
        count = self.per_user.get(user_id, 1) - 1
        if count:
            self.per_user[user_id] = count
        else:
            self.per_user.pop(user_id, None)

    def _release(self, user_id: str) -> None:
        self._forget_user(user_id)
        self.active -= 1
        self._release_slot()

    def _release_slot(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                self.active += 1
                fut.set_result(None)
                return


def _busy() -> AdmissionRejected:
    return AdmissionRejected("The server is busy generating other answers.",
                             hint="Please retry in a moment.")


class _Admission:
    __slots__ = ("_gate", "_limits", "_user")

    def __init__(self, gate: AdmissionGate, user_id: str, limits: AdmissionLimits) -> None:
        self._gate, self._user, self._limits = gate, user_id, limits

    async def __aenter__(self) -> None:
        await self._gate._acquire(self._user, self._limits)

    async def __aexit__(self, *exc: object) -> None:
        self._gate._release(self._user)


# ─────────────────────────────────────────────────────────────────────────────
# §14 Telemetry
# ─────────────────────────────────────────────────────────────────────────────

#
# Every log line the pipe writes is redacted (keys, bearer tokens, Fernet tokens, data-URL
# payloads), stamped with the request, user and chat ids from a context variable, kept in that
# request's own buffer (so an admin can read one turn's log from the chat) and handed to a
# background thread for the server log, so logging never blocks the event loop.
# ─────────────────────────────────────────────────────────────────────────────

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"sk-or-[A-Za-z0-9_\-]{6,}"), "sk-or-[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{6,}"), r"\1[redacted]"),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\",}\s]+(\s+[^'\",}\s]+)?"),
     r"\1[redacted]"),
    (re.compile(r"gAAAAA[A-Za-z0-9_\-=]{20,}"), "[fernet-token]"),
    (re.compile(r"(data:[\w.+\-/]+;base64,)[A-Za-z0-9+/=]{16,}"), r"\1[payload]"),
)
@dataclass(slots=True)
class _SharedLogState:
    """Logging state shared by every copy of this file in the process.

    The logger is process-wide, but Open WebUI re-executes this file on updates and admins
    may install it twice; each copy must see the same request context and secrets.
    """

    current: contextvars.ContextVar[Any]
    base_level: list[int]
    secrets: set[str]


def _shared_log_state() -> _SharedLogState:
    found = getattr(LOG, "orp_shared_state", None)
    if found is None:
        found = _SharedLogState(contextvars.ContextVar("orp_request_log", default=None),
                                [logging.INFO], set())
        vars(LOG)["orp_shared_state"] = found
    return found


_SHARED = _shared_log_state()
_SECRETS: set[str] = _SHARED.secrets


def register_secret(value: str) -> None:
    """Make an exact secret (API key, encryption key) disappear from every log line."""
    if len(value) >= 8:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "[secret]")
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


@dataclass(slots=True)
class RequestLog:
    """One turn's log: its ids, its threshold, and the lines it wrote."""

    request_id: str
    user_id: str = "-"
    chat_id: str = "-"
    level: int = logging.INFO
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=1000))

    def text(self) -> str:
        return "\n".join(self.lines)


CURRENT_LOG: contextvars.ContextVar[RequestLog | None] = _SHARED.current
_BASE_LEVEL = _SHARED.base_level  # admin LOG_LEVEL for lines written outside any request
_LINE_FORMAT = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")


class _RequestContextFilter(logging.Filter):
    """Redacts, stamps ids, applies the request's level and copies the line to its buffer."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = CURRENT_LOG.get()
        if record.levelno < (ctx.level if ctx else _BASE_LEVEL[0]):
            return False
        try:
            self._prepare(record, ctx)
        except Exception:  # a log line must never raise into a chat; drop it instead
            return False
        return True

    @staticmethod
    def _prepare(record: logging.LogRecord, ctx: RequestLog | None) -> None:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(_LINE_FORMAT.formatException(record.exc_info))
        record.request_id = ctx.request_id if ctx else "-"
        record.user_id = ctx.user_id if ctx else "-"
        record.chat_id = ctx.chat_id if ctx else "-"
        if ctx is not None:
            ctx.lines.append(_LINE_FORMAT.format(record))
            record.msg = f"[req={ctx.request_id} user={ctx.user_id} chat={ctx.chat_id}] " \
                         f"{record.msg}"


class _LogPump(logging.Handler):
    """Queues records for a daemon thread that passes them to the root logger's handlers."""

    orp_pump = True  # found again by name after Open WebUI re-executes this file

    def __init__(self) -> None:
        import queue
        import threading

        super().__init__()
        self.queue: queue.Queue[logging.LogRecord | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="orp-log-pump", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put_nowait(record)

    def _run(self) -> None:
        while (record := self.queue.get()) is not None:
            try:
                logging.getLogger().handle(record)
            except Exception:  # a broken server log must not kill the pump
                pass
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self.queue.put_nowait(None)
        super().close()


def _install_logging() -> None:
    """Idempotent across re-execs of this file (Open WebUI re-runs it when the code changes)."""
    for handler in [h for h in LOG.handlers if isinstance(h, logging.Handler)
                    and getattr(h, "orp_pump", False)]:
        LOG.removeHandler(handler)
        handler.close()
    LOG.filters = [f for f in LOG.filters if type(f).__name__ != "_RequestContextFilter"]
    LOG.addHandler(_LogPump())
    LOG.addFilter(_RequestContextFilter())
    LOG.setLevel(logging.DEBUG)
    LOG.propagate = False


_install_logging()


def _reset_context(var: contextvars.ContextVar[Any], token: contextvars.Token[Any]) -> None:
    try:
        var.reset(token)
    except ValueError:  # a generator closed from another context (e.g. by the GC)
        pass


def flush_logs() -> None:
    """Wait until queued log records reached the server log (tests and shutdown)."""
    for handler in LOG.handlers:
        handler.flush()


def request_level(valves_level: str, user_level: str, user_role: str) -> int:
    """The user's own LOG_LEVEL counts only for admins, so nobody floods the server log."""
    chosen = user_level if user_level != INHERIT and user_role == "admin" else valves_level
    return logging.getLevelName(chosen) if chosen in LEVELS else logging.INFO


class RecentLogs:
    """The last N request logs, so an admin can fetch one turn's log by its reference."""

    def __init__(self, size: int = 200) -> None:
        self._logs: dict[str, RequestLog] = {}
        self._size = size

    def add(self, log: RequestLog) -> None:
        self._logs[log.request_id] = log
        while len(self._logs) > self._size:
            self._logs.pop(next(iter(self._logs)))

    def get(self, request_id: str) -> RequestLog | None:
        return self._logs.get(request_id.strip().removeprefix("req-"))


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no data."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), -(-q * len(ordered) // 100)))  # ceil without floats
    return ordered[int(rank) - 1]


class Telemetry:
    """Counters and recent latencies for the health snapshot; cheap to update."""

    def __init__(self, clock: Callable[[], float], window: int = 500) -> None:
        self.started = clock()
        self.requests = 0
        self.failures: dict[str, int] = {}
        self.upstream_status: dict[str, int] = {}
        self.upstream_latency: deque[float] = deque(maxlen=window)
        self.first_token: deque[float] = deque(maxlen=window)

    def upstream(self, status: int | str, seconds: float | None) -> None:
        key = str(status)
        self.upstream_status[key] = self.upstream_status.get(key, 0) + 1
        if seconds is not None:
            self.upstream_latency.append(seconds)

    def failed(self, exc: Exception) -> None:
        kind = type(exc).__name__
        self.failures[kind] = self.failures.get(kind, 0) + 1


def health_snapshot(tel: Telemetry, gate: AdmissionGate, catalog: CatalogRegistry,
                    now: float, storage: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """The pipe's state as JSON-ready data."""
    snap = catalog.snapshot

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "uptime_s": round(now - tel.started, 1),
        "requests": {"total": tel.requests, "in_flight": gate.active, "waiting": gate.queued,
                     "rejected_busy": gate.rejected, "failed_by_kind": dict(tel.failures)},
        "upstream": {"responses_by_status": dict(tel.upstream_status),
                     "latency_ms_p50": ms(percentile(tel.upstream_latency, 50)),
                     "latency_ms_p95": ms(percentile(tel.upstream_latency, 95)),
                     "first_token_ms_p50": ms(percentile(tel.first_token, 50)),
                     "first_token_ms_p95": ms(percentile(tel.first_token, 95)),
                     "window": len(tel.upstream_latency)},
        "catalog": {"models": len(snap.entries) if snap else 0,
                    "age_s": round(now - snap.fetched_at, 1) if snap else None,
                    "last_error": str(catalog.last_error) if catalog.last_error else None},
        "breakers": {},
        "artifact_store": storage[0] if storage else "not configured",
        "redis": storage[1] if storage else "not used",
    }


def _inline(value: Any) -> str:
    """`{"a": 1, "b": None}` -> `a 1, b none` for the one-line health summary."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k.replace('_', ' ')} {'none' if v is None else v}"
                         for k, v in value.items())
    return str(value)


def health_markdown(data: Mapping[str, Any]) -> str:
    """A short report an admin reads in the chat, with the JSON underneath."""
    req, up, cat = data["requests"], data["upstream"], data["catalog"]
    lines = [
        "### OpenRouter pipe health",
        f"- Requests: {req['in_flight']} in flight, {req['waiting']} waiting, "
        f"{req['total']} served since start ({data['uptime_s']:.0f}s ago), "
        f"{req['rejected_busy']} turned away as busy",
        f"- Upstream latency p50/p95: {up['latency_ms_p50']} / {up['latency_ms_p95']} ms; "
        f"first token p50/p95: {up['first_token_ms_p50']} / {up['first_token_ms_p95']} ms",
        "- Upstream responses by status: " + (", ".join(
            f"{k}: {v}" for k, v in sorted(up["responses_by_status"].items())) or "none yet"),
        "- Failures by kind: " + (", ".join(
            f"{k}: {v}" for k, v in sorted(req["failed_by_kind"].items())) or "none"),
        f"- Catalog: {cat['models']} models, age {cat['age_s']}s"
        + (f", last refresh error: {cat['last_error']}" if cat["last_error"] else ""),
        f"- Breakers: {data['breakers'] or 'none'}; "
        f"artifact store: {_inline(data['artifact_store'])}; Redis: {_inline(data['redis'])}",
        "", "```json", json.dumps(data, indent=2), "```"]
    return "\n".join(lines)


# ─────────────────────────────────────────────────────────────────────────────
# §15 Pipe
# ─────────────────────────────────────────────────────────────────────────────


def parse_chat_request(body: Mapping[str, Any], user: Mapping[str, Any] | None,
                       metadata: Mapping[str, Any] | None, task: str | None) -> ChatRequest:
    """Open WebUI's `body` + call context -> ChatRequest (the boundary parse)."""
    meta = metadata or {}
    messages = tuple(_parse_message(m) for m in body.get("messages") or () if isinstance(m, dict))
    owui_id = str(body.get("model") or "")
    max_tokens = body.get("max_output_tokens") or body.get("max_completion_tokens") \
        or body.get("max_tokens")
    return ChatRequest(
        owui_model_id=owui_id, model_id=openrouter_model_id(owui_id), messages=messages,
        stream=bool(body.get("stream", False)),
        params={k: body[k] for k in (*_SAMPLING_PARAMS, "seed") if body.get(k) is not None},
        max_tokens=int(max_tokens) if isinstance(max_tokens, int | float) and max_tokens > 0
        else None,
        reasoning_effort=_str_or_none(body.get("reasoning_effort")),
        response_format=body.get("response_format") if isinstance(
            body.get("response_format"), Mapping) else None,
        task=task or _str_or_none(meta.get("task")),
        chat_id=_str_or_none(meta.get("chat_id")),
        user_id=str((user or {}).get("id") or "anonymous"),
        user_role=str((user or {}).get("role") or "user"))


def _str_or_none(value: Any) -> str | None:
    return str(value) if value else None


def _parse_message(raw: Mapping[str, Any]) -> ChatMessage:
    calls = tuple(
        ToolCall(str(c.get("id") or ""), str((c.get("function") or {}).get("name") or ""),
                 str((c.get("function") or {}).get("arguments") or ""))
        for c in raw.get("tool_calls") or () if isinstance(c, Mapping))
    return ChatMessage(role=str(raw.get("role") or "user"), parts=parse_content(raw.get("content")),
                       tool_calls=calls, tool_call_id=_str_or_none(raw.get("tool_call_id")))


def extract_output_text(response: Mapping[str, Any]) -> str:
    """Final text of a non-streamed Responses object."""
    texts = [part.get("text") or part.get("refusal") or ""
             for item in response.get("output") or () if item.get("type") == "message"
             for part in item.get("content") or ()]
    return "".join(texts)


@dataclass(frozen=True, slots=True)
class CallContext:
    """What Open WebUI hands `pipe()` besides the body: its tools, files, request, dialogs."""

    metadata: Mapping[str, Any] = field(default_factory=dict)
    tools: Mapping[str, Any] = field(default_factory=dict)     # __tools__ (issue #3)
    files: tuple[Mapping[str, Any], ...] = ()                   # __files__ (issue #4)
    request: Any = None                                         # __request__ (issue #4)
    event_call: Callable[[dict[str, Any]], Awaitable[Any]] | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    """Everything one chat turn carries through the pipe (no per-request state on `self`)."""

    req: ChatRequest
    settings: RequestSettings
    emitter: Emitter
    log: RequestLog
    context: CallContext = field(default_factory=lambda: CallContext())

    @property
    def reference(self) -> str:
        return f"req-{self.log.request_id}"


class Pipe:
    """Open WebUI manifold: OpenRouter's catalog in the selector, chats via the Responses API.

    One instance serves every user and request; per-request state lives in `Turn` objects.
    The I/O edges (transport, clock, sleep) are constructor arguments so tests can call
    `pipe()` end to end with fakes; Open WebUI constructs it with no arguments.
    """

    Valves = Valves
    UserValves = UserValves

    def __init__(self, *, transport: Transport | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 artifact_db: DBRunner | None = None,
                 redis_factory: Callable[[str], Any] | None = None,
                 env: Mapping[str, Any] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.type = "manifold"
        self.valves = self.Valves()
        self._clock = clock
        self._telemetry = Telemetry(clock)
        self._logs = RecentLogs()
        self._client = OpenRouterClient(transport or AiohttpTransport(), sleep,
                                        observe=self._telemetry.upstream, clock=clock)
        self._catalog = CatalogRegistry(self._client.fetch_models, clock)
        self._gate = AdmissionGate(clock)
        self._models_cache: tuple[Any, list[dict[str, str]]] | None = None
        self._artifact_db = artifact_db
        self._redis_factory = redis_factory or _redis_from_url
        self._env = env
        self._wall_clock = wall_clock
        self._stores: dict[tuple[str, bool], ArtifactStore] = {}

    # -- model list ----------------------------------------------------------------------

    async def pipes(self) -> list[dict[str, str]]:
        """The selector entries; called by Open WebUI on every model-list request."""
        valves = self.valves
        _BASE_LEVEL[0] = logging.getLevelName(valves.LOG_LEVEL)
        try:
            settings = RequestSettings.merge(valves, None)
            snap = await self._catalog.get(settings, settings.catalog_ttl)
        except PipeError as exc:
            return [_status_entry("catalog", f"catalog unavailable: {exc}")]
        key = (snap, valves.MODEL_ID, valves.MODEL_NAME_PREFIX, valves.SHOW_HEALTH_MODEL)
        if self._models_cache is None or self._models_cache[0] != key:
            models = build_model_list(snap, valves.MODEL_ID, valves.MODEL_NAME_PREFIX)
            if valves.SHOW_HEALTH_MODEL:
                models.append(HEALTH_ENTRY)
            self._models_cache = (key, models)
        return self._models_cache[1]

    # -- chat ----------------------------------------------------------------------------

    async def pipe(self, body: dict[str, Any], __user__: dict[str, Any] | None = None,
                   __metadata__: dict[str, Any] | None = None,
                   __event_emitter__: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
                   __event_call__: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
                   __task__: str | None = None, __tools__: dict[str, Any] | None = None,
                   __files__: list[dict[str, Any]] | None = None, __request__: Any = None
                   ) -> str | AsyncIterator[dict[str, Any]]:
        """Serve one chat turn: a plain string for tasks and `stream: false`, else chunks."""
        req = parse_chat_request(body, __user__, __metadata__, __task__)
        try:                                                               # 2 settings
            settings = RequestSettings.merge(
                self.valves, _as_user_valves((__user__ or {}).get("valves")), req.user_role)
        except PipeError as exc:
            return _fail_fast(req, exc)
        log = RequestLog(uuid.uuid4().hex[:12], req.user_id, req.chat_id or "-",
                         settings.log_level)
        context = CallContext(__metadata__ or {}, __tools__ or {},
                              tuple(f for f in __files__ or () if isinstance(f, Mapping)),
                              __request__, __event_call__)
        turn = Turn(req, settings, Emitter(__event_emitter__), log, context)
        self._logs.add(log)
        if req.model_id == HEALTH_ENTRY["id"]:
            return await self._health(turn)
        if req.task or not req.stream:
            return await self._complete(turn)
        return self._stream(turn)

    async def _complete(self, turn: Turn) -> str:
        """Tasks and `stream: false`: one non-streamed request, the answer as a string."""
        token = CURRENT_LOG.set(turn.log)
        try:
            self._telemetry.requests += 1
            async with self._gate.admit(turn.req.user_id, turn.settings.admission):  # 1 admit
                plan = await self._plan(turn)                                # 3 catalog, 6
                resp = await self._client.open_response(plan.payload, turn.settings)  # 7 send
                try:
                    data = _loads(await resp.read())
                finally:
                    await resp.close()
            text = _final_text(data) + await self._checkpoint(turn, response_reasoning(data))
            await self._after_turn(turn, plan)                                # 11 persist
            return text
        except Exception as exc:  # the boundary: Open WebUI shows str() of what we raise
            failure = await self._report_failure(turn, exc)
            raise PipeError(f"{describe_error(failure)}\n(reference {turn.reference})") from exc
        finally:
            _reset_context(CURRENT_LOG, token)

    async def _stream(self, turn: Turn) -> AsyncIterator[dict[str, Any]]:
        """Streamed chat turn. Every failure ends as readable text or an error chunk."""
        token = CURRENT_LOG.set(turn.log)
        timing = StreamTiming(started=self._clock())
        renderer = ChunkRenderer(turn.req.owui_model_id, int(time.time()))
        state = StreamState()
        try:
            self._telemetry.requests += 1
            async with self._gate.admit(turn.req.user_id, turn.settings.admission):  # 1 admit
                plan = await self._plan(turn)                                # 3 catalog, 6
                for note in plan.notes:
                    await turn.emitter.notify(note)
                resp = await self._client.open_response(plan.payload, turn.settings)  # 7 send
                try:
                    async for chunks in self._pump(resp, state, renderer, timing):  # 8-9
                        for chunk in chunks:                                         # 12
                            yield chunk
                finally:
                    await resp.close()
                markers = await self._checkpoint(turn, turn_reasoning(state))  # 11 persist
                if markers:
                    yield renderer.text_chunk(markers)
            for chunk in self._finish(state, renderer, timing):
                yield chunk
            await self._after_turn(turn, plan)
            await self._announce(turn, state, timing)
        except Exception as exc:  # the boundary: every failure becomes words for the user
            failure = await self._report_failure(turn, exc)
            yield (renderer.text_chunk(interruption_notice(failure, turn.reference))
                   if renderer.emitted_text else error_chunk(failure, turn.reference))
        finally:
            _reset_context(CURRENT_LOG, token)

    async def _plan(self, turn: Turn) -> Transformed:
        entry = await self._resolve_entry(turn.req, turn.settings)
        artifacts = await self._load_artifacts(turn)                         # 4 history
        plan = build_responses_request(turn.req, entry, turn.settings, artifacts)
        plan = dataclasses.replace(plan, replayed_reasoning=tuple(
            i for i, item in artifacts.items() if item.get("type") == REASONING_ITEM))
        LOG.info("Turn: model=%s stream=%s task=%s messages=%d", entry.id,
                 plan.payload.get("stream"), turn.req.task, len(turn.req.messages))
        if LOG.isEnabledFor(logging.DEBUG) and turn.log.level <= logging.DEBUG:
            LOG.debug("Request body: %s", _dumps(plan.payload).decode()[:20000])
        return plan

    async def _pump(self, resp: TransportResponse, state: StreamState,
                    renderer: ChunkRenderer, timing: StreamTiming
                    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Network reads -> decoded events -> reduced intents -> rendered chunk lists."""
        decoder = SSEDecoder()
        async for raw in resp.iter_chunks():
            intents = reduce_events(state, decoder.feed(raw))
            if intents:
                chunks = renderer.render(intents)
                if chunks:
                    if timing.first_token_at is None:
                        timing.first_token_at = self._clock()
                    yield chunks
            if state.finished:
                break
        finish_stream(state)

    def _finish(self, state: StreamState, renderer: ChunkRenderer, timing: StreamTiming
                ) -> list[dict[str, Any]]:
        timing.ended_at = self._clock()
        if timing.first_token is not None:
            self._telemetry.first_token.append(timing.first_token)
        LOG.info("Done: %s", final_status_line(state.usage, timing))
        return [from_tail(renderer, state),
                {"choices": [], "usage": usage_payload(state.usage, timing)}]

    async def _announce(self, turn: Turn, state: StreamState, timing: StreamTiming) -> None:
        if turn.settings.show_final_status:
            await turn.emitter.status(final_status_line(state.usage, timing), done=True)
        if turn.settings.log_citation == "always":
            await turn.emitter.citation(f"Pipe log {turn.reference}", turn.log.text())

    async def _report_failure(self, turn: Turn, exc: Exception) -> PipeError:
        """Log and count a failure, attach the turn's log; returns the error to show."""
        if isinstance(exc, PipeError):
            status = f", HTTP {exc.status}" if isinstance(exc, UpstreamStatusError) else ""
            LOG.warning("Turn failed (%s%s): %s", type(exc).__name__, status, exc)
            failure = exc
        else:  # a bug: keep the traceback for the admin, give the user a reference
            LOG.exception("Turn failed with an unexpected %s", type(exc).__name__)
            failure = PipeError("The pipe hit an unexpected internal error.",
                                hint="An admin can read the details in this turn's log.")
        self._telemetry.failed(failure if isinstance(exc, PipeError) else exc)
        if turn.settings.log_citation != "off":
            await turn.emitter.citation(f"Pipe log {turn.reference}", turn.log.text())
        return failure

    async def _resolve_entry(self, req: ChatRequest, settings: RequestSettings) -> CatalogEntry:
        if req.model_id.startswith(STATUS_ENTRY_PREFIX):
            raise ConfigError("This entry reports a configuration problem; it is not a model.",
                              hint="An admin should check the pipe's valves (MODEL_ID, API_KEY).")
        snap = await self._catalog.get(settings, settings.catalog_ttl)
        entry = snap.find(req.model_id)
        if entry is None:
            raise ModelNotAvailable(f"The model '{req.model_id}' is not in OpenRouter's catalog.",
                                    hint="Pick another model; it may have been retired.")
        return entry

    # -- health ----------------------------------------------------------------------------

    async def _health(self, turn: Turn) -> str | AsyncIterator[dict[str, Any]]:
        """The admin-only health entry: a report, its JSON, or one turn's log by reference."""
        if turn.req.user_role != "admin":
            return _fail_fast(turn.req, PipeError("The pipe health report is for admins only."))
        data = health_snapshot(self._telemetry, self._gate, self._catalog, self._clock(),
                               await self._storage_health())
        text = health_reply(turn.req.messages[-1].text if turn.req.messages else "", data,
                            self._logs)
        if turn.req.task or not turn.req.stream:
            return text

        async def reply() -> AsyncIterator[dict[str, Any]]:
            renderer = ChunkRenderer(turn.req.owui_model_id, int(time.time()))
            yield renderer.text_chunk(text)
            yield renderer.finish_chunk()

        return reply()

    async def close(self) -> None:
        """Release pooled connections (Open WebUI never calls this; tests and tools do)."""
        await self._client.aclose()
        for store in self._stores.values():
            await store.close()

    # -- artifacts (issue #5) ---------------------------------------------------------------

    async def _checkpoint(self, turn: Turn, items: list[dict[str, Any]]) -> str:
        """Persist one round's items (durably written or queued); returns their marker lines.

        Called after each tool round and at the end of a turn. Returns "" when nothing was
        stored; a storage failure is logged and told to the user, never raised.
        """
        settings = turn.settings
        keep = [dict(it) for it in items if storable(it, settings.reasoning_retention)]
        if not keep or turn.req.task or settings.artifact_keys is None:
            return ""
        store = await self._artifact_store(turn)
        if store is None:
            return ""
        codec, now = ArtifactCodec.of(settings), self._wall_clock()
        message_id = str(turn.context.metadata.get("message_id") or "")
        rows = [ArtifactRow(new_artifact_id(), artifact_scope(turn.req), message_id, seq,
                            str(it.get("type")), codec.encode(it), now)
                for seq, it in enumerate(keep)]
        try:
            ids = await store.save(rows, settings.redis_cache_ttl)
        except ArtifactStoreError as exc:
            LOG.warning("Could not store %d items: %s", len(rows), exc)
            await turn.emitter.notify("This reply's reasoning and tool results could not be "
                                      "saved; the model won't see them in the next turn.")
            return ""
        LOG.info("Stored %d items (worker pid %d)", len(ids), os.getpid())
        return marker_block(ids)

    async def _checkpoint_passthrough(self, turn: Turn, reasoning: list[dict[str, Any]],
                                      call_ids: list[str]) -> None:
        """Passthrough mode: file the reasoning that preceded calls Open WebUI will run under
        the first call's id, so it is re-attached when Open WebUI calls back with results."""
        settings = turn.settings
        if (not reasoning or not call_ids or settings.artifact_keys is None
                or settings.reasoning_retention == "disabled"):
            return
        store = await self._artifact_store(turn)
        if store is None:
            return
        scope, item = artifact_scope(turn.req), passthrough_row_item(reasoning, call_ids[0])
        row = ArtifactRow(passthrough_id(scope, call_ids[0]), scope,
                          str(turn.context.metadata.get("message_id") or ""), 0,
                          PASSTHROUGH_ITEM, ArtifactCodec.of(settings).encode(item),
                          self._wall_clock())
        try:
            await store.save([row], settings.redis_cache_ttl)
        except ArtifactStoreError as exc:
            LOG.warning("Could not store reasoning before tool calls: %s", exc)

    async def _load_artifacts(self, turn: Turn) -> dict[str, dict[str, Any]]:
        """Stored items named by markers (or tool calls) in earlier replies, by marker id."""
        ids = wanted_marker_ids(turn.req.messages) + passthrough_ids(turn.req)
        if not ids or turn.req.task or turn.settings.artifact_keys is None:
            return {}
        store = await self._artifact_store(turn)
        if store is None:
            return {}
        try:
            rows = await store.load(artifact_scope(turn.req), ids, turn.settings.redis_cache_ttl)
        except ArtifactStoreError as exc:
            LOG.warning("Earlier reasoning/tool results could not be loaded: %s", exc)
            return {}
        codec, out = ArtifactCodec.of(turn.settings), {}
        for item_id, row in rows.items():
            try:
                out[item_id] = codec.decode(row.payload)
            except ArtifactStoreError as exc:  # e.g. a rotated key: skip, keep chatting
                LOG.warning("Skipping stored item %s: %s", item_id, exc)
        LOG.info("Replaying %d of %d stored items (worker pid %d)", len(out), len(ids),
                 os.getpid())
        return out

    async def _after_turn(self, turn: Turn, plan: Transformed) -> None:
        """`next_reply` retention: reasoning sent back once is deleted; cleanup when due."""
        store = self._stores.get(self._store_key(turn))
        if store is None:
            return
        try:
            if turn.settings.reasoning_retention == "next_reply" and plan.replayed_reasoning:
                await store.delete(list(plan.replayed_reasoning))
        except ArtifactStoreError as exc:
            LOG.warning("Could not delete reasoning sent back once: %s", exc)
        store.spawn(store.cleanup_logged(turn.settings.artifact_cleanup_days,
                                         turn.settings.artifact_cleanup_interval_hours))
        store.kick()  # rows a stopped worker left queued get flushed by this one

    def _store_key(self, turn: Turn) -> tuple[str, bool]:
        function_id = turn.req.owui_model_id.split(".", 1)[0] or "openrouter"
        return artifact_table_name(function_id), turn.settings.redis_write_behind

    async def _artifact_store(self, turn: Turn) -> ArtifactStore | None:
        """This pipe's store (created on first use); None outside Open WebUI's runtime."""
        key = self._store_key(turn)
        store = self._stores.get(key)
        if store is None:
            runner = self._artifact_db or owui_db_runner()
            if runner is None:
                return None
            url = redis_url_for_write_behind(self._env if self._env is not None
                                             else owui_env()) if key[1] else None
            redis = WriteBehind(self._redis_factory(url), key[0]) if url else None
            store = self._stores[key] = ArtifactStore(ArtifactDB(runner, key[0]), redis,
                                                      clock=self._wall_clock)
        return store

    async def _storage_health(self) -> tuple[Any, Any]:
        if not self._stores:
            where = "ready" if (self._artifact_db or owui_db_runner()) else "unavailable"
            return f"{where} (no chat stored anything since start)", "not used"
        store = next(iter(self._stores.values()))
        return await store.health()


HEALTH_ENTRY = {"id": "_health", "name": "OpenRouter: pipe health (admins)"}


def health_reply(prompt: str, data: Mapping[str, Any], logs: RecentLogs) -> str:
    """`json` -> the raw snapshot; `log req-…` -> that turn's log; anything else -> report."""
    words = prompt.strip().split()
    if words[:1] == ["json"]:
        return json.dumps(data, indent=2)
    if len(words) == 2 and words[0] == "log":
        found = logs.get(words[1])
        if found is None:
            return f"No log for {words[1]} (only the last turns are kept in memory)."
        return f"```\n{found.text()}\n```"
    return health_markdown(data)


def _fail_fast(req: ChatRequest, exc: PipeError) -> AsyncIterator[dict[str, Any]]:
    """A failure before any work: raised for tasks/non-stream, one error chunk for streams."""
    if req.task or not req.stream:
        raise exc

    async def one_error() -> AsyncIterator[dict[str, Any]]:
        yield error_chunk(exc)

    return one_error()


def _final_text(data: Mapping[str, Any]) -> str:
    if data.get("status") == "failed":
        err = data.get("error") or {}
        raise UpstreamStreamError(str(err.get("message") or "The response failed."),
                                  code=str(err.get("code") or ""))
    return extract_output_text(data)


def from_tail(renderer: ChunkRenderer, state: StreamState) -> dict[str, Any]:
    """The chunk that closes a stream: a visible note for a length cut-off, else finish."""
    if state.terminal == "incomplete":
        reason = state.incomplete_reason.replace("_", " ") or "a limit"
        return renderer.text_chunk(f"\n\n---\n⚠️ The answer stopped early ({reason}).")
    return renderer.finish_chunk()


def build_model_list(snap: CatalogSnapshot, model_ids: str, prefix: str
                     ) -> list[dict[str, str]]:
    """Selector entries; a leading status entry names MODEL_ID ids that matched nothing."""
    selected, unknown = select_models(snap.entries, model_ids)
    models = [{"id": e.id, "name": prefix + e.name} for e in selected]
    if unknown:
        LOG.error("MODEL_ID lists ids OpenRouter doesn't have: %s", ", ".join(unknown))
        models.insert(0, _status_entry("model-id",
                                       "MODEL_ID has unknown ids: " + ", ".join(unknown)))
    return models


def _status_entry(slug: str, text: str) -> dict[str, str]:
    return {"id": f"{STATUS_ENTRY_PREFIX}-{slug}", "name": f"⚠ OpenRouter: {text}"[:200]}


def _as_user_valves(raw: Any) -> UserValves | None:
    if raw is None or isinstance(raw, UserValves):
        return raw
    if isinstance(raw, BaseModel):
        raw = raw.model_dump()
    try:
        return UserValves.model_validate(raw)
    except (ValueError, TypeError):
        LOG.warning("Ignoring invalid user valves: %.200r", raw)
        return None
