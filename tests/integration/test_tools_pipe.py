"""Tool calling end to end: pipe() against the emulator (every request SDK-validated)."""

from __future__ import annotations

import asyncio
import html
import json
import re
from typing import Any

from helpers import body, posts, stream

GPT4O = "openai/gpt-4o"
NANO = "openai/gpt-5-nano"
NO_TOOLS = "mistralai/mistral-7b-instruct"
ADMIN = {"id": "admin-1", "role": "admin", "valves": None}
CARD = re.compile(r'<details type="tool_calls" done="true" id="([^"]*)" name="([^"]*)" '
                  r'arguments="([^"]*)" result="([^"]*)" files="">\n<summary>Tool Executed'
                  r'</summary>\n</details>\n')


def cards(text: str) -> list[dict[str, Any]]:
    """Tool cards the way Open WebUI reads them: attributes html-unescaped, JSON-decoded."""
    return [{"id": html.unescape(m[0]), "name": html.unescape(m[1]),
             "arguments": json.loads(html.unescape(m[2])),
             "result": json.loads(html.unescape(m[3]))} for m in CARD.findall(text)]


def owui_tool(fn: Any, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"tool_id": "t", "callable": fn, "spec": {
        "name": name, "description": f"{name} tool",
        "parameters": params or {"type": "object", "properties": {
            "city": {"type": "string"}}, "required": ["city"]}}}


def outputs_sent(emulator: Any, index: int = -1) -> list[dict[str, Any]]:
    return [i for i in posts(emulator)[index]["json"]["input"]
            if i.get("type") == "function_call_output"]


async def test_single_call_card_and_answer_use_the_result(pipe, emulator, events):
    seen: list[dict[str, Any]] = []

    async def weather(city: str) -> str:
        seen.append({"city": city})
        return f"Sunny in {city} <b>"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=weather] weather?"),
                       __tools__={"weather": owui_tool(weather, "weather")},
                       __event_emitter__=events)
    assert seen == [{"city": "São Paulo"}]
    [card] = cards(out.text)
    assert card["name"] == "weather" and card["result"] == "Sunny in São Paulo <b>"
    assert card["arguments"] == '{"city":"São Paulo"}'
    assert out.text.endswith(f"Tool result for {card['id']}: Sunny in São Paulo <b>")
    first, second = posts(emulator)
    assert [t["name"] for t in first["json"]["tools"]] == ["weather"]
    assert first["json"]["tools"][0]["strict"] is True
    sent = second["json"]["input"]
    assert [i.get("type") for i in sent[-2:]] == ["function_call", "function_call_output"]
    assert sent[-1] == {"type": "function_call_output", "call_id": card["id"],
                        "output": "Sunny in São Paulo <b>"}
    statuses = [(s["description"], s["done"]) for s in events.of("status")]
    assert statuses[:2] == [("Running weather…", False), ("Ran weather", True)]
    assert out.usage["prompt_tokens"] > 0


async def test_usage_is_summed_over_rounds(pipe, emulator):
    async def weather(city: str) -> str:
        return "ok"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=weather] hi"),
                       __tools__={"weather": owui_tool(weather, "weather")})
    assert len(posts(emulator)) == 2
    gens = list(emulator.generations.values())
    assert len(gens) == 2
    assert out.usage["prompt_tokens"] == sum(g["tokens_prompt"] for g in gens)
    assert out.usage["completion_tokens"] == sum(g["tokens_completion"] for g in gens)
    assert out.usage["cost"] == round(sum(g["total_cost"] for g in gens), 8)


async def test_parallel_calls_run_concurrently_and_keep_call_order(pipe, emulator):
    started: list[str] = []
    both = asyncio.Event()

    async def slow_a(city: str) -> str:
        started.append("a")
        if len(started) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)  # deadlocks unless b runs at the same time
        return "A"

    async def slow_b(city: str) -> str:
        started.append("b")
        if len(started) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        return "B"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=slow_a,slow_b] go"),
                       __tools__={"slow_a": owui_tool(slow_a, "slow_a"),
                                  "slow_b": owui_tool(slow_b, "slow_b")})
    assert [(c["name"], c["result"]) for c in cards(out.text)] == [("slow_a", "A"),
                                                                  ("slow_b", "B")]
    calls = [i for i in posts(emulator)[1]["json"]["input"] if i["type"] == "function_call"]
    assert [o["call_id"] for o in outputs_sent(emulator)] == [c["call_id"] for c in calls]


