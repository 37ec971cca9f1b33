"""Spend control in a real Open WebUI with an ordinary user (issue #13): the ledger after a
chat, the warning note, the refusal over budget, a user's own key, the CSV report."""

from __future__ import annotations

import csv
import io

import pytest
from owui_harness import OpenWebUIError, stored_message

GPT4O = "openai/gpt-4o"
MEMBER_EMAIL = "member@example.com"


@pytest.fixture
def valves(owui):
    """Pipe valves for one test (the full set is posted); restored afterwards. MODEL_ACCESS=all
    lets members use the models once the team-access work (issue #10) is merged; until then
    `share` gives the member a public model record."""
    original = owui.client.get_valves("openrouter")

    def set_(**changes):
        owui.client.update_valves("openrouter", {**original, "MODEL_ACCESS": "all", **changes})

    set_()
    share(owui, owui.model(GPT4O), "GPT-4o")
    share(owui, owui.model("_my_usage"), "OpenRouter: my usage")
    yield set_
    owui.client.update_valves("openrouter", original)


def share(owui, model_id: str, name: str) -> None:
    """A model record readable by every user (0.12: access grant `*`; 0.6: no access control)."""
    body = {"id": model_id, "name": name, "base_model_id": None, "meta": {}, "params": {},
            "access_control": None,
            "access_grants": [{"principal_type": "user", "principal_id": "*",
                               "permission": "read"}]}
    try:
        owui.client.request("POST", "/api/v1/models/create", json=body)
    except OpenWebUIError as exc:  # already there (an earlier test, or issue #10's sync)
        if "already registered" not in str(exc).lower() and "exist" not in str(exc).lower():
            raise


def report_rows(owui) -> list[dict]:
    status, body = owui.client.chat(owui.model("_health"),
                                    [{"role": "user", "content": "spend csv"}], stream=False)
    assert status == 200, body
    text = body["choices"][0]["message"]["content"]
    assert text.startswith("```csv\n"), text
    return list(csv.DictReader(io.StringIO(text.removeprefix("```csv\n").removesuffix("```"))))


def member_spent(owui) -> float:
    return sum(float(r["cost_usd"]) for r in report_rows(owui)
               if r["user_id"] == owui.member.user_id and r["period"] == "current"
               and r["key"] != "own")


def final_status(msg: dict) -> str:
    done = [s for s in msg.get("statusHistory") or [] if s.get("done")]
    return done[-1]["description"] if done else ""


def test_members_spend_is_recorded_and_shown_only_to_them(owui, valves):
    valves(BUDGET_USD=100)
    before = member_spent(owui)
    msg = stored_message(owui.member.chat_ui(owui.model(GPT4O), "What does it cost?"))
    assert not msg.get("error"), msg
    cost = (msg.get("usage") or {}).get("cost")
    assert cost and cost > 0, msg
    assert "you: $" in final_status(msg) and "of $100.00 this month" in final_status(msg)
    # the chat and its tasks (title, tags, follow-ups) are all the member's spend
    assert member_spent(owui) >= before + cost * 0.999
    status, body = owui.member.chat(owui.model("_my_usage"),
                                    [{"role": "user", "content": "my usage"}], stream=False)
    assert status == 200, body
    mine = body["choices"][0]["message"]["content"]
    assert "Your OpenRouter usage" in mine and "of $100.00 used this month" in mine
    assert "admin@example.com" not in mine  # never anyone else's spend
    status, body = owui.member.chat(owui.model("_health"),
                                    [{"role": "user", "content": "spend csv"}], stream=False)
    assert status != 200 or "admins only" in str(body), body


def test_warning_note_then_refusal_over_budget(owui, valves):
    valves(BUDGET_CHECK_CACHE_SECONDS=0)
    stored_message(owui.member.chat_ui(owui.model(GPT4O), "probe"))
    spent = member_spent(owui)
    # far under this budget but over its 1% warning threshold
    valves(BUDGET_OVERRIDES=f"{MEMBER_EMAIL}={spent * 50:.10f}", BUDGET_WARN_PERCENT=1,
           BUDGET_CHECK_CACHE_SECONDS=0)
    warned = stored_message(owui.member.chat_ui(owui.model(GPT4O), "one more"))
    assert not warned.get("error"), warned
    notes = [s.get("description", "") for s in warned.get("statusHistory") or []]
    assert any(n.endswith("used this month") and " of $" in n for n in notes), notes
    # a budget below what the member has spent: refused before anything is sent
    valves(BUDGET_OVERRIDES=f"{MEMBER_EMAIL}={member_spent(owui) * 0.9:.10f}",
           BUDGET_CHECK_CACHE_SECONDS=0)
    since = len(owui.emulator.requests)
    status, body = owui.member.chat(owui.model(GPT4O), [{"role": "user", "content": "over"}],
                                    stream=False)
    text = str(body)
    assert "budget is used up" in text and "resets on 1 " in text, (status, body)
    assert not [r for r in owui.emulator.requests[since:] if r["path"].endswith("/responses")]
    # the admin is exempt and still chats
    admin = stored_message(owui.client.chat_ui(owui.model(GPT4O), "admin still works"))
    assert not admin.get("error"), admin


