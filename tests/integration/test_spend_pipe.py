"""Spend control end to end through `pipe()` with the emulator and a real database (issue #13):
the ledger, budgets, provisioned keys that OpenRouter (the emulator) enforces, users' own keys,
balance, reports."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid

import pytest
import sqlalchemy as sa
from artifact_fixtures import BACKENDS, PG_URL, FailingRunner, drop_table, pg_available
from conftest import Events
from helpers import posts, stream
from openrouter.operations import createkeys, getcredits, getcurrentkey, getkey, updatekeys
from openrouter.operations import list as listkeys
from sdk_validation import SchemaError

from openrouter_responses_pipe import (
    KEY_OWN,
    KEY_PIPE,
    Pipe,
    SyncEngineRunner,
    spend_table_name,
)

GPT4O = "openai/gpt-4o"
MGMT = "sk-or-mgmt-test"


def strict(model, raw):
    """SDK model validation that also refuses keys the SDK doesn't know."""
    val = model.model_validate(raw)
    known = {f.alias or n for n, f in model.model_fields.items()}
    if extra := set(raw) - known:
        raise SchemaError(f"{model.__name__}: unknown keys {sorted(extra)}")
    return val


def weather_tool():
    async def weather(city: str) -> str:
        return f"Sunny in {city}"

    return {"tool_id": "t", "callable": weather, "spec": {
        "name": "weather", "description": "weather tool", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def fid():
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def db(tmp_path):
    runner, close = BACKENDS["sqlite-sync"](tmp_path)
    yield runner
    close()


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("WEBUI_SECRET_KEY", "spend-test-secret")


def b(fid, model, text, stream=True):
    """A chat body for pipe function `fid` (so each test has its own tables)."""
    return {"model": f"{fid}.{model}", "stream": stream,
            "messages": [{"role": "user", "content": text}]}


def make_pipe(emulator, db, sleeps, **valves) -> Pipe:
    p = Pipe(sleep=sleeps, artifact_db=db)
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test", **valves)
    return p


def user(uid="u1", role="user", email="", **valves):
    return {"id": uid, "role": role, "email": email or f"{uid}@example.com",
            "valves": valves or None}


async def chat(p, fid, text="hi", who=None, events=None):
    out = await stream(p, b(fid, GPT4O, text),
                       __user__=who or user(), __event_emitter__=events)
    await p._spend.drain()
    return out


def ledger_rows(db, fid):
    """The ledger's rows; none when nothing was ever recorded (the table is made on first use)."""
    t = spend_table_name("spend", fid)
    if not sa.inspect(db.engine).has_table(t):
        return []
    with db.engine.begin() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(
            f'SELECT * FROM "{t}" ORDER BY user_id, key_source'))]


class DropAfterNextRun:
    """A database whose next statement is followed by another worker deleting every row of
    the vault (the race between an insert and the read that follows it)."""

    def __init__(self, inner, vault):
        self.inner, self.vault, self.dropped = inner, vault, False

    async def run(self, fn):
        result = await self.inner.run(fn)
        if not self.dropped:
            self.dropped = True
            table = self.vault.db.table
            await self.inner.run(lambda conn: conn.execute(table.delete()))
        return result


class GatedRunner:
    """A database that answers only once the test opens the gate."""

    def __init__(self, inner):
        self.inner, self.gate, self.calls = inner, asyncio.Event(), 0

    async def run(self, fn):
        self.calls += 1
        await self.gate.wait()
        return await self.inner.run(fn)


async def test_without_a_budget_the_first_byte_never_waits_for_the_ledger(emulator, db,
                                                                          sleeps, fid):
    """The spend in the status line is read after the answer, not before its first byte."""
    gated = GatedRunner(db)
    p = make_pipe(emulator, gated, sleeps)
    events = Events()
    gen = await p.pipe(body=b(fid, GPT4O, "hello"), __user__=user(), __event_emitter__=events)
    first = await asyncio.wait_for(anext(gen), 5)  # the database is still closed
    assert first["choices"][0]["delta"].get("content"), first
    gated.gate.set()
    async for _ in gen:
        pass
    await p._spend.drain()
    assert "you:" in [s["description"] for s in events.of("status")][-1]
    await p.close()


async def test_turn_cost_is_recorded_per_user_model_day_without_text(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps)
    await chat(p, fid, "secret prompt words")
    await chat(p, fid, "more", who=user("u2"))
    await chat(p, fid, "again")
    billed = [r["usage"]["cost"] for r in emulator.responses]
    rows = ledger_rows(db, fid)
    assert [(r["user_id"], r["model"], r["key_source"], r["requests"]) for r in rows] == [
        ("u1", GPT4O, KEY_PIPE, 2), ("u2", GPT4O, KEY_PIPE, 1)]
    assert rows[0]["cost"] == pytest.approx(billed[0] + billed[2])
    assert "secret" not in repr(rows) and "You said" not in repr(rows)
    await p.close()


async def test_every_tool_round_and_tasks_are_recorded(emulator, db, sleeps, fid):
    tools = {"weather": weather_tool()}
    p = make_pipe(emulator, db, sleeps)
    emulator.enqueue("tool_call")
    await stream(p, b(fid, GPT4O, "use the tool"), __user__=user(),
                 __tools__=tools)
    await p.pipe(b(fid, GPT4O, "title please", stream=False),
                 __user__=user(), __task__="title_generation")
    await p._spend.drain()
    assert len(emulator.responses) == 3  # two tool-loop rounds + one task
    rows = ledger_rows(db, fid)
    assert rows[0]["requests"] == 2  # one chat turn + one task
    assert rows[0]["cost"] == pytest.approx(sum(r["usage"]["cost"] for r in emulator.responses))
    await p.close()


