"""Benchmarks for openrouter_responses_pipe.py against the local OpenRouter emulator.

Usage:  python bench/run.py [--quick] [--profile [a|e|e-bare|f|g|h]]

Method
  * tools/openrouter_emulator.py runs as a SUBPROCESS (started here with ``--port 0`` and
    ``--extra-models 400``), so the server's CPU is never counted; ``time.process_time()``
    measures the benchmark (client) process only.
  * Every pipe figure has a baseline measured in the same run against the same emulator.
    The raw baseline is a plain aiohttp loop: POST the same body and headers the pipe sends,
    read ``resp.content.iter_any()``, split SSE events on blank lines and ``json.loads``
    (stdlib, as the issue defines it; the pipe itself uses orjson when installed) each
    ``data:`` line. It does nothing else (no rendering, no error handling).
  * Pipe and raw runs alternate (order flipped each round) after warm-up rounds, with
    ``gc.collect()`` before each timed run; figures are medians.
  (a) stream throughput: one 20,000-delta ``flood`` stream; client CPU and wall seconds;
      both sides must receive the same text length or the run aborts.
  (b) first-token overhead: request start -> first content delta on ``[emu:text]``.
      (b) with budgets (issue #13): the same through a pipe with a SQLite spend ledger and
      BUDGET_USD set (budget check from the per-user cache, the turn recorded after it) vs
      the plain pipe, alternated; reported as the added median ms. ``--spend`` runs only this.
  (c) 50 concurrent 2,000-delta streams through ONE Pipe (50 distinct user ids, so the
      pipe's per-user limit of 4 does not serialise them) vs 50 raw streams on one session.
      Each side runs in its own child process so peak RSS (psutil, sampled every 5 ms in a
      background thread) is not polluted by the other; the sampler's CPU is in both figures.
      Wall is the median over rounds, CPU the mean per round, errors the total.
  (d) ``pipes()`` with a 413-model catalog: cold = new Pipe, first call fetches /models
      (baseline: new aiohttp session, GET /models, json.loads); warm = repeated calls.
  (e) tool round: a streamed turn on ``[emu:tool_call name=weather]`` where the model calls
      one trivial async tool, then answers from its result (2 POSTs). Pipe (``__tools__``,
      end to end) vs raw: the same two POSTs (body with the tool as the pipe declares it),
      the (a) parsing plus the ``output_item.done`` items, the tool awaited in between.
      Twice: without a store (as outside Open WebUI: the checkpoint finds no database) and
      with a SQLite store + ARTIFACT_ENCRYPTION_KEY (the round's call and output are
      encoded and written before the next POST). Reported: median ms per turn and pipe
      minus raw, i.e. the pipe's added CPU and wall per tool round.
  (f) ArtifactCodec encode+decode of a reasoning item (~4 KB encrypted_content + summary)
      and function_call_output items of 1, 20 and 200 KB (word-like text, some non-ASCII),
      plain (no key) and encrypted (key, every item type) vs ``json.loads(json.dumps(x).encode())``
      (+ ``Fernet.encrypt``/``decrypt`` for encrypted). Median us/item over batches.
  (g) replay: ``parse_chat_request`` + ``build_responses_request(..., artifacts)`` for a
      50-turn chat whose assistant replies carry markers (4 stored items each), tool cards
      and text, vs ``raw_replay`` (string/list operations only). Both must produce the same
      ``input`` list (301 items) or the run aborts. Median us per request.
  (h) ``ArtifactStore.save`` (direct DB write, no Redis) on a temporary SQLite file: one
      tool turn = 2 transactions (round: reasoning, call, 1 KB output; final: reasoning),
      payloads encoded beforehand, vs a raw SQLAlchemy ``insert()`` of the same rows into an
      identical table, also via ``asyncio.to_thread``. Median ms per turn.
  (i) model-record sync (issue #10): Open WebUI 0.12's Models API as tests/owui_stubs fakes
      it (real SQLAlchemy on a fresh SQLite file, aiosqlite), the pipe loaded the way Open
      WebUI loads it. Per round: the first pipes() starts a sync of the whole 413-model
      catalog in the background; while it runs, warm pipes() calls and one streamed chat
      (first-token ms) are timed. Baseline: the same with SYNC_MODEL_RECORDS off. Also the
      sync's own duration (413 inserts, one transaction each).
  (f) and (g) are CPU-bound and synchronous: wall time there is event-loop time.
Targets are printed with PASS/MISS; the exit code is 0 whatever they show (informative).
Results go to bench/results.json (with the HEAD commit and whether the pipe file differed
from it). ``--profile X`` cProfiles the pipe side of benchmark X (default a) and lists the
hottest functions inside the pipe file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import (  # noqa: E402
    API_KEY,
    EMULATOR,
    FLOOD_DELTAS,
    JSON_HEADERS,
    MODEL,
    SSE_HEADERS,
    Sample,
    alternate,
    emulator,
    med,
    pipe_stream,
    raw_stream,
    timed,
)

from openrouter_responses_pipe import (  # noqa: E402
    CATALOG_QUERY,
    HEALTH_ENTRY,
    MY_USAGE_ENTRY,
    ArtifactCodec,
    ArtifactDB,
    ArtifactRow,
    ArtifactStore,
    Pipe,
    RequestSettings,
    SSEDecoder,
    StreamState,
    SyncEngineRunner,
    Valves,
    build_responses_request,
    decode_image,
    marker_block,
    parse_catalog_entry,
    parse_chat_request,
    reduce_events,
    tool_card,
)

RESULTS = Path(__file__).with_name("results.json")
CONC_STREAMS, CONC_DELTAS, EXTRA_MODELS, MIN_MODELS = 50, 2_000, 400, 400
TARGETS = {"stream_cpu_ratio": 1.5, "first_token_overhead_ms": 10.0, "pipes_warm_us": 1000.0,
           # (e) a tool round delays the next answer's first token: the same 10 ms budget
           "tool_round_added_wall_ms": 10.0, "tool_round_store_added_wall_ms": 10.0,
           # (f) per item, the stream's tolerance for pipe vs plain-library CPU
           "codec_worst_ratio": 1.5,
           # (g) replay runs before the first token: at most half of the 10 ms budget
           "replay_50_turns_ms": 5.0,
           # (h) the dedupe SELECT and thread hop must stay small next to the write itself
           "store_write_ratio": 1.5,
           # (i) a background record sync must not slow the listing or a chat down
           "pipes_warm_during_sync_us": 1000.0, "first_token_during_sync_added_ms": 10.0,
           # (b) with budgets on: within today's (b) figure + 1 ms (issue #13)
           "first_token_budget_added_ms": 1.0}


@dataclass(frozen=True)
class Reps:
    stream: int = 7
    first_token: int = 40
    warmup: int = 3
    conc_rounds: int = 5
    cold: int = 10
    warm_calls: int = 2000
    tool: int = 30
    codec_bytes: int = 4_000_000  # (f) JSON bytes per batch (2,000 calls at most)
    codec_repeats: int = 9
    replay_calls: int = 50
    store: int = 40
    sync_rounds: int = 5


QUICK = Reps(stream=2, first_token=10, warmup=1, conc_rounds=1, cold=3, warm_calls=200,
             tool=6, codec_bytes=400_000, codec_repeats=3, replay_calls=10, store=6,
             sync_rounds=2)


# ──────────────────────────────────────────────────────────────── clients under test


@contextlib.asynccontextmanager
async def open_pipe(url: str, **valves: Any) -> AsyncIterator[Pipe]:
    pipe = Pipe(artifact_db=valves.pop("artifact_db", None), env={})
    pipe.valves = pipe.Valves(BASE_URL=url, API_KEY=API_KEY, **valves)
    try:
        yield pipe
    finally:
        await pipe.close()


# ──────────────────────────────────────────────────────────────── measurement helpers


class PeakRss(threading.Thread):
    """Samples this process's RSS every `interval` seconds; `.peak` holds the maximum."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self._proc, self._interval, self._halt = psutil.Process(), interval, threading.Event()
        self.start_rss = self.peak = self._proc.memory_info().rss

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


