"""The model-record sync through Pipe.pipes() with a fake Models API (issue #10): background,
converging across workers, surviving conflicts, failures reported once; MODEL_ID per request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest
from helpers import body, posts, stream

from openrouter_responses_pipe import (
    PUBLIC_READ,
    RECORD_MARK,
    Managed,
    Pipe,
    RecordWrite,
    StoredRecord,
    managed_from_record,
    record_meta,
    record_wanted,
)

GPT4O = "openai/gpt-4o"


class FakeRecords:
    """Open WebUI's model table as the adapter sees it; shared by several 'workers'."""

    def __init__(self, groups: dict[str, str] | None = None) -> None:
        self.rows: dict[str, StoredRecord] = {}
        self.groups = groups or {}
        self.inserts: list[str] = []
        self.updates: list[str] = []
        self.duplicate_inserts = 0
        self.conflicts_left: dict[str, int] = {}
        self.fail: Exception | None = None
        self.owner: str | None = "admin-1"
        self.gate: asyncio.Event | None = None

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def owner_id(self) -> str | None:
        self._check()
        return self.owner

    async def group_ids(self) -> dict[str, str]:
        return {k.casefold(): v for k, v in self.groups.items()}

    async def load(self, prefix: str) -> dict[str, StoredRecord]:
        self._check()
        if self.gate is not None:
            await self.gate.wait()
        return {k: v for k, v in self.rows.items() if k.startswith(prefix)}

    async def get(self, record_id: str) -> StoredRecord | None:
        return self.rows.get(record_id)

    def _row(self, w: RecordWrite) -> StoredRecord:
        meta = record_meta(w.base.meta if w.base else {}, w.values, w.mark)
        return StoredRecord(w.id, managed_from_record(w.values.name, meta, w.values.access,
                                                      w.values.is_active),
                            Managed.from_mark(meta[RECORD_MARK]), meta, {})

    async def insert(self, write: RecordWrite, owner: str) -> bool:
        await asyncio.sleep(0)
        if write.id in self.rows:
            self.duplicate_inserts += 1
            return False
        self.rows[write.id] = self._row(write)
        self.inserts.append(write.id)
        return True

    async def update(self, write: RecordWrite) -> bool:
        if self.conflicts_left.get(write.id):
            self.conflicts_left[write.id] -= 1
            return False
        self.rows[write.id] = self._row(write)
        self.updates.append(write.id)
        return True

    def admin_edit(self, record_id: str, **changes: Any) -> None:
        row = self.rows[record_id]
        managed = dataclasses.replace(row.managed, **changes)
        self.rows[record_id] = dataclasses.replace(row, managed=managed)


def make_pipe(emulator, records: FakeRecords, **valves: Any) -> Pipe:
    p = Pipe(model_records=lambda: records, function_id="openrouter")
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test", **valves)
    return p


async def synced(p: Pipe) -> list[dict[str, str]]:
    models = await p.pipes()
    await p._records.wait()
    return models


async def test_every_listed_entry_gets_one_record_following_model_access(emulator):
    records = FakeRecords()
    p = make_pipe(emulator, records, MODEL_ID=f"{GPT4O}, deepseek/deepseek-r1, typo/x")
    models = await synced(p)
    assert {m["id"] for m in models} >= {"_health", "_status-model-id"}
    assert sorted(records.rows) == ["openrouter._my_usage", "openrouter.deepseek/deepseek-r1",
                                    "openrouter.openai/gpt-4o"]  # every user's own spend too
    row = records.rows["openrouter.openai/gpt-4o"]
    assert row.managed.access == () and row.managed.is_active  # admins: Open WebUI's own rule
    assert dict(row.managed.capabilities)["vision"] is True
    assert dict(records.rows["openrouter.deepseek/deepseek-r1"].managed.capabilities) == {
        "vision": False, "file_upload": True, "web_search": True, "image_generation": False,
        "builtin_tools": False, "usage": True, "citations": True}

    await synced(p)  # unchanged catalog and valves: nothing runs, nothing is written
    assert len(records.inserts) == 3 and records.updates == []

    p.valves = p.valves.model_copy(update={"MODEL_ACCESS": "all"})
    await synced(p)
    assert {r.managed.access for r in records.rows.values()} == {(PUBLIC_READ,)}
    await p.close()


async def test_groups_by_name_and_unknown_groups_reported(emulator):
    records = FakeRecords(groups={"Team": "g-1"})
    p = make_pipe(emulator, records, MODEL_ID=GPT4O, MODEL_ACCESS="team, ghosts")
    await synced(p)
    assert records.rows["openrouter.openai/gpt-4o"].managed.access == (("group", "g-1", "read"),)
    status = p._records.status
    assert status["state"] == "partial" and status["unknown_groups"] == ["ghosts"]
    report = await p.pipe(body=body("_health", "report", stream=False)
                          | {"model": "openrouter._health"},
                          __user__={"id": "admin-1", "role": "admin"})
    assert "MODEL_ACCESS groups not found: ghosts" in report
    await p.close()


