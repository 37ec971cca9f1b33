"""The pipe loaded and called the way each Open WebUI flavour does it (fast stand-in for e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
from owui_stubs import EventRecorder, call_pipe, install, list_models, load_function

SOURCE = (Path(__file__).resolve().parents[2] / "openrouter_responses_pipe.py").read_text()


@pytest.fixture(params=["sync", "async"])
def loaded(request, tmp_path, emulator):
    handle = install(request.param, data_dir=tmp_path)
    handle.add_user("u1", role="user", name="Ann", email="ann@example.com")
    if request.param == "sync":  # 0.6.28: the pipe checks the model record's access itself
        for model in ("openai/gpt-4o", "deepseek/deepseek-r1:free", "openai/gpt-5-nano"):
            handle.share_model(f"openrouter.{model}")
    pipe, meta = load_function(SOURCE, "openrouter", request.param)
    valves = {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-test"}
    yield request.param, pipe, meta, valves
    handle.uninstall()


async def test_models_listed_with_function_prefix(loaded):
    _, pipe, meta, valves = loaded
    assert meta["title"] == "OpenRouter Responses"
    models = await list_models(pipe, "openrouter", stored_valves=valves)
    ids = {m["id"] for m in models}
    assert {"openrouter.openai/gpt-4o", "openrouter.deepseek/deepseek-r1:free"} <= ids


async def test_streamed_chat_as_open_webui_records_it(loaded):
    flavour, pipe, _, valves = loaded
    events = EventRecorder()
    res = await call_pipe(pipe, body={"model": "openrouter.openai/gpt-5-nano", "stream": True,
                                      "messages": [{"role": "user", "content": "2+2?"}]},
                          user={"id": "u1"}, stored_valves=valves, event_emitter=events,
                          flavour=flavour)
    assert res.error is None and "2+2?" in res.text and res.reasoning
    # Usage must be recorded once, on both versions (0.6.28 reads only empty-choices chunks;
    # 0.12 sums every chunk that carries usage).
    assert res.usage["prompt_tokens"] > 0 and res.usage["completion_tokens"] > 0
    assert len([c for c in res.chunks if "usage" in c]) == 1
    assert res.finish_reasons.count("stop") >= 1
    assert any(s["data"]["done"] for s in events.of_type("status"))


async def test_task_call_returns_plain_string(loaded):
    flavour, pipe, _, valves = loaded
    res = await call_pipe(pipe, body={"model": "openrouter.openai/gpt-4o", "stream": False,
                                      "messages": [{"role": "user", "content":
                                                    'Respond in JSON: {"title": "..."}'}]},
                          user={"id": "u1"}, stored_valves=valves, task="title_generation",
                          flavour=flavour)
    content = res.response["choices"][0]["message"]["content"]
    assert '"title"' in content


async def test_upstream_error_reaches_the_user_in_words(loaded):
    flavour, pipe, _, valves = loaded
    res = await call_pipe(pipe, body={"model": "openrouter.openai/gpt-4o", "stream": True,
                                      "messages": [{"role": "user", "content":
                                                    "[emu:http_error status=402] hi"}]},
                          user={"id": "u1"}, stored_valves=valves, flavour=flavour)
    errors = [c["error"]["message"] for c in res.chunks if "error" in c]
    assert errors and "Insufficient credits" in errors[0]


async def test_user_valves_from_open_webui_override_admin(loaded, emulator):
    flavour, pipe, _, valves = loaded
    await call_pipe(pipe, body={"model": "openrouter.openai/gpt-5-nano", "stream": True,
                                "messages": [{"role": "user", "content": "x"}]},
                    user={"id": "u1"}, stored_valves=valves,
                    user_valves={"REASONING_EFFORT": "high"}, flavour=flavour)
    sent = [r for r in emulator.requests if r["path"].endswith("/responses")][-1]["json"]
    assert sent["reasoning"]["effort"] == "high"
