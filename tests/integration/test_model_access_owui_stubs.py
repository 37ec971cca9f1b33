"""Who may use a model, and whose per-model routing counts, on each Open WebUI flavour's own
Models API (stubs that mirror 0.6.28 and 0.12.4).

- 0.6.28 checks only a workspace model's own access, then hands the pipe its base model id: the
  pipe checks the base model's record itself there, with Open WebUI's own `has_access`.
- Any user with workspace access can create a record under a pipe model's id: the routing in a
  record only counts when an admin owns it (it could otherwise drop the admin's ZDR policy).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from owui_stubs import call_pipe, install, load_function

SOURCE = (Path(__file__).resolve().parents[2] / "openrouter_responses_pipe.py").read_text()
MODEL = "openrouter.openai/gpt-4o"
ADMIN_POLICY = {"zdr": True, "data_collection": "deny"}


@pytest.fixture(params=["sync", "async"])
def stubs(request, tmp_path):
    handle = install(request.param, data_dir=tmp_path)
    handle.add_user("admin-0", role="admin")
    handle.add_user("u1", role="user")
    handle.add_user("mallory", role="user")
    yield handle
    handle.uninstall()


async def put_record(handle: Any, owner: str, *, custom: dict | None = None,
                     readers: list[str] | None = None) -> None:
    """A record for the pipe model owned by `owner` (public unless `readers` group ids)."""
    models = importlib.import_module("open_webui.models.models")
    fields: dict[str, Any] = {"id": MODEL, "base_model_id": None, "name": "GPT-4o",
                              "meta": models.ModelMeta(),
                              "params": models.ModelParams(custom_params=custom or {})}
    if handle.flavour == "sync":
        fields["access_control"] = None if readers is None else {
            "read": {"group_ids": readers, "user_ids": []}, "write": {}}
    else:
        fields["access_grants"] = [{"principal_type": "user", "principal_id": "*",
                                    "permission": "read"}]
    done = models.Models.insert_new_model(models.ModelForm(**fields), owner)
    if inspect.isawaitable(done):
        await done


async def chat(handle: Any, emulator: Any, user: str, **valves: Any) -> Any:
    pipe, _ = load_function(SOURCE, "openrouter", handle.flavour)
    return await call_pipe(pipe, body={"model": MODEL, "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]},
                           user={"id": user}, flavour=handle.flavour,
                           stored_valves={"BASE_URL": emulator.base_url,
                                          "API_KEY": "sk-or-test", **valves})


def sent(emulator: Any) -> list[dict]:
    return [r["json"] for r in emulator.requests
            if r["method"] == "POST" and r["path"].endswith("/responses")]


async def test_a_users_record_never_loosens_the_admins_routing(stubs, emulator):
    await put_record(stubs, "mallory", custom={"provider": json.dumps(
        {"zdr": None, "data_collection": "allow", "only": None})})
    out = await chat(stubs, emulator, "mallory", PROVIDER_ROUTING=json.dumps(ADMIN_POLICY))
    assert out.error is None, out.error
    assert sent(emulator)[-1]["provider"] == ADMIN_POLICY


async def test_an_admins_record_sets_the_models_routing(stubs, emulator):
    await put_record(stubs, "admin-0", custom={"provider": json.dumps({"sort": "price"})})
    out = await chat(stubs, emulator, "u1", PROVIDER_ROUTING=json.dumps(ADMIN_POLICY))
    assert out.error is None, out.error
    assert sent(emulator)[-1]["provider"] == {**ADMIN_POLICY, "sort": "price"}


async def test_on_0_6_only_readers_of_the_base_models_record_reach_it(tmp_path, emulator):
    """0.6.28 lets a workspace model built on a group-restricted pipe model through to the
    pipe with the base id: the pipe refuses a user outside the group, sending nothing."""
    handle = install("sync", data_dir=tmp_path)
    try:
        handle.add_user("admin-0", role="admin")
        handle.add_user("u1", role="user")
        groups = importlib.import_module("open_webui.models.groups").Groups
        groups.STUB_add("g-eng", "Engineering")
        await put_record(handle, "admin-0", readers=["g-eng"])
        before = len(sent(emulator))
        out = await chat(handle, emulator, "u1")
        assert out.error and "not available to you" in out.error["message"]
        assert len(sent(emulator)) == before  # nothing went upstream
        groups.STUB_add_member("g-eng", "u1")
        out = await chat(handle, emulator, "u1")
        assert out.error is None and out.text
    finally:
        handle.uninstall()


async def test_the_access_check_follows_the_open_webui_that_is_loaded_now(pipe, emulator,
                                                                          tmp_path):
    """The pipe finds Open WebUI's Models table on each request, not once per process: a
    first turn outside Open WebUI must not switch the 0.6 access check off for good."""
    from helpers import body, stream

    outside = await stream(pipe, body("openai/gpt-4o", "hi"), __user__={"id": "u1"})
    assert outside.error is None  # no Open WebUI loaded: nothing to check against
    handle = install("sync", data_dir=tmp_path)
    try:
        handle.add_user("u1", role="user")
        refused = await stream(pipe, body("openai/gpt-4o", "hi"), __user__={"id": "u1"})
        assert refused.error and "not available to you" in refused.error
    finally:
        handle.uninstall()