async def test_a_turn_that_fails_after_a_billed_round_is_recorded(emulator, db, sleeps, fid):
    tools = {"weather": weather_tool()}
    p = make_pipe(emulator, db, sleeps, MAX_RETRIES=0)
    emulator.enqueue("tool_call")
    emulator.enqueue("http_error", status=500)
    out = await stream(p, b(fid, GPT4O, "go"), __user__=user(),
                       __tools__=tools)
    await p._spend.drain()
    assert "interrupted" in out.text or out.error
    rows = ledger_rows(db, fid)
    assert rows and rows[0]["cost"] == pytest.approx(emulator.responses[0]["usage"]["cost"])
    await p.close()


async def test_warning_note_then_refusal_before_anything_is_sent(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps, BUDGET_CHECK_CACHE_SECONDS=0)
    first = await chat(p, fid)
    cost = first.usage["cost"]
    # a budget the next turn reaches the warning threshold of, and the one after exceeds
    p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_USD": cost * 1.5,
                           "BUDGET_WARN_PERCENT": 50})
    events = Events()
    second = await chat(p, fid, events=events)
    assert second.error is None
    notes = [s["description"] for s in events.of("status")]
    assert any(" used this month" in n and n.startswith(f"${cost:.4f}"[:5]) for n in notes)
    assert any(" left" in n and "you:" in n for n in notes)  # the final status line
    sent = len(posts(emulator))
    third = await chat(p, fid)
    assert len(posts(emulator)) == sent  # refused before anything was sent
    assert "budget is used up" in third.error and "a month" in third.error
    assert "resets on 1 " in third.error and "00:00 UTC" in third.error
    await p.close()


async def test_twenty_parallel_chats_overshoot_by_at_most_the_admitted(emulator, db, sleeps,
                                                                       fid):
    p = make_pipe(emulator, db, sleeps, MAX_CONCURRENT_REQUESTS_PER_USER=20)
    probe = await chat(p, fid, who=user("probe"))
    cost = probe.usage["cost"]
    p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_USD": cost * 2.5,
                           "BUDGET_CHECK_CACHE_SECONDS": 60})
    # 20 chats at once, each taking a while: all start under budget, so all are admitted
    slow = b(fid, GPT4O, "[emu:slow delay_ms=30] hi")
    results = await asyncio.gather(*(stream(p, slow, __user__=user()) for _ in range(20)))
    admitted = [r for r in results if r.error is None]
    assert len(admitted) == 20
    # every later chat is refused at once: the finished turns were added to the cache
    late = [await stream(p, b(fid, GPT4O, "hi"), __user__=user())
            for _ in range(3)]
    assert all("budget is used up" in r.error for r in late)
    # staggered: once a finished turn crossed the budget, no new turn starts
    p2 = make_pipe(emulator, db, sleeps, MAX_CONCURRENT_REQUESTS_PER_USER=20,
                   BUDGET_USD=cost * 2.5, BUDGET_CHECK_CACHE_SECONDS=60)

    async def later(i):
        await asyncio.sleep(i * 0.02)
        return await stream(p2, b(fid, GPT4O, "[emu:slow delay_ms=15] hi"), __user__=user("u9"))

    staggered = await asyncio.gather(*(later(i) for i in range(20)))
    ok = sum(1 for r in staggered if r.error is None)
    assert 3 <= ok < 20
    await p._spend.drain()
    await p2._spend.drain()
    rows = {r["user_id"]: r for r in ledger_rows(db, fid)}
    assert rows["u1"]["requests"] == 20 and rows["u9"]["requests"] == ok
    await p.close()
    await p2.close()


async def test_admins_are_exempt_unless_the_valve_says_otherwise(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps, BUDGET_USD=0, BUDGET_OVERRIDES="a1=0")
    assert (await chat(p, fid, who=user("a1", role="admin"))).error is None
    p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_EXEMPT_ADMINS": False})
    assert "budget is used up" in (await chat(p, fid, who=user("a1", role="admin"))).error
    await p.close()


async def test_group_overrides_use_the_highest_group(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps, BUDGET_USD=100,
                  BUDGET_OVERRIDES="group:Interns=0, group:Staff=0.000001")

    async def groups(uid):
        return ["Interns"] if uid == "intern" else ["Interns", "Staff"]

    p._spend.groups = groups
    assert "budget is used up" in (await chat(p, fid, who=user("intern"))).error
    assert (await chat(p, fid, who=user("staff"))).error is None  # 0.000001 > 0: one turn
    assert "budget is used up" in (await chat(p, fid, who=user("staff"))).error
    await p.close()


async def test_ledger_failure_never_breaks_a_chat_and_follows_the_valve(emulator, tmp_path,
                                                                        sleeps, fid):
    runner = FailingRunner(BACKENDS["sqlite-sync"](tmp_path)[0])
    runner.failing = True
    p = make_pipe(emulator, runner, sleeps, BUDGET_USD=10)
    for _ in range(2):
        out = await chat(p, fid)
        assert out.error is None and out.text
    health = p._spend.health(await _turn(p, fid))
    assert health["errors"]["ledger_read"] >= 1 and health["errors"]["ledger_write"] >= 2
    assert health["queued_writes"] == 1  # both turns kept for the next try, as one entry
    p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_ON_LEDGER_ERROR": "deny"})
    denied = await chat(p, fid)
    assert "can't be checked" in denied.error
    runner.failing = False
    assert (await chat(p, fid)).error is None
    rows = ledger_rows(runner.inner, fid)
    assert rows[0]["requests"] == 3  # the queued turns were written with the next one
    await p.close()


async def _turn(p, fid):
    from openrouter_responses_pipe import (
        CallContext,
        Emitter,
        RequestLog,
        RequestSettings,
        Turn,
        parse_chat_request,
    )

    req = parse_chat_request(b(fid, GPT4O, "x"), user(), {}, None)
    return Turn(req, RequestSettings.merge(p.valves, None), Emitter(None),
                RequestLog("r", "u1", "-", 20), CallContext())