# ──────────────────────────────────────────────────────────────── (a) (b) (d)


async def bench_stream(pipe: Pipe, session: aiohttp.ClientSession, url: str, reps: Reps
                       ) -> dict[str, Any]:
    prompt = f"[emu:flood deltas={FLOOD_DELTAS}] go"
    runs = await alternate({"pipe": lambda: pipe_stream(pipe, prompt),
                            "raw": lambda: raw_stream(session, url, prompt)},
                           reps.stream, reps.warmup)
    out: dict[str, Any] = {"deltas": FLOOD_DELTAS, "runs": reps.stream}
    for name, samples in runs.items():
        lengths = {len(s.result[0]) for s in samples}
        out[name] = {"cpu_s": med([s.cpu for s in samples]),
                     "wall_s": med([s.wall for s in samples]),
                     "text_len": lengths.pop() if len(lengths) == 1 else sorted(lengths)}
    if out["pipe"]["text_len"] != out["raw"]["text_len"] or out["raw"]["text_len"] != FLOOD_DELTAS:
        raise SystemExit(f"TEXT LENGTH MISMATCH: pipe {out['pipe']['text_len']} vs raw "
                         f"{out['raw']['text_len']} (expected {FLOOD_DELTAS})")
    out["cpu_ratio"] = out["pipe"]["cpu_s"] / out["raw"]["cpu_s"]
    out["wall_ratio"] = out["pipe"]["wall_s"] / out["raw"]["wall_s"]
    return out


async def bench_first_token(pipe: Pipe, session: aiohttp.ClientSession, url: str, reps: Reps
                            ) -> dict[str, Any]:
    prompt = "[emu:text] go"
    runs = await alternate({"pipe": lambda: pipe_stream(pipe, prompt),
                            "raw": lambda: raw_stream(session, url, prompt)},
                           reps.first_token, reps.warmup)
    out: dict[str, Any] = {"runs": reps.first_token}
    for name, samples in runs.items():
        ms = [(s.result[1] - s.t0) * 1000 for s in samples]
        out[name] = {"median_ms": med(ms), "p90_ms": statistics.quantiles(ms, n=10)[-1]}
    out["overhead_ms"] = out["pipe"]["median_ms"] - out["raw"]["median_ms"]
    return out


async def bench_first_token_budget(url: str, reps: Reps, tmp: Path) -> dict[str, Any]:
    """(b) with budgets on: the plain pipe vs one with a SQLite ledger and a budget."""
    runner, engine = sqlite_runner(tmp / "spend.db")
    async with open_pipe(url) as plain, \
            open_pipe(url, artifact_db=runner, BUDGET_USD=1e6) as budgeted:
        runs = await alternate({"plain": lambda: pipe_stream(plain, "[emu:text] go"),
                                "budget": lambda: pipe_stream(budgeted, "[emu:text] go")},
                               reps.first_token, reps.warmup)
    engine.dispose()
    out: dict[str, Any] = {"runs": reps.first_token}
    for name, samples in runs.items():
        ms = [(s.result[1] - s.t0) * 1000 for s in samples]
        out[name] = {"median_ms": med(ms), "p90_ms": statistics.quantiles(ms, n=10)[-1]}
    out["added_ms"] = out["budget"]["median_ms"] - out["plain"]["median_ms"]
    return out


async def cold_raw(url: str) -> Sample:
    async def fetch() -> list[dict[str, Any]]:
        async with session.get(url + "/models" + CATALOG_QUERY, headers=JSON_HEADERS) as resp:
            resp.raise_for_status()
            return json.loads(await resp.read())["data"]

    session = aiohttp.ClientSession()
    try:
        return await timed(fetch)  # session.close() is outside the timed region
    finally:
        await session.close()


async def cold_pipes(url: str) -> Sample:
    async with open_pipe(url) as pipe:
        return await timed(pipe.pipes)  # pipe.close() is outside the timed region


