"""pipe() end to end with attachments (issue #4): what the emulator received, what users read.

Open WebUI's storage is the faithful stub (both flavours where it matters); remote media
comes from a loopback server reached through an injected resolver + dialer, so the SSRF
policy runs unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web
from conftest import Events
from helpers import posts, share_catalog, stream
from owui_stubs import install

from openrouter_responses_pipe import Fetcher, Intake, IntakeError, Pipe

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(200))
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer <<>>\n%%EOF\n"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00" + bytes(64)
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" * 30
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(64)
PUBLIC = "93.184.216.34"
GEMINI = "google/gemini-2.5-flash"        # text, image, file, audio, video
GPT4O = "openai/gpt-4o"                   # text, image, file
QWEN_VL = "qwen/qwen2.5-vl-72b-instruct"  # text, image
AUDIO = "openai/gpt-4o-audio-preview"     # text, audio
TEXT = "openai/gpt-3.5-turbo"             # text


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def durl(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{b64(data)}"


def chat(model: str, *parts: dict, text: str = "What is this?") -> dict:
    return {"model": f"openrouter.{model}", "stream": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]}


def image(url: str, detail: str | None = None) -> dict:
    spec = {"url": url} | ({"detail": detail} if detail else {})
    return {"type": "image_url", "image_url": spec}


def sent_parts(emulator) -> list[dict]:
    """Content parts of the last user message of the last POST /responses."""
    inp = posts(emulator)[-1]["json"]["input"]
    return [m for m in inp if m.get("role") == "user"][-1]["content"]


def of_type(parts: list[dict], kind: str) -> list[dict]:
    return [p for p in parts if p["type"] == kind]


def notes(events) -> list[str]:
    return [n["content"] for n in events.of("notification")]


# ------------------------------------------------------------------ a media server + stubs


class Media:
    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name}", self._serve)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def _serve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        body = {"cat.png": (PNG, "image/png"), "report.pdf": (PDF, "application/pdf"),
                "clip.mp4": (MP4, "video/mp4")}.get(name)
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body[0], content_type=body[1])

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


DNS = {"cdn.example.com": [PUBLIC], "intranet.example.com": ["10.1.2.3"]}


@pytest.fixture
async def media():
    srv = Media()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def mpipe(emulator, sleeps, media):
    async def resolve(host: str, port: int) -> list[str]:
        if host not in DNS:
            raise IntakeError(f"{host} could not be resolved.")
        return DNS[host]

    def dial(address: str, port: int) -> tuple[str, int]:
        assert address == PUBLIC
        return "127.0.0.1", media.port

    p = Pipe(sleep=sleeps, intake=Intake(Fetcher(resolve, dial, sleep=sleeps)))
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                        REMOTE_FETCH_ALLOW_HTTP=True)
    yield p
    await p.close()


@pytest.fixture(params=["async", "sync"])
def owui(request, tmp_path):
    handle = install(request.param, data_dir=tmp_path)
    share_catalog(handle)  # the records the pipe's sync makes (0.6 checks them per turn)
    handle.add_user("u1", role="user")
    handle.add_user("u2", role="user")
    yield handle
    handle.uninstall()


def store_file(handle, user_id: str, name: str, data: bytes, mime: str,
               processed: dict | None = None) -> str:
    """Put a file into the stub Open WebUI the way an upload leaves it (row + bytes); its
    `data` is what Open WebUI's processing wrote (default: text extracted, completed)."""
    files = handle.modules["open_webui.models.files"]
    file_id = str(uuid.uuid4())
    path = handle.upload_dir / f"{file_id}_{name}"
    path.write_bytes(data)
    now = int(time.time())
    processed = {"status": "completed", "content": f"Text of {name}"} if processed is None \
        else processed
    model = files.FileModel(id=file_id, user_id=user_id, filename=name, path=str(path),
                            data=processed, meta={"name": name, "content_type": mime,
                                           "size": len(data)}, created_at=now, updated_at=now)
    with handle.db.get_db() as session:
        session.add(files.File(**model.model_dump()))
        session.commit()
    return file_id