async def test_users_own_key_is_used_for_that_user_only(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps, BUDGET_USD=0.0000001, BUDGET_CHECK_CACHE_SECONDS=0)
    owner = user("owner", API_KEY="sk-or-users-own-key")
    for _ in range(2):  # far over the admin budget, but it's their money
        assert (await chat(p, fid, who=owner)).error is None
    assert (await chat(p, fid, who=user("other"))).error is None
    auth = [r["headers"]["Authorization"] for r in posts(emulator)]
    assert auth == ["Bearer sk-or-users-own-key"] * 2 + ["Bearer sk-or-test"]
    rows = {(r["user_id"], r["key_source"]) for r in ledger_rows(db, fid)}
    assert rows == {("owner", KEY_OWN), ("other", KEY_PIPE)}
    p.valves = p.Valves(**{**p.valves.model_dump(), "ALLOW_USER_API_KEYS": False})
    assert (await chat(p, fid, who=owner)).error is None  # their own-key spend didn't count
    assert posts(emulator)[-1]["headers"]["Authorization"] == "Bearer sk-or-test"
    assert "budget is used up" in (await chat(p, fid, who=owner)).error
    await p.close()


async def test_a_401_or_402_on_a_users_key_names_their_key(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps)
    emulator.enqueue("http_error", status=402)
    out = await chat(p, fid, who=user("owner", API_KEY="sk-or-empty-wallet"))
    assert "Your own OpenRouter key" in out.error and "out of credits" in out.error
    emulator.api_keys = {"sk-or-test"}
    out = await chat(p, fid, who=user("owner", API_KEY="sk-or-revoked"))
    assert "Your own OpenRouter key" in out.error and "rejected" in out.error
    assert "sk-or-revoked" not in out.error
    await p.close()


# -- OpenRouter-enforced budgets (management key) ------------------------------------------


async def test_provisioned_key_carries_the_budget_and_really_stops(emulator, db, sleeps, fid):
    emulator.keys.management_keys.add(MGMT)
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_PERIOD="weekly")
    probe = await chat(p, fid, who=user("probe-admin", role="admin"))
    cost = probe.usage["cost"]
    # the ledger can't see spend (cache long, budget read once) so OpenRouter must stop it
    p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_USD": cost * 1.5,
                           "BUDGET_CHECK_CACHE_SECONDS": 300, "BUDGET_ON_LEDGER_ERROR": "allow"})
    first = await chat(p, fid, who=user("u1"))
    assert first.error is None
    created = [r for r in emulator.requests if r["path"].endswith("/keys")
               and r["method"] == "POST"]
    assert len(created) == 1 and created[0]["json"]["limit"] == pytest.approx(cost * 1.5)
    assert created[0]["json"]["limit_reset"] == "weekly"
    key = next(iter(emulator.keys.keys.values()))
    assert posts(emulator)[-1]["headers"]["Authorization"] == f"Bearer {key.secret}"
    # the database holds the key encrypted, never in plain text
    with db.engine.begin() as conn:
        stored = conn.execute(sa.text(
            f'SELECT secret FROM "{spend_table_name("keys", fid)}"')).scalar()
    assert stored.startswith("encrypted:") and key.secret not in stored
    # a second read of the ledger: one turn spent, under the budget
    p._spend._cache.clear()
    second = await chat(p, fid, who=user("u1"))  # usage 1 turn < 1.5 turns: allowed
    assert second.error is None
    p._spend._cache.clear()
    await _forget_ledger(p, db, fid)
    third = await chat(p, fid, who=user("u1"))
    assert "your own budget, not the account's credit" in third.error
    assert "HTTP 402" in third.error and "Key limit exceeded" in third.error
    await p.close()


async def test_two_workers_making_a_users_first_key_at_once_end_with_one_key(
        emulator, db, sleeps, fid):
    """Two workers (two Pipe instances on one database) see no key for the user and both
    create one upstream at the same moment: one key is kept, both workers use it, and the
    other is deleted on OpenRouter, so the user can't spend the budget once per key."""
    emulator.keys.management_keys.add(MGMT)
    workers = [make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
               for _ in range(2)]
    both_created = asyncio.Barrier(2)
    for w in workers:
        create = w._spend.api.create_key

        async def create_together(*args, _create=create):
            made = await _create(*args)
            await both_created.wait()  # neither stores its key before both were made
            return made

        w._spend.api.create_key = create_together
    try:
        results = await asyncio.gather(*(chat(w, fid, who=user("u1")) for w in workers))
        assert [r.error for r in results] == [None, None]
        created = [r for r in emulator.requests if r["path"].endswith("/keys")
                   and r["method"] == "POST"]
        assert len(created) == 2  # the race really happened
        await asyncio.sleep(0.05)  # the loser's upstream delete runs in the background
        for w in workers:
            await w._spend.drain()
        assert len(emulator.keys.keys) == 1
        kept = next(iter(emulator.keys.keys.values()))
        used = {r["headers"]["Authorization"] for r in posts(emulator)}
        assert used == {f"Bearer {kept.secret}"}
        later = await asyncio.gather(*(chat(w, fid, who=user("u1")) for w in workers))
        assert [r.error for r in later] == [None, None]
        assert {r["headers"]["Authorization"] for r in posts(emulator)} == used
    finally:
        for w in workers:
            await w.close()