async def bench_catalog(url: str, reps: Reps) -> dict[str, Any]:
    runs = await alternate({"pipe": lambda: cold_pipes(url), "raw": lambda: cold_raw(url)},
                           reps.cold, 1)
    # each result is the inner Sample of the request alone, without the close()
    pipe_ms, raw_ms = ([s.result.wall * 1000 for s in runs[n]] for n in ("pipe", "raw"))
    # pipes() also lists the health and "my usage" entries; count models only
    extra = {HEALTH_ENTRY["id"], MY_USAGE_ENTRY["id"]}
    n_pipe = sum(m["id"] not in extra for m in runs["pipe"][0].result.result)
    n_raw = len(runs["raw"][0].result.result)
    if n_pipe != n_raw or n_pipe < MIN_MODELS:
        raise SystemExit(f"CATALOG MISMATCH: pipes() gave {n_pipe} models, /models {n_raw}")
    async with open_pipe(url) as pipe:
        await pipe.pipes()
        warm_us = []
        for _ in range(reps.warm_calls):
            t = time.perf_counter_ns()
            await pipe.pipes()
            warm_us.append((time.perf_counter_ns() - t) / 1000)
    return {"models": n_pipe, "cold_runs": reps.cold, "warm_calls": reps.warm_calls,
            "cold_pipe_ms": med(pipe_ms), "cold_raw_ms": med(raw_ms),
            "cold_ratio": med(pipe_ms) / med(raw_ms), "warm_pipe_us": med(warm_us)}


# ──────────────────────────────────────────────────────────────── (i) record sync


async def sync_round(url: str, tmp: Path, sync_on: bool) -> dict[str, Any]:
    """One round on a fresh stub database: pipes() (starts the sync), then warm pipes() calls
    and one chat while the sync runs. With the sync off: the same calls, nothing in flight."""
    import owui_stubs

    owui_stubs.install("async", data_dir=tmp / uuid.uuid4().hex)
    try:
        owui_stubs.current().add_user("admin-1", role="admin", name="A", email="a@x.org")
        source = (ROOT / "openrouter_responses_pipe.py").read_text()
        pipe, _ = owui_stubs.load_function(source, "openrouter", "async")
        pipe.valves = pipe.Valves(BASE_URL=url, API_KEY=API_KEY, SYNC_MODEL_RECORDS=sync_on)
        await pipe.pipes()
        running = pipe._records._task is not None and not pipe._records._task.done()
        t0 = time.perf_counter()
        _, first = await pipe_stream(pipe, "[emu:text] go")
        first_ms = (first - t0) * 1000 if first else float("nan")
        warm = []
        for _ in range(200):
            t = time.perf_counter_ns()
            await pipe.pipes()
            warm.append((time.perf_counter_ns() - t) / 1000)
            await asyncio.sleep(0.0005)  # let the sync progress between calls
        w0 = time.perf_counter()
        await pipe._records.wait()
        status = dict(pipe._records.status)
        await pipe.close()
        return {"first_ms": first_ms, "warm_us": med(warm), "running": running,
                "left_s": time.perf_counter() - w0, "status": status}
    finally:
        owui_stubs.uninstall()


async def bench_record_sync(url: str, reps: Reps, tmp: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    rounds: dict[str, list[dict[str, Any]]] = {"sync": [], "off": []}
    for i in range(reps.sync_rounds + 1):
        for mode in (("sync", "off") if i % 2 else ("off", "sync")):
            result = await sync_round(url, tmp, mode == "sync")
            if i:  # the first round warms imports and connections
                rounds[mode].append(result)
    synced = rounds["sync"]
    if not all(r["running"] for r in synced) or any(r["status"].get("state") != "ok"
                                                    for r in synced):
        raise SystemExit(f"RECORD SYNC DID NOT RUN AS MEASURED: {[r['status'] for r in synced]}")
    out: dict[str, Any] = {"rounds": reps.sync_rounds,
                           "records": synced[0]["status"]["inserted"],
                           "sync_s": med([r["status"]["seconds"] for r in synced])}
    for mode, rs in rounds.items():
        out[mode] = {"warm_pipes_us": med([r["warm_us"] for r in rs]),
                     "first_token_ms": med([r["first_ms"] for r in rs])}
    out["first_token_added_ms"] = out["sync"]["first_token_ms"] - out["off"]["first_token_ms"]
    return out


# ──────────────────────────────────────────────────────────────── (e) tool round


async def weather(city: str) -> str:
    """The trivial async tool both sides run."""
    return f"Sunny in {city}"


TOOL_PROMPT = "[emu:tool_call name=weather] weather?"
OWUI_TOOLS = {"weather": {"tool_id": "bench", "callable": weather, "spec": {
    "name": "weather", "description": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}}
WIRE_TOOL = {"type": "function", "name": "weather", "description": "weather",  # as the pipe
             "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"],
                            "type": "object", "additionalProperties": False}, "strict": True}
TOOL_ANSWER = "Sunny in São Paulo"


async def raw_round(session: aiohttp.ClientSession, url: str, body: dict[str, Any]
                    ) -> tuple[str, list[dict[str, Any]]]:
    """One raw POST: the (a) baseline's parsing, plus the output items from *.done events."""
    parts: list[str] = []
    items: list[dict[str, Any]] = []
    buf = b""
    async with session.post(url + "/responses", data=json.dumps(body).encode(),
                            headers=SSE_HEADERS) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_any():
            *events, buf = (buf + chunk).split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev["type"] == "response.output_text.delta":
                        parts.append(ev["delta"])
                    elif ev["type"] == "response.output_item.done":
                        items.append(ev["item"])
    return "".join(parts), items


