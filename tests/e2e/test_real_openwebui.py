"""The pipe inside a real Open WebUI (each version in ORP_E2E_VERSIONS), backed by the emulator.

Each test checks what a user would see: the model picker, streamed text, the thinking block,
the chat title, the error text and the token usage of a stored chat.
"""

from __future__ import annotations

import json
import time

import pytest
from owui_harness import content_chunks, reasoning_chunks, stored_message

LOW_EFFORTS = ("none", "minimal", "low")


def new_responses_posts(emulator, since: int) -> list[dict]:
    return [r for r in emulator.requests[since:]
            if r["method"] == "POST" and r["path"].endswith("/responses")]


def first_index(events: list, key: str) -> int:
    for i, ev in enumerate(events):
        if isinstance(ev, dict) and any((c.get("delta") or {}).get(key)
                                        for c in ev.get("choices") or []):
            return i
    return -1


def test_pipe_loads_and_lists_openrouter_models(owui):
    fn = owui.client.get_function("openrouter")
    assert fn and fn["is_active"]
    ids = {m["id"] for m in owui.client.list_models(refresh=True)}
    for openrouter_id in ("openai/gpt-4o", "openai/gpt-4o-2024-08-06", "openai/gpt-5-nano",
                          "deepseek/deepseek-r1", "deepseek/deepseek-r1:free"):
        assert owui.model(openrouter_id) in ids, sorted(ids)
    # ids are the OpenRouter ids verbatim: the `:free` and dated variants are separate entries
    assert owui.model("deepseek/deepseek-r1") != owui.model("deepseek/deepseek-r1:free")


@pytest.mark.parametrize("who", ["admin", "member"])
def test_streamed_chat_arrives_token_by_token(owui, who):
    since = len(owui.emulator.requests)
    # `slow` spaces the upstream deltas out in time, as a real model does
    prompt = "Hello from the e2e test [emu:slow delay_ms=60]"
    client = owui.client if who == "admin" else owui.member
    status, events = client.chat(
        owui.model("openai/gpt-4o"), [{"role": "user", "content": prompt}], stream=True)
    assert status == 200
    chunks = content_chunks(events)
    assert len(chunks) > 1, events
    assert "You said: Hello from the e2e test" in "".join(chunks)
    posts = new_responses_posts(owui.emulator, since)
    assert [p["json"]["model"] for p in posts] == ["openai/gpt-4o"]


def test_non_streamed_chat_returns_a_completion(owui):
    status, body = owui.client.chat(
        owui.model("openai/gpt-4o"), [{"role": "user", "content": "Plain answer"}], stream=False)
    assert status == 200
    assert "You said: Plain answer" in body["choices"][0]["message"]["content"]


def test_reasoning_streams_before_content_and_renders_a_thinking_block(owui):
    model = owui.model("deepseek/deepseek-r1")
    status, events = owui.client.chat(
        model, [{"role": "user", "content": "Think first"}], stream=True)
    assert status == 200
    assert reasoning_chunks(events), events
    assert 0 <= first_index(events, "reasoning_content") < first_index(events, "content")

    chat = owui.client.chat_ui(model, "Think, then answer")
    msg = stored_message(chat)
    assert not msg.get("error"), msg
    assert "You said: Think, then answer" in msg["content"]
    if owui.legacy:
        # 0.6.28 serialises the thinking block into the message text
        assert '<details type="reasoning"' in msg["content"]
    else:
        # 0.12 keeps a Responses-style output list with a reasoning item
        reasoning = [o for o in msg.get("output") or [] if o.get("type") == "reasoning"]
        assert reasoning, msg.get("output")
        assert any(part.get("text") for o in reasoning for part in o.get("content") or [])


def test_title_task_is_answered_cheaply(owui):
    since = len(owui.emulator.requests)
    status, body = owui.client.generate_title(owui.model("openai/gpt-5-nano"), [
        {"role": "user", "content": "How do tides work?"},
        {"role": "assistant", "content": "The moon pulls the oceans."},
    ])
    assert status == 200, body
    text = body["choices"][0]["message"]["content"]
    title = json.loads(text[text.index("{"): text.rindex("}") + 1])
    assert title == {"title": "Emulated chat title"}
    posts = new_responses_posts(owui.emulator, since)
    assert len(posts) == 1
    reasoning = posts[0]["json"].get("reasoning") or {}
    off = reasoning.get("enabled") is False
    assert off or reasoning.get("effort") in (None, *LOW_EFFORTS), reasoning


def test_openrouter_error_message_reaches_the_user(owui):
    model = owui.model("openai/gpt-4o")
    prompt = "Are you there? [emu:http_error status=402]"
    status, events = owui.client.chat(model, [{"role": "user", "content": prompt}], stream=True)
    assert status == 200
    assert "Insufficient credits" in json.dumps(events), events

    msg = stored_message(owui.client.chat_ui(model, prompt))
    shown = json.dumps([msg.get("content"), msg.get("error")])
    assert "Insufficient credits" in shown, msg