async def test_chained_calls_each_round_sees_previous_outputs(pipe, emulator):
    async def first(city: str) -> str:
        return "one"

    async def second(city: str) -> str:
        return "two"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call chain=first,second] go"),
                       __tools__={"first": owui_tool(first, "first"),
                                  "second": owui_tool(second, "second")})
    assert [c["name"] for c in cards(out.text)] == ["first", "second"]
    assert len(posts(emulator)) == 3
    assert [o["output"] for o in outputs_sent(emulator)] == ["one", "two"]
    assert out.text.rstrip().endswith("two")


async def test_a_raising_tool_is_reported_to_the_model_and_the_chat_goes_on(pipe, emulator):
    def broken(city: str) -> str:  # sync: runs in a thread
        raise RuntimeError("database is down")

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=broken] go"),
                       __tools__={"broken": owui_tool(broken, "broken")})
    assert out.error is None
    [card] = cards(out.text)
    assert "RuntimeError: database is down" in card["result"]
    [sent] = outputs_sent(emulator)
    assert set(sent) == {"type", "call_id", "output"}  # no status: failed
    assert "failed" in sent["output"] and "database is down" in sent["output"]
    assert "database is down" in out.text.split("</details>")[-1]  # the model saw it


async def test_a_hanging_tool_times_out(pipe, emulator):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), "TOOL_TIMEOUT_SECONDS": 1})
    never = asyncio.Event()

    async def hang(city: str) -> str:
        await never.wait()
        return "never"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=hang] go"),
                       __tools__={"hang": owui_tool(hang, "hang")})
    [card] = cards(out.text)
    assert "did not finish within 1 seconds" in card["result"]
    assert "did not finish" in outputs_sent(emulator)[0]["output"]


async def test_invalid_arguments_are_reported_not_guessed(pipe, emulator):
    calls: list[Any] = []

    async def weather(city: str) -> str:
        calls.append(city)
        return "x"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=weather args={city:'Lisboa'}] go"),
                       __tools__={"weather": owui_tool(weather, "weather")})
    assert calls == []
    [sent] = outputs_sent(emulator)
    assert "not valid JSON" in sent["output"]
    assert "not valid JSON" in cards(out.text)[0]["result"]


async def test_round_limit_asks_for_a_final_answer_and_tells_the_user(pipe, emulator):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), "MAX_TOOL_ROUNDS": 2})
    count = 0

    async def again(city: str) -> str:
        nonlocal count
        count += 1
        return f"call {count}"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=again rounds=0] loop"),
                       __tools__={"again": owui_tool(again, "again")})
    assert count == 2
    sent = posts(emulator)
    assert len(sent) == 3
    last = sent[-1]["json"]
    assert last["tool_choice"] == "none" and "limit" in last["instructions"]
    assert [o["output"] for o in outputs_sent(emulator)] == ["call 1", "call 2"]
    assert "tool-call limit (2 rounds) was reached" in out.text
    assert out.text.rstrip().endswith("call 2")  # the final answer used the pending outputs


