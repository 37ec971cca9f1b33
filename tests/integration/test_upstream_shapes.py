"""Upstream answers in unexpected shapes, body read errors, and spent money that must not
disappear (issue #11 items 8, 9, 10, 16): pipe() end to end against the emulator."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from helpers import body, posts, stream

from openrouter_responses_pipe import Pipe, PipeError, UpstreamError

GPT4O = "openai/gpt-4o"
TEXT = "openai/gpt-3.5-turbo"
SOCKET = {"session_id": "sid-1", "chat_id": "chat-1", "message_id": "msg-1"}


def weather_tool() -> dict[str, Any]:
    async def weather(city: str) -> str:
        return f"Sunny in {city}"

    return {"weather": {"tool_id": "t", "callable": weather, "spec": {
        "name": "weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}}


# -- item 8: chat-style in-band errors and 200s that are not a stream -----------------------


async def test_a_chat_style_in_band_error_shows_the_providers_message(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:error_event form=chat] go"))
    assert "interrupted" in out.text
    assert "Provider disconnected unexpectedly" in out.text
    assert "Provider said (Emulated): provider connection reset" in out.text
    assert "before the answer was finished" not in out.text


async def test_a_chat_style_error_before_any_text_is_an_error_with_its_message(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:error_event form=chat after=0] go"))
    assert out.error is not None and "Provider disconnected unexpectedly" in out.error


async def test_an_html_page_with_status_200_is_named_with_its_title(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:wrong_body kind=html] go"))
    assert out.error is not None
    assert "OpenRouter answered with an HTML page, not a stream: “502 Bad Gateway”" in out.error
    assert "proxy" in out.error and "closed the stream" not in out.error
    assert len(posts(emulator)) == 1  # a page is not retried


async def test_a_plain_json_error_with_status_200_shows_the_providers_message(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:wrong_body kind=json] go"))
    assert out.error is not None
    assert ("OpenRouter answered with an error instead of a stream (code 502): Provider "
            "returned error. Provider said (Emulated): upstream model overloaded") in out.error


async def test_plain_text_with_status_200_is_named_with_a_snippet(pipe, emulator):
    out = await stream(pipe, body(GPT4O, "[emu:wrong_body kind=text] go"))
    assert ("OpenRouter answered with text/plain, not a stream: “upstream connect error or "
            "disconnect/reset before headers”") in out.error


async def test_a_task_answered_with_an_html_page_raises_the_specific_message(pipe, emulator):
    with pytest.raises(PipeError, match="answered with an HTML page, not JSON"):
        await pipe.pipe(body=body(GPT4O, "[emu:wrong_body kind=html] title", stream=False),
                        __user__={"id": "u", "role": "user"}, __task__="title_generation")


# -- item 9: body read errors are UpstreamErrors (retried, status entry, task message) --------


class _Resp:
    def __init__(self, status: int, body: bytes | BaseException,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self._body = status, body
        self.headers = headers or {"Content-Type": "application/json"}

    async def read(self) -> bytes:
        if isinstance(self._body, BaseException):
            raise self._body
        return self._body

    async def iter_chunks(self):  # pragma: no cover - not streamed here
        yield b""

    async def close(self) -> None:
        pass

    async def release(self) -> None:
        pass


class BodyFailingTransport:
    """Answers 200 whose body read fails with `errors` in turn, then succeeds."""

    def __init__(self, errors: list[BaseException], good: bytes) -> None:
        self.errors, self.good, self.calls = list(errors), good, 0

    async def request(self, method, url, **kw):
        self.calls += 1
        return _Resp(200, self.errors.pop(0) if self.errors else self.good)

    async def aclose(self) -> None:
        pass


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


@pytest.mark.parametrize("error", [TimeoutError(), aiohttp.ClientPayloadError("cut")])
async def test_a_models_body_that_breaks_off_is_retried_before_any_byte(error):
    transport = BodyFailingTransport([error], b'{"data": []}')
    p = Pipe(transport=transport, sleep=no_sleep)
    p.valves = p.Valves(API_KEY="sk-or-test", BASE_URL="http://or.invalid/api/v1")
    assert [m["id"] for m in await p.pipes()] == ["_health", "_my_usage"]
    assert transport.calls == 2
    await p.close()


@pytest.mark.parametrize("error", [TimeoutError(), aiohttp.ClientPayloadError("cut")])
async def test_a_models_body_that_keeps_failing_gives_a_status_entry_and_backs_off(error):
    transport = BodyFailingTransport([error] * 20, b'{"data": []}')
    p = Pipe(transport=transport, sleep=no_sleep)
    p.valves = p.Valves(API_KEY="sk-or-test", BASE_URL="http://or.invalid/api/v1", MAX_RETRIES=0)
    listed = [await p.pipes() for _ in range(3)]
    assert all(entry[0]["id"] == "_status-catalog" for entry in listed)
    assert "OpenRouter" in listed[0][0]["name"]
    assert transport.calls == 1  # backed off: one /models request for three listings
    await p.close()


async def test_a_task_whose_body_breaks_off_shows_a_specific_message():
    transport = BodyFailingTransport([aiohttp.ClientPayloadError("cut")] * 10, b"{}")
    p = Pipe(transport=transport, sleep=no_sleep)
    p.valves = p.Valves(API_KEY="sk-or-test", BASE_URL="http://or.invalid/api/v1", MAX_RETRIES=1)
    p._catalog.snapshot = _catalog_snapshot()
    with pytest.raises(PipeError) as info:
        await p.pipe(body=body(GPT4O, "title", stream=False), __user__={"id": "u"},
                     __task__="title_generation")
    assert "The connection to OpenRouter broke while its answer was read" in str(info.value)
    assert "unexpected internal error" not in str(info.value)
    assert "Tried 2 times" in str(info.value)
    await p.close()


def _catalog_snapshot():
    from openrouter_emulator import load_catalog

    from openrouter_responses_pipe import CatalogSnapshot, parse_catalog

    return CatalogSnapshot.of(parse_catalog({"data": load_catalog()}), 0.0)


def test_body_errors_are_upstream_errors():
    from openrouter_responses_pipe import UpstreamBodyError, UpstreamConnectionError

    assert issubclass(UpstreamBodyError, UpstreamConnectionError)
    assert issubclass(UpstreamBodyError, UpstreamError)


# -- item 10: spent money stays visible -------------------------------------------------------


async def test_a_failed_second_round_still_reports_the_first_rounds_usage(pipe, emulator,
                                                                            events):
    emulator._queue.append(("tool_call", {"name": "weather"}))  # enqueue() owns `name`
    emulator.enqueue("mid_stream_failure", after=0)
    out = await stream(pipe, body(GPT4O, "weather?"), __tools__=weather_tool(),
                       __event_emitter__=events)
    assert "interrupted" in out.text
    first, second = emulator.generations.values()
    assert first["tokens_prompt"] > 0 and second["tokens_prompt"] == 0  # round 2 billed nothing
    assert out.usage is not None
    assert out.usage["prompt_tokens"] == first["tokens_prompt"]
    assert out.usage["completion_tokens"] == first["tokens_completion"]
    assert out.usage["cost"] == round(first["total_cost"], 8)
    final = [s["description"] for s in events.of("status") if s["done"]][-1]
    total = first["tokens_prompt"] + first["tokens_completion"]
    assert final.startswith("Failed · ") and f"{total:,} tokens" in final


async def test_a_stream_without_usage_says_usage_unavailable_not_zero(pipe, emulator, events):
    out = await stream(pipe, body(GPT4O, "[emu:text no_completed=1] hi"),
                       __event_emitter__=events)
    assert out.error is None and "interrupted" not in out.text
    final = [s["description"] for s in events.of("status") if s["done"]][-1]
    assert "usage unavailable" in final and "0 tokens" not in final
    assert out.usage is not None and "prompt_tokens" not in out.usage
    assert out.usage["usage_unavailable"] is True


async def test_the_turn_run_keeps_the_summed_usage_when_the_turn_fails(pipe, emulator):
    from openrouter_responses_pipe import TurnRun, Usage

    run = TurnRun()
    run.add_usage(None)
    assert run.usage is None
    run.add_usage(Usage(10, 5, cost=0.5))
    run.add_usage(Usage(3, 2, cost=None))
    assert run.usage == Usage(13, 7, cost=0.5)


# -- item 16: notes reach API clients in the text ----------------------------------------------


def _image_chat(model: str) -> dict[str, Any]:
    png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    return {"model": f"openrouter.{model}", "stream": True, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": png}}]}]}


NOTE = "OpenAI: GPT-3.5 Turbo can't read images, so an image was left out of the request."


async def test_an_api_client_without_a_socket_session_reads_the_notes_in_the_answer(
        pipe, emulator, events):
    out = await stream(pipe, _image_chat(TEXT), __event_emitter__=events,
                       __metadata__={"chat_id": "c", "message_id": "m", "session_id": None})
    assert out.text.endswith(f"\n\n---\nℹ️ {NOTE}")
    assert [n["content"] for n in events.of("notification")] == [NOTE]


async def test_a_browser_session_gets_the_note_as_a_toast_only(pipe, emulator, events):
    out = await stream(pipe, _image_chat(TEXT), __event_emitter__=events, __metadata__=SOCKET)
    assert NOTE not in out.text
    assert [n["content"] for n in events.of("notification")] == [NOTE]


async def test_a_non_streamed_api_chat_carries_the_note_in_its_string(pipe, emulator):
    chat = {**_image_chat(TEXT), "stream": False}
    text = await pipe.pipe(body=chat, __user__={"id": "u", "role": "user"}, __metadata__={})
    assert isinstance(text, str) and text.endswith(f"ℹ️ {NOTE}")


async def test_an_api_client_reads_the_notes_even_when_the_turn_fails(pipe, emulator):
    chat = _image_chat(TEXT)
    chat["messages"][0]["content"][0]["text"] = "[emu:http_error status=402] What is this?"
    out = await stream(pipe, chat, __metadata__={})
    assert out.error is not None and "out of credits" in out.error
    assert out.error.endswith(f"\n\n---\nℹ️ {NOTE}")
    failed_late = _image_chat(TEXT)
    failed_late["messages"][0]["content"][0]["text"] = "[emu:mid_stream_failure] What?"
    out = await stream(pipe, failed_late, __metadata__={})
    assert "interrupted" in out.text and out.text.endswith(f"\n\n---\nℹ️ {NOTE}")
