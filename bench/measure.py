"""What bench/run.py and bench/against.py share: the emulator subprocess, the raw-client
baseline, one streamed pipe turn, and the alternating timer. Imports no pipe module, so
against.py can time another version of the pipe file with exactly the same code."""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tools" / "openrouter_emulator.py"
API_KEY, MODEL = "sk-or-bench", "openai/gpt-4o"
FLOOD_DELTAS = 20_000
BASE_HEADERS = {"Content-Type": "application/json", "HTTP-Referer": "https://openwebui.com/",
                "X-OpenRouter-Title": "Open WebUI", "X-Title": "Open WebUI",
                "Authorization": f"Bearer {API_KEY}"}  # what the pipe sends by default
SSE_HEADERS = {**BASE_HEADERS, "Accept": "text/event-stream"}
JSON_HEADERS = {**BASE_HEADERS, "Accept": "application/json"}


@contextlib.contextmanager
def emulator(extra_models: int) -> Iterator[str]:
    """tools/openrouter_emulator.py as a subprocess (its CPU is never counted); its URL."""
    cmd = [sys.executable, str(EMULATOR), "--host", "127.0.0.1", "--port", "0",
           "--extra-models", str(extra_models)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if not line.startswith("EMULATOR_URL="):
            raise SystemExit(f"emulator did not start (got {line!r})")
        yield line.split("=", 1)[1]
    finally:
        proc.terminate()
        proc.wait(10)


# ──────────────────────────────────────────────────────────────── clients under test


def raw_body(text: str) -> bytes:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return json.dumps({"model": MODEL, "input": [item], "stream": True, "store": False}).encode()


async def raw_stream(session: aiohttp.ClientSession, url: str, text: str
                     ) -> tuple[str, float | None]:
    """The baseline: iter_any, split on blank lines, json.loads each data line."""
    parts: list[str] = []
    first, buf = None, b""
    async with session.post(url + "/responses", data=raw_body(text), headers=SSE_HEADERS) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_any():
            *events, buf = (buf + chunk).split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev["type"] == "response.output_text.delta":
                        first = first or time.perf_counter()
                        parts.append(ev["delta"])
    return "".join(parts), first


async def pipe_stream(pipe: Any, text: str, user: str = "bench", **extra: Any
                      ) -> tuple[str, float | None]:
    body = {"model": f"openrouter.{MODEL}", "stream": True,
            "messages": [{"role": "user", "content": text}]}
    gen = await pipe.pipe(body=body, __user__={"id": user}, **extra)
    parts: list[str] = []
    first = None
    async for chunk in gen:
        if "error" in chunk:
            raise RuntimeError(f"pipe error chunk: {chunk['error']}")
        choices = chunk.get("choices")
        if choices and (content := choices[0]["delta"].get("content")):
            first = first or time.perf_counter()
            parts.append(content)
    return "".join(parts), first


# ──────────────────────────────────────────────────────────────── measurement helpers


def med(values: list[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Sample:
    cpu: float  # client CPU seconds
    wall: float  # wall seconds
    t0: float  # perf_counter() when the call started
    result: Any


async def timed(fn: Callable[[], Awaitable[Any]]) -> Sample:
    """Client CPU and wall time of one awaited call; gc.collect() first, outside the timing."""
    gc.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    result = await fn()
    return Sample(time.process_time() - c0, time.perf_counter() - w0, w0, result)


async def alternate(fns: dict[str, Callable[[], Awaitable[Any]]], runs: int, warmup: int
                    ) -> dict[str, list[Sample]]:
    """Run each fn `warmup + runs` times, interleaved, flipping the order every round."""
    out: dict[str, list[Sample]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            sample = await timed(fns[name])
            if i >= warmup:
                out[name].append(sample)
    return out
