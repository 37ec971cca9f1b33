"""Pictures through a real Open WebUI (issue #14): a chat driven like the browser with an image
model served by the emulator; the stored answer links the picture, the file is the user's and
serves the emulator's PNG, a follow-up edit sends it back as input_image, and the Image toggle
on a chat model uses OpenRouter's image tool."""

from __future__ import annotations

import base64
import contextlib
import re
import sqlite3

import pytest
from openrouter_emulator import image_png
from owui_harness import content_chunks, stored_message

GEMINI_IMAGE = "google/gemini-2.5-flash-image"
GPT4O = "openai/gpt-4o"
LINK = re.compile(r"!\[Generated image(?: \d+)?\]\(/api/v1/files/([0-9a-f-]{36})/content\)")


@contextlib.contextmanager
def valves(owui, **changes):
    client = owui.client
    before = client.get_valves("openrouter")
    client.update_valves("openrouter", {**before, **changes})  # a POST replaces the whole dict
    try:
        yield
    finally:
        client.update_valves("openrouter", before)


def chat_user(owui):
    """The ordinary user when the team-access valve exists (issue #10), else the admin."""
    spec = owui.client.request("GET", "/api/v1/functions/id/openrouter/valves/spec").json()
    if "MODEL_ACCESS" in (spec.get("properties") or {}):
        return owui.member, {"MODEL_ACCESS": "all"}
    return owui.client, {}  # until #10 is merged, ordinary users see no pipe models


def turn_posts(emulator, since: int, prompt: str) -> list[dict]:
    out = []
    for r in emulator.requests[since:]:
        body = r.get("json") or {}
        if r["method"] != "POST" or not r["path"].endswith("/responses"):
            continue
        users = [i for i in body.get("input") or [] if i.get("role") == "user"]
        last = users[-1]["content"] if users else []
        text = last if isinstance(last, str) else " ".join(
            p.get("text", "") for p in last if p.get("type") == "input_text")
        if prompt in text and "### Task" not in text:
            out.append(body)
    return out


