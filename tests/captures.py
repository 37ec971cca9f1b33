"""Loader for the real OpenRouter captures in tests/fixtures/openrouter-captures/ (see its
SOURCE.md: Apache-2.0 data from simonw/llm-openrouter). A missing capture is an error, never a
skip: the tests that use them must fail when the data is gone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

CAPTURE_DIR = Path(os.environ.get(
    "ORP_CAPTURE_DIR", Path(__file__).resolve().parent / "fixtures" / "openrouter-captures"))
EXPECTED = ("test_image_prompt.yaml", "test_llm_models.yaml", "test_prompt.yaml",
            "test_reasoning.yaml", "test_tool_calls.yaml")


class MissingCaptures(RuntimeError):
    """The capture files are not where the tests expect them."""


def capture_files() -> list[Path]:
    """The capture files; raises when any expected one is missing (a failure, not a skip)."""
    missing = [n for n in EXPECTED if not (CAPTURE_DIR / n).is_file()]
    if missing:
        raise MissingCaptures(f"missing OpenRouter captures in {CAPTURE_DIR}: {missing}")
    return sorted(CAPTURE_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class Exchange:
    name: str
    method: str
    uri: str
    request_body: dict[str, Any] | None
    status: int
    body: bytes


@cache
def exchanges() -> tuple[Exchange, ...]:
    out = []
    for path in capture_files():
        doc = yaml.safe_load(path.read_text())
        for i, it in enumerate(doc["interactions"]):
            req, resp = it["request"], it["response"]
            raw_req = req.get("body") or ""
            out.append(Exchange(
                name=f"{path.stem}#{i}", method=req["method"], uri=req["uri"],
                request_body=json.loads(raw_req) if raw_req else None,
                status=resp["status"]["code"],
                body=resp["body"]["string"].encode("utf-8")))
    return tuple(out)


def streams() -> tuple[Exchange, ...]:
    return tuple(e for e in exchanges() if e.uri.endswith("/responses"))


def catalogs() -> tuple[Exchange, ...]:
    return tuple(e for e in exchanges() if e.uri.endswith("/models"))