USER = {"id": "u1", "role": "user", "valves": None}


# ------------------------------------------------------------------ inline data


async def test_image_data_url_reaches_a_vision_model_with_its_detail(pipe, emulator, events):
    url = durl("image/png", PNG)
    out = await stream(pipe, chat(GPT4O, image(url, "high")), __event_emitter__=events)
    assert out.error is None
    assert of_type(sent_parts(emulator), "input_image") == [
        {"type": "input_image", "image_url": url, "detail": "high"}]
    assert notes(events) == []


async def test_a_mislabelled_image_is_sent_with_its_real_type(pipe, emulator):
    await stream(pipe, chat(GPT4O, image(durl("image/png", JPEG))))
    assert of_type(sent_parts(emulator), "input_image")[0]["image_url"] == durl(
        "image/jpeg", JPEG)


async def test_text_only_model_gets_the_text_and_the_user_a_note(pipe, emulator, events):
    out = await stream(pipe, chat(TEXT, image(durl("image/png", PNG))),
                       __event_emitter__=events)
    assert out.error is None
    assert sent_parts(emulator) == [{"type": "input_text", "text": "What is this?"}]
    assert notes(events) == [
        "OpenAI: GPT-3.5 Turbo can't read images, so an image was left out of the request."]


async def test_oversize_image_is_refused_from_its_length_and_the_text_still_goes(
        pipe, emulator, events):
    pipe.valves = pipe.valves.model_copy(update={"MAX_IMAGE_MB": 0.0001})
    await stream(pipe, chat(GPT4O, image(durl("image/png", PNG * 2))), __event_emitter__=events)
    assert sent_parts(emulator) == [{"type": "input_text", "text": "What is this?"}]
    assert notes(events) == [
        "An image was left out: The image is about 0.4 KB, over the 0.1 KB limit. "
        "Send a smaller one, or ask an admin to raise the limit."]


async def test_unsupported_image_type_is_named(pipe, emulator, events):
    await stream(pipe, chat(GPT4O, image(durl("image/bmp", b"BM" + bytes(60)))),
                 __event_emitter__=events)
    assert of_type(sent_parts(emulator), "input_image") == []
    assert "image/bmp can't be sent; models take PNG, JPEG, WebP or GIF" in notes(events)[0]


async def test_only_the_newest_images_are_sent(pipe, emulator, events):
    pipe.valves = pipe.valves.model_copy(update={"MAX_IMAGES_PER_REQUEST": 2})
    old, mid, new = (durl("image/png", PNG + bytes([i])) for i in range(3))
    body = chat(GPT4O, image(new))
    body["messages"] = [{"role": "user", "content": [image(old)]},
                        {"role": "assistant", "content": "A cat."},
                        {"role": "user", "content": [image(mid)]},
                        {"role": "assistant", "content": "A dog."}, *body["messages"]]
    await stream(pipe, body, __event_emitter__=events)
    inp = posts(emulator)[-1]["json"]["input"]
    sent = [p["image_url"] for m in inp if m.get("role") == "user" for p in m["content"]
            if p["type"] == "input_image"]
    assert sent == [mid, new]
    assert notes(events) == ["An older image was left out: only the newest 2 images are sent "
                             "per request (MAX_IMAGES_PER_REQUEST)."]


async def test_audio_reaches_an_audio_model_as_raw_base64(pipe, emulator, events):
    part = {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}
    await stream(pipe, chat(AUDIO, part), __event_emitter__=events)
    assert of_type(sent_parts(emulator), "input_audio") == [
        {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}]
    await stream(pipe, chat(GPT4O, part), __event_emitter__=events)
    assert of_type(sent_parts(emulator), "input_audio") == []
    assert notes(events)[-1] == ("OpenAI: GPT-4o can't read audio, so an audio clip was left "
                                 "out of the request.")


