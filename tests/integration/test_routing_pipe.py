"""Issue #12 end to end against the emulator: OpenRouter's own controls (routing, fallbacks,
variants, prompt caching, who answered, availability errors, other request controls)."""

from __future__ import annotations

import base64
import json

from helpers import body, posts, stream
from sdk_validation import validate_stream_event

from openrouter_responses_pipe import Pipe

GPT4O = "openai/gpt-4o"
CLAUDE = "anthropic/claude-sonnet-4"
R1 = "deepseek/deepseek-r1"
LLAMA = "meta-llama/llama-3.3-70b-instruct"


def user(valves: dict | None = None, role: str = "user", uid: str = "user-1") -> dict:
    return {"id": uid, "role": role, "valves": valves}


def model_meta(model: str, **custom: str) -> dict:
    """`__metadata__` as Open WebUI builds it for a model edited in the model editor."""
    return {"chat_id": "chat-1", "model": {"id": f"openrouter.{model}", "info": {
        "params": {"custom_params": custom}}}}


def final_status(events) -> str:
    (done,) = [s for s in events.of("status") if s["done"]]
    return done["description"]


def set_valves(pipe: Pipe, **values) -> None:
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), **values})


# -- 1. provider routing ---------------------------------------------------------------------


async def test_admin_default_per_model_and_user_tightening_reach_the_request(pipe, emulator):
    set_valves(pipe, PROVIDER_ROUTING=json.dumps({
        "sort": "price", "ignore": ["azure"], "max_price": {"prompt": 10, "completion": "$20"}}))
    meta = model_meta(GPT4O, provider=json.dumps({"sort": "latency", "only": ["openai"]}))
    payload = body(GPT4O, "hi", provider={"data_collection": "deny", "only": ["azure"],
                                          "max_price": {"prompt": 50}})
    out = await stream(pipe, payload, __metadata__=meta,
                       __user__=user({"PROVIDER_ZDR": "on", "PROVIDER_SORT": "throughput"}))
    assert out.error is None, out.error
    sent = posts(emulator)[-1]["json"]["provider"]
    assert sent == {"sort": "throughput", "ignore": ["azure"], "only": ["openai"], "zdr": True,
                    "data_collection": "deny",
                    "max_price": {"prompt": "10", "completion": "20"}}


async def test_the_model_record_is_the_per_model_source_for_chats_and_tasks(pipe, emulator):
    """Open WebUI 0.12 strips the params from `__metadata__["model"]` and the title endpoint
    sends no model at all, so the pipe reads the model editor's record itself."""
    asked: list[str] = []

    async def record(model_id: str) -> dict:
        asked.append(model_id)
        return {"provider": '{"only": ["anthropic"], "zdr": true}', "models": ["openai/gpt-4o"]}

    pipe._model_params = record
    meta = model_meta(CLAUDE, provider='{"only": ["amazon-bedrock"]}')  # 0.6.28's copy: unused
    await stream(pipe, body(CLAUDE, "hi"), __metadata__=meta)
    await pipe.pipe(body=body(CLAUDE, "### Task: title", stream=False), __user__=user(),
                    __task__="title_generation", __metadata__={"task": "title_generation"})
    for sent in (p["json"] for p in posts(emulator)):
        assert sent["provider"] == {"only": ["anthropic"], "zdr": True}
        assert sent["models"] == [GPT4O]
    assert asked == [f"openrouter.{CLAUDE}"] * 2


async def test_per_model_routing_from_another_model_is_not_applied(pipe, emulator):
    meta = model_meta("openai/gpt-4.1-mini", provider='{"only": ["azure"]}')
    await stream(pipe, body(GPT4O, "hi"), __metadata__=meta)
    assert "provider" not in posts(emulator)[-1]["json"]


async def test_only_an_unknown_provider_says_no_allowed_provider(pipe, emulator):
    set_valves(pipe, PROVIDER_ROUTING='{"only": ["nowhere-cloud"]}')
    out = await stream(pipe, body(GPT4O, "hi"))
    assert out.error.startswith(f"No provider of {GPT4O} satisfies the routing policy "
                                "(only nowhere-cloud)"), out.error
    assert "No allowed providers are available" in out.error  # OpenRouter's words, kept


