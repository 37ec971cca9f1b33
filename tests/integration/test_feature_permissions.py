"""Client-supplied feature switches (`__metadata__["features"]`) against Open WebUI's own
permissions: an ordinary user gets the paid image tool / web search only when Open WebUI's
`has_permission(user, "features.<name>", defaults)` allows it (both stub flavours: 0.12's
async check with `Config.get("user.permissions")`, 0.6's sync one with
`request.app.state.config.USER_PERMISSIONS`); admins always; WEB_SEARCH=always always."""

from __future__ import annotations

import pytest
from helpers import body, posts, share_catalog, stream
from owui_stubs import install

GEMINI_IMAGE = "google/gemini-2.5-flash-image"
GPT4O = "openai/gpt-4o"
USER = {"id": "u1", "role": "user", "valves": None}
ADMIN = {"id": "a1", "role": "admin", "valves": None}
BOTH = {"image_generation": True, "web_search": True}
IMAGE_NOTE = ("Image generation isn't enabled for your account in Open WebUI, so this answer "
              "was made without it.")
SEARCH_NOTE = ("Web search isn't enabled for your account in Open WebUI, so this answer was "
               "made without it.")


@pytest.fixture(params=["async", "sync"])
def owui(request, tmp_path):
    handle = install(request.param, data_dir=tmp_path)
    share_catalog(handle)  # the records the pipe's sync makes (0.6 checks them per turn)
    handle.add_user("u1", role="user")
    handle.add_user("a1", role="admin")
    yield handle
    handle.uninstall()


@pytest.fixture
def image_pipe(pipe):
    pipe.valves = pipe.valves.model_copy(update={"IMAGE_TOOL_MODEL": GEMINI_IMAGE})
    return pipe


def deny(owui, **features: bool):
    """Open WebUI's default user permissions with these features off; the request to pass."""
    permissions = {"features": {"image_generation": True, "web_search": True, **features}}
    if owui.flavour == "async":
        owui.set_config("user.permissions", permissions)
        return owui.make_request()
    return owui.make_request(config={"USER_PERMISSIONS": permissions})


def tool_types(emulator) -> list[str]:
    return [t.get("type") for t in posts(emulator)[-1]["json"].get("tools") or ()]


def notes(events) -> list[str]:
    return [n["content"] for n in events.of("notification")]


async def test_a_user_without_the_permissions_gets_neither_tool_and_is_told(
        image_pipe, emulator, owui, events):
    request = deny(owui, image_generation=False, web_search=False)
    out = await stream(image_pipe, body(GPT4O, "draw a cat"), __user__=USER,
                       __request__=request, __event_emitter__=events,
                       __metadata__={"chat_id": "c1", "session_id": "s1", "features": BOTH})
    assert out.error is None
    assert tool_types(emulator) == []  # no image tool, no paid web search
    assert IMAGE_NOTE in notes(events) and SEARCH_NOTE in notes(events)


async def test_api_clients_read_the_refusal_in_the_answer(image_pipe, emulator, owui):
    request = deny(owui, image_generation=False)
    out = await stream(image_pipe, body(GPT4O, "draw a cat"), __user__=USER,
                       __request__=request, __metadata__={"features": BOTH})
    assert tool_types(emulator) == ["openrouter:web_search"]  # that one is permitted
    assert out.text.endswith(f"ℹ️ {IMAGE_NOTE}")


async def test_a_user_with_the_permissions_gets_both(image_pipe, emulator, owui, events):
    await stream(image_pipe, body(GPT4O, "draw a cat"), __user__=USER,
                 __request__=owui.make_request(), __event_emitter__=events,
                 __metadata__={"features": BOTH})
    assert sorted(tool_types(emulator)) == ["openrouter:image_generation",
                                            "openrouter:web_search"]
    assert IMAGE_NOTE not in notes(events) and SEARCH_NOTE not in notes(events)


async def test_an_admin_gets_both_whatever_the_user_defaults(image_pipe, emulator, owui):
    request = deny(owui, image_generation=False, web_search=False)
    await stream(image_pipe, body(GPT4O, "draw a cat"), __user__=ADMIN, __request__=request,
                 __metadata__={"features": BOTH})
    assert sorted(tool_types(emulator)) == ["openrouter:image_generation",
                                            "openrouter:web_search"]


async def test_web_search_always_is_the_admins_choice(pipe, emulator, owui):
    pipe.valves = pipe.valves.model_copy(update={"WEB_SEARCH": "always"})
    request = deny(owui, web_search=False)
    await stream(pipe, body(GPT4O, "news?"), __user__=USER, __request__=request,
                 __metadata__={"features": {"web_search": True}})
    assert tool_types(emulator) == ["openrouter:web_search"]


async def test_a_failing_permission_lookup_denies(image_pipe, emulator, owui, monkeypatch,
                                                  caplog):
    access = owui.modules.get("open_webui.utils.access_control") or __import__(
        "open_webui.utils.access_control", fromlist=["has_permission"])

    def broken(*_args, **_kwargs):
        raise RuntimeError("database is gone")

    monkeypatch.setattr(access, "has_permission", broken)
    out = await stream(image_pipe, body(GPT4O, "draw a cat"), __user__=USER,
                       __request__=owui.make_request(), __metadata__={"features": BOTH})
    assert out.error is None and tool_types(emulator) == []
    assert "permission check failed (RuntimeError: database is gone)" in caplog.text