async def test_audio_in_another_format_is_refused_by_name(pipe, emulator, events):
    part = {"type": "input_audio", "input_audio": {"data": b64(b"OggS" + bytes(40)),
                                                   "format": "ogg"}}
    await stream(pipe, chat(AUDIO, part), __event_emitter__=events)
    assert of_type(sent_parts(emulator), "input_audio") == []
    assert "audio/ogg can't be sent; OpenRouter takes WAV or MP3 clips" in notes(events)[0]


async def test_video_data_url_and_video_link_reach_a_video_model(pipe, emulator, events):
    inline = durl("video/mp4", MP4)
    link = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
    await stream(pipe, chat(GEMINI, {"type": "video_url", "video_url": {"url": inline}},
                            {"type": "input_video", "video_url": link}),
                 __event_emitter__=events)
    assert of_type(sent_parts(emulator), "input_video") == [
        {"type": "input_video", "video_url": inline}, {"type": "input_video", "video_url": link}]
    await stream(pipe, chat(QWEN_VL, {"type": "input_video", "video_url": link}),
                 __event_emitter__=events)
    assert notes(events)[-1].endswith("can't read video, so a video was left out of the "
                                      "request.")


async def test_file_data_url_becomes_input_file_with_filename(pipe, emulator):
    part = {"type": "file", "file": {"filename": "q3.pdf", "file_data": durl("application/pdf",
                                                                            PDF)}}
    await stream(pipe, chat(GPT4O, part))
    assert of_type(sent_parts(emulator), "input_file") == [
        {"type": "input_file", "filename": "q3.pdf", "file_data": durl("application/pdf", PDF)}]


# ------------------------------------------------------------------ remote media


async def test_remote_image_is_downloaded_saved_for_the_user_and_inlined(
        mpipe, emulator, media, owui, events):
    url = "http://cdn.example.com/cat.png"
    await stream(mpipe, chat(GPT4O, image(url)), __user__=USER, __event_emitter__=events)
    assert of_type(sent_parts(emulator), "input_image") == [
        {"type": "input_image", "image_url": durl("image/png", PNG), "detail": "auto"}]
    saved = owui.get_file(str(uuid.uuid5(uuid.NAMESPACE_URL, f"u1\n{url}")))
    assert saved.user_id == "u1" and saved.meta["source_url"] == url
    assert await asyncio.to_thread(Path(saved.path).read_bytes) == PNG
    statuses = [s["description"] for s in events.of("status")]
    assert "Downloading an image from cdn.example.com…" in statuses
    await media.stop()  # the link dies; the saved copy keeps the chat working
    await stream(mpipe, chat(GPT4O, image(url)), __user__=USER)
    assert of_type(sent_parts(emulator), "input_image")[0]["image_url"] == durl("image/png",
                                                                                PNG)
    assert media.hits == {"cat.png": 1}


async def test_remote_video_file_is_downloaded_saved_and_inlined_but_a_youtube_page_is_not(
        mpipe, emulator, media, owui):
    url, page = "http://cdn.example.com/clip.mp4", "https://youtu.be/dQw4w9WgXcQ"
    await stream(mpipe, chat(GEMINI, {"type": "input_video", "video_url": url},
                             {"type": "input_video", "video_url": page}), __user__=USER)
    assert of_type(sent_parts(emulator), "input_video") == [
        {"type": "input_video", "video_url": durl("video/mp4", MP4)},
        {"type": "input_video", "video_url": page}]
    saved = owui.get_file(str(uuid.uuid5(uuid.NAMESPACE_URL, f"u1\n{url}")))
    assert await asyncio.to_thread(Path(saved.path).read_bytes) == MP4
    await media.stop()  # the link dies; the saved copy keeps the chat working
    await stream(mpipe, chat(GEMINI, {"type": "input_video", "video_url": url}), __user__=USER)
    assert of_type(sent_parts(emulator), "input_video") == [
        {"type": "input_video", "video_url": durl("video/mp4", MP4)}]
    assert media.hits == {"clip.mp4": 1}