async def test_zdr_on_a_model_without_zdr_endpoints_names_the_policy(pipe, emulator):
    out = await stream(pipe, body(R1, "hi"), __user__=user({"PROVIDER_ZDR": "on"}))
    first = out.error.splitlines()[0]
    assert first == (f"No provider of {R1} satisfies the routing policy (zero data "
                     "retention). (HTTP 404)"), out.error
    assert "No endpoints found" not in first


async def test_tasks_keep_the_privacy_policy(pipe, emulator):
    set_valves(pipe, PROVIDER_ROUTING='{"data_collection": "deny", "zdr": true}')
    text = await pipe.pipe(body=body(GPT4O, "### Task: title", stream=False),
                           __user__=user(), __task__="title_generation",
                           __metadata__={"task": "title_generation"})
    assert "title" in text
    sent = posts(emulator)[-1]["json"]
    assert sent["provider"] == {"data_collection": "deny", "zdr": True}


async def test_bad_per_model_settings_are_left_out_and_shown_to_admins(pipe, emulator, events):
    meta = model_meta(GPT4O, provider='{"zdr": "yes", "sort": "price"}')
    await stream(pipe, body(GPT4O, "hi"), __metadata__=meta, __user__=user(role="admin"),
                 __event_emitter__=events)
    assert posts(emulator)[-1]["json"]["provider"] == {"sort": "price"}
    notes = [n["content"] for n in events.of("notification")]
    assert any("this model's `provider`: zdr must be true or false" in n for n in notes), notes


async def test_invalid_stored_valve_is_a_status_entry_and_never_sent(pipe, emulator):
    valves = pipe.Valves()
    object.__setattr__(valves, "PROVIDER_ROUTING", '{"sortt": "price"}')  # old stored value
    object.__setattr__(valves, "BASE_URL", emulator.base_url)
    object.__setattr__(valves, "API_KEY", pipe.valves.API_KEY)
    pipe.valves = valves
    listed = await pipe.pipes()
    assert listed[0]["id"] == "_status-routing"
    assert "unknown key 'sortt'" in listed[0]["name"]
    await stream(pipe, body(GPT4O, "hi"))
    assert "provider" not in posts(emulator)[-1]["json"]


async def test_a_refused_save_is_named_in_the_selector_until_a_good_save(pipe, emulator):
    """Open WebUI 0.12 answers a refused valve save with a generic 400; the reason shows as
    a status entry in the model selector instead."""
    from openrouter_responses_pipe import REFUSED_VALVES

    REFUSED_VALVES.clear()
    try:
        set_valves(pipe, PROVIDER_ROUTING='{"sort": "price"}')
        try:
            set_valves(pipe, PROVIDER_ROUTING='{"sortt": "price"}')
        except ValueError:
            pass
        listed = await pipe.pipes()
        assert listed[0]["id"] == "_status-refused-provider_routing"
        assert "PROVIDER_ROUTING not saved" in listed[0]["name"]
        assert "unknown key 'sortt'" in listed[0]["name"]
        set_valves(pipe, PROVIDER_ROUTING='{"sort": "price"}')  # Open WebUI reloads: kept
        assert (await pipe.pipes())[0]["id"] == "_status-refused-provider_routing"
        set_valves(pipe, PROVIDER_ROUTING='{"sort": "latency"}')  # a successful save
        assert not (await pipe.pipes())[0]["id"].startswith("_status")
    finally:
        REFUSED_VALVES.clear()


# -- 2. fallbacks -----------------------------------------------------------------------------


async def test_fallback_models_are_sent_and_a_fallback_answer_is_named(pipe, emulator, events):
    set_valves(pipe, FALLBACK_MODELS="openai/gpt-4.1-mini, google/gemini-2.5-flash")
    emulator.enqueue("primary_down")
    out = await stream(pipe, body(CLAUDE, "hi"), __event_emitter__=events)
    sent = posts(emulator)[-1]["json"]
    assert sent["models"] == ["openai/gpt-4.1-mini", "google/gemini-2.5-flash"]
    status = final_status(events)
    assert "answered by openai/gpt-4.1-mini — fallback" in status, status
    served = emulator.responses[-1]
    assert served["model"] == "openai/gpt-4.1-mini"
    assert out.usage["cost"] == round(served["usage"]["cost"], 8)  # the fallback's price


