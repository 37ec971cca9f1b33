"""Benchmarks for openrouter_responses_pipe.py against the local OpenRouter emulator.

Usage:  python bench/run.py [--quick] [--profile]

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
  (c) 50 concurrent 2,000-delta streams through ONE Pipe (50 distinct user ids, so the
      pipe's per-user limit of 4 does not serialise them) vs 50 raw streams on one session.
      Each side runs in its own child process so peak RSS (psutil, sampled every 5 ms in a
      background thread) is not polluted by the other; the sampler's CPU is in both figures.
      Wall is the median over rounds, CPU the mean per round, errors the total.
  (d) ``pipes()`` with a 413-model catalog: cold = new Pipe, first call fetches /models
      (baseline: new aiohttp session, GET /models, json.loads); warm = repeated calls.
Targets are printed with PASS/MISS; the exit code is 0 whatever they show (informative).
Results go to bench/results.json. ``--profile`` cProfiles one pipe run of (a) and lists the
hottest functions inside the pipe file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from openrouter_responses_pipe import Pipe  # noqa: E402

EMULATOR = ROOT / "tools" / "openrouter_emulator.py"
RESULTS = Path(__file__).with_name("results.json")
API_KEY, MODEL = "sk-or-bench", "openai/gpt-4o"
FLOOD_DELTAS, CONC_STREAMS, CONC_DELTAS, EXTRA_MODELS, MIN_MODELS = 20_000, 50, 2_000, 400, 400
TARGETS = {"stream_cpu_ratio": 1.5, "first_token_overhead_ms": 10.0, "pipes_warm_us": 1000.0}
BASE_HEADERS = {"Content-Type": "application/json", "HTTP-Referer": "https://openwebui.com/",
                "X-OpenRouter-Title": "Open WebUI", "X-Title": "Open WebUI",
                "Authorization": f"Bearer {API_KEY}"}  # what the pipe sends by default
SSE_HEADERS = {**BASE_HEADERS, "Accept": "text/event-stream"}
JSON_HEADERS = {**BASE_HEADERS, "Accept": "application/json"}


@dataclass(frozen=True)
class Reps:
    stream: int = 7
    first_token: int = 40
    warmup: int = 3
    conc_rounds: int = 5
    cold: int = 10
    warm_calls: int = 2000


QUICK = Reps(stream=2, first_token=10, warmup=1, conc_rounds=1, cold=3, warm_calls=200)


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


async def pipe_stream(pipe: Pipe, text: str, user: str = "bench") -> tuple[str, float | None]:
    body = {"model": f"openrouter.{MODEL}", "stream": True,
            "messages": [{"role": "user", "content": text}]}
    gen = await pipe.pipe(body=body, __user__={"id": user})
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


@contextlib.asynccontextmanager
async def open_pipe(url: str) -> AsyncIterator[Pipe]:
    pipe = Pipe()
    pipe.valves = pipe.Valves(BASE_URL=url, API_KEY=API_KEY)
    try:
        yield pipe
    finally:
        await pipe.close()


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


async def cold_raw(url: str) -> Sample:
    async def fetch() -> list[dict[str, Any]]:
        async with session.get(url + "/models", headers=JSON_HEADERS) as resp:
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
    n_pipe, n_raw = (len(runs[n][0].result.result) for n in ("pipe", "raw"))
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


@contextlib.contextmanager
def emulator(extra_models: int):
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


async def run_in_process(url: str, reps: Reps) -> dict[str, Any]:
    async with open_pipe(url) as pipe, aiohttp.ClientSession() as session:
        stream = await bench_stream(pipe, session, url, reps)
        first = await bench_first_token(pipe, session, url, reps)
    return {"stream": stream, "first_token": first, "catalog": await bench_catalog(url, reps)}


def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    got = {"stream_cpu_ratio": r["stream"]["cpu_ratio"],
           "first_token_overhead_ms": r["first_token"]["overhead_ms"],
           "pipes_warm_us": r["catalog"]["warm_pipe_us"]}
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
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def profile_stream(url: str) -> None:
    """cProfile one (a) pipe run (after a warm-up) and print hot spots in the pipe file."""
    import cProfile
    import pstats

    prompt = f"[emu:flood deltas={FLOOD_DELTAS}] go"

    async def go(prof: cProfile.Profile) -> None:
        async with open_pipe(url) as pipe:
            await pipe_stream(pipe, prompt)  # warm-up
            prof.enable()
            await pipe_stream(pipe, prompt)
            prof.disable()

    prof = cProfile.Profile()
    asyncio.run(go(prof))
    stats = pstats.Stats(prof).sort_stats("tottime")
    print("\nHot spots inside openrouter_responses_pipe.py (one 20k-delta stream, by tottime):")
    stats.print_stats("openrouter_responses_pipe", 15)
    print("Whole process, top 15 by tottime:")
    stats.print_stats(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--profile", action="store_true", help="cProfile one (a) pipe run")
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
            return profile_stream(url)
        results = asyncio.run(run_in_process(url, reps))
        results["concurrent"] = {m: run_child(m, url, reps.conc_rounds) for m in ("raw", "pipe")}
    results["verdicts"] = verdicts(results)
    results["meta"] = {"python": platform.python_version(), "platform": platform.platform(),
                       "cpus": psutil.cpu_count(), "aiohttp": aiohttp.__version__,
                       "quick": args.quick, "reps": asdict(reps), "time": time.time()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}  (targets are informative; exit code is 0)")


if __name__ == "__main__":
    main()
