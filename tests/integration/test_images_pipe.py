"""pipe() end to end with pictures (issue #14): image models and the Image toggle against the
emulator; pictures land in the (stub) Open WebUI file store as the user's file, the answer
links them, follow-ups send them back, refusals read as sentences."""

from __future__ import annotations

import base64
import json
import re

import pytest
from helpers import body, posts, share_catalog, stream
from openrouter_emulator import IMAGE_TOKENS, image_png, partial_png
from owui_stubs import install

from openrouter_responses_pipe import Fetcher, Intake, IntakeError, Pipe

GEMINI_IMAGE = "google/gemini-2.5-flash-image"  # text + image out, reads images
FLUX = "black-forest-labs/flux.2-pro"           # image-only out, reads images
GPT4O = "openai/gpt-4o"                         # text out, tools
TEXT = "openai/gpt-3.5-turbo"                   # text only
LINK = re.compile(r"!\[Generated image(?: \d+)?\]\(/api/v1/files/([0-9a-f-]{36})/content\)")
USER = {"id": "u1", "role": "user", "valves": None}
META = {"chat_id": "chat-1", "message_id": "msg-1"}


@pytest.fixture(params=["async", "sync"])
def owui(request, tmp_path):
    handle = install(request.param, data_dir=tmp_path)
    share_catalog(handle)  # the records the pipe's sync makes (0.6 checks them per turn)
    handle.add_user("u1", role="user")
    handle.add_user("u2", role="user")
    yield handle
    handle.uninstall()


def stored(owui, file_id: str) -> tuple[str, dict, bytes]:
    """(owner, meta, bytes) of an Open WebUI file: its row, and the bytes at its path."""
    files = owui.modules["open_webui.models.files"]
    with owui.db.get_db() as session:
        row = session.get(files.File, file_id)
        assert row is not None, f"file {file_id} not stored"
        path, user_id, meta = row.path, row.user_id, dict(row.meta or {})
    with open(path, "rb") as fh:
        return user_id, meta, fh.read()


def links(text: str) -> list[str]:
    return LINK.findall(text)


def last_post(emulator) -> dict:
    return posts(emulator)[-1]["json"]


def statuses(events) -> list[str]:
    return [s["description"] for s in events.of("status")]


# ------------------------------------------------------------------ 1. image models


async def test_text_and_image_model_answers_with_a_saved_picture(pipe, emulator, owui, events):
    out = await stream(pipe, body(GEMINI_IMAGE, "draw a fox"), __user__=USER,
                       __metadata__=META, __event_emitter__=events)
    assert out.error is None
    sent = last_post(emulator)
    assert sent["modalities"] == ["image", "text"] and "image_config" not in sent
    (file_id,) = links(out.text)
    assert "Here is your picture." in out.text
    owner, meta, data = stored(owui, file_id)
    assert (owner, data) == ("u1", image_png(0))  # the emulator's PNG, byte for byte
    assert meta["content_type"] == "image/png"
    assert meta["data"] == {"chat_id": "chat-1", "message_id": "msg-1"}
    assert "base64" not in out.text and len(out.text) < 200


async def test_image_only_model_gets_image_modality_only(pipe, emulator, owui):
    out = await stream(pipe, body(FLUX, "a lighthouse"), __user__=USER)
    assert last_post(emulator)["modalities"] == ["image"]
    (file_id,) = links(out.text)
    assert out.text.strip() == f"![Generated image](/api/v1/files/{file_id}/content)"
    assert stored(owui, file_id)[2] == image_png(0)


@pytest.mark.parametrize("shape", ["call", "b64", "data_url"])
async def test_every_inline_shape_is_decoded_to_the_same_bytes(pipe, emulator, owui, shape):
    emulator.enqueue("image", shape=shape, n=2)
    out = await stream(pipe, body(GEMINI_IMAGE, "two foxes"), __user__=USER)
    ids = links(out.text)
    assert len(ids) == 2
    assert [stored(owui, i)[2] for i in ids] == [image_png(0), image_png(1)]


async def test_a_picture_given_as_url_is_downloaded_through_the_ssrf_policy(
        emulator, sleeps, owui):
    port = int(emulator.base_url.rsplit(":", 1)[1].split("/")[0])

    async def resolve(host: str, _port: int) -> list[str]:
        if host != "images.emulator.test":
            raise IntakeError(f"{host} could not be resolved.")
        return ["93.184.216.34"]

    p = Pipe(sleep=sleeps, intake=Intake(Fetcher(resolve, lambda a, _p: ("127.0.0.1", port),
                                                 sleep=sleeps)))
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                        REMOTE_FETCH_ALLOW_HTTP=True)
    try:
        emulator.enqueue("image", shape="url")
        out = await stream(p, body(FLUX, "a boat"), __user__=USER)
    finally:
        await p.close()
    (file_id,) = links(out.text)
    assert stored(owui, file_id)[2] == image_png(0)


