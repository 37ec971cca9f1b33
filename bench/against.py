"""Benchmarks (a) and (b) for this pipe file and for the one of an earlier commit, back to back.

Usage:  python bench/against.py REV [--rounds N] [--instructions]
        e.g. REV = 0b8a7dc (the pipe before issues #10-#14)

"Within today's figures" can only be judged on one machine in one run: the same (a) and (b)
numbers vary by ±30 % between machines and between hours on a shared one. So this script
times both versions of `openrouter_responses_pipe.py` here and now:

  * REV's file comes from `git show REV:openrouter_responses_pipe.py`, the current one from the
    working tree; each is copied into a temporary folder of its own.
  * One emulator subprocess (tools/openrouter_emulator.py, 400 extra models) serves every run.
  * Each measurement is a fresh child process that imports one of the two files and runs
    bench/run.py's (a) (one 20,000-delta stream, client CPU) and (b) (first content delta on
    `[emu:text]`) against its own raw-aiohttp baseline, with the very same code
    (bench/measure.py). Children alternate REV, current, current, REV, … for N rounds.
  * Reported per version: the median over rounds of (a) pipe CPU / raw CPU and of (b) pipe
    minus raw first-token ms; then current minus REV.
  * `--instructions` (needs valgrind): (a)'s pure part (SSE decoder, reducer, renderer over
    one captured 20,000-delta body in 16 KiB reads) counted in instructions by callgrind,
    which does not vary with the machine's load: (4 bodies - 1 body) / 3 per version.

Nothing here is a pass/fail gate (the exit code is 0); bench/RESULTS.md records the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PIPE_FILE = "openrouter_responses_pipe.py"
sys.path.insert(0, str(HERE))
from measure import (  # noqa: E402
    API_KEY,
    FLOOD_DELTAS,
    alternate,
    emulator,
    med,
    pipe_stream,
    raw_stream,
)

# ──────────────────────────────────────────────────────────────── one child: one version


@contextlib.asynccontextmanager
async def open_pipe(module: Any, url: str) -> AsyncIterator[Any]:
    pipe = module.Pipe(env={})
    pipe.valves = pipe.Valves(BASE_URL=url, API_KEY=API_KEY)
    try:
        yield pipe
    finally:
        await pipe.close()


async def measure_one(module: Any, url: str, streams: int, first_tokens: int) -> dict[str, Any]:
    import aiohttp

    flood, text = f"[emu:flood deltas={FLOOD_DELTAS}] go", "[emu:text] go"
    async with open_pipe(module, url) as pipe, aiohttp.ClientSession() as session:
        a = await alternate({"pipe": lambda: pipe_stream(pipe, flood),
                             "raw": lambda: raw_stream(session, url, flood)}, streams, 3)
        b = await alternate({"pipe": lambda: pipe_stream(pipe, text),
                             "raw": lambda: raw_stream(session, url, text)}, first_tokens, 5)
    if {len(s.result[0]) for s in a["pipe"]} != {FLOOD_DELTAS}:
        raise SystemExit("the pipe lost text in (a)")
    first = {k: med([(s.result[1] - s.t0) * 1000 for s in v]) for k, v in b.items()}
    return {"a_cpu_ratio": med([s.cpu for s in a["pipe"]]) / med([s.cpu for s in a["raw"]]),
            "b_overhead_ms": first["pipe"] - first["raw"],
            "b_pipe_ms": first["pipe"], "b_raw_ms": first["raw"]}


def import_copy(folder: str) -> Any:
    sys.path.insert(0, folder)
    import openrouter_responses_pipe as module

    if Path(module.__file__ or "").resolve().parent != Path(folder).resolve():
        raise SystemExit(f"imported {module.__file__}, not the copy in {folder}")
    return module


def child(folder: str, url: str, streams: int, first_tokens: int) -> None:
    module = import_copy(folder)
    print(json.dumps(asyncio.run(measure_one(module, url, streams, first_tokens))))


def pure_stream(module: Any, body: bytes) -> int:
    """(a)'s pure part: the SSE decoder, the reducer and the renderer over a captured body
    in 16 KiB reads, as `_pump` runs them (the image step only for batches the reducer says
    hold a picture, where the version counts them)."""
    state, decoder = module.StreamState(), module.SSEDecoder()
    renderer, seen, chunks = module.ChunkRenderer("openrouter.x", 0), 0, 0
    for i in range(0, len(body), 16384):
        intents = module.reduce_events(state, decoder.feed(body[i:i + 16384]))
        if getattr(state, "image_intents", 0) != seen:
            seen = state.image_intents
        if intents:
            chunks += len(renderer.render(intents))
    return chunks


def count_child(folder: str, body_file: str, repeats: int) -> None:
    """Run under callgrind by the parent: import the copy, then `repeats` pure streams."""
    module, body = import_copy(folder), Path(body_file).read_bytes()
    for _ in range(repeats):
        pure_stream(module, body)


# ──────────────────────────────────────────────────────────────── the parent: both versions


def copy_versions(rev: str, tmp: Path) -> dict[str, Path]:
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{PIPE_FILE}"],
                           capture_output=True, check=True).stdout
    folders = {rev: tmp / "rev", "current": tmp / "current"}
    for folder in folders.values():
        folder.mkdir()
    (folders[rev] / PIPE_FILE).write_bytes(shown)
    shutil.copyfile(ROOT / PIPE_FILE, folders["current"] / PIPE_FILE)
    return folders


def run_child(folder: Path, url: str, streams: int, first_tokens: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--url", url,
                          "--streams", str(streams), "--first-tokens", str(first_tokens)],
                         capture_output=True, text=True, check=True, cwd=folder)
    return json.loads(out.stdout.strip().splitlines()[-1])


async def capture_flood(url: str) -> bytes:
    """The raw SSE body of one 20,000-delta answer, as the pipe would read it."""
    import aiohttp

    item = {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": f"[emu:flood deltas={FLOOD_DELTAS}] go"}]}
    body = {"model": "openai/gpt-4o", "input": [item], "stream": True, "store": False}
    async with aiohttp.ClientSession() as session, session.post(
            url + "/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as resp:
        return await resp.read()


def instructions(folder: Path, body_file: Path, repeats: int) -> int:
    """Instructions valgrind counts for importing the copy and `repeats` pure streams."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder / 'callgrind.out'}",
         sys.executable, __file__, "--count-child", str(folder), "--body", str(body_file),
         "--repeats", str(repeats)], capture_output=True, text=True, check=True, cwd=folder)
    refs = [line for line in out.stderr.splitlines() if "refs:" in line]
    return int(refs[-1].split("refs:")[1].strip().replace(",", ""))