async def test_a_worker_with_an_old_key_cached_takes_the_new_one_on_a_budget_change(
        emulator, db, sleeps, fid):
    """Worker A remembers key 1; the row was replaced by key 2 (made by worker B after the
    first was dropped). A budget change on A must limit key 2, and A must use key 2: writing
    key 1 back over the row would leave key 2 live with the budget and out of the table."""
    emulator.keys.management_keys.add(MGMT)
    a = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
    b_ = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
    try:
        assert (await chat(a, fid, who=user("u1"))).error is None
        first = next(iter(emulator.keys.keys.values()))
        with db.engine.begin() as conn:  # the row dropped (e.g. a 401 seen by another worker)
            conn.execute(sa.text(f'DELETE FROM "{spend_table_name("keys", fid)}"'))
        assert (await chat(b_, fid, who=user("u1"))).error is None
        second = next(k for k in emulator.keys.keys.values() if k.hash != first.hash)
        a.valves = a.Valves(**{**a.valves.model_dump(), "BUDGET_USD": 7})
        a._spend._cache.clear()
        assert (await chat(a, fid, who=user("u1"))).error is None
        assert posts(emulator)[-1]["headers"]["Authorization"] == f"Bearer {second.secret}"
        assert (second.limit, first.limit) == (7, 5)
        with db.engine.begin() as conn:
            held = conn.execute(sa.text(
                f'SELECT key_hash, limit_usd FROM "{spend_table_name("keys", fid)}"')).all()
        assert [tuple(r) for r in held] == [(second.hash, 7.0)]
    finally:
        await a.close()
        await b_.close()


async def test_a_worker_rereads_its_remembered_key_after_the_budget_cache_time(
        emulator, db, sleeps, fid):
    """Worker A remembers key 1; another worker replaced the row with key 2 while key 1 stayed
    live upstream (its best-effort delete failed). Once the budget check's cache time has
    passed, A reads the row again and uses key 2: never two keys in use for one budget."""
    emulator.keys.management_keys.add(MGMT)
    valves = {"MANAGEMENT_API_KEY": MGMT, "BUDGET_USD": 5, "BUDGET_CHECK_CACHE_SECONDS": 0}
    a, b_ = make_pipe(emulator, db, sleeps, **valves), make_pipe(emulator, db, sleeps, **valves)
    try:
        assert (await chat(a, fid, who=user("u1"))).error is None
        first = next(iter(emulator.keys.keys.values()))
        with db.engine.begin() as conn:
            conn.execute(sa.text(f'DELETE FROM "{spend_table_name("keys", fid)}"'))
        assert (await chat(b_, fid, who=user("u1"))).error is None
        second = next(k for k in emulator.keys.keys.values() if k.hash != first.hash)
        assert first.hash in emulator.keys.keys  # still live upstream
        assert (await chat(a, fid, who=user("u1"))).error is None
        assert posts(emulator)[-1]["headers"]["Authorization"] == f"Bearer {second.secret}"
    finally:
        await a.close()
        await b_.close()


async def test_a_key_replaced_while_its_limit_is_sent_is_not_used_again(emulator, db, sleeps,
                                                                          fid):
    """The row changes between the limit PATCH and the table update (another worker dropped
    the key): the worker must not keep using a key the table no longer holds."""
    emulator.keys.management_keys.add(MGMT)
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5,
                  BUDGET_CHECK_CACHE_SECONDS=0)
    try:
        assert (await chat(p, fid, who=user("u1"))).error is None
        first = next(iter(emulator.keys.keys.values()))
        patch = p._spend.api.update_key

        async def patch_then_drop(*args):
            await patch(*args)
            with db.engine.begin() as conn:  # meanwhile, another worker drops the row
                conn.execute(sa.text(f'DELETE FROM "{spend_table_name("keys", fid)}"'))

        p._spend.api.update_key = patch_then_drop
        p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_USD": 7})
        assert (await chat(p, fid, who=user("u1"))).error is None
        with db.engine.begin() as conn:
            held = conn.execute(sa.text(
                f'SELECT key_hash FROM "{spend_table_name("keys", fid)}"')).scalar()
        used = posts(emulator)[-1]["headers"]["Authorization"]
        assert held != first.hash and used == f"Bearer {emulator.keys.keys[held].secret}"
    finally:
        await p.close()


async def _forget_ledger(p, db, fid):
    """Simulate a worker whose ledger lags: empty the table (OpenRouter still counts)."""
    with db.engine.begin() as conn:
        conn.execute(sa.text(f'DELETE FROM "{spend_table_name("spend", fid)}"'))


async def test_provisioned_key_limit_follows_budget_changes_and_departures(emulator, db, sleeps,
                                                                           fid):
    emulator.keys.management_keys.add(MGMT)
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
    assert (await chat(p, fid, who=user("u1"))).error is None
    key = next(iter(emulator.keys.keys.values()))
    assert (key.limit, key.limit_reset) == (5, "monthly")
    p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_OVERRIDES": "u1@example.com=7"})
    assert (await chat(p, fid, who=user("u1"))).error is None
    assert key.limit == 7 and len(emulator.keys.keys) == 1  # patched, not re-created
    patch = [r for r in emulator.requests if r["method"] == "PATCH"][-1]
    assert patch["json"] == {"limit": 7.0, "limit_reset": "monthly", "disabled": False}

    async def gone(uid):
        return None

    p._spend.users = gone
    await p._spend.refresh((await _turn(p, fid)).settings, fid)
    assert key.disabled  # the deleted user's key is disabled
    assert (await chat(p, fid, who=user("u1"))).error is None  # back: re-enabled
    assert not key.disabled
    await p.close()


