"""The pure transformer: Open WebUI chat body -> Responses request."""

from __future__ import annotations

import pytest

from openrouter_responses_pipe import (
    CatalogEntry,
    Pricing,
    ReasoningSpec,
    RequestSettings,
    UserValves,
    Valves,
    build_responses_request,
    nearest_effort,
    parse_chat_request,
)


def entry(id="openai/gpt-4o", *, params=("temperature", "top_p", "max_tokens"),
          reasoning=None, inputs=("text", "image"), max_out=16384) -> CatalogEntry:
    return CatalogEntry(
        id=id, name=id, canonical_slug=id, description="", context_length=128000,
        max_output_tokens=max_out, input_modalities=frozenset(inputs),
        output_modalities=frozenset({"text"}), supported_parameters=frozenset(params),
        pricing=Pricing(), reasoning=reasoning)


def settings(**valves) -> RequestSettings:
    return RequestSettings.merge(Valves(API_KEY="k", **valves), None)


def transform(body, model=None, task=None, metadata=None, **valves):
    req = parse_chat_request({"model": "openrouter.openai/gpt-4o", **body}, {"id": "u1"},
                             metadata, task)
    return build_responses_request(req, model or entry(), settings(**valves))


def test_system_messages_become_instructions_and_history_typed_items():
    plan = transform({"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "developer", "content": "Use metric."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]})
    p = plan.payload
    assert p["instructions"] == "Be terse.\n\nUse metric."
    assert p["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": "Hello!"},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Weather?"}]}]
    assert p["model"] == "openai/gpt-4o" and p["store"] is False


def test_thinking_blocks_are_not_replayed_as_assistant_text():
    plan = transform({"messages": [
        {"role": "assistant", "content": '<details type="reasoning" done="true" duration="2">\n'
                                         "<summary>Thought</summary>\n> hmm\n</details>\nAnswer"},
        {"role": "user", "content": "next"}]})
    assert plan.payload["input"][0] == {"type": "message", "role": "assistant",
                                        "content": "Answer"}


def test_max_tokens_becomes_max_output_tokens_clamped_to_the_model_limit():
    assert transform({"messages": [], "max_tokens": 500}).payload["max_output_tokens"] == 500
    assert transform({"messages": [], "max_tokens": 10**6}).payload["max_output_tokens"] == 16384


def test_sampling_params_pass_only_when_the_model_supports_them():
    p = transform({"messages": [], "temperature": 0.2, "top_k": 5, "seed": 7,
                   "stop": ["x"]}).payload
    assert p["temperature"] == 0.2
    assert "top_k" not in p and "stop" not in p and "seed" not in p
    wide = entry(params=("top_k", "stop", "seed", "frequency_penalty", "parallel_tool_calls"))
    p = transform({"messages": [], "top_k": 5, "stop": ["x"], "seed": 7,
                   "frequency_penalty": 0.5, "parallel_tool_calls": False}, wide).payload
    assert (p["top_k"], p["stop"], p["frequency_penalty"]) == (5, ["x"], 0.5)
    assert p["parallel_tool_calls"] is False
    assert "seed" not in p  # not part of the Responses schema


def test_response_format_becomes_flat_text_format():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {"messages": [], "response_format": {
        "type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}}
    p = transform(body, entry(params=("structured_outputs",))).payload
    assert p["text"] == {"format": {"type": "json_schema", "name": "out", "schema": schema,
                                    "strict": True}}
    assert "text" not in transform(body, entry(params=())).payload


def test_builtin_tools_in_the_body_do_not_reach_the_request():
    body = {"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "get_current_timestamp"}}]}
    assert "tools" not in transform(body).payload


GPT5 = entry("openai/gpt-5-nano", params=("reasoning", "tools"),
             reasoning=ReasoningSpec(mandatory=True,
                                     supported_efforts=("high", "medium", "low", "minimal")))
R1 = entry("deepseek/deepseek-r1", params=("reasoning",), reasoning=ReasoningSpec(mandatory=True))
CLAUDE = entry("anthropic/claude-sonnet-4", params=("reasoning",),
               reasoning=ReasoningSpec(mandatory=False))


def test_reasoning_effort_from_body_wins_and_is_mapped_to_supported_efforts():
    p = transform({"messages": [], "reasoning_effort": "xhigh"}, GPT5).payload
    assert p["reasoning"] == {"effort": "high", "summary": "auto"}
    assert p["include"] == ["reasoning.encrypted_content"]


def test_valve_default_effort_and_summary_mode():
    p = transform({"messages": []}, GPT5, REASONING_EFFORT="low",
                  REASONING_SUMMARY="detailed").payload
    assert p["reasoning"] == {"effort": "low", "summary": "detailed"}
    assert "summary" not in transform({"messages": []}, GPT5,
                                      REASONING_SUMMARY="disabled").payload.get("reasoning", {})


def test_non_openai_reasoning_models_get_no_summary_request():
    assert "reasoning" not in transform({"messages": []}, CLAUDE).payload
    p = transform({"messages": []}, CLAUDE, REASONING_EFFORT="medium").payload
    assert p["reasoning"] == {"effort": "medium"}


def test_models_without_reasoning_get_no_reasoning_field():
    assert "reasoning" not in transform({"messages": [], "reasoning_effort": "high"}).payload


@pytest.mark.parametrize(("model", "expected"), [
    (GPT5, "minimal"), (R1, "minimal"), (CLAUDE, "none")])
def test_task_calls_use_no_or_the_lowest_reasoning(model, expected):
    p = transform({"messages": [{"role": "user", "content": "title?"}], "stream": True},
                  model, task="title_generation", REASONING_EFFORT="high").payload
    assert p["reasoning"] == {"effort": expected}
    assert p["stream"] is False and "include" not in p


def test_nearest_effort_never_disables_mandatory_reasoning():
    spec = ReasoningSpec(mandatory=True, supported_efforts=("high", "medium", "low", "minimal"))
    assert nearest_effort("none", spec) == "minimal"
    assert nearest_effort("max", spec) == "high"
    assert nearest_effort("medium", ReasoningSpec()) == "medium"


def test_images_dropped_with_a_note_for_text_only_models():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                            "detail": "high"}}]}]}
    seeing = transform(body).payload["input"][0]["content"]
    assert seeing[1] == {"type": "input_image", "image_url": "data:image/png;base64,AAAA",
                         "detail": "high"}
    plan = transform(body, entry(inputs=("text",)))
    assert plan.payload["input"][0]["content"] == [{"type": "input_text",
                                                    "text": "what is this"}]
    assert "can't read images" in plan.notes[0]