async def test_remote_file_link_becomes_an_inline_pdf(mpipe, emulator):
    part = {"type": "input_file", "file_url": "http://cdn.example.com/report.pdf"}
    await stream(mpipe, chat(GPT4O, part))
    assert of_type(sent_parts(emulator), "input_file") == [
        {"type": "input_file", "filename": "report.pdf",
         "file_data": durl("application/pdf", PDF)}]


@pytest.mark.parametrize(("url", "words"), [
    ("http://intranet.example.com/cat.png", "resolves to 10.1.2.3, a private address"),
    ("http://169.254.169.254/latest/meta-data/", "is a cloud metadata address"),
    ("http://[::ffff:127.0.0.1]:8080/x.png", "loopback (IPv4-mapped)"),
    ("file:///etc/passwd", "Only https links are fetched, not 'file:'"),
    ("https://[::1/x.png", "The link is malformed"),
    ("http://cdn.example.com/missing.png", "answered HTTP 404, so the download was not retried"),
])
async def test_unsafe_or_failed_links_are_refused_specifically(mpipe, emulator, events, url,
                                                               words):
    out = await stream(mpipe, chat(GPT4O, image(url)), __event_emitter__=events)
    assert out.error is None and "What is this?" in out.text  # the emulator echoes the text
    assert sent_parts(emulator) == [{"type": "input_text", "text": "What is this?"}]
    assert len(notes(events)) == 1 and words in notes(events)[0]
    assert notes(events)[0].startswith("An image was left out: ")


# ------------------------------------------------------------------ Open WebUI files


async def test_open_webui_file_url_is_read_through_storage_and_inlined(pipe, emulator, owui):
    file_id = store_file(owui, "u1", "cat.png", PNG, "image/png")
    await stream(pipe, chat(GPT4O, image(f"/api/v1/files/{file_id}/content")), __user__=USER)
    assert of_type(sent_parts(emulator), "input_image")[0]["image_url"] == durl("image/png",
                                                                                PNG)


async def test_an_absolute_link_to_this_open_webui_is_read_from_storage_too(pipe, emulator,
                                                                           owui):
    file_id = store_file(owui, "u1", "cat.png", PNG, "image/png")
    url = f"http://localhost:8080/api/v1/files/{file_id}/content"  # make_request's base_url
    await stream(pipe, chat(GPT4O, image(url)), __user__=USER,
                 __request__=owui.make_request())
    assert of_type(sent_parts(emulator), "input_image")[0]["image_url"] == durl("image/png",
                                                                                PNG)


async def test_someone_elses_file_is_refused(pipe, emulator, owui, events):
    file_id = store_file(owui, "u2", "secret.png", PNG, "image/png")
    await stream(pipe, chat(GPT4O, image(f"/api/v1/files/{file_id}/content")), __user__=USER,
                 __event_emitter__=events)
    assert of_type(sent_parts(emulator), "input_image") == []
    deleted = await stream(pipe, chat(GPT4O, image("/api/v1/files/gone-123/content")),
                           __user__=USER, __event_emitter__=events)
    assert deleted.error is None
    # one sentence for "not yours" and "gone": neither the name nor whether it exists leaks
    assert notes(events) == ["An image was left out: An attached file is not available: it "
                             "no longer exists in Open WebUI, or you don't have access to it."
                             ] * 2


async def test_an_admin_may_read_any_users_file(pipe, emulator, owui):
    file_id = store_file(owui, "u2", "shared.png", PNG, "image/png")
    await stream(pipe, chat(GPT4O, image(f"/api/v1/files/{file_id}/content")),
                 __user__={"id": "u1", "role": "admin", "valves": None})
    assert of_type(sent_parts(emulator), "input_image")[0]["image_url"] == durl("image/png",
                                                                                PNG)


async def test_a_deleted_file_is_reported(pipe, emulator, owui, events):
    await stream(pipe, chat(GPT4O, image("/api/v1/files/gone-123/content")), __user__=USER,
                 __event_emitter__=events)
    assert "no longer exists in Open WebUI" in notes(events)[0]


