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
#   §6  Model records     CatalogEntry -> Open WebUI model record; admin edits win; access sync
#   §7  Routing policy    valves ⊕ per-model params ⊕ user tightening -> provider, models, cache
#   §8  Transformer       Open WebUI chat body -> Responses request (pure)
#   §9  Intake            attachments -> inline parts: size caps, SSRF-safe fetch, files
#   §10 Client            transport (injectable), retry policy, upstream error mapping
#   §11 Stream decoding   SSEDecoder.feed(bytes) -> events; reducer = table of handlers
#   §12 Image output      generated images -> bytes -> Open WebUI file -> message link
#   §13 Tool executor     tool schemas, strict mode, runner with timeouts and breakers
#   §14 Artifact store    codec, markers, SQLAlchemy store, Redis write-behind
#   §15 Rendering         intents -> Open WebUI chunks; usage; status line; error text
#   §16 Admission         global + per-user concurrency gate with a bounded wait queue
#   §17 Spend             ledger per user/model/day, budgets, per-user keys, balance
#   §18 Telemetry         redacted request-scoped logs, log pump, counters, health snapshot
#   §19 Pipe              the numbered steps of a request and nothing else

# ─────────────────────────────────────────────────────────────────────────────
# §1 Imports and constants
# ─────────────────────────────────────────────────────────────────────────────
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import copy
import dataclasses
import errno
import functools
import hashlib
import hmac
import html
import importlib
import inspect
import io
import ipaddress
import json
import logging
import math
import mimetypes
import os
import random
import re
import socket
import ssl
import sys
import time
import typing
import urllib.parse
import uuid
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, GetCoreSchemaHandler, ValidationInfo, field_validator
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
DEFAULT_QUEUE_MAX_ROWS = 10_000  # rows the Redis write-behind queue holds (REDIS_QUEUE_MAX_ROWS)
_SAMPLING_PARAMS = ("temperature", "top_p", "top_k", "stop", "frequency_penalty",
                    "presence_penalty", "parallel_tool_calls")

# ─────────────────────────────────────────────────────────────────────────────
# §2 Errors
#
#   PipeError                   user-facing message + hint
#   ├── ConfigError             bad or missing valves
#   ├── ModelNotAvailable       not in the catalog / not enabled
#   ├── AdmissionRejected       too busy, or the per-user limit
#   │   └── BudgetExceeded          the user's budget is used up (§17)
#   ├── UpstreamError           OpenRouter said no
#   │   ├── UpstreamStatusError     HTTP error before streaming
#   │   ├── UpstreamConnectionError network failure before any response
#   │   │   └── UpstreamBodyError       a body that broke off while it was read
#   │   ├── UpstreamUnexpectedBody  a 200 that is no stream (HTML page, plain JSON)
#   │   ├── UpstreamStreamError     failure after the first byte
#   │   └── ImageRefused            an image model declined (content policy, size)
#   ├── IntakeError             an attachment was refused
#   │   ├── UnsafeURLError
#   │   └── PayloadTooLargeError
#   ├── ToolError               reported to the model as the call's output, never fatal
#   │   ├── BadToolArguments
#   │   ├── ToolTimeout
#   │   └── ToolBreakerOpen
#   ├── ArtifactStoreError
#   │   └── ArtifactRowRejected     the database refused this row (not the connection)
#   ├── RecordSyncError         model records not synced (health report only, never a user)
#   ├── KeyLimitError           the user's own key / budget key refused (§17)
#   ├── SpendLedgerError        the spend ledger's database failed (§17)
#   └── BadRequest              the chat body has a shape the pipe can't read
#
# `describe_error` (§15) is the one place that turns these into what the user reads.
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
    availability: Mapping[str, Any] = field(default_factory=dict)  # issue #12
    rate_limits: Mapping[str, str] = field(default_factory=dict)   # X-RateLimit-* (#12)
    model: str = ""    # the model asked for (set by the pipe)
    routing: str = ""  # the routing policy that may have excluded every provider

    def __post_init__(self) -> None:
        PipeError.__init__(self, self.provider_message or f"HTTP {self.status}")


class UpstreamConnectionError(UpstreamError):
    """The request never got an HTTP response (DNS, connect, TLS, read timeout)."""


class UpstreamBodyError(UpstreamConnectionError):
    """Reading a response body failed (timeout, connection or payload error); retried like
    a connection error as long as nothing reached the user yet."""


class UpstreamUnexpectedBody(UpstreamError):
    """HTTP 200, but the body is not what was asked for (an HTML proxy page, plain JSON)."""


class UpstreamStreamError(UpstreamError):
    """The stream failed after it started: `response.failed`, an error event, or a cut-off."""

    def __init__(self, message: str, *, code: str = "", error_type: str = "",
                 hint: str = "", availability: Mapping[str, Any] | None = None,
                 model: str = "") -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.error_type = error_type
        self.availability: Mapping[str, Any] = availability or {}  # issue #12, mid-stream
        self.model = model  # the model that was answering, for the availability sentence


class ImageRefused(UpstreamStreamError):
    """A picture was refused or lost (issue #14): `reason` is `policy` (content policy),
    `size` or `other`; describe_error says which in one sentence."""

    def __init__(self, message: str, *, reason: str = "other", code: str = "",
                 error_type: str = "") -> None:
        super().__init__(message, code=code, error_type=error_type)
        self.reason = reason


class IntakeError(PipeError):
    """An attachment could not be sent to the model."""


class UnsafeURLError(IntakeError):
    """A remote URL points somewhere the server must not fetch."""


class PayloadTooLargeError(IntakeError):
    """An attachment exceeds a size limit."""


class ToolError(PipeError):
    """A tool call failed (timeout, unknown tool, breaker open, bad arguments).

    Tool errors never end a chat: the text goes to the model as the call's output and into
    the tool card, so the model can recover.
    """


class BadToolArguments(ToolError):
    """The model's arguments were not a JSON object; it is told so and may call again."""


class ToolTimeout(ToolError):
    """A tool ran longer than TOOL_TIMEOUT_SECONDS."""


class ToolBreakerOpen(ToolError):
    """A tool failed repeatedly for this user and is paused."""


class RecordSyncError(PipeError):
    """The model records could not be synced (shown in the health report, never to users)."""


class ArtifactStoreError(PipeError):
    """Database, Redis or crypto trouble in the artifact store; never fatal to a chat."""


class ArtifactRowRejected(ArtifactStoreError):
    """The database refused the rows themselves (a value too long, a NUL byte), not the
    connection: retrying them as they are will never work."""


class BadRequest(PipeError):
    """The chat body (from an API client or an edited message) has a shape the pipe can't
    read: the message names the field, e.g. `messages[2].tool_calls[0].function`."""

    def __init__(self, message: str) -> None:
        super().__init__(f"The request could not be read: {message}",
                         hint="Fix the request (or the edited message) and send it again.")


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
_VERBATIM_USER_VALVES = frozenset({"API_KEY"})  # issue #13: never lower-cased


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

    def reveal(self, valve: str = "API_KEY") -> str:
        if not self.startswith(self.PREFIX):
            return str(self)
        from cryptography.fernet import InvalidToken

        fernet = _fernet_from_secret()
        try:
            if fernet is None:
                raise InvalidToken
            return fernet.decrypt(self[len(self.PREFIX):].encode()).decode()
        except InvalidToken:
            what = "OpenRouter API key" if valve == "API_KEY" else valve
            raise ConfigError(
                f"The stored {what} can't be decrypted (WEBUI_SECRET_KEY changed).",
                hint=f"An admin must re-enter {valve} in the pipe's valves.") from None


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
        default=64, ge=1, le=10000,
        description="Answers generated at once, all users together, per worker process: "
                    "with several Open WebUI workers (UVICORN_WORKERS) each admits this many, "
                    "so the server-wide limit is this times the number of workers.")
    MAX_QUEUED_REQUESTS: int = Field(
        default=64, ge=0, le=10000,
        description="Requests that may wait for a free slot, per worker process; beyond "
                    "that users get 'busy'.")
    QUEUE_WAIT_SECONDS: float = Field(
        default=20.0, ge=0, le=600,
        description="Longest wait for a free slot before the user is told to retry.")
    MAX_CONCURRENT_REQUESTS_PER_USER: int = Field(
        default=4, ge=1, le=1000,
        description="Answers one user may generate at once, per worker process (Open WebUI "
                    "may send one user's chats to different workers).")
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
    TOOL_EXECUTION_MODE: Literal["pipe", "open_webui"] = Field(
        default="pipe",
        description="Who runs Open WebUI's tools: `pipe` (shown as tool cards, results sent "
                    "back to the model in the same turn) or `open_webui` (the pipe streams "
                    "tool calls and Open WebUI executes them).")
    MAX_TOOL_ROUNDS: int = Field(
        default=8, ge=1, le=50,
        description="Tool rounds per answer (pipe mode). At the limit the model is asked for "
                    "a final answer without tools and the user is told.")
    TOOL_TIMEOUT_SECONDS: float = Field(
        default=60.0, ge=1, le=3600, description="Longest a single tool call may run.")
    MAX_PARALLEL_TOOLS_PER_REQUEST: int = Field(
        default=4, ge=1, le=64, description="Tool calls of one answer running at once.")
    MAX_PARALLEL_TOOLS_GLOBAL: int = Field(
        default=32, ge=1, le=1024, description="Tool calls running at once, all users.")
    TOOL_BREAKER_THRESHOLD: int = Field(
        default=5, ge=1, le=100,
        description="Failures of one tool for one user (within the window) that pause it.")
    TOOL_BREAKER_WINDOW_SECONDS: float = Field(
        default=60.0, ge=1, le=86400,
        description="Window for TOOL_BREAKER_THRESHOLD, and how long a paused tool stays off.")
    STRICT_TOOL_SCHEMAS: bool = Field(
        default=True,
        description="Send tool schemas in strict mode (exact arguments). A schema strict mode "
                    "can't express is sent non-strict.")
    TOOL_RESULT_MAX_CHARS: int = Field(
        default=50_000, ge=100, le=2_000_000,
        description="Longest tool result sent to the model (longer ones are cut, with a note).")
    TOOL_CARD_MAX_CHARS: int = Field(
        default=2_000, ge=50, le=200_000,
        description="Longest tool result shown in the chat's tool card.")
    WEB_SEARCH: Literal["off", "user_toggle", "always"] = Field(
        default="user_toggle",
        description="OpenRouter web search (paid per result): only when the user turns on "
                    "Web Search in the chat, always, or never.")
    WEB_SEARCH_MAX_RESULTS: int = Field(
        default=5, ge=1, le=25, description="Web search results per search.")
    REMOTE_MCP_SERVERS_JSON: EncryptedStr = Field(
        default=EncryptedStr(""),
        description='Remote MCP servers the provider calls, as JSON: one object or a list of '
                    '{"server_label", "server_url", "require_approval", "allowed_tools", '
                    '"headers", "server_description", "authorization"}. Stored encrypted '
                    'with WEBUI_SECRET_KEY (it usually holds credentials), so the form shows '
                    'it masked: to change it, paste the whole JSON again. Its header and '
                    'authorization values never appear in logs.',
        json_schema_extra=_PASSWORD)

    # ── Multimodal intake (issue #4) ──────────────────────────────────────────
    MAX_IMAGE_MB: float = Field(
        default=20.0, gt=0, le=500,
        description="Largest image sent to a model (data URL, upload or download). Open "
                    "WebUI's own upload limit applies too when it is lower.")
    MAX_FILE_MB: float = Field(
        default=50.0, gt=0, le=500,
        description="Largest document (PDF and other files) sent to a model inline.")
    MAX_AUDIO_MB: float = Field(
        default=25.0, gt=0, le=500, description="Largest audio clip sent to a model inline.")
    MAX_VIDEO_MB: float = Field(
        default=50.0, gt=0, le=500, description="Largest video sent to a model inline.")
    MAX_IMAGES_PER_REQUEST: int = Field(
        default=20, ge=0, le=500,
        description="Images sent per request (the newest are kept; the user is told "
                    "about the rest).")
    MAX_REQUEST_ATTACHMENTS_MB: float = Field(
        default=100.0, gt=0, le=2000,
        description="Largest total of the attachments inlined into one request, counted as "
                    "sent (base64). Every turn re-sends the chat's attachments, so this "
                    "bounds long chats: the newest are kept, the user is told about the rest.")
    SEND_FILES_NATIVELY: bool = Field(
        default=False,
        description="Also send documents attached to a chat natively (e.g. PDFs) to "
                    "models that read files. Open WebUI still adds its retrieval (RAG) "
                    "excerpts for them unless the model's 'File Context' capability is off "
                    "(Open WebUI 0.12; 0.6 has no such switch), so the model gets both.")
    SAVE_REMOTE_MEDIA: bool = Field(
        default=True,
        description="Save downloaded remote images/files into Open WebUI's file store, "
                    "owned by the user, so the chat still works when the link dies.")
    REMOTE_FETCH_ALLOW_HTTP: bool = Field(
        default=False,
        description="Also download plain-http URLs (https only by default). Private and "
                    "internal addresses stay refused either way.")
    REMOTE_FETCH_ALLOWED_HOSTS: str = Field(
        default="",
        description="Comma list of hosts remote media may come from (`example.com` also "
                    "allows its subdomains). Empty = any public host.")
    REMOTE_FETCH_DENIED_HOSTS: str = Field(
        default="",
        description="Comma list of hosts never fetched (subdomains included).")
    REMOTE_FETCH_TIMEOUT_SECONDS: float = Field(
        default=30.0, ge=1, le=600,
        description="Total time budget for one download, retries and redirects included.")
    REMOTE_FETCH_RETRIES: int = Field(
        default=2, ge=0, le=5,
        description="Retries of a download after a network error, 429 or 5xx (never after "
                    "other 4xx).")

    # ── Artifact store and Redis (issue #5) ───────────────────────────────────
    ARTIFACT_ENCRYPTION_KEY: EncryptedStr = Field(
        default=EncryptedStr(""),
        description="Key(s) for the stored reasoning, tool calls and tool results (always "
                    "encrypted). Empty: a key derived from Open WebUI's WEBUI_SECRET_KEY is "
                    "used. Several keys separated by commas: the first encrypts, all decrypt "
                    "(key rotation); rows written with the derived key stay readable too.",
        json_schema_extra=_PASSWORD)
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

    # ── Team access and model records (issue #10) ──
    MODEL_ACCESS: str = Field(
        default="admins",
        description="Who sees the imported models: `admins` (Open WebUI's own rule), `all` "
                    "(every user), or a comma list of Open WebUI group names (their members "
                    "and admins). Applied within a minute of saving, through each model's "
                    "Open WebUI record; a record's access an admin changed by hand is kept.")
    SYNC_MODEL_RECORDS: bool = Field(
        default=True,
        description="Keep one Open WebUI model record per listed model (access, capabilities, "
                    "description, tags from OpenRouter). Fields an admin edited are never "
                    "overwritten. Off: records are neither created nor changed, so ordinary "
                    "users see only models an admin opened by hand.")

    # ── Hardening (issue #11) ──
    # (faults: Redis queue bound and breaker)
    REDIS_QUEUE_MAX_ROWS: int = Field(
        default=DEFAULT_QUEUE_MAX_ROWS, ge=100, le=10_000_000,
        description="Most stored items the Redis write-behind queue holds. When it is full "
                    "(the database is slow or down), new items are written to the database "
                    "directly while the turn waits; nothing is dropped. The health report "
                    "counts these direct writes.")
    REDIS_SKIP_SECONDS: float = Field(
        default=30.0, ge=1, le=3600,
        description="After a Redis failure (down, hung, timing out), Redis is skipped for "
                    "this long: stored items are written to and read from the database "
                    "directly, so a hung Redis costs one timeout, not one per turn. Then "
                    "Redis is tried again. The health report shows when it is skipped.")

    # ── Routing, fallbacks, caching (issue #12) ──
    PROVIDER_ROUTING: str = Field(
        default="",
        description='Default provider routing for every model, as OpenRouter\'s `provider` '
                    'JSON, e.g. {"data_collection": "deny", "zdr": true, "sort": "price", '
                    '"ignore": ["example"], "max_price": {"prompt": 3, "completion": 15}}. '
                    "Keys: order, only, ignore, allow_fallbacks, require_parameters, "
                    "data_collection, zdr, enforce_distillable_text, quantizations, sort, "
                    "max_price (US dollars per million tokens), preferred_max_latency, "
                    "preferred_min_throughput, options. A model's own `provider` custom "
                    "parameter (model editor → Advanced Params) wins per key. Users may only "
                    "tighten it. A bad key or value is refused on save (Open WebUI 0.12 says "
                    "only 'Error updating function valves'; the model selector names it).")
    FALLBACK_MODELS: str = Field(
        default="",
        description="Comma list of models OpenRouter tries, in order, when the chosen model "
                    "fails (sent as `models`), e.g. `openai/gpt-5.2, google/gemini-2.5-pro`. "
                    "A model's own `models` custom parameter replaces it. The status line "
                    "says when a fallback answered; cost is that model's.")
    RATE_LIMIT_FALLBACK: bool = Field(
        default=True,
        description="When OpenRouter still answers 429/502/503/529 after the retries, ask "
                    "the first fallback model (FALLBACK_MODELS) instead and tell the user.")
    MODEL_VARIANTS: str = Field(
        default="",
        description="Extra selector entries routed verbatim, comma separated: routing "
                    "variants (`anthropic/claude-sonnet-4.5:nitro`, `…:floor`, `…:exacto`), "
                    "presets (`openai/gpt-5-mini@preset/support`, `@preset/support`), "
                    "`openrouter/auto`, aliases "
                    "(`~anthropic/claude-sonnet-latest`). Each inherits its base model's "
                    "capabilities and is named after it with the variant in parentheses.")
    AUTO_ROUTER_ALLOWED_MODELS: str = Field(
        default="",
        description="Models `openrouter/auto` may pick from (comma list, wildcards like "
                    "`anthropic/*` allowed), sent with the auto-router plugin. Empty: "
                    "OpenRouter's default pool.")
    PROMPT_CACHE: Literal["off", "5m", "1h"] = Field(
        default="5m",
        description="Prompt caching for Anthropic models (top-level `cache_control`): off, "
                    "5 minutes, or 1 hour (writes cost 1.25x / 2x the input price, reads "
                    "0.1x). Other providers cache automatically. The status line shows "
                    "cached tokens and what the cache saved.")
    ROUTER_METADATA: bool = Field(
        default=True,
        description="Ask OpenRouter which provider served (X-OpenRouter-Metadata) and show "
                    "it in the status line, e.g. `via DeepInfra (fp8) after Together "
                    "failed`; counted per provider in the health report.")
    SERVICE_TIER: Literal["auto", "flex", "priority"] = Field(
        default="auto",
        description="OpenRouter service tier: `auto` (not sent), `flex` (cheaper, slower, "
                    "flex endpoints only) or `priority` (faster, costs more).")
    TEXT_VERBOSITY: Literal["default", "low", "medium", "high"] = Field(
        default="default",
        description="Answer length hint (`text.verbosity`); `default` sends nothing.")
    PDF_PARSER_ENGINE: Literal["cloudflare-ai", "mistral-ocr", "native",
                               "openrouter-default"] = Field(
        default="cloudflare-ai",
        description="How OpenRouter reads PDFs for models that can't read them natively: "
                    "`cloudflare-ai` (free, default), `mistral-ocr` ($2 per 1,000 pages, "
                    "best for scans), `native`, or `openrouter-default` (sends nothing: "
                    "OpenRouter then uses mistral-ocr and charges for it).")
    RESPONSE_HEALING: bool = Field(
        default=True,
        description="Ask OpenRouter to repair malformed JSON in non-streamed JSON-mode "
                    "answers (the response-healing plugin; streamed answers can't be healed).")
    USER_IDENTIFIER: Literal["off", "hash"] = Field(
        default="hash",
        description="Send `user` and `safety_identifier` as a keyed hash of the Open WebUI "
                    "user id (stable, not reversible) so OpenRouter can isolate abuse per "
                    "user; `off` sends nothing.")
    SEND_CHAT_METADATA: bool = Field(
        default=False,
        description="Send the Open WebUI chat id in the request's `metadata` map (shows in "
                    "OpenRouter's logs).")

    @field_validator("PROVIDER_ROUTING")
    @classmethod
    def _check_provider_routing(cls, value: str) -> str:
        """Refuses the save (Open WebUI answers 400). Open WebUI 0.12 shows admins only
        "Error updating function valves", so the reason is also kept for the selector."""
        _, problems = check_provider(value, "PROVIDER_ROUTING")
        note_valve_check("PROVIDER_ROUTING", value, problems)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    # ── Spend control (issue #13) ──
    SPEND_LEDGER: bool = Field(
        default=True,
        description="Record every turn's cost (tool rounds and tasks included) per user, model "
                    "and UTC day in a table of Open WebUI's database. No prompt or answer text "
                    "is stored. Budgets, `spend` reports and 'my usage' read this ledger.")
    BUDGET_USD: float = Field(
        default=0.0, ge=0, le=1_000_000,
        description="Default budget per user in US dollars per BUDGET_PERIOD. 0 = no budget "
                    "(users without an override may spend without limit).")
    BUDGET_PERIOD: Literal["daily", "weekly", "monthly"] = Field(
        default="monthly",
        description="Budget period, in calendar UTC periods like OpenRouter's key limits: a day "
                    "from midnight UTC, a week Monday to Sunday, a month from the 1st.")
    BUDGET_WARN_PERCENT: float = Field(
        default=80.0, ge=0, le=100,
        description="From this share of the budget on, a user sees a status note like "
                    "'$8.10 of $10.00 used this month' when a chat starts. 0 = always shown.")
    BUDGET_OVERRIDES: str = Field(
        default="",
        description="Per-user and per-group budgets, comma separated: `alice@example.com=25`, "
                    "`<user id>=5`, `group:Research=50`. A value is dollars per period (0 = no "
                    "spending) or `unlimited`. A user entry beats group entries; among several "
                    "of the user's groups the highest budget wins; then BUDGET_USD applies.")
    BUDGET_EXEMPT_ADMINS: bool = Field(
        default=True, description="Admins have no budget (their spend is still recorded).")
    BUDGET_ON_LEDGER_ERROR: Literal["allow", "deny"] = Field(
        default="allow",
        description="With budgets on, what a chat does when the ledger can't be read: `allow` "
                    "(chat goes on, the failure is logged and counted in health) or `deny`.")
    BUDGET_CHECK_CACHE_SECONDS: float = Field(
        default=5.0, ge=0, le=300,
        description="How long a user's spend read from the ledger is reused by this worker "
                    "before the next budget check reads it again (its own turns are added at "
                    "once). Lower = tighter across workers, higher = fewer reads.")
    SHOW_SPEND_IN_STATUS: bool = Field(
        default=True,
        description="Add the user's own spend this period (and remaining budget) to the final "
                    "status line.")
    MANAGEMENT_API_KEY: EncryptedStr = Field(
        default=EncryptedStr(""),
        description="OpenRouter management key (optional). With a budget in force, each user gets "
                    "an OpenRouter API key of their own whose limit and reset are the user's "
                    "budget, so OpenRouter itself refuses overspend. Also reads /credits.",
        json_schema_extra=_PASSWORD)
    ALLOW_USER_API_KEYS: bool = Field(
        default=True,
        description="Let users put their own OpenRouter key in their user valves (API_KEY). "
                    "Their turns then use and are billed to their key, are recorded as "
                    "`own key` and don't count against their budget. Off: user keys are ignored.")
    LOW_CREDIT_WARNING_USD: float = Field(
        default=0.0, ge=0, le=1_000_000,
        description="When the account's remaining credit (or the API key's remaining limit) "
                    "falls below this many dollars, admins see a note on their chats. 0 = off.")
    BALANCE_REFRESH_SECONDS: float = Field(
        default=300.0, ge=30, le=86400,
        description="How often the balance (/key, /credits) is refreshed in the background, and "
                    "provisioned keys of deleted or pending users are disabled.")
    CURRENCY_NAME: str = Field(
        default="USD",
        description="Currency costs are shown in (e.g. `EUR`). The ledger stays in dollars.")
    CURRENCY_RATE: float = Field(
        default=1.0, gt=0, le=1_000_000,
        description="Fixed units of CURRENCY_NAME per US dollar (no network lookup).")

    # ── Image output (issue #14) ──
    IMAGE_ASPECT_RATIO: str = Field(
        default="",
        description="Aspect ratio asked of image models (e.g. `16:9`, `1:1`, `9:16`), sent as "
                    "`image_config.aspect_ratio` only to models whose OpenRouter image listing "
                    "offers that value; otherwise, or when empty, the model's own default is "
                    "used. Users can override it.")
    IMAGE_SIZE: str = Field(
        default="",
        description="Image size asked of image models (e.g. `1K`, `2K`, `4K`), sent as "
                    "`image_config.image_size` only to models whose OpenRouter image listing "
                    "offers it; otherwise, or when empty, the model's default. Users can "
                    "override it.")
    IMAGE_TOOL_MODEL: str = Field(
        default="",
        description="OpenRouter image model (e.g. `google/gemini-2.5-flash-image`) used when "
                    "a user turns on Open WebUI's Image toggle on a chat model that can't "
                    "make pictures itself: the pipe then offers OpenRouter's "
                    "`openrouter:image_generation` server tool with this model (the chat "
                    "model must support tools). Empty: such models answer in text and the "
                    "user is told why.")
    IMAGE_MAX_MB: float = Field(
        default=20.0, ge=1, le=200,
        description="Largest generated image saved to Open WebUI's file store; a larger one "
                    "is not saved and the answer says so.")
    IMAGE_EDIT_FOLLOW_UPS: bool = Field(
        default=True,
        description="On a follow-up (\"make the sky purple\"), send the last picture the "
                    "model made in this chat back to image models that read images, so "
                    "they edit it. Read from Open WebUI's file store with the user's access.")



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
    SEND_FILES_NATIVELY: Literal["inherit", "on", "off"] = Field(
        default="inherit",
        description="Also send your attached documents (PDFs…) to file-capable models "
                    "natively (`inherit` = admin default); Open WebUI's excerpts may "
                    "still be added.")

    # ── Artifact store (issue #5) ──
    REASONING_RETENTION: Literal["inherit", "conversation", "next_reply", "disabled"] = Field(
        default="inherit",
        description="Send the model's earlier reasoning back (`inherit` = admin default).")

    # ── Routing, fallbacks, caching (issue #12) ──
    PROVIDER_SORT: Literal["inherit", "price", "throughput", "latency", "exacto"] = Field(
        default="inherit",
        description="Prefer the cheapest, fastest, lowest-latency or most accurate provider "
                    "(`inherit` = admin default).")
    PROVIDER_DATA_COLLECTION: Literal["inherit", "deny"] = Field(
        default="inherit",
        description="`deny`: only providers that don't store or train on your prompts.")
    PROVIDER_ZDR: Literal["inherit", "on"] = Field(
        default="inherit", description="`on`: only zero-data-retention providers.")
    SERVICE_TIER: Literal["inherit", "auto", "flex", "priority"] = Field(
        default="inherit", description="Your service tier (`inherit` = admin default).")
    TEXT_VERBOSITY: Literal["inherit", "default", "low", "medium", "high"] = Field(
        default="inherit", description="Your answer length hint (`inherit` = admin default).")

    # ── Spend control (issue #13) ──
    API_KEY: EncryptedStr = Field(
        default=EncryptedStr(""),
        description="Your own OpenRouter API key (optional). Your chats then use and are billed "
                    "to it, not the shared key; stored encrypted, never shown back.",
        json_schema_extra=_PASSWORD)

    # ── Image output (issue #14) ──
    IMAGE_ASPECT_RATIO: str = Field(
        default="inherit",
        description="Your aspect ratio for generated pictures (e.g. `16:9`; `inherit` = "
                    "admin default). Used only where the model offers it.")
    IMAGE_SIZE: str = Field(
        default="inherit",
        description="Your picture size (e.g. `1K`, `2K`, `4K`; `inherit` = admin default). "
                    "Used only where the model offers it.")

    LOG_LEVEL: Literal["inherit", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="inherit",
        description="Your own log level (admins only; `inherit` = admin LOG_LEVEL). Raise it "
                    "to DEBUG and set REQUEST_LOG_CITATION to see each turn's log in chat.")

    @field_validator("*", mode="before")
    @classmethod
    def _normalise_inherit(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in _VERBATIM_USER_VALVES:  # secrets: kept exactly as typed
            return "" if value is None else value
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


def _artifact_keys(raw: str, webui_secret: str = "") -> tuple[str, ...] | None:
    """ARTIFACT_ENCRYPTION_KEY's keys, then the key derived from WEBUI_SECRET_KEY: the first
    encrypts, all decrypt. None when the valve can't be decrypted (nothing is stored or
    replayed then); () only when neither exists (no WEBUI_SECRET_KEY: a dev setup)."""
    try:
        plain = EncryptedStr(raw).reveal("ARTIFACT_ENCRYPTION_KEY")
    except ConfigError:
        LOG.error("ARTIFACT_ENCRYPTION_KEY can't be decrypted (WEBUI_SECRET_KEY changed): "
                  "nothing is stored or replayed until an admin re-enters it")
        return None
    keys = [k.strip() for k in plain.split(",") if k.strip()]
    if webui_secret:
        keys.append(derived_artifact_key(webui_secret))
    for key in keys:
        register_secret(key)
    return tuple(dict.fromkeys(keys))


def derived_artifact_key(webui_secret: str) -> str:
    """The default artifact key: WEBUI_SECRET_KEY through HMAC with a fixed label, so it is
    not the key that encrypts the valves (EncryptedStr) and reveals nothing about it."""
    digest = hmac.new(webui_secret.encode(), b"openrouter-responses-pipe/artifacts/v1",
                      hashlib.sha256).hexdigest()
    return f"webui-derived:{digest}"


def webui_secret_key() -> str:
    """Open WebUI's WEBUI_SECRET_KEY: the environment, else its loaded settings module."""
    secret = os.environ.get("WEBUI_SECRET_KEY", "")
    if not secret:
        env = sys.modules.get("open_webui.env")
        secret = str(getattr(env, "WEBUI_SECRET_KEY", "") or "")
    return secret


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
    tools: ToolSettings = field(default_factory=lambda: ToolSettings())

    # ── Multimodal intake (issue #4) ──
    intake: IntakeLimits = field(default_factory=lambda: intake_limits(Valves(), UserValves()))
    # ── Artifact store (issue #5) ──
    artifact_keys: tuple[str, ...] | None = ()  # None: configured but unreadable
    compression_min_bytes: int = 1024
    reasoning_retention: str = "conversation"
    tool_output_retention_turns: int = 10
    artifact_cleanup_days: int = 90
    artifact_cleanup_interval_hours: float = 24.0
    redis_write_behind: bool = True
    redis_cache_ttl: int = 600

    # ── Team access and model records (issue #10) ──
    records: RecordSettings = field(default_factory=lambda: RecordSettings())
    model_ids: str = "auto"  # MODEL_ID, enforced per request

    # ── Hardening (issue #11) ──
    faults: FaultSettings = field(default_factory=lambda: FaultSettings())

    # ── Routing, fallbacks, caching (issue #12) ──
    routing: RoutingSettings = field(default_factory=lambda: RoutingSettings())

    # ── Spend control (issue #13) ──
    spend: SpendSettings = field(default_factory=lambda: SpendSettings())

    # ── Image output (issue #14) ──
    images: ImageSettings = field(default_factory=lambda: ImageSettings())

    @classmethod
    def merge(cls, valves: Valves, user: UserValves | None, user_role: str = "user",
              model_params: Mapping[str, Any] | None = None, body_provider: Any = None
              ) -> RequestSettings:
        """`model_params`: the model editor's custom params (§7 model_custom_params);
        `body_provider`: a `provider` in the chat body, applied only as a user tightening."""
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
            tools=tool_settings(valves),

            # ── Multimodal intake (issue #4) ──
            intake=intake_limits(valves, user),
            # ── Artifact store (issue #5) ──
            artifact_keys=_artifact_keys(valves.ARTIFACT_ENCRYPTION_KEY, webui_secret_key()),
            compression_min_bytes=valves.COMPRESSION_MIN_BYTES,
            reasoning_retention=_pick(user.REASONING_RETENTION, valves.REASONING_RETENTION),
            tool_output_retention_turns=valves.TOOL_OUTPUT_RETENTION_TURNS,
            artifact_cleanup_days=valves.ARTIFACT_CLEANUP_DAYS,
            artifact_cleanup_interval_hours=valves.ARTIFACT_CLEANUP_INTERVAL_HOURS,
            redis_write_behind=valves.REDIS_WRITE_BEHIND,
            redis_cache_ttl=valves.REDIS_CACHE_TTL_SECONDS,

            # ── Team access and model records (issue #10) ──
            records=record_settings(valves),
            model_ids=valves.MODEL_ID,

            # ── Hardening (issue #11) ──
            faults=fault_settings(valves),

            # ── Routing, fallbacks, caching (issue #12) ──
            routing=routing_settings(valves, user, model_params, body_provider),

            # ── Spend control (issue #13) ──
            spend=spend_settings(valves, user),

            # ── Image output (issue #14) ──
            images=image_settings(valves, user),

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
    input_cache_write: float = 0.0     # issue #12: what the cache saved
    input_cache_write_1h: float = 0.0
    image_output: float = 0.0  # per generated-image unit, as OpenRouter lists it (issue #14)


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


@dataclass(frozen=True, slots=True)
class FilePart:
    """A document: `url` is a data URL after intake (before: remote / Open WebUI URL or id)."""

    url: str
    filename: str = ""


@dataclass(frozen=True, slots=True)
class AudioPart:
    """An audio clip: `data` is raw base64 (or a data/remote URL before intake)."""

    data: str
    format: str = ""


@dataclass(frozen=True, slots=True)
class VideoPart:
    url: str


@dataclass(frozen=True, slots=True)
class RefusedPart:
    """An attachment the intake refused; `reason` is the one-line note the user reads."""

    kind: str
    reason: str


ContentPart = (TextPart | ImagePart | FilePart | AudioPart | VideoPart | RefusedPart
               | UnsupportedPart)


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
    tools: tuple[ToolSpec, ...] = ()           # body["tools"] (issue #3)
    user_email: str = ""                       # budget overrides by email (issue #13)


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost: float | None = None
    cache_write_tokens: int = 0
    byok_cost: float = 0.0  # BYOK: what the provider billed the admin's own provider key

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> Usage | None:
        if not raw:
            return None
        cost = raw.get("cost")
        details = raw.get("input_tokens_details") or {}
        return cls(
            input_tokens=int(raw.get("input_tokens") or 0),
            output_tokens=int(raw.get("output_tokens") or 0),
            reasoning_tokens=int((raw.get("output_tokens_details") or {})
                                 .get("reasoning_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            cost=float(cost) if isinstance(cost, int | float) else None,
            cache_write_tokens=int(details.get("cache_write_tokens") or 0),
            byok_cost=_byok_cost(raw))

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cached_tokens += other.cached_tokens
        self.cache_write_tokens += other.cache_write_tokens
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost
        self.byok_cost += other.byok_cost


def _byok_cost(raw: Mapping[str, Any]) -> float:
    """`cost_details.upstream_inference_cost` when the request ran on a BYOK provider key."""
    details = raw.get("cost_details")
    if not raw.get("is_byok") or not isinstance(details, Mapping):
        return 0.0
    value = details.get("upstream_inference_cost")
    return float(value) if isinstance(value, int | float) else 0.0


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
        input_cache_read=_price(raw, "input_cache_read"),
        input_cache_write=_price(raw, "input_cache_write"),
        input_cache_write_1h=_price(raw, "input_cache_write_1h"),
        image_output=_price(raw, "image_output"))


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


CHAT_OUTPUTS = frozenset({"text", "image"})
CATALOG_QUERY = "?output_modalities=text,image"  # /models lists text-only models by default


def parse_catalog(payload: Any) -> tuple[CatalogEntry, ...]:
    """`/models` JSON -> entries that produce text or images, sorted by name; malformed ones
    skipped."""
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
        if entry.output_modalities & CHAT_OUTPUTS:  # text, or pictures (issue #14)
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
            task = background_task(self._refresh(settings), "orp-catalog-refresh")
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


def background_task(coro: typing.Coroutine[Any, Any, Any], name: str | None = None
                    ) -> asyncio.Task[Any]:
    """A task that belongs to no request. asyncio copies the caller's context into a task, so
    without this a background job started by a user's turn would write its lines (other
    users' ids, keys it disabled) into that user's request log and log citation; here the
    request log is unset, so they reach only the server log."""
    context = contextvars.copy_context()
    context.run(CURRENT_LOG.set, None)
    return asyncio.get_running_loop().create_task(coro, name=name, context=context)


# ─────────────────────────────────────────────────────────────────────────────
# §6 Model records
#
# Open WebUI shows a pipe model to an ordinary user only when its `model` table has a row with
# the same id, `base_model_id` null and read access for that user; the row's meta also carries
# the capabilities (which buttons show), the description and the tags. This section keeps one
# such record per listed entry:
#
#   desired_record(entry, settings)  CatalogEntry -> Managed (pure)
#   merge_record(current, desired)   3-way merge against what the sync last wrote (pure)
#   plan_sync(...)                   records to insert / update / switch off (pure)
#   ModelRecordsAPI                  Open WebUI's own Models API, 0.6 (sync) or 0.12 (async)
#   RecordSync                       background task: runs when the listing or a valve changed
#
# How admin edits are recognised: every record the sync writes carries, in
# meta[RECORD_MARK], the managed values it wrote last. A field whose value still equals that
# mark was not touched since and follows the catalog; a field that differs was edited by an
# admin and is never written again (its mark stays, so the edit is recognised forever). A
# record without a mark was made by an admin and is left alone entirely.
# ─────────────────────────────────────────────────────────────────────────────

RECORD_MARK = "openrouter_pipe_sync"      # meta key: the managed values the sync last wrote
PUBLIC_READ: tuple[str, str, str] = ("user", "*", "read")
Grant = tuple[str, str, str]              # (principal_type, principal_id, permission)


@dataclass(frozen=True, slots=True)
class AccessSpec:
    """MODEL_ACCESS parsed: `admins`, `all`, or Open WebUI group names."""

    mode: Literal["admins", "all", "groups"]
    groups: tuple[str, ...] = ()


def parse_model_access(raw: str) -> AccessSpec:
    names = tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))
    lowered = [n.lower() for n in names]
    if not names or lowered == ["admins"]:
        return AccessSpec("admins")
    if "all" in lowered:
        return AccessSpec("all")
    return AccessSpec("groups", tuple(n for n in names if n.lower() != "admins"))


def may_use_models(role: str, groups: Iterable[str], access: AccessSpec) -> bool:
    """Whether MODEL_ACCESS lets this Open WebUI user use the pipe's models (admins always;
    group names compare case-insensitively, as the record sync matches them)."""
    if role == "admin" or access.mode == "all":
        return True
    wanted = {g.lower() for g in access.groups}
    return access.mode == "groups" and any(g.lower() in wanted for g in groups)


@dataclass(frozen=True, slots=True)
class RecordSettings:
    """What the model records depend on besides the listing (resolved from valves)."""

    access: AccessSpec = AccessSpec("admins")
    web_search: bool = True      # the pipe can search (WEB_SEARCH is not off)
    image_tool: bool = False     # an image tool is offered to chat models (issue #14 hook)
    enabled: bool = True         # SYNC_MODEL_RECORDS


def record_settings(valves: Valves) -> RecordSettings:
    return RecordSettings(access=parse_model_access(valves.MODEL_ACCESS),
                          web_search=valves.WEB_SEARCH != "off",
                          image_tool=bool(valves.IMAGE_TOOL_MODEL.strip()),
                          enabled=valves.SYNC_MODEL_RECORDS)


@dataclass(frozen=True, slots=True)
class Managed:
    """The record fields the sync manages, in a version-neutral form."""

    name: str
    description: str
    capabilities: tuple[tuple[str, bool], ...]
    tags: tuple[str, ...]
    access: tuple[Grant, ...]
    is_active: bool = True

    def to_mark(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "capabilities": dict(self.capabilities), "tags": list(self.tags),
                "access": [list(g) for g in self.access], "is_active": self.is_active}

    @classmethod
    def from_mark(cls, raw: Any) -> Managed | None:
        if not isinstance(raw, Mapping):
            return None
        try:
            caps = raw.get("capabilities") or {}
            return cls(str(raw["name"]), str(raw.get("description") or ""),
                       tuple((str(k), bool(v)) for k, v in caps.items()),
                       tuple(str(t) for t in raw.get("tags") or ()),
                       normal_grants(tuple(g) for g in raw.get("access") or ()),
                       bool(raw.get("is_active", True)))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def normal_grants(grants: Iterable[Iterable[Any]]) -> tuple[Grant, ...]:
    out = {(str(t), str(i), str(p)) for t, i, p in (tuple(g) for g in grants)}
    return tuple(sorted(out))


def access_grants(spec: AccessSpec, group_ids: Mapping[str, str]) -> tuple[Grant, ...]:
    """`admins` -> none (owner and admins only), `all` -> public read, groups -> read each."""
    if spec.mode == "all":
        return (PUBLIC_READ,)
    if spec.mode == "admins":
        return ()
    return normal_grants(("group", group_ids[n], "read") for n in spec.groups if n in group_ids)


def _per_million(price: float) -> str:
    value = price * 1_000_000
    return f"${value:.2f}" if value >= 0.01 else f"${value:.4g}"


def describe_model(entry: CatalogEntry) -> str:
    """OpenRouter's description plus context, price per million tokens and reasoning."""
    facts = []
    if entry.context_length:
        facts.append(f"Context: {entry.context_length:,} tokens")
    p = entry.pricing
    facts.append("Price: free" if is_free(entry) else
                 f"Price: {_per_million(p.prompt)}/M input, {_per_million(p.completion)}/M output")
    facts.append(f"Reasoning: {'yes' if entry.supports_reasoning else 'no'}")
    text = entry.description.strip()
    return (text + "\n\n" if text else "") + " · ".join(facts)


def is_free(entry: CatalogEntry) -> bool:
    p = entry.pricing
    return p.prompt == 0 and p.completion == 0 and p.request == 0


def model_tags(entry: CatalogEntry) -> tuple[str, ...]:
    tags = [entry.id.split("/", 1)[0] if "/" in entry.id else ""]
    tags += ["free"] if is_free(entry) else []
    tags += ["vision"] if entry.accepts("image") else []
    tags += ["reasoning"] if entry.supports_reasoning else []
    tags += ["tools"] if entry.supports_tools else []
    tags += ["image output"] if "image" in entry.output_modalities else []
    return tuple(t for t in tags if t)


def model_capabilities(entry: CatalogEntry, rs: RecordSettings) -> tuple[tuple[str, bool], ...]:
    images_out = "image" in entry.output_modalities or (rs.image_tool and entry.supports_tools)
    return (("vision", entry.accepts("image")), ("file_upload", True),
            ("web_search", rs.web_search), ("image_generation", images_out),
            ("builtin_tools", entry.supports_tools), ("usage", True), ("citations", True))


UTILITY_CAPABILITIES: tuple[tuple[str, bool], ...] = tuple(
    (k, False) for k in ("vision", "file_upload", "web_search", "image_generation",
                         "builtin_tools", "usage", "citations"))


def desired_record(name: str, entry: CatalogEntry | None, rs: RecordSettings,
                   access: tuple[Grant, ...]) -> Managed:
    """What the catalog says a listed entry's record should hold (utility entries: no entry)."""
    if entry is None:
        return Managed(name, "", UTILITY_CAPABILITIES, (), access)
    return Managed(name, describe_model(entry), model_capabilities(entry, rs),
                   model_tags(entry), access)


def merge_record(current: Managed, mark: Managed, desired: Managed) -> Managed:
    """Take `desired` for every field the admin left as the sync wrote it (`mark`); keep the
    admin's value where it differs. Capabilities merge per key, tags per tag."""
    def pick(field_name: str) -> Any:
        now = getattr(current, field_name)
        return getattr(desired, field_name) if now == getattr(mark, field_name) else now

    return Managed(pick("name"), pick("description"),
                   _merge_capabilities(current.capabilities, mark.capabilities,
                                       desired.capabilities),
                   _merge_tags(current.tags, mark.tags, desired.tags),
                   pick("access"), pick("is_active"))


def _merge_capabilities(current: tuple[tuple[str, bool], ...], mark: tuple[tuple[str, bool], ...],
                        desired: tuple[tuple[str, bool], ...]) -> tuple[tuple[str, bool], ...]:
    now, last = dict(current), dict(mark)
    out = dict(now)
    for key, value in desired:
        if key not in now or (key in last and now[key] == last[key]):
            out[key] = value
    return tuple(out.items())


def _merge_tags(current: tuple[str, ...], mark: tuple[str, ...], desired: tuple[str, ...]
                ) -> tuple[str, ...]:
    removed_by_admin = set(mark) - set(current)
    added_by_admin = [t for t in current if t not in mark]
    kept = [t for t in desired if t not in removed_by_admin]
    return tuple(dict.fromkeys([*kept, *added_by_admin]))


def new_mark(current: Managed, mark: Managed, desired: Managed) -> Managed:
    """The mark after a merge: `desired` where the sync wrote, the old mark where the admin
    edited (so the edit is still recognised next time)."""
    def keep(field_name: str) -> Any:
        same = getattr(current, field_name) == getattr(mark, field_name)
        return getattr(desired if same else mark, field_name)

    caps_now, caps_last = dict(current.capabilities), dict(mark.capabilities)
    caps = {k: (v if k not in caps_now or caps_now[k] == caps_last.get(k, caps_now[k])
                else caps_last[k]) for k, v in desired.capabilities}
    return Managed(keep("name"), keep("description"), tuple(caps.items()), desired.tags,
                   keep("access"), keep("is_active"))


def retired(current: Managed, mark: Managed) -> Managed | None:
    """A record whose entry left the listing: switched off only if the admin never touched
    it (every managed field still as the sync wrote it); None = leave it."""
    if not current.is_active or current != mark:
        return None
    return dataclasses.replace(current, is_active=False)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One Open WebUI model record as the adapter reads it."""

    id: str
    managed: Managed
    mark: Managed | None
    meta: Mapping[str, Any]
    params: Mapping[str, Any]
    version: str | None = None


@dataclass(frozen=True, slots=True)
class RecordWrite:
    """One write the sync decided on: the record's new managed values and mark."""

    id: str
    values: Managed
    mark: Managed
    base: StoredRecord | None   # None: insert


def plan_record(record_id: str, desired: Managed, stored: StoredRecord | None
                ) -> RecordWrite | None:
    """Insert a missing record, merge an existing synced one, leave admin-made ones alone;
    None when nothing would change (so converged workers write nothing)."""
    if stored is None:
        return RecordWrite(record_id, desired, desired, None)
    if stored.mark is None:
        return None
    values = merge_record(stored.managed, stored.mark, desired)
    mark = new_mark(stored.managed, stored.mark, desired)
    if values == stored.managed and mark == stored.mark:
        return None
    return RecordWrite(record_id, values, mark, stored)


def plan_retirements(listed: Iterable[str], stored: Mapping[str, StoredRecord], prefix: str
                     ) -> list[RecordWrite]:
    """Synced records under this pipe's prefix whose entry is no longer listed."""
    keep = set(listed)
    out = []
    for rid, rec in stored.items():
        if rid.startswith(prefix) and rid not in keep and rec.mark is not None:
            off = retired(rec.managed, rec.mark)
            if off is not None:
                out.append(RecordWrite(rid, off, off, rec))
    return out


def record_meta(meta: Mapping[str, Any], values: Managed, mark: Managed) -> dict[str, Any]:
    """The record's meta with the managed values and the mark written in; the rest kept."""
    out = dict(meta)
    out.update(description=values.description, capabilities=dict(values.capabilities),
               tags=[{"name": t} for t in values.tags])
    out[RECORD_MARK] = mark.to_mark()
    return out


def managed_from_record(name: str, meta: Mapping[str, Any], grants: tuple[Grant, ...],
                        is_active: bool) -> Managed:
    caps = meta.get("capabilities") if isinstance(meta.get("capabilities"), Mapping) else {}
    tags = [t.get("name") if isinstance(t, Mapping) else t for t in meta.get("tags") or ()]
    return Managed(name, str(meta.get("description") or ""),
                   tuple((str(k), bool(v)) for k, v in (caps or {}).items()),
                   tuple(str(t) for t in tags if t), grants, bool(is_active))


def grants_from_access_control(ac: Any) -> tuple[Grant, ...]:
    """0.6's `access_control` column: None public read, {} owner only, else the lists."""
    if ac is None:
        return (PUBLIC_READ,)
    out = []
    for perm in ("read", "write"):
        part = ac.get(perm) or {} if isinstance(ac, Mapping) else {}
        out += [("group", str(g), perm) for g in part.get("group_ids") or ()]
        out += [("user", str(u), perm) for u in part.get("user_ids") or ()]
    return normal_grants(out)


def access_control_from_grants(grants: Iterable[Grant]) -> dict[str, Any] | None:
    grants = tuple(grants)
    if PUBLIC_READ in grants and all(g == PUBLIC_READ for g in grants):
        return None
    ac: dict[str, Any] = {p: {"group_ids": [], "user_ids": []} for p in ("read", "write")}
    for kind, pid, perm in grants:
        if (kind, pid, perm) != PUBLIC_READ and perm in ac:
            ac[perm]["group_ids" if kind == "group" else "user_ids"].append(pid)
    return ac if any(v for p in ac.values() for v in p.values()) else {}


def function_id_from_module(module_name: str) -> str | None:
    """`function_<id>` (0.6) or `function_<id>_<uuid hex>` (0.12) -> `<id>`."""
    match = re.fullmatch(r"function_(.+?)(?:_[0-9a-f]{32})?", module_name)
    return match.group(1) if match else None


# -- I/O shell: Open WebUI's Models API and the background sync ---------------------------


class ModelRecordsAPI(Protocol):
    """The few Open WebUI calls the sync needs (a fake in tests)."""

    async def owner_id(self) -> str | None: ...
    async def group_ids(self) -> dict[str, str]: ...
    async def load(self, prefix: str) -> dict[str, StoredRecord]: ...
    async def get(self, record_id: str) -> StoredRecord | None: ...
    async def insert(self, write: RecordWrite, owner: str) -> bool: ...
    async def update(self, write: RecordWrite) -> bool: ...


class OwuiModelRecords:
    """Open WebUI's own `Models`/`Groups`/`Users` APIs: 0.6 (sync, `access_control` column,
    called off the event loop) or 0.9+ (async, `access_grants`, `version_id` conflicts)."""

    def __init__(self) -> None:
        models = importlib.import_module("open_webui.models.models")
        self._models, self._form = models.Models, models.ModelForm
        self._groups = importlib.import_module("open_webui.models.groups").Groups
        self._users = importlib.import_module("open_webui.models.users").Users
        self.grants_api = inspect.iscoroutinefunction(self._models.get_all_models)
        self._grants = (importlib.import_module("open_webui.models.access_grants").AccessGrants
                        if self.grants_api else None)

    async def owner_id(self) -> str | None:
        user = await _owui_call(self._users.get_super_admin_user)
        return str(user.id) if user is not None else None

    async def group_ids(self) -> dict[str, str]:
        if self.grants_api:
            groups = await self._groups.get_all_groups()
        else:
            groups = await _owui_call(self._groups.get_groups)
        return {str(g.name).casefold(): str(g.id) for g in groups}

    async def load(self, prefix: str) -> dict[str, StoredRecord]:
        rows = await _owui_call(self._models.get_all_models)
        return {r.id: self._stored(r) for r in rows
                if r.id.startswith(prefix) and r.base_model_id is None}

    async def get(self, record_id: str) -> StoredRecord | None:
        row = await _owui_call(self._models.get_model_by_id, record_id)
        return self._stored(row) if row is not None and row.base_model_id is None else None

    def _stored(self, row: Any) -> StoredRecord:
        meta = row.meta.model_dump() if isinstance(row.meta, BaseModel) else dict(row.meta or {})
        params = (row.params.model_dump() if isinstance(row.params, BaseModel)
                  else dict(row.params or {}))
        if self.grants_api:
            grants = normal_grants((g.principal_type, g.principal_id, g.permission)
                                   for g in row.access_grants)
        else:
            grants = grants_from_access_control(row.access_control)
        return StoredRecord(row.id, managed_from_record(row.name, meta, grants, row.is_active),
                            Managed.from_mark(meta.get(RECORD_MARK)), meta, params,
                            getattr(row, "version_id", None))

    def _form_for(self, w: RecordWrite, with_access: bool) -> Any:
        base = w.base
        fields: dict[str, Any] = {
            "id": w.id, "base_model_id": None, "name": w.values.name,
            "meta": record_meta(base.meta if base else {}, w.values, w.mark),
            "params": dict(base.params) if base else {}, "is_active": w.values.is_active}
        if self.grants_api and with_access:
            fields["access_grants"] = [{"principal_type": t, "principal_id": i, "permission": p}
                                       for t, i, p in w.values.access]
        elif not self.grants_api:
            fields["access_control"] = access_control_from_grants(w.values.access)
        return self._form(**fields)

    async def insert(self, write: RecordWrite, owner: str) -> bool:
        form = self._form_for(write, with_access=True)
        try:
            row = await _owui_call(self._models.insert_new_model, form, owner)
        except asyncio.CancelledError:
            raise
        except Exception:  # 0.12 raises on a duplicate id (another worker was first)
            if await self.get(write.id) is None:
                raise
            return False
        return row is not None  # 0.6 returns None on a duplicate

    async def update(self, write: RecordWrite) -> bool:
        form = self._form_for(write, with_access=False)
        try:
            row = await _owui_call(self._models.update_model_by_id, write.id, form)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # 0.12: HTTPException(409) when version_id moved under us
            if getattr(exc, "status_code", None) == 409:
                return False
            raise
        if row is None:
            return False
        base = write.base
        if self._grants is not None and (base is None
                                         or base.managed.access != write.values.access):
            grants = [{"principal_type": t, "principal_id": i, "permission": p}
                      for t, i, p in write.values.access]
            await self._grants.set_access_grants("model", write.id, grants)
        return True


@dataclass(frozen=True, slots=True)
class RecordJob:
    """One sync's input: the listed entries (record id, name, catalog entry or None)."""

    prefix: str
    items: tuple[tuple[str, str, CatalogEntry | None], ...]
    settings: RecordSettings


class RecordSync:
    """Runs the record sync as a background task, never on the request path.

    `submit()` (cheap) starts a run when the job differs from the last one that finished; a
    job submitted during a run waits and runs next. `poll()` (cheap) retries a failed or
    partial run after RETRY_SECONDS. Each worker runs its own sync; they converge because a
    record already as desired is not written, duplicate inserts are detected and a conflicting
    update is re-read and merged again.
    """

    RETRY_SECONDS = 60.0
    ATTEMPTS = 4
    BUSY_PAUSE = 0.02  # between records while chats are in flight: they go first

    def __init__(self, api_factory: Callable[[], ModelRecordsAPI],
                 clock: Callable[[], float], busy: Callable[[], bool] = lambda: False) -> None:
        self._api_factory = api_factory
        self._clock = clock
        self._busy = busy
        self._task: asyncio.Task[None] | None = None
        self._done: RecordJob | None = None
        self._next: RecordJob | None = None
        self._retry_at: float | None = None
        self._last_error = ""
        self.status: dict[str, Any] = {"state": "not run yet"}

    def submit(self, job: RecordJob) -> None:
        if job == self._done and self._retry_at is None:
            return
        self._next = job
        self._start()

    def poll(self) -> None:
        if self._retry_at is not None and self._clock() >= self._retry_at:
            self._retry_at = None
            if self._next is None:
                self._next = self._done
            self._start()

    def _start(self) -> None:
        if self._next is None or (self._task is not None and not self._task.done()):
            return
        job, self._next = self._next, None
        self._task = background_task(self._run(job), "orp-record-sync")
        self._task.add_done_callback(_consume_task_exception)

    async def wait(self) -> None:
        """Until no run is pending (tests and tools)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _run(self, job: RecordJob) -> None:
        started = self._clock()
        self.status = {**self.status, "state": "running"}
        try:
            counts = await self._sync(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of Open WebUI's API: reported, never raised
            self._failed(job, exc)
        else:
            self._done, self._last_error = job, ""
            partial = bool(counts.get("unknown_groups"))
            self._retry_at = self._clock() + self.RETRY_SECONDS if partial else None
            self.status = {"state": "partial" if partial else "ok", **counts,
                           "seconds": round(self._clock() - started, 3), "last_error": None}
            LOG.info("Model records synced in %.2fs: %d listed, %d inserted, %d updated, "
                     "%d switched off (worker pid %d)", self.status["seconds"],
                     counts["listed"], counts["inserted"], counts["updated"],
                     counts["switched_off"], os.getpid())
        self._start()

    def _failed(self, job: RecordJob, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"[:300]
        if text != self._last_error:  # logged once per distinct failure
            LOG.warning("Model record sync failed (retrying every %.0fs): %s",
                        self.RETRY_SECONDS, text, exc_info=not isinstance(exc, PipeError))
        self._last_error = text
        self._done = job
        self._retry_at = self._clock() + self.RETRY_SECONDS
        self.status = {**self.status, "state": "failed", "last_error": text}

    async def _sync(self, job: RecordJob) -> dict[str, Any]:
        api = self._api_factory()
        owner = await api.owner_id()
        if owner is None:
            raise RecordSyncError("no admin account exists yet to own the model records")
        access, unknown = await self._access(api, job.settings.access)
        stored = await api.load(job.prefix)
        counts = {"inserted": 0, "updated": 0, "switched_off": 0}
        for rid, name, entry in job.items:
            desired = desired_record(name, entry, job.settings, access)
            done = await self._apply(api, rid, stored.get(rid), owner,
                                     functools.partial(plan_record, rid, desired))
            if done:
                counts[done] += 1
            await asyncio.sleep(self.BUSY_PAUSE if self._busy() else 0)
        listed = [rid for rid, _, _ in job.items]
        for w in plan_retirements(listed, stored, job.prefix):
            if await self._apply(api, w.id, w.base, owner, _retire_plan):
                counts["switched_off"] += 1
        return {"listed": len(job.items), **counts, "unknown_groups": unknown,
                "admin_made": sum(1 for r in stored.values() if r.mark is None)}

    async def _access(self, api: ModelRecordsAPI, spec: AccessSpec
                      ) -> tuple[tuple[Grant, ...], list[str]]:
        if spec.mode != "groups":
            return access_grants(spec, {}), []
        known = await api.group_ids()
        ids = {n: known[n.casefold()] for n in spec.groups if n.casefold() in known}
        unknown = [n for n in spec.groups if n not in ids]
        if unknown:
            LOG.warning("MODEL_ACCESS names groups Open WebUI doesn't have: %s",
                        ", ".join(unknown))
        return access_grants(spec, ids), unknown

    async def _apply(self, api: ModelRecordsAPI, rid: str, stored: StoredRecord | None,
                     owner: str, plan: Callable[[StoredRecord | None], RecordWrite | None]
                     ) -> str | None:
        fresh = stored is None
        for _ in range(self.ATTEMPTS):
            write = plan(stored)
            if write is None:
                return None
            if write.base is not None and not fresh:  # re-read: an admin may just have edited
                stored, fresh = await api.get(rid), True
                continue
            ok = await (api.insert(write, owner) if write.base is None else api.update(write))
            if ok:
                return "inserted" if write.base is None else "updated"
            stored, fresh = await api.get(rid), True  # another writer was first: merge again
        raise RecordSyncError(f"{rid}: kept conflicting with another writer")


def _retire_plan(stored: StoredRecord | None) -> RecordWrite | None:
    if stored is None or stored.mark is None:
        return None
    off = retired(stored.managed, stored.mark)
    return RecordWrite(stored.id, off, off, stored) if off is not None else None


# ─────────────────────────────────────────────────────────────────────────────
# §7 Routing policy
#
# OpenRouter's own controls (issue #12), as pure functions of plain data:
#   check_provider      OpenRouter `provider` JSON -> (clean copy, problems naming each bad key)
#   merge_provider      admin default ⊕ per-model (wins) ⊕ user tightening (never loosens)
#   routing_settings    Valves + per-model custom params + UserValves -> RoutingSettings
#   apply_routing       RoutingSettings -> request fields (provider, models, cache_control, …)
#   variant_entries     MODEL_VARIANTS -> synthesized CatalogEntry objects (routed verbatim)
#   RouteOutcome        what came back (served model, router metadata, cache) -> status text
#
# Per-model settings come from Open WebUI's model editor (Advanced Params → Custom Parameters
# `provider` and `models`), read from `__metadata__["model"]["info"]["params"]` (admin-set, on
# 0.6.28 and 0.12). The same keys also reach `body`, where a user's own chat-level custom
# params land too, so `body["provider"]` is only ever applied as a user tightening.
# ─────────────────────────────────────────────────────────────────────────────

QUANTIZATIONS = ("int4", "int8", "fp4", "mxfp4", "nvfp4", "fp6", "fp8", "mxfp8", "fp16",
                 "bf16", "fp32", "unknown")
SORT_KEYS = ("price", "throughput", "latency", "exacto")
MAX_PRICE_KEYS = ("prompt", "completion", "image", "audio", "request")
PERCENTILES = ("p50", "p75", "p90", "p99")
ROUTING_SUFFIXES = ("nitro", "floor", "exacto")
CACHE_FAMILIES = ("anthropic/", "~anthropic/")
_MIN_PRICE_PER_M = 0.0001  # below this a max_price is almost surely a per-token price
REFUSED_VALVES: dict[str, tuple[str, float]] = {}  # valve -> (why refused, when)
_GOOD_VALVES: dict[str, str] = {}  # valve -> the last value that passed its check
REFUSAL_SHOWN_SECONDS = 600.0


def note_valve_check(name: str, value: str, problems: Iterable[str]) -> None:
    """Remember a refused save for the selector (Open WebUI 0.12 hides the reason). Open
    WebUI re-validates the stored valves on every call, so only a *changed* good value (a
    successful save) clears the note; it also fades after REFUSAL_SHOWN_SECONDS."""
    problems = tuple(problems)
    if problems:
        REFUSED_VALVES[name] = ("; ".join(problems), time.time())
        return
    if _GOOD_VALVES.get(name, value) != value:
        REFUSED_VALVES.pop(name, None)
    _GOOD_VALVES[name] = value


def recent_refusals(now: float) -> tuple[tuple[str, str], ...]:
    return tuple((name, why) for name, (why, at) in REFUSED_VALVES.items()
                 if now - at < REFUSAL_SHOWN_SECONDS)


def _slug_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of provider slugs, e.g. [\"deepinfra\"]")
    out = [v.strip() for v in value if isinstance(v, str) and v.strip()]
    if len(out) != len(value):
        raise ValueError("must list provider slugs as strings")
    return out


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _data_collection(value: Any) -> str:
    if value not in ("allow", "deny"):
        raise ValueError('must be "allow" or "deny"')
    return str(value)


def _quantizations(value: Any) -> list[str]:
    items = _slug_list(value)
    bad = [q for q in items if q not in QUANTIZATIONS]
    if bad:
        raise ValueError(f"has unknown quantization {bad[0]!r} (known: {', '.join(QUANTIZATIONS)})")
    return items


def _sort(value: Any) -> Any:
    if isinstance(value, str) and value in SORT_KEYS:
        return value
    if isinstance(value, Mapping) and set(value) <= {"by", "partition"} and "by" in value:
        if value["by"] in SORT_KEYS and value.get("partition", "model") in ("model", "none"):
            return dict(value)
    raise ValueError(f'must be one of {", ".join(SORT_KEYS)} or {{"by": …, "partition": '
                     '"model"|"none"}')


def price_per_million(value: Any) -> str:
    """A max_price value typed by an admin (USD per million tokens) -> OpenRouter's string."""
    text = value.strip().lstrip("$").strip() if isinstance(value, str) else value
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError("must be a number of US dollars per million tokens")
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of US dollars per million tokens") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be zero or more US dollars per million tokens")
    if 0 < number < _MIN_PRICE_PER_M:
        raise ValueError(f"{value!r} looks like a per-token price; max_price is in US dollars "
                         "per million tokens (e.g. 3 for $3/M)")
    return format(number, "f").rstrip("0").rstrip(".") or "0"


def _max_price(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError('must be an object such as {"prompt": 1, "completion": 2} '
                         "(US dollars per million tokens)")
    out: dict[str, str] = {}
    for key, price in value.items():
        if key not in MAX_PRICE_KEYS:
            raise ValueError(f"has unknown key {key!r} (known: {', '.join(MAX_PRICE_KEYS)})")
        try:
            out[key] = price_per_million(price)
        except ValueError as exc:
            raise ValueError(f"{key} {exc}") from None
    return out


def _percentiles(value: Any) -> Any:
    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (
                math.isfinite(v) and v > 0):
            raise ValueError("must be a positive number or {p50, p75, p90, p99}")
        return float(v)

    if isinstance(value, Mapping):
        if not value or set(value) - set(PERCENTILES):
            raise ValueError(f"may only have the keys {', '.join(PERCENTILES)}")
        return {k: number(v) for k, v in value.items()}
    return number(value)


def _options(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ValueError("must map provider slugs to objects")
    return {str(k): dict(v) for k, v in value.items()}


PROVIDER_FIELDS: dict[str, Callable[[Any], Any]] = {
    "order": _slug_list, "only": _slug_list, "ignore": _slug_list,
    "allow_fallbacks": _flag, "require_parameters": _flag, "zdr": _flag,
    "enforce_distillable_text": _flag, "data_collection": _data_collection,
    "quantizations": _quantizations, "sort": _sort, "max_price": _max_price,
    "preferred_max_latency": _percentiles, "preferred_min_throughput": _percentiles,
    "options": _options,
}


def load_json_setting(raw: Any) -> Any:
    """A custom parameter or valve as typed: JSON text (parsed) or already a value."""
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON ({exc.msg} at position {exc.pos})") from None
        except (RecursionError, ValueError):  # nested too deep, or a number too large
            raise ValueError("is not usable JSON (nested too deeply or too large)") from None
    return raw


def check_provider(raw: Any, source: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """OpenRouter's `provider` object -> (a clean copy, one problem per bad key).

    Bad keys are left out (never sent) and named with `source`; a `null` value is kept as
    None (a per-model `null` removes the admin default's key, see merge_provider)."""
    try:
        value = load_json_setting(raw)
    except ValueError as exc:
        return {}, (f"{source} {exc}",)
    if value is None:
        return {}, ()
    if not isinstance(value, Mapping):
        return {}, (f"{source} must be a JSON object like {{\"sort\": \"price\"}}",)
    clean: dict[str, Any] = {}
    problems: list[str] = []
    for key, item in value.items():
        check = PROVIDER_FIELDS.get(key)
        if check is None:
            problems.append(f"{source}: unknown key {key!r} (known: "
                            f"{', '.join(PROVIDER_FIELDS)})")
        elif item is None:
            clean[key] = None
        else:
            try:
                clean[key] = check(item)
            except ValueError as exc:
                problems.append(f"{source}: {key} {exc}")
    return clean, tuple(problems)


def _overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Per-model over the admin default: each key present wins; `null` removes it."""
    out = {**base, **top}
    return {k: v for k, v in out.items() if v is not None}


def _narrow(admin: Any, user: Any) -> Any:
    """Lists a user may only narrow: the intersection (in the user's order)."""
    if admin is None:
        return user
    kept = [v for v in user if v in admin]
    return kept or None


def _tighten_price(admin: Any, user: Mapping[str, str]) -> dict[str, str]:
    out = dict(admin or {})
    for key, value in user.items():
        if key not in out or float(value) < float(out[key]):
            out[key] = value
    return out


def _tighten(policy: dict[str, Any], key: str, value: Any) -> str | None:
    """Apply one user key to `policy` in place; returns why it was ignored (or None)."""
    current = policy.get(key)
    if key in ("sort", "preferred_max_latency", "preferred_min_throughput"):
        policy[key] = value
    elif key == "order":
        if current is not None:
            return "order (the admin set one)"
        policy[key] = value
    elif key == "data_collection":
        if value == "deny":
            policy[key] = "deny"
        elif current == "deny":
            return "data_collection allow (the admin requires deny)"
    elif key in ("zdr", "enforce_distillable_text", "require_parameters"):
        if value:
            policy[key] = True
        elif current:
            return f"{key} false (the admin requires true)"
    elif key == "allow_fallbacks":
        if not value:
            policy[key] = False
        elif current is False:
            return "allow_fallbacks true (the admin turned fallbacks off)"
    elif key == "ignore":
        policy[key] = list(dict.fromkeys([*(current or ()), *value]))
    elif key in ("only", "quantizations"):
        narrowed = _narrow(current, value)
        if narrowed is None:
            return f"{key} {value} (nothing in common with the admin's {current})"
        policy[key] = narrowed
    elif key == "max_price":
        policy[key] = _tighten_price(current, value)
    else:
        return f"{key} (only an admin sets it)"
    return None


def merge_provider(admin: Mapping[str, Any], per_model: Mapping[str, Any],
                   user: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """valve default -> per-model (wins) -> user (may tighten, never loosen).

    Returns the policy to send and the user keys that were ignored because they would have
    loosened it. Inputs are already checked (check_provider)."""
    policy = _overlay({k: v for k, v in admin.items() if v is not None}, per_model)
    ignored = []
    for key, value in user.items():
        if value is None:
            continue
        why = _tighten(policy, key, value)
        if why:
            ignored.append(why)
    return policy, tuple(ignored)


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """OpenRouter's own controls for one request (issue #12), resolved once."""

    provider: Mapping[str, Any] = field(default_factory=dict)
    fallback_models: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    auto_router_models: tuple[str, ...] = ()
    prompt_cache: str = "off"          # off | 5m | 1h
    router_metadata: bool = False
    rate_limit_fallback: bool = True
    service_tier: str = "auto"         # auto = not sent
    verbosity: str = "default"         # default = not sent
    pdf_engine: str = "cloudflare-ai"  # openrouter-default = not sent
    response_healing: bool = True
    user_identifier: str = "off"       # off | hash
    chat_metadata: bool = False
    problems: tuple[str, ...] = ()     # admin settings left out (never sent)
    ignored: tuple[str, ...] = ()      # user requests that would have loosened the policy


def _id_list(raw: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.strip() for p in re.split(r"[,\n]", raw or "") if p.strip()))


MODEL_PARAM_KEYS = ("provider", "models")


def routing_params(params: Any) -> dict[str, Any]:
    """A model record's params -> its `provider` / `models` (custom params win)."""
    if not isinstance(params, Mapping):
        return {}
    found = {k: v for k, v in params.items() if k in MODEL_PARAM_KEYS}
    custom = params.get("custom_params")
    if isinstance(custom, Mapping):
        found.update({k: v for k, v in custom.items() if k in MODEL_PARAM_KEYS})
    return found


def model_custom_params(metadata: Any, owui_model_id: str) -> Mapping[str, Any]:
    """The per-model params in `__metadata__["model"]["info"]["params"]` for this model.

    Only Open WebUI 0.6.28 fills them there (0.12 strips them, and neither sends the model
    with the title endpoint), so `owui_model_params` reads the model record instead."""
    model = metadata.get("model") if isinstance(metadata, Mapping) else None
    if not isinstance(model, Mapping) or model.get("id") != owui_model_id:
        return {}
    info = model.get("info")
    return routing_params(info.get("params")) if isinstance(info, Mapping) else {}


def _owui_models() -> Any:
    """Open WebUI's `Models` table API, or None outside Open WebUI. Read from `sys.modules`
    on every call (a dictionary lookup): a failed import would search the path on every turn,
    and a remembered answer would outlive the Open WebUI it came from (tests swap them)."""
    module = sys.modules.get("open_webui.models.models")
    if module is None and "open_webui" in sys.modules:  # Open WebUI that hasn't loaded it yet
        try:
            module = importlib.import_module("open_webui.models.models")
        except ImportError:
            return None
    return getattr(module, "Models", None)


async def owui_model_record(owui_model_id: str) -> tuple[Any, bool] | None:
    """(Open WebUI's model record for this id or None, whether its Models API is the
    synchronous one of 0.6-0.8); None outside Open WebUI. A database error is logged and
    reads as "no record"."""
    models = _owui_models()
    if models is None:
        return None
    import sqlalchemy.exc as sa_exc

    getter = models.get_model_by_id
    legacy = not inspect.iscoroutinefunction(getter)
    try:
        record = (await asyncio.to_thread(getter, owui_model_id) if legacy
                  else await getter(owui_model_id))
    except (sa_exc.SQLAlchemyError, OSError, ValueError) as exc:
        LOG.warning("Could not read the model record of %s: %s", owui_model_id, exc)
        return (None, legacy)
    return (record, legacy)


async def _owned_by_admin(record: Any) -> bool:
    """Per-model routing is the admin's: a record an ordinary user made under a pipe model's
    id (Open WebUI lets anyone with workspace access create one) must not loosen it."""
    owner = await owui_user(str(getattr(record, "user_id", "")))  # §17's user lookup
    return owner is not None and owner.get("role") == "admin"


async def owui_model_params(owui_model_id: str) -> Mapping[str, Any] | None:
    """The admin's per-model settings from Open WebUI's model record (the model editor's
    Advanced Params → Custom Parameters); None outside Open WebUI, {} when the record is
    missing or not an admin's."""
    found = await owui_model_record(owui_model_id)
    if found is None:
        return None
    record = found[0]
    if record is None:
        return {}
    params = getattr(record, "params", None)
    wanted = routing_params(params.model_dump() if isinstance(params, BaseModel) else params)
    if wanted and not await _owned_by_admin(record):
        LOG.warning("Ignoring the routing settings of %s: its record belongs to a non-admin",
                    owui_model_id)
        return {}
    return wanted


async def owui_may_read_model(owui_model_id: str, user_id: str) -> bool:
    """Open WebUI 0.6-0.8 checks only a workspace model's own access, then hands the pipe its
    base model id: the pipe checks the base model's record itself there, with Open WebUI's own
    rule (owner, or `has_access(read)`). From 0.9 Open WebUI checks base models itself."""
    models = _owui_models()
    if models is None or inspect.iscoroutinefunction(models.get_model_by_id):
        return True  # outside Open WebUI, or 0.9+ (which checks base models itself)
    found = await owui_model_record(owui_model_id)
    record = found[0] if found else None
    if record is None:
        return False
    if str(getattr(record, "user_id", "")) == user_id:
        return True
    try:
        has_access = importlib.import_module("open_webui.utils.access_control").has_access
    except (ImportError, AttributeError):
        return False
    return bool(await asyncio.to_thread(has_access, user_id, "read",
                                        getattr(record, "access_control", None)))


def _user_provider(user: UserValves, body_provider: Any) -> tuple[dict[str, Any], list[str]]:
    """What the user asks for: their valves plus any `provider` in the chat body."""
    asked, problems = check_provider(body_provider, "your provider settings")
    if user.PROVIDER_SORT != INHERIT:
        asked["sort"] = user.PROVIDER_SORT
    if user.PROVIDER_DATA_COLLECTION == "deny":
        asked["data_collection"] = "deny"
    if user.PROVIDER_ZDR == "on":
        asked["zdr"] = True
    return asked, list(problems)


def _fallbacks(valves: Valves, per_model: Mapping[str, Any]) -> tuple[tuple[str, ...], list[str]]:
    raw = per_model.get("models")
    if raw is None:
        return _id_list(valves.FALLBACK_MODELS), []
    try:
        value = load_json_setting(raw) if isinstance(raw, str) and raw.strip()[:1] == "[" \
            else raw
    except ValueError as exc:
        return _id_list(valves.FALLBACK_MODELS), [f"this model's `models` {exc}"]
    if isinstance(value, str):
        return _id_list(value), []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip()), []
    return _id_list(valves.FALLBACK_MODELS), ["this model's `models` must be a list of ids"]


def routing_settings(valves: Valves, user: UserValves,
                     model_params: Mapping[str, Any] | None = None,
                     body_provider: Any = None) -> RoutingSettings:
    """The one merge: valve default -> per-model custom params -> user tightening."""
    per_model_raw = (model_params or {}).get("provider")
    admin, problems = check_provider(valves.PROVIDER_ROUTING, "PROVIDER_ROUTING")
    per_model, model_problems = check_provider(per_model_raw, "this model's `provider`")
    asked, user_problems = _user_provider(user, body_provider)
    provider, ignored = merge_provider(admin, per_model, asked)
    fallbacks, fb_problems = _fallbacks(valves, model_params or {})
    tier = _pick(user.SERVICE_TIER, valves.SERVICE_TIER)
    return RoutingSettings(
        provider=provider, fallback_models=fallbacks,
        variants=_id_list(valves.MODEL_VARIANTS),
        auto_router_models=_id_list(valves.AUTO_ROUTER_ALLOWED_MODELS),
        prompt_cache=valves.PROMPT_CACHE, router_metadata=valves.ROUTER_METADATA,
        rate_limit_fallback=valves.RATE_LIMIT_FALLBACK, service_tier=tier,
        verbosity=_pick(user.TEXT_VERBOSITY, valves.TEXT_VERBOSITY),
        pdf_engine=valves.PDF_PARSER_ENGINE, response_healing=valves.RESPONSE_HEALING,
        user_identifier=valves.USER_IDENTIFIER, chat_metadata=valves.SEND_CHAT_METADATA,
        problems=(*problems, *model_problems, *fb_problems),
        ignored=(*user_problems, *ignored))


def describe_policy(provider: Mapping[str, Any]) -> str:
    """`zdr, data_collection deny, only deepinfra` (the keys that can exclude providers)."""
    parts = []
    for key in ("only", "ignore", "quantizations"):
        if provider.get(key):
            parts.append(f"{key} {', '.join(provider[key])}")
    if provider.get("zdr"):
        parts.append("zero data retention")
    if provider.get("data_collection") == "deny":
        parts.append("no data collection")
    if provider.get("enforce_distillable_text"):
        parts.append("distillable text only")
    if provider.get("max_price"):
        parts.append("max price " + ", ".join(f"{k} ${v}/M" for k, v in
                                               provider["max_price"].items()))
    if provider.get("allow_fallbacks") is False:
        parts.append("no provider fallbacks")
    if provider.get("require_parameters"):
        parts.append("providers supporting every parameter")
    return "; ".join(parts)


@functools.lru_cache(maxsize=4096)  # a user's or chat's id is hashed again every turn
def stable_hash(secret: str, purpose: str, value: str) -> str:
    """HMAC-SHA256 of `value` keyed by the server secret, per purpose; not reversible."""
    key = (secret or "openrouter-responses-pipe").encode()
    return hmac.digest(key, f"{purpose}:{value}".encode(), "sha256").hex()[:32]


def takes_cache_control(entry: CatalogEntry) -> bool:
    return entry.id.startswith(CACHE_FAMILIES)


def _has_input_file(payload: Mapping[str, Any]) -> bool:
    return any(isinstance(part, Mapping) and part.get("type") == "input_file"
               for item in payload.get("input") or () if isinstance(item, Mapping)
               and isinstance(item.get("content"), list) for part in item["content"])


def _plugin(payload: dict[str, Any], plugin: dict[str, Any]) -> None:
    payload["plugins"] = [*payload.get("plugins", ()), plugin]


def apply_routing(payload: dict[str, Any], req: ChatRequest, entry: CatalogEntry,
                  settings: RequestSettings) -> None:
    """Put OpenRouter's own controls into the request (chats and tasks alike for privacy)."""
    r = settings.routing
    if r.provider:
        payload["provider"] = json.loads(json.dumps(r.provider))
    fallbacks = [m for m in r.fallback_models if m != entry.id]
    if fallbacks:
        payload["models"] = fallbacks
    if entry.id.split(":", 1)[0] == "openrouter/auto" and r.auto_router_models:
        _plugin(payload, {"id": "auto-router", "allowed_models": list(r.auto_router_models)})
    if not req.task:
        _apply_chat_controls(payload, req, entry, settings)
    if _has_input_file(payload) and not entry.accepts("file") \
            and r.pdf_engine != "openrouter-default":
        _plugin(payload, {"id": "file-parser", "pdf": {"engine": r.pdf_engine}})
    fmt = (payload.get("text") or {}).get("format") or {}
    if not payload.get("stream") and r.response_healing and fmt.get("type") in (
            "json_object", "json_schema"):
        _plugin(payload, {"id": "response-healing"})
    if r.user_identifier == "hash" and req.user_id != "anonymous":
        ident = stable_hash(settings.session_secret, "user", req.user_id)
        payload["user"] = payload["safety_identifier"] = ident


def _apply_chat_controls(payload: dict[str, Any], req: ChatRequest, entry: CatalogEntry,
                         settings: RequestSettings) -> None:
    r = settings.routing
    if r.prompt_cache != "off" and takes_cache_control(entry):
        payload["cache_control"] = {"type": "ephemeral", "ttl": r.prompt_cache}
    if r.service_tier != "auto":
        payload["service_tier"] = r.service_tier
    if r.verbosity != "default":
        payload["text"] = {**payload.get("text", {}), "verbosity": r.verbosity}
    if r.chat_metadata and req.chat_id:
        payload["metadata"] = {"chat_id": req.chat_id[:512]}


# -- variants, presets, routers (selector entries routed verbatim) ----------------------------


def variant_base(variant: str, by_id: Mapping[str, CatalogEntry],
                 entries: Iterable[CatalogEntry]) -> CatalogEntry | None:
    """The catalog entry whose capabilities a variant id inherits, or None."""
    head = variant.split("@", 1)[0]
    if head.startswith("~"):
        family = head[1:].removesuffix("-latest")
        found = [e for e in entries if e.id.startswith(family) and ":" not in e.id]
        return max(found, key=lambda e: (e.created, e.id)) if found else None
    base, _, suffix = head.partition(":")
    if suffix and suffix not in ROUTING_SUFFIXES:
        return by_id.get(head)
    return by_id.get(base)


def _variant_label(variant: str) -> str:
    head, _, preset = variant.partition("@")
    labels = []
    if head.startswith("~"):
        labels.append("latest")
    elif ":" in head:
        labels.append(head.rsplit(":", 1)[1])
    if preset:
        labels.append(f"preset {preset.removeprefix('preset/')}")
    return ", ".join(labels) or "routed"


AUTO_ROUTER_ID = "openrouter/auto"


def variant_entry(variant: str, snap: CatalogSnapshot) -> CatalogEntry | None:
    """A selector entry for a variant/preset/router id: its base's capabilities, its own id."""
    if variant in snap.by_id:
        return snap.by_id[variant]
    head = variant.split("@", 1)[0]
    if head in (AUTO_ROUTER_ID, ""):  # a router, or a preset that names its own model
        base = snap.by_id.get("openai/gpt-4o") or (snap.entries[0] if snap.entries else None)
        if base is None:
            return None
        name = ("OpenRouter: Auto Router" if head else
                f"OpenRouter preset: {variant.removeprefix('@preset/')}")
        return dataclasses.replace(base, id=variant, name=name, canonical_slug=variant,
                                   description="OpenRouter picks the model.")
    base = variant_base(variant, snap.by_id, snap.entries)
    if base is None:
        return None
    return dataclasses.replace(base, id=variant, name=f"{base.name} ({_variant_label(variant)})")


def variant_entries(snap: CatalogSnapshot, variants: Iterable[str]
                    ) -> tuple[tuple[CatalogEntry, ...], tuple[str, ...]]:
    """MODEL_VARIANTS -> (entries, ids with no base model in the catalog)."""
    found: list[CatalogEntry] = []
    unknown: list[str] = []
    for variant in variants:
        entry = variant_entry(variant, snap)
        (found.append(entry) if entry is not None else unknown.append(variant))
    return tuple(found), tuple(unknown)


# -- what came back: who answered, what the cache saved ----------------------------------------


@dataclass(frozen=True, slots=True)
class RouteOutcome:
    """The routing facts of one answer, read from the final event (no extra request)."""

    requested: str
    served: str
    router: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fallback(self) -> bool:
        strategy = self.router.get("strategy")
        if strategy == "fallback":
            return True
        if not self.served or strategy in ("auto", "latest", "alias"):
            return False
        base = self.requested.split("@", 1)[0]
        if not base or base.startswith(("~", AUTO_ROUTER_ID)):  # a preset/alias/router picks
            return False
        return not _same_model(base, self.served)

    def provider(self) -> str:
        """`DeepInfra (fp8)`: the selected endpoint, its variant in parentheses."""
        endpoints = self.router.get("endpoints")
        available = endpoints.get("available") if isinstance(endpoints, Mapping) else None
        chosen = next((e for e in available or () if isinstance(e, Mapping)
                       and e.get("selected")), None)
        return provider_label(str((chosen or {}).get("provider") or ""))

    def failed_providers(self) -> list[str]:
        return list(dict.fromkeys(
            provider_label(str(a.get("provider"))) for a in self.router.get("attempts") or ()
            if isinstance(a, Mapping) and isinstance(a.get("status"), int)
            and a["status"] >= 400))


PROVIDER_NAMES = {
    "deepinfra": "DeepInfra", "together": "Together", "openai": "OpenAI",
    "anthropic": "Anthropic", "azure": "Azure", "google-vertex": "Google Vertex",
    "google-ai-studio": "Google AI Studio", "amazon-bedrock": "Amazon Bedrock",
    "groq": "Groq", "fireworks": "Fireworks", "novita": "Novita", "parasail": "Parasail",
    "baseten": "Baseten", "cerebras": "Cerebras", "mistral": "Mistral", "deepseek": "DeepSeek",
    "x-ai": "xAI", "nebius": "Nebius", "sambanova": "SambaNova", "hyperbolic": "Hyperbolic",
    "chutes": "Chutes", "moonshotai": "Moonshot AI", "lambda": "Lambda", "cohere": "Cohere",
}


def provider_label(slug: str) -> str:
    """`deepinfra/fp8` -> `DeepInfra (fp8)`; display names pass through unchanged."""
    name, _, variant = slug.strip()[:80].partition("/")
    name = PROVIDER_NAMES.get(name, name)
    return f"{name} ({variant})" if variant else name


def _same_model(requested: str, served: str) -> bool:
    return requested == served or requested.split(":", 1)[0] == served.split(":", 1)[0]


def cache_saving(usage: Usage, pricing: Pricing | None, ttl: str = "5m") -> float | None:
    """USD the cache saved on this answer (reads at the cache price instead of the prompt
    price, minus the extra for writes); None without the model's prices."""
    if pricing is None or not (usage.cached_tokens or usage.cache_write_tokens):
        return None
    read = pricing.input_cache_read or pricing.prompt
    write = (pricing.input_cache_write_1h if ttl == "1h" and pricing.input_cache_write_1h
             else pricing.input_cache_write) or pricing.prompt
    return (usage.cached_tokens * (pricing.prompt - read)
            - usage.cache_write_tokens * (write - pricing.prompt))


def _usd(amount: float) -> str:
    sign = "-" if amount < 0 else ""
    return f"{sign}${abs(amount):.6f}".rstrip("0").rstrip(".")


def routing_status(outcome: RouteOutcome | None, usage: Usage | None,
                   saved: float | None) -> list[str]:
    """Parts the final status line adds: who answered, via whom, what the cache did."""
    parts = []
    if outcome is not None:
        if outcome.served and outcome.fallback:
            parts.append(f"answered by {outcome.served} — fallback")
        elif outcome.served and outcome.served.split(":", 1)[0] != \
                outcome.requested.split("@", 1)[0].split(":", 1)[0]:
            parts.append(f"answered by {outcome.served}")
        via = outcome.provider()
        failed = [p for p in outcome.failed_providers() if p != via]
        if via:
            parts.append(f"via {via}" + (f" after {' and '.join(failed)} failed"
                                         if failed else ""))
    if usage is not None and (usage.cached_tokens or usage.cache_write_tokens):
        cache = [f"{usage.cached_tokens:,} cached"] if usage.cached_tokens else []
        if usage.cache_write_tokens:
            cache.append(f"{usage.cache_write_tokens:,} cache-written")
        if saved is not None:
            cache.append(f"cache saved {_usd(saved)}" if saved >= 0
                         else f"cache cost {_usd(-saved)} extra")
        parts.append(", ".join(cache))
    return parts


RouteReport = tuple[tuple[str, ...], float | None]  # (status-line parts, cache saving USD)
FALLBACK_STATUSES = frozenset({429, 502, 503, 529})


def failed_providers_of(exc: UpstreamStatusError) -> list[str]:
    """Providers an error body says failed (`metadata.previous_errors[].provider`)."""
    errors = exc.metadata.get("previous_errors")
    return [provider_label(str(e["provider"])) for e in errors or ()
            if isinstance(e, Mapping) and e.get("provider")] if isinstance(errors, list) else []


def rate_limit_fallback(payload: Mapping[str, Any], exc: UpstreamStatusError,
                        routing: RoutingSettings) -> dict[str, Any] | None:
    """The request re-aimed at the first fallback model, or None when there is none."""
    models = [m for m in payload.get("models") or () if m != payload.get("model")]
    if not routing.rate_limit_fallback or exc.status not in FALLBACK_STATUSES or not models:
        return None
    alt = {k: v for k, v in payload.items() if k not in ("models", "cache_control")}
    alt["model"] = models[0]
    if models[1:]:
        alt["models"] = models[1:]
    return alt


# -- errors: availability codes, free-model limits, policies that leave no provider ------------

AVAILABILITY_TEXT: dict[str, str] = {
    "model_not_found": "OpenRouter has no model {model}.",
    "wrong_endpoint": "{model} can't be used through the Responses API.",
    "no_endpoints": "No provider serves {model} right now.",
    "model_deprecated": "{model} has been retired by OpenRouter.",
    "model_unavailable_upstream": "{model}'s providers have withdrawn it for now.",
    "capacity_exhausted": "Every provider of {model} is at capacity right now.",
    "temporarily_unavailable": "{model} is temporarily unavailable at every provider.",
    "region_restricted": "{model} isn't offered in this server's region.",
    "privacy_restricted": "No provider of {model} meets the privacy settings (data "
                          "collection / zero data retention) of this pipe or account.",
    "constraint_filtered": "No provider of {model} matches the routing settings.",
    "free_variant_ended": "The free variant of {model} has ended.",
}


def describe_availability(availability: Mapping[str, Any], model: str) -> list[str]:
    """OpenRouter's `error.availability` -> sentences (with its suggested fallbacks)."""
    code = str(availability.get("code") or "")
    template = AVAILABILITY_TEXT.get(code)
    if template is None:
        return []
    requested = _names(availability.get("requested_models"))
    lines = [template.format(model=(requested or [model])[0] or "this model")]
    if excluded := _names(availability.get("excluded_by")):
        lines.append("Excluded by: " + ", ".join(excluded) + ".")
    if fallbacks := _names(availability.get("fallback_models")):
        lines.append("OpenRouter suggests: " + ", ".join(fallbacks) + ".")
    return lines


def _names(value: Any) -> list[str]:
    """A list of model/provider names from an error body; anything else is no names (the
    body is the provider's, not a contract: odd shapes must not break the error message)."""
    if not isinstance(value, list):
        return []
    return [str(v)[:200] for v in value[:20] if isinstance(v, str | int | float) and str(v)]


def describe_rate_limit(message: str, limits: Mapping[str, str], now: float) -> list[str]:
    """A free-model limit: which one, its size, and when it resets (X-RateLimit-*)."""
    lowered = message.lower()
    if "free-models-per-day" in lowered:
        which = "the daily limit for free models"
    elif "free-models-per-min" in lowered:
        which = "the per-minute limit for free models"
    elif limits:
        which = "OpenRouter's request limit"
    else:
        return []
    line = which.capitalize()
    if limits.get("limit"):
        line += f" ({limits['limit']} requests)"
    line += " was reached."
    reset = _reset_time(limits.get("reset"), now)
    return [line + (f" It resets {reset}." if reset else "")]


def _reset_time(raw: str | None, now: float) -> str:
    try:
        value = float(raw or "")
    except ValueError:
        return ""
    seconds = value / 1000 if value > 1e11 else value  # epoch ms (observed) or seconds
    try:
        when = time.strftime("%H:%M UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):  # nan, inf, out of the platform's range
        return ""
    wait = seconds - now
    if wait <= 0:
        return f"at {when}"
    if wait < 120:
        return f"in {wait:.0f} seconds (at {when})"
    if wait < 7200:
        return f"in {wait / 60:.0f} minutes (at {when})"
    return f"at {when}" + (" tomorrow" if time.gmtime(seconds).tm_mday !=
                           time.gmtime(now).tm_mday else "")


# ─────────────────────────────────────────────────────────────────────────────
# §8 Transformer (pure)
#
# Open WebUI body field       → Responses request field
#   system/developer messages → instructions (joined by blank lines)
#   user/assistant/tool       → typed `input` items
#   max_tokens                → max_output_tokens (clamped to the model's limit)
#   reasoning_effort / valve  → reasoning.effort (mapped onto the model's supported efforts)
#   response_format           → text.format
#   sampling params           → same name, only when supported_parameters lists them
# ─────────────────────────────────────────────────────────────────────────────

_REASONING_OPENER = re.compile(r'<details\s+type="reasoning"', re.IGNORECASE)
_DETAILS_CLOSER = re.compile(r"</details>\s*", re.IGNORECASE)


def replace_blocks(text: str, opener: re.Pattern[str], closer: re.Pattern[str],
                   swap: Callable[[str, str], str],
                   accept: Callable[[str, str], bool] = lambda tag, nxt: True) -> str:
    """Each `<opener …tag…>…closer` block of `text` -> `swap(tag, block)`, the block ending
    at the first closer after the tag (what a lazy `.*?` regex matches). `accept(tag, the
    character after the '>')` says whether an opener starts a block at all.

    Linear in `len(text)` on any input (the regexes it replaces were quadratic on
    `"<think>" * N` or opener-only text): every character is scanned a bounded number of
    times, a missing '>' or closer ends the scan, and the closer found is reused by later
    openers before it.
    """
    out: list[str] = []
    pos = start = 0
    found: re.Match[str] | None = None
    while (m := opener.search(text, start)) is not None:
        gt = m.end() - 1 if m.group().endswith(">") else text.find(">", m.end())
        if gt < 0:
            break
        tag = text[m.end():gt]
        if not accept(tag, text[gt + 1:gt + 2]):
            start = gt + 1  # an opener inside this tag shares its '>' and fails alike
            continue
        if found is None or found.start() <= gt:
            found = closer.search(text, gt + 1)
        if found is None:
            break  # no closer after this tag: none after any later one either
        out += (text[pos:m.start()], swap(tag, text[m.start():found.end()]))
        pos = start = found.end()
    return "".join(out) + text[pos:] if out else text


@dataclass(frozen=True, slots=True)
class Transformed:
    """The request to send plus one-line notes for the user about what was left out."""

    payload: dict[str, Any]
    notes: tuple[str, ...] = ()
    tools: ToolSet = field(default_factory=lambda: ToolSet())  # function tools (issue #3)
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
    if "<details" not in text:
        return text
    return replace_blocks(text, _REASONING_OPENER, _DETAILS_CLOSER, lambda tag, block: "")


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
    text = strip_reasoning_blocks(msg.text).strip()  # tool cards: see replay_items (§14)
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
    caller); `replay_items` (§14) puts them back where they happened.
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
    apply_routing(payload, req, entry, settings)  # provider, models, cache… (§7)
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
# §9 Intake
#
# Attachments -> parts a model can take, safely. The pure policy comes first (parsing
# content parts, data URLs, size estimates from base64 length, MIME sniffing, the SSRF
# address and URL policy, the Responses part mapping); then the I/O shell: an async
# resolver, a fetcher that connects only to the addresses it checked, the Open WebUI file
# store adapter, and `Intake.prepare`, which Pipe._plan awaits before the pure transformer.
#
#   source of a part               model takes the kind?  result
#   data URL / raw base64          yes                    size from length, sniff, keep inline
#   /api/v1/files/<id>[/content]   yes                    access check, read via Storage, inline
#   https:// image or file         yes                    SSRF-safe download, save, inline
#   https:// video                 yes                    sent as a URL (the provider fetches it)
#   any                            no                     kept; the transformer adds a note
#
# Every refusal becomes a RefusedPart whose reason the user reads; the rest of the message
# still goes to the model.
# ─────────────────────────────────────────────────────────────────────────────

MB = 1024 * 1024
_PART_LABELS = {"image": "an image", "file": "a file", "audio": "an audio clip",
                "video": "a video"}
_KIND_PLURALS = {"image": "images", "file": "files", "audio": "audio", "video": "video"}
IMAGE_MIMES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
AUDIO_FORMATS = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav",
                 "audio/vnd.wave": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3"}
_MIME_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg",
                 "audio/x-mp3": "audio/mpeg", "audio/mpeg3": "audio/mpeg"}


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    """The intake's share of RequestSettings: per-kind byte caps and the fetch policy."""

    max_image: int
    max_file: int
    max_audio: int
    max_video: int
    max_images: int
    send_files: bool
    save_remote: bool
    allow_http: bool
    allowed_hosts: tuple[str, ...]
    denied_hosts: tuple[str, ...]
    fetch_budget: float
    fetch_retries: int
    max_request: int = 100 * 1024 * 1024  # total inline bytes per request, as sent

    def cap(self, kind: str) -> int:
        return {"image": self.max_image, "file": self.max_file, "audio": self.max_audio,
                "video": self.max_video}[kind]

    def capped(self, limit_mb: float | None) -> IntakeLimits:
        """These limits, each cap lowered to Open WebUI's own upload limit when one is set."""
        if not limit_mb or limit_mb <= 0:
            return self
        top = int(limit_mb * MB)
        return dataclasses.replace(
            self, max_image=min(self.max_image, top), max_file=min(self.max_file, top),
            max_audio=min(self.max_audio, top), max_video=min(self.max_video, top))


def intake_limits(valves: Valves, user: UserValves) -> IntakeLimits:
    return IntakeLimits(
        max_image=int(valves.MAX_IMAGE_MB * MB), max_file=int(valves.MAX_FILE_MB * MB),
        max_audio=int(valves.MAX_AUDIO_MB * MB), max_video=int(valves.MAX_VIDEO_MB * MB),
        max_images=valves.MAX_IMAGES_PER_REQUEST,
        send_files=_pick(user.SEND_FILES_NATIVELY,
                         "on" if valves.SEND_FILES_NATIVELY else "off") == "on",
        save_remote=valves.SAVE_REMOTE_MEDIA, allow_http=valves.REMOTE_FETCH_ALLOW_HTTP,
        allowed_hosts=host_list(valves.REMOTE_FETCH_ALLOWED_HOSTS),
        denied_hosts=host_list(valves.REMOTE_FETCH_DENIED_HOSTS),
        fetch_budget=valves.REMOTE_FETCH_TIMEOUT_SECONDS,
        fetch_retries=valves.REMOTE_FETCH_RETRIES,
        max_request=int(valves.MAX_REQUEST_ATTACHMENTS_MB * MB))


def host_list(csv: str) -> tuple[str, ...]:
    """`"*.Example.com, foo.org., bücher.de"` -> ("example.com", "foo.org", "xn--bcher-kva.de")."""
    hosts = (h.strip().lower().rstrip(".").removeprefix("*.").lstrip(".")
             for h in csv.split(","))
    return tuple(_listed_host(h) for h in hosts if h)


def _listed_host(host: str) -> str:
    try:
        return _ascii_host(host)
    except UnsafeURLError:
        return host  # a malformed entry simply never matches


def megabytes(size: int) -> str:
    """A size for people: `340 KB`, `2.5 MB`."""
    return f"{size / MB:.1f} MB" if size >= MB else f"{max(size / 1024, 0.1):.1f} KB"


# -- content parts ----------------------------------------------------------------------


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
    kind = str(raw.get("type") or "unknown")
    parser = _PART_PARSERS.get(kind)
    part = parser(raw) if parser else None
    return part if part is not None else UnsupportedPart(kind)


def _nested(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    inner = raw.get(key)
    return inner if isinstance(inner, Mapping) else raw


def _text_part(raw: Mapping[str, Any]) -> ContentPart:
    return TextPart(str(raw.get("text") or ""))


def _image_part(raw: Mapping[str, Any]) -> ContentPart | None:
    image = raw.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    detail = image.get("detail") if isinstance(image, Mapping) else raw.get("detail")
    if isinstance(url, str) and url:
        return ImagePart(url, detail if detail in ("auto", "low", "high", "original") else None)
    return None


def _file_part(raw: Mapping[str, Any]) -> ContentPart | None:
    spec = _nested(raw, "file")
    file_id = spec.get("file_id") or spec.get("id")
    url = spec.get("file_data") or spec.get("file_url") or spec.get("url") or (
        f"/api/v1/files/{file_id}/content" if file_id else None)
    name = spec.get("filename") or spec.get("name") or ""
    return FilePart(str(url), str(name)) if url else None


def _audio_part(raw: Mapping[str, Any]) -> ContentPart | None:
    spec = _nested(raw, "input_audio")
    data = spec.get("data")
    return AudioPart(data, str(spec.get("format") or "")) if isinstance(data, str) and data \
        else None


def _video_part(raw: Mapping[str, Any]) -> ContentPart | None:
    video = raw.get("video_url")
    url = video.get("url") if isinstance(video, Mapping) else video
    return VideoPart(url) if isinstance(url, str) and url else None


_PART_PARSERS: dict[str, Callable[[Mapping[str, Any]], ContentPart | None]] = {
    "text": _text_part, "input_text": _text_part,
    "image_url": _image_part, "input_image": _image_part,
    "file": _file_part, "input_file": _file_part,
    "input_audio": _audio_part, "audio": _audio_part,
    "video_url": _video_part, "input_video": _video_part, "video": _video_part,
}


def part_kind(part: ContentPart) -> str | None:
    """The input modality a part needs (`image`, `file`, `audio`, `video`), None for text."""
    return _KIND_OF.get(type(part))


def takes_part(entry: CatalogEntry, part: ContentPart) -> bool:
    """Whether `part` may be sent to the model: its kind is an input modality of the model,
    or it is a PDF, which OpenRouter parses for any model (file-parser plugin, issue #12)."""
    kind = part_kind(part)
    return kind is not None and (entry.accepts(kind) or (kind == "file" and is_pdf_part(part)))


def is_pdf_part(part: ContentPart) -> bool:
    if not isinstance(part, FilePart):
        return False
    url = part.url[:64].lower()
    return (url.startswith("data:application/pdf") or part.filename.lower().endswith(".pdf")
            or urllib.parse.urlsplit(part.url[:2048]).path.lower().endswith(".pdf"))


_KIND_OF: dict[type, str] = {ImagePart: "image", FilePart: "file", AudioPart: "audio",
                             VideoPart: "video"}


def _input_image(part: Any) -> dict[str, Any]:
    return {"type": "input_image", "image_url": part.url, "detail": part.detail or "auto"}


def _input_file(part: Any) -> dict[str, Any]:
    name = part.filename or "attachment"
    if part.url.startswith("data:"):
        return {"type": "input_file", "filename": name, "file_data": part.url}
    return {"type": "input_file", "filename": name, "file_url": part.url}


def _input_audio(part: Any) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": part.data, "format": part.format}}


def _input_video(part: Any) -> dict[str, Any]:
    return {"type": "input_video", "video_url": part.url}


_RESPONSES_PARTS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "image": _input_image, "file": _input_file, "audio": _input_audio, "video": _input_video}


def input_parts(parts: Iterable[ContentPart], entry: CatalogEntry
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """Typed parts -> Responses parts for this model, plus notes for what was left out."""
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    for part in parts:
        kind = part_kind(part)
        if isinstance(part, TextPart):
            out.append({"type": "input_text", "text": part.text})
        elif isinstance(part, RefusedPart):
            notes.append(part.reason)
        elif kind is not None and takes_part(entry, part):
            out.append(_RESPONSES_PARTS[kind](part))
        elif kind is not None:
            notes.append(f"{entry.name} can't read {_KIND_PLURALS[kind]}, so "
                         f"{_PART_LABELS[kind]} was left out of the request.")
        else:
            notes.append(f"An attachment of type '{getattr(part, 'kind', '?')}' can't be "
                         "sent to the model and was left out.")
    return out, notes


# -- data URLs, sizes, MIME types ----------------------------------------------------------

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_DATA_URL_HEADER = 2048  # the `data:<mime>;params,` part is looked for in this many chars
_B64_BLANKS = " \t\n\r\f"  # ASCII whitespace, which may wrap a data URL's base64
_B64_UNBLANK = str.maketrans("", "", _B64_BLANKS)
_SCAN_WINDOW = 1 << 16


@dataclass(frozen=True, slots=True)
class DataURL:
    """A parsed `data:` URL; the payload stays encoded, `size` is its decoded size."""

    mime: str
    is_base64: bool
    payload: str
    size: int

    def head(self, n: int = 48) -> bytes:
        """The first bytes, for sniffing (decodes at most `n` characters)."""
        if not self.is_base64:
            return urllib.parse.unquote_to_bytes(self.payload[:n])
        chunk = self.payload[: n - n % 4]
        return base64.b64decode(chunk + "=" * (-len(chunk) % 4), validate=False)

    def as_base64(self) -> str:
        if self.is_base64:
            return self.payload
        return base64.b64encode(urllib.parse.unquote_to_bytes(self.payload)).decode()


def estimate_base64_size(payload: str) -> int:
    """Bytes a base64 string decodes to, from its length (padding counted, never decoded)."""
    length = len(payload)
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    return max(length * 3 // 4 - padding, 0)


def check_payload_size(text: str, start: int, is_base64: bool, kind: str, cap: int) -> None:
    """Refuse the data-URL payload `text[start:]` when it decodes to more than `cap` bytes,
    before anything is copied or decoded. Its raw length bounds the decoded size from above
    (base64: 3/4 of it; percent-encoding: 1 byte per ASCII char) and, for percent-encoding,
    from below (3 chars per byte at most); base64 that the raw bound can't clear is counted
    in place, stopping as soon as the characters seen prove it too large. A payload neither
    bound decides is left to the exact check after parsing (it is within a few caps)."""
    length = len(text) - start
    if is_base64:
        if length * 3 // 4 <= cap:
            return
        enough = -(-(cap + 3) * 4 // 3)  # this many base64 chars decode to > cap bytes
        if _base64_chars(text, start, enough) >= enough:
            check_size(kind, length * 3 // 4, cap, bound="about")
        return
    if -(-length // 3) > cap:
        check_size(kind, -(-length // 3), cap, bound="at least")


def _base64_chars(text: str, start: int, enough: int) -> int:
    """Non-blank characters of `text[start:]`, counted in place (no copy); stops once at
    least `enough` are seen."""
    seen, pos, end = 0, start, len(text)
    while pos < end and seen < enough:
        stop = min(end, pos + max(enough - seen, _SCAN_WINDOW))
        seen += stop - pos - sum(text.count(c, pos, stop) for c in _B64_BLANKS)
        pos = stop
    return seen


def parse_data_url(url: str, kind: str = "file", cap: int | None = None) -> DataURL:
    """`data:<mime>[;params][;base64],<payload>` -> DataURL; IntakeError when malformed.
    With `cap`, a payload decoding to more than `cap` bytes is refused
    (PayloadTooLargeError) from its length first, before the payload is copied."""
    match = _DATA_URL.match(url, 0, _DATA_URL_HEADER)
    if match is None:
        raise IntakeError("The attachment is not a valid data URL.")
    params = [p.strip().lower() for p in match.group("params").split(";") if p.strip()]
    mime = normalise_mime(match.group("mime") or "text/plain")
    is_b64 = "base64" in params
    if cap is not None:
        check_payload_size(url, match.end(), is_b64, kind, cap)
    payload = url[match.end():]
    if is_b64:
        payload = payload.translate(_B64_UNBLANK)
        if not _BASE64.fullmatch(payload) or len(payload) % 4 == 1:
            raise IntakeError("The attachment's data URL is not valid base64.")
        size = estimate_base64_size(payload)
    else:
        size = _percent_decoded_size(payload)
    if cap is not None:
        check_size(kind, size, cap)
    return DataURL(mime, is_b64, payload, size)


def _percent_decoded_size(payload: str) -> int:
    if payload.isascii() and "%" not in payload:
        return len(payload)
    try:
        return len(urllib.parse.unquote_to_bytes(payload))
    except UnicodeEncodeError as exc:
        raise IntakeError("The attachment's data URL has characters that can't be "
                          "encoded.") from exc


def normalise_mime(mime: str) -> str:
    mime = mime.split(";", 1)[0].strip().lower()
    return _MIME_ALIASES.get(mime, mime)


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"%PDF-", "application/pdf"),
    (b"ID3", "audio/mpeg"), (b"OggS", "audio/ogg"), (b"fLaC", "audio/flac"),
    (b"\x1aE\xdf\xa3", "video/webm"), (b"PK\x03\x04", "application/zip"),
    (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"),
)
_RIFF = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}
_FTYP = {b"qt  ": "video/quicktime", b"M4A ": "audio/mp4", b"heic": "image/heic",
         b"avif": "image/avif"}


def sniff_mime(head: bytes) -> str | None:
    """MIME type from magic bytes, or None when the bytes are not recognised."""
    if head[:4] == b"RIFF" and len(head) >= 12:
        return _RIFF.get(head[8:12])
    if head[4:8] == b"ftyp":
        return _FTYP.get(head[8:12], "video/mp4")
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "audio/mpeg"  # an MPEG audio frame without an ID3 tag
    return None


_GENERIC_MIMES = frozenset({"", "application/octet-stream", "binary/octet-stream",
                            "text/plain", "application/zip"})


def settle_mime(kind: str, declared: str, sniffed: str | None) -> str:
    """The type to send: magic bytes beat the label; refuses what `kind` can't carry."""
    mime = sniffed if sniffed and sniffed != "application/zip" else normalise_mime(declared)
    if mime in _GENERIC_MIMES and kind == "file":
        mime = normalise_mime(declared) or "application/octet-stream"
    if kind == "image" and sniffed is None:
        raise IntakeError("The image's content is not a PNG, JPEG, WebP or GIF picture.")
    if kind == "image" and mime not in IMAGE_MIMES:
        raise IntakeError(f"Images of type {mime or 'unknown'} can't be sent; "
                          "models take PNG, JPEG, WebP or GIF.")
    if kind == "audio" and mime not in AUDIO_FORMATS:
        raise IntakeError(f"Audio of type {mime or 'unknown'} can't be sent; "
                          "OpenRouter takes WAV or MP3 clips.")
    if kind == "video" and not mime.startswith("video/"):
        raise IntakeError(f"A video of type {mime or 'unknown'} can't be sent.")
    return mime


def kind_of_mime(mime: str) -> str:
    """Which part an attachment of this type becomes: image, audio, video or file."""
    major = normalise_mime(mime).split("/", 1)[0]
    return major if major in ("image", "audio", "video") else "file"


def check_size(kind: str, size: int, cap: int, *, bound: str = "") -> None:
    """PayloadTooLargeError when `size` is over `cap` (`bound`: "about", "at least"…)."""
    if size > cap:
        raise PayloadTooLargeError(
            f"The {_PART_LABELS[kind].split(' ', 1)[1]} is {bound + ' ' if bound else ''}"
            f"{megabytes(size)}, over the "
            f"{megabytes(cap)} limit.",
            hint="Send a smaller one, or ask an admin to raise the limit.")


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- SSRF policy: addresses --------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "fd00:ec2::254",
    "100.100.100.200", "168.63.129.16", "192.0.0.192"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_IETF_ASSIGNMENTS = ipaddress.ip_network("192.0.0.0/24")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_TEREDO = ipaddress.ip_network("2001::/32")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_FLAG_CLASSES = (("unspecified", "is_unspecified"), ("loopback", "is_loopback"),
                 ("link-local", "is_link_local"), ("multicast", "is_multicast"))
_LATE_CLASSES = (("reserved", "is_reserved"), ("private", "is_private"),
                 ("site-local", "is_site_local"))


def classify_ip(address: str | IPAddress) -> str | None:
    """Why the server must not connect to `address` ("loopback", "private", …), or None.

    IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by
    that address; Teredo tunnels are refused outright. Anything not globally routable is
    refused, so an unlisted special range fails closed.
    """
    try:
        ip = (address if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
              else ipaddress.ip_address(str(address).strip("[]")))
    except ValueError:
        return "invalid"
    if ip in _METADATA_IPS:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = classify_ip(embedded[1])
            return f"{inner} ({embedded[0]})" if inner else None
        if ip in _TEREDO:
            return "Teredo tunnel"
        if ip in _NAT64_LOCAL:
            return "reserved (local NAT64)"
    return _range_class(ip)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None and ip in _SIXTOFOUR:
        return "6to4", ip.sixtofour
    if ip in _IPV4_COMPAT and int(ip) > 1:
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _range_class(ip: IPAddress) -> str | None:
    for name, flag in _FLAG_CLASSES:
        if getattr(ip, flag, False):
            return name
    if ip in _CGNAT:
        return "carrier-grade NAT (100.64.0.0/10)"
    if ip in _IETF_ASSIGNMENTS:
        return "reserved (IETF protocol assignments)"
    for name, flag in _LATE_CLASSES:
        if getattr(ip, flag, False):
            return name
    return None if ip.is_global else "not globally routable"


_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?",
                           re.IGNORECASE)


def parse_host_ip(host: str) -> IPAddress | None:
    """An IP literal in any form inet_aton accepts (`2130706433`, `0x7f.1`, `0177.0.0.1`,
    `[::1]`, `fe80::1%eth0`), or None for a DNS name. UnsafeURLError for a malformed one."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if not _NUMERIC_HOST.fullmatch(bare):
        return None
    try:
        nums = [_inet_number(p) for p in bare.rstrip(".").split(".")]
        return ipaddress.IPv4Address(_inet_combine(nums))
    except ValueError:
        raise UnsafeURLError(f"'{host}' is a malformed numeric address.") from None


def _inet_number(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8)
    return int(part)


def _inet_combine(nums: list[int]) -> int:
    head, last = nums[:-1], nums[-1]
    if any(n > 255 for n in head) or last >= 1 << (8 * (4 - len(head))):
        raise ValueError("component out of range")
    value = 0
    for n in head:
        value = value << 8 | n
    return value << (8 * (4 - len(head))) | last


# -- SSRF policy: URLs -----------------------------------------------------------------

_OWUI_FILE_URL = re.compile(r"/api/v1/files/(?P<id>[A-Za-z0-9][A-Za-z0-9_-]{0,127})"
                            r"(?:/content(?:/[^?#]*)?)?/?(?:[?#].*)?")


def owui_file_id(url: str, own_origin: str = "") -> str | None:
    """The file id of an Open WebUI-hosted file URL (`/api/v1/files/<id>/content`), else None.
    Relative URLs count, and absolute ones on this Open WebUI's own origin (`scheme://host`);
    any other absolute URL is a remote URL like any other."""
    if own_origin and url.lower().startswith(own_origin.lower() + "/"):
        url = url[len(own_origin):]
    match = _OWUI_FILE_URL.fullmatch(url)
    return match.group("id") if match else None


def request_origin(request: Any) -> str:
    """`scheme://host[:port]` of Open WebUI's own request (`__request__.base_url`), or ""."""
    parts = urllib.parse.urlsplit(str(getattr(request, "base_url", "") or ""))
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


@dataclass(frozen=True, slots=True)
class FetchTarget:
    """A URL that passed the URL policy; `url` is rebuilt from the checked parts."""

    url: str
    scheme: str
    host: str
    port: int
    literal: IPAddress | None


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    return any(host == p or host.endswith("." + p) for p in patterns)


# Video pages (not files) that providers fetch themselves; any other video link is downloaded.
VIDEO_PLATFORM_HOSTS = ("youtube.com", "youtu.be", "youtube-nocookie.com")


def is_video_page(url: str) -> bool:
    """A link to a video platform's page (e.g. YouTube), which only the provider can read."""
    try:
        host = (urllib.parse.urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    return host_matches(host, VIDEO_PLATFORM_HOSTS)


def check_url(url: str, limits: IntakeLimits) -> FetchTarget:
    """Apply the URL policy (scheme, credentials, host lists, IP literals) before any DNS."""
    if any(ch in url for ch in "\\\t\r\n ") or len(url) > 8192:
        raise UnsafeURLError("The link is malformed, so it wasn't fetched.")
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
    except ValueError:  # e.g. an unbalanced "[" in the host
        raise UnsafeURLError("The link is malformed, so it wasn't fetched.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeURLError(f"Only https links are fetched, not '{scheme or '(none)'}:' ones.")
    if scheme == "http" and not limits.allow_http:
        raise UnsafeURLError("Only https links are fetched; this one is plain http.",
                             hint="An admin can allow http with REMOTE_FETCH_ALLOW_HTTP.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURLError("Links with a user name or password are never fetched.")
    if not host:
        raise UnsafeURLError("The link has no host name.")
    host = _ascii_host(host)
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise UnsafeURLError("The link has an invalid port.") from None
    _check_host_lists(host, limits)
    literal = parse_host_ip(host)
    if literal is not None:
        reason = classify_ip(literal)
        if reason:
            raise UnsafeURLError(f"{host} is a {reason} address, which is never fetched.")
    netloc = f"[{literal}]" if isinstance(literal, ipaddress.IPv6Address) else str(
        literal or host)
    rebuilt = urllib.parse.urlunsplit((scheme, f"{netloc}:{port}", parts.path or "/",
                                       parts.query, ""))
    return FetchTarget(rebuilt, scheme, host, port, literal)


def _ascii_host(host: str) -> str:
    """The IDNA (punycode) form the resolver and the TLS check will see."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UnsafeURLError("The link's host name is malformed.") from None


def _check_host_lists(host: str, limits: IntakeLimits) -> None:
    if host_matches(host, limits.denied_hosts):
        raise UnsafeURLError(f"{host} is on the admin's list of hosts never fetched.")
    if limits.allowed_hosts and not host_matches(host, limits.allowed_hosts):
        raise UnsafeURLError(f"{host} is not on the admin's list of hosts media may come from.")


def vet_addresses(host: str, addresses: Iterable[str]) -> list[str]:
    """Every resolved address must be public; one bad record refuses the host."""
    found = list(dict.fromkeys(addresses))
    if not found:
        raise IntakeError(f"{host} has no address.")
    for address in found:
        reason = classify_ip(address.split("%", 1)[0])
        if reason:
            raise UnsafeURLError(f"{host} resolves to {address}, a {reason} address, "
                                 "which is never fetched.")
    return found


# -- I/O shell: resolver and fetcher -------------------------------------------------------

Resolver = Callable[[str, int], Awaitable[list[str]]]
Dial = Callable[[str, int], tuple[str, int]]
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def system_resolve(host: str, port: int) -> list[str]:
    """All A/AAAA records of `host`, via the event loop's resolver (never blocks the loop)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log_failure_detail(f"{host} could not be resolved", exc)
        raise IntakeError(f"{host} could not be resolved (DNS failure).") from exc
    return [str(info[4][0]) for info in infos]


def direct_dial(address: str, port: int) -> tuple[str, int]:
    """Production dialing: connect to exactly the vetted address."""
    return address, port


class _PinnedResolver:
    """aiohttp resolver that answers only for the vetted host, with the vetted addresses.

    aiohttp still uses the URL's host name for TLS SNI and certificate checks, so pinning
    changes where the socket goes, never whose certificate is accepted.
    """

    def __init__(self, host: str, addresses: list[str], dial: Dial) -> None:
        self._host, self._addresses, self._dial = host, addresses, dial

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        if host.rstrip(".").lower() != self._host.lower():
            raise OSError(f"refusing to resolve unexpected host {host!r}")
        out = []
        for address in self._addresses:
            ip, dial_port = self._dial(address, port)
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            out.append({"hostname": host, "host": ip, "port": dial_port, "family": fam,
                        "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
        return out

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes
    mime: str
    filename: str


class _Retryable(Exception):
    """One download attempt failed in a way worth another try (network, 429, 5xx)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class Fetcher:
    """SSRF-safe downloads: policy-checked URL, vetted DNS answers, pinned connections,
    every redirect re-checked, Content-Length then a running byte cap, retries only for
    network errors / 429 / 5xx within one total time budget."""

    def __init__(self, resolver: Resolver = system_resolve, dial: Dial = direct_dial, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic, ssl: Any = None) -> None:
        self._resolve, self._dial, self._sleep, self._clock = resolver, dial, sleep, clock
        self._ssl = ssl

    async def fetch(self, url: str, limits: IntakeLimits, cap: int) -> Fetched:
        """Download `url` (at most `cap` bytes). Raises UnsafeURLError, PayloadTooLargeError
        or IntakeError (with the number of tries) — never a library exception."""
        host = check_url(url, limits).host
        deadline = self._clock() + limits.fetch_budget
        tries = 0
        while True:
            tries += 1
            try:
                return await self._attempt(url, limits, cap, deadline)
            except _Retryable as exc:
                wait = exc.retry_after if exc.retry_after is not None else 0.5 * 2 ** tries
                if tries > limits.fetch_retries or self._clock() + wait >= deadline:
                    raise IntakeError(f"Downloading from {host} failed after {tries} "
                                      f"{'try' if tries == 1 else 'tries'} ({exc.reason}).",
                                      hint="Check the link, or attach the file instead.") \
                        from None
                LOG.info("Download from %s failed (%s); retry in %.1fs", host, exc.reason, wait)
                await self._sleep(wait)

    async def _attempt(self, url: str, limits: IntakeLimits, cap: int, deadline: float
                       ) -> Fetched:
        import aiohttp

        remaining = deadline - self._clock()
        budget = asyncio.timeout(max(remaining, 0.001))
        try:
            async with budget:
                return await self._follow(url, limits, cap)
        except TimeoutError:
            if budget.expired():
                raise IntakeError(f"The download took longer than {limits.fetch_budget:.0f} "
                                  "seconds and was stopped.") from None
            raise _Retryable("timed out") from None
        except aiohttp.ClientSSLError as exc:  # a bad certificate won't get better on retry
            log_failure_detail("The download's secure connection failed", exc)
            raise IntakeError("The secure connection failed (TLS error).",
                              hint="The site's certificate isn't valid for its name.") from exc
        except (aiohttp.ClientError, OSError) as exc:
            log_failure_detail("The download failed", exc)
            raise _Retryable(failure_reason(exc)) from exc

    async def _follow(self, url: str, limits: IntakeLimits, cap: int) -> Fetched:
        target = check_url(url, limits)
        for _ in range(MAX_REDIRECTS + 1):
            addresses = [str(target.literal)] if target.literal else vet_addresses(
                target.host, await self._resolve(target.host, target.port))
            result = await self._get(target, addresses, cap)
            if isinstance(result, Fetched):
                return result
            target = check_url(urllib.parse.urljoin(target.url, result), limits)
        raise IntakeError(f"The link redirected more than {MAX_REDIRECTS} times.")

    async def _get(self, target: FetchTarget, addresses: list[str], cap: int
                   ) -> Fetched | str:
        """One request to the vetted addresses: the body, or the next redirect's Location."""
        import aiohttp

        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(target.host, addresses, self._dial),  # type: ignore[arg-type]
            use_dns_cache=False, force_close=True, ssl=self._ssl)
        headers = {"Accept": "*/*", "User-Agent": "openrouter-responses-pipe (Open WebUI)"}
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session, \
                session.get(self._request_url(target), headers=headers,
                            allow_redirects=False) as resp:
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise IntakeError(f"{target.host} redirected without a Location.")
                return location
            _check_status(target.host, resp.status, resp.headers)
            if resp.content_length is not None and resp.content_length > cap:
                raise PayloadTooLargeError(
                    f"The download is {megabytes(resp.content_length)}, over the "
                    f"{megabytes(cap)} limit.", hint="Link a smaller file.")
            data = await _read_capped(resp.content, cap)
            mime = normalise_mime(resp.headers.get("Content-Type", ""))
            return Fetched(data, mime, _url_filename(target.url))

    @staticmethod
    def _request_url(target: FetchTarget) -> Any:
        import yarl

        return yarl.URL(target.url, encoded=True)


def _check_status(host: str, status: int, headers: Mapping[str, str]) -> None:
    """Only a 200-class answer with content is a download; redirects are followed before."""
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}", parse_retry_after(headers.get("Retry-After")))
    if status >= 400:
        raise IntakeError(f"{host} answered HTTP {status}, so the download was not retried.",
                          hint="Check that the link works in a browser.")
    if status in (204, 205):
        raise IntakeError(f"{host} answered HTTP {status} (no content): there was nothing "
                          "to download.", hint="Check that the link points to the file itself.")
    if not 200 <= status < 300:
        raise IntakeError(f"{host} answered HTTP {status}, which is not a download (and not "
                          "a redirect the pipe follows).",
                          hint="Check that the link works in a browser.")


async def _read_capped(content: Any, cap: int) -> bytes:
    buf = bytearray()
    async for chunk in content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > cap:
            raise PayloadTooLargeError(
                f"The download passed the {megabytes(cap)} limit and was stopped.",
                hint="Link a smaller file.")
    return bytes(buf)


def _url_filename(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    return name[:200] or "download"


# -- I/O shell: Open WebUI's file store ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    name: str
    mime: str
    data: bytes


FILE_UNAVAILABLE = ("An attached file is not available: it no longer exists in Open WebUI, "
                    "or you don't have access to it.")


async def _owui_call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call an Open WebUI API that is sync (≤0.8: off the loop) or async (≥0.9)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    return await result if inspect.isawaitable(result) else result


async def _owui_db(doing: str, fn: Callable[..., Any], *args: Any) -> Any:
    """An Open WebUI database call; its failure (SQLAlchemy, OSError…) becomes an
    IntakeError naming what failed, so only this attachment is refused, never the turn."""
    try:
        return await _owui_call(fn, *args)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # Open WebUI's database (any driver) failing
        LOG.warning("Open WebUI's database failed to %s", doing, exc_info=True)
        raise IntakeError(f"Open WebUI's database failed to {doing} "
                          f"({type(exc).__name__}).") from exc


def _owui_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise IntakeError("Open WebUI's file store isn't available to the pipe.") from exc


class OwuiFileStore:
    """Reads and writes Open WebUI's own files (Files table + Storage provider), so local
    disk, S3, GCS and Azure all work: Storage.get_file returns a local copy's path."""

    async def find(self, file_id: str) -> Any:
        files = _owui_module("open_webui.models.files")
        return await _owui_db(f"look up the attached file {file_id}",
                              files.Files.get_file_by_id, file_id)

    async def read(self, file_id: str, user_id: str, user_role: str, cap: int,
                   kind: str) -> StoredFile:
        record = await self.find(file_id)
        meta = (record.meta or {}) if record is not None else {}
        name = str(meta.get("name") or getattr(record, "filename", "") or file_id)
        if record is None or not await self._may_read(record, user_id, user_role, name):
            raise IntakeError(FILE_UNAVAILABLE)  # one sentence: never whose file, or if it exists
        if not record.path:
            raise IntakeError(f"The original of '{name}' is no longer stored.")
        storage = _owui_module("open_webui.storage.provider").Storage
        try:
            local = await asyncio.to_thread(storage.get_file, record.path)
            data = await asyncio.to_thread(_read_local, str(local), cap, kind)
        except IntakeError:
            raise
        except Exception as exc:  # any storage backend (disk, S3, GCS, Azure) failing
            log_failure_detail(f"Open WebUI's storage failed to read '{name}'", exc)
            raise IntakeError(f"The stored copy of '{name}' can't be read "
                              f"({failure_reason(exc, 'storage error')}).",
                              hint="Upload the file again; if that fails too, tell an admin."
                              ) from exc
        mime = normalise_mime(str(meta.get("content_type") or "")) or _guess_mime(name)
        return StoredFile(record.id, name, mime, data)

    async def _may_read(self, record: Any, user_id: str, user_role: str, name: str) -> bool:
        if record.user_id == user_id or user_role == "admin":
            return True
        return await _shared_with(record.id, user_id, name)

    async def save(self, file_id: str, user_id: str, name: str, mime: str, data: bytes,
                   source: str, link: Mapping[str, str] | None = None) -> None:
        """Store `data` as a file owned by the user (the way Open WebUI's upload does);
        `link` (chat_id, message_id) goes into `meta.data` as Open WebUI's uploads put it."""
        files = _owui_module("open_webui.models.files")
        storage = _owui_module("open_webui.storage.provider").Storage
        tags = {"OpenWebUI-User-Id": user_id, "OpenWebUI-File-Id": file_id}
        try:
            _, path = await asyncio.to_thread(storage.upload_file, io.BytesIO(data),
                                              f"{file_id}_{name}", tags)
        except Exception as exc:  # any storage backend failing; the chat goes on without it
            log_failure_detail(f"Open WebUI's storage failed to save '{name}'", exc)
            raise IntakeError("Open WebUI's storage refused the file "
                              f"({failure_reason(exc, 'storage error')}).") from exc
        form = files.FileForm(id=file_id, hash=hashlib.sha256(data).hexdigest(), filename=name,
                              path=path, data={}, meta={"name": name, "content_type": mime,
                                                        "size": len(data), "source_url": source,
                                                        **({"data": dict(link)} if link else {})})
        if await _owui_db(f"record the saved file '{name}'", files.Files.insert_new_file,
                          user_id, form) is None:
            raise IntakeError("Open WebUI refused to record the saved file.")

    async def upload_limit_mb(self, request: Any) -> float | None:
        """Open WebUI's own upload limit in MB (≥0.10: Config; before: app.state.config)."""
        try:
            config = importlib.import_module("open_webui.models.config").Config
        except ImportError:
            state = getattr(getattr(request, "app", None), "state", None)
            value = getattr(getattr(state, "config", None), "FILE_MAX_SIZE", None)
        else:
            value = await config.get("rag.file.max_size")
        try:
            limit = float(value) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            return None
        return limit if limit > 0 else None


def _read_local(path: str, cap: int, kind: str) -> bytes:
    size = os.path.getsize(path)
    check_size(kind, size, cap)
    with open(path, "rb") as fh:  # read(n) allocates n bytes first: never ask for the cap
        data = fh.read(size + 1)
    check_size(kind, len(data), cap)  # it grew since getsize
    return data


def _guess_mime(name: str) -> str:
    return normalise_mime(mimetypes.guess_type(name)[0] or "application/octet-stream")


async def _shared_with(file_id: str, user_id: str, name: str) -> bool:
    """Open WebUI's own sharing rule (knowledge bases, channels…) where the version has one."""
    check = None
    for module in ("open_webui.utils.access_control.files", "open_webui.routers.files"):
        try:
            check = getattr(importlib.import_module(module), "has_access_to_file", None)
        except ImportError:
            continue
        if check is not None:
            break
    if check is None:
        return False
    users = _owui_module("open_webui.models.users").Users
    user = await _owui_db(f"check your access to '{name}'", users.get_user_by_id, user_id)
    if user is None:
        return False
    try:
        return bool(await _owui_call(check, file_id, "read", user))
    except Exception:  # Open WebUI's access helper failing means "no access", never a crash
        LOG.warning("Open WebUI's file access check failed for %s", file_id, exc_info=True)
        return False


# -- I/O shell: the intake step ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntakeJob:
    """What one request's intake needs: the model, limits, who asks, where status goes."""

    entry: CatalogEntry
    limits: IntakeLimits
    user_id: str
    user_role: str
    emitter: Emitter
    origin: str = ""  # this Open WebUI's own scheme://host, for absolute file links


@dataclass(frozen=True, slots=True)
class Media:
    """A resolved attachment: `url` is a data URL (or a remote URL for video)."""

    url: str
    mime: str
    name: str = ""


LARGE_ENCODE = 4 * MB
_SKIPPED_FILE_TYPES = frozenset({"collection", "web_search", "chat", "note", "folder",
                                 "filesystem", "doc", "image"})


class Intake:
    """Resolves every attachment of a request into inline parts, or a RefusedPart."""

    def __init__(self, fetcher: Fetcher | None = None, store: OwuiFileStore | None = None
                 ) -> None:
        self._fetcher = fetcher or Fetcher()
        self._store = store or OwuiFileStore()

    @property
    def fetcher(self) -> Fetcher:
        return self._fetcher

    @property
    def store(self) -> OwuiFileStore:
        return self._store

    async def prepare(self, req: ChatRequest, job: IntakeJob,
                      files: Iterable[Mapping[str, Any]] = (), request: Any = None
                      ) -> ChatRequest:
        """`req` with attachments inlined (and `__files__` added when the valve says so, or
        when Open WebUI's retrieval got nothing out of them)."""
        files = list(files)
        rescued, untold = await self._unretrieved(files, job)
        messages = attach_files(req.messages, files, job, rescued, untold)
        if not any(part_kind(p) for m in messages if m.role == "user" for p in m.parts):
            return dataclasses.replace(req, messages=messages) if untold else req
        job = dataclasses.replace(job, limits=job.limits.capped(
            await self._upload_limit(request)))
        capped = cap_images(messages, job.limits.max_images, job.entry)
        known = await self._known_sizes(capped, job)  # decide from stored sizes first…
        capped = cap_request_size(capped, job.limits.max_request,
                                  lambda p: known.get(part_source(p) or "") or inline_size(p))
        resolved = [await self._message(m, job) if m.role == "user" else m for m in capped]
        return dataclasses.replace(  # …then read only those, and check what they really are
            req, messages=tuple(cap_request_size(resolved, job.limits.max_request)))

    async def _unretrieved(self, files: list[Mapping[str, Any]], job: IntakeJob
                           ) -> tuple[set[str], list[ContentPart]]:
        """Documents that reach the model only through Open WebUI's retrieval (native
        sending off) when that retrieval had nothing for them (processing failed, no text):
        their links, to send natively if the model reads files; a note for the user either
        way (notes reach API clients too, at the end of the answer)."""
        if job.limits.send_files:
            return set(), []
        rescued: set[str] = set()
        untold: list[ContentPart] = []
        for item in files:
            part = file_part(item)
            file_id = owui_file_id(part.url) if isinstance(part, FilePart) else None
            if part is None or file_id is None:
                continue
            try:
                why = retrieval_gap(item, await self._store.find(file_id))
            except IntakeError:
                continue  # Open WebUI's database failed: its retrieval decides alone
            if why is None:
                continue
            name = getattr(part, "filename", "") or file_id
            if job.entry.accepts("file"):  # told as a note: API clients read it in the answer
                rescued.add(part_source(part) or "")
                untold.append(RefusedPart("file", (
                    f"Open WebUI's document search got nothing from '{name}' ({why}), so it "
                    "was sent to the model as a file.")))
            else:
                untold.append(RefusedPart("file", (
                    f"'{name}' did not reach the model: Open WebUI's document search got "
                    f"nothing from it ({why}), and {job.entry.name} can't read files.")))
        return rescued, untold

    async def _known_sizes(self, messages: Iterable[ChatMessage], job: IntakeJob
                           ) -> dict[str, int]:
        """As-sent sizes of the Open WebUI files among the attachments, from their stored
        size (`meta.size`, written by Open WebUI's upload on 0.6 and 0.12) without reading
        them. Data URLs are measured by their length; remote links are unknown until read."""
        sizes: dict[str, int] = {}
        for msg in messages:
            for part in msg.parts if msg.role == "user" else ():
                source, kind = part_source(part), part_kind(part)
                if source is None or kind is None or source in sizes \
                        or not takes_part(job.entry, part):  # every part `_part` will read
                    continue
                file_id = owui_file_id(source, job.origin)
                if file_id is not None:
                    sizes[source] = await self._stored_size(file_id, kind, job)
        return sizes

    async def _stored_size(self, file_id: str, kind: str, job: IntakeJob) -> int:
        try:
            record = await self._store.find(file_id)
        except IntakeError:
            return 0  # the read will say what is wrong
        size = stored_size(record, job.user_id, job.user_role)
        if size is None or size > job.limits.cap(kind):
            return 0  # unknown (measured once read), or refused by its own cap anyway
        return base64_size(size)

    async def _upload_limit(self, request: Any) -> float | None:
        try:
            return await self._store.upload_limit_mb(request)
        except asyncio.CancelledError:
            raise
        except Exception:  # Open WebUI's config store failing must not block a chat
            LOG.debug("Could not read Open WebUI's upload limit", exc_info=True)
            return None

    async def _message(self, msg: ChatMessage, job: IntakeJob) -> ChatMessage:
        if not any(part_kind(p) for p in msg.parts):
            return msg
        parts = [await self._part(p, job) for p in msg.parts]
        return dataclasses.replace(msg, parts=tuple(parts))

    async def _part(self, part: ContentPart, job: IntakeJob) -> ContentPart:
        kind = part_kind(part)
        if kind is None or not takes_part(job.entry, part):
            return part  # text, or a kind the transformer will leave out with a note
        try:
            return await _RESOLVERS[kind](self, part, job)
        except IntakeError as exc:
            LOG.info("Attachment refused (%s): %s", type(exc).__name__, exc)
            return RefusedPart(kind, f"{_PART_LABELS[kind].capitalize()} was left out: "
                                     f"{describe_error(exc)}")

    async def _image(self, part: Any, job: IntakeJob) -> ContentPart:
        media = await self.media(part.url, "image", job)
        return ImagePart(media.url, part.detail)

    async def _file(self, part: Any, job: IntakeJob) -> ContentPart:
        media = await self.media(part.url, "file", job)
        return FilePart(media.url, part.filename or media.name or _default_name(media.mime))

    async def _audio(self, part: Any, job: IntakeJob) -> ContentPart:
        source = part.data
        if not _is_reference(source):  # raw base64, as input_audio carries it
            check_payload_size(source, 0, True, "audio", job.limits.cap("audio"))
            fmt = part.format.lower() if part.format else "mp3"
            source = f"data:audio/{'mpeg' if fmt == 'mp3' else fmt};base64,{source}"
        media = await self.media(source, "audio", job)  # always a base64 data URL
        return AudioPart(media.url.partition(",")[2], AUDIO_FORMATS[media.mime])

    async def _video(self, part: Any, job: IntakeJob) -> ContentPart:
        """A platform page (YouTube) goes as a link the provider opens; any other video
        (data URL, Open WebUI file, remote file) is checked, saved if remote, and inlined."""
        if is_video_page(part.url):
            check_url(part.url, job.limits)  # the same link policy applies to what we pass on
            return part
        return VideoPart((await self.media(part.url, "video", job)).url)

    async def media(self, source: str, kind: str, job: IntakeJob) -> Media:
        """Any source (data URL, Open WebUI file, remote URL) -> an inline, checked Media."""
        cap = job.limits.cap(kind)
        if source.startswith("data:"):
            parsed = parse_data_url(source, kind, cap)  # refused from its length first
            mime = settle_mime(kind, parsed.mime, sniff_mime(parsed.head()))
            if parsed.is_base64 and mime == parsed.mime:
                return Media(source, mime)
            return Media(f"data:{mime};base64,{parsed.as_base64()}", mime)
        file_id = owui_file_id(source, job.origin)
        if file_id is not None:
            stored = await self._store.read(file_id, job.user_id, job.user_role, cap, kind)
            return await self._inline(stored.data, kind, stored.mime, stored.name, job)
        if source.startswith(("https://", "http://")) or "://" in source:
            return await self._remote(source, kind, job)
        raise IntakeError("The attachment's link is neither a URL nor an Open WebUI file.")

    async def _inline(self, data: bytes, kind: str, declared: str, name: str,
                      job: IntakeJob) -> Media:
        check_size(kind, len(data), job.limits.cap(kind))
        mime = settle_mime(kind, declared, sniff_mime(data[:48]))
        if len(data) >= LARGE_ENCODE:
            await job.emitter.status(f"Encoding {name or _PART_LABELS[kind]} "
                                     f"({megabytes(len(data))})…", done=False)
        encoded = data_url(mime, data)
        if len(data) >= LARGE_ENCODE:
            await job.emitter.status(f"Encoded {name or _PART_LABELS[kind]}", done=True,
                                     hidden=True)
        return Media(encoded, mime, name)

    async def _remote(self, url: str, kind: str, job: IntakeJob) -> Media:
        """Download (or reuse the copy saved on an earlier turn), save, inline."""
        host = check_url(url, job.limits).host  # refused links are refused, saved or not
        file_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{job.user_id}\n{url}"))
        if job.limits.save_remote:
            saved = await self._saved_copy(file_id, job, kind)
            if saved is not None:
                return await self._inline(saved.data, kind, saved.mime, saved.name, job)
        await job.emitter.status(f"Downloading {_PART_LABELS[kind]} from {host}…", done=False)
        try:
            got = await self._fetcher.fetch(url, job.limits, job.limits.cap(kind))
        finally:
            await job.emitter.status(f"Fetched {_PART_LABELS[kind]} from {host}", done=True,
                                     hidden=True)
        media = await self._inline(got.data, kind, got.mime, got.filename, job)
        if job.limits.save_remote:
            await self._save(file_id, job, media.mime, got, url)
        return media

    async def _saved_copy(self, file_id: str, job: IntakeJob, kind: str) -> StoredFile | None:
        try:
            if await self._store.find(file_id) is None:
                return None
            return await self._store.read(file_id, job.user_id, job.user_role,
                                          job.limits.cap(kind), kind)
        except IntakeError as exc:
            LOG.debug("No saved copy %s: %s", file_id, exc)
            return None

    async def _save(self, file_id: str, job: IntakeJob, mime: str, got: Fetched,
                    url: str) -> None:
        try:
            await self._store.save(file_id, job.user_id, got.filename, mime, got.data, url)
        except IntakeError as exc:
            LOG.warning("Downloaded media not saved to Open WebUI: %s", exc)


_RESOLVERS: dict[str, Callable[[Intake, Any, IntakeJob], Awaitable[ContentPart]]] = {
    "image": Intake._image, "file": Intake._file, "audio": Intake._audio,
    "video": Intake._video}


def _is_reference(source: str) -> bool:
    return source.startswith(("data:", "/", "http://", "https://"))


def _default_name(mime: str) -> str:
    return "document" + (mimetypes.guess_extension(mime) or "")


def attach_files(messages: tuple[ChatMessage, ...], files: Iterable[Mapping[str, Any]],
                 job: IntakeJob, rescued: Iterable[str] = (),
                 notes: Iterable[ContentPart] = ()) -> tuple[ChatMessage, ...]:
    """`__files__` -> parts on the last user message, when SEND_FILES_NATIVELY is on (or the
    file is `rescued`: retrieval got nothing from it) and the model reads that kind; `notes`
    (refusals) join them. Open WebUI's retrieval runs for them either way (a pipe can't skip
    it; on 0.12 the model's "File Context" capability can), so the model may get both."""
    wanted = set(rescued)
    last = next((i for i in range(len(messages) - 1, -1, -1)
                 if messages[i].role == "user"), None)
    extra = [p for p in (file_part(f) for f in files)
             if p is not None and job.entry.accepts(part_kind(p) or "")
             and (job.limits.send_files or part_source(p) in wanted)]
    extra += list(notes)
    if last is None or not extra:
        return messages
    msg = messages[last]
    present = {part_source(p) for p in msg.parts}
    extra = [p for p in extra if part_source(p) is None  # a note
             or part_source(p) not in present]  # never the same file twice
    return (*messages[:last], dataclasses.replace(msg, parts=(*msg.parts, *extra)),
            *messages[last + 1:])


def retrieval_gap(item: Mapping[str, Any], record: Any) -> str | None:
    """Why Open WebUI's retrieval had nothing for an attached file, or None when it had its
    text. Both 0.6.28 and 0.12 keep the processing state in the file record's `data`:
    `status` pending | completed | failed, `error`, and the extracted `content`; the
    `__files__` item may carry the upload's `error` too. In full-context mode Open WebUI
    (0.12 `get_sources_from_items`) takes the item's own `file.data.content` first."""
    if record is None:
        return None  # deleted: the attachment itself is reported elsewhere
    if item.get("context") == "full" and _item_content(item).strip():
        return None  # "Using Entire Document": Open WebUI uses the item's own text
    data = getattr(record, "data", None)
    data = data if isinstance(data, Mapping) else {}
    status, error = str(data.get("status") or ""), data.get("error") or item.get("error")
    if status == "failed" or error:
        return f"processing failed: {str(error or 'no reason given')[:200]}"
    if status == "pending":
        return "it was still being processed"
    content = data.get("content")
    if not isinstance(content, str) or not content.strip():
        return "no text could be extracted"
    return None


def _item_content(item: Mapping[str, Any]) -> str:
    inner = item.get("file")
    data = inner.get("data") if isinstance(inner, Mapping) else None
    content = data.get("content") if isinstance(data, Mapping) else None
    return content if isinstance(content, str) else ""


def part_source(part: ContentPart) -> str | None:
    """Where an attachment part comes from (URL, data URL or base64), None for text."""
    if isinstance(part, AudioPart):
        return part.data
    return part.url if isinstance(part, ImagePart | FilePart | VideoPart) else None


def file_part(item: Mapping[str, Any]) -> ContentPart | None:
    """One `__files__` entry -> a part (by content type), or None for non-files/images."""
    if str(item.get("type") or "file") in _SKIPPED_FILE_TYPES:
        return None
    found = item.get("file")
    inner: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    meta: Mapping[str, Any] = inner["meta"] if isinstance(inner.get("meta"), Mapping) else {}
    file_id = item.get("id") or inner.get("id")
    if not file_id:
        return None
    name = str(item.get("name") or meta.get("name") or inner.get("filename") or "")
    mime = str(item.get("content_type") or meta.get("content_type") or _guess_mime(name))
    url, kind = f"/api/v1/files/{file_id}/content", kind_of_mime(mime)
    if kind == "image":
        return None  # images arrive as image_url parts of the message itself
    if kind == "audio":
        return AudioPart(url)
    return VideoPart(url) if kind == "video" else FilePart(url, name)


def _newest_first(messages: Iterable[ChatMessage],
                  judge: Callable[[ContentPart], ContentPart]) -> list[ChatMessage]:
    """Every part through `judge` (the part itself, or a RefusedPart), newest part first."""
    out: list[ChatMessage] = []
    for msg in reversed(list(messages)):
        parts = [judge(part) for part in reversed(msg.parts)]
        out.append(dataclasses.replace(msg, parts=tuple(reversed(parts))))
    return list(reversed(out))


def cap_images(messages: Iterable[ChatMessage], limit: int, entry: CatalogEntry
               ) -> list[ChatMessage]:
    """Keep the newest `limit` images the model would get; refuse older ones by name."""
    if not entry.accepts("image"):
        return list(messages)
    seen = 0

    def judge(part: ContentPart) -> ContentPart:
        nonlocal seen
        if not isinstance(part, ImagePart):
            return part
        seen += 1
        return part if seen <= limit else RefusedPart("image", (
            f"An older image was left out: only the newest {limit} images are sent per "
            "request (MAX_IMAGES_PER_REQUEST)."))

    return _newest_first(messages, judge)


def stored_size(record: Any, user_id: str, user_role: str) -> int | None:
    """An Open WebUI file record's size in bytes (`meta.size`), only for files the user may
    read directly (another user's file size is never told, shared or not)."""
    if record is None or (getattr(record, "user_id", None) != user_id and user_role != "admin"):
        return None
    meta = getattr(record, "meta", None)
    size = meta.get("size") if isinstance(meta, Mapping) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def base64_size(raw: int, header: int = 48) -> int:
    """Characters `raw` bytes take inline as a base64 data URL (with a typical header)."""
    return 4 * ((raw + 2) // 3) + header


def inline_size(part: ContentPart) -> int:
    """Bytes an attachment adds to a request as sent (its base64); 0 for links and text."""
    if isinstance(part, AudioPart):
        return len(part.data)
    url = getattr(part, "url", "")
    return len(url) if isinstance(url, str) and url.startswith("data:") else 0


def cap_request_size(messages: Iterable[ChatMessage], cap: int,
                     size_of: Callable[[ContentPart], int] = inline_size) -> list[ChatMessage]:
    """Keep the newest inline attachments that fit in `cap` bytes together (as sent); each
    one that doesn't fit becomes a note. Every turn re-sends a chat's attachments. `size_of`
    may give sizes known before reading (stored file sizes) so nothing is read in vain."""
    used = 0

    def judge(part: ContentPart) -> ContentPart:
        nonlocal used
        size = size_of(part)
        if not size:
            return part
        if used + size > cap:
            kind = part_kind(part) or "file"
            return RefusedPart(kind, (
                f"{_PART_LABELS[kind].capitalize()} ({megabytes(size)} as sent) was left "
                f"out: one request carries at most {megabytes(cap)} of attachments, newest "
                "first (MAX_REQUEST_ATTACHMENTS_MB)."))
        used += size
        return part

    return _newest_first(messages, judge)


# ─────────────────────────────────────────────────────────────────────────────
# §10 Client
#
# `Transport` is the one HTTP seam: the default uses one pooled aiohttp session per event
# loop; tests inject fakes. Retries happen here and only before any byte reaches the user.
# ─────────────────────────────────────────────────────────────────────────────


class TransportResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...  # stop now (cancel, error): the socket is dropped

    async def release(self) -> None: ...  # the stream ended normally: keep the connection


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
            log_failure_detail("The connection to OpenRouter broke", exc)
            raise UpstreamStreamError(
                f"The connection to OpenRouter broke ({failure_reason(exc)}).",
                code="network_error") from exc

    async def close(self) -> None:
        self._resp.close()

    async def release(self) -> None:
        """After the stream's end event: read the few bytes left (`[DONE]`, the chunked
        terminator) so the connection goes back to the pool instead of being closed."""
        import aiohttp

        content, budget, clean = self._resp.content, 65536, False
        try:
            async with asyncio.timeout(0.5):
                while budget > 0 and (chunk := await content.read(budget)):
                    budget -= len(chunk)
            clean = content.at_eof()
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        finally:  # a tail that never ends, an error, a cancel: never reuse that socket
            if clean:
                self._resp.release()
            else:
                self._resp.close()


def _exc_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# What users read of a network or storage failure: a short kind, never the exception's
# text (it names hosts, addresses, paths, buckets). The detail goes to an admin-only line.
_ERRNO_REASONS = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset",
                  errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable",
                  errno.ETIMEDOUT: "timed out", errno.ENOENT: "file missing",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.ENOSPC: "storage full"}
_NAMED_REASONS = (("SSL", "TLS error"), ("Certificate", "TLS error"), ("DNS", "DNS failure"),
                  ("Proxy", "proxy failure"), ("Timeout", "timed out"),
                  ("Disconnected", "connection closed"), ("Payload", "answer broke off"))


def _failure_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(chain) < 8:
        cur = todo.pop(0)
        if cur is None or any(cur is seen for seen in chain):
            continue
        chain.append(cur)
        todo += [getattr(cur, "os_error", None), cur.__cause__, cur.__context__]
    return chain


def _one_reason(exc: BaseException) -> str | None:
    if isinstance(exc, ssl.SSLError):
        return "TLS error"
    if isinstance(exc, socket.gaierror):
        return "DNS failure"
    if isinstance(exc, TimeoutError):
        return "timed out"
    names = [k.__name__ for k in type(exc).__mro__]
    for part, reason in _NAMED_REASONS:
        if any(part in name for name in names):
            return reason
    if isinstance(exc, OSError) and exc.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[exc.errno]
    return None


def failure_reason(exc: BaseException, default: str = "network error") -> str:
    """A short, user-safe kind of failure (timed out, connection refused, DNS failure, TLS
    error…), from the exception and its causes; `default` when none is recognised."""
    for cur in _failure_chain(exc):
        if reason := _one_reason(cur):
            return reason
    return default


def log_failure_detail(what: str, exc: BaseException) -> None:
    """The raw detail of a failure users read only as a kind: one admin-only log line."""
    LOG.warning("%s: %s: %s", what, type(exc).__name__, _exc_text(exc),
                extra={"orp_private": True})


@functools.cache
def _env_proxy_lookup() -> Callable[[str], tuple[Any, Any]] | None:
    """aiohttp's own environment proxy rule (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, .netrc
    credentials) as a plain function of a URL, or None when this aiohttp lacks it."""
    try:
        from aiohttp.helpers import get_env_proxy_for_url
        from yarl import URL
    except ImportError:
        return None

    def lookup(url: str) -> tuple[Any, Any]:
        try:
            return get_env_proxy_for_url(URL(url))
        except (LookupError, ValueError):  # no proxy (NO_PROXY, none set), or a bad URL
            return None, None  # (which aiohttp itself then refuses as a ClientError)

    return lookup


class AiohttpTransport:
    """Pooled aiohttp client; one session per event loop, created on first use.

    HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and .netrc proxy credentials) apply, as corporate
    installs need; remote media downloads (§9) never use them, on purpose. The proxy of a
    scheme and host is looked up once per transport (the process environment is read at the
    first request to that host): aiohttp's own `trust_env` repeats that lookup in a worker
    thread on every request, a thread hop before every first byte."""

    def __init__(self, *, limit: int = 256) -> None:
        self._limit = limit
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proxies: dict[tuple[str, str], tuple[Any, Any]] = {}

    def _get_session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300,
                                             keepalive_timeout=60)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                                  trust_env=_env_proxy_lookup() is None)
            self._loop = loop
        return self._session

    async def _proxy(self, url: str) -> tuple[Any, Any]:
        """(proxy URL, proxy credentials) for this URL from the environment, or (None, None)."""
        lookup = _env_proxy_lookup()
        if lookup is None:  # an aiohttp without the helper: its trust_env does it
            return None, None
        try:
            target = urllib.parse.urlsplit(url)
            key = (target.scheme, target.hostname or "")
        except ValueError:  # a malformed BASE_URL: aiohttp refuses it as a ClientError
            return None, None
        found = self._proxies.get(key)
        if found is None:  # the lookup may read ~/.netrc: off the loop, once
            found = self._proxies[key] = await asyncio.to_thread(lookup, url)
        return found

    async def request(self, method: str, url: str, *, headers: Mapping[str, str],
                      body: bytes | None, connect_timeout: float, read_timeout: float
                      ) -> TransportResponse:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                        connect=connect_timeout, sock_read=read_timeout)
        try:
            proxy, proxy_auth = await self._proxy(url)
            # proxy_auth, not proxy_headers: only it reaches a plain-HTTP proxy (aiohttp 3.14
            # marks the argument deprecated, with no replacement that does both yet)
            resp = await self._get_session().request(
                method, url, headers=dict(headers), data=body, timeout=timeout, proxy=proxy,
                proxy_auth=proxy_auth)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log_failure_detail("Couldn't reach OpenRouter", exc)
            raise UpstreamConnectionError(
                f"Couldn't reach OpenRouter ({failure_reason(exc)}).",
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
        retry_after=retry_after, metadata=dict(meta), availability=dict(availability),
        rate_limits=rate_limit_headers(headers, meta.get("headers")))


def rate_limit_headers(headers: Mapping[str, str], in_body: Any) -> dict[str, str]:
    """`X-RateLimit-Limit/Remaining/Reset` from the response (or the error body) (#12)."""
    found: dict[str, str] = {}
    for source in (in_body if isinstance(in_body, Mapping) else {}, headers):
        for name, value in source.items():
            lowered = str(name).lower()
            if lowered.startswith("x-ratelimit-"):
                found[lowered.removeprefix("x-ratelimit-")] = str(value)[:40]
    return found


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
        if settings.routing.router_metadata:
            headers["X-OpenRouter-Metadata"] = "enabled"
        return headers

    async def fetch_models(self, settings: RequestSettings) -> Any:
        return await self._send("GET", "/models" + CATALOG_QUERY, None, settings, stream=False,
                                take=_json_answer)

    async def complete(self, payload: Mapping[str, Any], settings: RequestSettings,
                       flight: Flight | None = None) -> Any:
        """POST /responses without streaming; the parsed JSON answer (body read retried).
        `flight` follows whether an HTTP call is outstanding (what a cancel may have cost)."""
        settings.require_api_key()
        return await self._send("POST", "/responses", encode_payload(payload), settings,
                                stream=False, take=_json_answer, flight=flight)

    async def fetch_image_models(self, settings: RequestSettings) -> Any:
        """GET /images/models: the values each image model offers (issue #14)."""
        return await self._send("GET", "/images/models", None, settings, stream=False,
                                take=_json_answer)

    async def open_response(self, payload: Mapping[str, Any], settings: RequestSettings
                            ) -> TransportResponse:
        """POST /responses; returns the open 200 event stream (caller closes it)."""
        settings.require_api_key()
        return await self._send("POST", "/responses", encode_payload(payload), settings,
                                stream=True, take=_stream_answer)

    async def _send(self, method: str, path: str, body: bytes | None,
                    settings: RequestSettings, *, stream: bool,
                    take: Callable[[TransportResponse], Awaitable[Any]],
                    flight: Flight | None = None) -> Any:
        """Send, then `take` the 200 answer (read it, or check it is a stream); failures
        before any byte reached the user (statuses, network, a broken body) are retried.
        `flight` is in flight only while a call is outstanding or its 200 is being read
        (never during an error answer or a retry's wait: those are not billed)."""
        url, headers = settings.base_url + path, self.headers(settings, stream=stream)
        flight, attempt = flight or Flight(), 0
        while True:
            started = self._clock()
            try:
                flight.begin()
                resp = await self._transport.request(
                    method, url, headers=headers, body=body,
                    connect_timeout=settings.connect_timeout,
                    read_timeout=settings.read_timeout)
                self._observe(resp.status, self._clock() - started)
                if resp.status < 400:
                    flight.generation_id = generation_id_of(resp.headers)
                    return await take(resp)
                flight.land()
                err: UpstreamError = await self._error_from(resp)
            except UpstreamConnectionError as exc:
                self._observe("network", None)
                err = exc
            flight.land()
            delay = retry_delay(err, attempt, settings)
            if delay is None:
                raise _with_attempts(err, attempt + 1)
            LOG.info("OpenRouter %s %s failed (%s); retry %d in %.1fs",
                     method, path, err, attempt + 1, delay)
            await self._sleep(delay)
            attempt += 1

    @staticmethod
    async def _error_from(resp: TransportResponse) -> UpstreamStatusError:
        return parse_upstream_error(resp.status, await read_body(resp), resp.headers)


@dataclass(slots=True)
class Flight:
    """One request's billing exposure for a task that may be cancelled: `active` while an
    HTTP call is outstanding or its 200 answer is being read (a cancel then may have been
    billed), off once the answer failed, during a retry's wait, and once its usage is
    recorded; `generation_id` is the answer's `X-Generation-Id` ("" before headers)."""

    active: bool = False
    generation_id: str = ""

    def begin(self) -> None:
        self.active, self.generation_id = True, ""

    def land(self) -> None:
        self.active = False


def generation_id_of(headers: Mapping[str, str]) -> str:
    return str(headers.get("X-Generation-Id") or headers.get("x-generation-id") or "")


async def read_body(resp: TransportResponse) -> bytes:
    """The whole body; the connection goes back to the pool, or is dropped if reading failed.
    A read that times out or breaks off is an UpstreamBodyError (retried before any byte)."""
    import aiohttp

    try:
        body = await resp.read()
    except BaseException as exc:
        await resp.close()
        if isinstance(exc, TimeoutError):
            raise UpstreamBodyError("OpenRouter stopped sending its answer (read timeout).",
                                    hint="Retry in a moment.") from exc
        if isinstance(exc, aiohttp.ClientError | OSError):
            log_failure_detail("OpenRouter's answer broke off", exc)
            raise UpstreamBodyError(f"The connection to OpenRouter broke while its answer was "
                                    f"read ({failure_reason(exc)}).", hint="Retry in a moment.") \
                from exc
        raise
    await resp.release()
    return body


def _content_type(resp: TransportResponse) -> str:
    headers = resp.headers or {}
    return str(headers.get("Content-Type") or headers.get("content-type") or "")


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The request body as JSON; a value JSON can't carry is the request's fault."""
    try:
        return _dumps(payload)
    except (TypeError, ValueError, RecursionError) as exc:  # orjson: huge ints, surrogates
        raise BadRequest(f"it holds a value that can't be sent as JSON ({exc}).") from None


async def _stream_answer(resp: TransportResponse) -> TransportResponse:
    """The 200 answer to a streamed request, if it is an event stream (no header: trusted)."""
    ctype = _content_type(resp)
    if not ctype or "text/event-stream" in ctype.lower():
        return resp
    raise unexpected_body(ctype, await read_body(resp), "a stream")


async def _json_answer(resp: TransportResponse) -> Any:
    """The 200 answer to a non-streamed request, parsed; an error object or a page is an
    UpstreamUnexpectedBody with the provider's words."""
    ctype, body = _content_type(resp), await read_body(resp)
    try:
        data = _loads(body)
    except ValueError:
        raise unexpected_body(ctype, body, "JSON") from None
    if isinstance(data, Mapping) and isinstance(data.get("error"), Mapping) \
            and "output" not in data and "data" not in data:
        raise unexpected_body(ctype, body, "an answer")
    return data


def unexpected_body(content_type: str, body: bytes, wanted: str) -> UpstreamUnexpectedBody:
    """A 200 whose body is not `wanted` -> the provider's message (an error object), or what
    kind of body came, with a readable snippet (an HTML proxy page, plain text)."""
    try:
        data = _loads(body)
    except ValueError:
        data = None
    found = data.get("error") if isinstance(data, Mapping) else None
    if isinstance(found, Mapping):
        err = parse_upstream_error(200, body, {})
        code = f" (code {found['code']})" if isinstance(found.get("code"), int | str) else ""
        said = f" Provider said ({err.provider_name or 'provider'}): {err.raw}" if err.raw \
            else ""
        return UpstreamUnexpectedBody(
            f"OpenRouter answered with an error instead of {wanted}{code}: "
            f"{err.provider_message or 'no details given'}.{said}",
            hint="Retry in a moment, or pick another model.")
    head = body[:65536].decode("utf-8", "replace")
    if "html" in content_type.lower() or head.lstrip()[:15].lower().startswith(
            ("<!doctype html", "<html")):
        return UpstreamUnexpectedBody(
            f"OpenRouter answered with an HTML page, not {wanted}: “{html_snippet(head)}”.",
            hint="A proxy or firewall between this server and OpenRouter may have answered; "
                 "an admin should check BASE_URL and the server's network.")
    kind = content_type.split(";")[0].strip() or "an unlabelled body"
    return UpstreamUnexpectedBody(
        f"OpenRouter answered with {kind}, not {wanted}: “{_squash(head)[:200]}”.",
        hint="An admin should check BASE_URL and any proxy in between.")


def html_snippet(page: str, limit: int = 200) -> str:
    """An HTML page -> its title and first words, tags dropped (linear: no backtracking)."""
    lower = page.lower()
    start = lower.find("<title")
    title = ""
    if start >= 0 and (open_end := lower.find(">", start)) >= 0:
        close = lower.find("</title", open_end)
        title = page[open_end + 1:close if close >= 0 else open_end + 201]
    text = _squash(html.unescape(title)) or _squash(html.unescape(
        re.sub(r"<[^<>]*>", " ", page[:20000])))
    return text[:limit] + ("…" if len(text) > limit else "")


def _squash(text: str) -> str:
    return " ".join(text.split())


def _with_attempts(err: UpstreamError, attempts: int) -> UpstreamError:
    err.attempts = attempts
    return err


# ─────────────────────────────────────────────────────────────────────────────
# §11 Stream decoding
#
# bytes ──SSEDecoder.feed──▶ SSEEvent ──json──▶ event dict ──HANDLERS[type]──▶ intents
#
# The decoder is pure and incremental: it buffers partial lines, so UTF-8 split across reads
# is decoded only once its line is complete. The reducer is a table of small handlers that
# update a StreamState and append intents; only the orchestrator (§19) performs them.
# ─────────────────────────────────────────────────────────────────────────────


SSE_MAX_LINE_BYTES = 16 * 1024 * 1024  # one line, or one event's data, never exceeds this
_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """Incremental Server-Sent-Events parser (WHATWG rules; no I/O, no JSON).

    Linear in the input whatever the read size: a partial line is kept as a list of pieces
    joined once when its end arrives (never re-joined or re-scanned per read). CR, LF and
    CRLF all end a line, also when a CRLF pair is split between two reads. A line, or an
    event's data, longer than `max_bytes` raises `UpstreamStreamError` (bounded memory).
    """

    __slots__ = ("_data", "_data_len", "_event", "_head", "_max", "_pieces", "_pieces_len",
                 "_skip_lf")

    def __init__(self, max_bytes: int = SSE_MAX_LINE_BYTES) -> None:
        self._max = max_bytes
        self._head: bytes | None = b""   # the first bytes until the BOM is ruled out
        self._pieces: list[bytes] = []  # the current line, not yet ended
        self._pieces_len = 0
        self._skip_lf = False           # the last read ended in CR: a leading LF pairs with it
        self._data: list[str] = []
        self._data_len = 0
        self._event: str | None = None

    @property
    def max_bytes(self) -> int:
        return self._max

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """A new cap from the next `feed` on (§12 grows it with the pictures streamed)."""
        self._max = value

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._head is not None:
            chunk = self._strip_bom(chunk)
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            chunk = chunk[1:] if chunk[:1] == b"\n" else chunk
        if b"\r" in chunk:  # chunk-local: a CR at the end pairs with the next read's LF
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        events: list[SSEEvent] = []
        if lines and self._pieces:  # the first line began in an earlier read
            lines[0] = b"".join((*self._pieces, lines[0]))
            self._pieces, self._pieces_len = [], 0
        data, size, cap = self._data, self._data_len, self._max
        for line in lines:
            # Hot path inlined: OpenRouter sends only `data: <json>` lines and blank lines.
            if line.startswith(b"data: "):
                size += len(line) - 5
                if size > cap:
                    raise self._too_long("event")
                data.append(line[6:].decode("utf-8", "replace"))
            elif not line and data and self._event is None:
                events.append(SSEEvent(data[0] if len(data) == 1 else "\n".join(data)))
                data, size = [], 0
                self._data = data
            else:
                self._data_len = size
                self._line(line, events)
                data, size = self._data, self._data_len
        self._data_len = size
        if tail:
            self._keep(tail)
        return events

    def _strip_bom(self, chunk: bytes) -> bytes:
        """The stream's first bytes without a leading UTF-8 BOM (it may arrive split)."""
        head = (self._head or b"") + chunk
        if len(head) < 3 and _BOM.startswith(head):
            self._head = head
            return b""
        self._head = None
        return head[3:] if head.startswith(_BOM) else head

    def _keep(self, piece: bytes) -> None:
        self._pieces_len += len(piece)
        if self._pieces_len > self._max:
            raise self._too_long("line")
        self._pieces.append(piece)

    def _too_long(self, what: str) -> UpstreamStreamError:
        return UpstreamStreamError(
            f"OpenRouter sent a stream {what} over {self._max // (1024 * 1024) or 1} MB; "
            "the answer was stopped there.", code="sse_too_large",
            hint="Try again; if it repeats, the provider's stream is broken.")

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        """Every line but `data: …` (handled inline by `feed`)."""
        if len(line) > self._max:
            raise self._too_long("line")
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else "\n".join(self._data)
                events.append(SSEEvent(data, self._event))
                self._data, self._data_len = [], 0
            self._event = None
            return
        if line[0] == 0x3A:  # ":" comment / keep-alive
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._add_data(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    def _add_data(self, value: bytes) -> None:
        self._data_len += len(value) + 1
        if self._data_len > self._max:
            raise self._too_long("event")
        self._data.append(value.decode("utf-8", "replace"))

    def finish(self) -> list[SSEEvent]:
        """End of stream: an event without its closing blank line is discarded (SSE rules)."""
        self._pieces, self._pieces_len, self._data, self._data_len = [], 0, [], 0
        self._event = None
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
    streamed_chars: int = 0  # text + reasoning shown (a stopped answer's estimate; §19 _pump)
    open_items: dict[int, str] = field(default_factory=dict)
    done_items: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    usage: Usage | None = None
    terminal: str | None = None  # completed | incomplete | failed
    incomplete_reason: str = ""
    error: UpstreamStreamError | None = None
    saw_done_marker: bool = False
    bad_events: int = 0
    router: Mapping[str, Any] | None = None  # openrouter_metadata of the final event (#12)
    image_intents: int = 0  # image intents produced so far (§12 resolves only those batches)

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
    if item.get("type") in IMAGE_ITEM_TYPES:
        image_intent(state, out, IMAGE_STATUS, GENERATING_IMAGE)


def _on_item_done(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    item = ev.get("item") or {}
    index = int(ev.get("output_index", -1))
    state.open_items.pop(index, None)
    if item.get("type") in IMAGE_ITEM_TYPES:  # §12: the picture leaves as an intent
        on_image_item_done(state, index, item, out)
        return
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


def _final_routing(state: StreamState, resp: Mapping[str, Any]) -> None:
    """The model that served (a fallback may differ) and the router metadata (#12)."""
    state.model = resp.get("model") or state.model
    router = resp.get("openrouter_metadata")
    state.router = router if isinstance(router, Mapping) else None


def _on_completed(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    resp = ev.get("response") or {}
    state.terminal = "completed"
    state.usage = Usage.from_json(resp.get("usage"))
    _final_routing(state, resp)
    late_images(state, resp.get("output"), out)  # §12: pictures only the final object carries


def _on_incomplete(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    resp = ev.get("response") or {}
    state.terminal = "incomplete"
    state.usage = Usage.from_json(resp.get("usage"))
    _final_routing(state, resp)
    state.incomplete_reason = str((resp.get("incomplete_details") or {}).get("reason") or "")


def _on_failed(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    resp = ev.get("response") or {}
    err = resp.get("error") or {}
    state.terminal = "failed"
    state.usage = Usage.from_json(resp.get("usage"))
    state.error = stream_failure(  # §12: an image refusal gets its own sentence
        str(err.get("message") or "OpenRouter reported that the response failed."),
        str(err.get("code") or ""), str(resp.get("error_type") or ""),
        err.get("availability"), str(resp.get("model") or state.model))


def _on_error(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    """`error` events, flat or nested, and the chat-style in-band `{"error": {...}}` that
    has no `type`; the provider's own words (`metadata.raw`) are kept when given."""
    inner = ev.get("error")
    nested: Mapping[str, Any] = inner if isinstance(inner, Mapping) else ev
    meta = nested.get("metadata")
    raw = str(meta.get("raw") or "")[:500] if isinstance(meta, Mapping) else ""
    message = str(nested.get("message") or "OpenRouter sent an error event.")
    if raw and raw not in message:
        name = meta.get("provider_name") if isinstance(meta, Mapping) else None
        message += f" Provider said ({name or 'provider'}): {raw}"
    state.terminal = "failed"
    state.error = stream_failure(
        message, str(nested.get("code") or ""), str(ev.get("error_type") or ""),
        nested.get("availability"), state.model)


def _untyped_handler(event: Any) -> Handler:
    """An event without `type`: a chat-completions style in-band error, else KeyError."""
    if isinstance(event, Mapping) and isinstance(event.get("error"), Mapping):
        return _on_error
    raise KeyError("type")


def _on_image_progress(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    """An image is being made (§12 turns this into one "Generating image…" status)."""
    image_intent(state, out, IMAGE_STATUS, GENERATING_IMAGE)


def _on_image_partial(state: StreamState, ev: Mapping[str, Any], out: list[Intent]) -> None:
    """A partial image: shown as a preview that the next one replaces (§12)."""
    partial = ev.get("partial_image_b64")
    if isinstance(partial, str) and partial:
        image_intent(state, out, IMAGE_PARTIAL, partial)


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
    "response.image_generation_call.in_progress": _on_image_progress,   # §12
    "response.image_generation_call.generating": _on_image_progress,    # §12
    "response.image_generation_call.partial_image": _on_image_partial,  # §12
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
            try:
                handler = HANDLERS.get(event["type"])
            except KeyError:
                handler = _untyped_handler(event)
        except (ValueError, KeyError, TypeError):  # not JSON, or not an event
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
# §12 Image output
#
# Images out (issue #14).
#
#   request  image model             -> modalities ["image"] (image-only) | ["image", "text"],
#                                       image_config with only the values the model offers
#            chat model + Image toggle -> the openrouter:image_generation server tool
#                                       (IMAGE_TOOL_MODEL); nothing when that valve is empty
#            follow-up to an image     -> the last generated picture as input_image (§9 reads it)
#   stream   image items / events (§11) -> IMAGE intents carrying the item's own string
#            (base64, data URL or URL); partial images and status as their own intents
#   shell    ImageSink: one decode, one write to Open WebUI's file store (the user's file,
#            linked to the chat) -> a markdown image of /api/v1/files/<id>/content in the
#            answer. The base64 never enters the text stream or the stored message.
# ─────────────────────────────────────────────────────────────────────────────

IMAGE_ITEM_TYPES = frozenset({"image_generation_call", "openrouter:image_generation"})
IMAGE, IMAGE_PARTIAL, IMAGE_STATUS, IMAGE_FAILED = (
    "image", "image_partial", "image_status", "image_failed")
IMAGE_INTENTS = frozenset({IMAGE, IMAGE_PARTIAL, IMAGE_STATUS, IMAGE_FAILED})


def image_intent(state: StreamState, out: list[Intent], kind: str, value: str) -> None:
    """Every image intent leaves the reducer through here: the count tells the shell which
    batches hold one, so text batches skip the image step (§19 `_pump`)."""
    state.image_intents += 1
    out.append((kind, value))


IMAGE_TOOL = "openrouter:image_generation"
GENERATING_IMAGE = "Generating image…"
IMAGE_ALT = "Generated image"
MAX_EDIT_IMAGES = 4
# Where an item keeps its picture, in order of preference (SDK names, then camelCase wire
# names of the openrouter:image_generation item, then other documented shapes).
_IMAGE_KEYS = ("result", "imageB64", "image_b64", "imageUrl", "image_url", "b64_json", "url")
_HEAVY_KEYS = frozenset(_IMAGE_KEYS) | {"partial_image_b64"}
_GENERATED_LINK = re.compile(
    r"!\[[^\]\n]{0,200}\]\((/api/v1/files/[A-Za-z0-9][A-Za-z0-9_-]{0,127}/content)\)")
# Open WebUI's own image tools (0.12 adds them with the Image toggle when its image engine is
# on) and the note 0.6.28 adds after running its engine: OpenRouter's tool replaces both.
OWUI_IMAGE_TOOLS = frozenset({"generate_image", "edit_image"})
_OWUI_IMAGE_CONTEXT = re.compile(
    r"<context>(?:User is shown the generated image|Unable to generate an image)[^<]{0,200}"
    r"</context>")
_REFUSAL_CODES = {
    "image_content_policy_violation": "policy", "content_policy_violation": "policy",
    "bio_policy": "policy", "cyber_policy": "policy", "refusal": "policy",
    "misalignment_policy_violation": "policy", "image_too_large": "size",
    "image_too_small": "size", "image_file_too_large": "size"}
_REFUSAL_WORDS = (("policy", "policy"), ("safety", "policy"), ("moderation", "policy"),
                  ("flagged", "policy"), ("aspect ratio", "size"), ("too large", "size"),
                  ("size", "size"))


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """Image valves resolved for one request (built by `image_settings`)."""

    aspect_ratio: str = ""
    size: str = ""
    tool_model: str = ""
    max_bytes: int = 20 * MB
    edit_follow_ups: bool = True


# The final `response.completed` event repeats the whole output, pictures included (base64:
# 4/3 of the bytes), on one stream line: the decoder's cap grows with the image limit.
IMAGES_PER_TURN = 4  # pictures one answer may carry before its final line is too long


def stream_line_cap(max_image_bytes: int) -> int:
    """The SSE line cap for a turn whose pictures may each reach `max_image_bytes`: room for
    IMAGES_PER_TURN base64 pictures plus 1 MB of text, never below SSE_MAX_LINE_BYTES."""
    per_picture = -(-max_image_bytes * 4 // 3)  # ceil
    return max(SSE_MAX_LINE_BYTES, per_picture * IMAGES_PER_TURN + MB)


def image_settings(valves: Valves, user: UserValves) -> ImageSettings:
    return ImageSettings(
        aspect_ratio=str(_pick(user.IMAGE_ASPECT_RATIO, valves.IMAGE_ASPECT_RATIO)).strip(),
        size=str(_pick(user.IMAGE_SIZE, valves.IMAGE_SIZE)).strip(),
        tool_model=valves.IMAGE_TOOL_MODEL.strip(),
        max_bytes=int(valves.IMAGE_MAX_MB * MB), edit_follow_ups=valves.IMAGE_EDIT_FOLLOW_UPS)


# -- pure core: what to ask for ------------------------------------------------------------


def makes_images(entry: CatalogEntry) -> bool:
    return "image" in entry.output_modalities


def image_modalities(entry: CatalogEntry) -> list[str] | None:
    """`["image"]` for image-only models (they reject "text"), `["image", "text"]` for
    models that answer with both, None for models that can't output pictures."""
    if not makes_images(entry):
        return None
    return ["image", "text"] if "text" in entry.output_modalities else ["image"]


def can_output_images(entry: CatalogEntry, settings: RequestSettings | ImageSettings) -> bool:
    """Whether a chat with this model can end with a picture: the model makes images, or it
    can call tools and IMAGE_TOOL_MODEL names the image model of OpenRouter's image tool.
    (Model records use it for Open WebUI's `image_generation` capability.)"""
    images = settings.images if isinstance(settings, RequestSettings) else settings
    return makes_images(entry) or bool(images.tool_model and entry.supports_tools)


ImageOptions = Mapping[str, tuple[str, ...]]  # request parameter -> values a model offers


def parse_image_models(payload: Any) -> dict[str, dict[str, tuple[str, ...]]]:
    """`GET /images/models` -> {model id: {parameter: offered values}} (enum descriptors)."""
    rows = payload.get("data") if isinstance(payload, Mapping) else None
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for row in rows if isinstance(rows, list) else ():
        if not isinstance(row, Mapping) or not isinstance(row.get("id"), str):
            continue
        params = row.get("supported_parameters")
        out[row["id"]] = {
            str(name): tuple(str(v) for v in desc["values"])
            for name, desc in (params.items() if isinstance(params, Mapping) else ())
            if isinstance(desc, Mapping) and desc.get("type") == "enum"
            and isinstance(desc.get("values"), list)}
    return out


_CONFIG_PARAMS = (("aspect_ratio", "aspect ratio", ("aspect_ratio",)),
                  ("image_size", "size", ("image_size", "resolution", "size")))


def image_config(settings: ImageSettings, options: ImageOptions | None
                 ) -> tuple[dict[str, str], list[str]]:
    """(`image_config`, notes): each wanted value only when the model's listing offers it
    (matched case-insensitively); unknown listings send nothing (the model's default)."""
    config: dict[str, str] = {}
    notes: list[str] = []
    wanted = {"aspect_ratio": settings.aspect_ratio, "image_size": settings.size}
    for key, label, names in _CONFIG_PARAMS:
        value = wanted[key]
        if not value:
            continue
        offered = next((options[n] for n in names if options and options.get(n)), None)
        match = next((v for v in offered or () if v.lower() == value.lower()), None)
        if match is not None:
            config[key] = match
        elif offered:
            notes.append(f"The image {label} {value} was not used: this model offers "
                         f"{', '.join(offered[:16])}.")
        else:
            LOG.info("Image %s %s not sent: the model's offered values are unknown", label,
                     value)
    return config, notes


def image_tool(settings: ImageSettings, options: ImageOptions | None
               ) -> tuple[dict[str, Any], list[str]]:
    """OpenRouter's image-generation server tool for IMAGE_TOOL_MODEL (SDK
    `ImageGenerationServerTool_OpenRouter`: image_config keys sit beside `model`)."""
    config, notes = image_config(settings, options)
    return {"type": IMAGE_TOOL, "parameters": {"model": settings.tool_model, **config}}, notes


def with_images(plan: Transformed, entry: CatalogEntry, settings: ImageSettings,
                features: Mapping[str, Any],
                options: Mapping[str, ImageOptions]) -> Transformed:
    """The request for pictures: modalities + image_config for image models; the image tool
    for a chat model when the user turned on Open WebUI's Image toggle."""
    payload, notes = dict(plan.payload), list(plan.notes)
    modalities = image_modalities(entry)
    if modalities is not None:
        payload["modalities"] = modalities
        config, more = image_config(settings, options.get(entry.id))
        if config:
            payload["image_config"] = config
        notes.extend(more)
    elif features.get("image_generation"):
        if settings.tool_model and entry.supports_tools:
            tool, more = image_tool(settings, options.get(settings.tool_model))
            payload["tools"] = [*(t for t in payload.get("tools") or ()
                                  if t.get("name") not in OWUI_IMAGE_TOOLS), tool]
            if payload.get("instructions"):
                payload["instructions"] = _OWUI_IMAGE_CONTEXT.sub(
                    "", payload["instructions"]).strip()
            notes.extend(more)
        else:
            notes.append("This model can't make pictures and no image model is set up for "
                         "Open WebUI's Image button (IMAGE_TOOL_MODEL), so it answers in text.")
    return dataclasses.replace(plan, payload=payload, notes=tuple(notes))


def generated_image_links(text: str) -> list[str]:
    """The Open WebUI file links of the pictures the pipe put into an answer."""
    return _GENERATED_LINK.findall(text) if "![" in text else []


def with_previous_images(req: ChatRequest, entry: CatalogEntry, settings: ImageSettings
                         ) -> ChatRequest:
    """A follow-up to a picture ("make the sky purple"): the pictures of the latest answer
    that has any ride along on the last user message, for image models that read images
    (and only when that message brings no picture of its own). §9 then reads each file
    under the user's access rules; other models keep only the short link text."""
    if not (settings.edit_follow_ups and makes_images(entry) and entry.accepts("image")):
        return req
    last = next((i for i in range(len(req.messages) - 1, -1, -1)
                 if req.messages[i].role == "user"), None)
    if last is None or any(isinstance(p, ImagePart) for p in req.messages[last].parts):
        return req
    links = next((found for m in reversed(req.messages[:last]) if m.role == "assistant"
                  for found in (generated_image_links(m.text),) if found), [])
    if not links:
        return req
    msg = req.messages[last]
    parts = (*msg.parts, *(ImagePart(url) for url in links[-MAX_EDIT_IMAGES:]))
    return dataclasses.replace(req, messages=(
        *req.messages[:last], dataclasses.replace(msg, parts=parts), *req.messages[last + 1:]))


# -- pure core: what came back --------------------------------------------------------------


def item_image(item: Mapping[str, Any]) -> str | None:
    """The picture an output item carries: base64, a data URL or a URL (any documented key)."""
    for key in _IMAGE_KEYS:
        value = item.get(key)
        if isinstance(value, Mapping):
            value = value.get("url")
        if isinstance(value, str) and value:
            return value
    return None


def light_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """The item without its picture: what the stream state keeps (never megabytes)."""
    return {k: v for k, v in item.items() if k not in _HEAVY_KEYS}


def refusal_reason(code: str, message: str) -> str:
    """`policy`, `size` or `other`, from an error code (SDK names) or its wording."""
    if code in _REFUSAL_CODES:
        return _REFUSAL_CODES[code]
    text = message.lower()
    return next((reason for word, reason in _REFUSAL_WORDS if word in text), "other")


def stream_failure(message: str, code: str, error_type: str,
                   availability: Any = None, model: str = "") -> UpstreamStreamError:
    """A failed response: an image refusal when the code is one of the SDK's image codes
    (`image_content_policy_violation`, `image_too_large`…); anything else as it was, with
    OpenRouter's `availability` object when it sent one (a provider lost mid-stream)."""
    if code.startswith("image_") and code in _REFUSAL_CODES:
        return ImageRefused(message, reason=_REFUSAL_CODES[code], code=code,
                            error_type=error_type)
    return UpstreamStreamError(message, code=code, error_type=error_type, model=model,
                               availability=dict(availability)
                               if isinstance(availability, Mapping) else None)


def item_failure(item: Mapping[str, Any]) -> str | None:
    """`reason:message` for a failed image item (its `error`), else None."""
    err = item.get("error")
    if item.get("status") != "failed" and not err:
        return None
    if isinstance(err, Mapping):
        code, message = str(err.get("code") or ""), str(err.get("message") or "")
    else:
        code, message = "", str(err or "")
    message = message or "the image model returned no picture"
    return f"{refusal_reason(code, message)}:{message}"


def refusal_text(reason: str, message: str) -> str:
    """The sentence a user reads when a picture was refused."""
    detail = message.strip().rstrip(".")
    if reason == "policy":
        return (f"The image request was refused under the provider's content policy "
                f"({detail}). Rephrase the request and try again.")
    if reason == "size":
        return (f"The image was refused for its size ({detail}). For a new picture choose "
                "another size or aspect ratio (IMAGE_SIZE / IMAGE_ASPECT_RATIO in your "
                "valves); for an attached one send a smaller image.")
    return f"The picture was not made: {detail}."


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A picture as bytes, or (`url`) a remote picture still to download."""

    data: bytes = b""
    mime: str = ""
    url: str = ""


def decode_image(source: str, cap: int) -> DecodedImage:
    """Base64, data URL or http(s) URL -> bytes decoded exactly once (size checked on the
    encoded length first), or the URL. IntakeError/PayloadTooLargeError when unusable."""
    if source.startswith(("https://", "http://")):
        return DecodedImage(url=source)
    if source.startswith("data:"):
        parsed = parse_data_url(source, "image", cap)
        data = (binascii.a2b_base64(parsed.payload) if parsed.is_base64
                else urllib.parse.unquote_to_bytes(parsed.payload))
    else:
        check_payload_size(source, 0, True, "image", cap)
        try:
            data = binascii.a2b_base64(source)
        except (binascii.Error, ValueError) as exc:
            raise IntakeError("The picture's base64 is not valid.") from exc
    check_size("image", len(data), cap)
    return DecodedImage(data, _picture_mime(data))


def _picture_mime(data: bytes) -> str:
    mime = sniff_mime(data[:48])
    if mime not in IMAGE_MIMES:
        raise IntakeError("The model sent something that is not a PNG, JPEG, WebP or GIF "
                          "picture.")
    return mime


def preview_url(partial_b64: str) -> str | None:
    """A partial image as a data URL for a live preview, or None when it isn't a picture."""
    head = partial_b64[:64]
    try:
        mime = sniff_mime(binascii.a2b_base64(head[: len(head) - len(head) % 4]))
    except (binascii.Error, ValueError):
        return None
    return f"data:{mime};base64,{partial_b64}" if mime in IMAGE_MIMES else None


def image_markdown(url: str, number: int) -> str:
    label = IMAGE_ALT if number == 1 else f"{IMAGE_ALT} {number}"
    return f"\n\n![{label}]({url})\n\n"


def image_status_segment(count: int, unit_price: float) -> str:
    """`2 images (list price $0.00003 per image unit)` for the final status line."""
    noun = "image" if count == 1 else "images"
    if unit_price <= 0:
        return f"{count} {noun}"
    return f"{count} {noun} (list price ${unit_price:.6f}".rstrip("0").rstrip(".") + \
        " per image unit)"


# -- the image item closing (§11's _on_item_done hands it here) ----------------------------


def on_image_item_done(state: StreamState, index: int, item: Mapping[str, Any],
                       out: list[Intent]) -> None:
    """An image item closed: its picture (or why there is none) becomes one intent; the
    state keeps the item without the picture."""
    state.done_items[index] = light_item(item)
    failure = item_failure(item)
    picture = None if failure else item_image(item)
    if failure is not None:
        image_intent(state, out, IMAGE_FAILED, failure)
    elif picture is not None:
        image_intent(state, out, IMAGE, picture)
    elif item.get("status") not in ("in_progress", "generating"):
        image_intent(state, out, IMAGE_FAILED, "other:the model's image item held no picture")


def late_images(state: StreamState, output: Any, out: list[Intent]) -> None:
    """Image items that only the final response object carries (no output_item.done for
    them): handled like closed items, each once."""
    for index, item in enumerate(output if isinstance(output, list) else ()):
        if (isinstance(item, Mapping) and item.get("type") in IMAGE_ITEM_TYPES
                and index not in state.done_items):
            on_image_item_done(state, index, item, out)


# -- I/O shell: saving pictures -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageJob:
    """Who a turn's pictures belong to and where they go."""

    user_id: str
    user_role: str
    chat_id: str
    message_id: str
    model: str
    max_bytes: int
    limits: IntakeLimits


class ImageSink:
    """One turn's pictures: a "Generating image…" status, partial previews that replace each
    other (`chat:message:files`), then each picture decoded once, written once to Open
    WebUI's storage as the user's file linked to the chat, and a markdown link in the text."""

    def __init__(self, job: ImageJob, emitter: Emitter, store: OwuiFileStore,
                 fetcher: Fetcher) -> None:
        self._job, self._emitter, self._store, self._fetcher = job, emitter, store, fetcher
        self.saved: list[str] = []  # file ids, in order
        self.unit_price = 0.0
        self._base_cap = stream_line_cap(job.max_bytes)
        self._streamed = 0  # characters of the pictures seen so far (the final event repeats
        self._generating = False  # them all on one line)
        self._previewing = False

    @property
    def line_cap(self) -> int:
        """The SSE line cap (§11) for the rest of the stream: room for the pictures already
        streamed (repeated by `response.completed`) plus IMAGES_PER_TURN more."""
        return self._base_cap + self._streamed

    async def resolve(self, intents: list[Intent]) -> list[Intent]:
        """Image intents -> side effects and text; every other intent passes unchanged. Each
        slot is cleared once used, so a picture's base64 is dropped right after its decode."""
        if not any(kind in IMAGE_INTENTS for kind, _ in intents):
            return intents
        out: list[Intent] = []
        for i in range(len(intents)):  # by index: each slot is cleared as it is used
            kind, value = intents[i]
            intents[i] = (kind, "")
            if kind == IMAGE:
                self._streamed += len(value)
                box = [value]
                del value  # the box holds the only reference; _save drops it after decoding
                out.append((TEXT, await self._save(box)))
            elif kind == IMAGE_STATUS:
                await self._status()
            elif kind == IMAGE_PARTIAL:
                await self._preview(value)
            elif kind == IMAGE_FAILED:
                reason, _, message = value.partition(":")
                refused = ImageRefused(message, reason=reason)
                await self._settle("No image was made")
                out.append((TEXT, f"\n\n⚠️ {describe_error(refused)}\n\n"))
            else:
                out.append((kind, value))
        return out

    async def _status(self) -> None:
        if not self._generating:
            self._generating = True
            await self._emitter.status(GENERATING_IMAGE, done=False)

    async def _settle(self, text: str) -> None:
        """Close the "Generating image…" status with what happened."""
        if self._generating:
            self._generating = False
            await self._emitter.status(text, done=True)

    async def _preview(self, partial: str) -> None:
        await self._status()
        url = preview_url(partial)
        if url is not None:
            self._previewing = True
            await self._emitter.emit({"type": "chat:message:files",
                                      "data": {"files": [{"type": "image", "url": url}]}})

    async def finish(self) -> None:
        """Remove the last partial preview (the saved picture is in the text now)."""
        if self._previewing:
            self._previewing = False
            await self._emitter.emit({"type": "chat:message:files", "data": {"files": []}})

    async def _save(self, box: list[str]) -> str:
        await self._status()
        try:
            picture = decode_image(box.pop(), self._job.max_bytes)  # the string dies here
            if picture.url:
                picture = await self._download(picture.url)
            file_id = await self._write(picture)
        except IntakeError as exc:
            LOG.warning("Generated image not saved: %s", exc)
            await self._settle("The image could not be saved")
            return f"\n\n⚠️ The picture could not be saved: {describe_error(exc)}\n\n"
        finally:
            await self.finish()
        self.saved.append(file_id)
        count = len(self.saved)
        await self._settle(f"Generated {count} image{'s' if count > 1 else ''}")
        return image_markdown(f"/api/v1/files/{file_id}/content", count)

    async def _download(self, url: str) -> DecodedImage:
        got = await self._fetcher.fetch(url, self._job.limits, self._job.max_bytes)
        return DecodedImage(got.data, _picture_mime(got.data))

    async def _write(self, picture: DecodedImage) -> str:
        job, file_id = self._job, str(uuid.uuid4())
        name = f"generated-image-{len(self.saved) + 1}" + (
            mimetypes.guess_extension(picture.mime) or ".png")
        await self._store.save(file_id, job.user_id, name, picture.mime, picture.data,
                               f"openrouter:{job.model}", link={
                                   "chat_id": job.chat_id, "message_id": job.message_id})
        await link_to_chat(job, file_id)
        LOG.info("Saved a generated image (%s) as file %s", megabytes(len(picture.data)),
                 file_id)
        return file_id


async def link_to_chat(job: ImageJob, file_id: str) -> None:
    """0.12+: Open WebUI's chat↔file link (what its own image generation writes). 0.6.28 has
    no such table; there the file's `meta.data` names the chat and message."""
    if not job.chat_id or not job.message_id or ":" in job.chat_id:
        return  # API calls without a chat, local/temporary chats
    try:
        chats = getattr(_owui_module("open_webui.models.chats"), "Chats", None)
        insert = getattr(chats, "insert_chat_files", None)
        if insert is not None:
            await _owui_call(insert, job.chat_id, job.message_id, [file_id], job.user_id)
    except asyncio.CancelledError:
        raise
    except Exception:  # the picture is saved and linked from the message either way
        LOG.warning("Could not link file %s to chat %s", file_id, job.chat_id, exc_info=True)


class ImageOptionsCache:
    """`GET /images/models` parsed, refreshed at the catalog's pace; {} while unknown."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._value: dict[str, dict[str, tuple[str, ...]]] = {}
        self._fetched_at: float | None = None

    async def get(self, fetch: Callable[[RequestSettings], Awaitable[Any]],
                  settings: RequestSettings) -> Mapping[str, ImageOptions]:
        now = self._clock()
        if self._fetched_at is not None and now - self._fetched_at < settings.catalog_ttl:
            return self._value
        self._fetched_at = now
        try:
            self._value = parse_image_models(await fetch(settings))
        except PipeError as exc:
            LOG.info("OpenRouter's image model list is unavailable: %s", exc)
        return self._value


# ─────────────────────────────────────────────────────────────────────────────
# §13 Tool executor
#
# Pure part: Open WebUI tools (`__tools__` and the built-in specs 0.11+ puts in `body["tools"]`)
# -> Responses `function` tools with provider-safe names (exact reverse map), strict schemas
# (cached by canonical JSON), remote MCP servers from a JSON valve, argument parsing, result
# shaping. I/O part: `ToolRunner` runs one round's calls in parallel, bounded per request and
# globally, each with a timeout; sync callables run in a thread; nothing is retried; a breaker
# per (user, tool name) keeps one flaky tool from costing the others.
# ─────────────────────────────────────────────────────────────────────────────

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # use with fullmatch ($ allows a "\n")
_TOOL_NAME_BAD = re.compile(r"[^a-zA-Z0-9_-]+")
_STRICT_UNSUPPORTED = frozenset({
    "allOf", "not", "if", "then", "else", "patternProperties", "dependentRequired",
    "dependentSchemas", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
    "prefixItems", "contains", "additionalItems", "$dynamicRef", "dependencies"})
_STRICT_DROPPED = frozenset({"default", "examples", "$schema", "$id", "$comment"})


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function tool as Open WebUI describes it (OpenAI function spec), parsed once."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """The tool valves of one request, resolved by `RequestSettings.merge`."""

    mode: str = "pipe"                      # pipe | open_webui
    max_rounds: int = 8
    timeout: float = 60.0
    per_request: int = 4
    global_limit: int = 32
    breaker_threshold: int = 5
    breaker_window: float = 60.0
    strict: bool = True
    result_max_chars: int = 50_000
    card_max_chars: int = 2_000
    web_search: str = "user_toggle"         # off | user_toggle | always
    web_search_max_results: int = 5
    mcp_servers_json: str = ""               # parsed per request by `with_tools`


def tool_settings(valves: Valves) -> ToolSettings:
    """The tool valves -> ToolSettings. Never raises: REMOTE_MCP_SERVERS_JSON stays raw, so
    a typo in it can't take down the model list or chats (see `request_mcp_tools`)."""
    return ToolSettings(
        mode=valves.TOOL_EXECUTION_MODE, max_rounds=valves.MAX_TOOL_ROUNDS,
        timeout=valves.TOOL_TIMEOUT_SECONDS, per_request=valves.MAX_PARALLEL_TOOLS_PER_REQUEST,
        global_limit=valves.MAX_PARALLEL_TOOLS_GLOBAL,
        breaker_threshold=valves.TOOL_BREAKER_THRESHOLD,
        breaker_window=valves.TOOL_BREAKER_WINDOW_SECONDS, strict=valves.STRICT_TOOL_SCHEMAS,
        result_max_chars=valves.TOOL_RESULT_MAX_CHARS, card_max_chars=valves.TOOL_CARD_MAX_CHARS,
        web_search=valves.WEB_SEARCH, web_search_max_results=valves.WEB_SEARCH_MAX_RESULTS,
        mcp_servers_json=_mcp_servers_plain(valves.REMOTE_MCP_SERVERS_JSON))


def _mcp_servers_plain(raw: str) -> str:
    """REMOTE_MCP_SERVERS_JSON decrypted (plaintext from older versions passes as is), its
    credentials registered for log redaction; "" (MCP off, logged) when it can't be read."""
    try:
        plain = EncryptedStr(raw or "").reveal("REMOTE_MCP_SERVERS_JSON")
    except ConfigError as exc:
        LOG.error("Remote MCP servers are off: %s", exc)
        return ""
    try:
        parsed = json.loads(plain) if plain.strip() else None
    except ValueError:
        return plain  # reported per request by `request_mcp_tools`
    for server in parsed if isinstance(parsed, list) else [parsed]:
        if isinstance(server, Mapping):
            headers = server.get("headers")
            values = [*(headers.values() if isinstance(headers, Mapping) else ()),
                      server.get("authorization")]
            for value in values:
                if isinstance(value, str):
                    register_secret(value)
                    register_secret(value.removeprefix("Bearer ").strip())
    return plain


def parse_tool_spec(raw: Any) -> ToolSpec | None:
    """`{"type":"function","function":{…}}` or a bare `{name, description, parameters}`."""
    if not isinstance(raw, Mapping):
        return None
    inner = raw.get("function")
    spec: Mapping[str, Any] = inner if isinstance(inner, Mapping) else raw
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        return None
    params = spec.get("parameters")
    return ToolSpec(name, str(spec.get("description") or ""),
                    params if isinstance(params, Mapping) else None)


def parse_body_tools(raw: Any) -> tuple[ToolSpec, ...]:
    """`body["tools"]` (chat-completions style) -> specs; entries of other shapes are skipped."""
    if not isinstance(raw, list):
        return ()
    return tuple(spec for spec in map(parse_tool_spec, raw) if spec is not None)


def _safe_base(name: str) -> str:
    return (_TOOL_NAME_BAD.sub("_", name).strip("_") or "tool")[:64]


def assign_tool_names(names: Iterable[str]) -> dict[str, str]:
    """Original names -> provider-safe unique names, independent of input order.

    Valid names keep their spelling; the others are sanitised (`[^a-zA-Z0-9_-]` -> `_`, at
    most 64 chars), and a clash gets the smallest free suffix `_2`, `_3`, … (sorted order).
    """
    unique = sorted(set(names))
    taken: set[str] = {n for n in unique if TOOL_NAME.fullmatch(n)}
    mapping = {n: n for n in taken}
    for name in (n for n in unique if n not in mapping):
        base, k, candidate = _safe_base(name), 1, _safe_base(name)
        while candidate in taken:
            k += 1
            suffix = f"_{k}"
            candidate = base[:64 - len(suffix)] + suffix
        taken.add(candidate)
        mapping[name] = candidate
    return mapping


# -- strict schemas ----------------------------------------------------------------------


class _NotStrictifiable(Exception):
    """Internal: the schema uses something OpenAI's strict mode can't express."""


def strictify(schema: Mapping[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """(schema, strict): a strict-mode version of a tool's parameters, or the original.

    Every object gets `additionalProperties: false` and all its properties required; a
    property that was optional becomes nullable. `$defs`/`definitions` are strictified, local
    `$ref`s kept, `oneOf` becomes `anyOf`, `default`/`examples` are dropped. A schema strict
    mode can't express (free-form objects, `allOf`, tuple arrays, remote refs…) comes back
    unchanged with `strict=False`. Results are cached by canonical JSON.
    """
    if schema is None:  # a tool without parameters takes no arguments
        schema = {"type": "object", "properties": {}, "additionalProperties": False}
    try:
        key = json.dumps(schema, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return dict(schema), False
    text, strict = _strictify_cached(key)
    return json.loads(text), strict


_STRICT_CACHE: dict[str, tuple[str, bool]] = {}


def _strictify_cached(key: str) -> tuple[str, bool]:
    hit = _STRICT_CACHE.get(key)
    if hit is None:
        if len(_STRICT_CACHE) >= 512:
            _STRICT_CACHE.clear()
        hit = _STRICT_CACHE[key] = _strictify_json(key)
    return hit


def _strictify_json(key: str) -> tuple[str, bool]:
    original = json.loads(key)
    try:
        if not isinstance(original, dict) or not _is_object(original):
            raise _NotStrictifiable("root is not an object")
        result = _strict_node(original, root=True)
    except _NotStrictifiable as exc:
        LOG.debug("Tool schema sent non-strict: %s", exc)
        return key, False
    return json.dumps(result, ensure_ascii=False), True


def _is_object(node: Mapping[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or (
        kind is None and "properties" in node)


def _strict_node(node: Any, root: bool = False) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise _NotStrictifiable(f"schema node {node!r}")
    bad = _STRICT_UNSUPPORTED & node.keys()
    if bad:
        raise _NotStrictifiable(f"unsupported keyword(s) {sorted(bad)}")
    out = {k: v for k, v in node.items() if k not in _STRICT_DROPPED}
    for defs in ("$defs", "definitions"):
        if defs in out:
            if not root or not isinstance(out[defs], dict):
                raise _NotStrictifiable(f"nested {defs}")
            out[defs] = {k: _strict_node(v) for k, v in out[defs].items()}
    if "$ref" in out:
        return _strict_ref(out)
    if "oneOf" in out:
        out["anyOf"] = out.pop("oneOf")
    if "anyOf" in out:
        if not isinstance(out["anyOf"], list) or not out["anyOf"] or root:
            raise _NotStrictifiable("anyOf at the root or empty")
        out["anyOf"] = [_strict_node(branch) for branch in out["anyOf"]]
        return out
    if _is_object(out):
        return _strict_object(out)
    if "enum" in out or "const" in out or isinstance(out.get("type"), str | list):
        return _strict_leaf(out)
    raise _NotStrictifiable("a node without a type")


def _strict_ref(node: dict[str, Any]) -> dict[str, Any]:
    ref = node["$ref"]
    if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/", "#")):
        raise _NotStrictifiable(f"non-local $ref {ref!r}")
    if set(node) - {"$ref", "description", "title"}:
        raise _NotStrictifiable("$ref with sibling keywords")
    return node


def _strict_object(node: dict[str, Any]) -> dict[str, Any]:
    """An object: all properties required, optional ones nullable, no extra keys.

    Without declared properties the object is free-form (JSON Schema allows any keys) unless
    `additionalProperties` is explicitly false, so it can't be made strict. With declared
    properties an absent `additionalProperties` becomes false, as OpenAI's own SDK strictifier
    does: the declared keys are what the tool reads.
    """
    props = node.get("properties") or {}
    extra = node.get("additionalProperties")
    if not isinstance(props, dict) or extra not in (False, None) or (
            not props and extra is not False):
        raise _NotStrictifiable("a free-form object (additionalProperties)")
    required = node.get("required") or []
    if not isinstance(required, list):
        raise _NotStrictifiable("required is not a list")
    strict_props = {}
    for name, sub in props.items():
        strict_sub = _strict_node(sub)
        strict_props[name] = strict_sub if name in required else _nullable(strict_sub)
    node.setdefault("type", "object")  # a list such as ["object", "null"] stays as it is
    node.update(properties=strict_props, required=list(props), additionalProperties=False)
    return node


def _strict_leaf(node: dict[str, Any]) -> dict[str, Any]:
    kind = node.get("type")
    if kind == "array" or (isinstance(kind, list) and "array" in kind):
        items = node.get("items")
        if not isinstance(items, dict):
            raise _NotStrictifiable("array without a single items schema")
        node["items"] = _strict_node(items)
    return node


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    """An optional property: also accept null (the runner drops nulls the model sends)."""
    kind = node.get("type")
    if isinstance(kind, str) and "enum" not in node and "const" not in node:
        return {**node, "type": [kind, "null"]} if kind != "null" else node
    if isinstance(kind, list) and "enum" not in node and "const" not in node:
        return node if "null" in kind else {**node, "type": [*kind, "null"]}
    if "anyOf" in node:
        branches = node["anyOf"]
        if any(b.get("type") == "null" for b in branches):
            return node
        return {**node, "anyOf": [*branches, {"type": "null"}]}
    return {"anyOf": [node, {"type": "null"}]}


# -- tool set for one request ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolEntry:
    """A tool as the model sees it (`wire_name`) and as Open WebUI runs it (`spec.name`)."""

    wire_name: str
    spec: ToolSpec
    callable: Callable[..., Any] | None


@dataclass(frozen=True, slots=True)
class ToolSet:
    """The function tools of one request, with the wire-name -> tool map for calls."""

    entries: tuple[ToolEntry, ...] = ()
    wire: tuple[Mapping[str, Any], ...] = ()   # Responses `tools` entries, in order

    def find(self, wire_name: str) -> ToolEntry | None:
        return next((e for e in self.entries if e.wire_name == wire_name), None)

    def display_name(self, wire_name: str) -> str:
        entry = self.find(wire_name)
        return entry.spec.name if entry else wire_name

    def __bool__(self) -> bool:
        return bool(self.wire)


def tool_set(owui_tools: Mapping[str, Any], body_tools: Iterable[ToolSpec], *,
             strict: bool, runnable_only: bool) -> ToolSet:
    """`__tools__` + `body["tools"]` -> the request's function tools.

    A name in both keeps the `__tools__` entry (it has the callable). With `runnable_only`
    (the pipe runs tools) specs without a callable are left out: nothing could run them.
    """
    found: dict[str, tuple[ToolSpec, Callable[..., Any] | None]] = {}
    for spec in body_tools:
        found.setdefault(spec.name, (spec, None))
    for name, raw in owui_tools.items():
        if not isinstance(raw, Mapping):
            continue
        spec = parse_tool_spec(raw.get("spec")) or ToolSpec(str(name))
        fn = raw.get("callable")
        found[spec.name] = (spec, fn if callable(fn) else None)
    if runnable_only:
        found = {k: v for k, v in found.items() if v[1] is not None}
    names = assign_tool_names(found)
    entries, wire = [], []
    for name in sorted(found):
        spec, fn = found[name]
        params, is_strict = strictify(spec.parameters) if strict else (
            dict(spec.parameters or {"type": "object", "properties": {}}), False)
        entries.append(ToolEntry(names[name], spec, fn))
        wire.append({"type": "function", "name": names[name],
                     "description": spec.description or spec.name,
                     "parameters": params, "strict": is_strict})
    return ToolSet(tuple(entries), tuple(wire))


# -- remote MCP servers ------------------------------------------------------------------

_MCP_KEYS = ("server_label", "server_url", "server_description", "require_approval",
             "allowed_tools", "headers", "authorization")
_MCP_LABEL = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def parse_mcp_servers(raw: str) -> tuple[dict[str, Any], ...]:
    """REMOTE_MCP_SERVERS_JSON (one object or a list) -> Responses `mcp` tools, every server.

    Raises ConfigError naming the server and the problem; unknown keys are an error too, so a
    typo never silently drops a setting.
    """
    if not raw.strip():
        return ()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _mcp_error(f"is not valid JSON ({exc})") from None
    servers = data if isinstance(data, list) else [data]
    tools = tuple(_mcp_tool(i, s) for i, s in enumerate(servers, 1))
    labels = [t["server_label"] for t in tools]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise _mcp_error(f"uses the server_label {dupes[0]!r} twice; labels must be unique")
    return tools


def _mcp_tool(position: int, server: Any) -> dict[str, Any]:
    where = f"server #{position}"
    if not isinstance(server, Mapping):
        raise _mcp_error(f"{where} is not an object")
    unknown = sorted(set(server) - {*_MCP_KEYS, "type"})
    if unknown:
        raise _mcp_error(f"{where} has unknown key(s) {unknown}; allowed: {', '.join(_MCP_KEYS)}")
    label, url = server.get("server_label"), server.get("server_url")
    if not isinstance(label, str) or not _MCP_LABEL.fullmatch(label):
        raise _mcp_error(f"{where} needs a server_label of letters, digits, _ or - (≤64)")
    if not isinstance(url, str) or not re.match(r"^(https?|wss?)://[^/\s:]+", url):
        raise _mcp_error(f"{where} ({label}) needs a server_url starting with https:// "
                         "(or http://, ws://, wss://) and a host")
    headers = server.get("headers")
    if headers is not None and not (isinstance(headers, Mapping) and all(
            isinstance(v, str) for v in headers.values())):
        raise _mcp_error(f"{where} ({label}): headers must map names to strings")
    return {"type": "mcp", **{k: server[k] for k in _MCP_KEYS if server.get(k) is not None}}


def _mcp_error(problem: str) -> ConfigError:
    return ConfigError(f"The REMOTE_MCP_SERVERS_JSON valve {problem}.",
                       hint="An admin must fix it in the pipe's valves.")


# -- calls, arguments, results -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A `function_call` output item the model produced."""

    call_id: str
    name: str          # the wire name
    arguments: str

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> FunctionCall:
        return cls(str(item.get("call_id") or item.get("id") or ""), str(item.get("name") or ""),
                   str(item.get("arguments") or ""))


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """One call's result: `output` goes to the model, `shown` into the tool card."""

    call: FunctionCall
    tool_name: str
    output: str
    ok: bool

    def item(self) -> dict[str, Any]:
        """The `function_call_output` input item (only the fields OpenRouter accepts)."""
        return {"type": "function_call_output", "call_id": self.call.call_id,
                "output": self.output}


def parse_arguments(raw: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model's argument string -> kwargs. Never guesses: bad JSON raises BadToolArguments.

    `schema` is the tool's ORIGINAL parameters schema. Only the top-level names it declares
    in `properties` reach the tool (as Open WebUI's own middleware does): no schema or no
    properties means no arguments. A name shaped like a reserved argument (`__user__`,
    `__event_emitter__`, any `__x__`) never passes, whatever the schema says: Open WebUI
    binds those to the real user, and a model-sent value would override the binding.
    Nulls for properties it had optional and not nullable (strict mode made them nullable),
    at any depth, are dropped so the tool's own defaults apply.
    """
    try:
        args = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise BadToolArguments(f"The arguments were not valid JSON ({exc}).",
                               hint="Call the tool again with a JSON object.") from None
    if not isinstance(args, dict):
        raise BadToolArguments(f"The arguments must be a JSON object, not {type(args).__name__}.",
                               hint="Call the tool again with a JSON object.")
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(schema, Mapping) or not isinstance(props, Mapping):
        return {}
    args = {k: v for k, v in args.items() if k in props and not is_reserved_argument(k)}
    return drop_optional_nulls(args, schema, schema)


def is_reserved_argument(name: str) -> bool:
    """Open WebUI's injected parameters (`__user__`, `__request__`, …): never from a model.
    Like Open WebUI's own spec cleanup, any name starting with `__` counts."""
    return name.startswith("__")


def tool_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """The last gate before a tool runs: reserved names are dropped whatever produced them."""
    return {k: v for k, v in args.items() if isinstance(k, str) and not is_reserved_argument(k)}


def drop_optional_nulls(value: Any, schema: Any, root: Mapping[str, Any], depth: int = 0
                        ) -> Any:
    """`value` without the nulls the original `schema` did not allow for optional properties
    (walked alongside: properties, items, anyOf/oneOf, local `$ref`s into `root`)."""
    node = _resolve_ref(schema, root)
    if depth > 32 or not isinstance(node, Mapping):
        return value
    if isinstance(value, list):
        items = node.get("items")
        return [drop_optional_nulls(v, items, root, depth + 1) for v in value] \
            if isinstance(items, Mapping) else value
    if not isinstance(value, dict):
        return value
    branch = _object_branch(node, root)
    props = branch.get("properties") if branch is not None else None
    if not isinstance(props, Mapping):
        return value
    required = branch.get("required") if branch is not None else None
    required = required if isinstance(required, list) else []
    return {k: drop_optional_nulls(v, props.get(k), root, depth + 1) for k, v in value.items()
            if not (v is None and k in props and k not in required
                    and not _allows_null(props[k], root))}


def _resolve_ref(node: Any, root: Mapping[str, Any]) -> Any:
    """A local `$ref` (`#/$defs/X`, `#/definitions/X`, `#`) -> its target (once)."""
    ref = node.get("$ref") if isinstance(node, Mapping) else None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return node
    target: Any = root
    for part in (p for p in ref[1:].split("/") if p):
        target = target.get(part) if isinstance(target, Mapping) else None
    return target if isinstance(target, Mapping) else node


def _object_branch(node: Mapping[str, Any], root: Mapping[str, Any]
                   ) -> Mapping[str, Any] | None:
    """The object schema an object value follows: the node, or its one object branch."""
    if "properties" in node:
        return node
    branches = node.get("anyOf") or node.get("oneOf")
    if not isinstance(branches, list):
        return None
    objects = [b for b in (_resolve_ref(b, root) for b in branches)
               if isinstance(b, Mapping) and "properties" in b]
    return objects[0] if len(objects) == 1 else None


def _allows_null(node: Any, root: Mapping[str, Any], depth: int = 0) -> bool:
    """Whether a schema accepts null; odd or self-referencing schemas answer True (keep it)."""
    node = _resolve_ref(node, root)
    if depth > 32 or not isinstance(node, Mapping):
        return True  # unknown shape (or a $ref cycle): keep the null as the model sent it
    kind = node.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    if not ({"type", "enum", "const", "anyOf", "oneOf", "properties", "items"} & node.keys()):
        return True  # an unconstrained schema ({} or only a description) accepts null
    enum = node.get("enum")
    if (isinstance(enum, list) and None in enum) or ("const" in node and node["const"] is None):
        return True
    branches = [b for key in ("anyOf", "oneOf") if isinstance(node.get(key), list)
                for b in node[key]]
    return any(_allows_null(b, root, depth + 1) for b in branches)


def result_text(value: Any) -> str:
    """What a tool returned -> the text the model reads."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, Mapping | list | tuple | int | float | bool):
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    elif isinstance(getattr(value, "body", None), bytes):  # a Response object (HTMLResponse…)
        text = value.body.decode("utf-8", "replace")
    else:
        text = str(value)
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n…[truncated: {len(text) - limit:,} more characters]"


def failure_output(tool: str, exc: ToolError) -> str:
    """The output the model gets for a failed call: what failed and what it may do."""
    return f"Error: the tool `{tool}` failed: {describe_error(exc)}"


# -- the runner (I/O) --------------------------------------------------------------------


class ConcurrencyLimiter:
    """A counting gate whose limit is read per call (valves may change between requests)."""

    def __init__(self) -> None:
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, limit: int) -> None:
        while self.active >= max(limit, 1):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake_next()  # woken, then cancelled: pass the free slot on
                raise
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


@dataclass(slots=True)
class _BreakerState:
    failures: deque[float] = field(default_factory=deque)
    opened_at: float | None = None
    half_open: bool = False     # the pause is over; the next outcome decides


class ToolBreakers:
    """Per (user id, tool name): `threshold` failures within `window` seconds open the
    breaker, pausing the tool for `window` seconds. Then it is half-open: calls are allowed,
    one failure opens it again at once, a success closes it. Other tools and other users
    are unaffected."""

    MAX_KEYS = 10_000

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._states: dict[tuple[str, str], _BreakerState] = {}

    def check(self, key: tuple[str, str], threshold: int, window: float) -> None:
        state = self._states.get(key)
        if state is None or state.opened_at is None:
            return
        if self._clock() - state.opened_at >= window:
            state.opened_at, state.half_open = None, True  # the next outcome decides
            return
        raise ToolBreakerOpen(
            f"It failed {threshold} times in a row recently and is paused for "
            f"{window:.0f} seconds.", hint="Answer without it for now.")

    def record(self, key: tuple[str, str], ok: bool, threshold: int, window: float) -> None:
        if ok:
            self._states.pop(key, None)
            return
        if len(self._states) >= self.MAX_KEYS and key not in self._states:
            self._prune(window)
        state = self._states.setdefault(key, _BreakerState())
        now = self._clock()
        state.failures.append(now)
        while state.failures and now - state.failures[0] > window:
            state.failures.popleft()
        if state.half_open or len(state.failures) >= threshold:
            state.opened_at, state.half_open = now, False

    def _prune(self, window: float) -> None:
        now = self._clock()
        for key, state in list(self._states.items()):
            if state.opened_at is None and not state.half_open and (
                    not state.failures or now - state.failures[-1] > window):
                del self._states[key]

    def snapshot(self) -> dict[str, Any]:
        """For the health report: every tool with recent failures, and whether it is open."""
        return {f"{user}/{tool}": {"failures": len(s.failures), "open": s.opened_at is not None}
                for (user, tool), s in sorted(self._states.items())}


TOOL_THREADS = 32  # threads of the pipe's own executor for sync tools


class ToolRunner:
    """Runs one round of function calls. Lives on the shared Pipe (global limit, breakers).

    Sync tools run on the pipe's own bounded thread pool, never on the event loop's default
    executor: a call that times out keeps its thread until the tool returns (threads can't
    be killed), and must not delay every other `to_thread` user of Open WebUI. When all
    threads are held by such calls, sync tools fail at once with a specific message."""

    def __init__(self, clock: Callable[[], float], *, threads: int = TOOL_THREADS) -> None:
        import concurrent.futures

        self.limiter = ConcurrencyLimiter()
        self.breakers = ToolBreakers(clock)
        self.threads = threads
        self.stuck = 0  # threads still running a call that already timed out
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="orp-tool")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run_round(self, calls: Iterable[FunctionCall], tools: ToolSet,
                        settings: ToolSettings, user_id: str) -> list[ToolOutcome]:
        """Every call of a round, in parallel (bounded); outcomes in the calls' order."""
        per_request = asyncio.Semaphore(max(settings.per_request, 1))

        async def one(call: FunctionCall) -> ToolOutcome:
            async with per_request:
                return await self.run_call(call, tools, settings, user_id)

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def run_call(self, call: FunctionCall, tools: ToolSet, settings: ToolSettings,
                       user_id: str) -> ToolOutcome:
        """One call -> its outcome. Tool failures become outputs; CancelledError propagates."""
        entry = tools.find(call.name)
        if entry is None or entry.callable is None:
            known = ", ".join(e.wire_name for e in tools.entries) or "none"
            return ToolOutcome(call, call.name, f"Error: there is no tool named `{call.name}`. "
                               f"Available tools: {known}.", ok=False)
        name = entry.spec.name
        try:
            args = parse_arguments(call.arguments, entry.spec.parameters)
        except BadToolArguments as exc:
            return ToolOutcome(call, name, failure_output(name, exc), ok=False)
        key = (user_id, name)
        try:
            self.breakers.check(key, settings.breaker_threshold, settings.breaker_window)
        except ToolBreakerOpen as exc:
            return ToolOutcome(call, name, failure_output(name, exc), ok=False)
        await self.limiter.acquire(settings.global_limit)
        try:
            text = await self._invoke(entry.callable, tool_kwargs(args), settings.timeout)
        except ToolError as exc:
            self.breakers.record(key, False, settings.breaker_threshold, settings.breaker_window)
            LOG.warning("Tool %s failed: %s", name, exc)
            return ToolOutcome(call, name, failure_output(name, exc), ok=False)
        finally:
            self.limiter.release()
        self.breakers.record(key, True, settings.breaker_threshold, settings.breaker_window)
        return ToolOutcome(call, name, truncate(text, settings.result_max_chars), ok=True)

    async def _invoke(self, fn: Callable[..., Any], args: dict[str, Any], seconds: float
                      ) -> str:
        """Call once (never retried: tools may have side effects) under the timeout."""
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                if _is_async_callable(fn):
                    value = await fn(**args)
                else:
                    value = await self._in_thread(fn, args)
                while asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                    value = await value
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the tool is third-party code: any failure is reported
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise ToolTimeout(f"It did not finish within {seconds:g} seconds.",
                                  hint="It may still be running; don't assume it had no "
                                       "effect.") from None
            raise ToolError(f"{type(exc).__name__}: {_exc_text(exc)}"[:2000]) from exc
        return result_text(value)

    async def _in_thread(self, fn: Callable[..., Any], args: dict[str, Any]) -> Any:
        """A sync tool on the pipe's own pool (with the caller's context variables)."""
        if self.stuck >= self.threads:
            raise ToolError(f"Every one of the pipe's {self.threads} tool threads is still "
                            "busy with an earlier call that timed out.",
                            hint="An admin should check the slow tool; retry later.")
        ctx = contextvars.copy_context()
        future = self.executor.submit(ctx.run, lambda: fn(**args))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # timed out or cancelled: the thread runs on
            if not future.cancel():
                self.stuck += 1
                loop = asyncio.get_running_loop()
                future.add_done_callback(lambda _: self._unstuck(loop))
            raise

    def _unstuck(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the tool's thread when a timed-out call finally returns: count it on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(self._one_less_stuck)

    def _one_less_stuck(self) -> None:
        self.stuck -= 1


# -- tool cards in replayed history ------------------------------------------------------

_CARD_OPENER = re.compile(r'<details type="tool_calls"')
_CARD_CLOSER = re.compile(r"</details>\n?")
_CARD_ATTR = re.compile(r'(?<!\w)(\w+)="([^"\n]*)"')  # (?<!\w): linear on long words


def tool_cards_as_text(text: str) -> str:
    """Tool cards in an earlier assistant message -> a line the model can read (the card's
    attributes are html-escaped JSON, as Open WebUI writes them)."""
    if '<details type="tool_calls"' not in text:
        return text
    return replace_blocks(text, _CARD_OPENER, _CARD_CLOSER, lambda tag, block: _card_line(tag),
                          lambda tag, nxt: nxt == "\n")


def _card_line(tag: str) -> str:
    attrs = {k: html.unescape(v) for k, v in _CARD_ATTR.findall(tag)}

    def decoded(key: str) -> str:
        try:
            value = json.loads(attrs.get(key) or '""')
        except ValueError:
            return attrs.get(key, "")
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return (f"[Tool call {attrs.get('name', '?')}({decoded('arguments')}) returned: "
            f"{decoded('result')}]\n")


# -- the loop's pure steps ---------------------------------------------------------------

# Open WebUI's prompt-based function calling (the 0.6-0.8 default) first asks the model, as
# task "function_calling", which tools to run, then runs them itself. When the pipe runs tools,
# that would run them twice and cost a request: the pipe answers "none" without calling out.
PROMPT_TOOL_TASK = "function_calling"
NO_PROMPT_TOOL_CALLS = '{"tool_calls": []}'

FINAL_ANSWER_INSTRUCTION = (
    "The tool-call limit for this answer has been reached. Do not call any more tools: "
    "answer the user now with the results you already have, and say what is still missing.")


# Open WebUI 0.12's own web tools (added to `__tools__`/`body["tools"]` with the chat's Web
# Search toggle); left out when the pipe attaches OpenRouter's search, so one engine answers.
OWUI_WEB_TOOLS = frozenset({"search_web", "fetch_url"})


def builtin_tool_names(owui_tools: Mapping[str, Any]) -> frozenset[str]:
    """Names of Open WebUI's built-in tools (0.12+: `"type": "builtin"`, `builtin:` ids)."""
    names: set[str] = set()
    for key, raw in owui_tools.items():
        if isinstance(raw, Mapping) and (raw.get("type") == "builtin" or str(
                raw.get("tool_id") or "").startswith("builtin:")):
            spec = parse_tool_spec(raw.get("spec"))
            names.update({str(key), spec.name} if spec else {str(key)})
    return frozenset(names)


def request_mcp_tools(ts: ToolSettings, notes: list[str]) -> list[dict[str, Any]]:
    """REMOTE_MCP_SERVERS_JSON -> `mcp` tools; a bad value leaves MCP off for this request,
    logged and told in one note (the valve can't be validated on save: Open WebUI loads
    stored valves with `Valves(**stored)`, so a validator would break the whole pipe)."""
    try:
        return list(parse_mcp_servers(ts.mcp_servers_json))
    except ConfigError as exc:
        LOG.warning("Remote MCP servers are off: %s", exc)
        notes.append(f"Remote MCP servers are off for this answer: {describe_error(exc)}")
        return []


# -- features a user may switch on ---------------------------------------------------------
# `__metadata__["features"]` comes from the client: any user can set `image_generation` or
# `web_search` by hand. Like Open WebUI's own middleware, the pipe honours them for a non-admin
# only when Open WebUI's permission `features.<name>` allows it (paid tools, real money).

GATED_FEATURES = {"image_generation": "Image generation", "web_search": "Web search"}


def permitted_features(features: Mapping[str, Any], allowed: Mapping[str, bool]
                       ) -> tuple[dict[str, Any], list[str]]:
    """`features` with each gated one that is on but not `allowed` turned off, and a note
    for each one turned off."""
    out, notes = dict(features), []
    for key, label in GATED_FEATURES.items():
        if out.get(key) and not allowed.get(key, False):
            out[key] = False
            notes.append(f"{label} isn't enabled for your account in Open WebUI, so this "
                         "answer was made without it.")
    return out, notes


async def owui_default_permissions(request: Any) -> Any:
    """Open WebUI's default user permissions: `Config.get("user.permissions")` (0.10+);
    before, `request.app.state.config.USER_PERMISSIONS` (what its routers pass), or without
    a request this worker's `open_webui.config.USER_PERMISSIONS` PersistentConfig."""
    try:
        config = importlib.import_module("open_webui.models.config").Config
    except ImportError:
        live = getattr(getattr(getattr(request, "app", None), "state", None), "config", None)
        value = (live.USER_PERMISSIONS if live is not None else
                 importlib.import_module("open_webui.config").USER_PERMISSIONS.value)
        return copy.deepcopy(value)  # 0.6's has_permission fills the dict in place
    return await config.get("user.permissions")


async def owui_features_allowed(user_id: str, keys: Iterable[str], request: Any
                                ) -> dict[str, bool]:
    """Open WebUI's own `has_permission(user_id, "features.<key>", defaults)` for each key
    (async from 0.9, sync before). Any failure of the lookup denies them all (logged)."""
    try:
        access = importlib.import_module("open_webui.utils.access_control")
        defaults = await owui_default_permissions(request)
        return {key: bool(await _owui_call(access.has_permission, user_id, f"features.{key}",
                                           defaults or {})) for key in keys}
    except Exception as exc:  # another product's lookup: whatever breaks, deny (not a crash)
        LOG.warning("Open WebUI's permission check failed (%s: %s); features left off: %s",
                    type(exc).__name__, exc, ", ".join(keys))
        return {}


def with_tools(plan: Transformed, req: ChatRequest, entry: CatalogEntry,
               owui_tools: Mapping[str, Any], features: Mapping[str, Any],
               ts: ToolSettings) -> Transformed:
    """Attach the request's tools: functions, remote MCP servers, web search.

    A model without tool support gets no function/MCP tools, and a note only when the user
    enabled tools (Open WebUI 0.12's built-in tools, present on every turn, and admin MCP
    servers alone are left out silently); web search then uses the `web` plugin, which needs
    no tool support. When OpenRouter's web search is attached, Open WebUI's own built-in web
    tools are left out. In passthrough mode only the tools Open WebUI put in `body["tools"]`
    are declared: those are the ones it executes from streamed calls (native function
    calling); with prompt-based calling it sends none and picks tools itself. Strict schemas
    only in pipe mode: they make optional parameters nullable, and only the pipe drops the
    nulls again.
    """
    piped, notes, builtins = ts.mode == "pipe", list(plan.notes), builtin_tool_names(owui_tools)
    search_on = ts.web_search == "always" or (ts.web_search == "user_toggle"
                                              and bool(features.get("web_search")))
    dropped = builtins & OWUI_WEB_TOOLS if search_on else frozenset()
    tools = tool_set({k: v for k, v in owui_tools.items() if k not in dropped} if piped else {},
                     [t for t in req.tools if t.name not in dropped],
                     strict=ts.strict and piped, runnable_only=piped)
    wire: list[Mapping[str, Any]] = [*tools.wire, *request_mcp_tools(ts, notes)]
    if wire and not entry.supports_tools:
        if any(e.spec.name not in builtins for e in tools.entries):
            notes.append(f"{entry.name} can't use tools, so this answer was made without them.")
        wire, tools = [], ToolSet()
    payload = dict(plan.payload)
    if search_on:
        search = {"max_results": ts.web_search_max_results}
        if entry.supports_tools:
            wire.append({"type": "openrouter:web_search", "parameters": search})
        else:
            payload["plugins"] = [*payload.get("plugins", ()), {"id": "web", **search}]
    if wire:
        payload["tools"] = wire
    return Transformed(payload, tuple(notes), tools)


def output_items(state: StreamState) -> list[dict[str, Any]]:
    """The round's output items, verbatim, in output order."""
    return [dict(state.done_items[i]) for i in sorted(state.done_items)]


def next_payload(payload: Mapping[str, Any], items: Iterable[Mapping[str, Any]],
                 outcomes: Iterable[ToolOutcome]) -> dict[str, Any]:
    """Next request: previous input + this round's output items verbatim + the outputs."""
    return {**payload, "input": [*payload["input"], *items, *(o.item() for o in outcomes)]}


def final_answer_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """At the round limit: tools stay declared (the input references them) but may not be
    called, and the model is told to answer."""
    instructions = str(payload.get("instructions") or "")
    joined = f"{instructions}\n\n{FINAL_ANSWER_INSTRUCTION}" if instructions \
        else FINAL_ANSWER_INSTRUCTION
    return {**payload, "tool_choice": "none", "instructions": joined}


def _is_async_callable(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        type(fn).__call__ if not inspect.isroutine(fn) else None)


# ─────────────────────────────────────────────────────────────────────────────
# §14 Artifact store
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
_FLAG_LZ4, _FLAG_ZLIB, _FLAG_FERNET = 0x01, 0x02, 0x04
_MARKER_LINE = re.compile(r"^\[orp:([0-9a-z]{8,64})\]: #[ \t]*$", re.MULTILINE)
_MARKER_BLOCK = re.compile(r"(?:^\[orp:[0-9a-z]{8,64}\]: #[ \t]*(?:\n|$))+", re.MULTILINE)
_TOOL_DETAILS_OPENER = re.compile(r'<details\s+type="tool_calls"')
_TOOL_DETAILS_CLOSER = re.compile(r"</details>\s*")
_TAG_ID = re.compile(r'\bid="([^"]*)"')
# Open WebUI 0.6 sends a tool turn's streamed reasoning back as `<think>…</think>` text
_THINK_OPENER, _THINK_CLOSER = re.compile("<think>"), re.compile(r"</think>\s*")
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
    return column_safe(req.chat_id or f"user:{req.user_id}")


def column_safe(value: str, limit: int = 128) -> str:
    """An id as the artifact table can hold it (VARCHAR(128), no NUL): longer ids (Open
    WebUI's `local:` temporary chats, any id an API client sends) become a stable digest."""
    if len(value) <= limit and "\x00" not in value:
        return value
    return "h:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


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
    if "[orp:" not in text:  # most replies: skip the line-anchored scan of every character
        return [(text, ())]
    out: list[tuple[str, tuple[str, ...]]] = []
    pos = 0
    for block in _MARKER_BLOCK.finditer(text):
        out.append((text[pos:block.start()], tuple(_MARKER_LINE.findall(block.group()))))
        pos = block.end()
    out.append((text[pos:], ()))
    return out


def safe_text(value: str) -> str:
    """Lone surrogates -> U+FFFD, surrogate pairs joined: the result always encodes as UTF-8."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")  # C speed; fails only on surrogates (a regex scan is ~30x slower)
        return value
    except UnicodeEncodeError:
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

    Flags: 1 = LZ4 frame, 2 = zlib, 4 = Fernet token of the (compressed) JSON. Every item is
    encrypted whenever a key exists (the pipe always has one: ARTIFACT_ENCRYPTION_KEY or the
    key derived from WEBUI_SECRET_KEY); `encrypt_all=False` encrypts reasoning only (kept for
    benchmarks). Rows without the Fernet flag (older, plaintext) are still read.
    """

    keys: tuple[str, ...] = ()
    encrypt_all: bool = True
    compress_min: int = 1024

    @classmethod
    def of(cls, settings: RequestSettings) -> ArtifactCodec:
        return cls(settings.artifact_keys or (), True, settings.compression_min_bytes)

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
    rank = {index: n for n, index in enumerate(assistants)}  # O(1) per message, not O(n)
    out: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if index not in rank:
            out.append(_unmarked_user(item) if item.get("role") == "user" else item)
            continue
        age = len(assistants) - 1 - rank[index]  # 0 = the latest reply
        out.extend(_expand(str(item["content"]), artifacts, policy, age))
    return repair_orphans(_attach_passthrough(out, artifacts, policy))


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
        # cards of calls replayed as items go; the others stay as a line the model reads
        clean = tool_cards_as_text(strip_tool_cards(strip_think_blocks(segment), calls))
        out.extend(reasoning)
        if clean.strip():
            out.append({"type": "message", "role": "assistant", "content": clean.strip()})
        out.extend(others)
    return out


def strip_tool_cards(text: str, call_ids: set[str]) -> str:
    """Drop rendered tool cards whose calls are replayed as items (they'd be said twice)."""
    if not call_ids or "<details" not in text:
        return text

    def swap(tag: str, block: str) -> str:
        found = _TAG_ID.search(tag)
        return "" if found and found.group(1) in call_ids else block

    return replace_blocks(text, _TOOL_DETAILS_OPENER, _TOOL_DETAILS_CLOSER, swap,
                          lambda tag, nxt: _TAG_ID.search(tag) is not None)


def strip_think_blocks(text: str) -> str:
    """Drop `<think>…</think>` blocks (Open WebUI 0.6's replayed tool-turn reasoning)."""
    if "<think>" not in text:
        return text
    return replace_blocks(text, _THINK_OPENER, _THINK_CLOSER, lambda tag, block: "")


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


def _attach_passthrough(items: list[dict[str, Any]], artifacts: Mapping[str, Mapping[str, Any]],
                        policy: ReplayPolicy) -> list[dict[str, Any]]:
    """Put reasoning stored under a call id (passthrough mode) before that call, under the
    same policy as marker reasoning: none when disabled, only the target model's family."""
    by_call = {str(v.get("_call_id")): v for v in artifacts.values() if v.get("_call_id")}
    if not by_call or policy.reasoning == "disabled":
        return items
    out: list[dict[str, Any]] = []
    for item in items:
        stored = by_call.pop(str(item.get("call_id")), None)
        if item.get("type") == "function_call" and stored is not None:
            out.extend(dict(r) for r in stored.get("items") or ()
                       if reasoning_fits(r, policy.model_id))
        out.append(item)
    return out


def sent_reasoning_ids(sent: Iterable[Mapping[str, Any]],
                       artifacts: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """Ids of stored reasoning (marker or passthrough rows) whose items are in `sent` (the
    request's input): what `next_reply` retention may delete. Filtered-out rows don't count."""
    items = {_reasoning_key(i) for i in sent if i.get("type") == REASONING_ITEM}
    out: list[str] = []
    for item_id, stored in artifacts.items():
        if stored.get("type") == REASONING_ITEM:
            parts: list[Any] = [stored]
        elif stored.get("type") == PASSTHROUGH_ITEM:
            parts = list(stored.get("items") or ())
        else:
            continue
        if any(isinstance(p, Mapping) and _reasoning_key(p) in items for p in parts):
            out.append(item_id)
    return tuple(out)


def _reasoning_key(item: Mapping[str, Any]) -> str:
    """A reasoning item's identity for set lookups (a long chat holds thousands)."""
    rid = item.get("id")
    return f"id:{rid}" if isinstance(rid, str) and rid else \
        _dumps(safe_json(dict(item))).decode("utf-8", "replace")


def repair_orphans(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make a history OpenRouter accepts: every call gets exactly one output right after its
    round (a short synthetic one when lost), outputs without a call and duplicates (calls,
    outputs, reasoning ids) are dropped, and reasoning followed by nothing is dropped."""
    calls = {str(i.get("call_id")) for i in items if i.get("type") == "function_call"}
    out: list[dict[str, Any]] = []
    open_calls: dict[str, None] = {}  # ordered, O(1) removal (a reply may hold many calls)
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
                open_calls.pop(call_id, None)
                out.append(item)
            continue
        if kind != "function_call":
            _close_calls(out, open_calls, answered)
        elif call_id in seen_calls:
            continue
        else:
            seen_calls.add(call_id)
            open_calls[call_id] = None
        out.append(item)
    _close_calls(out, open_calls, answered)
    return _drop_dangling_reasoning(out)


def _close_calls(out: list[dict[str, Any]], open_calls: dict[str, None], answered: set[str]
                 ) -> None:
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
        """Bytes from Redis -> row; ArtifactStoreError for anything that isn't a packed row."""
        try:
            data = _loads(raw)
            return cls(str(data["id"]), str(data["chat_id"]), str(data["message_id"]),
                       int(data["seq"]), str(data["item_type"]),
                       base64.b64decode(data["payload"], validate=True),
                       float(data["created_at"]))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # binascii.Error and JSON/UTF-8 decode errors are ValueErrors
            raise ArtifactStoreError(f"unreadable queued row ({type(exc).__name__})") from None


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


def owui_db_schema() -> str | None:
    """The schema Open WebUI keeps its tables in (its DATABASE_SCHEMA), None for the default."""
    owui_db = sys.modules.get("open_webui.internal.db")
    metadata = getattr(owui_db, "metadata_obj", None) or getattr(
        getattr(owui_db, "Base", None), "metadata", None)
    return getattr(metadata, "schema", None) or None


class ArtifactDB:
    """SQLAlchemy Core access to one pipe's table; every method is one transaction.

    The table lives in `schema` (Open WebUI's DATABASE_SCHEMA) when one is set.
    Database failures surface as ArtifactStoreError.
    """

    def __init__(self, runner: DBRunner, table_name: str, schema: str | None = None) -> None:
        import sqlalchemy as sa

        self.runner = runner
        self.metadata = sa.MetaData(schema=schema)
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
            text = f"database: {type(exc).__name__}: {exc}"[:300]
            if _rejects_the_rows(exc):
                raise ArtifactRowRejected(text) from exc
            raise ArtifactStoreError(text) from exc

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


def _rejects_the_rows(exc: BaseException) -> bool:
    """A database error caused by the values sent (too long, a NUL byte, a constraint), as
    opposed to the database being unreachable: DataError/IntegrityError, or a driver that
    refused a value before sending it (a StatementError that is no DBAPIError)."""
    import sqlalchemy.exc as sa_exc

    if isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError):
        return True
    return isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)


# -- I/O: Redis write-behind ------------------------------------------------------------------

_RELEASE_LOCK = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                 "return redis.call('del', KEYS[1]) else return 0 end")
# Trim the flushed batch only while still holding the lock: if it expired during a slow write,
# another worker may have flushed (and trimmed) the same rows already.
_TRIM_IF_OWNER = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                  "redis.call('ltrim', KEYS[2], tonumber(ARGV[2]), -1) return 1 else return 0 end")
# Queue rows only while the queue has room for all of them: KEYS = pending list, queued-row
# hash, then one cache key per row; ARGV = bound, cache ttl, then id/packed pairs. 0 = full.
_ENQUEUE_BOUNDED = (
    "local n = (#ARGV - 2) / 2 "
    "if redis.call('llen', KEYS[1]) + n > tonumber(ARGV[1]) then return 0 end "
    "local ttl = tonumber(ARGV[2]) "
    "for i = 1, n do local id, row = ARGV[1 + 2 * i], ARGV[2 + 2 * i] "
    "redis.call('rpush', KEYS[1], row) redis.call('hset', KEYS[2], id, row) "
    "if ttl > 0 then redis.call('set', KEYS[2 + i], row, 'EX', ttl) end end return 1")
# After a flush, while holding the lock (KEYS[1]): trim the handled head of the queue
# (KEYS[2], ARGV[2] entries), drop their ids from the queued-row hash (KEYS[3]) and move the
# rows the database refused to quarantine (KEYS[4]). ARGV: token, count, #ids, ids…, refused…
_SETTLE_IF_OWNER = (
    "if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
    "local n = tonumber(ARGV[3]) "
    "for i = 4, 3 + n do redis.call('hdel', KEYS[3], ARGV[i]) end "
    "for i = 4 + n, #ARGV do redis.call('rpush', KEYS[4], ARGV[i]) end "
    "redis.call('ltrim', KEYS[2], tonumber(ARGV[2]), -1) return 1")
# Move unreadable entries from the queue (KEYS[2]) to quarantine (KEYS[3]) while holding the
# lock, so the rows behind them can flush; nothing is deleted without a copy.
_QUARANTINE_IF_OWNER = ("if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
                        "for i = 2, #ARGV do redis.call('rpush', KEYS[3], ARGV[i]) "
                        "redis.call('lrem', KEYS[2], 1, ARGV[i]) end return 1")


@dataclass(frozen=True, slots=True)
class FaultSettings:
    """The Redis write-behind's resilience settings (issue #11): queue bound, breaker pause."""

    redis_queue_max_rows: int = DEFAULT_QUEUE_MAX_ROWS
    redis_skip_seconds: float = 30.0


def fault_settings(valves: Valves) -> FaultSettings:
    return FaultSettings(valves.REDIS_QUEUE_MAX_ROWS, valves.REDIS_SKIP_SECONDS)


@dataclass(slots=True)
class FlushResult:
    """What one flush did with the head of the queue, in queue order."""

    written: list[ArtifactRow] = field(default_factory=list)
    refused: list[tuple[ArtifactRow, str]] = field(default_factory=list)
    db_down: str | None = None  # the database failed: the rest stays queued

    @property
    def handled(self) -> int:
        return len(self.written) + len(self.refused)


class WriteBehind:
    """Rows (already encoded, so encrypted ones stay encrypted) queued in a Redis list and
    flushed to the database in batches by whichever worker holds the flush lock.

    A flush reads a batch with LRANGE, writes it, and only then trims it off the list, so a
    failed database write leaves the rows queued. A batch the database refuses is retried
    row by row: the rows it refuses on their own (a value too long, a NUL byte) move to the
    quarantine list, the others are written. The queue holds at most `max_rows` rows
    (`enqueue` says False when full; the caller writes directly). Queued rows are also kept
    in a hash by id, so reads never scan the list; rows are cached by id for `ttl` seconds.
    """

    def __init__(self, redis: Any, namespace: str, *, batch: int = 100,
                 lock_ms: int = 30_000, max_rows: int = DEFAULT_QUEUE_MAX_ROWS) -> None:
        self.redis = redis
        self.pending_key = f"orp:{namespace}:pending"
        self.queued_key = f"orp:{namespace}:queued"
        self.lock_key = f"orp:{namespace}:flush-lock"
        self.cache_prefix = f"orp:{namespace}:item:"
        self.quarantine_key = f"orp:{namespace}:quarantine"
        self.batch = batch
        self.lock_ms = lock_ms
        self.max_rows = max_rows
        self.last_error: str | None = None

    async def enqueue(self, rows: list[ArtifactRow], ttl: int) -> bool:
        """Queue `rows` durably and atomically; False (nothing queued) when the queue has no
        room for them; raises whatever Redis raises."""
        keys = [self.pending_key, self.queued_key, *(self.cache_prefix + r.id for r in rows)]
        args: list[Any] = [self.max_rows, ttl]
        for row in rows:
            args += [row.id, row.pack()]
        return bool(await self.redis.eval(_ENQUEUE_BOUNDED, len(keys), *keys, *args))

    async def cached(self, ids: list[str]) -> dict[str, ArtifactRow]:
        if not ids:
            return {}
        raw = await self.redis.mget([self.cache_prefix + i for i in ids])
        return {r.id: r for r in readable_rows(v for v in raw if v)}

    async def cache(self, rows: Iterable[ArtifactRow], ttl: int) -> None:
        if ttl:
            async with self.redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.set(self.cache_prefix + row.id, row.pack(), ex=ttl)
                await pipe.execute()

    async def queued(self, ids: Iterable[str]) -> list[ArtifactRow]:
        """Rows among `ids` still waiting in the queue (one HMGET, never a list scan)."""
        wanted = list(ids)
        if not wanted:
            return []
        return readable_rows(v for v in await self.redis.hmget(self.queued_key, wanted) if v)

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
            rows, bad = _split_readable(raw)  # bad ones go aside; the good ones then lead
            if (bad and not await self._quarantine(bad, token)) or not rows:
                return 0
            result = await write_rows(db, rows)
            if result.db_down is not None:
                self.last_error = result.db_down
                LOG.warning("Artifact flush failed; %d rows stay queued: %s",
                            len(rows) - result.handled, self.last_error)
            if result.handled and not await self._settle(result, token):
                LOG.warning("Artifact flush lock expired during a slow write; not trimming")
                return 0
            if result.db_down is None:
                self.last_error = None
            self._report_refused(result)
            return len(result.written)
        finally:
            await self.redis.eval(_RELEASE_LOCK, 1, self.lock_key, token)

    async def _settle(self, result: FlushResult, token: str) -> bool:
        ids = [r.id for r in result.written] + [r.id for r, _ in result.refused]
        return bool(await self.redis.eval(
            _SETTLE_IF_OWNER, 4, self.lock_key, self.pending_key, self.queued_key,
            self.quarantine_key, token, result.handled, len(ids), *ids,
            *(r.pack() for r, _ in result.refused)))

    def _report_refused(self, result: FlushResult) -> None:
        for row, reason in result.refused:
            LOG.error("The database refused artifact row %s (chat %.40r, %d bytes): %s; moved "
                      "to %s, the rest of the batch was written", row.id, row.chat_id,
                      len(row.payload), reason, self.quarantine_key)
        if result.refused:
            self.last_error = f"{len(result.refused)} row(s) refused: {result.refused[-1][1]}"

    async def _quarantine(self, bad: list[bytes], token: str) -> bool:
        """Move unreadable queue entries aside (never dropped); False if the lock was lost."""
        moved = await self.redis.eval(_QUARANTINE_IF_OWNER, 3, self.lock_key, self.pending_key,
                                      self.quarantine_key, token, *bad)
        if moved:
            for value in bad:
                LOG.error("Unreadable queued artifact row (%d bytes) moved to %s for "
                          "inspection", len(value), self.quarantine_key)
        return bool(moved)

    async def quarantined(self) -> int:
        return int(await self.redis.llen(self.quarantine_key))


async def write_rows(db: ArtifactDB, rows: list[ArtifactRow]) -> FlushResult:
    """Write a batch; when the database refuses it, row by row, so one bad row is set aside
    alone. Stops (the rest stays queued) as soon as the database itself fails."""
    try:
        await db.insert(rows)
        return FlushResult(written=list(rows))
    except ArtifactRowRejected:
        pass
    except ArtifactStoreError as exc:
        return FlushResult(db_down=f"{type(exc).__name__}: {exc}"[:300])
    result = FlushResult()
    for row in rows:
        try:
            await db.insert([row])
        except ArtifactRowRejected as exc:
            result.refused.append((row, (str(exc).splitlines() or [""])[0][:300]))
        except ArtifactStoreError as exc:
            result.db_down = f"{type(exc).__name__}: {exc}"[:300]
            break
        else:
            result.written.append(row)
    return result


def _split_readable(raw: Iterable[bytes]) -> tuple[list[ArtifactRow], list[bytes]]:
    """Queue entries -> (the rows that unpack, the raw entries that don't)."""
    rows: list[ArtifactRow] = []
    bad: list[bytes] = []
    for value in raw:
        try:
            rows.append(ArtifactRow.unpack(value))
        except ArtifactStoreError:
            bad.append(value)
    return rows, bad


def readable_rows(raw: Iterable[bytes]) -> list[ArtifactRow]:
    """The rows among Redis values that unpack; the others are skipped with a log line."""
    rows, bad = _split_readable(raw)
    if bad:
        LOG.warning("Skipped %d unreadable artifact rows in Redis", len(bad))
    return rows


# -- the store: database, optionally behind Redis -------------------------------------------


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    """Done-callback of background storage work: a failure is logged here, never lost."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        LOG.error("Background artifact task %s failed: %s: %s", task.get_name(),
                  type(exc).__name__, exc, exc_info=exc)


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

    Redis breaker: after any Redis failure (a hung or stopped server costs one socket
    timeout), Redis is skipped for `redis_skip_seconds`: rows are written to the database
    directly and read from it, so turns keep their normal latency and nothing is lost. The
    first call after the pause tries Redis again. The health report says when Redis is
    skipped and why.
    """

    def __init__(self, db: ArtifactDB, redis: WriteBehind | None = None, *,
                 clock: Callable[[], float] = time.time, auto_flush: bool = True,
                 monotonic: Callable[[], float] = time.monotonic,
                 redis_skip_seconds: float = 30.0) -> None:
        self.db = db
        self.redis = redis
        self.clock = clock
        self.monotonic = monotonic
        self.auto_flush = auto_flush  # off in tests that flush step by step
        self.redis_skip_seconds = redis_skip_seconds
        self.redis_error: str | None = None
        self.redis_skipped_until: float | None = None
        self.redis_skips = 0        # operations that went around Redis while it was skipped
        self.direct_at_bound = 0    # saves written directly because the queue was full
        self.last_cleanup: float | None = None
        self.next_cleanup: float | None = None
        self._flusher: asyncio.Task[int] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def _usable_redis(self) -> WriteBehind | None:
        """The write-behind, unless absent or skipped after a recent failure."""
        if self.redis is None:
            return None
        until = self.redis_skipped_until
        if until is not None and self.monotonic() < until:
            self.redis_skips += 1
            return None
        return self.redis

    def _redis_failed(self, exc: BaseException, doing: str) -> None:
        self.redis_error = f"{type(exc).__name__}: {exc}"[:300]
        self.redis_skipped_until = self.monotonic() + self.redis_skip_seconds
        LOG.warning("Redis failed to %s (%s); skipping Redis for %.0fs (database direct)",
                    doing, self.redis_error, self.redis_skip_seconds)

    def _redis_worked(self) -> None:
        self.redis_skipped_until = None

    async def save(self, rows: list[ArtifactRow], ttl: int) -> list[str]:
        """Ids of the rows now durably queued in Redis or written to the database."""
        if not rows:
            return []
        redis = self._usable_redis()
        if redis is not None:
            try:
                queued = await redis.enqueue(rows, ttl)
            except redis_errors() as exc:
                self._redis_failed(exc, "queue rows")
            else:
                self._redis_worked()
                if queued:
                    self.kick()
                    return [r.id for r in rows]
                self.direct_at_bound += 1
                LOG.warning("The Redis queue is full (%d rows); writing %d rows directly to "
                            "the database", redis.max_rows, len(rows))
                self.kick()
        await self.db.insert(rows)
        return [r.id for r in rows]

    async def load(self, chat_id: str, ids: list[str], ttl: int) -> dict[str, ArtifactRow]:
        """Rows for `ids` in this chat: Redis cache, then the database, then the queue."""
        found: dict[str, ArtifactRow] = {}
        if self.redis is not None:
            found.update(await self._redis_try(lambda r: r.cached(ids), "read") or {})
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
                await self._redis_try(lambda r: r.cache(fetched.values(), ttl), "cache")
        still = [i for i in ids if i not in found]
        if still and self.redis is not None:
            queued = await self._redis_try(lambda r: r.queued(still), "read the queue") or []
            found.update({r.id: r for r in queued if r.chat_id == chat_id})
        return found

    async def delete(self, ids: list[str]) -> None:
        await self.db.delete(ids)
        if self.redis is not None:
            await self._redis_try(lambda r: r.forget(ids), "forget")

    async def _redis_try(self, op: Callable[[WriteBehind], Awaitable[Any]], doing: str) -> Any:
        """`op(write-behind)`, or None when Redis is skipped or fails (which starts a skip)."""
        redis = self._usable_redis()
        if redis is None:
            return None
        try:
            result = await op(redis)
        except redis_errors() as exc:
            self._redis_failed(exc, doing)
            return None
        self._redis_worked()
        return result

    def kick(self) -> None:
        """Start a background flush of the Redis queue unless one is running."""
        if not self.auto_flush or self.redis is None:
            return
        if self._flusher is None or self._flusher.done():
            self._flusher = background_task(self.drain(), "orp-artifact-flush")
            self._flusher.add_done_callback(_log_task_failure)

    async def drain(self, *, max_wait: float = 30.0,
                    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> int:
        """Flush until the queue is empty; backs off (up to `max_wait` s) while the DB fails."""
        written, delay = 0, 0.5
        while True:
            redis = self._usable_redis()
            if redis is None:
                return written
            try:
                count = await redis.flush(self.db)
                depth = await redis.depth()
            except redis_errors() as exc:
                self._redis_failed(exc, "flush")
                return written
            written += count
            if not depth:
                return written
            if not count:  # locked by another worker, or the database failed: wait
                await sleep(delay)
                delay = min(delay * 2, max_wait)

    def spawn(self, work: typing.Coroutine[Any, Any, Any]) -> None:
        """Run housekeeping in the background (a turn never waits for it)."""
        task = background_task(work, f"orp-artifact-{getattr(work, '__name__', 'housekeeping')}")
        self._background.add(task)  # a strong reference until done; close() cancels it
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_task_failure)

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
        depth = await self._redis_try(lambda r: r.depth(), "report its depth")
        quarantined = await self._redis_try(lambda r: r.quarantined(), "report quarantine")
        store["backend"] = "database behind Redis write-behind"
        return store, {"pending_rows": depth, "last_flush_error": self.redis.last_error,
                       "last_error": self.redis_error, "quarantined_rows": quarantined,
                       "state": self._redis_state(), "queue_max_rows": self.redis.max_rows,
                       "direct_writes_queue_full": self.direct_at_bound,
                       "skipped_operations": self.redis_skips}

    def _redis_state(self) -> str:
        until = self.redis_skipped_until
        left = None if until is None else until - self.monotonic()
        if left is None or left <= 0:
            return "in use"
        return (f"skipped for {left:.0f}s more after a failure ({self.redis_error}); "
                "rows go to the database directly")

    async def close(self) -> None:
        """Cancel background work and wait for it; a cancellation of close() itself still
        propagates (asyncio.wait never raises the awaited tasks' CancelledError)."""
        tasks = [t for t in (self._flusher, *self._background) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


# ─────────────────────────────────────────────────────────────────────────────
# §15 Rendering
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
        self.rendered_chars = 0  # text + reasoning rendered from intents (not notes)

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
        self.rendered_chars += len(text)
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


def usage_payload(usage: Usage | None, timing: StreamTiming | None = None,
                  cache_saved: float | None = None) -> dict[str, Any]:
    """Usage in the OpenAI chat shape Open WebUI stores (plus cost, cache and timings)."""
    if usage is None:  # OpenRouter reported none: no made-up zeros, only the timings
        return {"usage_unavailable": True,
                **({"response_time_s": round(timing.elapsed, 3)} if timing else {})}
    payload: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}
    if usage.cost is not None:
        payload["cost"] = round(usage.cost, 8)
    if usage.cache_write_tokens:
        payload["prompt_tokens_details"]["cache_write_tokens"] = usage.cache_write_tokens
    if cache_saved is not None:
        payload["cache_saved"] = round(cache_saved, 8)
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


def final_status_line(usage: Usage | None, timing: StreamTiming,
                      extras: Iterable[str] = ()) -> str:
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
    else:  # the stream ended without a usage report: never "0 tokens"
        parts.append("usage unavailable")
    parts.extend(extras)  # routing and cache (issue #12)
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
    if isinstance(exc, ImageRefused):
        return redact(refusal_text(exc.reason, exc.message))
    lost = (describe_availability(exc.availability, exc.model)  # issue #12, mid-stream
            if isinstance(exc, UpstreamStreamError) else [])
    if isinstance(exc, UpstreamStatusError):
        text = _describe_status(exc)
    elif lost:
        text = "\n".join([*lost, f"OpenRouter said: {exc.message}"])
    else:
        text = str(exc)
    if isinstance(exc, UpstreamError) and exc.attempts > 1:
        text += f"\nTried {exc.attempts} times."
    return redact(text)  # the last line of defence: no credential reaches a user


def _describe_status(exc: UpstreamStatusError) -> str:
    headline, advice = _STATUS_ADVICE.get(
        exc.status, ("OpenRouter's provider is unavailable" if exc.status >= 500
                     else "OpenRouter returned an error", "Retry in a moment."))
    said = exc.provider_message or "no details given"
    specific = _routing_lines(exc)  # issue #12: say what happened, in OpenRouter's terms
    lines = ([f"{specific[0]} (HTTP {exc.status})", *specific[1:], f"OpenRouter said: {said}"]
             if specific else [f"{headline} (HTTP {exc.status}): {said}"])
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


def has_socket_session(metadata: Mapping[str, Any]) -> bool:
    """Whether a browser tab follows this turn over Open WebUI's socket (where toasts and
    status lines show). Open WebUI (0.6.28 and 0.12) runs a chat as a socket task only when
    `session_id`, `chat_id` and `message_id` are all set; a plain API client sends no
    `session_id` (its value is None) and reads only the returned answer."""
    return all(metadata.get(k) for k in ("session_id", "chat_id", "message_id"))


def untold_notes(metadata: Mapping[str, Any], notes: Iterable[str]) -> str:
    """Notes about what was left out, as a block at the end of the answer, for requests
    without a socket session (their toasts reach no one); "" otherwise."""
    notes = list(notes)
    if not notes or has_socket_session(metadata):
        return ""
    return "\n\n---\n" + "\n".join(f"ℹ️ {note}" for note in notes)


def _routing_lines(exc: UpstreamStatusError) -> list[str]:
    """Availability codes, free-model limits and policies that left no provider (#12)."""
    lines = describe_availability(exc.availability, exc.model)
    if exc.status == 429:
        lines += describe_rate_limit(exc.provider_message, exc.rate_limits, time.time())
    code = exc.availability.get("code")
    if exc.routing and exc.status == 404 and code in (None, "no_endpoints",
                                                       "constraint_filtered",
                                                       "privacy_restricted"):
        lines.insert(0, f"No provider of {exc.model or 'this model'} satisfies the routing "
                        f"policy ({exc.routing}).")
    return lines


def error_chunk(exc: PipeError, reference: str = "", tail: str = "") -> dict[str, Any]:
    """A chunk Open WebUI (0.6.28 → 0.12) shows as an error box (`tail`: untold notes)."""
    suffix = f"\n(reference {reference})" if reference else ""
    return {"error": {"message": describe_error(exc) + suffix + tail}}


def interruption_notice(exc: PipeError, reference: str = "") -> str:
    """Appended to a partial answer so the user keeps the text and sees why it stopped."""
    suffix = f" (reference {reference})" if reference else ""
    return f"\n\n---\n⚠️ **The answer was interrupted.** {describe_error(exc)}{suffix}"


def _attr(value: str) -> str:
    """Escape for a double-quoted attribute Open WebUI parses with `(\\w+)="(.*?)"`."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;").replace("\n", "&#10;"))


def tool_card(call_id: str, name: str, arguments: str, result: str) -> str:
    """Open WebUI's own tool-call markup (0.6.28 reads `result` from the attribute only)."""
    return (f'<details type="tool_calls" done="true" id="{_attr(call_id)}" name="{_attr(name)}" '
            f'arguments="{_attr(json.dumps(arguments, ensure_ascii=False))}" '
            f'result="{_attr(json.dumps(result, ensure_ascii=False))}" files="">\n'
            "<summary>Tool Executed</summary>\n</details>\n")


def tool_cards(outcomes: Iterable[ToolOutcome], card_max_chars: int) -> str:
    """One round's cards as a block that starts and ends on its own lines."""
    cards = "".join(tool_card(o.call.call_id, o.tool_name, o.call.arguments,
                              truncate(o.output, card_max_chars)) for o in outcomes)
    return f"\n\n{cards}\n"


def tool_calls_delta(calls: Iterable[FunctionCall], tools: ToolSet) -> dict[str, Any]:
    """Passthrough: calls in the OpenAI streaming shape, names mapped back to Open WebUI's."""
    out = []
    for index, call in enumerate(calls):
        out.append({"index": index, "id": call.call_id, "type": "function", "function": {
            "name": tools.display_name(call.name), "arguments": call.arguments}})
    return {"tool_calls": out}


def tool_status(verb: str, names: Iterable[str]) -> str:
    """`Running search, weather and 2 more` (each name once)."""
    unique = list(dict.fromkeys(names))
    shown = ", ".join(unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")
    return f"{verb} {shown}"


class CitationBook:
    """Numbers cited URLs once per turn, in order of first appearance, across tool rounds.

    The text cites them as plain `[n]`: Open WebUI (0.6.28 and 0.12) renders `[n]` as a
    clickable chip for the n-th of the message's sources, so the n-th source event must be
    URL n. Open WebUI 0.6.28 merges sources of equal title, so a repeated title gets its URL.
    """

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}
        self._titles: set[str] = set()

    def cite(self, annotations: Iterable[Mapping[str, Any]]
             ) -> tuple[list[int], list[tuple[int, Mapping[str, Any]]]]:
        """(numbers in the order cited, newly numbered annotations)."""
        used: list[int] = []
        new: list[tuple[int, Mapping[str, Any]]] = []
        for ann in annotations:
            url = ann.get("url")
            if ann.get("type") != "url_citation" or not isinstance(url, str) or not url:
                continue
            if url not in self.numbers:
                self.numbers[url] = len(self.numbers) + 1
                new.append((self.numbers[url], self._distinct(ann, url)))
            if self.numbers[url] not in used:
                used.append(self.numbers[url])
        return used, new

    def _distinct(self, ann: Mapping[str, Any], url: str) -> Mapping[str, Any]:
        title = str(ann.get("title") or url)
        if title in self._titles:
            title = f"{title} ({url})"
            ann = {**ann, "title": title}
        self._titles.add(title)
        return ann


def url_annotations(item: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The url_citation annotations of a message output item, in text order."""
    found = [a for part in item.get("content") or () if isinstance(part, Mapping)
             for a in part.get("annotations") or () if isinstance(a, Mapping)]
    return sorted((a for a in found if a.get("type") == "url_citation"),
                  key=lambda a: a.get("start_index") or 0)


def source_event(number: int, ann: Mapping[str, Any]) -> dict[str, Any]:
    """One Open WebUI source (citation) for a cited URL."""
    url = str(ann.get("url"))
    title = str(ann.get("title") or url)
    return {"type": "citation", "data": {
        "source": {"name": f"[{number}] {title}", "url": url, "id": url},
        "document": [str(ann.get("content") or title)],
        "metadata": [{"source": url, "name": title, "url": url}]}}


def citation_suffix(numbers: Iterable[int]) -> str:
    return " " + "".join(f"[{n}]" for n in numbers) if numbers else ""


def reasoning_block(text: str, seconds: float) -> str:
    """Open WebUI's own thinking markup (0.6.28's serialisation, kept verbatim by 0.12)."""
    quoted = "\n".join(f"> {line}" if line else ">" for line in text.strip().splitlines())
    n = round(seconds)
    summary = "Thought for less than a second" if n < 1 else f"Thought for {n} seconds"
    return (f'<details type="reasoning" done="true" duration="{n}">\n'
            f"<summary>{summary}</summary>\n{quoted}\n</details>\n")


class CollectedAnswer:
    """A streamed turn's chunks -> one string; each stretch of thinking becomes a thinking
    block placed where it happened (for `stream: false` chats)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._parts: list[str] = []
        self._thinking: list[str] = []
        self._since = 0.0

    def add(self, chunk: Mapping[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if not self._thinking:
                    self._since = self._clock()
                self._thinking.append(delta["reasoning_content"])
            if delta.get("content"):
                self._close_thinking()
                self._parts.append(delta["content"])

    def text(self) -> str:
        self._close_thinking()
        return "".join(self._parts)

    def _close_thinking(self) -> None:
        if self._thinking:
            seconds = self._clock() - self._since
            self._parts.append(reasoning_block("".join(self._thinking), seconds))
            self._thinking = []


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
# §16 Admission
# ─────────────────────────────────────────────────────────────────────────────


class AdmissionGate:
    """Global concurrency limit with a bounded FIFO wait queue, plus a per-user limit.

    Counts are per worker process (the valves say so): a Redis-wide count would add a Redis
    round trip to every turn and leases that must expire when a worker dies mid-answer, and
    with Redis down it would have to fall back to this count anyway.

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
# §17 Spend
#
# Pure cores: UTC calendar periods (weeks Monday–Sunday, as OpenRouter's key limits), budget
# resolution (user override > the highest of the user's group overrides > BUDGET_USD; admins
# exempt by valve), the words users read (warning note, refusal, status suffix), money in the
# display currency, CSV. I/O shells: `SpendLedger` (one table per pipe: cost per user, UTC day,
# model and key; atomic `INSERT … ON CONFLICT DO UPDATE SET cost = cost + excluded.cost`),
# `KeyVault` (provisioned per-user keys, stored encrypted), `KeysClient` (/key, /credits,
# /keys) and `SpendService`, which Pipe calls twice per turn: `admit` after the admission gate
# (budget check from a per-user cache, key choice) and `record` after the turn (in memory at
# once, written to the database by a background task, never on the stream's path).
# ─────────────────────────────────────────────────────────────────────────────

KEY_PIPE, KEY_OWN, KEY_PROVISIONED = "pipe", "own", "provisioned"
PERIOD_NOW = {"daily": "today", "weekly": "this week", "monthly": "this month"}
PERIOD_EACH = {"daily": "a day", "weekly": "a week", "monthly": "a month"}
MY_USAGE_ENTRY = {"id": "_my_usage", "name": "OpenRouter: my usage"}


class BudgetExceeded(AdmissionRejected):
    """The user's budget for this period is used up; nothing was sent."""


class KeyLimitError(PipeError):
    """OpenRouter refused the user's own key or their provisioned budget key."""


class SpendLedgerError(PipeError):
    """The spend ledger could not be read or written."""


# -- pure: periods ----------------------------------------------------------------------------


def utc_day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def period_start(period: str, day: date) -> date:
    """First UTC day of the calendar period containing `day`."""
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_period_start(period: str, day: date) -> date:
    """First UTC day of the next period: when the budget resets (at 00:00 UTC)."""
    start = period_start(period, day)
    if period == "daily":
        return start + timedelta(days=1)
    if period == "weekly":
        return start + timedelta(days=7)
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


def previous_period_start(period: str, day: date) -> date:
    return period_start(period, period_start(period, day) - timedelta(days=1))


# -- pure: settings and budgets ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetOverrides:
    users: Mapping[str, float | None] = field(default_factory=dict)   # id/email -> $ (None: ∞)
    groups: Mapping[str, float | None] = field(default_factory=dict)  # group name -> $


def parse_overrides(text: str) -> tuple[BudgetOverrides, list[str]]:
    """`a@x.org=25, group:Research=50, <id>=unlimited` -> overrides, plus entries not understood.
    Names are matched case-insensitively."""
    users: dict[str, float | None] = {}
    groups: dict[str, float | None] = {}
    bad: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        who, sep, amount = (part.strip() for part in entry.rpartition("="))
        try:
            value = _override_amount(amount)
        except ValueError:
            sep = ""
        name = who.lower()
        if not sep or not name or name == "group:":
            bad.append(entry)
        elif name.startswith("group:"):
            groups[name[6:].strip()] = value
        else:
            users[name] = value
    return BudgetOverrides(users, groups), bad


def _override_amount(text: str) -> float | None:
    if text.lower() in ("unlimited", "none", "inf"):
        return None
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


@dataclass(frozen=True, slots=True)
class Budget:
    limit: float | None  # dollars per period; None = no limit
    source: str          # "default", "your own budget", "group Research", "admin (exempt)"


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A user's position in the current period when their turn was admitted."""

    budget: Budget
    spent: float
    period: str
    resets_on: date

    @property
    def over(self) -> bool:
        return self.budget.limit is not None and self.spent >= self.budget.limit

    def warn(self, percent: float) -> bool:
        limit = self.budget.limit
        return limit is not None and self.spent >= limit * percent / 100


@dataclass(frozen=True, slots=True)
class SpendSettings:
    """The spend valves of one request (built once by `spend_settings`)."""

    ledger: bool = True
    budget_usd: float = 0.0
    period: str = "monthly"
    warn_percent: float = 80.0
    overrides: BudgetOverrides = field(default_factory=BudgetOverrides)
    exempt_admins: bool = True
    on_ledger_error: str = "allow"
    cache_seconds: float = 5.0
    show_in_status: bool = True
    management_key: str = ""
    user_key: str = ""          # the user's own key when ALLOW_USER_API_KEYS, else ""
    low_credit_usd: float = 0.0
    balance_refresh: float = 300.0
    currency: str = "USD"
    rate: float = 1.0
    # Filled in by SpendService.admit for the admitted turn:
    key_source: str = KEY_PIPE
    state: BudgetState | None = None

    @property
    def budgets_on(self) -> bool:
        return self.budget_usd > 0 or bool(self.overrides.users or self.overrides.groups)


def spend_settings(valves: Valves, user: UserValves) -> SpendSettings:
    overrides, bad = parse_overrides(valves.BUDGET_OVERRIDES)
    if bad:
        LOG.error("BUDGET_OVERRIDES entries not understood (ignored): %s", "; ".join(bad))
    management = _reveal_key(valves.MANAGEMENT_API_KEY, ConfigError(
        "The stored MANAGEMENT_API_KEY can't be decrypted (WEBUI_SECRET_KEY changed).",
        hint="An admin must re-enter MANAGEMENT_API_KEY in the pipe's valves."))
    own = _reveal_key(getattr(user, "API_KEY", ""), ConfigError(
        "Your own OpenRouter key can't be decrypted (the server's secret changed).",
        hint="Enter API_KEY again in your user valves for this pipe.")) \
        if valves.ALLOW_USER_API_KEYS else ""
    return SpendSettings(
        ledger=valves.SPEND_LEDGER, budget_usd=valves.BUDGET_USD, period=valves.BUDGET_PERIOD,
        warn_percent=valves.BUDGET_WARN_PERCENT, overrides=overrides,
        exempt_admins=valves.BUDGET_EXEMPT_ADMINS, on_ledger_error=valves.BUDGET_ON_LEDGER_ERROR,
        cache_seconds=valves.BUDGET_CHECK_CACHE_SECONDS,
        show_in_status=valves.SHOW_SPEND_IN_STATUS, management_key=management, user_key=own,
        low_credit_usd=valves.LOW_CREDIT_WARNING_USD,
        balance_refresh=valves.BALANCE_REFRESH_SECONDS,
        currency=valves.CURRENCY_NAME.strip() or "USD", rate=valves.CURRENCY_RATE)


def _reveal_key(value: str, unreadable: ConfigError) -> str:
    try:
        plain = EncryptedStr(value or "").reveal().strip()
    except ConfigError:
        raise unreadable from None
    register_secret(plain)
    return plain


def resolve_budget(s: SpendSettings, user_id: str, email: str, role: str,
                   groups: Iterable[str] = ()) -> Budget:
    """user override (id, then email) > the highest budget among the user's groups >
    BUDGET_USD; admins have none when BUDGET_EXEMPT_ADMINS."""
    if role == "admin" and s.exempt_admins:
        return Budget(None, "admin (exempt)")
    for who in (user_id.lower(), email.lower()):
        if who and who in s.overrides.users:
            return Budget(s.overrides.users[who], "your own budget")
    matched = [(s.overrides.groups[g.lower()], g) for g in groups
               if g.lower() in s.overrides.groups]
    if matched:
        unlimited = [g for v, g in matched if v is None]
        if unlimited:
            return Budget(None, f"group {unlimited[0]}")
        value, name = max(matched, key=lambda m: m[0] or 0.0)
        return Budget(value, f"group {name}")
    return Budget(s.budget_usd or None, "default")


# -- pure: words ------------------------------------------------------------------------------


def money(usd: float, currency: str = "USD", rate: float = 1.0) -> str:
    """Dollars in the display currency: `$8.10`, `7.45 EUR`; tiny amounts keep 4 decimals."""
    value = usd * rate
    digits = 2 if value == 0 or abs(value) >= 0.01 else 4
    text = f"{value:,.{digits}f}"
    return f"${text}" if currency.upper() == "USD" else f"{text} {currency}"


def reset_words(day: date) -> str:
    return f"{day.day} {day.strftime('%B %Y')}, 00:00 UTC"


def usage_note(state: BudgetState, s: SpendSettings) -> str:
    """`$8.10 of $10.00 used this month` (or `$8.10 spent this month` without a budget)."""
    spent = money(state.spent, s.currency, s.rate)
    if state.budget.limit is None:
        return f"{spent} spent {PERIOD_NOW[state.period]}"
    limit = money(state.budget.limit, s.currency, s.rate)
    return f"{spent} of {limit} used {PERIOD_NOW[state.period]}"


def refusal(state: BudgetState, s: SpendSettings) -> BudgetExceeded:
    limit = money(state.budget.limit or 0.0, s.currency, s.rate)
    return BudgetExceeded(
        f"Your OpenRouter budget is used up: {limit} {PERIOD_EACH[state.period]}, and you have "
        f"spent {money(state.spent, s.currency, s.rate)} {PERIOD_NOW[state.period]}. Nothing "
        f"was sent. It resets on {reset_words(state.resets_on)}.",
        hint="An admin can raise your budget (BUDGET_USD or BUDGET_OVERRIDES).")


def status_suffix(s: SpendSettings, turn_cost: float | None) -> str:
    """` · you: $1.23 of $10.00 this month` for the final status line ("" when off)."""
    state = s.state
    if s.show_in_status and s.key_source == KEY_OWN:
        return " · billed to your own key"
    if not s.show_in_status or state is None:
        return ""
    spent = state.spent + (turn_cost or 0.0)
    now = PERIOD_NOW[state.period]
    if state.budget.limit is None:
        return f" · you: {money(spent, s.currency, s.rate)} {now}"
    left = max(state.budget.limit - spent, 0.0)
    return (f" · you: {money(spent, s.currency, s.rate)} of "
            f"{money(state.budget.limit, s.currency, s.rate)} {now}, "
            f"{money(left, s.currency, s.rate)} left")


def attribute_key_error(exc: Exception, s: SpendSettings) -> Exception:
    """A 401/402/403 on the user's own key or their budget key names that key, not the
    account's credit; anything else is returned unchanged."""
    if not isinstance(exc, UpstreamStatusError) or exc.status not in (401, 402, 403):
        return exc
    said = exc.provider_message or f"HTTP {exc.status}"
    if s.key_source == KEY_OWN:
        what = {401: "was rejected", 402: "is out of credits or over its limit",
                403: "was refused"}[exc.status]
        return KeyLimitError(
            f"Your own OpenRouter key (API_KEY in your user valves) {what} "
            f"(HTTP {exc.status}): {said}",
            hint="Fix or remove your key in your user valves; the shared key was not used.")
    if s.key_source == KEY_PROVISIONED and exc.status == 401:
        return KeyLimitError(
            "Your budget key (the OpenRouter key this pipe made for you) was rejected "
            f"(HTTP 401): {said.rstrip('.')}. It was probably deleted or revoked on "
            "OpenRouter; a new one is made for your next message.",
            hint="Send your message again; if this repeats, an admin should check "
                 "MANAGEMENT_API_KEY.")
    if s.key_source == KEY_PROVISIONED and exc.status in (402, 403) and s.state is not None:
        state = s.state
        limit = money(state.budget.limit or 0.0, s.currency, s.rate)
        return KeyLimitError(
            f"Your OpenRouter budget ({limit} {PERIOD_EACH[state.period]}) is used up: "
            f"OpenRouter refused your budget key (HTTP {exc.status}): {said}. This is your own "
            f"budget, not the account's credit. It resets on {reset_words(state.resets_on)}.",
            hint="An admin can raise your budget (BUDGET_USD or BUDGET_OVERRIDES).")
    return exc


# -- pure: ledger rows and reports ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One turn's spend (or the sum of several) for one user, UTC day, model and key."""

    user_id: str
    day: str        # YYYY-MM-DD (UTC)
    model: str
    key_source: str
    cost: float
    byok_cost: float = 0.0
    requests: int = 1
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.user_id, self.day, self.model, self.key_source

    @property
    def total(self) -> float:
        return self.cost + self.byok_cost


def ledger_entry(user_id: str, model: str, key_source: str, usage: Usage | None,
                 now: float) -> LedgerEntry | None:
    """The ledger entry for one turn's summed usage; None when nothing was billed or used."""
    if usage is None or (usage.cost is None and not usage.total_tokens):
        return None
    return LedgerEntry(user_id[:128], utc_day(now).isoformat(), model[:200], key_source,
                       usage.cost or 0.0, usage.byok_cost, 1, usage.input_tokens,
                       usage.output_tokens)


@dataclass(frozen=True, slots=True)
class UnfinishedRound:
    """A request OpenRouter accepted that ended without its usage (the user pressed Stop, the
    client went away, the stream broke off): OpenRouter still bills the prompt and what was
    generated. `estimate` (USD) is recorded when the generation record can't be read."""

    generation_id: str  # "" when unknown (a task cancelled before its answer arrived)
    estimate: float


UNFINISHED_LOOKUP_DELAYS = (0.5, 1.0, 2.0, 3.0)  # the generation record may lag the stream


def estimate_prompt_tokens(payload: Mapping[str, Any]) -> int:
    """Roughly 4 characters a token over the request's text (inline file data left out)."""
    chars, todo, seen = 0, [payload.get("instructions"), payload.get("input")], 0
    while todo and seen < 100_000:
        value, seen = todo.pop(), seen + 1
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, Mapping):
            todo += [v for k, v in value.items()
                     if k not in ("file_data", "image_url", "data", "id", "type", "role")]
        elif isinstance(value, list):
            todo += value
    return chars // 4


def unfinished_estimate(prompt_tokens: int, output_chars: int, pricing: Pricing | None
                        ) -> float:
    """USD for a round stopped early: the prompt plus ~4 characters a token streamed."""
    if pricing is None:
        return 0.0
    return prompt_tokens * pricing.prompt + output_chars / 4 * pricing.completion


def merge_entries(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """Entries summed per (user, day, model, key): one upsert row each."""
    merged: dict[tuple[str, str, str, str], LedgerEntry] = {}
    for e in entries:
        old = merged.get(e.key)
        merged[e.key] = e if old is None else dataclasses.replace(
            old, cost=old.cost + e.cost, byok_cost=old.byok_cost + e.byok_cost,
            requests=old.requests + e.requests, input_tokens=old.input_tokens + e.input_tokens,
            output_tokens=old.output_tokens + e.output_tokens)
    return list(merged.values())


def budget_spend(entries: Iterable[LedgerEntry]) -> float:
    """What counts against a budget: everything but the user's own key (BYOK included)."""
    return sum(e.total for e in entries if e.key_source != KEY_OWN)


CSV_COLUMNS = ("period", "user_id", "user", "model", "key", "requests", "input_tokens",
               "output_tokens", "cost_usd", "byok_cost_usd")


def spend_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    """Report rows -> CSV text (dollars; cells that could start a formula are quoted)."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c, "")) for c in CSV_COLUMNS])
    return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.8f}".rstrip("0").rstrip(".") or "0"
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def report_rows(entries: Iterable[LedgerEntry], period: str, today: date,
                names: Mapping[str, str]) -> list[dict[str, Any]]:
    """Ledger entries of this and the previous period, summed per period, user, model, key."""
    current = period_start(period, today)
    totals: dict[tuple[str, str, str, str], LedgerEntry] = {}
    for e in entries:
        label = "current" if date.fromisoformat(e.day) >= current else "previous"
        key = (label, e.user_id, e.model, e.key_source)
        old = totals.get(key)
        totals[key] = dataclasses.replace(e, day=label) if old is None else merge_entries(
            [old, dataclasses.replace(e, day=label)])[0]
    return [{"period": p, "user_id": u, "user": names.get(u, ""), "model": m, "key": k,
             "requests": e.requests, "input_tokens": e.input_tokens,
             "output_tokens": e.output_tokens, "cost_usd": e.cost, "byok_cost_usd": e.byok_cost}
            for (p, u, m, k), e in sorted(totals.items())]


def spend_markdown(rows: list[dict[str, Any]], s: SpendSettings, title: str) -> str:
    """Per-user and per-model sums for both periods, plus totals, as markdown tables."""
    lines = [f"### {title}", f"Period: {s.period} (UTC), amounts in "
             f"{'USD' if s.currency.upper() == 'USD' else s.currency}.", ""]
    for label in ("current", "previous"):
        part = [r for r in rows if r["period"] == label]
        total = sum(r["cost_usd"] + r["byok_cost_usd"] for r in part)
        lines.append(f"**{label.title()} period**: {money(total, s.currency, s.rate)} in "
                     f"{sum(r['requests'] for r in part)} requests")
        for col, head in (("user", "User"), ("model", "Model")):
            sums: dict[str, float] = {}
            for r in part:
                name = (f"{r['user']} ({r['user_id']})" if r["user"] else r["user_id"]
                        ) if col == "user" else r["model"]
                if r["key"] == KEY_OWN:
                    name += " (own key)"
                sums[name] = sums.get(name, 0.0) + r["cost_usd"] + r["byok_cost_usd"]
            if sums:
                lines += ["", f"| {head} | Spent |", "|---|---:|", *(
                    f"| {_cell(n)} | {money(v, s.currency, s.rate)} |"
                    for n, v in sorted(sums.items(), key=lambda kv: -kv[1]))]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


# -- I/O: the ledger and the key vault (tables in Open WebUI's database) ----------------------


def spend_table_name(kind: str, function_id: str) -> str:
    """`orp_spend_<pipe>` / `orp_keys_<pipe>`, valid identifiers of at most 48 characters."""
    base = re.sub(r"[^a-z0-9_]", "_", function_id.lower()).strip("_") or "pipe"
    name = f"orp_{kind}_{base}"
    if len(name) > 48 or base != function_id:
        name = f"{name[:39]}_{hashlib.sha256(function_id.encode()).hexdigest()[:8]}"
    return name


class _Table:
    """One SQLAlchemy Core table created on first use (safe when workers race to create it);
    database failures surface as SpendLedgerError."""

    def __init__(self, runner: DBRunner, table: Any) -> None:
        self.runner, self.table = runner, table
        self._ready = False
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        import sqlalchemy.exc as sa_exc

        try:
            if not self._ready:
                async with self._lock:
                    if not self._ready:
                        await self._create()
            return await self.runner.run(fn)
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise SpendLedgerError(f"database: {type(exc).__name__}: {exc}"[:300]) from exc

    async def _create(self) -> None:
        import sqlalchemy.exc as sa_exc

        def create(conn: Any) -> None:
            self.table.metadata.create_all(conn, checkfirst=True)

        try:
            await self.runner.run(create)
        except sa_exc.DBAPIError:  # another worker created it in between
            await self.runner.run(create)
        self._ready = True


def _dialect_insert(conn: Any, table: Any) -> Any:
    """INSERT with ON CONFLICT support for this connection's database (PostgreSQL or SQLite)."""
    dialect = "postgresql" if conn.dialect.name == "postgresql" else "sqlite"
    return importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert(table)


def _upsert(conn: Any, table: Any, rows: list[dict[str, Any]], keys: list[str],
            add: Iterable[str] = (), replace: Iterable[str] = ()) -> None:
    """One atomic INSERT … ON CONFLICT DO UPDATE: `add` columns are summed with what is stored
    (no lost increments under concurrent writers), `replace` columns overwritten."""
    stmt = _dialect_insert(conn, table).values(rows)
    new = stmt.excluded
    sets = {c: table.c[c] + new[c] for c in add} | {c: new[c] for c in replace}
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=sets))


class SpendLedger:
    """Cost per user, UTC day, model and key source; the primary key starts with user and day,
    so a budget check is one indexed range read."""

    KEYS: typing.ClassVar[list[str]] = ["user_id", "day", "model", "key_source"]
    SUMS = ("cost", "byok_cost", "requests", "input_tokens", "output_tokens")

    def __init__(self, runner: DBRunner, name: str, schema: str | None = None) -> None:
        import sqlalchemy as sa

        table = sa.Table(
            name, sa.MetaData(schema=schema),
            sa.Column("user_id", sa.String(128), primary_key=True),
            sa.Column("day", sa.String(10), primary_key=True),
            sa.Column("model", sa.String(200), primary_key=True),
            sa.Column("key_source", sa.String(16), primary_key=True),
            sa.Column("cost", sa.Float, nullable=False, default=0.0),
            sa.Column("byok_cost", sa.Float, nullable=False, default=0.0),
            sa.Column("requests", sa.Integer, nullable=False, default=0),
            sa.Column("input_tokens", sa.BigInteger, nullable=False, default=0),
            sa.Column("output_tokens", sa.BigInteger, nullable=False, default=0),
            sa.Column("updated_at", sa.Float, nullable=False, default=0.0),
            sa.Index(f"{name}_day_ix", "day"))
        self.db = _Table(runner, table)

    async def add(self, entries: list[LedgerEntry], now: float) -> None:
        rows = [{**{f: getattr(e, f) for f in (*self.KEYS, *self.SUMS)}, "updated_at": now}
                for e in merge_entries(entries)]
        if rows:
            t = self.db.table
            await self.db.run(lambda conn: _upsert(conn, t, rows, self.KEYS, self.SUMS,
                                                   ("updated_at",)))

    async def budget_spent(self, user_id: str, start: date, end: date) -> float:
        """Sum of the user's spend from `start` to `end` (exclusive) not on their own key."""
        import sqlalchemy as sa

        t = self.db.table
        query = sa.select(sa.func.coalesce(sa.func.sum(t.c.cost + t.c.byok_cost), 0.0)).where(
            t.c.user_id == user_id, t.c.day >= start.isoformat(), t.c.day < end.isoformat(),
            t.c.key_source != KEY_OWN)
        return float(await self.db.run(lambda conn: conn.execute(query).scalar()) or 0.0)

    async def entries(self, start: date, end: date, user_id: str | None = None
                      ) -> list[LedgerEntry]:
        t = self.db.table
        query = t.select().where(t.c.day >= start.isoformat(), t.c.day < end.isoformat())
        if user_id is not None:
            query = query.where(t.c.user_id == user_id)

        def work(conn: Any) -> list[LedgerEntry]:
            return [LedgerEntry(r.user_id, r.day, r.model, r.key_source, float(r.cost),
                                float(r.byok_cost), int(r.requests), int(r.input_tokens),
                                int(r.output_tokens)) for r in conn.execute(query)]

        result: list[LedgerEntry] = await self.db.run(work)
        return result


@dataclass(frozen=True, slots=True)
class VaultKey:
    """A provisioned per-user OpenRouter key; `secret` is `encrypted:…` (WEBUI_SECRET_KEY)."""

    user_id: str
    key_hash: str
    secret: str
    limit: float | None
    limit_reset: str
    disabled: bool = False


class KeyVault:
    """Provisioned keys, one row per user."""

    def __init__(self, runner: DBRunner, name: str, schema: str | None = None) -> None:
        import sqlalchemy as sa

        self.db = _Table(runner, sa.Table(
            name, sa.MetaData(schema=schema),
            sa.Column("user_id", sa.String(128), primary_key=True),
            sa.Column("key_hash", sa.String(128), nullable=False),
            sa.Column("secret", sa.Text, nullable=False),
            sa.Column("limit_usd", sa.Float, nullable=True),
            sa.Column("limit_reset", sa.String(16), nullable=False, default=""),
            sa.Column("disabled", sa.Boolean, nullable=False, default=False),
            sa.Column("updated_at", sa.Float, nullable=False, default=0.0)))

    async def get(self, user_id: str) -> VaultKey | None:
        found = await self.all(user_id)
        return found[0] if found else None

    async def all(self, user_id: str | None = None) -> list[VaultKey]:
        t = self.db.table
        query = t.select() if user_id is None else t.select().where(t.c.user_id == user_id)
        rows = await self.db.run(lambda conn: list(conn.execute(query)))
        return [VaultKey(r.user_id, r.key_hash, r.secret, r.limit_usd, r.limit_reset,
                         bool(r.disabled)) for r in rows]

    async def delete(self, user_id: str, key_hash: str) -> None:
        """Drop the user's row if it still holds `key_hash` (another worker may have made a
        new key meanwhile)."""
        t = self.db.table
        query = t.delete().where(t.c.user_id == user_id, t.c.key_hash == key_hash)
        await self.db.run(lambda conn: conn.execute(query))

    async def put_first(self, key: VaultKey, now: float) -> VaultKey:
        """Store the user's first key unless another worker stored one first; returns the
        key the table holds afterwards (theirs when they won: only one key may carry the
        user's budget)."""
        t = self.db.table
        row = {"user_id": key.user_id, "key_hash": key.key_hash, "secret": key.secret,
               "limit_usd": key.limit, "limit_reset": key.limit_reset,
               "disabled": key.disabled, "updated_at": now}

        def insert(conn: Any) -> None:
            conn.execute(_dialect_insert(conn, t).values([row])
                         .on_conflict_do_nothing(index_elements=["user_id"]))

        for _ in range(3):  # a row dropped between our insert and our read: insert again
            await self.db.run(insert)
            if (stored := await self.get(key.user_id)) is not None:
                return stored
        raise SpendLedgerError("the user's key row keeps disappearing (another worker?)")

    async def update(self, key: VaultKey, now: float) -> bool:
        """Store a changed limit/reset/disabled for the key the row still holds; False when
        the row now holds another key (another worker replaced it: never write over it)."""
        t = self.db.table
        query = t.update().where(t.c.user_id == key.user_id, t.c.key_hash == key.key_hash) \
            .values(limit_usd=key.limit, limit_reset=key.limit_reset, disabled=key.disabled,
                    updated_at=now)
        return bool(await self.db.run(lambda conn: conn.execute(query).rowcount))


# -- I/O: OpenRouter's key management API -----------------------------------------------------


class KeysClient:
    """GET /key, GET /credits and the /keys management API, each one request (no retries:
    none of these is on a chat's path except a first-time key creation)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def call(self, settings: RequestSettings, key: str, method: str, path: str,
                   body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json",
                   "HTTP-Referer": settings.http_referer,
                   "X-OpenRouter-Title": settings.app_title}
        if body is not None:
            headers["Content-Type"] = "application/json"
        resp = await self._transport.request(
            method, settings.base_url + path, headers=headers,
            body=None if body is None else _dumps(body),
            connect_timeout=settings.connect_timeout, read_timeout=min(settings.read_timeout, 30))
        data = await read_body(resp)
        if resp.status >= 400:
            raise parse_upstream_error(resp.status, data, resp.headers)
        try:
            parsed = _loads(data) if data else {}
        except ValueError as exc:
            raise UpstreamError(f"OpenRouter's {path} answer was not JSON.") from exc
        return parsed if isinstance(parsed, dict) else {}

    async def create_key(self, settings: RequestSettings, name: str, limit: float | None,
                         reset: str) -> tuple[str, str]:
        """POST /keys -> (hash, key); the key is shown only this once."""
        body = {"name": name, "limit": limit, "limit_reset": reset}
        data = await self.call(settings, settings.spend.management_key, "POST", "/keys", body)
        created, key = data.get("data") or {}, data.get("key")
        if not isinstance(key, str) or not created.get("hash"):
            raise UpstreamError("OpenRouter created a key but returned no key or hash.")
        return str(created["hash"]), key

    async def update_key(self, settings: RequestSettings, key_hash: str,
                         changes: Mapping[str, Any]) -> None:
        await self.call(settings, settings.spend.management_key, "PATCH",
                        f"/keys/{urllib.parse.quote(key_hash, safe='')}", changes)

    async def delete_key(self, settings: RequestSettings, key_hash: str) -> None:
        await self.call(settings, settings.spend.management_key, "DELETE",
                        f"/keys/{urllib.parse.quote(key_hash, safe='')}")

    async def generation_cost(self, settings: RequestSettings, generation_id: str
                              ) -> float | None:
        """GET /generation?id= -> its `total_cost` (USD); None when not (yet) known."""
        query = urllib.parse.urlencode({"id": generation_id})
        data = (await self.call(settings, settings.api_key, "GET",
                                f"/generation?{query}")).get("data")
        cost = data.get("total_cost") if isinstance(data, Mapping) else None
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not 0 <= cost < 1e6:
            return None
        return float(cost)


# -- I/O: the service Pipe calls --------------------------------------------------------------


async def owui_group_names(user_id: str) -> list[str]:
    """Names of the Open WebUI groups the user belongs to ([] outside Open WebUI)."""
    try:
        groups = importlib.import_module("open_webui.models.groups").Groups
    except ImportError:
        return []
    found = await _owui_call(groups.get_groups_by_member_id, user_id)
    return [str(getattr(g, "name", "") or "") for g in found or ()]


async def owui_user(user_id: str) -> Mapping[str, Any] | None:
    """{id, email, role} of an Open WebUI user; None when it doesn't exist (any more)."""
    try:
        users = importlib.import_module("open_webui.models.users").Users
    except ImportError:
        return {"id": user_id, "email": "", "role": "user"}
    found = await _owui_call(users.get_user_by_id, user_id)
    if found is None:
        return None
    return {"id": user_id, "email": str(getattr(found, "email", "") or ""),
            "role": str(getattr(found, "role", "") or "")}


class SpendService:
    """Budget checks, key choice, the ledger's write-behind, provisioned keys and the balance.

    Lives on the shared Pipe. Per user it caches the period's spend for
    BUDGET_CHECK_CACHE_SECONDS; a finished turn's cost is added to that cache at once, so in
    one worker only turns admitted while the budget still had room can overshoot it.
    """

    def __init__(self, api: KeysClient, clock: Callable[[], float],
                 wall_clock: Callable[[], float],
                 database: Callable[[], tuple[DBRunner | None, str | None]]) -> None:
        self.api, self._clock, self._wall, self._database = api, clock, wall_clock, database
        self.groups: Callable[[str], Awaitable[list[str]]] = owui_group_names
        self.users: Callable[[str], Awaitable[Mapping[str, Any] | None]] = owui_user
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.errors: dict[str, int] = {}
        self.balance: dict[str, Any] = {}
        self._ledgers: dict[str, SpendLedger | None] = {}
        self._vaults: dict[str, KeyVault | None] = {}
        self._cache: dict[tuple[str, str], tuple[float, date, float, list[str]]] = {}
        self._pending: list[tuple[SpendLedger, LedgerEntry]] = []
        self._writing: list[tuple[SpendLedger, LedgerEntry]] = []
        self._keys: dict[str, tuple[VaultKey, float]] = {}  # user -> key, when read (clock)
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flushing = False
        self._balance_due = 0.0
        self._balance_read = -1e18

    # -- tables --

    def _tables(self, function_id: str) -> tuple[SpendLedger | None, KeyVault | None]:
        if function_id not in self._ledgers:
            runner, schema = self._database()
            self._ledgers[function_id] = None if runner is None else SpendLedger(
                runner, spend_table_name("spend", function_id), schema)
            self._vaults[function_id] = None if runner is None else KeyVault(
                runner, spend_table_name("keys", function_id), schema)
        return self._ledgers[function_id], self._vaults[function_id]

    def ledger(self, turn: Turn) -> SpendLedger | None:
        return self._tables(_function_id(turn))[0] if turn.settings.spend.ledger else None

    def _count(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    # -- step 1: admit --

    async def admit(self, turn: Turn) -> Turn:
        """Budget check and key choice for an admitted turn; raises BudgetExceeded."""
        s = turn.settings.spend
        self._maybe_refresh(turn)
        if s.user_key:
            return _with_key(turn, s.user_key, KEY_OWN, None)
        # no budget: nothing to check before the first byte (the status line reads it later)
        state = await self.state(turn) if s.budgets_on else None
        if state is not None and state.over:
            raise refusal(state, s)
        if state is not None and state.budget.limit is not None and state.warn(s.warn_percent):
            await turn.emitter.status(usage_note(state, s), done=True)
        if turn.req.user_role == "admin":
            await self._low_credit_note(turn)
        if s.management_key and state is not None and state.budget.limit is not None:
            key = await self._provisioned_key(turn, state)
            if key:
                return _with_key(turn, key, KEY_PROVISIONED, state)
        return _with_key(turn, turn.settings.api_key, KEY_PIPE, state)

    async def status_suffix(self, turn: Turn, turn_cost: float | None) -> str:
        """The final status line's spend part; without budgets the ledger is read only now,
        after the answer, never before the first byte."""
        s = turn.settings.spend
        if s.show_in_status and s.state is None and s.key_source != KEY_OWN:
            s = dataclasses.replace(s, state=await self.state(turn))
        return status_suffix(s, turn_cost)

    async def state(self, turn: Turn) -> BudgetState | None:
        """The user's budget and spend this period; None when there is nothing to check or
        the ledger can't be read (then BUDGET_ON_LEDGER_ERROR decides)."""
        s, req = turn.settings.spend, turn.req
        ledger = self.ledger(turn)
        if ledger is None or not (s.budgets_on or s.show_in_status):
            return None
        today = utc_day(self._wall())
        start, end = period_start(s.period, today), next_period_start(s.period, today)
        try:
            spent, groups = await self._spent(ledger, turn, start, end)
        except SpendLedgerError as exc:
            self._count("ledger_read")
            LOG.warning("Spend ledger unreadable (%s); BUDGET_ON_LEDGER_ERROR=%s", exc,
                        s.on_ledger_error)
            budget = resolve_budget(s, req.user_id, req.user_email, req.user_role)
            if s.on_ledger_error == "deny" and budget.limit is not None:
                raise BudgetExceeded("Your spending can't be checked right now, so this chat "
                                     "was not sent.", hint="Retry in a while; an admin can "
                                     "see the failure in the pipe health report.") from exc
            return None
        budget = resolve_budget(s, req.user_id, req.user_email, req.user_role, groups)
        return BudgetState(budget, spent, s.period, end)

    async def _spent(self, ledger: SpendLedger, turn: Turn, start: date, end: date
                     ) -> tuple[float, list[str]]:
        """This period's spend (one indexed read, cached) + the user's group names."""
        s, user = turn.settings.spend, turn.req.user_id
        key, now = (ledger.db.table.name, user), self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[1] == start and now - cached[0] < s.cache_seconds:
            return cached[2], cached[3]
        groups = await self._group_names(user) if s.overrides.groups else []
        spent = await ledger.budget_spent(user, start, end)
        spent += budget_spend(e for lg, e in (*self._pending, *self._writing)
                              if lg is ledger and e.user_id == user and e.day >= start.isoformat())
        self._cache[key] = (now, start, spent, groups)
        return spent, groups

    async def _group_names(self, user_id: str) -> list[str]:
        try:
            return await self.groups(user_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # Open WebUI's database; a group budget falls back to the default
            self._count("group_lookup")
            LOG.warning("Could not read the user's groups for budgets", exc_info=True)
            return []

    # -- after the turn: record --

    def record(self, turn: Turn, usage: Usage | None) -> None:
        """Queue this turn's summed usage for the ledger (background write, never raises)."""
        s = turn.settings.spend
        ledger = self.ledger(turn)
        entry = ledger_entry(turn.req.user_id, turn.req.model_id, s.key_source, usage,
                             self._wall())
        if ledger is None or entry is None:
            return
        cached = self._cache.get((ledger.db.table.name, entry.user_id))
        if cached is not None and entry.day >= cached[1].isoformat():
            self._cache[(ledger.db.table.name, entry.user_id)] = (
                cached[0], cached[1], cached[2] + budget_spend([entry]), cached[3])
        self._pending.append((ledger, entry))
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush())

    async def _flush(self) -> None:
        """Write queued entries until none are left; entries whose write failed stay queued
        (at most 10,000) for the next turn's flush."""
        try:
            while self._pending:
                self._writing, self._pending = self._pending, []
                failed: list[tuple[SpendLedger, LedgerEntry]] = []
                for ledger in {id(lg): lg for lg, _ in self._writing}.values():
                    entries = [e for lg, e in self._writing if lg is ledger]
                    try:
                        await ledger.add(entries, self._wall())
                    except SpendLedgerError as exc:
                        self._count("ledger_write")
                        LOG.warning("Could not record %d spend entries (kept for the next "
                                    "try): %s", len(entries), exc)
                        failed += [(ledger, e) for e in entries]
                self._writing = []
                if failed:
                    self._pending[:0] = merge_queued(failed)[-10_000:]
                    return
        finally:
            self._writing = []
            self._flushing = False

    def settle(self, turn: Turn, rounds: Iterable[UnfinishedRound]) -> None:
        """Record rounds that ended without usage, in the background (a stopped turn's
        cancellation is never held up): the generation record's cost, else the estimate."""
        if self.ledger(turn) is None:
            return
        for unfinished in rounds:
            self._spawn(self._settle(turn, unfinished))

    async def _settle(self, turn: Turn, unfinished: UnfinishedRound) -> None:
        cost = await self._generation_cost(turn, unfinished.generation_id)
        if cost is None:
            self._count("generation_lookup")
            LOG.warning("No generation record for a stopped answer (%s); recording the "
                        "estimate $%.6f", unfinished.generation_id or "no id",
                        unfinished.estimate)
            cost = unfinished.estimate
        else:
            LOG.info("A stopped answer cost $%.6f (generation record)", cost)
        self.record(turn, Usage(cost=cost))

    async def _generation_cost(self, turn: Turn, generation_id: str) -> float | None:
        if not generation_id:
            return None
        for delay in (0.0, *UNFINISHED_LOOKUP_DELAYS):
            if delay:
                await self.sleep(delay)
            try:
                cost = await self.api.generation_cost(turn.settings, generation_id)
            except PipeError as exc:  # 404 until OpenRouter has stored the record
                LOG.debug("Generation record not readable yet: %s", exc)
                continue
            if cost is not None:
                return cost
        return None

    async def drain(self) -> None:
        """Wait for queued ledger writes and background checks (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: typing.Coroutine[Any, Any, Any]) -> None:
        try:
            task = background_task(coro, "orp-spend")
        except RuntimeError:  # no running loop (interpreter shutdown): nothing to write with
            coro.close()
            self._flushing = False
            self._count("ledger_write")
            LOG.warning("No event loop to record spend on; %d entries stay queued",
                        len(self._pending))
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_consume_task_exception)

    # -- provisioned keys --

    async def _provisioned_key(self, turn: Turn, state: BudgetState) -> str | None:
        """The user's own OpenRouter key with their budget as its limit (created or updated
        when needed); None when it can't be had (the ledger budget still applies)."""
        user = turn.req.user_id
        lock = self._key_locks.setdefault(user, asyncio.Lock())
        key: VaultKey | None = None
        try:
            async with lock:
                key = await self._sync_key(turn, state)
            return _reveal_key(key.secret, ConfigError(
                "the stored key can't be decrypted (WEBUI_SECRET_KEY changed)"))
        except (PipeError, ValueError) as exc:
            self._count("key_provisioning")
            LOG.warning("No provisioned key for this user (%s); using the pipe's key", exc)
            if key is not None and isinstance(exc, ConfigError):  # unreadable: make a new one
                await self.forget_key(turn.settings, _function_id(turn), user,
                                      key.key_hash)
            return None

    async def key_rejected(self, turn: Turn) -> None:
        """OpenRouter answered 401 to the user's provisioned key: forget it."""
        key = self._keys.get(turn.req.user_id, (None, 0.0))[0]
        if key is not None:
            await self.forget_key(turn.settings, _function_id(turn), key.user_id, key.key_hash)

    async def forget_key(self, settings: RequestSettings, function_id: str, user_id: str,
                         key_hash: str) -> None:
        """A provisioned key that can't be used (undecryptable, or 401: deleted or revoked
        on OpenRouter): drop it here and, best effort, on OpenRouter; the user's next turn
        provisions a new one. Never raises."""
        cached = self._keys.get(user_id)
        if cached is not None and cached[0].key_hash == key_hash:
            del self._keys[user_id]
        vault = self._tables(function_id)[1]
        try:
            if vault is not None:
                await vault.delete(user_id, key_hash)
        except SpendLedgerError as exc:
            self._count("key_forget")
            LOG.warning("Could not drop the unusable provisioned key: %s", exc)
            return
        LOG.warning("Dropped this user's unusable provisioned key; a new one will be made")
        self._spawn(self._delete_key(settings, key_hash))

    async def _delete_key(self, settings: RequestSettings, key_hash: str) -> None:
        """Best effort: delete a dropped key on OpenRouter (it may be gone already)."""
        try:
            await self.api.delete_key(settings, key_hash)
        except UpstreamStatusError as exc:
            if exc.status != 404:
                self._count("key_forget")
                LOG.warning("Could not delete the dropped key on OpenRouter: %s", exc)
        except (PipeError, ValueError) as exc:
            self._count("key_forget")
            LOG.warning("Could not delete the dropped key on OpenRouter: %s", exc)

    async def _sync_key(self, turn: Turn, state: BudgetState) -> VaultKey:
        settings, req = turn.settings, turn.req
        vault = self._tables(_function_id(turn))[1]
        if vault is None or _fernet_from_secret() is None:
            raise ConfigError("no database or no WEBUI_SECRET_KEY to keep keys encrypted")
        want = (state.budget.limit, settings.spend.period, False)
        for _ in range(2):  # a second pass when another worker replaced the remembered key
            key = self._remembered(req.user_id, settings.spend.cache_seconds)
            if key is not None and (key.limit, key.limit_reset, key.disabled) == want:
                return key  # the common turn: nothing read, nothing sent
            read = key is None
            if key is None:
                key = await vault.get(req.user_id) or await self._first_key(turn, vault, want)
            if (key.limit, key.limit_reset, key.disabled) != want:
                key = await self._limit_key(turn, vault, key, want, read)
            if key is not None:
                self._keys[req.user_id] = (key, self._clock())
                return key
            self._keys.pop(req.user_id, None)
        raise ConfigError("this user's budget key keeps being replaced by another worker")

    def _remembered(self, user_id: str, max_age: float) -> VaultKey | None:
        """This worker's copy of the user's key while younger than `max_age` seconds (the
        budget check's cache time): another worker may have replaced the row (a key dropped
        after a 401), and two live keys would each carry the whole budget."""
        key, read_at = self._keys.get(user_id, (None, -math.inf))
        return key if self._clock() - read_at <= max_age else None

    async def _limit_key(self, turn: Turn, vault: KeyVault, key: VaultKey,
                         want: tuple[float | None, str, bool], just_read: bool
                         ) -> VaultKey | None:
        """Give the key the budget's limit, upstream and in the table; None when the table
        holds another key now (another worker replaced it: ours is neither limited nor
        written back over theirs). A key remembered, not `just_read`, is checked first."""
        if not just_read:
            stored = await vault.get(key.user_id)
            if stored is None or stored.key_hash != key.key_hash:
                return None
        await self.api.update_key(turn.settings, key.key_hash, {
            "limit": want[0], "limit_reset": want[1], "disabled": False})
        key = dataclasses.replace(key, limit=want[0], limit_reset=want[1], disabled=False)
        if not await vault.update(key, self._wall()):  # replaced meanwhile: take theirs
            return None
        LOG.info("Updated this user's OpenRouter key (limit %s %s)", *want[:2])
        return key

    async def _first_key(self, turn: Turn, vault: KeyVault,
                         want: tuple[float | None, str, bool]) -> VaultKey:
        """Create the user's key upstream and store it; when another worker stored one in
        the meantime, theirs is used and ours is deleted upstream (two live keys would each
        carry the whole budget)."""
        settings, req = turn.settings, turn.req
        name = f"Open WebUI {req.user_email or req.user_id}"[:100]
        key_hash, secret = await self.api.create_key(settings, name, *want[:2])
        made = VaultKey(req.user_id, key_hash, EncryptedStr._encrypt(secret), *want)
        try:
            kept = await vault.put_first(made, self._wall())
        except SpendLedgerError:  # not stored: nobody could use or limit it again
            self._spawn(self._delete_key(settings, made.key_hash))
            raise
        if kept.key_hash != made.key_hash:
            LOG.info("Another worker provisioned this user's key first; using it")
            self._spawn(self._delete_key(settings, made.key_hash))
        else:
            LOG.info("Provisioned an OpenRouter key for this user (limit %s %s)", *want[:2])
        return kept

    async def disable_departed(self, settings: RequestSettings, function_id: str) -> int:
        """Disable provisioned keys of users deleted, set to `pending`, or outside every group
        MODEL_ACCESS names; returns how many. (A user who can still chat, e.g. through a model
        an admin shared by hand, gets the key back on their next chat.)"""
        vault = self._tables(function_id)[1]
        if vault is None or not settings.spend.management_key:
            return 0
        done = 0
        for key in await vault.all():
            if key.disabled:
                continue
            user = await self.users(key.user_id)
            if user is not None and await self._still_allowed(key.user_id, user,
                                                              settings.records.access):
                continue
            await self.api.update_key(settings, key.key_hash, {"disabled": True})
            await vault.update(dataclasses.replace(key, disabled=True), self._wall())
            self._keys.pop(key.user_id, None)
            LOG.info("Disabled the provisioned key of departed user %s", key.user_id)
            done += 1
        return done

    async def _still_allowed(self, user_id: str, user: Mapping[str, Any], access: AccessSpec
                             ) -> bool:
        role = str(user.get("role") or "")
        if role == "pending":
            return False
        if access.mode != "groups" or role == "admin":
            return True  # `admins`: ordinary users chat only through records shared by hand
        try:
            groups = await self.groups(user_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # Open WebUI's database: keep the key rather than guess
            self._count("group_lookup")
            LOG.warning("Could not read a user's groups; their budget key stays on",
                        exc_info=True)
            return True
        return may_use_models(role, groups, access)

    # -- balance --

    def _maybe_refresh(self, turn: Turn) -> None:
        s = turn.settings.spend
        if not (s.low_credit_usd or s.management_key) or self._clock() < self._balance_due:
            return
        self._balance_due = self._clock() + s.balance_refresh
        self._spawn(self.refresh(turn.settings, _function_id(turn)))

    async def refresh(self, settings: RequestSettings, function_id: str,
                      max_age: float = 0.0) -> None:
        """Read /key and /credits (unless read less than `max_age` seconds ago); disable keys
        of departed users. Failures are recorded, never raised."""
        if max_age and self._clock() - self._balance_read < max_age:
            return
        self._balance_read = self._clock()
        out: dict[str, Any] = {"fetched_at": round(self._wall(), 1)}
        for name, key, path in (("key", settings.api_key, "/key"),
                                ("credits", settings.spend.management_key or settings.api_key,
                                 "/credits")):
            try:
                out[name] = (await self.api.call(settings, key, "GET", path)).get("data")
            except PipeError as exc:
                out[name] = None
                out[f"{name}_error"] = describe_error(exc).splitlines()[0][:200]
        self.balance = out
        try:
            await self.disable_departed(settings, function_id)
        except (PipeError, ValueError) as exc:
            self._count("key_disable")
            LOG.warning("Could not check provisioned keys of departed users: %s", exc)
        except Exception:  # Open WebUI's user table failing must not end the background task
            self._count("key_disable")
            LOG.warning("Could not check provisioned keys of departed users", exc_info=True)

    def remaining_credit(self) -> float | None:
        credits = self.balance.get("credits")
        if isinstance(credits, Mapping) and isinstance(credits.get("total_credits"), int | float):
            return float(credits["total_credits"]) - float(credits.get("total_usage") or 0.0)
        key = self.balance.get("key")
        if isinstance(key, Mapping) and isinstance(key.get("limit_remaining"), int | float):
            return float(key["limit_remaining"])
        return None

    async def _low_credit_note(self, turn: Turn) -> None:
        s, left = turn.settings.spend, self.remaining_credit()
        if s.low_credit_usd and left is not None and left < s.low_credit_usd:
            await turn.emitter.status(
                f"⚠️ OpenRouter credit is low: {money(left, s.currency, s.rate)} left "
                f"(warning below {money(s.low_credit_usd, s.currency, s.rate)})", done=True)

    # -- reports --

    def health(self, turn: Turn) -> dict[str, Any]:
        ledger = self.ledger(turn)
        return {"ledger": "off" if not turn.settings.spend.ledger else
                ("ready" if ledger is not None else "unavailable (no database)"),
                "errors": dict(self.errors), "queued_writes": len(self._pending),
                "remaining_credit_usd": self.remaining_credit(), "balance": self.balance}

    async def report(self, turn: Turn, user_id: str | None = None
                     ) -> list[dict[str, Any]]:
        """Rows of this and the previous period (one user's when `user_id` is given)."""
        ledger, s = self.ledger(turn), turn.settings.spend
        if ledger is None:
            raise SpendLedgerError("The spend ledger is off or there is no database.")
        today = utc_day(self._wall())
        start = previous_period_start(s.period, today)
        entries = await ledger.entries(start, next_period_start(s.period, today), user_id)
        names: dict[str, str] = {}
        if user_id is None:
            for uid in {e.user_id for e in entries}:
                with contextlib.suppress(Exception):
                    found = await self.users(uid)
                    names[uid] = "(deleted user)" if found is None else str(
                        found.get("email") or "")
        return report_rows(entries, s.period, today, names)


def merge_queued(queued: list[tuple[SpendLedger, LedgerEntry]]
                 ) -> list[tuple[SpendLedger, LedgerEntry]]:
    """Queued entries summed per ledger and key, so a long outage keeps one entry per user,
    day, model and key instead of one per turn."""
    out: list[tuple[SpendLedger, LedgerEntry]] = []
    for ledger in {id(lg): lg for lg, _ in queued}.values():
        out += [(ledger, e) for e in merge_entries(e for lg, e in queued if lg is ledger)]
    return out


def _function_id(turn: Turn) -> str:
    return turn.req.owui_model_id.split(".", 1)[0] or "openrouter"


def _with_key(turn: Turn, key: str, source: str, state: BudgetState | None) -> Turn:
    s = turn.settings
    if s.api_key == key and s.spend.key_source == source and s.spend.state is state:
        return turn  # the common turn: the pipe's key, no budget read
    spend = dataclasses.replace(s.spend, key_source=source, state=state)
    return dataclasses.replace(turn, settings=dataclasses.replace(
        turn.settings, api_key=key, spend=spend))


def spend_health_lines(spend: Mapping[str, Any] | None) -> list[str]:
    """The health report's spend line: ledger, its errors, the balance."""
    if not spend:
        return []
    left = spend.get("remaining_credit_usd")
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(spend["errors"].items())) or "none"
    return [f"- Spend: ledger {spend['ledger']}, {spend['queued_writes']} writes queued, "
            f"errors {errors}; remaining credit "
            f"{'unknown' if left is None else money(left)} (send `spend` or `spend csv` "
            "for the report)"]


def my_usage_text(rows: list[dict[str, Any]], state: BudgetState | None,
                  s: SpendSettings) -> str:
    """The 'my usage' answer: the user's own spend, budget and reset."""
    text = spend_markdown(rows, s, "Your OpenRouter usage")
    if state is None:
        return text + "\nNo budget information is available right now."
    if state.budget.limit is None:
        return text + f"\nYou have no budget limit ({usage_note(state, s)})."
    left = max(state.budget.limit - state.spent, 0.0)
    return (text + f"\nBudget: {usage_note(state, s)}; {money(left, s.currency, s.rate)} "
            f"left; resets on {reset_words(state.resets_on)}.")


# ─────────────────────────────────────────────────────────────────────────────
# §18 Telemetry
# ─────────────────────────────────────────────────────────────────────────────

#
# Every log line the pipe writes is redacted (keys, bearer tokens, Fernet tokens, data-URL
# payloads, values of header-like keys in dict arguments and in text), stamped with the
# request, user and chat ids from a context variable, kept in that request's own buffer (so an
# admin can read one turn's log from the chat; a non-admin's copy leaves out DEBUG lines and
# tracebacks) and handed to a background thread for the server log, so logging never blocks
# the event loop.
# ─────────────────────────────────────────────────────────────────────────────

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"sk-or-[A-Za-z0-9_\-]{6,}"), "sk-or-[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{6,}"), r"\1[redacted]"),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\",}\s]+(\s+[^'\",}\s]+)?"),
     r"\1[redacted]"),
    (re.compile(r"gAAAAA[A-Za-z0-9_\-=]{20,}"), "[fernet-token]"),
    (re.compile(r"(data:[\w.+\-/]+;base64,)[A-Za-z0-9+/=]{16,}"), r"\1[payload]"),
    # `"x-api-key": "…"`, `api_key='…'`, `cookie=…` in JSON, reprs and key=value text; the
    # lookbehind starts a match only at a word's start (linear on long words)
    (re.compile(r"""(?i)((?<![\w-])["']?(?:[\w-]*(?:token|secret|key)|authorization|cookie)"""
                r"""["']?\s*[:=]\s*)("(?:[^"\\\n]|\\.)*"?|'[^'\n]*'?|[^\s"',}]+)"""),
     r'\1"[redacted]"'),  # an unclosed quote redacts to the line's end (and stays linear)
)
_SECRET_KEY = re.compile(r"(?i)(?:.*(?:token|secret|key)|authorization|cookie|"
                         r"proxy-authorization|set-cookie)")
_HEADER_MAPS = frozenset({"headers", "http_headers"})


def is_secret_key(name: str) -> bool:
    """A header-like key whose value is a credential: authorization, cookie, x-api-key,
    api-key and anything ending in `token`, `secret` or `key` (any case, `-` or `_`)."""
    return _SECRET_KEY.fullmatch(name.strip()[-64:]) is not None


def redact_payload(value: Any, depth: int = 0) -> Any:
    """A copy of a dict/list payload with every credential value replaced, for logging:
    values of header-like keys, and every value of a `headers` mapping (remote MCP servers'
    headers may carry a credential under any name). Pure; the input is not changed."""
    if depth > 64:
        return "[…]"
    if isinstance(value, Mapping):
        return {k: "[redacted]" if isinstance(k, str) and is_secret_key(k)
                else _redact_headers(v) if k in _HEADER_MAPS
                else redact_payload(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_payload(v, depth + 1) for v in value]
    return value


def _redact_headers(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: "[redacted]" for k in value}
    return "[redacted]" if value else value
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


# Every match of a _REDACTIONS pattern contains one of these words: a line without any of
# them (most log lines) is scanned once instead of once per pattern.
_REDACTION_TRIGGER = re.compile(r"(?i)sk-or-|bearer|authoriz|gAAAAA|data:|token|secret|key|"
                                r"cookie")


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "[secret]")
    if _REDACTION_TRIGGER.search(text) is None:
        return text
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


@dataclass(slots=True)
class RequestLog:
    """One turn's log: its ids, its threshold, and the lines it wrote.

    Each line is kept twice: as the admin reads it, and as anyone may read it (None when
    the whole line is admin-only: DEBUG lines carry request bodies, system prompts and
    tool arguments; tracebacks may quote anything). `text(admin=False)` is what a
    non-admin's log citation shows.
    """

    request_id: str
    user_id: str = "-"
    chat_id: str = "-"
    level: int = logging.INFO
    lines: deque[tuple[str, str | None]] = field(default_factory=lambda: deque(maxlen=1000))

    def text(self, *, admin: bool = True) -> str:
        if admin:
            return "\n".join(full for full, _ in self.lines)
        shown = [public for _, public in self.lines if public is not None]
        hidden = len(self.lines) - len(shown)
        if hidden:
            shown.append(f"({hidden} admin-only line(s) not shown: request details and "
                         "tracebacks; an admin can read them by this reference.)")
        return "\n".join(shown)


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
        if isinstance(record.args, tuple):
            record.args = tuple(redact_payload(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = redact_payload(record.args)
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(_LINE_FORMAT.formatException(record.exc_info))
        record.request_id = ctx.request_id if ctx else "-"
        record.user_id = ctx.user_id if ctx else "-"
        record.chat_id = ctx.chat_id if ctx else "-"
        if ctx is not None:
            full = _LINE_FORMAT.format(record)
            private = record.levelno < logging.INFO or getattr(record, "orp_private", False)
            public = None if private else \
                f"{record.asctime} {record.levelname:<7} {record.msg}" \
                f"{' [traceback: admin only]' if record.exc_text else ''}"
            ctx.lines.append((full, public))
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
        self.providers: dict[str, dict[str, int]] = {}  # issue #12: turns/failures each

    def provider_route(self, served: str, failed: Iterable[str]) -> None:
        """Count a turn for the provider that served and a failure for each that failed."""
        for name, key in [(served, "turns"), *((f, "failures") for f in failed)]:
            if name:
                row = self.providers.setdefault(name[:80], {"turns": 0, "failures": 0})
                row[key] += 1

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
                     "rejected_busy": gate.rejected, "failed_by_kind": dict(tel.failures),
                     "scope": f"this worker (pid {os.getpid()})"},
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
        "providers": {name: dict(row) for name, row in sorted(tel.providers.items())},
        "artifact_store": storage[0] if storage else "not configured",
        "redis": storage[1] if storage else "not used",
    }


def _inline(value: Any) -> str:
    """`{"a": 1, "b": None}` -> `a 1, b none` for the one-line health summary."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k.replace('_', ' ')} {'none' if v is None else v}"
                         for k, v in value.items())
    return str(value)


def _records_line(rec: Mapping[str, Any] | None) -> str:
    if not rec:
        return "- Model records: not reported"
    text = f"- Model records: {rec.get('state')}"
    if "listed" in rec:
        text += (f", {rec['listed']} listed; last run inserted {rec.get('inserted', 0)}, "
                 f"updated {rec.get('updated', 0)}, switched off {rec.get('switched_off', 0)}")
    if rec.get("unknown_groups"):
        text += "; MODEL_ACCESS groups not found: " + ", ".join(rec["unknown_groups"])
    if rec.get("last_error"):
        text += f"; last error: {rec['last_error']}"
    return text


def health_markdown(data: Mapping[str, Any]) -> str:
    """A short report an admin reads in the chat, with the JSON underneath."""
    req, up, cat = data["requests"], data["upstream"], data["catalog"]
    lines = [
        "### OpenRouter pipe health",
        f"- Requests ({req.get('scope', 'this worker')}): {req['in_flight']} in flight, "
        f"{req['waiting']} waiting, "
        f"{req['total']} served since start ({data['uptime_s']:.0f}s ago), "
        f"{req['rejected_busy']} turned away as busy",
        f"- Upstream latency p50/p95: {up['latency_ms_p50']} / {up['latency_ms_p95']} ms; "
        f"first token p50/p95: {up['first_token_ms_p50']} / {up['first_token_ms_p95']} ms",
        "- Upstream responses by status: " + (", ".join(
            f"{k}: {v}" for k, v in sorted(up["responses_by_status"].items())) or "none yet"),
        "- Failures by kind: " + (", ".join(
            f"{k}: {v}" for k, v in sorted(req["failed_by_kind"].items())) or "none"),
        "- Providers (turns / failures): " + (", ".join(
            f"{k}: {v['turns']} / {v['failures']}" for k, v in data.get("providers", {}).items())
            or "none reported yet"),
        f"- Catalog: {cat['models']} models, age {cat['age_s']}s"
        + (f", last refresh error: {cat['last_error']}" if cat["last_error"] else ""),
        _records_line(data.get("model_records")),
        f"- Breakers: {data['breakers'] or 'none'}; "
        f"artifact store: {_inline(data['artifact_store'])}; Redis: {_inline(data['redis'])}",
        *spend_health_lines(data.get("spend")),  # issue #13
        "", "```json", json.dumps(data, indent=2), "```"]
    return "\n".join(lines)


# ─────────────────────────────────────────────────────────────────────────────
# §19 Pipe
# ─────────────────────────────────────────────────────────────────────────────


def parse_chat_request(body: Any, user: Mapping[str, Any] | None, metadata: Any,
                       task: str | None) -> ChatRequest:
    """Open WebUI's `body` + call context -> ChatRequest (the boundary parse). Any shape it
    can't read raises `BadRequest` naming the field; it never raises anything else."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"the body must be a JSON object, not {_kind(body)}.")
    meta = metadata if isinstance(metadata, Mapping) else {}
    raw_messages = body.get("messages") if body.get("messages") is not None else []
    if not isinstance(raw_messages, list | tuple):
        raise BadRequest(f"`messages` must be a list, not {_kind(raw_messages)}.")
    owui_id = _field_str(body.get("model"), "model")
    return ChatRequest(
        owui_model_id=owui_id, model_id=openrouter_model_id(owui_id),
        messages=tuple(_parse_message(m, n) for n, m in enumerate(raw_messages)),
        stream=bool(body.get("stream", False)), params=_sampling_params(body),
        max_tokens=_max_tokens(body),
        reasoning_effort=_str_or_none(body.get("reasoning_effort")),
        response_format=_response_format(body.get("response_format")),
        task=task or _str_or_none(meta.get("task")),
        chat_id=_str_or_none(meta.get("chat_id")),
        user_id=str((user or {}).get("id") or "anonymous"),
        user_role=str((user or {}).get("role") or "user"),
        tools=parse_body_tools(body.get("tools")),
        user_email=str((user or {}).get("email") or ""))


MAX_INT_PARAM = 2**53  # larger whole numbers are not exact in JSON readers (and orjson stops
                       # at 64 bits): refused rather than sent


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _field_str(value: Any, where: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadRequest(f"`{where}` must be a string, not {_kind(value)}.")


def _number(value: Any, where: str, *, whole: bool = False) -> int | float:
    """A finite JSON number (bools, NaN, Infinity, strings and huge values refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"`{where}` must be a number, not {_kind(value)}.")
    if not (-MAX_INT_PARAM <= value <= MAX_INT_PARAM):  # False for NaN too
        raise BadRequest(f"`{where}` must be a finite number below {MAX_INT_PARAM:,}.")
    if whole and value != int(value):
        raise BadRequest(f"`{where}` must be a whole number, not {value!r}.")
    return int(value) if whole else value


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_output_tokens", "max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None or value == 0:
            continue
        number = int(_number(value, key))
        return number if number > 0 else None  # 0 or -1 ("no limit" in some clients)
    return None


def _sampling_params(body: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key in (*_SAMPLING_PARAMS, "seed"):
        value = body.get(key)
        if value is None:
            continue
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(v, str) for v in stops):
                raise BadRequest("`stop` must be a string or a list of strings.")
        elif key == "parallel_tool_calls":
            if not isinstance(value, bool):
                raise BadRequest(f"`parallel_tool_calls` must be true or false, not "
                                 f"{_kind(value)}.")
        else:
            value = _number(value, key, whole=key in ("seed", "top_k"))
        params[key] = value
    return params


def _response_format(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BadRequest(f"`response_format` must be an object, not {_kind(value)}.")
    spec = value.get("json_schema")
    if value.get("type") == "json_schema" and not isinstance(spec, Mapping | None):
        raise BadRequest(f"`response_format.json_schema` must be an object, not {_kind(spec)}.")
    return value


def _str_or_none(value: Any) -> str | None:
    return str(value) if value and isinstance(value, str | int | float) else None


def _parse_message(raw: Any, n: int) -> ChatMessage:
    where = f"messages[{n}]"
    if not isinstance(raw, Mapping):
        raise BadRequest(f"`{where}` must be an object, not {_kind(raw)}.")
    raw_calls = raw.get("tool_calls")
    if raw_calls is not None and not isinstance(raw_calls, list):
        raise BadRequest(f"`{where}.tool_calls` must be a list, not {_kind(raw_calls)}.")
    calls = tuple(_tool_call(c, f"{where}.tool_calls[{k}]")
                  for k, c in enumerate(raw_calls or ()))
    return ChatMessage(role=_field_str(raw.get("role"), f"{where}.role") or "user",
                       parts=parse_content(raw.get("content")), tool_calls=calls,
                       tool_call_id=_str_or_none(raw.get("tool_call_id")))


def _tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, Mapping):
        raise BadRequest(f"`{where}` must be an object, not {_kind(raw)}.")
    fn = raw.get("function") if raw.get("function") is not None else {}
    if not isinstance(fn, Mapping):
        raise BadRequest(f"`{where}.function` must be an object with `name` and "
                         f"`arguments`, not {_kind(fn)}.")
    args = fn.get("arguments")
    if args is not None and not isinstance(args, str):  # some clients send the object itself
        try:
            args = json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BadRequest(f"`{where}.function.arguments` is not JSON ({exc}).") from None
    return ToolCall(_field_str(raw.get("id"), f"{where}.id"),
                    _field_str(fn.get("name"), f"{where}.function.name"), args or "")


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
    images: ImageSink | None = None  # this turn's generated pictures (issue #14)

    @property
    def reference(self) -> str:
        return f"req-{self.log.request_id}"


@dataclass(slots=True)
class TurnRun:
    """What the tool loop hands back to `_stream`: the last round's state, and the summed
    usage of every round OpenRouter reported usage for (None: no round did). It stays
    right when a later round fails, so billed rounds are reported (and can be charged)."""

    state: StreamState = field(default_factory=StreamState)
    usage: Usage | None = None
    notes: tuple[str, ...] = ()  # what was left out of the request (toasts)
    unfinished: list[UnfinishedRound] = field(default_factory=list)  # stopped: no usage

    def add_usage(self, usage: Usage | None) -> None:
        if usage is not None:
            if self.usage is None:
                self.usage = Usage()
            self.usage.add(usage)


def round_items(items: Iterable[Mapping[str, Any]], outcomes: Iterable[ToolOutcome]
                ) -> list[dict[str, Any]]:
    """A round's reasoning + function_call items, then its function_call_output items."""
    return [*(dict(i) for i in items
              if i.get("type") != "message" and i.get("type") not in IMAGE_ITEM_TYPES),
            *(o.item() for o in outcomes)]


def limit_notice(rounds: int) -> str:
    return (f"\n\n⚠️ The tool-call limit ({rounds} rounds) was reached, so the model was asked "
            "to answer with the results it has.\n\n")


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
                 intake: Intake | None = None,
                 artifact_db: DBRunner | None = None,
                 redis_factory: Callable[[str], Any] | None = None,
                 env: Mapping[str, Any] | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 model_records: Callable[[], ModelRecordsAPI] | None = None,
                 function_id: str | None = None) -> None:
        self.type = "manifold"
        self.valves = self.Valves()
        self._clock = clock
        self._telemetry = Telemetry(clock)
        self._logs = RecentLogs()
        self._client = OpenRouterClient(transport or AiohttpTransport(), sleep,
                                        observe=self._telemetry.upstream, clock=clock)
        self._catalog = CatalogRegistry(self._client.fetch_models, clock)
        self._gate = AdmissionGate(clock)
        self._tools = ToolRunner(clock)
        self._models_cache: tuple[Any, list[dict[str, str]]] | None = None
        self._listing: tuple[tuple[Any, ...], RequestSettings] | None = None
        self._intake = intake or Intake()
        self._artifact_db = artifact_db
        self._redis_factory = redis_factory or _redis_from_url
        self._env = env
        self._wall_clock = wall_clock
        self._stores: dict[tuple[str, bool], ArtifactStore] = {}

        # ── Team access and model records (issue #10) ──
        self._function_id = function_id or function_id_from_module(__name__)
        self._records = RecordSync(model_records or OwuiModelRecords, clock,
                                   busy=lambda: self._gate.active > 0 or self._arriving > 0)
        self._arriving = 0  # chats reading their model record before admission
        self._merged: dict[Any, RequestSettings] = {}  # recent merges (see _settings)
        self._selected: tuple[Any, frozenset[str]] | None = None

        # ── Routing, fallbacks, caching (issue #12) ──
        # the model editor's per-model settings (an I/O edge: tests replace it)
        self._model_params: Callable[[str], Awaitable[Mapping[str, Any] | None]] = \
            owui_model_params
        self._may_read_model: Callable[[str, str], Awaitable[bool]] = owui_may_read_model

        # ── Spend control (issue #13) ──
        self._spend = SpendService(
            KeysClient(self._client._transport), clock, wall_clock,
            lambda: (artifact_db, None) if artifact_db else (owui_db_runner(), owui_db_schema()))
        self._spend.sleep = sleep  # generation-record retries for stopped answers

        # ── Image output (issue #14) ──
        self._image_options = ImageOptionsCache(clock)

    # -- model list ----------------------------------------------------------------------

    async def pipes(self) -> list[dict[str, str]]:
        """The selector entries; called by Open WebUI on every model-list request."""
        valves = self.valves
        _BASE_LEVEL[0] = logging.getLevelName(valves.LOG_LEVEL)
        try:
            settings = self._listing_settings(valves)
            snap = await self._catalog.get(settings, settings.catalog_ttl)
        except PipeError as exc:
            return [_status_entry("catalog", f"catalog unavailable: {exc}")]
        key = (snap, valves.MODEL_ID, valves.MODEL_NAME_PREFIX, valves.SHOW_HEALTH_MODEL,
               settings.records, self._function_id, settings.routing,
               recent_refusals(time.time()), valves.SPEND_LEDGER)
        if self._models_cache is None or self._models_cache[0] != key:
            models, selected = build_model_list(snap, valves.MODEL_ID, valves.MODEL_NAME_PREFIX,
                                                settings.routing)
            if valves.SHOW_HEALTH_MODEL:
                models.append(HEALTH_ENTRY)
            if valves.SPEND_LEDGER:
                models.append(MY_USAGE_ENTRY)  # every user's own spend (issue #13)
            self._models_cache = (key, models)
            self._sync_records(models, selected, settings.records)
        else:
            self._records.poll()
        return self._models_cache[1]

    def _sync_records(self, models: list[dict[str, str]], selected: Iterable[CatalogEntry],
                      rs: RecordSettings) -> None:
        """Hand the listed entries to the background record sync (§6); returns at once."""
        if not rs.enabled or not self._function_id:
            self._records.status = {"state": "off" if not rs.enabled else
                                    "waiting for the function id (first chat)"}
            return
        by_id = {e.id: e for e in selected}
        items = tuple((f"{self._function_id}.{m['id']}", m["name"], by_id.get(m["id"]))
                      for m in models if record_wanted(m["id"]))
        self._records.submit(RecordJob(f"{self._function_id}.", items, rs))

    def _settings(self, user: BaseModel | None, role: str, model_params: Mapping[str, Any],
                  body_provider: Any) -> RequestSettings:
        """RequestSettings.merge, remembered for the last few distinct inputs: the same valves,
        user valves, role and per-model settings give the same frozen settings (the merge
        reads a dozen JSON valves; most turns repeat one of a few combinations)."""
        try:
            key: Any = (tuple(self.valves.__dict__.values()),
                        tuple(user.__dict__.values()) if user else None, role,
                        tuple(sorted((str(k), str(v)) for k, v in model_params.items())),
                        None if body_provider is None else _dumps(body_provider),
                        os.environ.get("WEBUI_SECRET_KEY"))
            hash(key)
        except (TypeError, ValueError, RecursionError):  # unhashable or odd input: no cache
            return RequestSettings.merge(self.valves, typing.cast(Any, user), role,
                                         model_params, body_provider)
        found = self._merged.get(key)
        if found is None:
            found = RequestSettings.merge(self.valves, typing.cast(Any, user), role,
                                          model_params, body_provider)
            if len(self._merged) >= 64:
                self._merged.pop(next(iter(self._merged)))
            self._merged[key] = found
        return found

    def _listing_settings(self, valves: BaseModel) -> RequestSettings:
        """Admin settings for the model list, merged again only when a valve changed (Open
        WebUI hands `pipes()` a fresh Valves object on every call, with the same values)."""
        values = (*valves.__dict__.values(), os.environ.get("WEBUI_SECRET_KEY"))
        if self._listing is None or self._listing[0] != values:
            self._listing = (values, RequestSettings.merge(typing.cast(Valves, valves), None))
        return self._listing[1]

    # -- chat ----------------------------------------------------------------------------

    async def pipe(self, body: dict[str, Any], __user__: dict[str, Any] | None = None,
                   __metadata__: dict[str, Any] | None = None,
                   __event_emitter__: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
                   __event_call__: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
                   __task__: str | None = None, __tools__: dict[str, Any] | None = None,
                   __files__: list[dict[str, Any]] | None = None, __request__: Any = None
                   ) -> str | AsyncIterator[dict[str, Any]]:
        """Serve one chat turn: a plain string for tasks and `stream: false`, else chunks.
        Failures are words for the user: chunks for streams, a raised PipeError (whose str()
        Open WebUI shows) for tasks and `stream: false`; never another exception."""
        try:
            req = parse_chat_request(body, __user__, __metadata__, __task__)
        except PipeError as exc:  # 1 the boundary parse: a body the pipe can't read
            LOG.warning("Refused a request: %s", exc)
            return _refuse(body, __metadata__, __task__, exc)
        if not self._function_id and "." in req.owui_model_id:  # loaded under an odd name
            self._function_id = req.owui_model_id.split(".", 1)[0]
        try:
            model_params = await self._model_context(req, __metadata__)  # access, per-model
        except ModelNotAvailable as exc:
            return _fail_fast(req, exc)
        try:                                                               # 2 settings
            settings = self._settings(_as_user_valves((__user__ or {}).get("valves")),
                                      req.user_role, model_params, body.get("provider"))
        except PipeError as exc:
            return _fail_fast(req, exc)
        log = RequestLog(uuid.uuid4().hex[:12], req.user_id, req.chat_id or "-",
                         settings.log_level)
        context = CallContext(_mapping(__metadata__), _mapping(__tools__),
                              tuple(f for f in __files__ or () if isinstance(f, Mapping)),
                              __request__, __event_call__)
        turn = Turn(req, settings, Emitter(__event_emitter__), log, context)
        self._logs.add(log)
        if req.model_id == HEALTH_ENTRY["id"]:
            return await self._health(turn)
        if req.model_id == MY_USAGE_ENTRY["id"]:
            return await self._my_usage(turn)
        if req.task == PROMPT_TOOL_TASK and settings.tools.mode == "pipe":
            return NO_PROMPT_TOOL_CALLS  # the pipe runs the tools itself (see §13)
        if req.task:
            return await self._complete(turn)
        if not req.stream:
            return await self._collect(turn)
        return self._stream(turn)

    async def _model_context(self, req: ChatRequest, metadata: Any) -> Mapping[str, Any]:
        """Open WebUI's record of the model: may this user read it (0.6.x), and the admin's
        per-model routing (#12). The record sync yields while these reads run."""
        self._arriving += 1
        try:
            if req.user_role != "admin" and not await self._may_read_model(req.owui_model_id,
                                                                           req.user_id):
                LOG.warning("Refused %s to user %s: no read access to its model record",
                            req.owui_model_id, req.user_id)
                raise ModelNotAvailable(
                    "This model is not available to you.",
                    hint="Pick a model from your model selector; an admin decides who sees "
                         "which models (MODEL_ACCESS).")
            params = await self._model_params(req.owui_model_id)
        finally:
            self._arriving -= 1
        return model_custom_params(metadata, req.owui_model_id) if params is None else params

    async def _collect(self, turn: Turn) -> str:
        """`stream: false` chats (e.g. "Stream Chat Response" off): the streamed turn, web
        search and memory included, returned as one string with its thinking blocks. Tools
        run in the pipe whatever TOOL_EXECUTION_MODE says: Open WebUI runs tool calls only
        from streamed answers. A failure before any text is raised (Open WebUI shows it as
        the error); after text it stays in the answer."""
        tools = dataclasses.replace(turn.settings.tools, mode="pipe")
        streamed = dataclasses.replace(
            turn, req=dataclasses.replace(turn.req, stream=True),
            settings=dataclasses.replace(turn.settings, tools=tools))
        answer = CollectedAnswer(self._clock)
        async with contextlib.aclosing(self._stream(streamed)) as chunks:
            async for chunk in chunks:
                if "error" in chunk:
                    raise PipeError(str(chunk["error"].get("message") or "The answer failed."))
                answer.add(chunk)
        return answer.text()

    async def _complete(self, turn: Turn) -> str:
        """Tasks: one non-streamed request, the answer as a string."""
        token = CURRENT_LOG.set(turn.log)
        sent: Mapping[str, Any] = {}
        flight = Flight()  # in flight only while the call is out (a cancel may be billed)
        try:
            self._telemetry.requests += 1
            async with self._gate.admit(turn.req.user_id, turn.settings.admission):  # 1 admit
                entry = await self._resolve_entry(turn.req, turn.settings)
                if "text" not in entry.output_modalities:
                    return ""  # image-only models write no titles or tags (issue #14)
                turn = await self._spend.admit(turn)                      # 1 budget, key
                plan = await self._plan(turn)                                # 3 catalog, 6
                for note in plan.notes:
                    await turn.emitter.notify(note)
                sent = plan.payload
                data = await self._open(turn, plan.payload, functools.partial(
                    self._client.complete, flight=flight))                          # 7
            self._spend.record(turn, Usage.from_json(data.get("usage")))  # spend ledger
            flight.land()  # recorded: a later cancel (e.g. in _after_turn) costs nothing more
            await self._after_turn(turn, plan)                  # 11 cleanup (tasks store nothing)
            return _final_text(data)
        except asyncio.CancelledError:  # the request may have been billed: record it
            if flight.active:
                self._spend.settle(turn, [self._unfinished(
                    sent, StreamState(response_id=flight.generation_id))])
            raise
        except Exception as exc:  # the boundary: Open WebUI shows str() of what we raise
            failure = await self._report_failure(turn, exc)
            raise PipeError(f"{describe_error(failure)}\n(reference {turn.reference})") from exc
        finally:
            _reset_context(CURRENT_LOG, token)

    async def _stream(self, turn: Turn) -> AsyncGenerator[dict[str, Any], None]:
        """Streamed chat turn. Every failure ends as readable text or an error chunk."""
        token = CURRENT_LOG.set(turn.log)
        timing = StreamTiming(started=self._clock())
        renderer = ChunkRenderer(turn.req.owui_model_id, int(time.time()))
        run = TurnRun()
        turn = dataclasses.replace(turn, images=self._image_sink(turn))       # issue #14
        try:
            self._telemetry.requests += 1
            async with self._gate.admit(turn.req.user_id, turn.settings.admission):  # 1 admit
                turn = await self._spend.admit(turn)                      # 1 budget, key
                plan = await self._plan(turn)                           # 3 catalog, 6, tools
                run.notes = plan.notes
                for note in plan.notes:
                    await turn.emitter.notify(note)
                async with contextlib.aclosing(  # Stop closes the rounds at once (their usage)
                        self._rounds(turn, plan, run, renderer, timing)) as rounds:  # 7-12
                    async for chunk in rounds:
                        yield chunk
            if untold := untold_notes(turn.context.metadata, run.notes):
                yield renderer.text_chunk(untold)
            run.state.usage = run.usage
            route = self._route_report(turn, plan, run.state)
            for chunk in self._finish(run.state, renderer, timing, route):
                yield chunk
            await self._after_turn(turn, plan)                                  # 11 persist
            await self._announce(turn, run.state, timing, route)
        except Exception as exc:  # the boundary: every failure becomes words for the user
            failure = await self._report_failure(turn, exc)
            if turn.images is not None:
                await turn.images.finish()
            if run.usage is not None:  # rounds that completed were billed: say so
                for chunk in await self._spent_before_failure(turn, run, timing):
                    yield chunk
            untold = untold_notes(turn.context.metadata, run.notes)
            yield (renderer.text_chunk(interruption_notice(failure, turn.reference) + untold)
                   if renderer.emitted_text else error_chunk(failure, turn.reference, untold))
        finally:
            self._spend.record(turn, run.usage)  # every billed round, failed turns too
            self._spend.settle(turn, run.unfinished)  # rounds stopped before their usage
            _reset_context(CURRENT_LOG, token)

    def _unfinished(self, payload: Mapping[str, Any], state: StreamState) -> UnfinishedRound:
        """A round that ended without usage, with what it probably cost (catalog prices)."""
        snap = self._catalog.snapshot
        entry = snap.find(str(payload.get("model") or "")) if snap else None
        return UnfinishedRound(state.response_id, unfinished_estimate(
            estimate_prompt_tokens(payload), state.streamed_chars,
            entry.pricing if entry else None))

    async def _spent_before_failure(self, turn: Turn, run: TurnRun, timing: StreamTiming
                                    ) -> list[dict[str, Any]]:
        """A failed turn's usage so far: the usage chunk Open WebUI stores, and the line."""
        timing.ended_at = self._clock()
        line = final_status_line(run.usage, timing)
        LOG.info("Failed after spending: %s", line)
        if turn.settings.show_final_status:
            await turn.emitter.status(f"Failed · {line}", done=True)
        return [{"choices": [], "usage": usage_payload(run.usage, timing)}]

    async def _features(self, turn: Turn) -> tuple[dict[str, Any], list[str]]:
        """The chat's feature switches, the paid ones only as Open WebUI permits them (admins
        may use all); each one refused is told (a note, also in the answer for API clients)."""
        features = _mapping(turn.context.metadata.get("features"))
        wanted = [k for k in GATED_FEATURES if features.get(k)]
        if not wanted or turn.req.user_role == "admin":
            return dict(features), []
        allowed = await owui_features_allowed(turn.req.user_id, wanted, turn.context.request)
        permitted, notes = permitted_features(features, allowed)
        for note in notes:
            LOG.info("%s", note)
        return permitted, notes

    async def _plan(self, turn: Turn) -> Transformed:
        entry = await self._resolve_entry(turn.req, turn.settings)
        await self._routing_notes(turn)
        artifacts = await self._load_artifacts(turn)                         # 4 history
        req = await self._take_in(turn, entry)                               # 5 intake
        plan = build_responses_request(req, entry, turn.settings, artifacts)  # 6 transform
        if not req.task:  # chats loop over tool rounds; tasks never call tools
            features, refused = await self._features(turn)
            plan = dataclasses.replace(plan, notes=(*plan.notes, *refused))
            plan = with_tools(plan, req, entry, turn.context.tools, features,
                              turn.settings.tools)
            plan = await self._with_images(turn, plan, entry, features)      # issue #14
        plan = dataclasses.replace(plan, replayed_reasoning=sent_reasoning_ids(
            plan.payload.get("input") or (), artifacts))
        LOG.info("Turn: model=%s stream=%s task=%s messages=%d", entry.id,
                 plan.payload.get("stream"), turn.req.task, len(turn.req.messages))
        if LOG.isEnabledFor(logging.DEBUG) and turn.log.level <= logging.DEBUG:
            LOG.debug("Request body: %s",
                      _dumps(redact_payload(plan.payload)).decode()[:20000])
        return plan

    async def _rounds(self, turn: Turn, plan: Transformed, run: TurnRun,
                      renderer: ChunkRenderer, timing: StreamTiming
                      ) -> AsyncGenerator[dict[str, Any], None]:
        """Steps 7-12 of a streamed turn, repeated while the model calls tools.

        Each round: (a) send the request and stream its text and reasoning as they arrive;
        (b) keep the round's output items verbatim and number its web citations; (c) no
        function calls, tools forbidden, or passthrough -> checkpoint the items, and
        (d) in passthrough mode hand the calls to Open WebUI as `delta.tool_calls`; done;
        (e) run the calls under a status line; (f) checkpoint the round's items, then show
        its tool cards; (g) next input = input + this round's items + outputs; after the
        last allowed round the model must answer without tools, and the user is told.
        """
        payload, ts, book, rounds = plan.payload, turn.settings.tools, CitationBook(), 0
        while True:
            run.state = state = StreamState()
            try:
                async with contextlib.aclosing(self._send_round(
                        turn, payload, state, renderer, timing)) as sent:  # a (Stop: closed)
                    async for chunk in sent:
                        yield chunk
            finally:  # a failed round may still report (billed) usage
                run.add_usage(state.usage)
                if state.usage is None and state.response_id:  # stopped: billed all the same
                    run.unfinished.append(self._unfinished(payload, state))
            items = output_items(state)
            cited = await self._cite(turn, items, book)                                 # b
            if cited:
                yield renderer.text_chunk(cited)
            calls = [FunctionCall.of(i) for i in items if i.get("type") == "function_call"]
            if not calls or ts.mode == "open_webui" or payload.get("tool_choice") == "none":
                async for chunk in self._end_rounds(turn, plan, items, calls, renderer):  # c d
                    yield chunk
                return
            outcomes = await self._run_calls(turn, plan, calls)                         # e
            marker = await self._checkpoint(turn, round_items(items, outcomes))         # f
            if marker:
                yield renderer.text_chunk(marker)
            yield renderer.text_chunk(tool_cards(outcomes, ts.card_max_chars))
            payload, rounds = next_payload(payload, items, outcomes), rounds + 1        # g
            if rounds >= ts.max_rounds:
                payload = final_answer_payload(payload)
                yield renderer.text_chunk(limit_notice(rounds))

    async def _end_rounds(self, turn: Turn, plan: Transformed, items: list[dict[str, Any]],
                          calls: list[FunctionCall], renderer: ChunkRenderer
                          ) -> AsyncIterator[dict[str, Any]]:
        """(c) The last round: checkpoint its items; (d) in passthrough mode hand its calls
        to Open WebUI as `delta.tool_calls`."""
        async for chunk in self._last_round(turn, items, calls, renderer):
            yield chunk
        if calls and turn.settings.tools.mode == "open_webui":
            await self._checkpoint_passthrough(
                turn, [i for i in items if i.get("type") == REASONING_ITEM],
                [c.call_id for c in calls])
            yield renderer.chunk(tool_calls_delta(calls, plan.tools), "tool_calls")

    async def _run_calls(self, turn: Turn, plan: Transformed, calls: list[FunctionCall]
                         ) -> list[ToolOutcome]:
        """(e) One round's calls, run under a status line."""
        names = [plan.tools.display_name(c.name) for c in calls]
        await turn.emitter.status(tool_status("Running", names) + "…", done=False)
        outcomes = await self._tools.run_round(calls, plan.tools, turn.settings.tools,
                                               turn.req.user_id)
        await turn.emitter.status(tool_status("Ran", names), done=True)
        return outcomes

    async def _send_round(self, turn: Turn, payload: Mapping[str, Any], state: StreamState,
                          renderer: ChunkRenderer, timing: StreamTiming
                          ) -> AsyncGenerator[dict[str, Any], None]:
        resp = await self._open(turn, payload, self._client.open_response)          # 7 send
        state.response_id = generation_id_of(resp.headers)
        done = False
        try:
            async with contextlib.aclosing(self._pump(  # Stop: its count is final at once
                    resp, state, renderer, timing, turn.images)) as pumped:         # 8-9
                async for chunks in pumped:
                    for chunk in chunks:                                             # 12
                        yield chunk
            done = state.finished
        finally:
            await (resp.release() if done else resp.close())

    async def _last_round(self, turn: Turn, items: list[dict[str, Any]],
                          calls: list[FunctionCall], renderer: ChunkRenderer
                          ) -> AsyncIterator[dict[str, Any]]:
        marker = await self._checkpoint(turn, [i for i in items if i.get("type") != "message"])
        if marker:
            yield renderer.text_chunk(marker)
        if calls and turn.settings.tools.mode == "pipe":  # asked for tools after the limit
            LOG.warning("The model called %d tool(s) after the limit; not run", len(calls))
            yield renderer.text_chunk("\n\n⚠️ The model asked for more tools after the limit; "
                                      "they were not run.")

    async def _cite(self, turn: Turn, items: list[dict[str, Any]], book: CitationBook) -> str:
        """Emit one source per newly cited URL; return the numbered links for the text."""
        suffix = ""
        for item in items:
            if item.get("type") != "message":
                continue
            numbers, new = book.cite(url_annotations(item))
            for number, ann in new:
                await turn.emitter.emit(source_event(number, ann))
            suffix += citation_suffix(numbers)
        return suffix

    async def _take_in(self, turn: Turn, entry: CatalogEntry) -> ChatRequest:
        """Attachments -> inline parts (size caps, SSRF-safe downloads, Open WebUI files)."""
        if turn.req.task:
            return turn.req
        req = with_previous_images(turn.req, entry, turn.settings.images)  # issue #14
        job = IntakeJob(entry, turn.settings.intake, turn.req.user_id, turn.req.user_role,
                        turn.emitter, request_origin(turn.context.request))
        return await self._intake.prepare(req, job, turn.context.files, turn.context.request)

    # -- image output (issue #14) --------------------------------------------------------

    def _image_sink(self, turn: Turn) -> ImageSink:
        job = ImageJob(turn.req.user_id, turn.req.user_role, turn.req.chat_id or "",
                       str(turn.context.metadata.get("message_id") or ""),
                       turn.req.model_id, turn.settings.images.max_bytes, turn.settings.intake)
        return ImageSink(job, turn.emitter, self._intake.store, self._intake.fetcher)

    async def _with_images(self, turn: Turn, plan: Transformed, entry: CatalogEntry,
                           features: Mapping[str, Any]) -> Transformed:
        """Modalities/image_config for image models, the image tool for the Image toggle."""
        images = turn.settings.images
        tool = bool(features.get("image_generation")) and not makes_images(entry)
        if not makes_images(entry) and not tool:
            return plan
        options: Mapping[str, ImageOptions] = {}
        if images.aspect_ratio or images.size:
            options = await self._image_options.get(self._client.fetch_image_models,
                                                    turn.settings)
        priced = entry if makes_images(entry) else (await self._catalog.get(
            turn.settings, turn.settings.catalog_ttl)).find(images.tool_model)
        if turn.images is not None and priced is not None:
            turn.images.unit_price = priced.pricing.image_output
        return with_images(plan, entry, images, features, options)

    async def _pump(self, resp: TransportResponse, state: StreamState,
                    renderer: ChunkRenderer, timing: StreamTiming,
                    images: ImageSink | None = None
                    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Network reads -> decoded events -> reduced intents -> (pictures saved, §12) ->
        rendered chunk lists."""
        decoder = SSEDecoder(images.line_cap if images is not None else SSE_MAX_LINE_BYTES)
        image_intents, shown = 0, renderer.rendered_chars
        try:
            async for raw in resp.iter_chunks():
                intents = reduce_events(state, decoder.feed(raw))
                if state.image_intents != image_intents:  # this batch holds image intents
                    image_intents = state.image_intents
                    intents = await self._pictures(intents, images, decoder)
                if intents:
                    chunks = renderer.render(intents)
                    if chunks:
                        if timing.first_token_at is None:
                            timing.first_token_at = self._clock()
                        yield chunks
                if state.finished:
                    break
        finally:  # also when Stop closes the round: what it showed prices its estimate
            state.streamed_chars = renderer.rendered_chars - shown
        finish_stream(state)

    @staticmethod
    async def _pictures(intents: list[Intent], images: ImageSink | None,
                        decoder: SSEDecoder) -> list[Intent]:
        """§12 for a batch with image intents: pictures saved (the SSE line cap grows, as the
        final event repeats them), or dropped when the turn takes none."""
        if images is None:
            return [i for i in intents if i[0] not in IMAGE_INTENTS]
        resolved = await images.resolve(intents)
        decoder.max_bytes = images.line_cap
        return resolved

    def _finish(self, state: StreamState, renderer: ChunkRenderer, timing: StreamTiming,
                route: RouteReport = ((), None)) -> list[dict[str, Any]]:
        timing.ended_at = self._clock()
        if timing.first_token is not None:
            self._telemetry.first_token.append(timing.first_token)
        LOG.info("Done: %s", final_status_line(state.usage, timing, route[0]))
        return [from_tail(renderer, state),
                {"choices": [], "usage": usage_payload(state.usage, timing, route[1])}]

    async def _announce(self, turn: Turn, state: StreamState, timing: StreamTiming,
                        route: RouteReport = ((), None)) -> None:
        if turn.settings.show_final_status:
            line = final_status_line(state.usage, timing, route[0])
            if turn.images is not None and turn.images.saved:  # issue #14: pictures + price
                line += " · " + image_status_segment(len(turn.images.saved),
                                                     turn.images.unit_price)
            suffix = await self._spend.status_suffix(turn, state.usage.cost if state.usage
                                                     else None)
            await turn.emitter.status(line + suffix, done=True)
        if turn.settings.log_citation == "always":
            await turn.emitter.citation(f"Pipe log {turn.reference}",
                                        turn.log.text(admin=turn.req.user_role == "admin"))

    # -- routing (issue #12) ----------------------------------------------------------------

    async def _open(self, turn: Turn, payload: Mapping[str, Any],
                    send: Callable[[Mapping[str, Any], RequestSettings], Awaitable[Any]]
                    ) -> Any:
        """POST the request with `send` (the client's streamed `open_response` or its JSON
        `complete`); a rate limit or outage that outlasted the retries is asked of the first
        fallback model instead (the user is told); errors carry the policy."""
        try:
            return await send(payload, turn.settings)
        except UpstreamStatusError as exc:
            exc.model = str(payload.get("model") or "")
            exc.routing = describe_policy(payload.get("provider") or {})
            self._telemetry.provider_route("", failed_providers_of(exc))
            alt = rate_limit_fallback(payload, exc, turn.settings.routing)
            if alt is None:
                raise
            note = (f"{exc.model} is unavailable (HTTP {exc.status}) after {exc.attempts} "
                    f"tries; the fallback model {alt['model']} answers instead.")
        LOG.warning("%s", note)
        await turn.emitter.notify(note, "info")
        return await send(alt, turn.settings)

    async def _routing_notes(self, turn: Turn) -> None:
        """Settings left out are logged (and shown to admins); never sent upstream."""
        routing = turn.settings.routing
        if routing.problems:
            LOG.warning("Routing settings left out (never sent): %s", "; ".join(routing.problems))
            if turn.req.user_role == "admin" and not turn.req.task:
                await turn.emitter.notify("Routing settings left out (never sent): "
                                          + "; ".join(routing.problems))
        if routing.ignored:
            LOG.info("User routing requests not applied: %s", "; ".join(routing.ignored))

    def _route_report(self, turn: Turn, plan: Transformed, state: StreamState) -> RouteReport:
        """Who answered and what the cache saved, from the final event; counts providers."""
        outcome = RouteOutcome(str(plan.payload.get("model") or ""), state.model,
                               state.router or {})
        if state.router:
            self._telemetry.provider_route(outcome.provider(), outcome.failed_providers())
        if outcome.fallback:
            LOG.info("Answered by %s (asked for %s)", outcome.served, outcome.requested)
        snap, served = self._catalog.snapshot, state.model.split("@", 1)[0]
        entry = (snap.find(served) or snap.find(served.split(":", 1)[0])) if snap else None
        saved = cache_saving(state.usage or Usage(), entry.pricing if entry else None,
                             turn.settings.routing.prompt_cache)
        return tuple(routing_status(outcome, state.usage, saved)), saved

    async def _report_failure(self, turn: Turn, exc: Exception) -> PipeError:
        """Log and count a failure, attach the turn's log; returns the error to show."""
        if (isinstance(exc, UpstreamStatusError) and exc.status == 401
                and turn.settings.spend.key_source == KEY_PROVISIONED):
            await self._spend.key_rejected(turn)  # deleted or revoked: a new one next turn
        exc = attribute_key_error(exc, turn.settings.spend)  # the user's own/budget key
        if isinstance(exc, PipeError):
            status = f", HTTP {exc.status}" if isinstance(exc, UpstreamStatusError) else ""
            LOG.warning("Turn failed (%s%s): %s", type(exc).__name__, status, exc)
            if exc.__cause__ is not None:  # the raw detail (hosts, paths): admins only
                log_failure_detail("Turn failure detail", exc.__cause__)
            failure = exc
        else:  # a bug: keep the traceback for the admin, give the user a reference
            LOG.exception("Turn failed with an unexpected %s", type(exc).__name__)
            failure = PipeError("The pipe hit an unexpected internal error.",
                                hint="An admin can read the details in this turn's log.")
        self._telemetry.failed(failure if isinstance(exc, PipeError) else exc)
        if turn.settings.log_citation != "off":
            await turn.emitter.citation(f"Pipe log {turn.reference}",
                                        turn.log.text(admin=turn.req.user_role == "admin"))
        return failure

    async def _resolve_entry(self, req: ChatRequest, settings: RequestSettings) -> CatalogEntry:
        if req.model_id.startswith(STATUS_ENTRY_PREFIX):
            raise ConfigError("This entry reports a configuration problem; it is not a model.",
                              hint="An admin should check the pipe's valves (MODEL_ID, API_KEY).")
        snap = await self._catalog.get(settings, settings.catalog_ttl)
        entry = snap.find(req.model_id)
        if entry is None and req.model_id in settings.routing.variants:  # issue #12
            entry = variant_entry(req.model_id, snap)
        if entry is None:
            raise ModelNotAvailable(f"The model '{req.model_id}' is not in OpenRouter's catalog.",
                                    hint="Pick another model; it may have been retired.")
        if entry.id not in self._enabled_ids(snap, settings.model_ids,
                                             settings.routing.variants):
            raise ModelNotAvailable(f"The model '{entry.id}' is not enabled on this server.",
                                    hint="Pick one of the models in the selector; an admin "
                                         "chooses them with MODEL_ID.")
        return entry

    def _enabled_ids(self, snap: CatalogSnapshot, model_ids: str,
                     variants: tuple[str, ...]) -> frozenset[str]:
        """The ids the selector lists (MODEL_ID's models and MODEL_VARIANTS' entries),
        cached per (catalog, valves)."""
        key = (snap, model_ids, variants)
        if self._selected is None or self._selected[0] != key:
            listed, _, _ = listed_entries(snap, model_ids, variants)
            self._selected = (key, frozenset(e.id for e in listed))
        return self._selected[1]

    # -- health ----------------------------------------------------------------------------

    async def _health(self, turn: Turn) -> str | AsyncIterator[dict[str, Any]]:
        """The admin-only health entry: a report, its JSON, or one turn's log by reference."""
        if turn.req.user_role != "admin":
            return _fail_fast(turn.req, PipeError("The pipe health report is for admins only."))
        data = {**health_snapshot(self._telemetry, self._gate, self._catalog, self._clock(),
                                  await self._storage_health()),
                "breakers": self._tools.breakers.snapshot(),
                "model_records": dict(self._records.status)}
        prompt = turn.req.messages[-1].text if turn.req.messages else ""
        if prompt.strip().split()[:1] == ["spend"]:  # `spend`, `spend csv` (issue #13)
            text = await self._spend_report(turn, prompt.strip().split()[1:2] == ["csv"])
        else:
            await self._spend.refresh(turn.settings, _function_id(turn), max_age=30.0)
            data["spend"] = self._spend.health(turn)
            text = health_reply(prompt, data, self._logs)
        if turn.req.task or not turn.req.stream:
            return text

        async def reply() -> AsyncIterator[dict[str, Any]]:
            renderer = ChunkRenderer(turn.req.owui_model_id, int(time.time()))
            yield renderer.text_chunk(text)
            yield renderer.finish_chunk()

        return reply()

    async def close(self) -> None:
        """Release pooled connections (Open WebUI never calls this; tests and tools do)."""
        await self._spend.drain()
        await self._client.aclose()
        self._tools.close()
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
        message_id = column_safe(str(turn.context.metadata.get("message_id") or ""))
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
                          column_safe(str(turn.context.metadata.get("message_id") or "")), 0,
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
            schema = None if self._artifact_db else owui_db_schema()
            url = redis_url_for_write_behind(self._env if self._env is not None
                                             else owui_env()) if key[1] else None
            redis = WriteBehind(self._redis_factory(url), key[0]) if url else None
            store = self._stores[key] = ArtifactStore(ArtifactDB(runner, key[0], schema),
                                                      redis, clock=self._wall_clock,
                                                      monotonic=self._clock)
        faults = turn.settings.faults  # the shared store follows the current valves
        store.redis_skip_seconds = faults.redis_skip_seconds
        if store.redis is not None:
            store.redis.max_rows = faults.redis_queue_max_rows
        return store

    async def _storage_health(self) -> tuple[Any, Any]:
        if not self._stores:
            where = "ready" if (self._artifact_db or owui_db_runner()) else "unavailable"
            return f"{where} (no chat stored anything since start)", "not used"
        store = next(iter(self._stores.values()))
        return await store.health()

    # -- spend (issue #13) ------------------------------------------------------------------

    async def _spend_report(self, turn: Turn, as_csv: bool) -> str:
        """Admins: everyone's spend this and the previous period (markdown or CSV)."""
        try:
            rows = await self._spend.report(turn)
        except SpendLedgerError as exc:
            return f"The spend report is unavailable: {exc}"
        if as_csv:
            return "```csv\n" + spend_csv(rows) + "```"
        return spend_markdown(rows, turn.settings.spend, "OpenRouter spend")

    async def _my_usage(self, turn: Turn) -> str | AsyncIterator[dict[str, Any]]:
        """Any user: their own spend and budget, never anyone else's."""
        if turn.req.task:  # no title/tags/follow-ups for this entry (nor their cost)
            return ""
        try:
            rows = await self._spend.report(turn, user_id=turn.req.user_id)
            state = await self._spend.state(turn)
            text = my_usage_text(rows, state, turn.settings.spend)
        except PipeError as exc:
            text = f"Your usage can't be shown right now: {exc}"
        if turn.req.task or not turn.req.stream:
            return text

        async def reply() -> AsyncIterator[dict[str, Any]]:
            renderer = ChunkRenderer(turn.req.owui_model_id, int(time.time()))
            yield renderer.text_chunk(text)
            yield renderer.finish_chunk()

        return reply()


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


def _mapping(value: Any) -> Mapping[str, Any]:
    """A dict-shaped part of the call context, or {} when a client sent another shape."""
    return value if isinstance(value, Mapping) else {}


def _refuse(body: Any, metadata: Any, task: str | None, exc: PipeError
            ) -> AsyncIterator[dict[str, Any]]:
    """A request that could not be parsed, answered in the shape its caller expects."""
    raw = _mapping(body)
    req = ChatRequest(str(raw.get("model") or ""), "", (), stream=bool(raw.get("stream")),
                      params={}, task=task or _str_or_none(_mapping(metadata).get("task")))
    return _fail_fast(req, exc)


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


def listed_entries(snap: CatalogSnapshot, model_ids: str, variants: Iterable[str] = ()
                   ) -> tuple[tuple[CatalogEntry, ...], tuple[str, ...], tuple[str, ...]]:
    """The selector's entries: MODEL_ID's catalog models, then MODEL_VARIANTS' synthesized
    entries (#12). Returns (entries, unknown MODEL_ID ids, variants with no base model)."""
    selected, unknown = select_models(snap.entries, model_ids)
    extra, no_base = variant_entries(snap, variants)
    taken = {e.id for e in selected}
    return (*selected, *(e for e in extra if e.id not in taken)), unknown, no_base


def build_model_list(snap: CatalogSnapshot, model_ids: str, prefix: str,
                     routing: RoutingSettings | None = None
                     ) -> tuple[list[dict[str, str]], tuple[CatalogEntry, ...]]:
    """Selector entries and the catalog entries behind them (variants included); leading
    status entries name what an admin must fix."""
    routing = routing or RoutingSettings()
    entries, unknown, no_base = listed_entries(snap, model_ids, routing.variants)
    models = [{"id": e.id, "name": prefix + e.name} for e in entries]
    if unknown:
        LOG.error("MODEL_ID lists ids OpenRouter doesn't have: %s", ", ".join(unknown))
        models.insert(0, _status_entry("model-id",
                                       "MODEL_ID has unknown ids: " + ", ".join(unknown)))
    if no_base:
        LOG.error("MODEL_VARIANTS has ids with no base model: %s", ", ".join(no_base))
        models.insert(0, _status_entry("variants", "MODEL_VARIANTS has ids with no base "
                                                   "model: " + ", ".join(no_base)))
    if routing.problems:
        LOG.error("Routing settings left out (never sent): %s", "; ".join(routing.problems))
        models.insert(0, _status_entry("routing", "ignored: " + "; ".join(routing.problems)))
    for name, why in recent_refusals(time.time()):
        models.insert(0, _status_entry(f"refused-{name.lower()}", f"{name} not saved: {why}"))
    return models, entries


def record_wanted(entry_id: str) -> bool:
    """Every listed entry gets a model record except the admin-only health entry and the
    configuration-problem entries (those must stay invisible to ordinary users)."""
    return entry_id != HEALTH_ENTRY["id"] and not entry_id.startswith(STATUS_ENTRY_PREFIX)


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