def test_tool_history_becomes_function_call_items():
    p = transform({"messages": [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]}).payload
    assert p["input"][1:] == [
        {"type": "function_call", "call_id": "call_1", "name": "now", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]


def test_session_id_is_a_stable_hash_not_the_chat_id():
    a = transform({"messages": []}, metadata={"chat_id": "chat-123"}).payload["session_id"]
    b = transform({"messages": []}, metadata={"chat_id": "chat-123"}).payload["session_id"]
    assert a == b and "chat-123" not in a
    off = transform({"messages": []}, metadata={"chat_id": "c"}, STICKY_SESSION_ROUTING=False)
    assert "session_id" not in off.payload


def test_user_valves_inherit_unless_set():
    valves = Valves(REASONING_EFFORT="high", SHOW_FINAL_STATUS=False)
    inherit = RequestSettings.merge(valves, UserValves())
    assert (inherit.reasoning_effort, inherit.show_final_status) == ("high", False)
    explicit = RequestSettings.merge(valves, UserValves(REASONING_EFFORT="INHERIT",
                                                        SHOW_FINAL_STATUS="on"))
    assert (explicit.reasoning_effort, explicit.show_final_status) == ("high", True)
    own = RequestSettings.merge(valves, UserValves(REASONING_EFFORT="low"))
    assert own.reasoning_effort == "low"
