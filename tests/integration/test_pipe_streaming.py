"""pipe() end to end against the OpenRouter emulator over loopback."""

from __future__ import annotations

import asyncio

import pytest
from helpers import body, posts, stream
from sdk_validation import validate_request

from openrouter_responses_pipe import Pipe

GPT4O = "openai/gpt-4o"
NANO = "openai/gpt-5-nano"


async def test_text_streams_token_by_token_with_usage_and_final_status(pipe, emulator, events):
    out = await stream(pipe, body(GPT4O, "[emu:text delay_ms=15] Two names for a pet pelican"),
                       __event_emitter__=events)
    assert "Two names for a pet pelican" in out.text
    assert out.content_chunks > 1
    assert out.usage["prompt_tokens"] > 0 and out.usage["completion_tokens"] > 0
    assert out.usage["total_tokens"] == out.usage["prompt_tokens"] + out.usage["completion_tokens"]
    assert out.usage["cost"] > 0
    (final,) = [s for s in events.of("status") if s["done"]]
    assert "tokens" in final["description"] and "$" in final["description"]
    sent = posts(emulator)[-1]
    assert sent["json"]["model"] == GPT4O and sent["json"]["stream"] is True
    assert sent["headers"]["Authorization"] == "Bearer sk-or-test"
    validate_request(sent["json"])


async def test_every_model_variant_routes_to_exactly_itself(pipe, emulator):
    ids = [m["id"] for m in await pipe.pipes()]
    for variant in ("deepseek/deepseek-r1:free", "openai/gpt-4o-2024-08-06", GPT4O):
        assert variant in ids
        await stream(pipe, body(variant, "hi"))
        assert posts(emulator)[-1]["json"]["model"] == variant


async def test_reasoning_is_streamed_as_thinking_before_the_answer(pipe, emulator):
    out = await stream(pipe, body(NANO, "What is 2 + 2?"))
    assert out.reasoning and out.text
    first_kinds = [next(iter(d)) for d in out.deltas if d]
    assert first_kinds[0] == "reasoning_content"
    assert first_kinds.index("content") > first_kinds.index("reasoning_content")
    sent = posts(emulator)[-1]["json"]
    assert sent["reasoning"]["summary"] == "auto"
    assert sent["include"] == ["reasoning.encrypted_content"]
    validate_request(sent)
    assert out.usage["completion_tokens_details"]["reasoning_tokens"] > 0


async def test_raw_reasoning_models_show_thinking_too(pipe):
    out = await stream(pipe, body("anthropic/claude-sonnet-4", "What is 17*23?"))
    assert out.reasoning and out.text


async def test_task_call_returns_plain_json_text_with_minimal_reasoning(pipe, emulator):
    prompt = ('### Task:\nGenerate a concise title. Respond in JSON format: {"title": "..."}\n'
              "### Chat History:\nUSER: hi")
    result = await pipe.pipe(body=body(NANO, prompt, stream=False),
                             __user__={"id": "u"}, __task__="title_generation")
    assert isinstance(result, str) and '"title"' in result
    sent = posts(emulator)[-1]["json"]
    assert sent["stream"] is False and sent["reasoning"] == {"effort": "minimal"}
    validate_request(sent)


async def test_non_streaming_chat_returns_a_string(pipe):
    result = await pipe.pipe(body=body(GPT4O, "plain please", stream=False), __user__={"id": "u"})
    assert isinstance(result, str) and "plain please" in result


@pytest.mark.parametrize(("status", "expected"), [
    (400, "couldn't accept"), (401, "rejected the API key"), (402, "Insufficient credits"),
    (403, "refused"), (404, "no provider"), (500, "unavailable")])
async def test_http_errors_explain_themselves(pipe, emulator, status, expected):
    out = await stream(pipe, body(GPT4O, f"[emu:http_error status={status}] hi"))
    assert out.error is not None and expected in out.error
    assert f"HTTP {status}" in out.error
    assert out.text == ""


async def test_client_errors_are_not_retried(pipe, emulator, sleeps):
    await stream(pipe, body(GPT4O, "[emu:http_error status=400] hi"))
    assert len(posts(emulator)) == 1 and sleeps.calls == []


async def test_503_before_the_first_byte_is_retried_then_succeeds(pipe, emulator, sleeps):
    out = await stream(pipe, body(GPT4O, "[emu:fail_then_ok status=503 times=2 key=a] retry me"))
    assert "retry me" in out.text and out.error is None
    assert len(posts(emulator)) == 3 and len(sleeps.calls) == 2


async def test_429_retry_after_is_honoured(pipe, emulator, sleeps):
    out = await stream(pipe, body(GPT4O,
                                  "[emu:fail_then_ok status=429 times=1 retry_after=3 key=b] x"))
    assert out.error is None and sleeps.calls == [3.0]


