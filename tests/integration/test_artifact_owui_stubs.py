"""The artifact store on each Open WebUI flavour's own database helpers (sync <= 0.8 engine,
async >= 0.9 engine), found at runtime without injection (issue #5)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from owui_stubs import call_pipe, install, load_function

from openrouter_responses_pipe import (
    AsyncEngineRunner,
    SyncEngineRunner,
    marker_ids,
    owui_db_runner,
)

SOURCE = (Path(__file__).resolve().parents[2] / "openrouter_responses_pipe.py").read_text()
MODEL = "openrouter.openai/gpt-5-nano"


@pytest.fixture(params=["sync", "async"])
def flavour(request, tmp_path):
    handle = install(request.param, data_dir=tmp_path)
    handle.add_user("u1", role="user", name="Ann", email="ann@example.com")
    if request.param == "sync":  # 0.6.28: the pipe checks the model record's access itself
        handle.share_model(MODEL)
    yield request.param
    handle.uninstall()


def test_the_runner_matches_the_open_webui_generation(flavour):
    runner = owui_db_runner()
    assert isinstance(runner, AsyncEngineRunner if flavour == "async" else SyncEngineRunner)


async def test_reasoning_round_trips_through_open_webuis_database(flavour, emulator):
    pipe, _ = load_function(SOURCE, "openrouter", flavour)
    valves = {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-test",
              "ARTIFACT_ENCRYPTION_KEY": "k"}
    meta = {"chat_id": "chat-1", "message_id": "m1", "session_id": "s"}
    ask = [{"role": "user", "content": "2+2?"}]
    first = await call_pipe(pipe, body={"model": MODEL, "stream": True, "messages": ask},
                            user={"id": "u1"}, stored_valves=valves, metadata=meta,
                            flavour=flavour)
    assert first.error is None and len(marker_ids(first.text)) == 1
    produced = [i for i in emulator.responses[-1]["output"] if i["type"] == "reasoning"]
    history = [*ask, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "3+3?"}]
    await call_pipe(pipe, body={"model": MODEL, "stream": True, "messages": history},
                    user={"id": "u1"}, stored_valves=valves, metadata={**meta, "message_id": "m2"},
                    flavour=flavour)
    sent = [r for r in emulator.requests if r["path"].endswith("/responses")][-1]["json"]
    assert [i.get("type") for i in sent["input"]] == ["message", "reasoning", "message",
                                                      "message"]
    assert sent["input"][1] == produced[0]


@pytest.mark.parametrize("flavour_name", ["sync", "async"])
async def test_the_table_goes_into_open_webuis_database_schema(flavour_name, tmp_path, emulator):
    import sqlalchemy as sa
    from artifact_fixtures import PG_URL, pg_available

    if not pg_available():
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is required for this test")
    schema = f"orp_schema_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    handle = install(flavour_name, data_dir=tmp_path, database_url=PG_URL,
                     env={"DATABASE_SCHEMA": schema})
    try:
        handle.add_user("u1", role="user")
        if flavour_name == "sync":
            handle.share_model(MODEL)
        pipe, _ = load_function(SOURCE, "openrouter", flavour_name)
        out = await call_pipe(pipe, body={"model": MODEL, "stream": True,
                                          "messages": [{"role": "user", "content": "2+2?"}]},
                              user={"id": "u1"}, flavour=flavour_name,
                              stored_valves={"BASE_URL": emulator.base_url,
                                             "API_KEY": "sk-or-test"},
                              metadata={"chat_id": "c1", "message_id": "m1", "session_id": "s"})
        assert out.error is None and len(marker_ids(out.text)) == 1
        with admin.connect() as conn:
            tables = conn.execute(sa.text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                {"s": schema}).scalars().all()
        assert any(t.startswith("orp_artifacts_") for t in tables), tables
    finally:
        handle.uninstall()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
