"""Attachments through a real Open WebUI (issue #4): files uploaded via /api/v1/files/, a chat
driven like the browser, and what the emulator (OpenRouter) received."""

from __future__ import annotations

import base64
import contextlib

import pytest
from owui_harness import stored_message

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00"
       b"\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff"
       b"\x89\x99=\x1d\x00\x00\x00\x00IEND\xaeB`\x82")
PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
       b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def turn_posts(emulator, since: int, prompt: str) -> list[dict]:
    """POST /responses bodies of the chat turn itself (not Open WebUI's task calls)."""
    out = []
    for r in emulator.requests[since:]:
        body = r.get("json") or {}
        if not (r["method"] == "POST" and r["path"].endswith("/responses")):
            continue
        users = [i for i in body.get("input") or [] if i.get("role") == "user"]
        last = users[-1]["content"] if users else []
        text = last if isinstance(last, str) else " ".join(
            p.get("text", "") for p in last if p.get("type") == "input_text")
        if prompt in text and "### Task" not in text:
            out.append(body)
    return out


def user_parts(body: dict) -> list[dict]:
    return [i for i in body["input"] if i.get("role") == "user"][-1]["content"]


@contextlib.contextmanager
def valves(owui, **changes):
    client = owui.client
    before = client.get_valves("openrouter")
    client.update_valves("openrouter", {**before, **changes})
    try:
        yield
    finally:
        client.update_valves("openrouter", before)


@pytest.mark.parametrize("who", ["admin", "member"])
def test_uploaded_image_and_pdf_reach_the_model_inline_and_stay_on_the_chat(owui, who):
    client = owui.client if who == "admin" else owui.member
    image = client.upload_file("chart.png", PNG, "image/png")
    pdf = client.upload_file("q3 report.pdf", PDF, "application/pdf")
    assert client.get_file_content(image["id"]) == PNG  # stored by Open WebUI itself
    prompt = "Compare the chart with the report"
    since = len(owui.emulator.requests)
    with valves(owui, SEND_FILES_NATIVELY=True):
        chat = client.chat_ui(owui.model("openai/gpt-4o"), prompt,
                              files=[client.chat_file(image), client.chat_file(pdf)])
    posts = turn_posts(owui.emulator, since, prompt)
    assert len(posts) == 1, [p.get("input") for p in posts]
    parts = user_parts(posts[0])
    assert [p for p in parts if p["type"] == "input_image"] == [
        {"type": "input_image", "image_url": data_url("image/png", PNG), "detail": "auto"}]
    assert [p for p in parts if p["type"] == "input_file"] == [
        {"type": "input_file", "filename": "q3 report.pdf",
         "file_data": data_url("application/pdf", PDF)}]
    answer = stored_message(chat)
    assert "You said:" in answer["content"] and not answer.get("error")
    user = chat["chat"]["history"]["messages"][answer["parentId"]]
    assert {f["id"] for f in user["files"]} == {image["id"], pdf["id"]}


def test_documents_stay_with_open_webuis_retrieval_unless_the_valve_says_otherwise(owui):
    client = owui.client
    pdf = client.upload_file("notes.pdf", NOTES, "application/pdf")
    prompt = "What do my notes say"
    since = len(owui.emulator.requests)
    # Open WebUI has the document's text (full context), so retrieval alone carries it.
    chat = client.chat_ui(owui.model("openai/gpt-4o"), prompt,
                          files=[extracted_file(client, pdf)])
    posts = [r["json"] for r in owui.emulator.requests[since:]
             if r["method"] == "POST" and r["path"].endswith("/responses")
             and r["json"].get("stream")]
    assert posts and not [p for p in user_parts(posts[-1]) if p["type"] == "input_file"]
    assert excerpts(posts[-1])
    assert not stored_message(chat).get("error")


def test_a_document_retrieval_got_nothing_from_goes_natively(owui):
    """issue #11 item 15: uploaded without processing (or processing failed), the document
    gives Open WebUI's retrieval nothing; a file-reading model gets it natively instead."""
    client = owui.client
    pdf = client.upload_file("unread.pdf", PDF, "application/pdf")  # process=false: no text
    prompt = "What does the unread file say"
    since = len(owui.emulator.requests)
    chat = client.chat_ui(owui.model("openai/gpt-4o"), prompt, files=[client.chat_file(pdf)])
    posts = turn_posts(owui.emulator, since, prompt)
    assert posts and [p for p in user_parts(posts[-1]) if p["type"] == "input_file"] == [
        {"type": "input_file", "filename": "unread.pdf",
         "file_data": data_url("application/pdf", PDF)}]
    assert not stored_message(chat).get("error")
    toasts = [ev for ev in chat.get("_events") or []
              if (ev.get("data") or {}).get("type") == "notification"]
    assert any("got nothing from 'unread.pdf' (no text could be extracted)" in str(t)
               for t in toasts), chat.get("_events")


def test_a_model_without_vision_gets_the_text_and_the_user_a_note(owui):
    client = owui.client
    image = client.upload_file("photo.png", PNG, "image/png")
    prompt = "Describe this photo"
    since = len(owui.emulator.requests)
    chat = client.chat_ui(owui.model("openai/gpt-3.5-turbo"), prompt,
                          files=[client.chat_file(image)])
    posts = turn_posts(owui.emulator, since, prompt)
    assert len(posts) == 1
    # (0.12 may prepend an `<attached_files>` text part of its own)
    assert {p["type"] for p in user_parts(posts[0])} == {"input_text"}
    answer = stored_message(chat)
    assert "You said:" in answer["content"] and not answer.get("error")
    notes = [e["data"]["data"]["content"] for e in chat["_events"]
             if (e.get("data") or {}).get("type") == "notification"]
    assert notes == ["OpenAI: GPT-3.5 Turbo can't read images, so an image was left out of "
                     "the request."]