async def test_429_retry_after_beyond_the_cap_tells_the_user_when_to_retry(pipe, emulator,
                                                                           sleeps):
    out = await stream(pipe, body(GPT4O, "[emu:http_error status=429 retry_after=120] x"))
    assert "Retry after about 120 seconds" in out.error and sleeps.calls == []


async def test_mid_stream_failure_keeps_partial_text_and_is_not_retried(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:mid_stream_failure] tell me"))
    assert out.text.split("\n\n---\n")[0].strip()  # partial answer kept
    assert "interrupted" in out.text and "Provider" in out.text
    assert len(posts(emulator)) == 1


@pytest.mark.parametrize("form", ["flat", "nested"])
async def test_error_events_interrupt_with_the_provider_message(pipe, emulator, form):
    out = await stream(pipe, body(
        GPT4O, f"[emu:error_event form={form} message='Quota of provider Zeta-9 exhausted'] go"))
    partial, _, notice = out.text.partition("\n\n---\n")
    assert partial.strip().startswith("Partial answer")  # the text so far stays
    assert "interrupted" in notice
    assert "Quota of provider Zeta-9 exhausted" in notice  # the provider's own words
    assert "closed the stream before the answer was finished" not in notice
    assert len(posts(emulator)) == 1


async def test_eof_without_terminal_event_is_reported_as_cut_off(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:truncate] go"))
    assert "interrupted" in out.text and "before the answer was finished" in out.text


async def test_incomplete_answer_says_why_it_stopped(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:incomplete] go"))
    assert "stopped early (max output tokens)" in out.text


@pytest.mark.parametrize("quirk", ["comments=1", "crlf=1", "split=1", "no_completed=1",
                                   "no_done=1", "unknown_events=1"])
async def test_quirky_streams_give_the_same_answer(pipe, emulator, quirk):
    plain = await stream(pipe, body(GPT4O, "ação 😀 quirk"))
    quirky = await stream(pipe, body(GPT4O, f"[emu:text {quirk}] ação 😀 quirk"))
    assert quirky.text == plain.text and "interrupted" not in quirky.text


async def test_late_reasoning_close_keeps_thinking_and_answer(pipe):
    out = await stream(pipe, body(NANO, "[emu:reasoning late_reasoning_close=1] think"))
    assert out.reasoning and "think" in out.text and "interrupted" not in out.text


async def test_flood_output_is_linear_each_character_sent_once(pipe):
    out = await stream(pipe, body(GPT4O, "[emu:flood deltas=3000] go"))
    sent_chars = sum(len(d.get("content") or "") for d in out.deltas)
    assert sent_chars == len(out.text) and len(out.text) >= 3000
    assert out.content_chunks <= 3000


async def stop_a_hanging_stream(pipe, emulator) -> None:
    """Start a stream the emulator never finishes, then stop it the way Open WebUI does."""
    result = await pipe.pipe(body=body(GPT4O, "[emu:hang] wait"), __user__={"id": "u"})
    consumer = asyncio.create_task(anext(result))
    for _ in range(200):
        if emulator.active_streams:
            break
        await asyncio.sleep(0.01)
    assert emulator.active_streams == 1
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await result.aclose()


async def test_stopping_the_generation_cancels_upstream_promptly(pipe, emulator):
    await stop_a_hanging_stream(pipe, emulator)
    for _ in range(200):
        if emulator.disconnects:
            break
        await asyncio.sleep(0.01)
    assert emulator.disconnects and emulator.active_streams == 0
    assert pipe._gate.active == 0 and pipe._gate.per_user == {}


async def test_busy_server_rejects_fast_instead_of_waiting(pipe, emulator):
    pipe.valves = pipe.Valves(BASE_URL=emulator.base_url, API_KEY="k",
                              MAX_CONCURRENT_REQUESTS=1, MAX_QUEUED_REQUESTS=0)
    first = await pipe.pipe(body=body(GPT4O, "[emu:hang] a"), __user__={"id": "a"})
    holder = asyncio.create_task(anext(first))
    await asyncio.sleep(0.05)
    second = await stream(pipe, body(GPT4O, "b"), __user__={"id": "b"})
    assert "busy" in second.error
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    await first.aclose()


async def test_missing_api_key_names_the_valve(emulator):
    p = Pipe()
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="")
    out = await stream(p, body(GPT4O, "hi"))
    assert "API_KEY" in out.error
    await p.close()


async def test_unknown_model_is_explained(pipe):
    out = await stream(pipe, body("acme/not-a-model", "hi"))
    assert "acme/not-a-model" in out.error and "catalog" in out.error