def test_usage_is_stored_on_the_message(owui):
    msg = stored_message(owui.client.chat_ui(owui.model("openai/gpt-4o"), "Count my tokens"))
    assert not msg.get("error"), msg
    usage = msg.get("usage") or {}
    assert (usage.get("prompt_tokens") or usage.get("input_tokens") or 0) > 0, msg
    assert (usage.get("completion_tokens") or usage.get("output_tokens") or 0) > 0, msg


def test_failure_mid_answer_keeps_the_partial_text_and_says_why(owui):
    msg = stored_message(owui.client.chat_ui(owui.model("openai/gpt-4o"),
                                             "Tell me a story [emu:mid_stream_failure after=3]"))
    content = msg.get("content") or ""
    assert content.startswith("Partial answer"), msg            # the partial answer is kept
    assert "The answer was interrupted" in content, msg
    assert "Provider" in content, msg                               # OpenRouter's own message


def test_final_status_line_and_usage_tooltip_agree(owui):
    msg = stored_message(owui.client.chat_ui(owui.model("openai/gpt-4o"), "Status please"))
    final = [s for s in msg.get("statusHistory") or [] if s.get("done")]
    assert final, msg
    line, usage = final[-1]["description"], msg.get("usage") or {}
    assert usage.get("cost", 0) > 0, usage
    total = usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["total_tokens"] == total
    assert f"{total:,} tokens ({usage['prompt_tokens']:,} in, " in line, (line, usage)
    assert f"${usage['cost']:.6f}".rstrip("0").rstrip(".") in line, (line, usage)


def test_closing_the_connection_cancels_the_upstream_request(owui):
    emu = owui.emulator
    before = len(emu.disconnects)
    stream = owui.client.chat_stream(
        owui.model("openai/gpt-4o"),
        [{"role": "user", "content": "long one [emu:slow delay_ms=300 deltas=200]"}])
    for payload in stream:
        if content_chunks([payload]):
            break                       # the user saw text; now they close the tab
    stream.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(emu.disconnects) == before:
        time.sleep(0.1)
    assert len(emu.disconnects) > before, "upstream stream was not cancelled"
    while time.monotonic() < deadline and emu.active_streams:
        time.sleep(0.1)
    assert emu.active_streams == 0


def test_admin_reads_the_turns_log_from_the_chat(owui):
    msg = stored_message(owui.client.chat_ui(owui.model("openai/gpt-4o"),
                                             "Fail please [emu:http_error status=403]"))
    logs = [s for s in msg.get("sources") or []
            if (s.get("source") or {}).get("name", "").startswith("Pipe log req-")]
    assert logs, msg
    text = "\n".join(logs[0]["document"])
    assert "Turn failed (UpstreamStatusError, HTTP 403)" in text
    assert "sk-or-emulator" not in text
    shown = json.dumps([msg.get("content"), msg.get("error")])
    assert logs[0]["source"]["name"].removeprefix("Pipe log ") in shown  # the reference


def test_health_report_reflects_a_burst_of_traffic(owui):
    before = json.loads(health_json(owui))
    model = owui.model("openai/gpt-4o")
    for i in range(5):
        status, _ = owui.client.chat(model, [{"role": "user", "content": f"burst {i}"}],
                                     stream=False)
        assert status == 200
    status, _ = owui.client.chat(
        model, [{"role": "user", "content": "[emu:http_error status=402] burst"}], stream=True)
    after = json.loads(health_json(owui))
    assert after["requests"]["total"] - before["requests"]["total"] == 6
    grew = {k: after["upstream"]["responses_by_status"].get(k, 0)
            - before["upstream"]["responses_by_status"].get(k, 0) for k in ("200", "402")}
    assert grew == {"200": 5, "402": 1}
    assert after["requests"]["in_flight"] == 0
    status, body = owui.client.chat(owui.model("_health"),
                                    [{"role": "user", "content": "report"}], stream=False)
    assert "OpenRouter pipe health" in body["choices"][0]["message"]["content"]


def health_json(owui) -> str:
    status, body = owui.client.chat(owui.model("_health"),
                                    [{"role": "user", "content": "json"}], stream=False)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_title_tags_and_follow_ups_come_from_cheap_task_calls(owui):
    since = len(owui.emulator.requests)
    chat = owui.client.chat_ui(owui.model("openai/gpt-5-nano"), "How do tides work?",
                               background_tasks={"title_generation": True,
                                                 "tags_generation": True,
                                                 "follow_up_generation": True})
    deadline = time.monotonic() + 20
    while True:
        full = owui.client.get_chat(chat["id"])
        msg = full["chat"]["history"]["messages"][chat["_message_id"]]
        if (msg.get("followUps") and (full.get("meta") or {}).get("tags")) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert full["title"] == "Emulated chat title"
    assert full["meta"]["tags"] == ["general"]
    assert msg["followUps"] == ["Tell me more?"]
    tasks = [p["json"] for p in new_responses_posts(owui.emulator, since)
             if "### Task" in json.dumps(p["json"]["input"])]
    assert len(tasks) == 3
    for task in tasks:
        assert task["stream"] is False and task["reasoning"] == {"effort": "minimal"}, task