def log_citation(events) -> str:
    (doc,) = [d["document"][0] for d in events.of("citation")
              if d["source"]["name"].startswith("Pipe log")]
    return doc


@pytest.mark.parametrize("owui", ["async"], indirect=True)
async def test_an_unreadable_stored_copy_is_named_without_the_servers_path(
        emulator, sleeps, owui):
    file_id = store_file(owui, "u1", "plan.png", PNG, "image/png")
    (owui.upload_dir / f"{file_id}_plan.png").unlink()  # the stored copy is gone
    p = Pipe(sleep=sleeps)
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                        REQUEST_LOG_CITATION="always")
    seen = {}
    for who in ("user", "admin"):
        events = Events()
        await stream(p, chat(GPT4O, image(f"/api/v1/files/{file_id}/content")),
                     __user__={**USER, "role": who}, __event_emitter__=events)
        seen[who] = (notes(events), log_citation(events))
    (note,), user_log = seen["user"]
    assert note == ("An image was left out: The stored copy of 'plan.png' can't be read "
                    "(file missing). Upload the file again; if that fails too, tell an admin.")
    assert str(owui.upload_dir) not in note + user_log
    assert f"No such file or directory: '{owui.upload_dir}" in seen["admin"][1]
    await p.close()


async def test_a_storage_that_refuses_a_download_is_named_without_its_endpoint(
        mpipe, emulator, owui, events):
    def refuse(*args, **kwargs):
        raise OSError(13, "Permission denied", "/srv/owui/uploads/secret-bucket/cat.png")

    owui.modules["open_webui.storage.provider"].Storage.upload_file = refuse
    mpipe.valves = mpipe.Valves(**{**mpipe.valves.model_dump(),
                                   "REQUEST_LOG_CITATION": "always"})
    out = await stream(mpipe, chat(GPT4O, image("http://cdn.example.com/cat.png")),
                       __user__=USER, __event_emitter__=events)
    assert out.error is None  # the chat goes on; the user's log says why nothing was saved
    text = log_citation(events)
    assert "Open WebUI's storage refused the file (permission denied)" in text
    assert "/srv/owui" not in text and "secret-bucket" not in text
    admin = Events()
    await stream(mpipe, chat(GPT4O, image("http://cdn.example.com/cat.png")),
                 __user__={**USER, "role": "admin"}, __event_emitter__=admin)
    assert "/srv/owui/uploads/secret-bucket/cat.png" in log_citation(admin)


def files_entry(file_id: str, name: str, mime: str) -> dict:
    """A `__files__` item as the 0.12 frontend sends it."""
    return {"type": "file", "id": file_id, "url": f"/api/v1/files/{file_id}", "name": name,
            "status": "uploaded", "content_type": mime, "collection_name": f"file-{file_id}",
            "file": {"id": file_id, "filename": name, "meta": {"name": name,
                                                              "content_type": mime}}}


async def test_attached_documents_go_natively_only_when_the_valve_allows(pipe, emulator, owui):
    file_id = store_file(owui, "u1", "q3 report.pdf", PDF, "application/pdf")
    files = [files_entry(file_id, "q3 report.pdf", "application/pdf")]
    await stream(pipe, chat(GPT4O, text="Summarise"), __user__=USER, __files__=files)
    assert of_type(sent_parts(emulator), "input_file") == []  # Open WebUI's RAG handles it
    user = {**USER, "valves": {"SEND_FILES_NATIVELY": "on"}}
    await stream(pipe, chat(GPT4O, text="Summarise"), __user__=user, __files__=files)
    assert of_type(sent_parts(emulator), "input_file") == [
        {"type": "input_file", "filename": "q3 report.pdf",
         "file_data": durl("application/pdf", PDF)}]
    await stream(pipe, chat(QWEN_VL, text="Summarise"), __user__=user, __files__=files)
    assert of_type(sent_parts(emulator), "input_file") == []  # no file input: RAG only