def chat_files(owui, chat_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(owui.server.data_dir / "data" / "webui.db") as db:
        return db.execute("SELECT message_id, file_id FROM chat_file WHERE chat_id = ?",
                          (chat_id,)).fetchall()


def the_file(client, file_id: str) -> dict:
    return client.request("GET", f"/api/v1/files/{file_id}").json()


def test_a_generated_picture_is_the_users_file_and_a_follow_up_edits_it(owui):
    user, access = chat_user(owui)
    me = user.request("GET", "/api/v1/auths/").json()
    with valves(owui, **access):
        since = len(owui.emulator.requests)
        chat = user.chat_ui(owui.model(GEMINI_IMAGE), "draw a red square")
        answer = stored_message(chat)
        assert not answer.get("error"), answer.get("error")
        (file_id,) = LINK.findall(answer["content"])
        assert "Here is your picture." in answer["content"]
        assert "base64" not in str(chat["chat"]["history"])  # the link only, never the bytes
        (sent,) = turn_posts(owui.emulator, since, "draw a red square")
        assert sent["modalities"] == ["image", "text"]
        assert user.get_file_content(file_id) == image_png(0)
        record = the_file(user, file_id)
        assert record["user_id"] == me["id"]
        assert record["meta"]["content_type"] == "image/png"
        assert record["meta"]["data"]["chat_id"] == chat["id"]
        if not owui.legacy:  # 0.12: Open WebUI's own chat↔file link, as its image engine writes
            assert chat_files(owui, chat["id"]) == [(answer["id"], file_id)]

        since = len(owui.emulator.requests)
        edit = user.chat_ui(owui.model(GEMINI_IMAGE), "make the sky purple", follow=chat)
        (sent,) = turn_posts(owui.emulator, since, "make the sky purple")
        parts = [i for i in sent["input"] if i.get("role") == "user"][-1]["content"]
        assert [p for p in parts if p["type"] == "input_image"] == [
            {"type": "input_image", "detail": "auto", "image_url":
             "data:image/png;base64," + base64.b64encode(image_png(0)).decode()}]
        edited = stored_message(edit)
        (new_id,) = LINK.findall(edited["content"])
        assert "Edited your picture." in edited["content"]
        assert user.get_file_content(new_id) == image_png(0, edit=True)


def test_image_toggle_on_a_chat_model_uses_openrouters_image_tool(owui):
    user, access = chat_user(owui)
    with valves(owui, IMAGE_TOOL_MODEL=GEMINI_IMAGE, **access):
        since = len(owui.emulator.requests)
        chat = user.chat_ui(owui.model(GPT4O), "paint a blue circle",
                            features={"image_generation": True})
    (sent,) = turn_posts(owui.emulator, since, "paint a blue circle")
    assert {"type": "openrouter:image_generation", "parameters": {"model": GEMINI_IMAGE}} in \
        sent["tools"]
    answer = stored_message(chat)
    (file_id,) = LINK.findall(answer["content"])
    assert user.get_file_content(file_id) == image_png(0)
    if not owui.legacy:  # 0.12 keeps the final status line in the message's statusHistory
        final = answer["statusHistory"][-1]["description"]
        assert "1 image (list price $0.00003 per image unit)" in final


def test_the_image_toggle_needs_open_webuis_permission_for_a_member(owui):
    """`features` is client-supplied: with Open WebUI's default permission
    `features.image_generation` off, a member sending the flag by hand gets no image tool."""
    user, access = chat_user(owui)
    if user is owui.client:
        pytest.skip("ordinary users see pipe models only with MODEL_ACCESS (issue #10)")
    perms = owui.client.request("GET", "/api/v1/users/default/permissions").json()
    off = {**perms, "features": {**perms["features"], "image_generation": False}}
    owui.client.request("POST", "/api/v1/users/default/permissions", json=off)
    try:
        with valves(owui, IMAGE_TOOL_MODEL=GEMINI_IMAGE, **access):
            since = len(owui.emulator.requests)
            chat = user.chat_ui(owui.model(GPT4O), "paint a red square",
                                features={"image_generation": True})
    finally:
        owui.client.request("POST", "/api/v1/users/default/permissions", json=perms)
    (sent,) = turn_posts(owui.emulator, since, "paint a red square")
    assert "openrouter:image_generation" not in [t.get("type") for t in sent.get("tools") or []]
    answer = stored_message(chat)
    assert not answer.get("error") and LINK.findall(answer["content"]) == []


@pytest.mark.parametrize("stream", [True, False])
def test_plain_api_clients_get_the_link(owui, stream):
    user, access = chat_user(owui)
    with valves(owui, **access):
        status, reply = user.chat(owui.model(GEMINI_IMAGE),
                                  [{"role": "user", "content": "a fox"}], stream=stream)
    assert status == 200, reply
    if stream:
        text = "".join(content_chunks(reply))
    else:
        text = reply["choices"][0]["message"]["content"]
    (file_id,) = LINK.findall(text)
    assert user.get_file_content(file_id) == image_png(0)


def test_partial_previews_replace_each_other_and_never_reach_the_stored_chat(owui):
    user, access = chat_user(owui)
    with valves(owui, **access):
        chat = user.chat_ui(owui.model(GEMINI_IMAGE), "[emu:image partials=3] a slow fox",
                            background_tasks={})
    kinds = [(e["data"]["type"], e["data"]["data"]) for e in chat["_events"]]
    previews = [d["files"] for k, d in kinds if k == "chat:message:files"]
    assert [len(f) for f in previews] == [1, 1, 1, 0]  # each replaces the last, then cleared
    assert all(f[0]["url"].startswith("data:image/png;base64,") for f in previews[:3])
    assert next(d["description"] for k, d in kinds if k == "status") == "Generating image…"
    answer = stored_message(chat)
    assert len(LINK.findall(answer["content"])) == 1
    assert "base64" not in str(chat["chat"]["history"]) and not answer.get("files")
