"""§12 Image output, the pure core (issue #14): what is asked for, what comes back."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    IMAGE,
    IMAGE_FAILED,
    IMAGE_PARTIAL,
    IMAGE_STATUS,
    TEXT,
    CatalogEntry,
    ChatMessage,
    ChatRequest,
    ImagePart,
    ImageRefused,
    ImageSettings,
    IntakeError,
    PayloadTooLargeError,
    Pricing,
    SSEEvent,
    StreamState,
    TextPart,
    Transformed,
    can_output_images,
    decode_image,
    describe_error,
    generated_image_links,
    image_config,
    image_modalities,
    image_status_segment,
    item_image,
    parse_image_models,
    reduce_events,
    refusal_reason,
    with_images,
    with_previous_images,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)
B64 = base64.b64encode(PNG).decode()


def entry(outputs=("text",), inputs=("text",), params=("tools",), id="a/m") -> CatalogEntry:
    return CatalogEntry(id=id, name=id, canonical_slug=id, description="", context_length=None,
                        max_output_tokens=None, input_modalities=frozenset(inputs),
                        output_modalities=frozenset(outputs),
                        supported_parameters=frozenset(params), pricing=Pricing(),
                        reasoning=None)


IMAGE_ONLY = entry(("image",), ("text", "image"), ())
TEXT_IMAGE = entry(("image", "text"), ("text", "image"), ())
CHAT = entry()
NO_TOOLS = entry(params=())


@pytest.mark.parametrize(("model", "expected"), [
    (IMAGE_ONLY, ["image"]), (TEXT_IMAGE, ["image", "text"]), (CHAT, None)])
def test_modalities(model, expected):
    assert image_modalities(model) == expected


@pytest.mark.parametrize(("model", "tool_model", "expected"), [
    (IMAGE_ONLY, "", True), (TEXT_IMAGE, "", True), (CHAT, "", False),
    (CHAT, "google/gemini-2.5-flash-image", True), (NO_TOOLS, "x/y", False)])
def test_can_output_images(model, tool_model, expected):
    assert can_output_images(model, ImageSettings(tool_model=tool_model)) is expected


OFFERS = {"aspect_ratio": ("1:1", "16:9"), "resolution": ("1K", "2K")}


@pytest.mark.parametrize(("ratio", "size", "options", "config", "notes"), [
    ("", "", OFFERS, {}, 0),
    ("16:9", "2k", OFFERS, {"aspect_ratio": "16:9", "image_size": "2K"}, 0),
    ("7:3", "", OFFERS, {}, 1),
    ("16:9", "4K", OFFERS, {"aspect_ratio": "16:9"}, 1),
    ("16:9", "2K", None, {}, 0),                       # unknown: nothing, silently
    ("16:9", "2K", {"aspect_ratio": ()}, {}, 0),
    ("1:1", "1K", {"image_size": ("1K",), "aspect_ratio": ("1:1",)},
     {"aspect_ratio": "1:1", "image_size": "1K"}, 0),
])
def test_image_config_sends_only_offered_values(ratio, size, options, config, notes):
    got, said = image_config(ImageSettings(aspect_ratio=ratio, size=size), options)
    assert got == config and len(said) == notes


def test_parse_image_models_keeps_enum_descriptors_only():
    payload = {"data": [
        {"id": "g/i", "supported_parameters": {
            "aspect_ratio": {"type": "enum", "values": ["1:1", "16:9"]},
            "quality": {"type": "range", "min": 0, "max": 1},
            "n": {"type": "boolean"}}},
        {"id": "x/none"}, {"name": "no id"}, "junk"]}
    assert parse_image_models(payload) == {"g/i": {"aspect_ratio": ("1:1", "16:9")},
                                           "x/none": {}}
    assert parse_image_models({"data": "nope"}) == {} and parse_image_models(None) == {}


def plan() -> Transformed:
    return Transformed({"model": "a/m", "input": []})


def test_with_images_for_an_image_model_and_for_the_toggle():
    got = with_images(plan(), TEXT_IMAGE, ImageSettings(aspect_ratio="1:1"), {},
                      {"a/m": {"aspect_ratio": ("1:1",)}})
    assert got.payload["modalities"] == ["image", "text"]
    assert got.payload["image_config"] == {"aspect_ratio": "1:1"}
    tool = with_images(plan(), CHAT, ImageSettings(tool_model="g/i"),
                       {"image_generation": True}, {})
    assert tool.payload["tools"] == [{"type": "openrouter:image_generation",
                                      "parameters": {"model": "g/i"}}]
    off = with_images(plan(), CHAT, ImageSettings(tool_model="g/i"), {}, {})
    assert off.payload == plan().payload and off.notes == ()


LINK = "/api/v1/files/1b2c3d4e-0000-4000-8000-000000000000/content"


def req(*messages: ChatMessage) -> ChatRequest:
    return ChatRequest("openrouter.a/m", "a/m", messages, True, {})


def msg(role: str, *parts) -> ChatMessage:
    return ChatMessage(role, tuple(TextPart(p) if isinstance(p, str) else p for p in parts))


def test_follow_up_carries_the_latest_answers_pictures():
    r = req(msg("user", "draw"), msg("assistant", "old ![Generated image](/api/v1/files/old/"
                                                  "content)"),
            msg("user", "again"), msg("assistant", f"Here\n\n![Generated image]({LINK})\n\n"),
            msg("user", "make the sky purple"))
    got = with_previous_images(r, TEXT_IMAGE, ImageSettings())
    assert got.messages[-1].parts == (TextPart("make the sky purple"), ImagePart(LINK))
    assert with_previous_images(r, CHAT, ImageSettings()) is r           # not an image model
    assert with_previous_images(r, TEXT_IMAGE, ImageSettings(edit_follow_ups=False)) is r
    own = req(*r.messages[:-1], msg("user", "use mine", ImagePart("data:image/png;base64,AA")))
    assert with_previous_images(own, TEXT_IMAGE, ImageSettings()) is own


@pytest.mark.parametrize(("item", "expected"), [
    ({"type": "image_generation_call", "result": B64}, B64),
    ({"type": "openrouter:image_generation", "imageB64": B64}, B64),
    ({"type": "openrouter:image_generation", "imageUrl": "https://x/y.png"}, "https://x/y.png"),
    ({"type": "x", "image_url": {"url": "data:image/png;base64,AA"}}, "data:image/png;base64,AA"),
    ({"type": "image_generation_call", "result": None}, None),
])
def test_item_image_reads_every_documented_shape(item, expected):
    assert item_image(item) == expected


def test_decode_image_shapes():
    assert decode_image(B64, 1000).data == PNG
    assert decode_image(f"data:image/png;base64,{B64}", 1000).data == PNG
    assert decode_image("https://cdn.example/x.png", 1000).url == "https://cdn.example/x.png"
    with pytest.raises(PayloadTooLargeError):
        decode_image(B64 * 100, 100)
    with pytest.raises(IntakeError):
        decode_image(base64.b64encode(b"not a picture at all").decode(), 1000)


@given(st.text(max_size=300))
def test_decode_image_never_raises_anything_but_intake_errors(text):
    try:
        decode_image(text, 10_000)
    except IntakeError:
        pass


@given(st.text(max_size=400))
def test_generated_image_links_only_finds_open_webui_file_links(text):
    for link in generated_image_links(text):
        assert link.startswith("/api/v1/files/") and link.endswith("/content")


@given(st.dictionaries(st.sampled_from(["result", "imageB64", "imageUrl", "image_url", "url",
                                        "status", "error"]),
                       st.one_of(st.none(), st.text(max_size=20), st.integers(),
                                 st.dictionaries(st.just("url"), st.text(max_size=10)))))
def test_item_image_is_total(item):
    got = item_image(item)
    assert got is None or isinstance(got, str)


@pytest.mark.parametrize(("code", "message", "reason"), [
    ("image_content_policy_violation", "", "policy"), ("image_too_large", "", "size"),
    ("", "Rejected by the safety system", "policy"), ("", "boom", "other")])
def test_refusal_reason(code, message, reason):
    assert refusal_reason(code, message) == reason


def test_refusals_read_as_sentences():
    text = describe_error(ImageRefused("Flagged", reason="policy"))
    assert text == ("The image request was refused under the provider's content policy "
                    "(Flagged). Rephrase the request and try again.")


def events(*evs: dict) -> list[SSEEvent]:
    return [SSEEvent(json.dumps(e)) for e in evs]


def test_reducer_turns_image_events_into_intents_and_keeps_no_base64():
    state = StreamState()
    item = {"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": B64}
    out = reduce_events(state, events(
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"id": "ig_1", "type": "image_generation_call", "status": "in_progress"}},
        {"type": "response.image_generation_call.generating", "output_index": 0,
         "item_id": "ig_1"},
        {"type": "response.image_generation_call.partial_image", "output_index": 0,
         "item_id": "ig_1", "partial_image_b64": "AAAA", "partial_image_index": 0},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.output_item.done", "output_index": 1,
         "item": {"type": "openrouter:image_generation", "status": "failed",
                  "error": "blocked by moderation"}}))
    assert out == [(IMAGE_STATUS, "Generating image…"), (IMAGE_STATUS, "Generating image…"),
                   (IMAGE_PARTIAL, "AAAA"), (IMAGE, B64),
                   (IMAGE_FAILED, "policy:blocked by moderation")]
    assert B64 not in json.dumps(state.done_items) and TEXT == "text"


def test_status_segment():
    assert image_status_segment(1, 0.0) == "1 image"
    assert image_status_segment(2, 0.00003) == "2 images (list price $0.00003 per image unit)"


def test_the_image_tool_replaces_open_webuis_own_image_tools_and_notes():
    base = Transformed({"model": "a/m", "input": [], "instructions": (
        "Be brief.\n<context>Unable to generate an image, tell the user that an error "
        "occurred</context>"), "tools": [
        {"type": "function", "name": "generate_image", "parameters": {}},
        {"type": "function", "name": "weather", "parameters": {}}]})
    got = with_images(base, CHAT, ImageSettings(tool_model="g/i"), {"image_generation": True},
                      {})
    assert [t.get("name") or t["type"] for t in got.payload["tools"]] == [
        "weather", "openrouter:image_generation"]
    assert got.payload["instructions"] == "Be brief."


class _Store:
    """Records saves (what the Open WebUI store would write), keeping only sizes."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, int, bytes]] = []

    async def save(self, file_id, user_id, name, mime, data, source, link=None) -> None:
        self.saved.append((user_id, len(data), data[:8]))