async def raw_tool_turn(session: aiohttp.ClientSession, url: str) -> tuple[str, None]:
    """The (e) baseline: POST with the tool, run the calls, POST again with their outputs."""
    user = {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": TOOL_PROMPT}]}
    body = {"model": MODEL, "input": [user], "stream": True, "store": False,
            "tools": [WIRE_TOOL]}
    _, items = await raw_round(session, url, body)
    outputs = [{"type": "function_call_output", "call_id": it["call_id"],
                "output": await weather(**json.loads(it["arguments"]))}
               for it in items if it["type"] == "function_call"]
    text, _ = await raw_round(session, url, {**body, "input": [user, *items, *outputs]})
    return text, None


def sqlite_runner(path: Path) -> tuple[Any, Any]:
    """(SyncEngineRunner, engine) on a SQLite file: Open WebUI's default database."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{path}")
    return SyncEngineRunner(engine), engine


async def bench_tool_round(url: str, reps: Reps, tmp: Path) -> dict[str, Any]:
    """(e) one tool round per turn: pipe without a store, pipe with a SQLite store, raw."""
    runner, engine = sqlite_runner(tmp / "tool.db")
    turn = iter(range(10**9))
    async with open_pipe(url) as bare, \
            open_pipe(url, artifact_db=runner, ARTIFACT_ENCRYPTION_KEY="bench-key") as stored, \
            aiohttp.ClientSession() as session:
        def with_store() -> Awaitable[Any]:
            meta = {"chat_id": "bench-chat", "message_id": f"m{next(turn)}"}
            return pipe_stream(stored, TOOL_PROMPT, __tools__=OWUI_TOOLS, __metadata__=meta)

        runs = await alternate({"pipe": lambda: pipe_stream(bare, TOOL_PROMPT,
                                                            __tools__=OWUI_TOOLS),
                                "store": with_store,
                                "raw": lambda: raw_tool_turn(session, url)},
                               reps.tool, reps.warmup)
    engine.dispose()
    out: dict[str, Any] = {"rounds_per_turn": 1, "runs": reps.tool}
    for name, samples in runs.items():
        bad = [s.result[0][-200:] for s in samples if TOOL_ANSWER not in s.result[0]]
        if bad:
            raise SystemExit(f"TOOL ROUND MISMATCH ({name}): answer lacks {TOOL_ANSWER!r}: "
                             f"{bad[0]!r}")
        out[name] = {"cpu_ms": med([s.cpu for s in samples]) * 1000,
                     "wall_ms": med([s.wall for s in samples]) * 1000}
    for name in ("pipe", "store"):
        for key in ("cpu", "wall"):
            out[name][f"added_{key}_ms"] = out[name][f"{key}_ms"] - out["raw"][f"{key}_ms"]
            out[name][f"{key}_ratio"] = out[name][f"{key}_ms"] / out["raw"][f"{key}_ms"]
    return out


# ──────────────────────────────────────────────────────────────── (f) (g) (h) artifacts


def text_of(size: int, seed: int) -> str:
    """Tool-output-like text of `size` characters: words (some non-ASCII), numbers, JSON."""
    rng = random.Random(seed)
    words = ("the", "result", "of", "São", "Paulo", "ação", "temperature", "humidity",
             "forecast", "city", "north", "wind", "km/h", "°C", "page", "title", "url",
             "https://example.org/a", "snippet", "rank", "score", "source", "Lisboa", "rio")
    out, n = [], 0
    while n < size:
        w = rng.choice(words) if rng.random() < 0.85 else str(rng.randint(0, 99999))
        w += "," if rng.random() < 0.1 else (". " if rng.random() < 0.05 else " ")
        out.append(w)
        n += len(w)
    return "".join(out)[:size]


def reasoning_fixture(seed: int) -> dict[str, Any]:
    """An OpenAI reasoning item: ~4 KB encrypted_content and a ~700-character summary."""
    rng = random.Random(seed)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    blob = "gAAAAAB" + "".join(rng.choice(alphabet) for _ in range(4089))
    summary = "**Planning the answer** 😀\n\n" + text_of(680, seed)
    return {"id": "rs_" + "".join(rng.choice("0123456789abcdef") for _ in range(50)),
            "type": "reasoning", "summary": [{"type": "summary_text", "text": summary}],
            "encrypted_content": blob, "format": "openai-responses-v1"}


def output_fixture(size: int, seed: int) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": f"call_{seed:024d}",
            "output": text_of(size, seed)}


def codec_items() -> dict[str, dict[str, Any]]:
    return {"reasoning 4 KB": reasoning_fixture(1), "tool output 1 KB": output_fixture(1024, 2),
            "tool output 20 KB": output_fixture(20 * 1024, 3),
            "tool output 200 KB": output_fixture(200 * 1024, 4)}


def per_call_us(fns: dict[str, Callable[[], Any]], calls: int, repeats: int
                ) -> dict[str, float]:
    """Median over `repeats` batches of `calls` calls (interleaved, order flipped) of us/call.

    Pure CPU work on one thread, so wall (perf_counter) is what it costs the event loop.
    """
    got: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats + 1):  # batch 0 is the warm-up
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            fn = fns[name]
            gc.collect()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            if i:
                got[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: med(v) for name, v in got.items()}


def bench_codec(reps: Reps) -> dict[str, Any]:
    """(f) ArtifactCodec encode+decode vs json.dumps/json.loads (+ Fernet when encrypted)."""
    from cryptography.fernet import Fernet

    fernet = Fernet(Fernet.generate_key())
    codecs = {"plain": ArtifactCodec(), "encrypted": ArtifactCodec(("bench-key",), True)}
    out: dict[str, Any] = {}
    for label, item in codec_items().items():
        size = len(json.dumps(item).encode())
        calls = max(5, min(2000, reps.codec_bytes // size))
        for mode, codec in codecs.items():
            if codec.decode(codec.encode(item)) != item:
                raise SystemExit(f"CODEC ROUND TRIP FAILED: {label}, {mode}")

            def pipe(codec: ArtifactCodec = codec, item: dict[str, Any] = item) -> Any:
                return codec.decode(codec.encode(item))

            if mode == "plain":
                def raw(item: dict[str, Any] = item) -> Any:
                    return json.loads(json.dumps(item).encode())
            else:
                def raw(item: dict[str, Any] = item) -> Any:
                    return json.loads(fernet.decrypt(fernet.encrypt(json.dumps(item).encode())))
            us = per_call_us({"pipe": pipe, "raw": raw}, calls, reps.codec_repeats)
            out[f"{label}, {mode}"] = {
                "json_bytes": size, "stored_bytes": len(codec.encode(item)), "calls": calls,
                "pipe_us": us["pipe"], "raw_us": us["raw"], "ratio": us["pipe"] / us["raw"]}
    out["worst_ratio"] = max(v["ratio"] for v in out.values())
    return out


def image_event(mib: int) -> bytes:
    """One `output_item.done` SSE event carrying a `mib` MiB picture as base64 (issue #14)."""
    data = b"\x89PNG\r\n\x1a\n" + random.Random(7).randbytes(mib * 1024 * 1024 - 8)
    b64 = base64.b64encode(data).decode()
    item = {"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": b64}
    return b"data: " + json.dumps({"type": "response.output_item.done", "output_index": 0,
                                   "item": item}).encode() + b"\n\n"


def bench_image_event(reps: Reps) -> dict[str, Any]:
    """(i) A 10 MiB picture event in 16 KiB reads: SSEDecoder + reducer + the one base64
    decode, vs a baseline that joins the reads once, splits, json.loads and decodes."""
    event = image_event(10)
    reads = [event[i:i + 16384] for i in range(0, len(event), 16384)]

    def pipe() -> Any:
        decoder, state = SSEDecoder(), StreamState()
        intents = [i for r in reads for i in reduce_events(state, decoder.feed(r))]
        return decode_image(intents[0][1], 64 * 1024 * 1024)

    def raw() -> Any:
        line = b"".join(reads).split(b"\n", 1)[0]
        return base64.b64decode(json.loads(line[6:])["item"]["result"])

    us = per_call_us({"pipe": pipe, "raw": raw}, 1, max(3, reps.codec_repeats // 2))
    return {"event_mib": round(len(event) / 1048576, 1), "reads": len(reads),
            "pipe_ms": us["pipe"] / 1000, "raw_ms": us["raw"] / 1000,
            "ratio": us["pipe"] / us["raw"]}


REPLAY_TURNS = 50


def replay_fixture(codec: ArtifactCodec) -> tuple[dict[str, Any], dict[str, dict[str, Any]],
                                                  list[dict[str, Any]]]:
    """A 50-turn chat as Open WebUI sends it back: every assistant reply is a tool turn with
    its markers (round: reasoning, call, output; final: reasoning), a tool card and the answer.
    Returns (body, artifacts as _load_artifacts hands them over, the expected `input`)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are helpful."}]
    artifacts: dict[str, dict[str, Any]] = {}
    expected: list[dict[str, Any]] = []
    for t in range(REPLAY_TURNS):
        question = f"Turn {t}: what is the weather in São Paulo? " + text_of(200, 1000 + t)
        messages.append({"role": "user", "content": question})
        expected.append({"type": "message", "role": "user",
                         "content": [{"type": "input_text", "text": question}]})
        call_id = f"call_{t:024d}"
        result = text_of(600, 2000 + t)  # under PRUNE_MIN_CHARS: replayed verbatim
        items = [reasoning_fixture(3000 + t),
                 {"id": f"fc_{t:011d}", "type": "function_call", "status": "completed",
                  "call_id": call_id, "name": "weather", "arguments": '{"city":"São Paulo"}'},
                 {"type": "function_call_output", "call_id": call_id, "output": result},
                 reasoning_fixture(4000 + t)]
        ids = [f"{t:04d}{k}" + "0" * 27 for k in range(4)]
        for i, item in zip(ids, items, strict=True):  # as loaded: decoded stored bytes
            artifacts[i] = codec.decode(codec.encode(item))
        answer = f"Tool result for {call_id}: Sunny in São Paulo. " + text_of(300, 5000 + t)
        answer = answer.strip()
        messages.append({"role": "assistant", "content": (
            marker_block(ids[:3]) + tool_card(call_id, "weather", items[1]["arguments"],
                                              result)
            + answer + marker_block(ids[3:]))})
        expected += [items[0], items[1], items[2], items[3],
                     {"type": "message", "role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": "thanks"})
    expected.append({"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": "thanks"}]})
    body = {"model": f"openrouter.{REPLAY_MODEL}", "stream": True, "messages": messages}
    return body, artifacts, expected


REPLAY_MODEL = "openai/gpt-5-nano"


def raw_strip_cards(text: str) -> str:
    """Drop `<details type="tool_calls" …>…</details>` blocks and the blank space after."""
    while (start := text.find('<details type="tool_calls"')) >= 0:
        end = text.find("</details>", start) + len("</details>")
        text = text[:start] + text[end:].lstrip()
    return text


def raw_replay(messages: list[dict[str, Any]], artifacts: dict[str, dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """The (g) baseline: the same `input` list from plain string and list operations (marker
    lines found by `startswith`, cards cut with `find`); no regexes, orphan repair, pruning
    or model-family checks."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "user":
            out.append({"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": m["content"]}]})
        elif m["role"] == "assistant":
            lines: list[str] = []
            ids: list[str] = []
            for line in [*m["content"].split("\n"), ""]:
                if line.startswith("[orp:"):
                    ids.append(line[5:line.index("]")])
                    continue
                if ids:  # a marker group just ended: its items around the text before it
                    found = [artifacts[i] for i in ids]
                    clean = raw_strip_cards("\n".join(lines)).strip()
                    out += [dict(it) for it in found if it["type"] == "reasoning"]
                    if clean:
                        out.append({"type": "message", "role": "assistant", "content": clean})
                    out += [dict(it) for it in found if it["type"] != "reasoning"]
                    lines, ids = [], []
                lines.append(line)
    return out


def catalog_entry(model_id: str) -> Any:
    rows = json.loads(EMULATOR.with_name("emulator_models.json").read_text("utf-8"))
    row = next(r for r in rows["captured"] if r["id"] == model_id)
    return parse_catalog_entry(row)


def bench_replay(reps: Reps) -> dict[str, Any]:
    """(g) parse_chat_request + build_responses_request with artifacts vs `raw_replay`."""
    settings = RequestSettings.merge(Valves(API_KEY=API_KEY), None)
    entry = catalog_entry(REPLAY_MODEL)
    body, artifacts, expected = replay_fixture(ArtifactCodec.of(settings))
    meta = {"chat_id": "bench-chat"}

    def pipe() -> list[dict[str, Any]]:
        req = parse_chat_request(body, {"id": "bench"}, meta, None)
        payload: list[dict[str, Any]] = build_responses_request(
            req, entry, settings, artifacts).payload["input"]
        return payload

    def raw() -> list[dict[str, Any]]:
        return raw_replay(body["messages"], artifacts)

    if pipe() != expected or raw() != expected:
        raise SystemExit("REPLAY MISMATCH: pipe or baseline input differs from the expected "
                         f"list ({len(pipe())} / {len(raw())} / {len(expected)} items)")
    us = per_call_us({"pipe": pipe, "raw": raw}, reps.replay_calls, reps.codec_repeats)
    return {"turns": REPLAY_TURNS, "messages": len(body["messages"]), "items": len(expected),
            "artifacts": len(artifacts), "calls": reps.replay_calls, "pipe_us": us["pipe"],
            "raw_us": us["raw"], "ratio": us["pipe"] / us["raw"]}


def turn_rows(codec: ArtifactCodec, turn: int, now: float) -> list[list[ArtifactRow]]:
    """One tool turn's checkpoints as the pipe makes them: the round (reasoning, call, 1 KB
    output), then the final answer's reasoning. Payloads are already encoded."""
    call_id = f"call_{turn:024d}"
    round_items = [reasoning_fixture(turn),
                   {"type": "function_call", "call_id": call_id, "name": "weather",
                    "arguments": '{"city":"São Paulo"}'}, output_fixture(1024, turn)]
    groups = [round_items, [reasoning_fixture(turn + 1)]]
    return [[ArtifactRow(uuid.uuid4().hex, "bench-chat", f"m{turn}", seq, it["type"],
                         codec.encode(it), now) for seq, it in enumerate(items)]
            for items in groups]


async def bench_store(reps: Reps, tmp: Path) -> dict[str, Any]:
    """(h) ArtifactStore.save (direct DB write, no Redis) on SQLite vs a raw SQLAlchemy insert
    of the same rows into an identical table, also in a worker thread."""
    runner, engine = sqlite_runner(tmp / "store.db")
    store = ArtifactStore(ArtifactDB(runner, "orp_artifacts_bench"), None, auto_flush=False)
    raw_table = ArtifactDB(runner, "orp_artifacts_raw")
    await store.db.ensure_schema()
    await raw_table.ensure_schema()
    codec, now = ArtifactCodec(("bench-key",)), time.time()
    # rows are encoded before timing ((f) measures the codec); each turn writes fresh ids
    pool = {name: [turn_rows(codec, 10 * i, now) for i in range(reps.store + reps.warmup)]
            for name in ("pipe", "raw")}

    async def pipe_turn() -> int:
        groups = pool["pipe"].pop()
        for rows in groups:
            await store.save(rows, 600)
        return sum(map(len, groups))

    async def raw_turn() -> int:
        groups = pool["raw"].pop()
        for rows in groups:
            dicts = [{"id": r.id, "chat_id": r.chat_id, "message_id": r.message_id,
                      "seq": r.seq, "item_type": r.item_type, "payload": r.payload,
                      "created_at": r.created_at, "last_used_at": r.created_at} for r in rows]

            def work(dicts: list[dict[str, Any]] = dicts) -> None:
                with engine.begin() as conn:
                    conn.execute(raw_table.table.insert(), dicts)

            await asyncio.to_thread(work)
        return sum(map(len, groups))

    runs = await alternate({"pipe": pipe_turn, "raw": raw_turn}, reps.store, reps.warmup)
    engine.dispose()
    out: dict[str, Any] = {"runs": reps.store, "rows_per_turn": runs["pipe"][0].result,
                           "transactions_per_turn": 2}
    for name, samples in runs.items():
        out[name] = {"wall_ms": med([s.wall for s in samples]) * 1000,
                     "cpu_ms": med([s.cpu for s in samples]) * 1000}
    out["wall_ratio"] = out["pipe"]["wall_ms"] / out["raw"]["wall_ms"]
    return out


# ──────────────────────────────────────────────────────────────── (c) child processes


async def concurrent_child(mode: str, url: str, rounds: int) -> dict[str, Any]:
    prompt = f"[emu:flood deltas={CONC_DELTAS}] go"
    async with contextlib.AsyncExitStack() as stack:
        if mode == "pipe":
            pipe = await stack.enter_async_context(open_pipe(url))
            one = lambda i: pipe_stream(pipe, prompt, user=f"bench-{i}")  # noqa: E731
        else:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            one = lambda i: raw_stream(session, url, prompt)  # noqa: E731
        await one(0)  # warm-up: catalog fetch, imports, first connection
        gc.collect()
        sampler = PeakRss()
        sampler.start()
        walls, errors, c0 = [], 0, time.process_time()
        for _ in range(rounds):
            t = time.perf_counter()
            got = await asyncio.gather(*(one(i) for i in range(CONC_STREAMS)),
                                       return_exceptions=True)
            walls.append(time.perf_counter() - t)
            errors += sum(isinstance(r, BaseException) or len(r[0]) != CONC_DELTAS for r in got)
        cpu = time.process_time() - c0
        sampler.stop()
    mib = 1024 * 1024
    return {"wall_s": med(walls), "cpu_s": cpu / rounds, "errors": errors, "rounds": rounds,
            "start_rss_mib": sampler.start_rss / mib, "peak_rss_mib": sampler.peak / mib,
            "rss_growth_mib": (sampler.peak - sampler.start_rss) / mib}


def run_child(mode: str, url: str, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--url", url, "--rounds", str(rounds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ──────────────────────────────────────────────────────────────── orchestration, report


async def run_in_process(url: str, reps: Reps) -> dict[str, Any]:
    async with open_pipe(url) as pipe, aiohttp.ClientSession() as session:
        stream = await bench_stream(pipe, session, url, reps)
        first = await bench_first_token(pipe, session, url, reps)
    out = {"stream": stream, "first_token": first, "catalog": await bench_catalog(url, reps)}
    with tempfile.TemporaryDirectory(prefix="orp-bench-") as tmp:
        out["tool_round"] = await bench_tool_round(url, reps, Path(tmp))
        out["codec"] = bench_codec(reps)
        out["image_event"] = bench_image_event(reps)
        out["replay"] = bench_replay(reps)
        out["store"] = await bench_store(reps, Path(tmp))
        out["record_sync"] = await bench_record_sync(url, reps, Path(tmp))
        out["first_token_budget"] = await bench_first_token_budget(url, reps, Path(tmp))
    return out


def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    got = {"stream_cpu_ratio": r["stream"]["cpu_ratio"],
           "first_token_overhead_ms": r["first_token"]["overhead_ms"],
           "pipes_warm_us": r["catalog"]["warm_pipe_us"],
           "tool_round_added_wall_ms": r["tool_round"]["pipe"]["added_wall_ms"],
           "tool_round_store_added_wall_ms": r["tool_round"]["store"]["added_wall_ms"],
           "codec_worst_ratio": r["codec"]["worst_ratio"],
           "replay_50_turns_ms": r["replay"]["pipe_us"] / 1000,
           "store_write_ratio": r["store"]["wall_ratio"],
           "pipes_warm_during_sync_us": r["record_sync"]["sync"]["warm_pipes_us"],
           "first_token_during_sync_added_ms": r["record_sync"]["first_token_added_ms"],
           "first_token_budget_added_ms": r["first_token_budget"]["added_ms"]}
    return {k: {"value": v, "target_max": TARGETS[k], "pass": v <= TARGETS[k],
                "miss_by": max(0.0, v - TARGETS[k])} for k, v in got.items()}


def table(r: dict[str, Any]) -> str:
    s, f, c, k, v = r["stream"], r["first_token"], r["concurrent"], r["catalog"], r["verdicts"]
    p, w = c["pipe"], c["raw"]

    def st(key: str) -> str:
        return "PASS" if v[key]["pass"] else "MISS"

    rows = [
        ("metric", "pipe", "raw", "pipe vs raw", "target", "status"),
        (f"(a) {s['deltas']:,} deltas, CPU s", f"{s['pipe']['cpu_s']:.3f}",
         f"{s['raw']['cpu_s']:.3f}", f"{s['cpu_ratio']:.2f}x", "<= 1.5x", st("stream_cpu_ratio")),
        ("(a) wall s", f"{s['pipe']['wall_s']:.3f}", f"{s['raw']['wall_s']:.3f}",
         f"{s['wall_ratio']:.2f}x", "", ""),
        ("(a) text length", f"{s['pipe']['text_len']}", f"{s['raw']['text_len']}", "equal", "", ""),
        ("(b) first token, median ms", f"{f['pipe']['median_ms']:.2f}",
         f"{f['raw']['median_ms']:.2f}", f"{f['overhead_ms']:+.2f} ms", "<= 10 ms",
         st("first_token_overhead_ms")),
        ("(b) first token, p90 ms", f"{f['pipe']['p90_ms']:.2f}", f"{f['raw']['p90_ms']:.2f}",
         "", "", ""),
        ("(b) with budgets, median ms (vs plain pipe)",
         f"{r['first_token_budget']['budget']['median_ms']:.2f}",
         f"{r['first_token_budget']['plain']['median_ms']:.2f}",
         f"{r['first_token_budget']['added_ms']:+.2f} ms", "<= +1 ms",
         st("first_token_budget_added_ms")),
        (f"(c) {CONC_STREAMS}x{CONC_DELTAS:,} concurrent, wall s", f"{p['wall_s']:.3f}",
         f"{w['wall_s']:.3f}", f"{p['wall_s'] / w['wall_s']:.2f}x", "", ""),
        ("(c) client CPU s", f"{p['cpu_s']:.3f}", f"{w['cpu_s']:.3f}",
         f"{p['cpu_s'] / w['cpu_s']:.2f}x", "", ""),
        ("(c) peak RSS MiB", f"{p['peak_rss_mib']:.1f}", f"{w['peak_rss_mib']:.1f}", "", "", ""),
        ("(c) RSS growth MiB", f"{p['rss_growth_mib']:.1f}", f"{w['rss_growth_mib']:.1f}",
         "", "", ""),
        ("(c) errors", f"{p['errors']}", f"{w['errors']}", "", "0",
         "PASS" if p["errors"] == w["errors"] == 0 else "MISS"),
        (f"(d) pipes() cold, {k['models']} models, ms", f"{k['cold_pipe_ms']:.2f}",
         f"{k['cold_raw_ms']:.2f}", f"{k['cold_ratio']:.2f}x", "", ""),
        ("(d) pipes() warm, median us/call", f"{k['warm_pipe_us']:.1f}", "-", "",
         "<= 1000 us", st("pipes_warm_us")),
    ]
    t, cd, rp, sw = r["tool_round"], r["codec"], r["replay"], r["store"]
    for name, label, key in (("pipe", "(e) tool round", "tool_round_added_wall_ms"),
                             ("store", "(e) tool round + SQLite store",
                              "tool_round_store_added_wall_ms")):
        q = t[name]
        rows += [(f"{label}, wall ms", f"{q['wall_ms']:.2f}", f"{t['raw']['wall_ms']:.2f}",
                  f"{q['added_wall_ms']:+.2f} ms", "<= +10 ms", st(key)),
                 (f"{label}, CPU ms", f"{q['cpu_ms']:.2f}", f"{t['raw']['cpu_ms']:.2f}",
                  f"{q['added_cpu_ms']:+.2f} ms", "", "")]
    for label, c in cd.items():
        if label != "worst_ratio":
            ok = c["ratio"] <= TARGETS["codec_worst_ratio"]
            rows.append((f"(f) {label}, us", f"{c['pipe_us']:.1f}", f"{c['raw_us']:.1f}",
                         f"{c['ratio']:.2f}x", "<= 1.5x", "PASS" if ok else "MISS"))
    rows += [(f"(g) replay {rp['turns']} turns, {rp['items']} items, us", f"{rp['pipe_us']:.0f}",
              f"{rp['raw_us']:.0f}", f"{rp['ratio']:.2f}x", "<= 5000 us",
              st("replay_50_turns_ms")),
             (f"(h) store write, {sw['rows_per_turn']} rows/turn, ms",
              f"{sw['pipe']['wall_ms']:.2f}", f"{sw['raw']['wall_ms']:.2f}",
              f"{sw['wall_ratio']:.2f}x", "<= 1.5x",
              st("store_write_ratio")),
             ("(h) store write, CPU ms/turn", f"{sw['pipe']['cpu_ms']:.2f}",
              f"{sw['raw']['cpu_ms']:.2f}", "", "", "")]
    rs = r["record_sync"]
    rows += [("(i) pipes() warm during a sync, us", f"{rs['sync']['warm_pipes_us']:.1f}",
              f"{rs['off']['warm_pipes_us']:.1f}", "", "<= 1000 us",
              st("pipes_warm_during_sync_us")),
             ("(i) first token during a sync, ms", f"{rs['sync']['first_token_ms']:.2f}",
              f"{rs['off']['first_token_ms']:.2f}", f"{rs['first_token_added_ms']:+.2f} ms",
              "<= +10 ms", st("first_token_during_sync_added_ms")),
             (f"(i) sync of {rs['records']} records, s", f"{rs['sync_s']:.2f}", "-", "", "", "")]
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


PROFILES = ("a", "e", "e-bare", "f", "g", "h")


def profile(which: str, url: str) -> None:
    """cProfile the pipe side of one benchmark (after a warm-up) and print its hot spots.

    a: one 20k-delta stream; e: 20 tool turns with the SQLite store (e-bare: without it);
    f: every (f) item encoded and decoded, encrypted and not, 200 times; g: 50 replay
    builds; h: 50 store turns. The first table is the pipe file alone, by tottime.
    """
    import cProfile
    import pstats

    prof = cProfile.Profile()

    async def go() -> None:
        with tempfile.TemporaryDirectory(prefix="orp-bench-") as tmp:
            if which == "a":
                prompt = f"[emu:flood deltas={FLOOD_DELTAS}] go"
                async with open_pipe(url) as pipe:
                    await pipe_stream(pipe, prompt)  # warm-up
                    prof.enable()
                    await pipe_stream(pipe, prompt)
                    prof.disable()
            elif which in ("e", "e-bare"):
                runner, engine = sqlite_runner(Path(tmp) / "tool.db")
                store = {} if which == "e-bare" else {"artifact_db": runner,
                                                      "ARTIFACT_ENCRYPTION_KEY": "bench-key"}
                async with open_pipe(url, **store) as pipe:
                    for i in range(23):  # 3 warm-up turns
                        if i == 3:
                            prof.enable()
                        await pipe_stream(pipe, TOOL_PROMPT, __tools__=OWUI_TOOLS,
                                          __metadata__={"chat_id": "c", "message_id": f"m{i}"})
                    prof.disable()
                engine.dispose()
            elif which == "f":
                codecs = (ArtifactCodec(), ArtifactCodec(("bench-key",), True))
                items = list(codec_items().values())
                for i in range(201):
                    if i == 1:
                        prof.enable()
                    for codec in codecs:
                        for item in items:
                            codec.decode(codec.encode(item))
                prof.disable()
            elif which == "g":
                settings = RequestSettings.merge(Valves(API_KEY=API_KEY), None)
                entry = catalog_entry(REPLAY_MODEL)
                body, artifacts, _ = replay_fixture(ArtifactCodec.of(settings))
                for i in range(51):
                    if i == 1:
                        prof.enable()
                    req = parse_chat_request(body, {"id": "bench"}, {"chat_id": "c"}, None)
                    build_responses_request(req, entry, settings, artifacts)
                prof.disable()
            else:  # h
                runner, engine = sqlite_runner(Path(tmp) / "store.db")
                store = ArtifactStore(ArtifactDB(runner, "orp_artifacts_bench"), None,
                                      auto_flush=False)
                codec = ArtifactCodec(("bench-key",))
                turns = [turn_rows(codec, 10 * i, time.time()) for i in range(53)]
                for i, groups in enumerate(turns):
                    if i == 3:
                        prof.enable()
                    for rows in groups:
                        await store.save(rows, 600)
                prof.disable()
                engine.dispose()

    asyncio.run(go())
    stats = pstats.Stats(prof).sort_stats("tottime")
    print(f"\nHot spots inside openrouter_responses_pipe.py ({which}), by tottime:")
    stats.print_stats("openrouter_responses_pipe", 15)
    print(f"Whole process ({which}), top 20 by tottime:")
    stats.print_stats(20)
    if which != "a":
        print(f"Whole process ({which}), top 25 by cumulative time:")
        stats.sort_stats("cumulative").print_stats(25)


def pipe_source() -> dict[str, Any]:
    """Which pipe file was measured: HEAD, whether the working copy differs, its hash."""
    import hashlib

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    pipe_file = ROOT / "openrouter_responses_pipe.py"
    return {"head": git("rev-parse", "--short", "HEAD").stdout.strip(),
            "pipe_file_modified": git("diff", "--quiet", "HEAD", "--", pipe_file.name)
            .returncode == 1,
            "pipe_file_sha256": hashlib.sha256(pipe_file.read_bytes()).hexdigest()[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--profile", nargs="?", const="a", choices=PROFILES,
                    help="cProfile the pipe side of one benchmark (default: a)")
    ap.add_argument("--spend", action="store_true",
                    help="run only (b) with budgets on and print it (results.json untouched)")
    ap.add_argument("--child", choices=("pipe", "raw"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(concurrent_child(args.child, args.url, args.rounds))))
        return
    reps = QUICK if args.quick else Reps()
    with emulator(EXTRA_MODELS) as url:
        if args.profile:
            return profile(args.profile, url)
        if args.spend:
            with tempfile.TemporaryDirectory(prefix="orp-bench-") as tmp:
                print(json.dumps(asyncio.run(bench_first_token_budget(url, reps, Path(tmp))),
                                 indent=2))
            return
        results = asyncio.run(run_in_process(url, reps))
        results["concurrent"] = {m: run_child(m, url, reps.conc_rounds) for m in ("raw", "pipe")}
    results["verdicts"] = verdicts(results)
    results["meta"] = {**pipe_source(),
                       "python": platform.python_version(), "platform": platform.platform(),
                       "cpus": psutil.cpu_count(), "aiohttp": aiohttp.__version__,
                       "quick": args.quick, "reps": asdict(reps), "time": time.time()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}  (targets are informative; exit code is 0)")


if __name__ == "__main__":
    main()
