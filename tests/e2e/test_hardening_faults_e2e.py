"""Issue #11 (items 8, 10, 16) replayed on a real Open WebUI, as an ordinary user where the
team-access work allows it: answers in unexpected shapes, money spent on a failed turn, and
notes for API clients that have no socket session."""

from __future__ import annotations

import json
import warnings

import pytest
from owui_harness import OpenWebUIClient, content_chunks, stored_message

GPT4O = "openai/gpt-4o"
TEXT_ONLY = "openai/gpt-3.5-turbo"
NO_TASKS = {"title_generation": False, "tags_generation": False,
            "follow_up_generation": False}
PNG_1PX = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
           "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
TOOL_ID = "e2e_hf_weather"


@pytest.fixture
def member(owui) -> OpenWebUIClient:
    """The ordinary user, once MODEL_ACCESS=all lets them see the pipe's models (issue #10's
    valve); until that is merged the admin stands in, with a warning."""
    original = owui.client.get_valves("openrouter")
    owui.client.update_valves("openrouter", {**original, "MODEL_ACCESS": "all"})
    ids = {m["id"] for m in owui.member.list_models(refresh=True)}
    yield owui.member if owui.model(GPT4O) in ids else _admin_instead(owui)
    owui.client.update_valves("openrouter", original)


def _admin_instead(owui) -> OpenWebUIClient:
    warnings.warn("MODEL_ACCESS (issue #10) not merged yet: replayed as the admin",
                  stacklevel=2)
    return owui.client


def _text(events: list) -> str:
    return "".join(content_chunks(events))


# -- item 8 -----------------------------------------------------------------------------------


def test_an_html_proxy_page_is_named_for_the_user(owui, member):
    prompt = "Hello [emu:wrong_body kind=html]"
    status, events = member.chat(owui.model(GPT4O), [{"role": "user", "content": prompt}],
                                 stream=True)
    assert status == 200
    said = json.dumps(events, ensure_ascii=False)
    assert "OpenRouter answered with an HTML page, not a stream: “502 Bad Gateway”" in said
    assert "closed the stream" not in said

    msg = stored_message(member.chat_ui(owui.model(GPT4O), prompt, background_tasks=NO_TASKS))
    shown = json.dumps([msg.get("content"), msg.get("error")], ensure_ascii=False)
    assert "OpenRouter answered with an HTML page, not a stream" in shown, msg


def test_a_plain_json_error_and_a_chat_style_error_show_the_providers_words(owui, member):
    status, events = member.chat(owui.model(GPT4O), [
        {"role": "user", "content": "Hi [emu:wrong_body kind=json]"}], stream=True)
    assert status == 200
    assert "upstream model overloaded" in json.dumps(events), events

    msg = stored_message(member.chat_ui(owui.model(GPT4O), "Story [emu:error_event form=chat]",
                                        background_tasks=NO_TASKS))
    content = msg.get("content") or ""
    assert content.startswith("Partial answer"), msg
    assert "Provider disconnected unexpectedly" in content, msg
    assert "provider connection reset" in content, msg


# -- item 10 ----------------------------------------------------------------------------------


def test_a_stream_without_usage_says_usage_unavailable(owui, member):
    msg = stored_message(member.chat_ui(owui.model(GPT4O), "Hi [emu:text no_completed=1]",
                                        background_tasks=NO_TASKS))
    assert not msg.get("error"), msg
    final = [s for s in msg.get("statusHistory") or [] if s.get("done")]
    assert final and "usage unavailable" in final[-1]["description"], msg
    assert "0 tokens" not in final[-1]["description"]


def tool_source() -> str:
    return '''"""
title: E2E weather (hard-fault)
"""


class Tools:
    def __init__(self):
        pass

    async def e2e_hf_weather(self, city: str) -> str:
        """
        Get the current weather for a city.
        :param city: The city name.
        """
        return f"SUNNY-IN-{city.upper()}"
'''


def test_a_failed_second_tool_round_still_shows_the_first_rounds_usage(owui):
    # Workspace tools belong to the admin here (a member would need a shared tool).
    if owui.client.request("GET", f"/api/v1/tools/id/{TOOL_ID}", ok=()).status_code != 200:
        owui.client.create_tool(TOOL_ID, "E2E weather hf", tool_source())
    emu = owui.emulator
    emu._run(lambda: emu.emulator._queue.extend([
        ("tool_call", {"name": TOOL_ID, "args": '{"city": "Porto"}'}),
        ("mid_stream_failure", {"after": "0"})]))
    before = set(emu._run(lambda: list(emu.emulator.generations)))
    msg = stored_message(owui.client.chat_ui(
        owui.model(GPT4O), "Weather in Porto?", tool_ids=[TOOL_ID],
        params={"function_calling": "native"}, background_tasks=NO_TASKS))
    gens = emu._run(lambda: dict(emu.emulator.generations))
    first, second = [g for k, g in gens.items() if k not in before]
    assert first["tokens_prompt"] > 0 and second["tokens_prompt"] == 0
    usage = msg.get("usage") or {}
    assert usage.get("prompt_tokens") == first["tokens_prompt"], msg
    assert usage.get("completion_tokens") == first["tokens_completion"], msg
    final = [s for s in msg.get("statusHistory") or [] if s.get("done")]
    total = first["tokens_prompt"] + first["tokens_completion"]
    assert any(s["description"].startswith("Failed · ") and f"{total:,} tokens"
               in s["description"] for s in final), msg
    assert "interrupted" in json.dumps(msg), msg


# -- item 16 ----------------------------------------------------------------------------------


def _image_message(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": PNG_1PX}}]}]


NOTE = "can't read images, so an image was left out of the request."


def test_an_api_client_reads_left_out_notes_in_the_answer(owui, member):
    status, events = member.chat(owui.model(TEXT_ONLY), _image_message("What is this?"),
                                 stream=True)
    assert status == 200
    text = _text(events)
    assert "You said" in text and NOTE in text.split("\n---\n")[-1], text

    status, body = member.chat(owui.model(TEXT_ONLY), _image_message("And now?"), stream=False)
    assert status == 200
    assert NOTE in body["choices"][0]["message"]["content"], body


def test_a_browser_chat_gets_the_note_as_a_toast_not_in_the_text(owui, member):
    import base64

    uploaded = member.upload_file("dot.png", base64.b64decode(PNG_1PX.split(",", 1)[1]),
                                  "image/png")
    chat = member.chat_ui(owui.model(TEXT_ONLY), "Describe this", background_tasks=NO_TASKS,
                          files=[member.chat_file(uploaded)])
    msg = stored_message(chat)
    assert not msg.get("error"), msg
    assert NOTE not in (msg.get("content") or ""), msg          # the socket session shows…
    toasts = [ev for ev in chat.get("_events") or []
              if (ev.get("data") or {}).get("type") == "notification"]
    assert any(NOTE in json.dumps(t) for t in toasts), chat.get("_events")  # …a toast
