"""Generate VALVES_REFERENCE.md from the Valves and UserValves classes of the pipe.

    python tools/gen_valves_reference.py          # rewrite VALVES_REFERENCE.md
    python tools/gen_valves_reference.py --check  # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openrouter_responses_pipe as orp  # noqa: E402

TARGET = ROOT / "VALVES_REFERENCE.md"

# Every valve belongs to one concern; a valve missing here fails the freshness test.
GROUPS: dict[str, tuple[str, ...]] = {
    "Connection": ("API_KEY", "BASE_URL", "HTTP_REFERER", "APP_TITLE",
                   "HTTP_CONNECT_TIMEOUT_SECONDS", "HTTP_READ_TIMEOUT_SECONDS"),
    "Models": ("MODEL_ID", "MODEL_NAME_PREFIX", "MODEL_CATALOG_REFRESH_SECONDS"),
    "Reasoning": ("REASONING_EFFORT", "REASONING_SUMMARY", "TASK_REASONING_EFFORT"),
    "Errors and retries": ("MAX_RETRIES", "RETRY_MAX_WAIT_SECONDS"),
    "Capacity": ("MAX_CONCURRENT_REQUESTS", "MAX_QUEUED_REQUESTS", "QUEUE_WAIT_SECONDS",
                 "MAX_CONCURRENT_REQUESTS_PER_USER"),
    "Routing": ("STICKY_SESSION_ROUTING",),
    "Display": ("SHOW_FINAL_STATUS",),
    "Logging and health": ("LOG_LEVEL", "REQUEST_LOG_CITATION", "SHOW_HEALTH_MODEL"),
    "Tools and web search": ("TOOL_EXECUTION_MODE", "MAX_TOOL_ROUNDS", "TOOL_TIMEOUT_SECONDS",
                             "MAX_PARALLEL_TOOLS_PER_REQUEST", "MAX_PARALLEL_TOOLS_GLOBAL",
                             "TOOL_BREAKER_THRESHOLD", "TOOL_BREAKER_WINDOW_SECONDS",
                             "STRICT_TOOL_SCHEMAS", "TOOL_RESULT_MAX_CHARS",
                             "TOOL_CARD_MAX_CHARS", "WEB_SEARCH", "WEB_SEARCH_MAX_RESULTS",
                             "REMOTE_MCP_SERVERS_JSON"),
    "Multimodal intake": ("MAX_IMAGE_MB", "MAX_FILE_MB", "MAX_AUDIO_MB", "MAX_VIDEO_MB",
                          "MAX_IMAGES_PER_REQUEST", "MAX_REQUEST_ATTACHMENTS_MB",
                          "SEND_FILES_NATIVELY", "SAVE_REMOTE_MEDIA"),
    "Remote fetching (SSRF policy)": ("REMOTE_FETCH_ALLOW_HTTP", "REMOTE_FETCH_ALLOWED_HOSTS",
                                      "REMOTE_FETCH_DENIED_HOSTS",
                                      "REMOTE_FETCH_TIMEOUT_SECONDS", "REMOTE_FETCH_RETRIES"),
    "Memory across turns (artifact store, Redis)": (
        "REASONING_RETENTION", "TOOL_OUTPUT_RETENTION_TURNS", "ARTIFACT_ENCRYPTION_KEY",
        "COMPRESSION_MIN_BYTES", "ARTIFACT_CLEANUP_DAYS",
        "ARTIFACT_CLEANUP_INTERVAL_HOURS", "REDIS_WRITE_BEHIND", "REDIS_CACHE_TTL_SECONDS",
        "REDIS_QUEUE_MAX_ROWS", "REDIS_SKIP_SECONDS"),
    "Team access and model records": ("MODEL_ACCESS", "SYNC_MODEL_RECORDS"),
    "Provider routing, fallbacks and caching": (
        "PROVIDER_ROUTING", "FALLBACK_MODELS", "RATE_LIMIT_FALLBACK", "MODEL_VARIANTS",
        "AUTO_ROUTER_ALLOWED_MODELS", "PROMPT_CACHE", "ROUTER_METADATA", "SERVICE_TIER",
        "TEXT_VERBOSITY", "PDF_PARSER_ENGINE", "RESPONSE_HEALING", "USER_IDENTIFIER",
        "SEND_CHAT_METADATA"),
    # issue #13
    "Spend control (ledger, budgets, keys, balance)": (
        "SPEND_LEDGER", "BUDGET_USD", "BUDGET_PERIOD", "BUDGET_WARN_PERCENT", "BUDGET_OVERRIDES",
        "BUDGET_EXEMPT_ADMINS", "BUDGET_ON_LEDGER_ERROR", "BUDGET_CHECK_CACHE_SECONDS",
        "SHOW_SPEND_IN_STATUS", "MANAGEMENT_API_KEY", "ALLOW_USER_API_KEYS",
        "LOW_CREDIT_WARNING_USD", "BALANCE_REFRESH_SECONDS", "CURRENCY_NAME", "CURRENCY_RATE"),
    "Image output": ("IMAGE_ASPECT_RATIO", "IMAGE_SIZE", "IMAGE_TOOL_MODEL", "IMAGE_MAX_MB",
                     "IMAGE_EDIT_FOLLOW_UPS"),
}


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return "secret (encrypted str)" if annotation is orp.EncryptedStr else annotation.__name__
    return str(annotation).replace("typing.", "")


def default_text(name: str, info: Any) -> str:
    if info.default_factory is not None:
        if name == "API_KEY":
            return "env `OPENROUTER_API_KEY`, else empty"
        if name == "LOG_LEVEL":
            return "env `GLOBAL_LOG_LEVEL`, else `INFO`"
        if name == "BASE_URL":
            return f"env `OPENROUTER_API_BASE_URL`, else `{orp.DEFAULT_BASE_URL}`"
        return "computed"
    if info.default == "":
        return "empty"
    return f"`{info.default!r}`".replace("'", "")


def range_text(info: Any) -> str:
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower(), None)
              for m in info.metadata}
    low, high = bounds.get("Ge"), bounds.get("Le")
    if low is None and high is None:
        return ""
    return f"{'' if low is None else low} – {'' if high is None else high}"


def row(name: str, info: Any) -> str:
    desc = (info.description or "").replace("\n", " ").replace("|", "\\|")
    return (f"| `{name}` | {type_name(info.annotation)} | {default_text(name, info)} | "
            f"{range_text(info)} | {desc} |")


def ungrouped() -> list[str]:
    grouped = {n for names in GROUPS.values() for n in names}
    return [n for n in orp.Valves.model_fields if n not in grouped]


def render() -> str:
    head = "| Valve | Type | Default | Range | Description |\n|---|---|---|---|---|"
    out = ["# Valves reference", "",
           "Generated from the `Valves` and `UserValves` classes of "
           "`openrouter_responses_pipe.py` by `python tools/gen_valves_reference.py`; "
           "a test fails when this file is out of date. Do not edit by hand.", "",
           "## Admin valves (Admin → Functions → OpenRouter → ⚙ Valves)", ""]
    fields = orp.Valves.model_fields
    for group, names in GROUPS.items():
        out += [f"### {group}", "", head, *(row(n, fields[n]) for n in names), ""]
    out += ["## User valves (chat → ⚙ Controls → Valves)", "",
            "Each defaults to `inherit`, which uses the admin value above; typing `inherit` "
            "(any case) or clearing the field goes back to it.", "", head]
    out += [row(n, info) for n, info in orp.UserValves.model_fields.items()]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if ungrouped():
        print("valves without a group in GROUPS:", ", ".join(ungrouped()))
        return 1
    text = render()
    if args.check:
        if TARGET.read_text() != text:
            print("VALVES_REFERENCE.md is out of date: run python tools/gen_valves_reference.py")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
