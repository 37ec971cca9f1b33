"""Malformed chat bodies never crash pipe() (issue #11, item 13).

Open WebUI hands the pipe whatever an API client (or an edited message) sent. The contract:
a stream gets chunks whose error names what was wrong; a task or `stream: false` call may
raise a PipeError (Open WebUI shows its str()); nothing else is ever raised, and the message
is specific (never "unexpected internal error").
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from captures import catalogs, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import Pipe, PipeError

ANSWER = next(c for c in streams() if c.name.startswith("test_prompt")).body
COMPLETED = json.dumps([json.loads(line[6:]) for line in ANSWER.decode().splitlines()
                        if line.startswith("data: {")][-1]["response"]).encode()
CATALOG = next(c for c in catalogs()).body
MODEL = json.loads(CATALOG)["data"][0]["id"]


class CannedResponse:
    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status, self.body = status, body
        self.headers = {"Content-Type": content_type}

    async def read(self) -> bytes:
        return self.body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.body), 4096):
            yield self.body[i:i + 4096]

    async def close(self) -> None:
        pass

    async def release(self) -> None:
        pass


class CannedTransport:
    """GET /models -> a real captured catalog; POST /responses -> a real captured stream."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def request(self, method: str, url: str, *, headers: Mapping[str, str],
                      body: bytes | None, connect_timeout: float, read_timeout: float
                      ) -> CannedResponse:
        if urllib.parse.urlsplit(url).path.endswith("/models"):  # any catalog query
            return CannedResponse(200, CATALOG, "application/json")
        self.sent.append(body or b"")
        if json.loads(body or b"{}").get("stream"):
            return CannedResponse(200, ANSWER, "text/event-stream")
        return CannedResponse(200, COMPLETED, "application/json")

    async def aclose(self) -> None:
        pass


async def call(pipe: Pipe, body: Any, **kwargs: Any) -> tuple[str, str | None]:
    """(text the user sees, error message) — raising only a PipeError for non-streams."""
    kwargs.setdefault("__user__", {"id": "u1", "role": "user"})
    result = await pipe.pipe(body, **kwargs)
    if isinstance(result, str):
        return result, None
    text, error = "", None
    async for chunk in result:
        if "error" in chunk:
            error = chunk["error"]["message"]
        for choice in chunk.get("choices") or ():
            text += (choice.get("delta") or {}).get("content") or ""
    return text, error


@pytest.fixture
def pipe() -> Pipe:
    p = Pipe(transport=CannedTransport())
    p.valves = p.Valves(API_KEY="sk-or-test", LOG_LEVEL="ERROR")
    return p


CASES = [
    ({"messages": [{"role": "assistant", "content": "x",
                    "tool_calls": [{"id": "c", "function": "get_weather"}]}]},
     "`messages[0].tool_calls[0].function` must be an object"),
    ({"max_tokens": math.inf}, "`max_tokens` must be a finite number"),
    ({"max_tokens": math.nan}, "`max_tokens` must be a finite number"),
    ({"max_tokens": 10**400}, "`max_tokens` must be a finite number"),
    ({"max_tokens": "lots"}, "`max_tokens` must be a number, not a string"),
    ({"messages": "hello"}, "`messages` must be a list, not a string"),
    ({"messages": ["hello"]}, "`messages[0]` must be an object, not a string"),
    ({"messages": [{"role": "assistant", "tool_calls": {"id": 1}}]},
     "`messages[0].tool_calls` must be a list"),
    ({"temperature": "hot"}, "`temperature` must be a number"),
    ({"seed": 10**30}, "`seed` must be a finite number"),
    ({"stop": [1, 2]}, "`stop` must be a string or a list of strings"),
    ({"model": ["x"]}, "`model` must be a string"),
    ({"response_format": {"type": "json_schema", "json_schema": "strict please"}},
     "`response_format.json_schema` must be an object"),
    ({"response_format": "json"}, "`response_format` must be an object"),
]