async def test_plain_api_clients_get_the_link_in_a_non_streamed_answer(pipe, owui):
    text = await pipe.pipe(body=body(GEMINI_IMAGE, "a fox", stream=False), __user__=USER)
    assert isinstance(text, str) and len(links(text)) == 1 and "Here is your picture." in text


async def test_a_picture_over_the_limit_is_not_saved_and_the_answer_says_so(pipe, owui):
    pipe.valves = pipe.valves.model_copy(update={"IMAGE_MAX_MB": 1})
    big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024)).decode()
    import openrouter_emulator as emu_mod

    original = emu_mod._image_source
    emu_mod._image_source = lambda shape, data, base: big
    try:
        out = await stream(pipe, body(FLUX, "huge"), __user__=USER)
    finally:
        emu_mod._image_source = original
    assert links(out.text) == []
    assert "The picture could not be saved: The image is about 2.0 MB, over the 1.0 MB" in out.text


# ------------------------------------------------------------------ 2. status and partials


async def test_status_and_partial_previews_replace_each_other(pipe, emulator, owui, events):
    emulator.enqueue("image", partials=3)
    await stream(pipe, body(GEMINI_IMAGE, "a fox"), __user__=USER, __event_emitter__=events)
    assert statuses(events)[0] == "Generating image…"
    assert "Generated 1 image" in statuses(events)
    previews = events.of("chat:message:files")
    assert [len(p["files"]) for p in previews] == [1, 1, 1, 0]  # replaced, then cleared
    expected = [base64.b64encode(partial_png(i)).decode() for i in range(3)]
    assert [p["files"][0]["url"] for p in previews[:3]] == [
        f"data:image/png;base64,{b}" for b in expected]


# ------------------------------------------------------------------ 3. image_config


@pytest.mark.parametrize(("admin", "user", "sent", "note"), [
    ({"IMAGE_ASPECT_RATIO": "16:9", "IMAGE_SIZE": "2k"}, {},
     {"aspect_ratio": "16:9", "image_size": "2K"}, None),
    ({"IMAGE_ASPECT_RATIO": "16:9"}, {"IMAGE_ASPECT_RATIO": "1:1"}, {"aspect_ratio": "1:1"},
     None),
    ({"IMAGE_ASPECT_RATIO": "7:3"}, {}, None, "The image aspect ratio 7:3 was not used"),
])
async def test_image_config_only_with_values_the_model_offers(
        pipe, emulator, owui, events, admin, user, sent, note):
    pipe.valves = pipe.valves.model_copy(update=admin)
    who = {**USER, "valves": {"IMAGE_ASPECT_RATIO": "inherit", "IMAGE_SIZE": "inherit", **user}}
    await stream(pipe, body(GEMINI_IMAGE, "a fox"), __user__=who, __event_emitter__=events)
    assert last_post(emulator).get("image_config") == sent
    found = [n["content"] for n in events.of("notification")]
    assert (note is None and found == []) or (note is not None and found[0].startswith(note))


async def test_unknown_offers_send_no_image_config(pipe, emulator, owui):
    pipe.valves = pipe.valves.model_copy(update={"IMAGE_SIZE": "4K"})  # flux lists no sizes
    await stream(pipe, body(FLUX, "a fox"), __user__=USER)
    assert "image_config" not in last_post(emulator)


# ------------------------------------------------------------------ 4. Open WebUI's Image toggle


async def test_image_toggle_on_a_chat_model_uses_openrouters_image_tool(
        pipe, emulator, owui, events):
    pipe.valves = pipe.valves.model_copy(update={"IMAGE_TOOL_MODEL": GEMINI_IMAGE,
                                                 "IMAGE_ASPECT_RATIO": "16:9"})
    out = await stream(pipe, body(GPT4O, "draw a cat"), __user__=USER, __event_emitter__=events,
                       __metadata__={**META, "features": {"image_generation": True}})
    sent = last_post(emulator)
    assert {"type": "openrouter:image_generation",
            "parameters": {"model": GEMINI_IMAGE, "aspect_ratio": "16:9"}} in sent["tools"]
    assert "modalities" not in sent
    (file_id,) = links(out.text)
    assert stored(owui, file_id)[2] == image_png(0)
    image_cost = IMAGE_TOKENS * 0.00003
    assert out.usage["cost"] >= image_cost
    assert "· 1 image (list price $0.00003 per image unit)" in statuses(events)[-1]
    assert f"${out.usage['cost']:.6f}".rstrip("0") in statuses(events)[-1]