async def test_per_model_models_list_replaces_the_valve(pipe, emulator):
    set_valves(pipe, FALLBACK_MODELS="google/gemini-2.5-flash")
    meta = model_meta(CLAUDE, models='["openai/gpt-4o"]')
    await stream(pipe, body(CLAUDE, "hi"), __metadata__=meta)
    assert posts(emulator)[-1]["json"]["models"] == [GPT4O]


async def test_a_user_cannot_add_fallback_models_through_the_body(pipe, emulator):
    await stream(pipe, body(CLAUDE, "hi", models=["openai/gpt-4o"]))
    assert "models" not in posts(emulator)[-1]["json"]


# -- 3. variants, presets, routers ------------------------------------------------------------

VARIANTS = ("anthropic/claude-sonnet-4:nitro, deepseek/deepseek-r1:floor, "
            "meta-llama/llama-3.3-70b-instruct:exacto, openai/gpt-4o@preset/support, "
            "openrouter/auto, ~anthropic/claude-sonnet-latest, @preset/support")


async def test_variants_are_listed_with_distinct_names_and_route_verbatim(pipe, emulator):
    set_valves(pipe, MODEL_VARIANTS=VARIANTS, AUTO_ROUTER_ALLOWED_MODELS="anthropic/*")
    listed = {m["id"]: m["name"] for m in await pipe.pipes()}
    assert listed["anthropic/claude-sonnet-4:nitro"] == "Anthropic: Claude Sonnet 4 (nitro)"
    assert listed["openai/gpt-4o@preset/support"] == "OpenAI: GPT-4o (preset support)"
    assert listed["~anthropic/claude-sonnet-latest"] == "Anthropic: Claude Sonnet 4 (latest)"
    assert listed["openrouter/auto"] == "OpenRouter: Auto Router"
    assert listed["@preset/support"] == "OpenRouter preset: support"
    assert len(set(listed.values())) == len(listed)
    for variant in [v.strip() for v in VARIANTS.split(",")]:
        out = await stream(pipe, body(variant, "hi"))
        assert out.error is None, (variant, out.error)
        assert posts(emulator)[-1]["json"]["model"] == variant
    auto = next(p["json"] for p in posts(emulator) if p["json"]["model"] == "openrouter/auto")
    assert {"id": "auto-router", "allowed_models": ["anthropic/*"]} in auto["plugins"]


