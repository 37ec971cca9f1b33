"""Loader for the real OpenRouter captures in ../shared/fixtures/openrouter-captures/."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

CAPTURE_DIR = Path(os.environ.get(
    "ORP_CAPTURE_DIR",
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openrouter-captures"))


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
    for path in sorted(CAPTURE_DIR.glob("*.yaml")):
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