async def test_image_toggle_without_an_image_model_is_explained(pipe, emulator, owui, events):
    out = await stream(pipe, body(GPT4O, "draw a cat"), __user__=USER, __event_emitter__=events,
                       __metadata__={"features": {"image_generation": True}})
    assert "tools" not in last_post(emulator) and links(out.text) == []
    assert [n["content"] for n in events.of("notification")] == [
        "This model can't make pictures and no image model is set up for Open WebUI's "
        "Image button (IMAGE_TOOL_MODEL), so it answers in text."]


# ------------------------------------------------------------------ 5. editing across turns


def follow_up(first_answer: str, model: str, text: str = "make the sky purple") -> dict:
    payload = body(model, text)
    payload["messages"] = [{"role": "user", "content": "draw a fox"},
                           {"role": "assistant", "content": first_answer},
                           *payload["messages"]]
    return payload


async def test_a_follow_up_sends_the_last_picture_back_as_input_image(pipe, emulator, owui):
    first = await stream(pipe, body(GEMINI_IMAGE, "draw a fox"), __user__=USER)
    second = await stream(pipe, follow_up(first.text, GEMINI_IMAGE), __user__=USER)
    user_msgs = [i for i in last_post(emulator)["input"] if i.get("role") == "user"]
    parts = user_msgs[-1]["content"]
    assert [p["type"] for p in parts] == ["input_text", "input_image"]
    assert parts[1]["image_url"] == "data:image/png;base64," + base64.b64encode(
        image_png(0)).decode()
    assert "Edited your picture." in second.text
    (edited,) = links(second.text)
    assert stored(owui, edited)[2] == image_png(0, edit=True)


async def test_models_that_cant_read_images_replay_only_the_short_link(pipe, emulator, owui):
    first = await stream(pipe, body(GEMINI_IMAGE, "draw a fox"), __user__=USER)
    await stream(pipe, follow_up(first.text, TEXT, "what did you draw?"), __user__=USER)
    sent = last_post(emulator)
    raw = str(sent["input"])
    assert "input_image" not in raw and "base64" not in raw and len(raw) < 600
    assert links(raw.replace("\\n", "\n"))  # the link text is still there


async def test_another_users_picture_is_not_sent(pipe, emulator, owui, events):
    first = await stream(pipe, body(GEMINI_IMAGE, "draw a fox"), __user__=USER)
    other = {"id": "u2", "role": "user", "valves": None}
    await stream(pipe, follow_up(first.text, GEMINI_IMAGE), __user__=other,
                 __event_emitter__=events)
    parts = [i for i in last_post(emulator)["input"] if i.get("role") == "user"][-1]["content"]
    assert [p["type"] for p in parts] == ["input_text"]
    assert any("or you don't have access to it" in n["content"]
               for n in events.of("notification"))


# ------------------------------------------------------------------ 6. cost and refusals


async def test_image_cost_is_in_the_usage_and_the_status_line(pipe, emulator, owui, events):
    out = await stream(pipe, body(FLUX, "a fox"), __user__=USER, __event_emitter__=events)
    assert out.usage["cost"] == pytest.approx(IMAGE_TOKENS * 0.00003)
    line = statuses(events)[-1]  # cost, who answered, the pictures, then the user's spend
    assert " · $0.0387 · " in line
    assert "· 1 image (list price $0.00003 per image unit)" in line


@pytest.mark.parametrize(("reason", "sentence"), [
    ("policy", "The image request was refused under the provider's content policy (Your "
               "request was rejected by the safety system). Rephrase the request and try "
               "again."),
    ("size", "The image was refused for its size (The requested image size is larger than "
             "this model supports). For a new picture choose another size or aspect ratio "
             "(IMAGE_SIZE / IMAGE_ASPECT_RATIO in your valves); for an attached one send a "
             "smaller image."),
])
async def test_a_refusal_is_a_specific_sentence(pipe, emulator, owui, reason, sentence):
    emulator.enqueue("image_refusal", reason=reason)
    out = await stream(pipe, body(FLUX, "something forbidden"), __user__=USER)
    assert out.error is not None and out.error.startswith(sentence)