def test_a_link_to_an_internal_address_is_never_fetched(owui):
    client = owui.client
    prompt = "What does this picture show"
    since = len(owui.emulator.requests)
    link = "https://169.254.169.254/latest/meta-data/iam.png"
    chat = client.chat_ui(owui.model("openai/gpt-4o"), prompt,
                          files=[{"type": "image", "url": link, "name": "iam.png"}])
    posts = turn_posts(owui.emulator, since, prompt)
    assert len(posts) == 1
    assert [p for p in user_parts(posts[0]) if p["type"] == "input_image"] == []
    answer = stored_message(chat)
    assert "You said:" in answer["content"] and not answer.get("error")
    notes = [e["data"]["data"]["content"] for e in chat["_events"]
             if (e.get("data") or {}).get("type") == "notification"]
    assert notes == ["An image was left out: 169.254.169.254 is a cloud metadata address, "
                     "which is never fetched."]


MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + bytes(413) * 4
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(256)


def test_uploaded_audio_and_video_reach_a_model_that_takes_them(owui):
    client = owui.client
    audio = client.upload_file("memo.mp3", MP3, "audio/mpeg")
    video = client.upload_file("clip.mp4", MP4, "video/mp4")
    prompt = "Transcribe the memo and describe the clip"
    since = len(owui.emulator.requests)
    with valves(owui, SEND_FILES_NATIVELY=True):
        chat = client.chat_ui(owui.model("google/gemini-2.5-flash"), prompt,
                              files=[client.chat_file(audio), client.chat_file(video)])
    posts = turn_posts(owui.emulator, since, prompt)
    assert len(posts) == 1
    parts = user_parts(posts[0])
    assert [p for p in parts if p["type"] == "input_audio"] == [
        {"type": "input_audio",
         "input_audio": {"data": base64.b64encode(MP3).decode(), "format": "mp3"}}]
    assert [p for p in parts if p["type"] == "input_video"] == [
        {"type": "input_video", "video_url": data_url("video/mp4", MP4)}]
    assert not stored_message(chat).get("error")


NOTES = b"%PDF-1.4\n% meeting notes\n%%EOF\n"
SECRET = "The secret word is PAPAYA."


def extracted_file(client, uploaded: dict) -> dict:
    """A chat `files` item for a document Open WebUI has extracted, in "full context" mode
    (the chat's "Using Entire Document" toggle): retrieval needs no embedding engine then."""
    item = client.chat_file(uploaded)
    item["file"] = {**uploaded, "data": {**(uploaded.get("data") or {}), "content": SECRET}}
    return {**item, "context": "full"}


def excerpts(body: dict) -> list[str]:
    """Texts of the request (instructions, any message) carrying the document's words."""
    texts = [body.get("instructions") or ""]
    for item in body["input"]:
        content = item.get("content")
        texts += [content] if isinstance(content, str) else [
            p.get("text") or "" for p in content or [] if isinstance(p, dict)]
    return [t for t in texts if "PAPAYA" in t]


def set_file_context(owui, model: str, on: bool) -> None:
    """Admin → Models → the pipe's model → Capabilities → File Context (0.12)."""
    caps = {"vision": True, "file_upload": True, "file_context": on}
    form = {"id": model, "base_model_id": None, "name": "GPT-4o (pipe)",
            "meta": {"capabilities": caps}, "params": {}, "is_active": True}
    client = owui.client
    found = client.request("GET", "/api/v1/models/model", params={"id": model}, ok=(200, 401, 404))
    if found.status_code == 200 and found.json():
        client.request("POST", "/api/v1/models/model/update", params={"id": model}, json=form)
    else:
        client.request("POST", "/api/v1/models/create", json=form)
    client.list_models(refresh=True)  # as the browser does; Open WebUI caches the model list


def test_natively_sent_documents_still_get_open_webuis_excerpts_unless_file_context_is_off(
        owui):
    """What MULTIMODAL_IMPLEMENTATION.md says about SEND_FILES_NATIVELY and RAG: the pipe
    can't stop Open WebUI's retrieval; on 0.12 the model's File Context capability can."""
    client = owui.client
    pdf = client.upload_file("notes.pdf", NOTES, "application/pdf")
    model = owui.model("openai/gpt-4o")
    prompt = "What is the secret word in my notes"

    def turn() -> dict:
        since = len(owui.emulator.requests)
        with valves(owui, SEND_FILES_NATIVELY=True):
            client.chat_ui(model, prompt, files=[extracted_file(client, pdf)])
        # (the default RAG template starts with "### Task:", so turn_posts can't be used)
        posts = [r["json"] for r in owui.emulator.requests[since:]
                 if r["method"] == "POST" and r["path"].endswith("/responses")
                 and any(p.get("type") == "input_file" for p in user_parts(r["json"]))]
        assert len(posts) == 1
        assert [p["filename"] for p in user_parts(posts[0]) if p["type"] == "input_file"] == [
            "notes.pdf"]
        return posts[0]

    assert excerpts(turn())  # the PDF natively *and* Open WebUI's excerpt
    if owui.legacy:
        return  # 0.6.28: no File Context capability; retrieval always runs
    set_file_context(owui, model, on=False)
    try:
        assert excerpts(turn()) == []  # the PDF only
    finally:
        set_file_context(owui, model, on=True)