class _Emitter:
    def __init__(self) -> None:
        self.events: list[dict] = []

    async def emit(self, event: dict) -> None:
        self.events.append(event)

    async def status(self, description: str, *, done: bool, hidden: bool = False) -> None:
        self.events.append({"type": "status", "description": description})


async def test_four_big_pictures_are_decoded_and_written_one_at_a_time():
    import tracemalloc

    from openrouter_responses_pipe import Fetcher, ImageJob, ImageSink, intake_limits
    from openrouter_responses_pipe import UserValves as UV
    from openrouter_responses_pipe import Valves as V

    size = 3 * 1024 * 1024
    pictures = [PNG[:8] + bytes([i]) * (size - 8) for i in range(4)]
    intents = [(IMAGE, base64.b64encode(p).decode()) for p in pictures]
    store = _Store()
    job = ImageJob("u1", "user", "c1", "m1", "a/m", 20 * 1024 * 1024,
                   intake_limits(V(), UV()))
    sink = ImageSink(job, _Emitter(), store, Fetcher())  # type: ignore[arg-type]
    del pictures
    tracemalloc.start()
    out = await sink.resolve(intents)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [s[1] for s in store.saved] == [size] * 4 and len(sink.saved) == 4
    assert all(v == "" for _, v in intents)          # the base64 strings were let go
    assert peak < 1.6 * size                         # one decoded picture at a time
    assert [k for k, _ in out] == [TEXT] * 4 and "base64" not in "".join(t for _, t in out)


