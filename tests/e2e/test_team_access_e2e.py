"""Team access (issue #10) against a real Open WebUI (0.12.4 and 0.6.28).

An ordinary (role `user`) account sees the pipe's models only through the model records the
pipe keeps in Open WebUI's `model` table; MODEL_ACCESS decides who may read them. Admin edits
to a record (name, a capability) survive the next sync.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import FUNCTION_ID, PIPE, Owui
from integration.artifact_fixtures import RedisServer
from owui_harness import OpenWebUIClient, OpenWebUIServer, content_chunks, install_pipe
from test_artifacts_e2e import fresh_database  # noqa: F401 - the fixture

TEXT_ONLY = "deepseek/deepseek-r1"
VISION = "openai/gpt-4o"
CHAT_MODEL = "openai/gpt-4.1-mini"


def pipe_ids(client: OpenWebUIClient) -> set[str]:
    return {m["id"] for m in client.list_models() if m["id"].startswith(FUNCTION_ID + ".")}


def set_valves(owui: Owui, **changes: Any) -> None:
    """POST the full stored valve set with `changes` (a POST replaces the stored dict)."""
    valves = owui.client.get_valves(FUNCTION_ID)
    valves.update(changes)
    owui.client.update_valves(FUNCTION_ID, valves)


def wait_for(probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 60) -> Any:
    """Poll `probe` (each call is also a /api/models that lets the pipe see the new valves)
    until `ok(value)`; returns the last value either way (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def record(client: OpenWebUIClient, model_id: str) -> dict:
    return client.request("GET", "/api/v1/models/model", params={"id": model_id}).json()


def admin_update_record(client: OpenWebUIClient, rec: dict) -> None:
    """What the admin's model editor does: POST the whole record back."""
    form = {k: rec[k] for k in ("id", "base_model_id", "name", "meta", "params", "is_active")}
    if "access_grants" in rec:
        form["access_grants"] = rec["access_grants"]
    else:
        form["access_control"] = rec.get("access_control")
    client.request("POST", "/api/v1/models/model/update", params={"id": rec["id"]}, json=form)


def hand_made(owui: Owui, ids: set[str]) -> set[str]:
    """Models whose record an admin made or re-saved by hand (no sync mark): their access is
    the admin's and MODEL_ACCESS never overrides it (other e2e tests share one server)."""
    out = set()
    for model_id in ids:
        r = owui.client.request("GET", "/api/v1/models/model", params={"id": model_id},
                                ok=(200, 401, 404))
        body = r.json() if r.status_code == 200 else None
        if body and "openrouter_pipe_sync" not in (body.get("meta") or {}):
            out.add(model_id)
    return out


def member_chats(owui: Owui) -> None:
    model = owui.model(CHAT_MODEL)
    events = list(owui.member.chat_stream(model, [{"role": "user", "content": "Hi team"}]))
    assert "".join(content_chunks(events)).strip(), events[-3:]
    status, body = owui.member.chat(model, [{"role": "user", "content": "Plain"}], stream=False)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip(), body


def test_model_access_admins_all_and_groups(owui: Owui):
    admin_ids = pipe_ids(owui.client)
    assert owui.model(CHAT_MODEL) in admin_ids
    shared_by_hand = hand_made(owui, admin_ids)
    assert owui.model(CHAT_MODEL) not in shared_by_hand
    set_valves(owui, MODEL_ACCESS="admins")
    seen = wait_for(lambda: (pipe_ids(owui.client), pipe_ids(owui.member))[1] - shared_by_hand,
                    lambda v: not v)
    assert seen == set(), "with MODEL_ACCESS=admins an ordinary user must see no pipe model"
    status, _ = owui.member.chat(owui.model(CHAT_MODEL), [{"role": "user", "content": "x"}])
    assert status in (400, 401, 403, 404), status  # Open WebUI's own refusal

    set_valves(owui, MODEL_ACCESS="all")
    # every listed entry but the admin-only health entry and configuration-problem entries
    expected = {i for i in admin_ids if i != f"{FUNCTION_ID}._health"
                and not i.startswith(f"{FUNCTION_ID}._status")}
    seen = wait_for(lambda: pipe_ids(owui.member), lambda v: v == expected)
    assert seen == expected
    member_chats(owui)

    group = owui.client.request("POST", "/api/v1/groups/create",
                                json={"name": "e2e-team", "description": "pipe users"}).json()
    owui.client.request("POST", f"/api/v1/groups/id/{group['id']}/users/add",
                        json={"user_ids": [owui.member.user_id]})
    outsider = owui.client.add_user("Outsider", "outsider@example.com", "e2e-outsider-pass")
    try:
        set_valves(owui, MODEL_ACCESS="e2e-team")
        seen = wait_for(lambda: pipe_ids(outsider) - shared_by_hand, lambda v: not v)
        assert seen == set(), "a user outside the group must see no pipe model"
        assert pipe_ids(owui.member) == expected
        member_chats(owui)
    finally:
        outsider.close()
        set_valves(owui, MODEL_ACCESS="all")
        wait_for(lambda: pipe_ids(owui.member), lambda v: v == expected)


def test_records_carry_capabilities_and_admin_edits_survive_a_refresh(owui: Owui):
    set_valves(owui, MODEL_ACCESS="all", MODEL_NAME_PREFIX="")
    text_id, vision_id = owui.model(TEXT_ONLY), owui.model(VISION)
    wait_for(lambda: pipe_ids(owui.member), lambda v: text_id in v and vision_id in v)
    text_rec, vision_rec = record(owui.client, text_id), record(owui.client, vision_id)
    assert text_rec["meta"]["capabilities"]["vision"] is False
    assert vision_rec["meta"]["capabilities"]["vision"] is True
    assert text_rec["meta"]["capabilities"]["builtin_tools"] is False  # no tool support
    assert {"deepseek", "reasoning"} <= {t["name"] for t in text_rec["meta"]["tags"]}
    assert "Context:" in text_rec["meta"]["description"]
    assert text_rec["base_model_id"] is None

    original_name = vision_rec["name"]
    vision_rec["name"] = "Our GPT-4o"
    vision_rec["meta"]["capabilities"]["citations"] = False
    admin_update_record(owui.client, vision_rec)
    # a catalog refresh: the function is reloaded (new instance, catalog fetched again) and
    # a valve the records depend on changes, so every untouched name is rewritten
    owui.client.update_function(FUNCTION_ID, "OpenRouter", PIPE.read_text() + "\n# reload\n")
    set_valves(owui, MODEL_NAME_PREFIX="OR: ")
    renamed = wait_for(lambda: (owui.client.list_models(), record(owui.client, text_id))[1],
                       lambda r: r["name"].startswith("OR: "))
    assert renamed["name"] == "OR: " + text_rec["name"]
    after = record(owui.client, vision_id)
    assert after["name"] == "Our GPT-4o"
    assert after["meta"]["capabilities"]["citations"] is False
    assert after["meta"]["capabilities"]["vision"] is True
    names = {m["id"]: m["name"] for m in owui.member.list_models()}
    assert names[vision_id] == "Our GPT-4o" and names[text_id].startswith("OR: ")
    # the admin undoes both edits (values equal to what the sync wrote: managed again), so
    # the rest of the session sees the model as the catalog describes it
    after["name"], after["meta"]["capabilities"]["citations"] = original_name, True
    admin_update_record(owui.client, after)
    set_valves(owui, MODEL_NAME_PREFIX="")
    back = wait_for(lambda: (owui.client.list_models(), record(owui.client, vision_id))[1],
                    lambda r: r["name"] == original_name)
    assert back["name"] == original_name


# -- 2 workers on PostgreSQL (0.12.4): each record is created once ----------------------------

SYNCED = re.compile(r"Model records synced in [\d.]+s: (\d+) listed, (\d+) inserted, "
                    r"(\d+) updated, (\d+) switched off \(worker pid (\d+)\)")


@pytest.fixture
def two_workers_pg(emulator, fresh_database, tmp_path):  # noqa: F811
    redis = RedisServer(tmp_path).start()
    env = {"DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{fresh_database}",
           "REDIS_URL": redis.url, "WEBSOCKET_MANAGER": "redis",
           "ENABLE_WEBSOCKET_SUPPORT": "true"}
    with OpenWebUIServer("0.12.4", data_dir=tmp_path / "owui", env=env, workers=1):
        pass  # one worker creates Open WebUI's tables first (see test_artifacts_e2e)
    server = OpenWebUIServer("0.12.4", data_dir=tmp_path / "owui", env=env, workers=2)
    try:
        server.start()
        yield server, fresh_database
    finally:
        server.stop()
        redis.stop()


def test_two_workers_on_postgres_create_each_record_once(two_workers_pg, emulator):
    server, database = two_workers_pg
    admin = OpenWebUIClient(server.base_url)
    admin.signup_admin("Admin", "admin@example.com", "e2e-admin-password")
    install_pipe(admin, PIPE, {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-emulator",
                               "MODEL_ACCESS": "all"}, function_id=FUNCTION_ID)
    member = admin.add_user("Member", "member@example.com", "e2e-member-password")

    def list_on_a_fresh_connection(_: int) -> int:
        fresh = OpenWebUIClient(server.base_url, token=admin.token)
        try:
            return len(fresh.list_models())
        finally:
            fresh.close()

    pids: set[str] = set()
    for _ in range(20):  # until both workers listed (and so synced); the kernel picks
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(list_on_a_fresh_connection, range(6)))
        time.sleep(1)
        runs = SYNCED.findall(server.log_tail(2000))
        pids = {r[4] for r in runs}
        if len(pids) == 2:
            break
    assert len(pids) == 2, server.log_tail(60)
    listed = int(runs[0][0])
    assert listed > 10 and {int(r[0]) for r in runs} == {listed}
    assert sum(int(r[1]) for r in runs) == listed, runs  # every record inserted exactly once
    assert "Model record sync failed" not in server.log_tail(2000)
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}")
    try:
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.text(
                "SELECT id FROM model WHERE id LIKE 'openrouter.%'"))]
            history = dict(conn.execute(sa.text(
                "SELECT model_id, count(*) FROM model_history GROUP BY model_id")).all())
    finally:
        engine.dispose()
    assert len(ids) == len(set(ids)) == listed
    assert set(history.values()) == {1}, history  # written once, never rewritten by a worker
    expected = set(ids)
    seen = wait_for(lambda: pipe_ids(member), lambda v: v == expected)
    assert seen == expected
    admin.close()
    member.close()