async def test_passthrough_streams_tool_calls_for_open_webui(pipe, emulator):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "TOOL_EXECUTION_MODE": "open_webui"})
    builtin = {"type": "function", "function": {
        "name": "get.time", "description": "time", "parameters": {"type": "object",
                                                                  "properties": {}}}}
    async def own(city: str) -> str:
        return "x"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=get_time n=2] go",
                                  tools=[builtin]),
                       __tools__={"own": owui_tool(own, "own")})
    # only body["tools"] is declared: Open WebUI executes exactly those from streamed calls
    assert [t["name"] for t in posts(emulator)[0]["json"]["tools"]] == ["get_time"]
    [chunk] = [c for c in out.chunks if c.get("choices") and
               c["choices"][0]["delta"].get("tool_calls")]
    calls = chunk["choices"][0]["delta"]["tool_calls"]
    assert chunk["choices"][0]["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in calls] == ["get.time", "get.time"]  # mapped back
    assert [c["index"] for c in calls] == [0, 1]
    assert len({c["id"] for c in calls}) == 2
    assert len(posts(emulator)) == 1 and "<details" not in out.text
    assert posts(emulator)[0]["json"]["tools"][0]["strict"] is False  # Open WebUI keeps nulls
    # Open WebUI then calls again with the results: they become function_call_output items
    again = body(GPT4O, "[emu:tool_call name=get_time n=2] go", tools=[builtin])
    again["messages"] += [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": c["id"], "type": "function", "function": c["function"]} for c in calls]},
        *({"role": "tool", "tool_call_id": c["id"], "content": "12:00"} for c in calls)]
    out2 = await stream(pipe, again)
    assert [o["output"] for o in outputs_sent(emulator)] == ["12:00", "12:00"]
    assert "Tool result for" in out2.text


async def test_model_without_tool_support_gets_no_tools_and_a_note(pipe, emulator, events):
    async def weather(city: str) -> str:
        return "x"

    out = await stream(pipe, body(NO_TOOLS, "hello"),
                       __tools__={"weather": owui_tool(weather, "weather")},
                       __event_emitter__=events)
    assert out.error is None and "You said: hello" in out.text
    assert "tools" not in posts(emulator)[0]["json"]
    assert [n["content"] for n in events.of("notification")] == [
        "Mistral: Mistral 7B Instruct can't use tools, so this answer was made without them."]


def builtin(name: str) -> dict[str, Any]:
    """An Open WebUI 0.12 built-in tool as it appears in `__tools__`."""
    async def run(**kwargs: Any) -> str:
        return f"{name} ran"
    return {"tool_id": f"builtin:{name}", "type": "builtin", "callable": run,
            "spec": {"name": name, "description": name, "parameters": {
                "type": "object", "properties": {"query": {"type": "string"}},
                "required": ["query"]}}}


def as_body_tools(tools: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": t["spec"]} for t in tools.values()]


async def test_builtin_tools_alone_give_no_note_on_models_without_tools(pipe, emulator,
                                                                        events):
    owui = {n: builtin(n) for n in ("get_current_timestamp", "search_chats")}
    out = await stream(pipe, body(NO_TOOLS, "hello", tools=as_body_tools(owui)),
                       __tools__=owui, __event_emitter__=events)
    assert out.error is None and "You said: hello" in out.text
    assert "tools" not in posts(emulator)[-1]["json"]
    assert events.of("notification") == []  # the user enabled no tools
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "TOOL_EXECUTION_MODE": "open_webui"})
    await stream(pipe, body(NO_TOOLS, "hello", tools=as_body_tools(owui)), __tools__=owui,
                 __event_emitter__=events)
    assert events.of("notification") == []


async def test_openrouter_search_replaces_open_webuis_own_web_tools(pipe, emulator):
    async def weather(city: str) -> str:
        return "x"

    owui = {"weather": owui_tool(weather, "weather"),
            **{n: builtin(n) for n in ("search_web", "fetch_url", "search_chats")}}
    meta = {"features": {"web_search": True}}
    await stream(pipe, body(GPT4O, "news?", tools=as_body_tools(owui)), __tools__=owui,
                 __metadata__=meta, __user__=ADMIN)  # outside Open WebUI only admins search
    sent = posts(emulator)[-1]["json"]["tools"]
    assert [t.get("name") or t["type"] for t in sent] == [
        "search_chats", "weather", "openrouter:web_search"]
    await stream(pipe, body(GPT4O, "news?", tools=as_body_tools(owui)), __tools__=owui)
    assert [t["name"] for t in posts(emulator)[-1]["json"]["tools"]] == [
        "fetch_url", "search_chats", "search_web", "weather"]  # search off: Open WebUI's
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "TOOL_EXECUTION_MODE": "open_webui"})
    await stream(pipe, body(GPT4O, "news?", tools=as_body_tools(owui)), __tools__=owui,
                 __metadata__=meta, __user__=ADMIN)
    assert [t.get("name") or t["type"] for t in posts(emulator)[-1]["json"]["tools"]] == [
        "search_chats", "weather", "openrouter:web_search"]