async def test_model_id_typo_is_reported_not_widened(pipe, emulator):
    pipe.valves = pipe.Valves(BASE_URL=emulator.base_url, API_KEY="k",
                              MODEL_ID=f"{GPT4O}, openai/gpt-4o-typo")
    models = await pipe.pipes()
    assert [m["id"] for m in models][1:] == [GPT4O, "_health", "_my_usage"]
    assert "openai/gpt-4o-typo" in models[0]["name"]
    out = await stream(pipe, body(models[0]["id"], "hi"))
    assert "configuration problem" in out.error


async def test_user_valves_arrive_as_an_instance_and_override_admin_defaults(pipe, emulator):
    user = {"id": "u", "valves": Pipe.UserValves(REASONING_EFFORT="low")}
    await stream(pipe, body(NANO, "hi"), __user__=user)
    assert posts(emulator)[-1]["json"]["reasoning"]["effort"] == "low"


async def test_each_turn_follows_the_valves_in_force_when_it_starts(pipe, emulator):
    """Settings are remembered per distinct input, never across a change of any input."""
    efforts = []
    for user_effort, admin_effort in (("low", "high"), ("low", "high"), ("high", "high"),
                                      ("inherit", "high"), ("inherit", "minimal")):
        pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                     "REASONING_EFFORT": admin_effort})
        user = {"id": "u", "valves": Pipe.UserValves(REASONING_EFFORT=user_effort)}
        await stream(pipe, body(NANO, "hi"), __user__=user)
        efforts.append(posts(emulator)[-1]["json"]["reasoning"]["effort"])
    assert efforts == ["low", "low", "high", "high", "minimal"]


async def test_silent_upstream_times_out_with_a_specific_message(pipe, emulator):
    # model_construct: a sub-second timeout the valve's validation (>= 5 s) wouldn't allow
    pipe.valves = pipe.Valves.model_construct(
        **{**pipe.valves.model_dump(), "HTTP_READ_TIMEOUT_SECONDS": 0.3})
    out = await stream(pipe, body(GPT4O, "[emu:text first_byte_delay_ms=0 delay_ms=2000] x"))
    assert "sent nothing for 0 seconds" in (out.error or out.text)


async def test_exhausted_retries_say_how_many_times_it_tried(pipe, emulator, sleeps):
    out = await stream(pipe, body(GPT4O, "[emu:fail_then_ok status=502 times=9 key=z] x"))
    assert "Tried 3 times" in out.error and len(sleeps.calls) == 2


@pytest.mark.parametrize("quirk", ["[emu:default tail_delay_ms=30]",
                                   "[emu:text text=hi tail_delay_ms=30]",
                                   "[emu:reasoning tail_delay_ms=30]"])
async def test_finished_streams_give_their_connection_back_for_the_next_turn(pipe, emulator,
                                                                            quirk):
    # A new TCP+TLS handshake to openrouter.ai costs tens of ms per request (two per tool
    # round); a stream that ended normally must leave its connection in the pool.
    for n in range(3):
        out = await stream(pipe, body(NANO, f"{quirk} turn {n}"))
        assert out.error is None
    text = await pipe.pipe(body=body(GPT4O, "task", stream=False), __task__="title_generation",
                           __user__={"id": "u"})
    assert isinstance(text, str)
    peers = [tuple(r["peer"]) for r in posts(emulator)]
    assert len(peers) == 4 and len(set(peers)) == 1, peers


async def test_a_stopped_stream_does_not_reuse_its_half_read_connection(pipe, emulator):
    await stop_a_hanging_stream(pipe, emulator)
    out = await stream(pipe, body(GPT4O, "after the stop"))
    assert out.error is None and "after the stop" in out.text
    first, second = (tuple(r["peer"]) for r in posts(emulator))
    assert first != second


async def test_the_model_list_follows_a_valve_change_at_once(emulator):
    # Open WebUI hands pipes() a fresh Valves object each call; a changed value must count
    # (here: the attribution header of the next catalog fetch).
    now = [1000.0]
    p = Pipe(clock=lambda: now[0])
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test", APP_TITLE="Old")
    await p.pipes()
    await p.pipes()
    p.valves = p.Valves(BASE_URL=emulator.base_url, API_KEY="sk-or-test", APP_TITLE="New")
    now[0] += 4000  # past MODEL_CATALOG_REFRESH_SECONDS: the catalog is fetched again
    await p.pipes()
    for _ in range(100):  # the refresh may run in the background
        fetches = [r for r in emulator.requests if r["path"].endswith("/models")]
        if len(fetches) == 2:
            break
        await asyncio.sleep(0.01)
    assert [f["headers"].get("X-OpenRouter-Title") for f in fetches] == ["Old", "New"]
    await p.close()