@pytest.mark.parametrize(("patch", "message"), CASES)
async def test_each_bad_shape_gets_a_specific_message(pipe: Pipe, patch: dict[str, Any],
                                                      message: str) -> None:
    body = {"model": f"openrouter.{MODEL}", "stream": True,
            "messages": [{"role": "user", "content": "hi"}], **patch}
    _, error = await call(pipe, body)
    assert error is not None and message in error and "could not be read" in error, error
    for kwargs in ({}, {"__task__": "title_generation"}):
        with pytest.raises(PipeError, match=message.replace("[", r"\[").replace("`", ".")):
            await call(pipe, {**body, "stream": False}, **kwargs)


@pytest.mark.parametrize("provider", [
    "[" * 200_000, '{"a":' * 100_000, {"preferred_max_latency": {"p50": math.nan}},
    {"preferred_min_throughput": math.inf}, '{"preferred_max_latency": 1e999}'])
async def test_unusable_routing_in_the_body_is_ignored_not_raised(pipe: Pipe,
                                                                  provider: Any) -> None:
    body = {"model": f"openrouter.{MODEL}", "stream": True, "provider": provider,
            "messages": [{"role": "user", "content": "hi"}]}
    text, error = await call(pipe, body)
    assert error is None and text
    sent = json.loads(pipe._client._transport.sent[-1])
    assert "provider" not in sent  # the bad setting was left out, never sent as null/NaN


async def test_features_as_a_list_and_odd_metadata_still_answer(pipe: Pipe) -> None:
    body = {"model": f"openrouter.{MODEL}", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    for meta in ({"features": ["web_search"]}, {"features": "on"}, ["not", "a", "dict"],
                 {"chat_id": {"x": 1}, "task": 5}):
        text, error = await call(pipe, body, __metadata__=meta)
        assert error is None and text, (meta, error)
    text, error = await call(pipe, {**body, "messages": [
        {"role": "user", "content": 5}, {"role": "user", "content": {"type": "text"}},
        {"role": "user", "content": [None, 3, {"type": ["x"]}, "hi"]}]})
    assert error is None and text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=12)
message_keys = st.sampled_from(["role", "content", "tool_calls", "tool_call_id", "name"])
messages = st.lists(st.one_of(
    json_values,
    st.dictionaries(message_keys, json_values, max_size=4),
    st.builds(lambda calls: {"role": "assistant", "content": "", "tool_calls": calls},
              st.lists(st.one_of(json_values, st.fixed_dictionaries(
                  {"id": json_values, "function": json_values})), max_size=2))), max_size=4)
body_keys = st.sampled_from(["messages", "max_tokens", "max_completion_tokens", "temperature",
                             "top_p", "seed", "stop", "tools", "response_format", "metadata",
                             "reasoning_effort", "parallel_tool_calls", "features", "stream"])
deep_json = st.integers(min_value=1, max_value=300_000).flatmap(
    lambda n: st.sampled_from(["[" * n, '{"a":' * n, "[" * n + "]" * n]))
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"model": st.just(f"openrouter.{MODEL}"), "stream": st.booleans(),
                           "messages": st.just([{"role": "user", "content": "hi"}]),
                           "provider": st.one_of(json_values, deep_json, st.fixed_dictionaries(
                               {"preferred_max_latency": json_values}))}),
    st.builds(lambda extra, msgs, stream_: {"model": f"openrouter.{MODEL}", "stream": stream_,
                                            "messages": msgs, **extra},
              st.dictionaries(body_keys, json_values, max_size=4), messages, st.booleans())
    | st.fixed_dictionaries({"model": st.just(f"openrouter.{MODEL}"), "stream": st.booleans(),
                             "response_format": st.fixed_dictionaries({
                                 "type": st.sampled_from(["json_schema", "json_object", "x"]),
                                 "json_schema": json_values})}))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, task=st.sampled_from([None, "title_generation"]),
       meta=st.one_of(st.none(), st.fixed_dictionaries({"features": json_values})))
def test_any_json_shaped_body_gets_an_answer_or_a_specific_message(pipe: Pipe, body: Any,
                                                                   task: Any, meta: Any
                                                                   ) -> None:
    async def run() -> None:
        try:
            _, error = await call(pipe, body, __task__=task, __metadata__=meta)
        except PipeError as exc:  # the contract for tasks and stream:false
            is_stream = isinstance(body, dict) and bool(body.get("stream")) and not task
            assert not is_stream, f"a stream raised: {exc}"
            error = str(exc)
        if error is not None:
            assert "unexpected internal error" not in error, error
    asyncio.run(run())
