"""Attachments are chosen from their stored sizes before any is read (issue #11 item 7):
30 stored 10 MB PDFs and a 20 MB request cap read one file, and peak memory stays near the
cap (tracemalloc), where reading everything first took ~444 MB."""

from __future__ import annotations

import time
import tracemalloc
import uuid

import pytest
from openrouter_emulator import load_catalog
from owui_stubs import install

from openrouter_responses_pipe import (
    MB,
    Emitter,
    Intake,
    IntakeJob,
    RefusedPart,
    UserValves,
    Valves,
    intake_limits,
    parse_catalog,
    parse_chat_request,
)

PDF_HEAD = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n"
GPT4O = "openai/gpt-4o"


@pytest.fixture
def owui(tmp_path):
    handle = install("sync", data_dir=tmp_path)
    handle.add_user("u1", role="user")
    yield handle
    handle.uninstall()


def store_pdf(handle, name: str, size: int) -> str:
    files = handle.modules["open_webui.models.files"]
    file_id = str(uuid.uuid4())
    path = handle.upload_dir / f"{file_id}_{name}"
    with open(path, "wb") as fh:
        fh.write(PDF_HEAD)
        fh.truncate(size)  # a sparse 10 MB file: cheap to create, real to read
    now = int(time.time())
    model = files.FileModel(id=file_id, user_id="u1", filename=name, path=str(path), data={},
                            meta={"name": name, "content_type": "application/pdf",
                                  "size": size}, created_at=now, updated_at=now)
    with handle.db.get_db() as session:
        session.add(files.File(**model.model_dump()))
        session.commit()
    return file_id


def pdf_message(file_id: str, name: str) -> dict:
    return {"role": "user", "content": [
        {"type": "text", "text": f"Read {name}"},
        {"type": "file", "file": {"file_data": f"/api/v1/files/{file_id}/content",
                                  "filename": name}}]}


async def test_thirty_stored_pdfs_with_a_20_mb_cap_read_only_what_is_sent(owui):
    ids = [store_pdf(owui, f"doc{i}.pdf", 10 * MB) for i in range(30)]
    history: list[dict] = []
    for i, file_id in enumerate(ids):  # oldest first; each turn re-sends the chat's files
        history += [pdf_message(file_id, f"doc{i}.pdf"), {"role": "assistant", "content": "ok"}]
    history.append({"role": "user", "content": "Compare them all"})
    req = parse_chat_request({"model": f"openrouter.{GPT4O}", "messages": history,
                              "stream": True}, {"id": "u1", "role": "user"}, {}, None)
    entry = next(e for e in parse_catalog({"data": load_catalog()}) if e.id == GPT4O)
    limits = intake_limits(Valves(API_KEY="k", MAX_REQUEST_ATTACHMENTS_MB=20), UserValves())
    job = IntakeJob(entry, limits, "u1", "user", Emitter(None))
    store = Intake()._store
    reads: list[str] = []
    original = store.read

    async def counting_read(file_id, *args):
        reads.append(file_id)
        return await original(file_id, *args)

    store.read = counting_read  # type: ignore[method-assign]
    intake = Intake(store=store)
    tracemalloc.start()
    try:
        prepared = await intake.prepare(req, job)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reads == [ids[-1]]                 # only the newest PDF fits, and only it is read
    parts = [p for m in prepared.messages for p in m.parts]
    refused = [p for p in parts if isinstance(p, RefusedPart)]
    assert len(refused) == 29
    assert refused[0].reason == (
        "A file (13.3 MB as sent) was left out: one request carries at most 20.0 MB of "
        "attachments, newest first (MAX_REQUEST_ATTACHMENTS_MB).")
    # the one file kept (13.3 MB as sent) plus its bytes while encoding; was ~444 MB
    assert peak < 2 * 20 * MB, f"peak {peak / MB:.0f} MB for a 20 MB cap"
