"""Memory across turns inside a real Open WebUI (issue #5).

- every version in ORP_E2E_VERSIONS: the marker line survives Open WebUI's storage, renders to
  nothing, and the second turn's request to OpenRouter carries the first turn's reasoning item
  verbatim, before the first answer;
- 0.12.4 with 2 uvicorn workers on a fresh PostgreSQL database and a Redis started here: a chat
  continues correctly whichever worker serves each turn.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from integration.artifact_fixtures import RedisServer, pg_available, redis_values
from owui_harness import (
    OpenWebUIClient,
    OpenWebUIServer,
    ensure_venv,
    install_pipe,
    stored_message,
)

from openrouter_responses_pipe import marker_ids

NANO = "openai/gpt-5-nano"
ROOT = Path(__file__).resolve().parents[2]
PIPE = ROOT / "openrouter_responses_pipe.py"
KEY = "e2e-artifact-key"
RENDER = ("import sys, markdown_it; "
          "print(markdown_it.MarkdownIt('commonmark').render(sys.stdin.read()))")


def main_turn_posts(requests: list[dict], question: str) -> list[dict]:
    """Streamed chat requests (not title/tag tasks) whose last user text is `question`."""
    out = []
    for r in requests:
        body = r.get("json") or {}
        if r["method"] != "POST" or not r["path"].endswith("/responses") or not body.get("stream"):
            continue
        last = [i for i in body["input"] if i.get("role") == "user"][-1]
        text = last["content"] if isinstance(last["content"], str) else \
            "".join(p.get("text", "") for p in last["content"])
        if question in text:
            out.append(body)
    return out


def encrypted_reasoning(responses: list[dict]) -> list[dict]:
    return [i for r in responses for i in r["output"]
            if i["type"] == "reasoning" and i.get("encrypted_content")]


def kinds(items: list[dict]) -> list[str]:
    return [i["role"] if i.get("type", "message") == "message" else i["type"] for i in items]


def rendered_html(version: str, markdown: str) -> str:
    """The stored text rendered by a CommonMark renderer (markdown-it, in Open WebUI's venv)."""
    python = ensure_venv(version) / "bin" / "python"
    return subprocess.run([str(python), "-c", RENDER], input=markdown, text=True,
                          capture_output=True, check=True).stdout


@pytest.mark.parametrize("who", ["admin", "member"])
def test_second_turn_sends_the_first_turns_reasoning_back(owui, who):
    valves = owui.client.get_valves("openrouter")
    owui.client.update_valves("openrouter", {**valves, "ARTIFACT_ENCRYPTION_KEY": KEY})
    model = owui.model(NANO)
    since = len(owui.emulator.responses)
    client = owui.client if who == "admin" else owui.member
    first = client.chat_ui(model, "What is 2 + 2? [emu:reasoning style=summary]")
    produced = encrypted_reasoning(owui.emulator.responses[since:])
    assert len(produced) == 1, produced
    content = stored_message(first)["content"]
    ids = marker_ids(content)
    assert len(ids) == 1, content                     # the marker survived Open WebUI's storage
    html = rendered_html(owui.version, content)
    assert "orp:" not in html and "You said" in html  # and renders to nothing

    n = len(owui.emulator.requests)
    second = client.chat_ui(model, "And 3 + 3?", follow=first)
    (sent,) = main_turn_posts(owui.emulator.requests[n:], "And 3 + 3?")
    assert kinds(sent["input"]) == ["user", "reasoning", "assistant", "user"], sent["input"]
    assert sent["input"][1] == produced[0]            # verbatim: id, encrypted_content, format
    assert "[orp:" not in json.dumps(sent["input"])
    assert "You said" in sent["input"][2]["content"]
    assert marker_ids(stored_message(second)["content"])


# -- 2 workers, PostgreSQL, Redis --------------------------------------------------------------

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def fresh_database():
    if not pg_available():
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is needed for the multi-worker e2e")
    name = f"owui_e2e_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield name
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def two_workers(emulator, fresh_database, tmp_path):
    redis = RedisServer(tmp_path).start()
    env = {"DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{fresh_database}",
           "REDIS_URL": redis.url, "WEBSOCKET_MANAGER": "redis",
           "ENABLE_WEBSOCKET_SUPPORT": "true"}
    # One worker first creates Open WebUI's own tables and default config: two workers
    # initialising an empty PostgreSQL database at once race on config_pkey (UniqueViolation).
    with OpenWebUIServer("0.12.4", data_dir=tmp_path / "owui", env=env, workers=1):
        pass
    server = OpenWebUIServer("0.12.4", data_dir=tmp_path / "owui", env=env, workers=2)
    try:
        server.start()
        client = OpenWebUIClient(server.base_url)
        client.signup_admin("Admin", "admin@example.com", "e2e-admin-password")
        install_pipe(client, PIPE, {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-emulator",
                                    "ARTIFACT_ENCRYPTION_KEY": KEY}, function_id="openrouter")
        yield server, client, redis, fresh_database
        client.close()
    finally:
        server.stop()
        redis.stop()


def worker_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"Stored \d+ items \(worker pid (\d+)\)", log)]