async def test_a_variant_inherits_its_base_models_capabilities(pipe, emulator):
    set_valves(pipe, MODEL_VARIANTS="anthropic/claude-sonnet-4:nitro")
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 64).decode()
    content = [{"type": "text", "text": "what is it?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]
    payload = {**body("anthropic/claude-sonnet-4:nitro", ""),
               "messages": [{"role": "user", "content": content}]}
    out = await stream(pipe, payload)
    assert out.error is None, out.error
    parts = posts(emulator)[-1]["json"]["input"][0]["content"]
    assert any(p["type"] == "input_image" for p in parts)


async def test_unconfigured_variants_and_unknown_bases_are_refused(pipe, emulator):
    set_valves(pipe, MODEL_VARIANTS="acme/none:nitro")
    listed = await pipe.pipes()
    assert listed[0]["id"] == "_status-variants" and "acme/none:nitro" in listed[0]["name"]
    out = await stream(pipe, body("openai/gpt-4o:nitro", "hi"))
    assert "is not in OpenRouter's catalog" in out.error


# -- 4. prompt caching ------------------------------------------------------------------------


async def test_second_turn_on_a_cached_model_shows_cached_tokens_and_savings(pipe, emulator,
                                                                          events):
    history = [{"role": "system", "content": "You are terse. " * 200},
               {"role": "user", "content": "first question " * 50}]
    meta = {"chat_id": "chat-cache"}
    first = await stream(pipe, {**body(CLAUDE, ""), "messages": history}, __metadata__=meta)
    assert first.usage["prompt_tokens_details"]["cache_write_tokens"] > 0
    assert posts(emulator)[-1]["json"]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}
    history += [{"role": "assistant", "content": first.text},
                {"role": "user", "content": "second"}]
    out = await stream(pipe, {**body(CLAUDE, ""), "messages": history}, __metadata__=meta,
                       __event_emitter__=events)
    cached = out.usage["prompt_tokens_details"]["cached_tokens"]
    assert cached > 400
    assert out.usage["cache_saved"] > 0
    status = final_status(events)
    assert f"{cached:,} cached" in status and "cache saved $" in status, status
    sessions = {p["json"]["session_id"] for p in posts(emulator)}
    assert len(sessions) == 1


async def test_cache_control_only_for_models_that_take_it_and_not_when_off(pipe, emulator):
    await stream(pipe, body(GPT4O, "hi"))
    assert "cache_control" not in posts(emulator)[-1]["json"]
    set_valves(pipe, PROMPT_CACHE="off")
    await stream(pipe, body(CLAUDE, "hi"))
    assert "cache_control" not in posts(emulator)[-1]["json"]
    set_valves(pipe, PROMPT_CACHE="1h")
    await stream(pipe, body(CLAUDE, "hi"))
    assert posts(emulator)[-1]["json"]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}


# -- 5. who answered --------------------------------------------------------------------------


async def test_status_line_names_the_provider_and_the_one_that_failed(pipe, emulator, events):
    emulator.enqueue("provider_retry")
    await stream(pipe, body(R1, "hi"), __event_emitter__=events)
    sent = posts(emulator)[-1]
    assert sent["headers"]["X-OpenRouter-Metadata"] == "enabled"
    assert "via DeepInfra (fp8) after Together failed" in final_status(events)
    health = await pipe.pipe(body=body("_health", "json", stream=False),
                             __user__=user(role="admin"))
    providers = json.loads(health)["providers"]
    assert providers["DeepInfra (fp8)"] == {"turns": 1, "failures": 0}
    assert providers["Together"] == {"turns": 0, "failures": 1}


async def test_health_counts_provider_failures_from_error_bodies(pipe, emulator):
    set_valves(pipe, MAX_RETRIES=0)
    emulator.enqueue("http_error", status=503)  # previous_errors: example-cloud, 503
    out = await stream(pipe, body(GPT4O, "hi"))
    assert "temporarily unavailable" in out.error
    health = await pipe.pipe(body=body("_health", "hi", stream=False),
                             __user__=user(role="admin"))
    assert "- Providers (turns / failures): example-cloud: 0 / 1" in health


async def test_router_metadata_event_validates_and_can_be_turned_off(pipe, emulator, events):
    await stream(pipe, body(GPT4O, "hi"), __event_emitter__=events)
    meta = emulator.responses[-1]["openrouter_metadata"]
    validate_stream_event({"type": "response.completed", "sequence_number": 9,
                           "response": emulator.responses[-1]})
    assert meta["strategy"] == "direct"
    assert "via OpenAI" in final_status(events)
    set_valves(pipe, ROUTER_METADATA=False)
    await stream(pipe, body(GPT4O, "hi"))
    assert "X-OpenRouter-Metadata" not in posts(emulator)[-1]["headers"]
    assert "openrouter_metadata" not in emulator.responses[-1]


# -- 6. rate limits and availability ----------------------------------------------------------


async def test_rate_limit_after_the_retries_goes_to_the_fallback_and_says_so(pipe, emulator,
                                                                           events, sleeps):
    set_valves(pipe, FALLBACK_MODELS=GPT4O, MAX_RETRIES=1)
    emulator.enqueue("http_error", status=429, retry_after=1)
    emulator.enqueue("http_error", status=429, retry_after=1)
    out = await stream(pipe, body(CLAUDE, "hi"), __event_emitter__=events)
    assert out.error is None and "You said: hi" in out.text
    assert [p["json"]["model"] for p in posts(emulator)] == [CLAUDE, CLAUDE, GPT4O]
    assert sleeps.calls == [1.0]
    notes = [n["content"] for n in events.of("notification")]
    assert any(f"the fallback model {GPT4O} answers instead" in n for n in notes), notes
    assert f"answered by {GPT4O} — fallback" in final_status(events)