async def test_attached_audio_goes_to_an_audio_model(pipe, emulator, owui):
    pipe.valves = pipe.valves.model_copy(update={"SEND_FILES_NATIVELY": True})
    file_id = store_file(owui, "u1", "memo.mp3", MP3, "audio/mpeg")
    await stream(pipe, chat(AUDIO, text="Transcribe"), __user__=USER,
                 __files__=[files_entry(file_id, "memo.mp3", "audio/mpeg")])
    assert of_type(sent_parts(emulator), "input_audio") == [
        {"type": "input_audio", "input_audio": {"data": b64(MP3), "format": "mp3"}}]


async def test_caps_follow_open_webuis_own_upload_limit(pipe, emulator, owui, events):
    big = PDF + bytes(2 * 1024 * 1024)
    file_id = store_file(owui, "u1", "big.pdf", big, "application/pdf")
    kwargs = {}
    if owui.flavour == "async":
        owui.set_config("rag.file.max_size", 1)
    else:
        kwargs["__request__"] = owui.make_request(config={"FILE_MAX_SIZE": 1})
    part = {"type": "input_file", "file_id": file_id, "filename": "big.pdf"}
    await stream(pipe, chat(GPT4O, part), __user__=USER, __event_emitter__=events, **kwargs)
    assert of_type(sent_parts(emulator), "input_file") == []
    assert "The file is 2.0 MB, over the 1.0 MB limit" in notes(events)[0]


async def test_without_open_webui_storage_file_links_are_refused_clearly(pipe, emulator, events):
    await stream(pipe, chat(GPT4O, image("/api/v1/files/abc/content")),
                 __event_emitter__=events)
    assert notes(events) == ["An image was left out: Open WebUI's file store isn't available "
                             "to the pipe."]


# ------------------------------------------------------------------ emulator honesty