async def test_a_user_who_loses_model_access_loses_the_budget_key(emulator, db, sleeps, fid):
    """MODEL_ACCESS=<group>: a member moved out of the group has their key disabled at the
    next background check; a failed group lookup never disables anyone's key."""
    emulator.keys.management_keys.add(MGMT)
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5,
                  MODEL_ACCESS="Team")
    member_of: dict[str, list[str]] = {"u1": ["team"]}

    async def users(uid):
        return {"id": uid, "role": "user"}

    async def groups(uid):
        if uid not in member_of:
            raise RuntimeError("database is locked")
        return member_of[uid]

    p._spend.users, p._spend.groups = users, groups
    assert (await chat(p, fid, who=user("u1"))).error is None
    key = next(iter(emulator.keys.keys.values()))
    settings = (await _turn(p, fid)).settings
    await p._spend.refresh(settings, fid)
    assert not key.disabled  # still in the group
    member_of.pop("u1")
    await p._spend.refresh(settings, fid)
    assert not key.disabled  # the lookup failed: keep the key rather than guess
    member_of["u1"] = ["Marketing"]
    await p._spend.refresh(settings, fid)
    assert key.disabled  # out of the group: no longer one of the pipe's users
    await p.close()


async def test_management_key_failure_falls_back_to_the_ledger_budget(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY="sk-or-not-management", BUDGET_USD=5)
    assert (await chat(p, fid)).error is None
    assert posts(emulator)[-1]["headers"]["Authorization"] == "Bearer sk-or-test"
    assert p._spend.errors["key_provisioning"] == 1
    await p.close()


# -- emulator contract: /key, /credits, /keys as the SDK models them ---------------------------


async def test_emulator_key_endpoints_match_the_sdk(emulator):
    import aiohttp

    emulator.keys.management_keys.add(MGMT)
    base, auth = emulator.base_url, {"Authorization": f"Bearer {MGMT}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/keys", headers=auth, json={
                "name": "u", "limit": 0.00001, "limit_reset": "daily"}) as r:
            created = await r.json()
            assert r.status == 201
        strict(createkeys.CreateKeysResponse, created)
        strict(createkeys.CreateKeysData, created["data"])
        h, secret = created["data"]["hash"], created["key"]
        async with http.get(f"{base}/keys/{h}", headers=auth) as r:
            strict(getkey.GetKeyData, (await r.json())["data"])
        async with http.get(f"{base}/keys", headers=auth) as r:
            strict(listkeys.ListData, (await r.json())["data"][0])
        async with http.get(f"{base}/credits", headers=auth) as r:
            strict(getcredits.GetCreditsData, (await r.json())["data"])
        user_auth = {"Authorization": f"Bearer {secret}"}
        async with http.get(f"{base}/key", headers=user_auth) as r:
            data = (await r.json())["data"]
        strict(getcurrentkey.GetCurrentKeyData, data)
        assert data["limit"] == 0.00001 and data["limit_reset"] == "daily"
        async with http.get(f"{base}/credits", headers=user_auth) as r:
            assert r.status == 403  # /credits needs a management key
        chat_body = {"model": GPT4O, "input": "hi", "stream": False}
        async with http.post(f"{base}/responses", headers=auth, json=chat_body) as r:
            assert r.status == 403  # management keys can't call inference
        async with http.post(f"{base}/responses", headers=user_auth, json=chat_body) as r:
            assert r.status == 200
        async with http.post(f"{base}/responses", headers=user_auth, json=chat_body) as r:
            assert r.status == 402  # the limit is reached: the key really stops
            assert "Key limit exceeded" in (await r.json())["error"]["message"]
        async with http.patch(f"{base}/keys/{h}", headers=auth, json={"limit": 10}) as r:
            strict(updatekeys.UpdateKeysData, (await r.json())["data"])
        async with http.post(f"{base}/responses", headers=user_auth, json=chat_body) as r:
            assert r.status == 200  # a raised limit lets it through again
        async with http.patch(f"{base}/keys/{h}", headers=auth, json={"bogus": 1}) as r:
            assert r.status == 400
        async with http.delete(f"{base}/keys/{h}", headers=auth) as r:
            assert (await r.json()) == {"deleted": True}


async def test_balance_in_health_and_low_credit_note_for_admins(emulator, db, sleeps, fid):
    emulator.keys.management_keys.add(MGMT)
    emulator.keys.total_credits = 3.0
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, LOW_CREDIT_WARNING_USD=5)
    health = await p.pipe(b(fid, "_health", "json", stream=False),
                          __user__=user("a", role="admin"))
    import json

    spend = json.loads(health)["spend"]
    assert spend["balance"]["credits"]["total_credits"] == 3.0
    assert spend["balance"]["key"]["label"].startswith("sk-or-test"[:11])
    assert spend["remaining_credit_usd"] == pytest.approx(3.0)
    report = await p.pipe(b(fid, "_health", "report", stream=False),
                          __user__=user("a", role="admin"))
    assert "- Spend: ledger ready" in report and "remaining credit $3.00" in report
    events = Events()
    await chat(p, fid, who=user("a", role="admin"), events=events)
    assert any("credit is low: $3.00 left" in s["description"] for s in events.of("status"))
    member_events = Events()
    await chat(p, fid, who=user("m"), events=member_events)
    assert not any("credit is low" in s["description"] for s in member_events.of("status"))
    await p.close()


# -- reports ---------------------------------------------------------------------------------


async def test_spend_reports_for_admins_and_my_usage_for_each_user(emulator, db, sleeps, fid):
    p = make_pipe(emulator, db, sleeps, BUDGET_USD=10, CURRENCY_NAME="EUR", CURRENCY_RATE=2)
    await chat(p, fid, who=user("alice"))
    await chat(p, fid, who=user("bob"))
    assert "_my_usage" in [m["id"] for m in await p.pipes()]
    admin = user("root", role="admin")
    report = await p.pipe(b(fid, "_health", "spend", stream=False),
                          __user__=admin)
    assert "alice" in report and "bob" in report and "EUR" in report and GPT4O in report
    as_csv = await p.pipe(b(fid, "_health", "spend csv", stream=False),
                          __user__=admin)
    rows = list(csv.DictReader(io.StringIO(as_csv.strip("`").removeprefix("csv\n"))))
    assert {r["user_id"] for r in rows} == {"alice", "bob"}
    with pytest.raises(Exception, match="admins only"):
        await p.pipe(b(fid, "_health", "spend csv", stream=False),
                     __user__=user("alice"))
    mine = await p.pipe(b(fid, "_my_usage", "", stream=False),
                        __user__=user("alice"))
    assert "Your OpenRouter usage" in mine and "of 20.00 EUR used this month" in mine
    assert "bob" not in mine
    streamed = await stream(p, b(fid, "_my_usage", "hi"),
                            __user__=user("bob"))
    assert "Your OpenRouter usage" in streamed.text and "alice" not in streamed.text
    await p.close()