def instruction_report(folders: dict[str, Path], body_file: Path) -> str:
    """Per version: (instructions for 4 streams - for 1) / 3, i.e. one stream's decode, reduce
    and render, without the import; deterministic, unlike the timings."""
    per = {name: (instructions(f, body_file, 4) - instructions(f, body_file, 1)) / 3
           for name, f in folders.items()}
    first = next(iter(per.values()))
    return "\n".join(f"  {name}: {n / 1e6:.1f} M instructions per 20,000-delta body "
                     f"({n / first - 1:+.1%})" for name, n in per.items())


def report(rev: str, runs: dict[str, list[dict[str, Any]]]) -> str:
    med_of = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
              for name, rs in runs.items()}
    old, new = med_of[rev], med_of["current"]
    rows = [("version", "(a) CPU vs raw", "(b) first-token overhead", "(b) pipe ms", "runs")]
    for name, m in ((rev, old), ("current", new)):
        rows.append((name, f"{m['a_cpu_ratio']:.2f}x", f"{m['b_overhead_ms']:+.2f} ms",
                     f"{m['b_pipe_ms']:.2f}", str(len(runs[name]))))
    rows.append(("current - " + rev, f"{new['a_cpu_ratio'] - old['a_cpu_ratio']:+.2f}",
                 f"{new['b_overhead_ms'] - old['b_overhead_ms']:+.2f} ms", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    each = "\n".join(f"  {name}: " + ", ".join(
        f"({r['a_cpu_ratio']:.2f}x, {r['b_overhead_ms']:+.2f} ms)" for r in rs)
        for name, rs in runs.items())
    return "\n".join(lines) + "\n\nEach round (a, b):\n" + each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", help="the earlier commit whose pipe file is compared")
    ap.add_argument("--rounds", type=int, default=4, help="child processes per version")
    ap.add_argument("--streams", type=int, default=7, help="(a) runs per child")
    ap.add_argument("--first-tokens", type=int, default=60, help="(b) runs per child")
    ap.add_argument("--instructions", action="store_true",
                    help="also count (a)'s decode/reduce/render instructions under valgrind")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--count-child", help=argparse.SUPPRESS)
    ap.add_argument("--body", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.url, args.streams, args.first_tokens)
    if args.count_child:
        return count_child(args.count_child, args.body, args.repeats)
    if not args.rev:
        ap.error("name the earlier commit, e.g. 0b8a7dc")
    with tempfile.TemporaryDirectory(prefix="orp-against-") as tmp, \
            emulator(400) as url:
        folders = copy_versions(args.rev, Path(tmp))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in folders}
        for i in range(args.rounds):
            order = list(folders) if i % 2 == 0 else list(folders)[::-1]
            for name in order:
                runs[name].append(run_child(folders[name], url, args.streams,
                                            args.first_tokens))
                print(f"round {i + 1} {name}: {runs[name][-1]}", file=sys.stderr)
        counted = ""
        if args.instructions:
            body_file = Path(tmp) / "flood.sse"
            body_file.write_bytes(asyncio.run(capture_flood(url)))
            counted = instruction_report(folders, body_file)
    print(report(args.rev, runs))
    if counted:
        print("\n(a)'s pure part under valgrind (decoder + reducer + renderer):\n" + counted)


if __name__ == "__main__":
    main()
