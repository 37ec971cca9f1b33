"""Tool calling inside a real Open WebUI (each version in ORP_E2E_VERSIONS).

A real workspace tool is created through `/api/v1/tools/create` and enabled for the chat
(`tool_ids`). Both Open WebUI versions are asked for native function calling
(`params.function_calling = "native"`): 0.6.28 defaults to prompt-based calling, where Open
WebUI first sends a "function_calling" task to the model and never streams tool calls back;
0.12 defaults to native already.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from pathlib import Path

import pytest
from owui_harness import stored_message

TOOL_ID = "e2e_weather"
MODEL = "openai/gpt-4o"
NO_TITLE = {"title_generation": False, "tags_generation": False,
            "follow_up_generation": False}
CARD = re.compile(r'<details type="tool_calls" done="true" id="([^"]*)" name="([^"]*)" '
                  r'arguments="([^"]*)" result="([^"]*)"')


def tool_source(log: Path) -> str:
    return f'''"""
title: E2E weather
description: Weather probe for the e2e tests
"""

from pathlib import Path


class Tools:
    def __init__(self):
        pass

    async def e2e_weather(self, city: str) -> str:
        """
        Get the current weather for a city.
        :param city: The city name.
        """
        with Path({str(log)!r}).open("a") as f:
            f.write(city + "\\n")
        return f"E2E-SUNNY-IN-{{city.upper()}}"
'''


@pytest.fixture
def weather_tool(owui, tmp_path):
    log = tmp_path / f"calls-{uuid.uuid4().hex}.log"
    owui.client.create_tool(TOOL_ID, "E2E weather", tool_source(log))
    return log


@pytest.fixture
def valves(owui):
    """Change pipe valves for one test; the full original set is restored afterwards."""
    original = owui.client.get_valves("openrouter")

    def set_(**changes):
        owui.client.update_valves("openrouter", {**original, **changes})

    yield set_
    owui.client.update_valves("openrouter", original)


def responses_posts(emulator, since: int) -> list[dict]:
    return [r for r in emulator.requests[since:]
            if r["method"] == "POST" and r["path"].endswith("/responses")]


def tool_chat(owui, prompt: str, function_calling: str = "native") -> dict:
    return owui.client.chat_ui(owui.model(MODEL), prompt, tool_ids=[TOOL_ID],
                               params={"function_calling": function_calling},
                               background_tasks=NO_TITLE)


@pytest.mark.parametrize("function_calling", ["native", "default"])
def test_pipe_runs_a_real_tool_and_shows_its_card(owui, weather_tool, function_calling):
    since = len(owui.emulator.requests)
    prompt = "[emu:tool_call name=e2e_weather args='{\"city\":\"Porto\"}'] Weather in Porto?"
    chat = tool_chat(owui, prompt, function_calling)
    msg = stored_message(chat)
    assert not msg.get("error"), msg
    content = msg["content"]
    [card] = CARD.findall(content)
    call_id, name, arguments, result = (html.unescape(x) for x in card)
    assert name == TOOL_ID
    assert json.loads(json.loads(arguments)) == {"city": "Porto"}
    assert json.loads(result) == "E2E-SUNNY-IN-PORTO"
    # the answer after the card used the tool's result
    assert content.rstrip().endswith(f"Tool result for {call_id}: E2E-SUNNY-IN-PORTO"), content
    assert weather_tool.read_text() == "Porto\n"  # ran once, in Open WebUI's process
    posts = [p["json"] for p in responses_posts(owui.emulator, since)]
    # in "default" (prompt-based) mode Open WebUI's own tool-picking task is answered by the
    # pipe without a request, so it neither costs a call nor runs the tool a second time
    assert len(posts) == 2, [p.get("instructions", "")[:80] for p in posts]
    assert TOOL_ID in [t.get("name") for t in posts[0]["tools"]]
    assert posts[1]["input"][-1] == {"type": "function_call_output", "call_id": call_id,
                                     "output": "E2E-SUNNY-IN-PORTO"}

    # a follow-up in the same conversation still carries what the tool returned
    since = len(owui.emulator.requests)
    status, _ = owui.client.chat(owui.model(MODEL), [
        {"role": "user", "content": "Weather in Porto?"},
        {"role": "assistant", "content": content},
        {"role": "user", "content": "And tomorrow?"}], stream=True)
    assert status == 200
    [follow_up] = [p["json"] for p in responses_posts(owui.emulator, since)]
    replayed = [i for i in follow_up["input"] if i.get("role") == "assistant"]
    assert replayed[0]["content"].startswith(
        '[Tool call e2e_weather({"city":"Porto"}) returned: E2E-SUNNY-IN-PORTO]'), replayed


def test_passthrough_open_webui_runs_the_tool(owui, weather_tool, valves):
    valves(TOOL_EXECUTION_MODE="open_webui")
    since = len(owui.emulator.requests)
    prompt = "[emu:tool_call name=e2e_weather args='{\"city\":\"Faro\"}'] Weather in Faro?"
    chat = tool_chat(owui, prompt)
    msg = stored_message(chat)
    assert not msg.get("error"), msg
    assert weather_tool.read_text() == "Faro\n"  # Open WebUI ran it, exactly once
    posts = [p["json"] for p in responses_posts(owui.emulator, since)]
    assert len(posts) == 2, posts
    outputs = [i for i in posts[1]["input"] if i.get("type") == "function_call_output"]
    calls = [i for i in posts[1]["input"] if i.get("type") == "function_call"]
    assert [o["output"] for o in outputs] == ["E2E-SUNNY-IN-FARO"]
    assert [c["name"] for c in calls] == [TOOL_ID]
    assert outputs[0]["call_id"] == calls[0]["call_id"]
    stored = json.dumps(msg, ensure_ascii=False)
    assert f"Tool result for {calls[0]['call_id']}: E2E-SUNNY-IN-FARO" in stored


@pytest.mark.parametrize("who", ["admin", "member"])
def test_web_search_sources_when_the_user_turns_it_on(owui, who):
    since = len(owui.emulator.requests)
    client = owui.client if who == "admin" else owui.member
    chat = client.chat_ui(owui.model(MODEL), "[emu:web_search] Capital of Portugal?",
                               features={"web_search": True}, background_tasks=NO_TITLE)
    msg = stored_message(chat)
    assert not msg.get("error"), msg
    posts = [p["json"] for p in responses_posts(owui.emulator, since)]
    chat_posts = [p for p in posts if p.get("stream")]
    assert {"type": "openrouter:web_search", "parameters": {"max_results": 5}} in \
        chat_posts[-1]["tools"]
    assert msg["content"].rstrip().endswith("[1][2]"), msg["content"]
    urls = [s["source"].get("url") for s in msg.get("sources") or []]
    assert urls == ["https://en.wikipedia.org/wiki/Lisbon", "https://example.org/lisboa"], msg


def test_a_bad_mcp_valve_is_saved_but_breaks_neither_models_nor_chats(owui, valves):
    valves(REMOTE_MCP_SERVERS_JSON='[{"server_label": "x"}]')  # Open WebUI accepts the save
    assert owui.model(MODEL) in [m["id"] for m in owui.client.list_models()]
    since = len(owui.emulator.requests)
    msg = stored_message(owui.client.chat_ui(owui.model(MODEL), "Hello there",
                                             background_tasks=NO_TITLE))
    assert not msg.get("error") and "You said" in msg["content"], msg
    posts = [p["json"] for p in responses_posts(owui.emulator, since) if p["json"].get("stream")]
    assert posts and not any(t.get("type") == "mcp" for t in posts[-1].get("tools") or ())
