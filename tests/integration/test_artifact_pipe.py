"""pipe() end to end with the emulator and a real database: reasoning comes back next turn,
in order, encrypted at rest; storage trouble never breaks a chat (issue #5)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from artifact_fixtures import FailingRunner, redis_server, sqlite_sync  # noqa: F401
from helpers import posts, stream

from openrouter_responses_pipe import Pipe, marker_ids

NANO = "openai/gpt-5-nano"
CHAT = {"chat_id": "chat-A", "message_id": "msg-1"}


@pytest.fixture
def db(tmp_path: Path):
    runner, dispose = sqlite_sync(tmp_path)
    failing = FailingRunner(runner)
    yield failing
    dispose()


def make_pipe(emulator, sleeps, db, **valves) -> Pipe:
    p = Pipe(sleep=sleeps, artifact_db=db, env={})
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                        ARTIFACT_ENCRYPTION_KEY="admin-secret", **valves)
    return p


def chat_body(*turns: tuple[str, str], ask: str) -> dict:
    messages: list[dict] = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": ask})
    return {"model": f"openrouter.{NANO}", "stream": True, "messages": messages}


def reasoning_output(emulator) -> dict:
    (item,) = [i for i in emulator.responses[-1]["output"] if i["type"] == "reasoning"]
    return item


def stored_payloads(tmp_path: Path) -> list[bytes]:
    with sa.create_engine(f"sqlite:///{tmp_path / 'owui.db'}").connect() as conn:
        names = sa.inspect(conn).get_table_names()
        return [bytes(r[0]) for n in names if n.startswith("orp_artifacts_")
                for r in conn.execute(sa.text(f'SELECT payload FROM "{n}"'))]


async def test_second_turn_sends_the_first_turns_reasoning_back_in_order(
        emulator, sleeps, db, tmp_path):
    pipe = make_pipe(emulator, sleeps, db)
    first = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    produced = reasoning_output(emulator)
    assert produced["encrypted_content"]
    (mid,) = marker_ids(first.text)
    assert first.text.rstrip().endswith(f"[orp:{mid}]: #")
    second = await stream(pipe, chat_body(("What is 2 + 2?", first.text), ask="And 3 + 3?"),
                          __metadata__={**CHAT, "message_id": "msg-2"})
    assert second.text and second.error is None
    sent = posts(emulator)[-1]["json"]["input"]
    assert [i.get("type") for i in sent] == ["message", "reasoning", "message", "message"]
    assert sent[1] == produced                          # verbatim, encrypted_content included
    assert sent[2]["role"] == "assistant" and "[orp:" not in sent[2]["content"]
    assert sent[2]["content"] == first.text.split("\n\n[orp:")[0].strip()
    for blob in stored_payloads(tmp_path):              # encrypted at rest
        assert produced["encrypted_content"].encode() not in blob
        assert b"summary" not in blob
    await pipe.close()


async def test_another_chat_cannot_replay_foreign_markers(emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db)
    first = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    await stream(pipe, chat_body(("q", first.text), ask="next"),
                 __metadata__={"chat_id": "chat-B", "message_id": "m"})
    sent = posts(emulator)[-1]["json"]["input"]
    assert "reasoning" not in [i.get("type") for i in sent]
    await pipe.close()


async def test_a_rotated_key_skips_old_reasoning_with_a_log_line_and_the_chat_goes_on(
        emulator, sleeps, db, caplog):
    pipe = make_pipe(emulator, sleeps, db)
    first = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), "ARTIFACT_ENCRYPTION_KEY": "new"})
    with caplog.at_level(logging.WARNING, logger="openrouter_responses_pipe"):
        second = await stream(pipe, chat_body(("q", first.text), ask="next"), __metadata__=CHAT)
    assert second.error is None and second.text
    assert "reasoning" not in [i.get("type") for i in posts(emulator)[-1]["json"]["input"]]
    assert any("another key" in r.getMessage() for r in caplog.records)
    # listing the old key after the new one reads it again
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "ARTIFACT_ENCRYPTION_KEY": "new, admin-secret"})
    await stream(pipe, chat_body(("q", first.text), ask="again"), __metadata__=CHAT)
    assert "reasoning" in [i.get("type") for i in posts(emulator)[-1]["json"]["input"]]
    await pipe.close()


async def test_next_reply_retention_sends_reasoning_once_then_deletes_it(emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db, REASONING_RETENTION="next_reply")
    first = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    history = ("What is 2 + 2?", first.text)
    await stream(pipe, chat_body(history, ask="b"), __metadata__=CHAT)
    assert "reasoning" in [i.get("type") for i in posts(emulator)[-1]["json"]["input"]]
    await stream(pipe, chat_body(history, ask="c"), __metadata__=CHAT)  # e.g. a regeneration
    assert "reasoning" not in [i.get("type") for i in posts(emulator)[-1]["json"]["input"]]
    await pipe.close()


async def test_disabled_retention_per_user_stores_nothing(emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db)
    user = {"id": "u1", "role": "user", "valves": {"REASONING_RETENTION": "disabled"}}
    out = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT, __user__=user)
    assert out.reasoning and marker_ids(out.text) == []
    await pipe.close()


async def test_a_database_outage_means_no_marker_and_a_notice_never_a_broken_chat(
        emulator, sleeps, db, events):
    pipe = make_pipe(emulator, sleeps, db)
    db.failing = True
    out = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT,
                       __event_emitter__=events)
    assert out.text and out.error is None and marker_ids(out.text) == []
    notes = [n["content"] for n in events.of("notification")]
    assert any("could not be saved" in n for n in notes)
    await pipe.close()


async def test_without_open_webuis_database_nothing_is_stored_and_chats_work(
        emulator, sleeps):
    pipe = Pipe(sleep=sleeps, env={})
    pipe.valves = pipe.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test")
    out = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    assert out.text and marker_ids(out.text) == []
    await pipe.close()


async def test_write_behind_pipe_across_two_workers(emulator, sleeps, tmp_path,
                                                    redis_server):  # noqa: F811
    env = {"REDIS_URL": redis_server.url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": "2"}
    workers = []
    for _ in range(2):
        runner, _dispose = sqlite_sync(tmp_path)
        p = Pipe(sleep=sleeps, artifact_db=runner, env=env)
        p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                            ARTIFACT_ENCRYPTION_KEY="k")
        workers.append(p)
    first = await stream(workers[0], chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    produced = reasoning_output(emulator)
    await stream(workers[1], chat_body(("What is 2 + 2?", first.text), ask="next"),
                 __metadata__=CHAT)
    assert posts(emulator)[-1]["json"]["input"][1] == produced
    health = await workers[0].pipe(
        body={"model": "openrouter._health", "stream": False,
              "messages": [{"role": "user", "content": "json"}]},
        __user__={"id": "admin", "role": "admin"})
    assert '"pending_rows"' in health and "write-behind" in health
    report = await workers[0].pipe(
        body={"model": "openrouter._health", "stream": False,
              "messages": [{"role": "user", "content": "report"}]},
        __user__={"id": "admin", "role": "admin"})
    assert "artifact store: backend database behind Redis write-behind" in report
    assert "Redis: pending rows " in report and "last flush error none" in report
    for p in workers:
        await p.close()


async def test_non_streamed_chats_remember_reasoning_too_but_tasks_do_not(emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db)
    body = {**chat_body(ask="What is 2 + 2?"), "stream": False}
    text = await pipe.pipe(body=body, __user__={"id": "u"}, __metadata__=CHAT)
    assert len(marker_ids(text)) == 1
    produced = reasoning_output(emulator)
    await stream(pipe, chat_body(("What is 2 + 2?", text), ask="next"), __metadata__=CHAT)
    assert posts(emulator)[-1]["json"]["input"][1] == produced
    title = await pipe.pipe(body=body, __user__={"id": "u"}, __metadata__=CHAT,
                            __task__="title_generation")
    assert marker_ids(title) == []
    await pipe.close()


async def test_passthrough_reasoning_is_reattached_when_open_webui_returns_results(
        emulator, sleeps, db, tmp_path):
    """Open WebUI ran the tools (passthrough mode): the reasoning that preceded the calls comes
    back before them when Open WebUI calls the pipe again with the results."""
    from openrouter_responses_pipe import (
        CallContext,
        Emitter,
        RequestLog,
        RequestSettings,
        Turn,
        parse_chat_request,
    )

    pipe = make_pipe(emulator, sleeps, db)
    reasoning = {"type": "reasoning", "id": "rs_pt", "summary": [],
                 "encrypted_content": "gAAAA-passthrough", "format": "openai-responses-v1"}
    calls = [{"id": "call_w", "type": "function",
              "function": {"name": "weather", "arguments": "{}"}}]
    req = parse_chat_request(chat_body(ask="weather?"), {"id": "u"}, CHAT, None)
    turn = Turn(req, RequestSettings.merge(pipe.valves, None), Emitter(None),
                RequestLog("r", "u", "chat-A", 20), CallContext(CHAT))
    await pipe._checkpoint_passthrough(turn, [reasoning], ["call_w"])
    body = {"model": f"openrouter.{NANO}", "stream": True, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_w", "content": "sunny"}]}
    await stream(pipe, body, __metadata__=CHAT)
    sent = posts(emulator)[-1]["json"]["input"]
    assert [i.get("type") for i in sent] == ["message", "reasoning", "function_call",
                                             "function_call_output"]
    assert sent[1] == reasoning
    assert all(b"gAAAA-passthrough" not in p for p in stored_payloads(tmp_path))
    await pipe.close()


async def test_cleanup_runs_after_turns_and_removes_only_unused_items(emulator, sleeps, db,
                                                                       tmp_path):
    import asyncio

    now = [1_000_000.0]

    def worker() -> Pipe:
        p = Pipe(sleep=sleeps, artifact_db=db, env={}, wall_clock=lambda: now[0])
        p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                            ARTIFACT_CLEANUP_DAYS=30)
        return p

    pipe = worker()
    stale = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    kept = await stream(pipe, chat_body(ask="What is 3 + 3?"),
                        __metadata__={"chat_id": "chat-K", "message_id": "k"})
    now[0] += 20 * 86400
    await stream(pipe, chat_body(("q", kept.text), ask="more"),  # chat-K is still in use
                 __metadata__={"chat_id": "chat-K", "message_id": "k2"})
    now[0] += 20 * 86400
    await pipe.close()
    pipe = worker()  # a restarted worker: its first turn runs the cleanup
    await stream(pipe, chat_body(ask="hello"), __metadata__={"chat_id": "chat-X"})
    for _ in range(200):
        if len(stored_payloads(tmp_path)) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(stored_payloads(tmp_path)) == 3  # K's two turns + X; A's unused item is gone
    await stream(pipe, chat_body(("q", stale.text), ask="again"), __metadata__=CHAT)
    assert "reasoning" not in [i.get("type") for i in posts(emulator)[-1]["json"]["input"]]
    await pipe.close()


# -- review follow-up: passthrough reasoning obeys retention and model family; next_reply
#    deletes only reasoning that was actually sent -------------------------------------------

PT_REASONING = {"type": "reasoning", "id": "rs_pt", "summary": [],
                "encrypted_content": "gAAAA-passthrough", "format": "openai-responses-v1"}


async def store_passthrough(pipe: Pipe) -> None:
    """What a passthrough turn stores: the reasoning before `call_w`, which Open WebUI runs."""
    from openrouter_responses_pipe import (
        CallContext,
        Emitter,
        RequestLog,
        RequestSettings,
        Turn,
        parse_chat_request,
    )

    req = parse_chat_request(chat_body(ask="weather?"), {"id": "u"}, CHAT, None)
    turn = Turn(req, RequestSettings.merge(pipe.valves, None), Emitter(None),
                RequestLog("r", "u", "chat-A", 20), CallContext(CHAT))
    await pipe._checkpoint_passthrough(turn, [PT_REASONING], ["call_w"])


def tool_results_body(model: str = NANO) -> dict:
    """Open WebUI calling the pipe again with the result of the call it ran."""
    calls = [{"id": "call_w", "type": "function",
              "function": {"name": "weather", "arguments": "{}"}}]
    return {"model": f"openrouter.{model}", "stream": True, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_w", "content": "sunny"}]}


def sent_kinds(emulator) -> list[str]:
    return [i.get("type") for i in posts(emulator)[-1]["json"]["input"]]


async def test_passthrough_reasoning_is_not_sent_when_the_user_disabled_retention(
        emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db)
    await store_passthrough(pipe)
    user = {"id": "u1", "role": "user", "valves": {"REASONING_RETENTION": "disabled"}}
    out = await stream(pipe, tool_results_body(), __metadata__=CHAT, __user__=user)
    assert out.error is None and out.text
    assert sent_kinds(emulator) == ["message", "function_call", "function_call_output"]
    await stream(pipe, tool_results_body(), __metadata__=CHAT)  # the default: sent
    assert sent_kinds(emulator) == ["message", "reasoning", "function_call",
                                    "function_call_output"]
    await pipe.close()


async def test_passthrough_reasoning_of_an_openai_model_is_not_sent_to_anthropic(
        emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db)
    await store_passthrough(pipe)
    out = await stream(pipe, tool_results_body("anthropic/claude-sonnet-4"), __metadata__=CHAT)
    assert out.error is None and out.text
    assert sent_kinds(emulator) == ["message", "function_call", "function_call_output"]
    await stream(pipe, tool_results_body(), __metadata__=CHAT)  # back on OpenAI: still there
    assert posts(emulator)[-1]["json"]["input"][1] == PT_REASONING
    await pipe.close()


async def test_next_reply_sends_passthrough_reasoning_once_then_deletes_it(
        emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db, REASONING_RETENTION="next_reply")
    await store_passthrough(pipe)
    await stream(pipe, tool_results_body(), __metadata__=CHAT)
    assert posts(emulator)[-1]["json"]["input"][1] == PT_REASONING
    out = await stream(pipe, tool_results_body(), __metadata__=CHAT)  # e.g. a regeneration
    assert out.error is None and out.text
    assert "reasoning" not in sent_kinds(emulator)
    await pipe.close()


async def test_next_reply_keeps_reasoning_another_model_family_did_not_receive(
        emulator, sleeps, db):
    pipe = make_pipe(emulator, sleeps, db, REASONING_RETENTION="next_reply")
    first = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    produced = reasoning_output(emulator)
    history = ("What is 2 + 2?", first.text)
    claude = {**chat_body(history, ask="b"), "model": "openrouter.anthropic/claude-sonnet-4"}
    out = await stream(pipe, claude, __metadata__=CHAT)
    assert out.error is None and "reasoning" not in sent_kinds(emulator)
    await stream(pipe, chat_body(history, ask="c"), __metadata__=CHAT)  # back on OpenAI
    assert posts(emulator)[-1]["json"]["input"][1] == produced
    await stream(pipe, chat_body(history, ask="d"), __metadata__=CHAT)  # sent once: gone
    assert "reasoning" not in sent_kinds(emulator)
    await pipe.close()


async def test_a_garbage_entry_in_the_redis_queue_never_breaks_chats_or_blocks_storage(
        emulator, sleeps, tmp_path, redis_server):  # noqa: F811
    import asyncio

    import redis as redis_sync

    from openrouter_responses_pipe import artifact_table_name

    env = {"REDIS_URL": redis_server.url, "WEBSOCKET_MANAGER": "redis", "UVICORN_WORKERS": "2"}
    runner, dispose = sqlite_sync(tmp_path)
    pipe = Pipe(sleep=sleeps, artifact_db=runner, env=env)
    pipe.valves = pipe.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test",
                              ARTIFACT_ENCRYPTION_KEY="k", REDIS_CACHE_TTL_SECONDS=0)
    ns = f"orp:{artifact_table_name('openrouter')}"
    client = redis_sync.Redis.from_url(redis_server.url)
    garbage = b'{"id": "half-written row'
    client.rpush(f"{ns}:pending", garbage)
    first = await stream(pipe, chat_body(ask="What is 2 + 2?"), __metadata__=CHAT)
    assert first.error is None and len(marker_ids(first.text)) == 1
    produced = reasoning_output(emulator)
    for _ in range(500):  # the background flush writes the good row behind the garbage,
        # then trims the queue: wait for both (the trim follows the database commit)
        if stored_payloads(tmp_path) and client.llen(f"{ns}:pending") == 0:
            break
        await asyncio.sleep(0.01)
    assert len(stored_payloads(tmp_path)) == 1
    assert client.llen(f"{ns}:pending") == 0
    assert client.lrange(f"{ns}:quarantine", 0, -1) == [garbage]
    client.rpush(f"{ns}:pending", garbage)  # even while one is queued, reads skip it
    second = await stream(pipe, chat_body(("What is 2 + 2?", first.text), ask="next"),
                          __metadata__=CHAT)
    assert second.error is None and second.text
    assert posts(emulator)[-1]["json"]["input"][1] == produced
    await pipe.close()
    client.close()
    dispose()