def test_a_chat_continues_across_two_workers_on_postgres_and_redis(two_workers, emulator):
    server, client, redis_server, database = two_workers
    model = "openrouter." + NANO
    since = len(emulator.responses)
    chat = client.chat_ui(model, "Turn 1 [emu:reasoning style=summary]")
    questions = ["Turn 1"]
    for turn in range(2, 17):  # until both workers served a turn (the kernel picks; bounded)
        # a fresh connection per turn, so the kernel may hand it to either worker
        fresh = OpenWebUIClient(server.base_url, token=client.token)
        n = len(emulator.requests)
        question = f"Turn {turn}"
        chat = fresh.chat_ui(model, f"{question} [emu:reasoning style=summary]", follow=chat)
        fresh.close()
        (sent,) = main_turn_posts(emulator.requests[n:], question)
        expected = ["user"] + ["reasoning", "assistant", "user"] * (turn - 1)
        assert kinds(sent["input"]) == expected, (turn, kinds(sent["input"]))
        questions.append(question)
        if turn >= 3 and len(set(worker_pids(server.log_tail(400)))) > 1:
            break
    produced = encrypted_reasoning(emulator.responses[since:])
    replayed = [i for i in sent["input"] if i["type"] == "reasoning"]
    assert replayed == produced[:len(replayed)]     # every earlier turn, verbatim, in order
    assert len(set(worker_pids(server.log_tail(400)))) == 2, server.log_tail(80)
    payloads = stored_payloads(database, expected=len(produced))
    cached = redis_values(redis_server.url)
    assert cached, "write-behind was not used"
    for item in produced:  # written through to PostgreSQL; encrypted at rest and in Redis
        blob = item["encrypted_content"].encode()
        assert all(blob not in p for p in payloads) and all(blob not in v for v in cached)


def stored_payloads(database: str, expected: int, timeout: float = 30) -> list[bytes]:
    """The pipe table's payloads once the write-behind queue has reached PostgreSQL."""
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                tables = [t for t in sa.inspect(conn).get_table_names()
                          if t.startswith("orp_artifacts")]
                payloads = [bytes(r[0]) for t in tables
                            for r in conn.execute(sa.text(f'SELECT payload FROM "{t}"'))]
            if len(payloads) >= expected or time.monotonic() > deadline:
                assert len(payloads) >= expected, (tables, len(payloads), expected)
                return payloads
            time.sleep(0.5)
    finally:
        engine.dispose()


# -- with tools (issue #3): reasoning, calls and results come back in order ------------------