async def test_a_failed_image_tool_item_is_told_in_the_answer(pipe, emulator, owui, events):
    import openrouter_emulator as emu_mod

    original = emu_mod.tool_image_events

    def failing(ctx, idx, it):
        ev = original(ctx, idx, it)
        item = {"type": "openrouter:image_generation", "id": it.id, "status": "failed",
                "error": "Image blocked by moderation"}
        ev.closing[-1]["item"] = item
        ev.final.clear()
        ev.final.update(item)
        return ev

    emu_mod.tool_image_events = failing
    pipe.valves = pipe.valves.model_copy(update={"IMAGE_TOOL_MODEL": GEMINI_IMAGE})
    try:
        out = await stream(pipe, body(GPT4O, "draw"), __user__=USER, __event_emitter__=events,
                           __metadata__={"features": {"image_generation": True}})
    finally:
        emu_mod.tool_image_events = original
    assert links(out.text) == []
    assert ("⚠️ The image request was refused under the provider's content policy (Image "
            "blocked by moderation)") in out.text
    assert [(s["description"], s["done"]) for s in events.of("status")][:2] == [
        ("Generating image…", False), ("No image was made", True)]


async def test_image_only_models_answer_tasks_with_nothing_and_send_nothing(pipe, emulator):
    before = len(posts(emulator))
    title = await pipe.pipe(body=body(FLUX, "### Task: title", stream=False), __user__=USER,
                            __task__="title_generation")
    assert title == "" and len(posts(emulator)) == before
    listed = [m["id"] for m in await pipe.pipes()]
    assert FLUX in listed and GEMINI_IMAGE in listed


async def test_an_answer_carrying_image_parts_never_replays_their_base64(pipe, emulator):
    big = "data:image/png;base64," + base64.b64encode(image_png(0) * 2000).decode()
    payload = body(GEMINI_IMAGE, "and now?")
    payload["messages"] = [
        {"role": "user", "content": "draw"},
        {"role": "assistant", "content": [{"type": "text", "text": "Here it is."},
                                          {"type": "image_url", "image_url": {"url": big}}]},
        *payload["messages"]]
    await stream(pipe, payload, __user__=USER)
    sent = json.dumps(last_post(emulator)["input"])
    assert "base64" not in sent and len(sent) < 1000 and "Here it is." in sent


# ------------------------------------------------------------------ 8. large pictures


async def test_two_seven_mb_pictures_are_saved_and_the_turn_keeps_its_usage(
        pipe, emulator, owui, events, monkeypatch):
    """The final event repeats both pictures (~19 MB of base64 on one line, over the 16 MiB
    text cap): the turn's line cap follows IMAGE_MAX_MB, so both are saved and billed."""
    import os

    import openrouter_emulator as emu_mod

    big = [image_png(i)[:33] + os.urandom(7 * 1024 * 1024) + bytes([i]) for i in range(2)]
    monkeypatch.setattr(emu_mod, "image_png", lambda index, edit=False: big[index])
    emulator.enqueue("image", n=2)
    out = await stream(pipe, body(GEMINI_IMAGE, "two big foxes"), __user__=USER,
                       __metadata__=META, __event_emitter__=events)
    assert out.error is None and "over 16 MB" not in out.text
    ids = links(out.text)
    assert len(ids) == 2 and [stored(owui, i)[2] for i in ids] == big
    assert out.usage["cost"] > 0 and out.usage["completion_tokens"] >= 2 * IMAGE_TOKENS
    assert "· 2 images" in statuses(events)[-1]


async def test_more_pictures_than_the_base_cap_holds_still_end_with_their_usage(
        pipe, emulator, owui, events, monkeypatch):
    """Six 3.5 MB pictures under IMAGE_MAX_MB=4: the final line (~28 MB) is over the base cap
    (4 pictures + 1 MB ≈ 22 MB); the cap grows with the pictures already streamed."""
    import os

    import openrouter_emulator as emu_mod

    pipe.valves = pipe.valves.model_copy(update={"IMAGE_MAX_MB": 4})
    big = [image_png(0)[:33] + os.urandom(3_500_000) + bytes([i]) for i in range(6)]
    monkeypatch.setattr(emu_mod, "image_png", lambda index, edit=False: big[index])
    emulator.enqueue("image", n=6)
    out = await stream(pipe, body(GEMINI_IMAGE, "six foxes"), __user__=USER,
                       __metadata__=META, __event_emitter__=events)
    assert out.error is None and "stream line" not in out.text
    assert len(links(out.text)) == 6
    assert out.usage["completion_tokens"] >= 6 * IMAGE_TOKENS and out.usage["cost"] > 0
    assert "· 6 images" in statuses(events)[-1]
