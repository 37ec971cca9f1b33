"""Spend control (issue #13): periods in UTC, budget precedence, the words users read, CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    KEY_OWN,
    KEY_PIPE,
    KEY_PROVISIONED,
    Budget,
    BudgetExceeded,
    BudgetState,
    KeyLimitError,
    LedgerEntry,
    Pricing,
    RequestSettings,
    SpendSettings,
    UpstreamStatusError,
    Usage,
    UserValves,
    Valves,
    attribute_key_error,
    describe_error,
    estimate_prompt_tokens,
    ledger_entry,
    merge_entries,
    money,
    next_period_start,
    parse_overrides,
    period_start,
    previous_period_start,
    refusal,
    report_rows,
    resolve_budget,
    spend_csv,
    status_suffix,
    unfinished_estimate,
    usage_note,
    utc_day,
)

D = date.fromisoformat


@pytest.mark.parametrize(("period", "day", "start", "reset", "previous"), [
    ("monthly", "2027-01-31", "2027-01-01", "2027-02-01", "2026-12-01"),
    ("monthly", "2026-12-31", "2026-12-01", "2027-01-01", "2026-11-01"),
    ("monthly", "2028-02-29", "2028-02-01", "2028-03-01", "2028-01-01"),  # leap day
    ("monthly", "2027-03-01", "2027-03-01", "2027-04-01", "2027-02-01"),
    ("weekly", "2027-01-03", "2026-12-28", "2027-01-04", "2026-12-21"),   # Sunday -> Monday
    ("weekly", "2027-01-04", "2027-01-04", "2027-01-11", "2026-12-28"),   # Monday itself
    ("weekly", "2028-03-01", "2028-02-28", "2028-03-06", "2028-02-21"),   # across a leap Feb
    ("daily", "2028-02-29", "2028-02-29", "2028-03-01", "2028-02-28"),
    ("daily", "2026-12-31", "2026-12-31", "2027-01-01", "2026-12-30"),
])
def test_calendar_periods_in_utc(period, day, start, reset, previous):
    assert period_start(period, D(day)) == D(start)
    assert next_period_start(period, D(day)) == D(reset)
    assert previous_period_start(period, D(day)) == D(previous)


def test_utc_midnight_decides_the_day_not_local_time():
    just_before = datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    assert utc_day(just_before) == D("2027-01-31")
    assert utc_day(just_before + 1) == D("2027-02-01")
    assert period_start("monthly", utc_day(just_before + 1)) == D("2027-02-01")


@given(st.dates(min_value=D("1970-01-01"), max_value=D("9998-12-01")),
       st.sampled_from(["daily", "weekly", "monthly"]))
def test_periods_contain_the_day_and_tile(day, period):
    start, end = period_start(period, day), next_period_start(period, day)
    assert start <= day < end
    assert period_start(period, end) == end  # the next period starts where this one ends
    assert next_period_start(period, previous_period_start(period, day)) == start


def settings(**kw) -> SpendSettings:
    overrides, bad = parse_overrides(kw.pop("overrides", ""))
    assert not bad
    return SpendSettings(overrides=overrides, **kw)


@pytest.mark.parametrize(("kw", "user", "email", "role", "groups", "want"), [
    ({"budget_usd": 10}, "u1", "a@x.org", "user", [], Budget(10, "default")),
    ({"budget_usd": 10, "overrides": "A@X.org=25"}, "u1", "a@x.org", "user", [],
     Budget(25, "your own budget")),
    ({"budget_usd": 10, "overrides": "u1=3, a@x.org=25"}, "u1", "a@x.org", "user", [],
     Budget(3, "your own budget")),   # the id entry is looked at first
    ({"budget_usd": 10, "overrides": "group:Research=50, group:Ops=20"}, "u1", "", "user",
     ["Ops", "research"], Budget(50, "group research")),   # highest group wins
    ({"budget_usd": 10, "overrides": "group:Ops=20, u1=2"}, "u1", "", "user", ["Ops"],
     Budget(2, "your own budget")),   # a user entry beats every group
    ({"budget_usd": 10, "overrides": "group:Ops=unlimited, group:B=5"}, "u1", "", "user",
     ["B", "Ops"], Budget(None, "group Ops")),
    ({"budget_usd": 10, "overrides": "u1=0"}, "u1", "", "user", [], Budget(0, "your own budget")),
    ({"budget_usd": 10}, "u1", "", "admin", [], Budget(None, "admin (exempt)")),
    ({"budget_usd": 10, "exempt_admins": False}, "u1", "", "admin", [], Budget(10, "default")),
    ({}, "u1", "", "user", [], Budget(None, "default")),
])
def test_override_precedence(kw, user, email, role, groups, want):
    assert resolve_budget(settings(**kw), user, email, role, groups) == want


def test_unreadable_override_entries_are_reported_not_guessed():
    overrides, bad = parse_overrides("a@x.org=5, oops, b=-3, group:=4, c=abc, d=unlimited")
    assert dict(overrides.users) == {"a@x.org": 5.0, "d": None}
    assert bad == ["oops", "b=-3", "group:=4", "c=abc"]


@given(st.text(max_size=200))
def test_override_parser_never_raises(text):
    overrides, _bad = parse_overrides(text)
    assert all(v is None or v >= 0 for v in overrides.users.values())


def state(spent, limit, period="monthly", resets="2027-02-01"):
    return BudgetState(Budget(limit, "default"), spent, period, D(resets))


def test_threshold_note_and_warning_edge():
    s = SpendSettings()
    assert usage_note(state(8.1, 10.0), s) == "$8.10 of $10.00 used this month"
    assert usage_note(state(0.5, None, "weekly"), s) == "$0.50 spent this week"
    assert state(8.0, 10.0).warn(80) and not state(7.99, 10.0).warn(80)
    assert state(10.0, 10.0).over and not state(9.999, 10.0).over
    assert state(0.0, 0.0).over  # a zero budget refuses every chat
    assert not state(1e9, None).over


def test_refusal_says_limit_spent_and_reset():
    err = refusal(state(10.42, 10.0), SpendSettings())
    assert isinstance(err, BudgetExceeded)
    text = describe_error(err)
    assert "$10.00 a month" in text and "$10.42 this month" in text
    assert "1 February 2027, 00:00 UTC" in text and "Nothing was sent" in text


def test_currency_is_display_only():
    s = SpendSettings(currency="EUR", rate=0.9)
    assert usage_note(state(10.0, 20.0, "daily"), s) == "9.00 EUR of 18.00 EUR used today"
    assert money(0.0012) == "$0.0012" and money(0) == "$0.00" and money(1234.5) == "$1,234.50"


def test_status_suffix():
    s = SpendSettings(state=state(1.0, 10.0))
    assert status_suffix(s, 0.5) == " · you: $1.50 of $10.00 this month, $8.50 left"
    assert status_suffix(SpendSettings(state=state(1.0, None)), None) == " · you: $1.00 this month"
    assert status_suffix(SpendSettings(state=state(1.0, 10.0), show_in_status=False), 1) == ""
    assert status_suffix(SpendSettings(key_source=KEY_OWN, state=state(1, 2)), 1) == \
        " · billed to your own key"


def err(status):
    return UpstreamStatusError(status=status, provider_message="Key limit exceeded")


def test_key_errors_name_the_users_key_not_the_account():
    own = attribute_key_error(err(402), SpendSettings(key_source=KEY_OWN))
    assert isinstance(own, KeyLimitError) and "Your own OpenRouter key" in str(own)
    assert "out of credits" in str(own)
    assert "rejected" in str(attribute_key_error(err(401), SpendSettings(key_source=KEY_OWN)))
    prov = attribute_key_error(err(402), SpendSettings(key_source=KEY_PROVISIONED,
                                                       state=state(5, 5)))
    assert "your own budget, not the account's credit" in str(prov)
    assert "$5.00 a month" in str(prov)
    gone = attribute_key_error(err(401), SpendSettings(key_source=KEY_PROVISIONED,
                                                       state=state(5, 1)))
    assert isinstance(gone, KeyLimitError) and "Your budget key" in str(gone)
    assert "a new one is made for your next message" in str(gone)
    assert "check API_KEY" not in describe_error(gone)
    shared = err(402)
    assert attribute_key_error(shared, SpendSettings(key_source=KEY_PIPE)) is shared
    assert "out of credits" in describe_error(shared)  # the account's credit, as before


def test_ledger_entries_merge_and_ignore_nothing_billed():
    assert ledger_entry("u", "m", KEY_PIPE, Usage(), 0) is None
    e = ledger_entry("u", "m", KEY_PIPE, Usage(10, 5, cost=0.25, byok_cost=0.5),
                     datetime(2027, 1, 31, 23, 59, tzinfo=UTC).timestamp())
    assert e == LedgerEntry("u", "2027-01-31", "m", KEY_PIPE, 0.25, 0.5, 1, 10, 5)
    merged = merge_entries([e, e, LedgerEntry("u", "2027-01-31", "m", KEY_OWN, 1.0)])
    assert [(m.key_source, m.cost, m.requests) for m in merged] == [
        (KEY_PIPE, 0.5, 2), (KEY_OWN, 1.0, 1)]


def test_usage_reads_byok_upstream_cost():
    raw = {"input_tokens": 1, "output_tokens": 1, "cost": 0.001, "is_byok": True,
           "cost_details": {"upstream_inference_cost": 0.02}}
    assert Usage.from_json(raw).byok_cost == 0.02
    assert Usage.from_json({**raw, "is_byok": False}).byok_cost == 0.0


def test_csv_report_rows_and_formula_cells():
    entries = [LedgerEntry("u1", "2027-01-05", "openai/gpt-4o", KEY_PIPE, 0.5),
               LedgerEntry("u1", "2027-01-06", "openai/gpt-4o", KEY_PIPE, 0.25),
               LedgerEntry("u2", "2026-12-30", "=cmd", KEY_OWN, 1.0)]
    rows = report_rows(entries, "monthly", D("2027-01-10"), {"u1": "a@x.org"})
    parsed = list(csv.DictReader(io.StringIO(spend_csv(rows))))
    assert [(r["period"], r["user"], r["model"], r["key"], r["cost_usd"], r["requests"])
            for r in parsed] == [("current", "a@x.org", "openai/gpt-4o", "pipe", "0.75", "2"),
                                 ("previous", "", "'=cmd", "own", "1", "1")]


def test_user_key_valve_is_stored_encrypted_and_kept_verbatim(monkeypatch):
    monkeypatch.setenv("WEBUI_SECRET_KEY", "unit-secret")
    uv = UserValves(API_KEY="sk-or-MixedCase-Key")
    stored = uv.model_dump()["API_KEY"]
    assert stored.startswith("encrypted:") and "MixedCase" not in stored
    assert UserValves.model_validate(uv.model_dump()).API_KEY == stored  # re-save keeps it
    merged = RequestSettings.merge(Valves(), uv)
    assert merged.spend.user_key == "sk-or-MixedCase-Key"
    assert RequestSettings.merge(Valves(ALLOW_USER_API_KEYS=False), uv).spend.user_key == ""
    assert "MixedCase" not in repr(uv)


@pytest.mark.parametrize(("payload", "tokens"), [
    ({"input": "x" * 400}, 100),
    ({"instructions": "y" * 40, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "z" * 40},
        {"type": "input_file", "file_data": "data:application/pdf;base64," + "A" * 10**6},
        {"type": "input_image", "image_url": "data:image/png;base64," + "B" * 10**6}]}]}, 20),
    ({"input": [{"type": "function_call_output", "output": "o" * 80}]}, 20),
    ({}, 0),
])
def test_prompt_estimate_counts_text_not_inline_files(payload, tokens):
    assert estimate_prompt_tokens(payload) == tokens


def test_a_stopped_rounds_estimate_uses_catalog_prices():
    price = Pricing(prompt=0.000002, completion=0.00001)
    assert unfinished_estimate(1000, 400, price) == pytest.approx(0.002 + 100 * 0.00001)
    assert unfinished_estimate(1000, 400, None) == 0.0  # unknown model: nothing to go on


@given(st.recursive(st.none() | st.text(max_size=20) | st.integers(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30))
def test_prompt_estimate_never_raises(value):
    assert estimate_prompt_tokens({"input": value}) >= 0