TOOL_ID = "e2e_artifact_weather"
TOOL_SOURCE = '''"""
title: E2E artifact weather
description: Weather probe for the artifact e2e test
"""


class Tools:
    def __init__(self):
        pass

    async def e2e_artifact_weather(self, city: str) -> str:
        """
        Get the current weather for a city.
        :param city: The city name.
        """
        return f"ARTIFACT-SUNNY-IN-{city.upper()}"
'''
NO_TASKS = {"title_generation": False, "tags_generation": False, "follow_up_generation": False}


def test_second_turn_replays_the_first_turns_tool_round_in_order(owui):
    owui.client.create_tool(TOOL_ID, "E2E artifact weather", TOOL_SOURCE)
    valves = owui.client.get_valves("openrouter")
    owui.client.update_valves("openrouter", {**valves, "ARTIFACT_ENCRYPTION_KEY": KEY})
    model = owui.model(NANO)
    extra = {"tool_ids": [TOOL_ID], "params": {"function_calling": "native"},
             "background_tasks": NO_TASKS}
    since = len(owui.emulator.responses)
    n = len(owui.emulator.requests)
    ask = "Weather in Porto? [emu:tool_call name=e2e_artifact_weather args='{\"city\":\"Porto\"}']"
    first = owui.client.chat_ui(model, ask, **extra)
    assert not stored_message(first).get("error"), stored_message(first)
    round1, round2 = owui.emulator.responses[since:since + 2]
    result = main_turn_posts(owui.emulator.requests[n:], "Weather in Porto?")[-1]["input"][-1]
    produced = [*round1["output"], result,
                *[i for i in round2["output"] if i["type"] == "reasoning"]]
    assert kinds(produced) == ["reasoning", "function_call", "function_call_output",
                               "reasoning"]
    assert result["output"] == "ARTIFACT-SUNNY-IN-PORTO"

    n = len(owui.emulator.requests)
    owui.client.chat_ui(model, "Thanks!", follow=first, **extra)
    (sent,) = main_turn_posts(owui.emulator.requests[n:], "Thanks!")
    assert kinds(sent["input"]) == ["user", "reasoning", "function_call",
                                    "function_call_output", "reasoning", "assistant", "user"]
    assert sent["input"][1:5] == produced
    assert "<details" not in sent["input"][5]["content"]


def test_passthrough_reasoning_comes_back_when_open_webui_returns_the_results(owui):
    """TOOL_EXECUTION_MODE=open_webui: Open WebUI runs the tool and calls the pipe again; the
    reasoning that preceded the call is sent back right before it."""
    owui.client.create_tool(TOOL_ID, "E2E artifact weather", TOOL_SOURCE)
    valves = owui.client.get_valves("openrouter")
    owui.client.update_valves("openrouter", {**valves, "ARTIFACT_ENCRYPTION_KEY": KEY,
                                             "TOOL_EXECUTION_MODE": "open_webui"})
    try:
        since, n = len(owui.emulator.responses), len(owui.emulator.requests)
        ask = ("Weather in Faro? "
               "[emu:tool_call name=e2e_artifact_weather args='{\"city\":\"Faro\"}']")
        chat = owui.client.chat_ui(owui.model(NANO), ask, tool_ids=[TOOL_ID],
                                   params={"function_calling": "native"},
                                   background_tasks=NO_TASKS)
        assert not stored_message(chat).get("error"), stored_message(chat)
        reasoning = encrypted_reasoning(owui.emulator.responses[since:since + 1])
        _, second = main_turn_posts(owui.emulator.requests[n:], "Weather in Faro?")
        assert kinds(second["input"]) == ["user", "reasoning", "function_call",
                                          "function_call_output"], second["input"]
        assert second["input"][1] == reasoning[0]
        assert second["input"][3]["output"] == "ARTIFACT-SUNNY-IN-FARO"
    finally:
        owui.client.update_valves("openrouter", {**valves, "ARTIFACT_ENCRYPTION_KEY": KEY})