def test_pictures_only_in_the_final_response_object_are_taken_once():
    state = StreamState()
    item = {"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": B64}
    done = {"type": "response.output_item.done", "output_index": 0, "item": item}
    final = {"type": "response.completed", "response": {"output": [item], "usage": None}}
    assert reduce_events(state, events(final)) == [(IMAGE, B64)]
    again = StreamState()
    assert reduce_events(again, events(done, final)) == [(IMAGE, B64)]  # not twice


def test_only_image_error_codes_become_image_refusals():
    from openrouter_responses_pipe import UpstreamStreamError, stream_failure

    assert isinstance(stream_failure("no", "image_too_large", ""), ImageRefused)
    text_refusal = stream_failure("no", "content_policy_violation", "content_policy_violation")
    assert type(text_refusal) is UpstreamStreamError


@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40),
       st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_long_lines_split_anywhere_decode_like_one_read(cuts, newline):
    # a picture's event is one very long line; the decoder holds its reads and joins once
    from openrouter_responses_pipe import SSEDecoder

    long_line = b"data: " + b"A" * 20000
    stream = newline.join([b": ok", long_line, b"", b"data: {\"x\": 1}", b"", b""])
    whole = SSEDecoder().feed(stream)
    decoder, got, pos = SSEDecoder(), [], 0
    for cut in cuts:
        got += decoder.feed(stream[pos:pos + cut])
        pos += cut
    got += decoder.feed(stream[pos:])
    assert got == whole and [len(e.data) for e in got] == [20000, 8]


@pytest.mark.parametrize(("image_mb", "cap_mb"), [
    (1, 16),                          # small pictures: the text cap stands
    (7, 4 * 28 / 3 + 1),              # 4 pictures of 7 MB in base64 + 1 MB of text
    (20, 4 * 80 / 3 + 1)])
def test_the_stream_line_cap_follows_the_image_limit(image_mb, cap_mb):
    from openrouter_responses_pipe import MB, stream_line_cap

    assert stream_line_cap(int(image_mb * MB)) == pytest.approx(cap_mb * MB, abs=4)


@pytest.mark.parametrize(("features", "allowed", "kept", "told"), [
    ({"image_generation": True}, {"image_generation": True}, True, 0),
    ({"image_generation": True}, {}, False, 1),                    # lookup failed: denied
    ({"image_generation": True, "web_search": True}, {"web_search": True}, False, 1),
    ({"image_generation": False, "code_interpreter": True}, {}, False, 0)])  # not gated
def test_permitted_features_turns_off_what_open_webui_forbids(features, allowed, kept, told):
    from openrouter_responses_pipe import permitted_features

    out, notes = permitted_features(features, allowed)
    assert bool(out.get("image_generation")) is kept and len(notes) == told
    assert bool(out.get("web_search")) is bool(features.get("web_search")
                                               and allowed.get("web_search"))
    assert out.get("code_interpreter") == features.get("code_interpreter")
