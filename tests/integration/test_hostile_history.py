"""A hostile chat history never stalls the worker (issue #11, item 2).

The real pipe() runs against the emulator while another coroutine ticks every 5 ms; its
longest wait between ticks shows how long the event loop was blocked. A history of 140 KB+
of each adversarial shape (which any user can put into a chat by editing a message, or send
through the API) must not block it for more than 50 ms.
"""

from __future__ import annotations

import asyncio
import time

from helpers import body, posts, stream

GPT4O = "openai/gpt-4o"

SHAPES = {
    "think": "<think>" * 20_000,
    "reasoning": '<details type="reasoning"' * 6_000,
    "reasoning-tags": '<details type="reasoning">' * 6_000,
    "cards": '<details type="tool_calls"' * 6_000,
    "cards-no-close": '<details type="tool_calls" id="c">\n' * 5_000,
    "markers": "[orp:" * 30_000,
    "marker-lines": "[orp:abcdefgh]: #\n" * 9_000 + "x",
}


class Heartbeat:
    def __init__(self) -> None:
        self.longest = 0.0
        self.beats = 0

    async def run(self, stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.005)
            self.beats += 1
            last = now


async def test_a_hostile_history_never_blocks_other_users(pipe, emulator):
    await pipe.pipes()  # the catalog is loaded before the clock starts
    history = []
    for text in SHAPES.values():
        history += [{"role": "user", "content": "go on"}, {"role": "assistant", "content": text}]
    payload = body(GPT4O, "hello")
    payload["messages"] = history + payload["messages"]
    assert sum(len(m["content"]) for m in history) > 140_000 * 3
    beat, stop = Heartbeat(), asyncio.Event()
    ticker = asyncio.create_task(beat.run(stop))
    await asyncio.sleep(0.02)
    try:
        out = await stream(pipe, payload)
    finally:
        stop.set()
        await ticker
    assert out.text and out.error is None
    sent = posts(emulator)[-1]["json"]["input"]
    assert len(sent) == len(payload["messages"])  # every message went, none was dropped
    assert beat.beats >= 1
    assert beat.longest < 0.05, f"the event loop was blocked for {beat.longest * 1000:.0f} ms"