async def test_web_search_only_when_the_user_turns_it_on(pipe, emulator, events):
    meta_off = {"features": {"web_search": False}}
    await stream(pipe, body(GPT4O, "hi"), __metadata__=meta_off)
    assert "tools" not in posts(emulator)[-1]["json"]
    out = await stream(pipe, body(GPT4O, "[emu:web_search] capital?"),
                       __metadata__={"features": {"web_search": True}},
                       __event_emitter__=events, __user__=ADMIN)
    assert posts(emulator)[-1]["json"]["tools"] == [
        {"type": "openrouter:web_search", "parameters": {"max_results": 5}}]
    sources = events.of("citation")
    assert [s["source"]["url"] for s in sources] == [
        "https://en.wikipedia.org/wiki/Lisbon", "https://example.org/lisboa"]
    assert out.text.endswith(" [1][2]")


async def test_web_plugin_for_models_without_tools_and_admin_always(pipe, emulator):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), "WEB_SEARCH": "always",
                                 "WEB_SEARCH_MAX_RESULTS": 3})
    await stream(pipe, body(NO_TOOLS, "hi"))
    assert posts(emulator)[-1]["json"]["plugins"] == [{"id": "web", "max_results": 3}]


async def test_citation_numbers_stay_stable_across_tool_rounds(pipe, emulator, events):
    async def lookup(city: str) -> str:
        return "found"

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=lookup cite] go"),
                       __tools__={"lookup": owui_tool(lookup, "lookup")},
                       __event_emitter__=events)
    urls = [s["source"]["url"] for s in events.of("citation")]
    assert urls == ["https://en.wikipedia.org/wiki/Lisbon", "https://example.org/lisboa",
                    "https://rio.example/tejo"]  # each URL once, numbered in order
    before, after = out.text.split("</details>")
    assert "[1][2]" in before
    assert after.rstrip().endswith("[2][3]")  # example.org keeps number 2 in round 2


async def test_mcp_servers_from_the_valve_are_all_sent(pipe, emulator):
    servers = [{"server_label": "docs", "server_url": "https://mcp.example/docs",
                "require_approval": "never"},
               {"server_label": "git", "server_url": "https://mcp.example/git",
                "allowed_tools": ["search"], "headers": {"X-Key": "k"}}]
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "REMOTE_MCP_SERVERS_JSON": json.dumps(servers)})
    await stream(pipe, body(GPT4O, "hi"))
    assert posts(emulator)[-1]["json"]["tools"] == [{"type": "mcp", **s} for s in servers]


async def test_bad_mcp_json_never_breaks_the_model_list_or_chats(pipe, emulator, events):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "REMOTE_MCP_SERVERS_JSON": '[{"server_label": "x"}]'})
    models = [m["id"] for m in await pipe.pipes()]
    assert GPT4O in models and not any(m.startswith("_status") for m in models)
    out = await stream(pipe, body(GPT4O, "hi"), __event_emitter__=events)
    assert out.error is None and out.text.startswith("You said: hi")
    assert "tools" not in posts(emulator)[-1]["json"]  # MCP is off for this request
    [note] = [n["content"] for n in events.of("notification")]
    assert note.startswith("Remote MCP servers are off for this answer: The "
                           "REMOTE_MCP_SERVERS_JSON valve server #1 (x) needs a server_url")
    title = await pipe.pipe(body=body(GPT4O, "title?", stream=False), __task__="title_generation",
                            __user__={"id": "u", "role": "user"})
    assert title == "You said: title?"


