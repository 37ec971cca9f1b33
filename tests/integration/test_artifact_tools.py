"""Tool rounds remembered across turns: the next turn replays reasoning, calls and results in
the order they happened, in pipe mode and in passthrough mode (issues #5 + #3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from artifact_fixtures import sqlite_sync
from helpers import posts, stream

from openrouter_responses_pipe import Pipe, marker_ids

NANO = "openai/gpt-5-nano"
CHAT = {"chat_id": "chat-T", "message_id": "m1"}


@pytest.fixture
def tool_pipe(emulator, sleeps, tmp_path: Path):
    runner, dispose = sqlite_sync(tmp_path)
    p = Pipe(sleep=sleeps, artifact_db=runner, env={})
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                        ARTIFACT_ENCRYPTION_KEY="k")
    yield p
    dispose()


def weather_tool() -> dict[str, Any]:
    async def weather(city: str) -> str:
        return f"Sunny in {city}"

    return {"weather": {"tool_id": "t", "callable": weather, "spec": {
        "name": "weather", "description": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}}


def body(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": f"openrouter.{NANO}", "stream": True, "messages": list(messages)}


def kinds(items: list[dict[str, Any]]) -> list[str]:
    return [i["role"] if i.get("type", "message") == "message" else i["type"] for i in items]


async def test_next_turn_replays_reasoning_calls_and_results_in_true_order(tool_pipe, emulator):
    ask = {"role": "user", "content": "[emu:tool_call name=weather] weather?"}
    first = await stream(tool_pipe, body(ask), __metadata__=CHAT, __tools__=weather_tool())
    assert len(marker_ids(first.text)) == 4        # round: reasoning, call, result; final
    round1, round2 = emulator.responses[-2:]
    produced = [*round1["output"], posts(emulator)[-1]["json"]["input"][-1],
                *[i for i in round2["output"] if i["type"] == "reasoning"]]
    assert kinds(produced) == ["reasoning", "function_call", "function_call_output",
                               "reasoning"]
    again = body(ask, {"role": "assistant", "content": first.text},
                 {"role": "user", "content": "thanks"})
    await stream(tool_pipe, again, __metadata__={**CHAT, "message_id": "m2"},
                 __tools__=weather_tool())
    sent = posts(emulator)[-1]["json"]["input"]
    assert kinds(sent) == ["user", "reasoning", "function_call", "function_call_output",
                           "reasoning", "assistant", "user"]
    assert sent[1:5] == produced                    # verbatim and in the order they happened
    assert "<details" not in sent[5]["content"] and "[orp:" not in sent[5]["content"]
    assert sent[5]["content"].startswith("Tool result for")


@pytest.mark.parametrize("content_kept", [True, False])
async def test_passthrough_reattaches_reasoning_when_open_webui_calls_back(
        tool_pipe, emulator, content_kept):
    tool_pipe.valves = tool_pipe.Valves(**{**tool_pipe.valves.model_dump(),
                                           "TOOL_EXECUTION_MODE": "open_webui"})
    spec = {"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}
    ask = {"role": "user", "content": "[emu:tool_call name=t] go"}
    out = await stream(tool_pipe, {**body(ask), "tools": [spec]}, __metadata__=CHAT)
    (reasoning,) = [i for i in emulator.responses[-1]["output"] if i["type"] == "reasoning"]
    [chunk] = [c for c in out.chunks if c.get("choices")
               and c["choices"][0]["delta"].get("tool_calls")]
    calls = chunk["choices"][0]["delta"]["tool_calls"]
    back = body(ask, {"role": "assistant", "content": out.text if content_kept else "",
                      "tool_calls": calls},
                *({"role": "tool", "tool_call_id": c["id"], "content": "12:00"} for c in calls))
    await stream(tool_pipe, {**back, "tools": [spec]}, __metadata__=CHAT)
    sent = posts(emulator)[-1]["json"]["input"]
    assert kinds(sent) == ["user", "reasoning", "function_call", "function_call_output"]
    assert sent[1] == reasoning                     # once, right before its call