async def test_emulator_refuses_media_a_model_cannot_take(emulator):
    import aiohttp

    body = {"model": TEXT, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": durl("image/png", PNG), "detail": "auto"}]}]}
    async with aiohttp.ClientSession() as http, http.post(
            emulator.base_url + "/responses", json=body,
            headers={"Authorization": "Bearer k"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == (
            "No endpoints found that support image input")


async def test_non_streamed_chats_get_the_same_notes(pipe, emulator, events):
    body = chat(TEXT, image(durl("image/png", PNG))) | {"stream": False}
    answer = await pipe.pipe(body=body, __user__=USER, __event_emitter__=events)
    assert "What is this?" in answer
    assert notes(events) == [
        "OpenAI: GPT-3.5 Turbo can't read images, so an image was left out of the request."]


# ------------------------------------------------------------------ Open WebUI's DB failing


def break_file_lookups(handle, tmp_path) -> None:
    """`Files.get_file_by_id` runs on an engine whose database can't be opened: a genuine
    SQLAlchemy OperationalError, as from a version whose lookup doesn't swallow errors."""
    from sqlalchemy import create_engine, text

    broken = create_engine(f"sqlite:///{tmp_path}/no-such-dir/webui.db")

    def lookup(*args, **kwargs):
        with broken.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def alookup(*args, **kwargs):
        return lookup()

    files = handle.modules["open_webui.models.files"].Files
    files.get_file_by_id = alookup if handle.flavour == "async" else lookup


async def test_a_failing_file_lookup_refuses_only_that_attachment(pipe, emulator, owui, events,
                                                                   tmp_path):
    break_file_lookups(owui, tmp_path)
    out = await stream(pipe, chat(GPT4O, image("/api/v1/files/f-1/content")), __user__=USER,
                       __event_emitter__=events)
    assert out.error is None and "What is this?" in out.text  # the chat answers
    assert sent_parts(emulator) == [{"type": "input_text", "text": "What is this?"}]
    assert notes(events) == ["An image was left out: Open WebUI's database failed to look up "
                             "the attached file f-1 (OperationalError)."]


async def test_a_failing_saved_copy_lookup_just_downloads_again(mpipe, emulator, media, owui,
                                                                events, tmp_path):
    break_file_lookups(owui, tmp_path)
    url = "http://cdn.example.com/cat.png"
    out = await stream(mpipe, chat(GPT4O, image(url)), __user__=USER, __event_emitter__=events)
    assert out.error is None and notes(events) == []
    assert of_type(sent_parts(emulator), "input_image")[0]["image_url"] == durl("image/png",
                                                                                PNG)
    assert media.hits == {"cat.png": 1}


@pytest.mark.parametrize("owui", ["async"], indirect=True)  # 0.6.28's lookup returns None
async def test_a_failing_user_lookup_refuses_only_the_shared_file(pipe, emulator, owui, events):
    """0.12.4's `Users.get_user_by_id` raises when the DB fails (no try); the pipe needs it
    to ask Open WebUI whether someone else's file is shared with this user."""
    from sqlalchemy import text

    file_id = store_file(owui, "u2", "shared.png", PNG, "image/png")
    with owui.db.get_db() as session:
        session.execute(text('DROP TABLE "user"'))
        session.commit()
    out = await stream(pipe, chat(GPT4O, image(f"/api/v1/files/{file_id}/content")),
                       __user__=USER, __event_emitter__=events)
    assert out.error is None and "What is this?" in out.text
    assert sent_parts(emulator) == [{"type": "input_text", "text": "What is this?"}]
    assert notes(events) == ["An image was left out: Open WebUI's database failed to check "
                             "your access to 'shared.png' (OperationalError)."]


async def test_a_cancelled_lookup_is_not_turned_into_a_refusal(owui):
    """Cancellation (the user pressed stop) passes through the database guard untouched."""
    from openrouter_responses_pipe import OwuiFileStore

    async def cancelled(*args, **kwargs):
        raise asyncio.CancelledError

    owui.modules["open_webui.models.files"].Files.get_file_by_id = cancelled
    with pytest.raises(asyncio.CancelledError):
        await OwuiFileStore().find("f-1")


async def test_a_long_chat_keeps_its_newest_attachments_within_the_request_cap(
        pipe, emulator, events):
    # Each turn re-sends the chat's attachments; the newest ones win, the user hears why.
    old_pdf = durl("application/pdf", PDF + bytes(3000))
    new_image = durl("image/png", PNG)
    cap_mb = (len(new_image) + 100) / (1024 * 1024)
    pipe.valves = pipe.valves.model_copy(update={"MAX_REQUEST_ATTACHMENTS_MB": cap_mb})
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Read this"},
                                     {"type": "file", "file": {"file_data": old_pdf,
                                                               "filename": "old.pdf"}}]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, image(new_image)]},
    ]
    await stream(pipe, {"model": f"openrouter.{GPT4O}", "stream": True, "messages": history},
                 __event_emitter__=events)
    sent = posts(emulator)[-1]["json"]["input"]
    kinds = [p["type"] for m in sent if m.get("role") == "user" for p in m["content"]]
    assert kinds == ["input_text", "input_text", "input_image"]
    assert notes(events) == [
        "A file (4.0 KB as sent) was left out: one request carries at most 0.4 KB of "
        "attachments, newest first (MAX_REQUEST_ATTACHMENTS_MB)."]


# ------------------------------------------------------------------ issue #11 item 15
# SEND_FILES_NATIVELY off: a document reaches the model only through Open WebUI's retrieval.
# When that retrieval got nothing from it, it goes natively, or the user is told in words.

NOTHING_RETRIEVED = [
    ({"status": "failed", "error": "Unable to parse PDF"}, "processing failed: Unable to "
     "parse PDF"),
    ({"status": "completed", "content": "  "}, "no text could be extracted"),
    ({"status": "pending"}, "it was still being processed"),
]