async def test_breaker_pauses_only_the_failing_tool(pipe, emulator):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), "TOOL_BREAKER_THRESHOLD": 2})
    runs = {"flaky": 0, "fine": 0}

    async def flaky(city: str) -> str:
        runs["flaky"] += 1
        raise ValueError("nope")

    async def fine(city: str) -> str:
        runs["fine"] += 1
        return "ok"

    tools = {"flaky": owui_tool(flaky, "flaky"), "fine": owui_tool(fine, "fine")}
    for _ in range(3):
        out = await stream(pipe, body(GPT4O, "[emu:tool_call name=flaky,fine] go"),
                           __tools__=tools)
    assert runs == {"flaky": 2, "fine": 3}
    assert "paused" in cards(out.text)[0]["result"]
    other_user = {"id": "user-2", "role": "user", "valves": None}
    await stream(pipe, body(GPT4O, "[emu:tool_call name=flaky] go"), __tools__=tools,
                 __user__=other_user)
    assert runs["flaky"] == 3  # another user's breaker is closed
    health = await pipe.pipe(body={"model": "openrouter._health", "stream": False,
                                   "messages": [{"role": "user", "content": "json"}]},
                             __user__={"id": "admin", "role": "admin"})
    assert json.loads(health)["breakers"]["user-1/flaky"] == {"failures": 2, "open": True}


async def test_reasoning_items_are_replayed_verbatim_across_tool_rounds(pipe, emulator):
    async def weather(city: str) -> str:
        return "ok"

    out = await stream(pipe, body(NANO, "[emu:tool_call name=weather] go"),
                       __tools__={"weather": owui_tool(weather, "weather")})
    assert out.error is None
    first, second = posts(emulator)
    assert first["json"]["include"] == ["reasoning.encrypted_content"]
    round_one = [i for i in second["json"]["input"] if i.get("type") in ("reasoning",
                                                                        "function_call")]
    assert [i["type"] for i in round_one] == ["reasoning", "function_call"]
    assert round_one[0]["encrypted_content"].startswith("gAAAAAB")
    assert set(round_one[0]) == {"id", "type", "status", "summary", "encrypted_content",
                                 "format"}  # the output item as streamed, nothing dropped


async def test_checkpoint_seam_sees_each_rounds_items_before_its_cards(pipe, emulator):
    seen: list[list[dict[str, Any]]] = []

    async def checkpoint(turn: Any, items: list[dict[str, Any]]) -> str:
        seen.append(items)
        return f"<!-- marker {len(seen)} -->\n"

    pipe._checkpoint = checkpoint  # type: ignore[method-assign]

    async def weather(city: str) -> str:
        return "sunny"

    out = await stream(pipe, body(NANO, "[emu:tool_call name=weather] go"),
                       __tools__={"weather": owui_tool(weather, "weather")})
    assert [[i["type"] for i in items] for items in seen] == [
        ["reasoning", "function_call", "function_call_output"], ["reasoning"]]
    assert seen[0][2]["output"] == "sunny"
    assert out.text.index("<!-- marker 1 -->") < out.text.index("<details type=\"tool_calls\"")
    assert out.text.index("<!-- marker 2 -->") > out.text.index("</details>")


async def test_open_webui_prompt_based_tool_task_is_answered_without_a_request(pipe, emulator):
    task = {**body(GPT4O, "which tools?", stream=False)}
    answer = await pipe.pipe(body=task, __task__="function_calling",
                             __user__={"id": "u", "role": "user"})
    assert answer == '{"tool_calls": []}'
    assert posts(emulator) == []
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "TOOL_EXECUTION_MODE": "open_webui"})
    answer = await pipe.pipe(body=task, __task__="function_calling",
                             __user__={"id": "u", "role": "user"})
    assert answer == "You said: which tools?" and len(posts(emulator)) == 1


