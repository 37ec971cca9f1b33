"""Fixtures: a local OpenRouter emulator and a Pipe pointed at it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openrouter_emulator import Emulator
from sdk_validation import validate_request

from openrouter_responses_pipe import Pipe


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The emulator; afterwards every body the pipe POSTed is checked against the SDK schema."""
    emu = Emulator()
    await emu.start()
    yield emu
    await emu.stop()
    for sent in emu.requests:
        if sent["path"].endswith("/responses") and isinstance(sent.get("json"), dict):
            validate_request(sent["json"])


class Sleeps:
    """Records retry waits instead of sleeping (retries stay fast and observable)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def pipe(emulator: Emulator, sleeps: Sleeps) -> AsyncIterator[Pipe]:
    p = Pipe(sleep=sleeps)
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test")
    yield p
    await p.close()


class Events:
    """An async __event_emitter__ that records what the pipe emitted."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == kind]


@pytest.fixture
def events() -> Events:
    return Events()