# -- exact under several workers: real PostgreSQL ---------------------------------------------


@pytest.mark.skipif(not pg_available(), reason="PostgreSQL is not running")
async def test_concurrent_writers_lose_no_increment_on_postgres(fid):
    from openrouter_responses_pipe import LedgerEntry, SpendLedger

    engine = sa.create_engine(PG_URL, pool_size=10)
    name = spend_table_name("spend", fid)
    try:
        ledgers = [SpendLedger(SyncEngineRunner(engine), name) for _ in range(4)]  # 4 workers

        async def writer(ledger, i):
            for _ in range(25):
                await ledger.add([LedgerEntry("u1", "2027-01-01", GPT4O, KEY_PIPE, 0.25),
                                  LedgerEntry("u1", "2027-01-01", GPT4O, KEY_PIPE, 0.25)], 0)

        await asyncio.gather(*(writer(lg, i) for i, lg in enumerate(ledgers * 2)))
        from datetime import date

        spent = await ledgers[0].budget_spent("u1", date(2027, 1, 1), date(2027, 2, 1))
        assert spent == pytest.approx(8 * 25 * 0.5)
        [entry] = await ledgers[0].entries(date(2027, 1, 1), date(2027, 2, 1))
        assert entry.requests == 8 * 25 * 2
    finally:
        engine.dispose()
        drop_table(name)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
async def test_ledger_on_every_backend(backend, tmp_path, fid):
    if backend.startswith("postgres") and not pg_available():
        pytest.skip("PostgreSQL is not running")
    from datetime import date

    from openrouter_responses_pipe import LedgerEntry, SpendLedger

    runner, close = BACKENDS[backend](tmp_path)
    name = spend_table_name("spend", fid)
    try:
        ledger = SpendLedger(runner, name)
        await asyncio.gather(*(ledger.add([LedgerEntry("u", "2027-01-31", "m", KEY_PIPE, 1.0),
                                           LedgerEntry("u", "2027-02-01", "m", KEY_OWN, 5.0)],
                                          0) for _ in range(5)))
        assert await ledger.budget_spent("u", date(2027, 1, 1), date(2027, 2, 1)) == 5.0
        assert await ledger.budget_spent("u", date(2027, 2, 1), date(2027, 3, 1)) == 0.0
        assert len(await ledger.entries(date(2027, 1, 1), date(2027, 3, 1), "u")) == 2
    finally:
        close()
        if backend.startswith("postgres"):
            drop_table(name)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
async def test_only_the_first_stored_key_is_kept_on_every_backend(backend, tmp_path, fid):
    """KeyVault.put_first: of two workers' first keys for one user, the first stored wins and
    both read it back (the loser deletes its own upstream)."""
    if backend.startswith("postgres") and not pg_available():
        pytest.skip("PostgreSQL is not running")
    from openrouter_responses_pipe import KeyVault, VaultKey

    runner, close = BACKENDS[backend](tmp_path)
    name = spend_table_name("keys", fid)
    try:
        vault = KeyVault(runner, name)
        first = VaultKey("u", "hash-a", "encrypted:a", 5.0, "monthly", False)
        second = VaultKey("u", "hash-b", "encrypted:b", 5.0, "monthly", False)
        assert await vault.put_first(first, 1.0) == first
        assert await vault.put_first(second, 2.0) == first
        assert await vault.all() == [first]
        # the winner's row dropped between our insert and our read: ours is stored, not lost
        dropping = DropAfterNextRun(runner, vault)
        vault.db.runner = dropping
        assert await vault.put_first(second, 3.0) == second
        assert await vault.all() == [second] and dropping.dropped
    finally:
        close()
        if backend.startswith("postgres"):
            drop_table(name)


@pytest.mark.skipif(not pg_available(), reason="PostgreSQL is not running")
async def test_two_workers_on_postgres_record_every_turn(emulator, sleeps, fid):
    """Two Pipe instances (two workers) share one PostgreSQL ledger: no turn is lost."""
    engine = sa.create_engine(PG_URL, pool_size=10)
    workers = [make_pipe(emulator, SyncEngineRunner(engine), sleeps,
                         MAX_CONCURRENT_REQUESTS_PER_USER=20, BUDGET_USD=1000)
               for _ in range(2)]
    try:
        chats = [stream(w, b(fid, GPT4O, f"turn {i}"), __user__=user("u1"))
                 for i in range(12) for w in workers]
        results = await asyncio.gather(*chats)
        assert all(r.error is None for r in results)
        for w in workers:
            await w._spend.drain()
        with engine.begin() as conn:
            row = conn.execute(sa.text(
                f'SELECT requests, cost FROM "{spend_table_name("spend", fid)}"')).one()
        assert row.requests == 24
        assert row.cost == pytest.approx(sum(r["usage"]["cost"] for r in emulator.responses))
    finally:
        for w in workers:
            await w.close()
        engine.dispose()
        drop_table(spend_table_name("spend", fid))


# -- stopped answers, unusable provisioned keys, background logs (review fixes) ------------


async def short_sleep(seconds):
    """Real but short waits: the emulator must see the client go away between lookups."""
    await asyncio.sleep(min(seconds, 0.05))