async def test_pipes_returns_before_the_sync_and_a_chat_never_waits(emulator):
    records = FakeRecords()
    records.gate = asyncio.Event()  # the database hangs until released
    p = make_pipe(emulator, records, MODEL_ID=GPT4O)
    models = await asyncio.wait_for(p.pipes(), 5)
    assert any(m["id"] == GPT4O for m in models) and records.rows == {}
    out = await asyncio.wait_for(stream(p, body(GPT4O, "hello")), 10)
    assert out.text and out.error is None
    records.gate.set()
    await p._records.wait()
    assert sorted(records.rows) == ["openrouter._my_usage", "openrouter.openai/gpt-4o"]
    await p.close()


async def test_two_workers_converge_on_one_record_each(emulator):
    records = FakeRecords()
    workers = [make_pipe(emulator, records, MODEL_ACCESS="all") for _ in range(2)]
    await asyncio.gather(*(w.pipes() for w in workers))
    await asyncio.gather(*(w._records.wait() for w in workers))
    listed = [m for m in await workers[0].pipes() if record_wanted(m["id"])]
    assert len(records.rows) == len(listed) == len(set(records.inserts))
    assert records.duplicate_inserts > 0  # both raced; the loser re-read instead of failing
    assert all(w._records.status["state"] == "ok" for w in workers)
    for w in workers:
        await w.close()


async def test_update_conflict_is_reread_and_merged_again(emulator):
    records = FakeRecords()
    p = make_pipe(emulator, records, MODEL_ID=GPT4O)
    await synced(p)
    rid = "openrouter.openai/gpt-4o"
    records.admin_edit(rid, name="Ours")
    records.conflicts_left[rid] = 2  # another writer moved version_id twice
    p.valves = p.valves.model_copy(update={"MODEL_ACCESS": "all"})
    await synced(p)
    row = records.rows[rid]
    assert row.managed.name == "Ours" and row.managed.access == (PUBLIC_READ,)
    assert p._records.status["state"] == "ok"
    await p.close()


async def test_admin_edits_survive_and_retired_models_switch_off_only_untouched(emulator):
    records = FakeRecords()
    p = make_pipe(emulator, records,
                  MODEL_ID=f"{GPT4O}, deepseek/deepseek-r1, openai/gpt-3.5-turbo")
    await synced(p)
    records.admin_edit("openrouter.openai/gpt-4o", name="Ours", is_active=False)
    records.admin_edit("openrouter.openai/gpt-3.5-turbo", description="kept by admin")
    p.valves = p.valves.model_copy(update={"MODEL_ID": "deepseek/deepseek-r1",
                                           "MODEL_NAME_PREFIX": "OR "})
    await synced(p)
    rows = records.rows
    assert rows["openrouter.deepseek/deepseek-r1"].managed.name.startswith("OR ")
    assert rows["openrouter.openai/gpt-4o"].managed.name == "Ours"
    assert rows["openrouter.openai/gpt-3.5-turbo"].managed.is_active is True  # edited: left on
    p.valves = p.valves.model_copy(update={"MODEL_ID": GPT4O})
    await synced(p)
    assert rows["openrouter.deepseek/deepseek-r1"].managed.is_active is False  # untouched: off
    assert records.rows["openrouter.openai/gpt-4o"].managed.is_active is False  # admin's off
    await p.close()


async def test_a_failing_sync_is_logged_once_reported_and_harmless(emulator, caplog):
    records = FakeRecords()
    records.fail = RuntimeError("database is locked")
    clock = [1000.0]
    p = Pipe(model_records=lambda: records, function_id="openrouter", clock=lambda: clock[0])
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test", MODEL_ID=GPT4O)
    with caplog.at_level(logging.WARNING, logger="openrouter_responses_pipe"):
        for _ in range(3):
            models = await synced(p)
            clock[0] += 61  # past the retry delay
        assert any(m["id"] == GPT4O for m in models)
        await synced(p)
    failures = [r for r in caplog.records if "Model record sync failed" in r.getMessage()]
    assert len({id(r) for r in failures}) == 1  # (root may hold pytest's handler twice)
    assert p._records.status["state"] == "failed"
    assert "database is locked" in p._records.status["last_error"]
    out = await stream(p, body(GPT4O, "still fine"))
    assert out.text and out.error is None
    records.fail = None
    clock[0] += 61
    await synced(p)
    assert p._records.status["state"] == "ok" and list(records.rows)
    await p.close()


async def test_no_admin_yet_is_a_reported_failure(emulator):
    records = FakeRecords()
    records.owner = None
    p = make_pipe(emulator, records, MODEL_ID=GPT4O)
    await synced(p)
    assert p._records.status["state"] == "failed" and records.rows == {}
    assert "no admin account" in p._records.status["last_error"]
    await p.close()


@pytest.mark.parametrize("stream_mode", [True, False])
async def test_model_id_is_enforced_per_request(emulator, stream_mode):
    p = make_pipe(emulator, FakeRecords(), MODEL_ID=GPT4O)
    payload = body("deepseek/deepseek-r1", "sneaky", stream=stream_mode)
    if stream_mode:
        out = await stream(p, payload)
        assert "not enabled on this server" in (out.error or "")
    else:
        with pytest.raises(Exception, match="not enabled on this server"):
            await p.pipe(body=payload, __user__={"id": "u", "role": "user"})
    assert posts(emulator) == []
    ok = await stream(p, body(GPT4O, "allowed"))
    assert ok.text and len(posts(emulator)) == 1
    await p.close()