@pytest.mark.parametrize(("processed", "why"), NOTHING_RETRIEVED)
async def test_a_document_retrieval_got_nothing_from_goes_natively_to_a_file_model(
        pipe, emulator, owui, events, processed, why):
    file_id = store_file(owui, "u1", "scan.pdf", PDF, "application/pdf", processed)
    out = await stream(pipe, chat(GPT4O, text="Summarise"), __user__=USER,
                       __event_emitter__=events, __metadata__={},  # an API client: no socket
                       __files__=[files_entry(file_id, "scan.pdf", "application/pdf")])
    assert of_type(sent_parts(emulator), "input_file") == [
        {"type": "input_file", "filename": "scan.pdf",
         "file_data": durl("application/pdf", PDF)}]
    said = (f"Open WebUI's document search got nothing from 'scan.pdf' ({why}), so it was "
            "sent to the model as a file.")
    assert notes(events) == [said]
    assert out.text.endswith(f"ℹ️ {said}")  # the toast reaches no one without a socket


@pytest.mark.parametrize(("processed", "why"), NOTHING_RETRIEVED[:2])
async def test_a_model_that_reads_no_files_gets_nothing_and_the_user_is_told_in_words(
        pipe, emulator, owui, events, processed, why):
    file_id = store_file(owui, "u1", "scan.pdf", PDF, "application/pdf", processed)
    out = await stream(pipe, chat(QWEN_VL, text="Summarise"), __user__=USER,
                       __event_emitter__=events, __metadata__={},  # an API client: no socket
                       __files__=[files_entry(file_id, "scan.pdf", "application/pdf")])
    said = (f"'scan.pdf' did not reach the model: Open WebUI's document search got nothing "
            f"from it ({why}), and Qwen: Qwen2.5 VL 72B Instruct can't read files.")
    assert notes(events) == [said]
    assert out.text.endswith(f"ℹ️ {said}")
    assert of_type(sent_parts(emulator), "input_file") == []


async def test_a_document_retrieval_read_is_not_sent_twice(pipe, emulator, owui, events):
    file_id = store_file(owui, "u1", "fine.pdf", PDF, "application/pdf")  # text extracted
    await stream(pipe, chat(GPT4O, text="Summarise"), __user__=USER, __event_emitter__=events,
                 __files__=[files_entry(file_id, "fine.pdf", "application/pdf")])
    assert of_type(sent_parts(emulator), "input_file") == [] and notes(events) == []


async def test_the_upload_error_on_the_files_item_counts_too(pipe, emulator, owui, events):
    file_id = store_file(owui, "u1", "x.pdf", PDF, "application/pdf", {"status": "completed",
                                                                       "content": "text"})
    item = {**files_entry(file_id, "x.pdf", "application/pdf"), "error": "Extraction failed"}
    await stream(pipe, chat(GPT4O, text="Summarise"), __user__=USER, __event_emitter__=events,
                 __files__=[item])
    assert len(of_type(sent_parts(emulator), "input_file")) == 1
    assert "processing failed: Extraction failed" in notes(events)[0]


async def test_a_stored_pdf_for_a_model_without_file_input_is_sized_before_it_is_read(
        pipe, emulator, owui, events, monkeypatch):
    # QWEN_VL reads no files, yet a PDF goes to it (OpenRouter's file-parser): its stored size
    # must count in the attachment total before anything is read from storage.
    file_id = store_file(owui, "u1", "big.pdf", PDF + bytes(40_000), "application/pdf")
    pipe.valves = pipe.valves.model_copy(update={"MAX_REQUEST_ATTACHMENTS_MB": 0.01})
    reads: list[str] = []
    store = pipe._intake.store
    original = store.read

    async def counted(file_id: str, *args, **kwargs):
        reads.append(file_id)
        return await original(file_id, *args, **kwargs)

    monkeypatch.setattr(store, "read", counted)
    part = {"type": "file", "file": {"filename": "big.pdf",
                                     "file_data": f"/api/v1/files/{file_id}/content"}}
    await stream(pipe, chat(QWEN_VL, part), __user__=USER, __event_emitter__=events)
    assert reads == []  # refused from its stored size: never read
    assert of_type(sent_parts(emulator), "input_file") == []
    assert notes(events) == [
        "A file (52.2 KB as sent) was left out: one request carries at most 10.2 KB of "
        "attachments, newest first (MAX_REQUEST_ATTACHMENTS_MB)."]
