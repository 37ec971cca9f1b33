"""§7 Routing policy (issue #12): merge rules, unit conversion, validation messages."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from openrouter_responses_pipe import (
    REFUSED_VALVES,
    ChatRequest,
    Pricing,
    RequestSettings,
    RouteOutcome,
    Usage,
    UserValves,
    Valves,
    _session_id,
    cache_saving,
    check_provider,
    describe_availability,
    describe_rate_limit,
    merge_provider,
    model_custom_params,
    price_per_million,
    routing_status,
)

# (admin default, per-model, user asks) -> (sent, ignored count)
MERGE_RULES = [
    ("user chooses sort", {}, {}, {"sort": "price"}, {"sort": "price"}, 0),
    ("user sort replaces admin sort", {"sort": "price"}, {}, {"sort": "latency"},
     {"sort": "latency"}, 0),
    ("per-model wins per key", {"sort": "price", "zdr": True}, {"sort": "throughput"}, {},
     {"sort": "throughput", "zdr": True}, 0),
    ("per-model null removes a default key", {"zdr": True, "sort": "price"}, {"zdr": None}, {},
     {"sort": "price"}, 0),
    ("user asks deny", {}, {}, {"data_collection": "deny"}, {"data_collection": "deny"}, 0),
    ("user can't allow what the admin denies", {"data_collection": "deny"}, {},
     {"data_collection": "allow"}, {"data_collection": "deny"}, 1),
    ("user asks zdr", {}, {}, {"zdr": True}, {"zdr": True}, 0),
    ("user can't drop admin zdr", {"zdr": True}, {}, {"zdr": False}, {"zdr": True}, 1),
    ("user can't drop per-model zdr", {}, {"zdr": True}, {"zdr": False}, {"zdr": True}, 1),
    ("only narrows to the intersection", {"only": ["a", "b"]}, {}, {"only": ["b", "c"]},
     {"only": ["b"]}, 0),
    ("only with nothing in common keeps the admin's", {"only": ["a"]}, {}, {"only": ["z"]},
     {"only": ["a"]}, 1),
    ("user only when the admin has none", {}, {}, {"only": ["z"]}, {"only": ["z"]}, 0),
    ("ignore is a union", {"ignore": ["a"]}, {}, {"ignore": ["b", "a"]},
     {"ignore": ["a", "b"]}, 0),
    ("max_price: user may lower", {"max_price": {"prompt": "3"}}, {},
     {"max_price": {"prompt": "1", "completion": "5"}},
     {"max_price": {"prompt": "1", "completion": "5"}}, 0),
    ("max_price: user can't raise", {"max_price": {"prompt": "3"}}, {},
     {"max_price": {"prompt": "30"}}, {"max_price": {"prompt": "3"}}, 0),
    ("allow_fallbacks: user may turn off", {}, {}, {"allow_fallbacks": False},
     {"allow_fallbacks": False}, 0),
    ("allow_fallbacks: user can't turn back on", {"allow_fallbacks": False}, {},
     {"allow_fallbacks": True}, {"allow_fallbacks": False}, 1),
    ("quantizations narrow", {"quantizations": ["fp8", "fp16"]}, {},
     {"quantizations": ["fp16", "int4"]}, {"quantizations": ["fp16"]}, 0),
    ("order only when the admin set none", {"order": ["a"]}, {}, {"order": ["b"]},
     {"order": ["a"]}, 1),
    ("options are admin only", {}, {}, {"options": {"a": {}}}, {}, 1),
]


@pytest.mark.parametrize(("admin", "per_model", "user", "sent", "ignored"),
                         [r[1:] for r in MERGE_RULES], ids=[r[0] for r in MERGE_RULES])
def test_merge_rules_tighten_never_loosen(admin, per_model, user, sent, ignored):
    policy, why = merge_provider(admin, per_model, user)
    assert policy == sent
    assert len(why) == ignored


@pytest.mark.parametrize(("typed", "sent"), [
    (3, "3"), (0.5, "0.5"), ("1.25", "1.25"), ("$15", "15"), (0, "0"), (1e-3, "0.001"),
    (120.0, "120")])
def test_max_price_is_typed_in_dollars_per_million_and_sent_as_a_string(typed, sent):
    assert price_per_million(typed) == sent


@pytest.mark.parametrize(("raw", "message"), [
    ('{"sortt": "price"}', "PROVIDER_ROUTING: unknown key 'sortt'"),
    ('{"zdr": "yes"}', "PROVIDER_ROUTING: zdr must be true or false"),
    ('{"data_collection": "never"}', 'PROVIDER_ROUTING: data_collection must be "allow" or '
                                     '"deny"'),
    ('{"sort": "cheap"}', "PROVIDER_ROUTING: sort must be one of price, throughput"),
    ('{"quantizations": ["fp9"]}', "PROVIDER_ROUTING: quantizations has unknown quantization "
                                   "'fp9'"),
    ('{"max_price": {"prompt": 0.000003}}', "PROVIDER_ROUTING: max_price prompt 3e-06 looks "
                                            "like a per-token price"),
    ('{"max_price": {"input": 1}}', "PROVIDER_ROUTING: max_price has unknown key 'input'"),
    ('{"max_price": {"prompt": "cheap"}}', "PROVIDER_ROUTING: max_price prompt 'cheap' is not "
                                           "a number"),
    ('{"max_price": {"prompt": -1}}', "PROVIDER_ROUTING: max_price prompt must be zero or more"),
    ('{"only": "openai"}', "PROVIDER_ROUTING: only must be a non-empty list"),
    ('{"preferred_max_latency": {"p42": 1}}', "PROVIDER_ROUTING: preferred_max_latency may "
                                              "only have the keys p50"),
    ('["sort"]', "PROVIDER_ROUTING must be a JSON object"),
    ('{"sort": price}', "PROVIDER_ROUTING is not valid JSON"),
    ("[" * 200_000, "PROVIDER_ROUTING is not usable JSON (nested too deeply"),
    ('{"preferred_max_latency": NaN}', "PROVIDER_ROUTING: preferred_max_latency must be a "
                                       "positive number"),
    ('{"preferred_min_throughput": {"p90": Infinity}}', "PROVIDER_ROUTING: "
     "preferred_min_throughput must be a positive number"),
    ({"preferred_max_latency": {"p50": float("nan")}}, "PROVIDER_ROUTING: "
     "preferred_max_latency must be a positive number"),
])
def test_bad_values_are_named(raw, message):
    _, problems = check_provider(raw, "PROVIDER_ROUTING")
    assert problems and problems[0].startswith(message), problems


@given(st.integers(min_value=1, max_value=300_000), st.sampled_from(["[", '{"a":', "[1,"]))
def test_json_nested_beyond_the_parser_is_a_named_problem(depth, opener):
    clean, problems = check_provider(opener * depth, "X")
    assert clean == {} and len(problems) == 1 and problems[0].startswith("X ")


def test_valve_save_refuses_a_bad_key_with_its_name():
    with pytest.raises(ValidationError, match="unknown key 'sortt'"):
        Valves(PROVIDER_ROUTING='{"sortt": "price"}')
    assert "unknown key 'sortt'" in REFUSED_VALVES.pop("PROVIDER_ROUTING")[0]
    ok = Valves(PROVIDER_ROUTING='{"sort": {"by": "price", "partition": "none"}, '
                                 '"preferred_min_throughput": {"p90": 50}}')
    routing = RequestSettings.merge(ok, None).routing
    assert routing.provider == {"sort": {"by": "price", "partition": "none"},
                                "preferred_min_throughput": {"p90": 50.0}}


def test_full_valid_policy_passes_the_check_unchanged():
    policy = {"order": ["deepinfra/turbo", "together"], "only": ["deepinfra"],
              "ignore": ["x"], "allow_fallbacks": False, "require_parameters": True,
              "data_collection": "deny", "zdr": True, "enforce_distillable_text": True,
              "quantizations": ["fp8"], "sort": "exacto",
              "max_price": {"prompt": "1", "completion": "2", "image": "0.01",
                            "audio": "3", "request": "0.5"},
              "preferred_max_latency": 2.0, "preferred_min_throughput": {"p50": 30.0},
              "options": {"openai": {"x": 1}}}
    assert check_provider(json.dumps(policy), "P") == (policy, ())


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12))
def test_check_provider_never_raises_and_only_keeps_known_keys(value):
    clean, problems = check_provider(value, "X")
    for key in ("preferred_max_latency", "preferred_min_throughput"):  # finite or left out
        kept = clean.get(key)
        numbers = list(kept.values()) if isinstance(kept, dict) else [kept]
        assert all(n is None or math.isfinite(n) for n in numbers)
    assert set(clean) <= {"order", "only", "ignore", "allow_fallbacks", "require_parameters",
                          "zdr", "enforce_distillable_text", "data_collection",
                          "quantizations", "sort", "max_price", "preferred_max_latency",
                          "preferred_min_throughput", "options"}
    assert all(isinstance(p, str) for p in problems)


def test_user_valves_and_body_only_tighten_through_request_settings():
    valves = Valves(PROVIDER_ROUTING='{"zdr": true, "only": ["anthropic"]}')
    user = UserValves(PROVIDER_SORT="latency", PROVIDER_DATA_COLLECTION="deny")
    settings = RequestSettings.merge(valves, user, "user", {}, {"zdr": False, "only": ["x"]})
    assert settings.routing.provider == {"zdr": True, "only": ["anthropic"], "sort": "latency",
                                         "data_collection": "deny"}
    assert len(settings.routing.ignored) == 2


def test_per_model_params_come_only_from_the_matching_model_record():
    meta = {"model": {"id": "openrouter.a/b", "info": {"params": {"custom_params": {
        "provider": '{"zdr": true}', "models": '["c/d"]', "temperature": "1"}}}}}
    assert model_custom_params(meta, "openrouter.a/b") == {"provider": '{"zdr": true}',
                                                           "models": '["c/d"]'}
    assert model_custom_params(meta, "openrouter.x/y") == {}
    assert model_custom_params({"model": "garbage"}, "openrouter.a/b") == {}
    settings = RequestSettings.merge(Valves(FALLBACK_MODELS="e/f"), None, "user",
                                     model_custom_params(meta, "openrouter.a/b"))
    assert settings.routing.fallback_models == ("c/d",)
    assert settings.routing.provider == {"zdr": True}


def _req(chat: str) -> ChatRequest:
    return ChatRequest("openrouter.a/b", "a/b", (), True, {}, chat_id=chat)


def test_session_id_is_stable_across_turns_and_workers_and_reveals_nothing(monkeypatch):
    monkeypatch.setenv("WEBUI_SECRET_KEY", "k1")
    worker_a = RequestSettings.merge(Valves(), None)
    worker_b = RequestSettings.merge(Valves(), None)  # another process, same secret
    chat = "5f0c3b1e-1111-4222-8333-944455556666"
    sid = _session_id(_req(chat), worker_a)
    assert sid == _session_id(_req(chat), worker_b) and len(sid) == 32
    assert chat not in sid and chat.replace("-", "")[:12] not in sid
    assert sid != _session_id(_req(chat + "x"), worker_a)
    monkeypatch.setenv("WEBUI_SECRET_KEY", "k2")
    assert _session_id(_req(chat), RequestSettings.merge(Valves(), None)) != sid


def test_cache_saving_prices_reads_and_writes():
    pricing = Pricing(prompt=3e-6, input_cache_read=3e-7, input_cache_write=3.75e-6,
                      input_cache_write_1h=6e-6)
    usage = Usage(input_tokens=10_000, cached_tokens=8_000, cache_write_tokens=1_000)
    assert cache_saving(usage, pricing) == pytest.approx(8_000 * 2.7e-6 - 1_000 * 0.75e-6)
    assert cache_saving(usage, pricing, "1h") == pytest.approx(8_000 * 2.7e-6 - 1_000 * 3e-6)
    assert cache_saving(Usage(input_tokens=5), pricing) is None
    assert cache_saving(usage, None) is None


@pytest.mark.parametrize(("outcome", "expected"), [
    (RouteOutcome("a/b", "c/d", {"strategy": "fallback"}), ["answered by c/d — fallback"]),
    (RouteOutcome("a/b", "c/d"), ["answered by c/d — fallback"]),
    (RouteOutcome("a/b:nitro", "a/b"), []),
    (RouteOutcome("~a/b-latest", "a/b-2"), ["answered by a/b-2"]),
    (RouteOutcome("openrouter/auto", "x/y", {"strategy": "auto"}), ["answered by x/y"]),
    (RouteOutcome("@preset/support", "x/y", {"strategy": "direct"}), ["answered by x/y"]),
    (RouteOutcome("a/b", "a/b", {"endpoints": {"available": [
        {"provider": "together", "selected": False},
        {"provider": "deepinfra/fp8", "selected": True}]},
        "attempts": [{"provider": "together", "status": 502},
                     {"provider": "deepinfra/fp8", "status": 200}]}),
     ["via DeepInfra (fp8) after Together failed"]),
])
def test_status_line_says_who_answered(outcome, expected):
    assert routing_status(outcome, None, None) == expected


def test_status_line_shows_cache_tokens_and_dollars():
    usage = Usage(cached_tokens=12_000, cache_write_tokens=3_000)
    assert routing_status(None, usage, 0.0123) == [
        "12,000 cached, 3,000 cache-written, cache saved $0.0123"]
    assert routing_status(None, Usage(cache_write_tokens=10), -0.5) == [
        "10 cache-written, cache cost $0.5 extra"]


def test_availability_and_rate_limit_sentences():
    lines = describe_availability({"code": "capacity_exhausted", "requested_models": ["a/b"],
                                   "fallback_models": ["c/d"]}, "")
    assert lines == ["Every provider of a/b is at capacity right now.",
                     "OpenRouter suggests: c/d."]
    assert describe_availability({"code": "something_new"}, "a/b") == []
    reset = str((1_800_000_000 + 300) * 1000)
    assert describe_rate_limit("Rate limit exceeded: free-models-per-min.",
                               {"limit": "20", "reset": reset}, 1_800_000_000) == [
        "The per-minute limit for free models (20 requests) was reached. It resets in 5 "
        "minutes (at 08:05 UTC)."]
    assert describe_rate_limit("Provider returned error", {}, 0) == []


@given(st.text(max_size=40), st.dictionaries(st.sampled_from(["limit", "remaining", "reset"]),
                                             st.text(max_size=20), max_size=3),
       st.floats(min_value=0, max_value=4e9))
def test_rate_limit_text_never_raises(message, limits, now):
    lines = describe_rate_limit(message, limits, now)
    assert all(isinstance(line, str) and line.endswith(".") for line in lines)


@given(st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4))
def test_rate_limit_headers_keep_only_x_ratelimit(headers):
    from openrouter_responses_pipe import rate_limit_headers

    found = rate_limit_headers(headers, None)
    assert len(found) <= sum(1 for k in headers if k.lower().startswith("x-ratelimit-"))


def test_policy_summary_names_what_can_exclude_providers():
    from openrouter_responses_pipe import describe_policy

    assert describe_policy({"sort": "price", "order": ["a"]}) == ""
    assert describe_policy({"only": ["a", "b"], "zdr": True, "data_collection": "deny",
                            "max_price": {"prompt": "1"}}) == (
        "only a, b; zero data retention; no data collection; max price prompt $1/M")