def test_users_own_key_is_used_for_that_user_only_and_stored_encrypted(owui, valves):
    valves(BUDGET_USD=0)
    saved = owui.member.update_user_valves("openrouter", {"API_KEY": "sk-or-Member-Own-Key"})
    try:
        stored = owui.member.request("GET", "/api/v1/functions/id/openrouter/valves/user").json()
        assert stored["API_KEY"].startswith("encrypted:"), stored
        assert "Member-Own-Key" not in str(stored) and "Member-Own-Key" not in str(saved)
        since = len(owui.emulator.requests)
        msg = stored_message(owui.member.chat_ui(owui.model(GPT4O), "on my own key"))
        assert not msg.get("error"), msg
        assert "billed to your own key" in final_status(msg)
        stored_message(owui.client.chat_ui(owui.model(GPT4O), "admin on the shared key"))
        sent = [r for r in owui.emulator.requests[since:]
                if r["path"].endswith("/responses") and r["method"] == "POST"]
        mine = {r["headers"].get("Authorization") for r in sent
                if "on my own key" in str(r["json"])}
        admins = {r["headers"].get("Authorization") for r in sent
                  if "admin on the shared key" in str(r["json"])}
        assert mine == {"Bearer sk-or-Member-Own-Key"}, mine
        assert admins == {"Bearer sk-or-emulator"}, admins
        own_rows = [r for r in report_rows(owui)
                    if r["user_id"] == owui.member.user_id and r["key"] == "own"]
        assert own_rows and float(own_rows[0]["cost_usd"]) > 0
        assert "Member-Own-Key" not in owui.server.log_tail(400)
    finally:
        owui.member.update_user_valves("openrouter", {"API_KEY": ""})


def test_admin_downloads_the_spend_report_as_csv(owui, valves):
    valves()
    stored_message(owui.member.chat_ui(owui.model(GPT4O), "for the report"))
    rows = report_rows(owui)
    member = [r for r in rows if r["user_id"] == owui.member.user_id
              and r["model"] == GPT4O and r["period"] == "current"]
    assert member and member[0]["user"] == MEMBER_EMAIL
    assert int(member[0]["requests"]) >= 1 and float(member[0]["cost_usd"]) > 0
    status, body = owui.client.chat(owui.model("_health"),
                                    [{"role": "user", "content": "spend"}], stream=False)
    assert status == 200, body
    report = body["choices"][0]["message"]["content"]
    assert "OpenRouter spend" in report and MEMBER_EMAIL in report


def test_management_key_gives_the_member_a_key_openrouter_caps(owui, valves):
    management = "sk-or-e2e-management"
    emu = owui.emulator
    emu._run(lambda: emu.emulator.keys.management_keys.add(management))
    spent = member_spent(owui)
    valves(MANAGEMENT_API_KEY=management, BUDGET_USD=spent + 5, BUDGET_PERIOD="weekly")
    since = len(emu.requests)
    msg = stored_message(owui.member.chat_ui(owui.model(GPT4O), "on my budget key"))
    assert not msg.get("error"), msg
    sent = emu.requests[since:]
    created = [r for r in sent if r["method"] == "POST" and r["path"].endswith("/keys")]
    assert len(created) == 1, created
    assert created[0]["json"]["limit"] == pytest.approx(spent + 5)
    assert created[0]["json"]["limit_reset"] == "weekly"
    secrets = emu._run(lambda: [k.secret for k in emu.emulator.keys.keys.values()])
    chats = {r["headers"].get("Authorization") for r in sent
             if r["path"].endswith("/responses") and "on my budget key" in str(r["json"])}
    assert chats == {f"Bearer {secrets[-1]}"}, chats
    assert secrets[-1] not in owui.server.log_tail(400)
    # OpenRouter's refusal of an exhausted budget key reads as the member's budget
    newest = secrets[-1]  # (the emulator is shared by every Open WebUI version's run)
    emu._run(lambda: [setattr(k, "limit", 0.0) for k in emu.emulator.keys.keys.values()
                      if k.secret == newest])
    status, body = owui.member.chat(owui.model(GPT4O), [{"role": "user", "content": "more"}],
                                    stream=False)
    assert "not the account's credit" in str(body), (status, body)