async def stopped_turn(p, fid, who=None, text="[emu:slow delay_ms=40 deltas=30] long answer"):
    """The browser's Stop (or an API client going away) after the first text chunk."""
    gen = await p.pipe(b(fid, GPT4O, text), __user__=who or user())
    seen = []
    async for chunk in gen:
        seen.append(chunk)
        if "error" in chunk or (chunk.get("choices") and
                                chunk["choices"][0]["delta"].get("content")):
            break
    await gen.aclose()
    await p._spend.drain()
    return seen


async def test_a_stopped_answer_is_billed_and_the_budget_still_stops(emulator, db, fid):
    p = make_pipe(emulator, db, short_sleep, BUDGET_USD=100, BUDGET_CHECK_CACHE_SECONDS=0)
    await stopped_turn(p, fid)
    gen = next(iter(emulator.generations.values()))
    assert gen["cancelled"] is True and 0 < gen["total_cost"] < emulator.responses[0][
        "usage"]["cost"]  # OpenRouter bills the prompt and what was streamed
    [row] = ledger_rows(db, fid)
    assert row["requests"] == 1 and row["cost"] == pytest.approx(gen["total_cost"])
    lookups = [r for r in emulator.requests if r["path"].endswith("/generation")]
    assert lookups and lookups[-1]["headers"]["Authorization"] == "Bearer sk-or-test"
    # a budget of 2.5 stopped answers: the fourth is refused, nothing more is sent
    p.valves = p.Valves(**{**p.valves.model_dump(), "BUDGET_USD": gen["total_cost"] * 2.5})
    results = [await stopped_turn(p, fid) for _ in range(3)]
    assert not any("error" in c for c in results[0] + results[1])
    assert "budget is used up" in results[2][-1]["error"]["message"]
    assert len(posts(emulator)) == 3
    await p.close()


async def test_a_stop_that_cancels_the_task_is_billed_and_cancellation_goes_on(
        emulator, db, fid):
    """Open WebUI's Stop button cancels the task that reads the stream (CancelledError)."""
    p = make_pipe(emulator, db, short_sleep)
    first = asyncio.Event()

    async def read():
        gen = await p.pipe(b(fid, GPT4O, "[emu:slow delay_ms=40 deltas=30] long"),
                           __user__=user())
        async for chunk in gen:
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p._spend.drain()
    [row] = ledger_rows(db, fid)
    [gen] = emulator.generations.values()
    assert gen["cancelled"] and row["requests"] == 1
    assert row["cost"] == pytest.approx(gen["total_cost"]) and row["cost"] > 0
    await p.close()


async def test_a_stopped_answer_without_a_generation_record_records_the_estimate(
        emulator, db, fid):
    p = make_pipe(emulator, db, short_sleep)

    async def unknown(settings, generation_id):  # OpenRouter never stored the record
        return None

    p._spend.api.generation_cost = unknown
    await stopped_turn(p, fid, text="[emu:slow delay_ms=40 deltas=30] " + "word " * 400)
    [row] = ledger_rows(db, fid)
    price = emulator.catalog[GPT4O]["pricing"]
    assert row["requests"] == 1 and row["cost"] >= 400 * 5 / 4 * float(price["prompt"])
    assert p._spend.errors["generation_lookup"] == 1
    await p.close()


async def test_a_stopped_answers_estimate_grows_with_the_text_it_showed(emulator, db):
    """Without a generation record, the estimate is the prompt plus what was shown: stopping
    later (more text on screen) costs more, by the completion price of that text."""
    async def unknown(settings, generation_id):
        return None

    costs, shown = [], []
    for chunks in (1, 12):
        fid = f"t{uuid.uuid4().hex[:10]}"
        p = make_pipe(emulator, db, short_sleep)
        p._spend.api.generation_cost = unknown
        gen = await p.pipe(b(fid, GPT4O, "[emu:slow delay_ms=20 deltas=40] go"), __user__=user())
        text = ""
        async for chunk in gen:
            if chunk.get("choices") and (piece := chunk["choices"][0]["delta"].get("content")):
                text += piece
                chunks -= 1
                if not chunks:
                    break
        await gen.aclose()
        await p._spend.drain()
        [row] = ledger_rows(db, fid)
        costs.append(row["cost"])
        shown.append(len(text))
        await p.close()
    completion = float(emulator.catalog[GPT4O]["pricing"]["completion"])
    assert shown[1] > shown[0]
    assert costs[1] - costs[0] == pytest.approx((shown[1] - shown[0]) / 4 * completion)


async def test_a_cancelled_task_is_recorded_and_cancellation_goes_on(emulator, db, fid):
    p = make_pipe(emulator, db, short_sleep)
    body = b(fid, GPT4O, "[emu:text first_byte_delay_ms=5000] title please", stream=False)
    task = asyncio.create_task(p.pipe(body, __user__=user(), __task__="title_generation"))
    for _ in range(500):  # until the request reached OpenRouter
        if posts(emulator):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p._spend.drain()
    [row] = ledger_rows(db, fid)
    assert row["requests"] == 1 and row["cost"] > 0  # the prompt's estimate
    await p.close()