async def test_nulls_for_optional_arguments_are_dropped_in_strict_mode(pipe, emulator):
    got: list[dict[str, Any]] = []

    async def search(query: str, limit: int = 5) -> str:
        got.append({"query": query, "limit": limit})
        return "found"

    params = {"type": "object", "properties": {"query": {"type": "string"},
                                               "limit": {"type": "integer"}},
              "required": ["query"]}
    args = json.dumps({"query": "q", "limit": None})
    await stream(pipe, body(GPT4O, f"[emu:tool_call name=search args='{args}'] go"),
                 __tools__={"search": owui_tool(search, "search", params)})
    sent = posts(emulator)[0]["json"]["tools"][0]["parameters"]
    assert sent["properties"]["limit"]["type"] == ["integer", "null"]
    assert got == [{"query": "q", "limit": 5}]


async def test_nulls_for_optional_nested_arguments_are_dropped(pipe, emulator):
    got: list[dict[str, Any]] = []

    async def search(query: str, opts: dict[str, Any] | None = None) -> str:
        got.append({"query": query, "opts": opts})
        return "found"

    params = {"type": "object", "properties": {
        "query": {"type": "string"},
        "opts": {"type": "object", "properties": {"limit": {"type": "integer"},
                                                  "tag": {"type": ["string", "null"]}}}},
        "required": ["query"]}
    args = json.dumps({"query": "q", "opts": {"limit": None, "tag": None}})
    await stream(pipe, body(GPT4O, f"[emu:tool_call name=search args='{args}'] go"),
                 __tools__={"search": owui_tool(search, "search", params)})
    sent = posts(emulator)[0]["json"]["tools"][0]
    assert sent["strict"] is True
    assert sent["parameters"]["properties"]["opts"]["properties"]["limit"]["type"] == [
        "integer", "null"]
    assert got == [{"query": "q", "opts": {"tag": None}}]  # `tag` was nullable: kept


async def test_emulator_tool_rounds_and_citations_are_sdk_valid(emulator):
    import aiohttp
    from sdk_validation import parse_sse, validate_stream_event

    base = {"model": GPT4O, "stream": True, "store": False, "tools": [
        {"type": "function", "name": "a", "parameters": {"type": "object"}}]}
    async with aiohttp.ClientSession() as http:
        for spec in ("tool_call name=a,a cite", "tool_call chain=a,a rounds=0",
                     "web_search annotation_events=1"):
            payload = {**base, "input": [{"role": "user", "content": "hi"}]}
            async with http.post(f"{emulator.base_url}/responses", json=payload, headers={
                    "Authorization": "Bearer k", "X-Emulator-Scenario": spec}) as r:
                assert r.status == 200
                events = parse_sse(await r.read())
            for ev in events:
                validate_stream_event(ev)
        bad = {**base, "tools": [{"type": "function", "name": "a.b"}],
               "input": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{emulator.base_url}/responses", json=bad,
                             headers={"Authorization": "Bearer k"}) as r:
            assert r.status == 400 and "does not match pattern" in await r.text()
        orphan = {**base, "input": [{"role": "user", "content": "hi"}, {
            "type": "function_call_output", "call_id": "nope", "output": "x"}]}
        async with http.post(f"{emulator.base_url}/responses", json=orphan,
                             headers={"Authorization": "Bearer k"}) as r:
            assert r.status == 400 and "No tool call found" in await r.text()
    emulator.requests.clear()  # the deliberately bad requests are not the pipe's


async def test_long_results_are_cut_in_the_card_but_sent_to_the_model(pipe, emulator):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), "TOOL_CARD_MAX_CHARS": 100,
                                 "TOOL_RESULT_MAX_CHARS": 3000})
    big = "x" * 5000

    async def dump(city: str) -> str:
        return big

    out = await stream(pipe, body(GPT4O, "[emu:tool_call name=dump] go"),
                       __tools__={"dump": owui_tool(dump, "dump")})
    [card] = cards(out.text)
    assert card["result"].startswith("x" * 100 + "\n…[truncated: ")
    assert len(card["result"]) < 150
    [sent] = outputs_sent(emulator)
    assert sent["output"] == "x" * 3000 + "\n…[truncated: 2,000 more characters]"