async def test_availability_codes_become_sentences_with_suggested_models(pipe, emulator):
    emulator.enqueue("unavailable", code="model_deprecated", fallbacks="openai/gpt-4o,x/y")
    out = await stream(pipe, body(GPT4O, "hi"))
    assert out.error.startswith(f"{GPT4O} has been retired by OpenRouter. (HTTP 404)")
    assert "OpenRouter suggests: openai/gpt-4o, x/y." in out.error
    emulator.enqueue("unavailable", code="free_variant_ended")
    out = await stream(pipe, body("deepseek/deepseek-r1:free", "hi"))
    assert "The free variant of deepseek/deepseek-r1:free has ended." in out.error


async def test_free_model_daily_limit_says_which_limit_and_when_it_resets(pipe, emulator):
    set_valves(pipe, MAX_RETRIES=0)
    emulator.enqueue("free_limit", window="day")
    out = await stream(pipe, body("deepseek/deepseek-r1:free", "hi"))
    assert "The daily limit for free models (50 requests) was reached. It resets" in out.error
    assert "00:00 UTC" in out.error
    emulator.enqueue("free_limit", window="min")
    out = await stream(pipe, body("deepseek/deepseek-r1:free", "hi"))
    assert "The per-minute limit for free models (20 requests) was reached." in out.error


# -- 7. other request controls ----------------------------------------------------------------


async def test_tier_verbosity_user_hash_and_chat_metadata(pipe, emulator):
    set_valves(pipe, SERVICE_TIER="flex", TEXT_VERBOSITY="low", SEND_CHAT_METADATA=True)
    await stream(pipe, body(GPT4O, "hi"), __metadata__={"chat_id": "chat-9"},
                 __user__=user({"SERVICE_TIER": "priority"}, uid="alice"))
    sent = posts(emulator)[-1]["json"]
    assert sent["service_tier"] == "priority" and sent["text"] == {"verbosity": "low"}
    assert sent["metadata"] == {"chat_id": "chat-9"}
    assert sent["user"] == sent["safety_identifier"] and "alice" not in sent["user"]
    await stream(pipe, body(GPT4O, "hi"), __user__=user(uid="bob"))
    assert posts(emulator)[-1]["json"]["user"] != sent["user"]
    set_valves(pipe, USER_IDENTIFIER="off")
    await stream(pipe, body(GPT4O, "hi"), __user__=user(uid="bob"))
    assert "user" not in posts(emulator)[-1]["json"]


async def test_pdf_for_a_model_without_file_input_uses_the_free_parser(pipe, emulator):
    pdf = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4 hello").decode()
    content = [{"type": "text", "text": "summarise"},
               {"type": "file", "file": {"filename": "a.pdf", "file_data": pdf}}]
    for model, expect in ((R1, True), (GPT4O, False)):
        payload = {**body(model, ""), "messages": [{"role": "user", "content": content}]}
        await stream(pipe, payload)
        plugins = posts(emulator)[-1]["json"].get("plugins") or []
        parser = {"id": "file-parser", "pdf": {"engine": "cloudflare-ai"}}
        assert (parser in plugins) is expect, (model, plugins)


async def test_response_healing_for_json_answers_that_are_not_streamed(pipe, emulator):
    fmt = {"type": "json_object"}
    await pipe.pipe(body=body(GPT4O, "### Task: title", stream=False, response_format=fmt),
                    __user__=user(), __task__="title_generation")
    assert {"id": "response-healing"} in posts(emulator)[-1]["json"]["plugins"]
    await stream(pipe, body(GPT4O, "hi", response_format=fmt))
    assert "plugins" not in posts(emulator)[-1]["json"]
