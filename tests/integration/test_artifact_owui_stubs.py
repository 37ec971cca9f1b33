"""The artifact store on each Open WebUI flavour's own database helpers (sync <= 0.8 engine,
async >= 0.9 engine), found at runtime without injection (issue #5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from owui_stubs import call_pipe, install, load_function

from openrouter_responses_pipe import (
    AsyncEngineRunner,
    SyncEngineRunner,
    marker_ids,
    owui_db_runner,
)

SOURCE = (Path(__file__).resolve().parents[2] / "openrouter_responses_pipe.py").read_text()
MODEL = "openrouter.openai/gpt-5-nano"


@pytest.fixture(params=["sync", "async"])
def flavour(request, tmp_path):
    handle = install(request.param, data_dir=tmp_path)
    handle.add_user("u1", role="user", name="Ann", email="ann@example.com")
    yield request.param
    handle.uninstall()


def test_the_runner_matches_the_open_webui_generation(flavour):
    runner = owui_db_runner()
    assert isinstance(runner, AsyncEngineRunner if flavour == "async" else SyncEngineRunner)


async def test_reasoning_round_trips_through_open_webuis_database(flavour, emulator):
    pipe, _ = load_function(SOURCE, "openrouter", flavour)
    valves = {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-test",
              "ARTIFACT_ENCRYPTION_KEY": "k"}
    meta = {"chat_id": "chat-1", "message_id": "m1", "session_id": "s"}
    ask = [{"role": "user", "content": "2+2?"}]
    first = await call_pipe(pipe, body={"model": MODEL, "stream": True, "messages": ask},
                            user={"id": "u1"}, stored_valves=valves, metadata=meta,
                            flavour=flavour)
    assert first.error is None and len(marker_ids(first.text)) == 1
    produced = [i for i in emulator.responses[-1]["output"] if i["type"] == "reasoning"]
    history = [*ask, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "3+3?"}]
    await call_pipe(pipe, body={"model": MODEL, "stream": True, "messages": history},
                    user={"id": "u1"}, stored_valves=valves, metadata={**meta, "message_id": "m2"},
                    flavour=flavour)
    sent = [r for r in emulator.requests if r["path"].endswith("/responses")][-1]["json"]
    assert [i.get("type") for i in sent["input"]] == ["message", "reasoning", "message",
                                                      "message"]
    assert sent["input"][1] == produced[0]