async def test_a_task_cancelled_after_its_usage_was_recorded_is_charged_once(emulator, db,
                                                                              fid):
    p = make_pipe(emulator, db, short_sleep)
    tidying = asyncio.Event()

    async def slow_after_turn(turn, plan):  # the answer (with usage) is back; still tidying
        tidying.set()
        await asyncio.sleep(30)

    p._after_turn = slow_after_turn
    body = b(fid, GPT4O, "title please", stream=False)
    task = asyncio.create_task(p.pipe(body, __user__=user(), __task__="title_generation"))
    await asyncio.wait_for(tidying.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p._spend.drain()
    [row] = ledger_rows(db, fid)
    assert len(posts(emulator)) == 1
    assert row["requests"] == 1 and row["output_tokens"] > 0  # the real usage, no estimate
    await p.close()


async def test_a_task_cancelled_while_waiting_to_retry_a_429_is_not_charged(emulator, db,
                                                                            fid):
    waiting = asyncio.Event()

    async def retry_wait(seconds):  # the pipe waits to retry after OpenRouter's 429
        waiting.set()
        await asyncio.sleep(30)

    p = make_pipe(emulator, db, retry_wait)
    body = b(fid, GPT4O, "[emu:http_error status=429 retry_after=5] title please",
             stream=False)
    task = asyncio.create_task(p.pipe(body, __user__=user(), __task__="title_generation"))
    await asyncio.wait_for(waiting.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p._spend.drain()
    assert len(posts(emulator)) == 1
    assert ledger_rows(db, fid) == []  # a 429 is never billed, nor is the wait
    await p.close()


async def test_an_undecryptable_provisioned_key_is_replaced(emulator, db, sleeps, fid,
                                                            monkeypatch):
    emulator.keys.management_keys.add(MGMT)
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
    assert (await chat(p, fid)).error is None
    [old] = emulator.keys.keys.values()
    await p.close()
    monkeypatch.setenv("WEBUI_SECRET_KEY", "rotated-secret")  # the admin changed the secret
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
    out = await chat(p, fid)
    assert out.error is None and out.text  # this turn: the pipe's key, the ledger budget
    assert posts(emulator)[-1]["headers"]["Authorization"] == "Bearer sk-or-test"
    assert old.hash not in emulator.keys.keys  # the unreadable key was deleted on OpenRouter
    assert (await chat(p, fid)).error is None  # the next turn: a fresh budget key
    [new] = emulator.keys.keys.values()
    assert new.hash != old.hash
    assert posts(emulator)[-1]["headers"]["Authorization"] == f"Bearer {new.secret}"
    await p.close()


async def test_a_deleted_provisioned_key_is_named_then_replaced(emulator, db, sleeps, fid):
    emulator.keys.management_keys.add(MGMT)
    emulator.api_keys = {"sk-or-test"}
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
    assert (await chat(p, fid)).error is None
    [old] = emulator.keys.keys.values()
    del emulator.keys.keys[old.hash]  # deleted in OpenRouter's dashboard
    del emulator.keys.by_secret[old.secret]
    out = await chat(p, fid)
    assert "Your budget key" in out.error and "HTTP 401" in out.error
    assert "API_KEY" not in out.error.replace("MANAGEMENT_API_KEY", "")
    again = await chat(p, fid)
    assert again.error is None and again.text
    [new] = emulator.keys.keys.values()
    assert posts(emulator)[-1]["headers"]["Authorization"] == f"Bearer {new.secret}"
    # a worker that starts now reads the new key, not the deleted one
    p2 = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5)
    assert (await chat(p2, fid)).error is None
    await p.close()
    await p2.close()


async def test_background_work_writes_nothing_into_a_users_log(emulator, db, sleeps, fid):
    emulator.keys.management_keys.add(MGMT)
    p = make_pipe(emulator, db, sleeps, MANAGEMENT_API_KEY=MGMT, BUDGET_USD=5,
                  BALANCE_REFRESH_SECONDS=30)
    victim = "victim-user-7f3a"
    assert (await chat(p, fid, who=user(victim))).error is None

    async def users(uid):  # the victim's account was deleted in Open WebUI
        return None if uid == victim else {"id": uid, "email": "", "role": "user"}

    p._spend.users = users
    p._spend._balance_due = 0  # the next turn starts a balance refresh
    events = Events()
    out = await chat(p, fid, "[emu:mid_stream_failure delay_ms=50] hello",
                     who=user("member"), events=events)
    assert out.error or "interrupted" in out.text.lower() or out.text
    [key] = [k for k in emulator.keys.keys.values() if k.name.endswith(victim + "@example.com")]
    assert key.disabled  # the refresh ran during the member's turn
    cites = [e for e in events.events if e["type"] in ("citation", "source")]
    assert cites and "Pipe log" in repr(cites)
    assert victim not in repr(cites) and "Disabled" not in repr(cites)
    await p.close()


async def test_emulator_generation_records_match_the_sdk(emulator):
    import aiohttp
    from openrouter.components.generationresponse import (
        GenerationResponse,
        GenerationResponseData,
    )

    auth = {"Authorization": "Bearer sk-or-test"}
    url = f"{emulator.base_url}/generation"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{emulator.base_url}/responses", headers=auth, json={
                "model": GPT4O, "input": "hi", "stream": False}) as r:
            done, gen_id = await r.json(), r.headers["X-Generation-Id"]
        async with http.get(url, params={"id": gen_id}, headers=auth) as r:
            record = await r.json()
        strict(GenerationResponse, record)
        strict(GenerationResponseData, record["data"])
        assert record["data"]["total_cost"] == done["usage"]["cost"]
        async with http.post(f"{emulator.base_url}/responses", headers={
                **auth, "X-Emulator-Scenario": "slow delay_ms=50 deltas=20"},
                json={"model": GPT4O, "input": "hi", "stream": True}) as r:
            live_id = r.headers["X-Generation-Id"]
            await r.content.readuntil(b"output_text.delta")
            async with http.get(url, params={"id": live_id}, headers=auth) as live:
                assert live.status == 404  # written when the generation ends
        for _ in range(100):
            if live_id not in emulator.live_generations:
                break
            await asyncio.sleep(0.02)
        async with http.get(url, params={"id": live_id}, headers=auth) as r:
            stopped = (await r.json())["data"]
    strict(GenerationResponseData, stopped)
    full = emulator.responses[-1]["usage"]["cost"]
    assert stopped["cancelled"] is True and 0 < stopped["total_cost"] < full
    assert emulator.keys.total_usage == pytest.approx(done["usage"]["cost"]
                                                      + stopped["total_cost"])