async def test_passthrough_checkpoints_the_rounds_reasoning_and_calls(pipe, emulator):
    pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(),
                                 "TOOL_EXECUTION_MODE": "open_webui"})
    seen: list[list[str]] = []

    async def checkpoint(turn: Any, items: list[dict[str, Any]]) -> str:
        seen.append([i["type"] for i in items])
        return "<!-- marker -->\n"

    pipe._checkpoint = checkpoint  # type: ignore[method-assign]
    tool = {"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}
    out = await stream(pipe, body(NANO, "[emu:tool_call name=t] go", tools=[tool]))
    assert seen == [["reasoning", "function_call"]]
    texts = [c["choices"][0]["delta"] for c in out.chunks if c.get("choices")]
    marker_at = next(i for i, d in enumerate(texts) if d.get("content") == "<!-- marker -->\n")
    calls_at = next(i for i, d in enumerate(texts) if d.get("tool_calls"))
    assert marker_at < calls_at


async def test_a_non_streamed_chat_runs_tools_too(pipe, emulator):
    # "Stream Chat Response" off in Open WebUI sends stream: false; tools must not vanish.
    async def weather(city: str) -> str:
        return f"Rain in {city}"

    text = await pipe.pipe(body=body(GPT4O, "[emu:tool_call name=weather] weather?",
                                     stream=False),
                           __user__={"id": "u1", "role": "user", "valves": None},
                           __tools__={"weather": owui_tool(weather, "weather")})
    assert isinstance(text, str)
    [card] = cards(text)
    assert card["result"] == "Rain in São Paulo"
    assert text.endswith(f"Tool result for {card['id']}: Rain in São Paulo")
    assert len(posts(emulator)) == 2


async def test_a_non_streamed_chat_that_fails_before_any_text_raises_the_reason(pipe):
    import pytest

    from openrouter_responses_pipe import PipeError

    with pytest.raises(PipeError, match=r"402|credits"):
        await pipe.pipe(body=body(GPT4O, "[emu:http_error status=402] hi", stream=False),
                        __user__={"id": "u1", "role": "user", "valves": None})


async def test_a_non_streamed_chat_in_passthrough_mode_still_runs_its_tools(pipe, emulator):
    # Open WebUI runs tool calls only from streamed answers: the pipe must run them itself.
    async def weather(city: str) -> str:
        return f"Fog in {city}"

    pipe.valves = pipe.valves.model_copy(update={"TOOL_EXECUTION_MODE": "open_webui"})
    text = await pipe.pipe(body=body(GPT4O, "[emu:tool_call name=weather] weather?",
                                     stream=False),
                           __user__={"id": "u1", "role": "user", "valves": None},
                           __tools__={"weather": owui_tool(weather, "weather")})
    [card] = cards(text)
    assert card["result"] == "Fog in São Paulo"
    assert text.endswith("Fog in São Paulo")


async def test_a_non_streamed_chat_keeps_its_thinking_as_a_reasoning_block(pipe):
    text = await pipe.pipe(body=body(NANO, "[emu:reasoning style=summary] hi", stream=False),
                           __user__={"id": "u1", "role": "user", "valves": None})
    block, _, answer = text.partition("</details>\n")
    assert block.startswith('<details type="reasoning" done="true" duration="0">\n'
                            "<summary>Thought for less than a second</summary>\n> ")
    assert answer and "<details" not in answer


async def test_odd_schemas_and_deep_arguments_never_end_the_turn(pipe, emulator):
    seen: list[dict[str, Any]] = []

    async def odd(**kwargs: Any) -> str:
        seen.append(kwargs)
        return "ok"

    params = {"type": "object", "properties": {
        "a": {"anyOf": 5}, "b": {"enum": "abc"}, "c": {"$ref": "#/$defs/loop"}},
        "$defs": {"loop": {"anyOf": [{"$ref": "#/$defs/loop"}]}}}
    args = json.dumps({"a": None, "b": None, "c": None})
    out = await stream(pipe, body(GPT4O, f"[emu:tool_call name=odd args='{args}'] go"),
                       __tools__={"odd": owui_tool(odd, "odd", params)})
    assert out.error is None and cards(out.text)[0]["result"] == "ok"
    assert len(seen) == 1 and seen[0]["c"] is None  # a $ref cycle keeps the model's null
