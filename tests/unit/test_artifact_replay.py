"""Replay of stored items at their markers: order, orphan repair, retention, pruning (issue #5)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    MISSING_OUTPUT,
    ArtifactCodec,
    CatalogEntry,
    Pricing,
    ReplayPolicy,
    RequestSettings,
    Valves,
    build_responses_request,
    marker_block,
    parse_chat_request,
    passthrough_id,
    passthrough_row_item,
    repair_orphans,
    replay_items,
    sent_reasoning_ids,
    storable,
)

R1 = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "blob1"}
R2 = {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "blob2"}
C1 = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"}
O1 = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
IDS = {"r1": "a" * 32, "c1": "b" * 32, "o1": "c" * 32, "r2": "d" * 32}
ARTIFACTS = {IDS["r1"]: R1, IDS["c1"]: C1, IDS["o1"]: O1, IDS["r2"]: R2}


def user(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def assistant(text: str) -> dict:
    return {"type": "message", "role": "assistant", "content": text}


def tool_turn_text() -> str:
    card = ('<details type="tool_calls" done="true" id="call_1" name="weather" '
            'arguments="{}" result="&quot;sunny&quot;">\n<summary>Tool Executed</summary>\n'
            '</details>\n')
    return ("Let me check." + marker_block([IDS["r1"], IDS["c1"], IDS["o1"]]) + card
            + "It is sunny." + marker_block([IDS["r2"]]))


def kinds(items: list[dict]) -> list[str]:
    return [i.get("type") if i.get("type") != "message" else i["role"] for i in items]


def test_a_tool_turn_replays_in_the_order_it_happened():
    items = [user("weather?"), assistant(tool_turn_text()), user("thanks")]
    out = replay_items(items, ARTIFACTS, ReplayPolicy())
    assert out == [user("weather?"), R1, assistant("Let me check."), C1, O1, R2,
                   assistant("It is sunny."), user("thanks")]


def test_plain_turn_reasoning_comes_before_the_answer_not_after():
    text = "The answer is 4." + marker_block([IDS["r2"]])
    out = replay_items([user("2+2?"), assistant(text), user("and 3+3?")], ARTIFACTS,
                       ReplayPolicy())
    assert out == [user("2+2?"), R2, assistant("The answer is 4."), user("and 3+3?")]


def test_missing_items_are_skipped_and_markers_never_reach_the_model():
    items = [user("q"), assistant(tool_turn_text()), user("next")]
    out = replay_items(items, {IDS["c1"]: C1}, ReplayPolicy())  # reasoning+output lost
    assert [k for k in kinds(out)] == ["user", "assistant", "function_call",
                                       "function_call_output", "assistant", "user"]
    assert out[3] == {"type": "function_call_output", "call_id": "call_1",
                      "output": MISSING_OUTPUT}
    assert all("[orp:" not in str(i.get("content")) for i in out)


def test_tool_cards_of_lost_calls_stay_as_the_only_record():
    items = [user("q"), assistant(tool_turn_text()), user("next")]
    out = replay_items(items, {}, ReplayPolicy())
    texts = [i["content"] for i in out if i.get("role") == "assistant"]
    assert any("[Tool call weather({}) returned: sunny]" in t for t in texts)
    assert not any("<details" in t for t in texts)


def test_next_reply_retention_replays_only_the_latest_replies_reasoning():
    first = "One." + marker_block([IDS["r1"]])
    second = "Two." + marker_block([IDS["r2"]])
    items = [user("a"), assistant(first), user("b"), assistant(second), user("c")]
    conv = replay_items(items, ARTIFACTS, ReplayPolicy("conversation"))
    assert [i for i in conv if i.get("type") == "reasoning"] == [R1, R2]
    nxt = replay_items(items, ARTIFACTS, ReplayPolicy("next_reply"))
    assert [i for i in nxt if i.get("type") == "reasoning"] == [R2]
    off = replay_items(items, ARTIFACTS, ReplayPolicy("disabled"))
    assert [i for i in off if i.get("type") == "reasoning"] == []
    assert [i["content"] for i in off if i.get("role") == "assistant"] == ["One.", "Two."]


def test_disabled_retention_stores_no_reasoning_but_keeps_tools():
    assert not storable(R1, "disabled") and storable(R1, "next_reply")
    assert storable(C1, "disabled") and storable(O1, "disabled")
    assert not storable({"type": "message", "role": "assistant"}, "conversation")


def test_old_long_tool_outputs_are_pruned_with_a_visible_note():
    long = {**O1, "output": "A" * 300 + "B" * 1000 + "C" * 200}
    arts = {**ARTIFACTS, IDS["o1"]: long}
    items = [user("q"), assistant(tool_turn_text())]
    for n in range(3):
        items += [user(f"q{n}"), assistant(f"a{n}")]
    pruned = replay_items(items, arts, ReplayPolicy(keep_tool_turns=3))
    (out,) = [i for i in pruned if i.get("type") == "function_call_output"]
    assert "tool output pruned" in out["output"] and "more than 3 replies old" in out["output"]
    assert out["output"].startswith("A" * 256) and out["output"].endswith("C" * 128)
    kept = replay_items(items, arts, ReplayPolicy(keep_tool_turns=4))
    assert [i for i in kept if i.get("type") == "function_call_output"] == [long]
    never = replay_items(items, arts, ReplayPolicy(keep_tool_turns=0))
    assert [i for i in never if i.get("type") == "function_call_output"] == [long]


def test_passthrough_reasoning_is_reattached_before_its_call():
    pid = passthrough_id("chat-1", "call_1")
    arts = {pid: passthrough_row_item([R1], "call_1")}
    items = [user("q"), C1, O1]
    assert replay_items(items, arts, ReplayPolicy()) == [user("q"), R1, C1, O1]
    assert passthrough_id("chat-1", "call_1") != passthrough_id("chat-2", "call_1")


def test_orphans_are_repaired():
    stray = {"type": "function_call_output", "call_id": "nobody", "output": "x"}
    dup = dict(C1)
    items = [user("q"), stray, C1, dup, user("next"), O1, R1]
    assert repair_orphans(items) == [
        user("q"), C1, {"type": "function_call_output", "call_id": "call_1",
                        "output": MISSING_OUTPUT}, user("next")]


ITEMS = st.lists(st.sampled_from([
    user("u"), assistant("a"), R1, R2, C1, O1,
    {"type": "function_call", "call_id": "call_2", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_2", "output": "2"},
    {"type": "function_call_output", "call_id": "call_9", "output": "9"}]), max_size=12)


@settings(max_examples=400)
@given(ITEMS)
def test_repaired_histories_are_always_acceptable(items):
    out = repair_orphans(items)
    calls = [i["call_id"] for i in out if i.get("type") == "function_call"]
    outputs = [i["call_id"] for i in out if i.get("type") == "function_call_output"]
    assert sorted(calls) == sorted(outputs) and len(set(calls)) == len(calls)
    reasoning = [i["id"] for i in out if i.get("type") == "reasoning"]
    assert len(set(reasoning)) == len(reasoning)
    for index, item in enumerate(out):
        if item.get("type") == "function_call_output":  # its call came first
            assert item["call_id"] in [i.get("call_id") for i in out[:index]
                                       if i.get("type") == "function_call"]
        if item.get("type") == "reasoning":  # never dangling at the end of a turn
            assert index + 1 < len(out) and out[index + 1].get("role") != "user"
    assert repair_orphans(out) == out


ENTRY = CatalogEntry(
    id="openai/gpt-5-nano", name="nano", canonical_slug="openai/gpt-5-nano", description="",
    context_length=400000, max_output_tokens=None, input_modalities=frozenset({"text"}),
    output_modalities=frozenset({"text"}),
    supported_parameters=frozenset({"reasoning", "include_reasoning", "tools"}),
    pricing=Pricing(), reasoning=None)


def test_the_transformer_replays_loaded_artifacts_purely():
    body = {"model": "openrouter.openai/gpt-5-nano", "stream": True, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": tool_turn_text()},
        {"role": "user", "content": "thanks"}]}
    req = parse_chat_request(body, {"id": "u"}, {"chat_id": "c"}, None)
    settings = RequestSettings.merge(Valves(API_KEY="k"), None)
    payload = build_responses_request(req, ENTRY, settings, ARTIFACTS).payload
    assert kinds(payload["input"]) == ["user", "reasoning", "assistant", "function_call",
                                       "function_call_output", "reasoning", "assistant",
                                       "user"]
    bare = build_responses_request(req, ENTRY, settings).payload
    assert "[orp:" not in str(bare["input"]) and "reasoning" not in kinds(bare["input"])


def test_codec_of_settings_uses_the_admin_key_list():
    settings = RequestSettings.merge(Valves(API_KEY="k", ARTIFACT_ENCRYPTION_KEY="new, old"),
                                     None)
    assert ArtifactCodec.of(settings).keys == ("new", "old")


def test_reasoning_from_another_model_family_is_not_sent():
    text = "Four." + marker_block([IDS["r1"]])
    items = [user("2+2?"), assistant(text), user("next")]

    def sent_to(model: str) -> list[dict]:
        out = replay_items(items, ARTIFACTS, ReplayPolicy(model_id=model))
        return [i for i in out if i.get("type") == "reasoning"]

    r1 = {**R1, "format": "openai-responses-v1"}
    arts = {IDS["r1"]: r1}
    assert replay_items(items, arts, ReplayPolicy(model_id="openai/gpt-5"))[1] == r1
    assert [i for i in replay_items(items, arts, ReplayPolicy(model_id="anthropic/claude-4"))
            if i.get("type") == "reasoning"] == []
    assert sent_to("anthropic/claude-4") == [R1]   # no format: can't tell, sent
    claude = {IDS["r1"]: {**R1, "format": "anthropic-claude-v1"}}
    assert [i["format"] for i in replay_items(items, claude, ReplayPolicy(
        model_id="anthropic/claude-4")) if i.get("type") == "reasoning"] == ["anthropic-claude-v1"]
    assert len(replay_items(items, claude, ReplayPolicy(model_id="deepseek/r1"))) == 4


def test_markers_quoted_in_a_task_prompt_are_removed():
    prompt = "### Chat History:\nASSISTANT: Four." + marker_block([IDS["r1"]]) + "USER: next"
    [out] = replay_items([user(prompt)], ARTIFACTS, ReplayPolicy())
    text = out["content"][0]["text"]
    assert "[orp:" not in text and "reasoning" not in str(out)
    assert text.startswith("### Chat History:\nASSISTANT: Four.\n") and text.endswith("USER: next")


def test_reasoning_open_webui_wrote_back_as_think_text_is_not_sent_as_an_answer():
    items = [user("q"), assistant("<think>I should call weather.</think>"), C1, O1]
    assert replay_items(items, {}, ReplayPolicy()) == [user("q"), C1, O1]


def test_passthrough_reasoning_follows_retention_and_model_family():
    pid = passthrough_id("chat-1", "call_1")
    r1 = {**R1, "format": "openai-responses-v1"}
    arts = {pid: passthrough_row_item([r1], "call_1")}
    items = [user("q"), C1, O1]
    assert replay_items(items, arts, ReplayPolicy(reasoning="disabled")) == [user("q"), C1, O1]
    assert replay_items(items, arts, ReplayPolicy(model_id="anthropic/claude-4")) == [
        user("q"), C1, O1]
    assert replay_items(items, arts, ReplayPolicy(model_id="openai/gpt-5")) == [
        user("q"), r1, C1, O1]


def test_only_reasoning_put_into_the_request_counts_as_sent():
    pid = passthrough_id("chat-1", "call_1")
    r1 = {**R1, "format": "openai-responses-v1"}
    arts = {IDS["r1"]: r1, IDS["r2"]: R2, IDS["c1"]: C1, pid: passthrough_row_item([r1], "c")}
    assert sent_reasoning_ids([user("q"), R2, C1], arts) == (IDS["r2"],)
    assert set(sent_reasoning_ids([r1, C1], arts)) == {IDS["r1"], pid}
    assert sent_reasoning_ids([user("q"), C1], arts) == ()
