"""The model-record sync on each Open WebUI flavour's own Models API (0.6 sync with the
`access_control` column, 0.12 async with `access_grants` and version_id), found at runtime
without injection, function id taken from the module name Open WebUI gives the file."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
from owui_stubs import install, list_models, load_function

SOURCE = (Path(__file__).resolve().parents[2] / "openrouter_responses_pipe.py").read_text()
GPT4O, R1 = "openai/gpt-4o", "deepseek/deepseek-r1"


@pytest.fixture(params=["sync", "async"])
def flavour(request, tmp_path):
    handle = install(request.param, data_dir=tmp_path)
    handle.add_user("admin-1", role="admin", name="Ad", email="ad@example.com")
    yield request.param
    handle.uninstall()


async def call(fn: Any, *args: Any) -> Any:
    result = fn(*args)
    return await result if inspect.isawaitable(result) else result


async def rows() -> dict[str, Any]:
    models = importlib.import_module("open_webui.models.models").Models
    return {m.id: m for m in await call(models.get_all_models)}


def readers(row: Any, flavour: str) -> Any:
    if flavour == "async":
        return sorted((g.principal_type, g.principal_id) for g in row.access_grants
                      if g.permission == "read")
    return row.access_control


async def sync(pipe: Any, flavour: str, valves: dict[str, Any]) -> list[dict]:
    models = await list_models(pipe, "openrouter", stored_valves=valves, flavour=flavour)
    await pipe._records.wait()
    return models


async def test_records_are_written_through_open_webuis_models_api(flavour, emulator):
    pipe, _ = load_function(SOURCE, "openrouter", flavour)
    valves = {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-test",
              "MODEL_ID": f"{GPT4O}, {R1}"}
    listed = await sync(pipe, flavour, valves)
    assert {m["id"] for m in listed} == {f"openrouter.{GPT4O}", f"openrouter.{R1}",
                                         "openrouter._health", "openrouter._my_usage"}
    stored = await rows()  # the admin-only health entry gets no record
    assert sorted(stored) == ["openrouter._my_usage", f"openrouter.{R1}", f"openrouter.{GPT4O}"]
    gpt = stored[f"openrouter.{GPT4O}"]
    assert gpt.base_model_id is None and gpt.user_id == "admin-1" and gpt.is_active
    assert gpt.meta.capabilities["vision"] is True
    assert stored[f"openrouter.{R1}"].meta.capabilities["vision"] is False
    assert readers(gpt, flavour) == ([] if flavour == "async" else {})  # admins only

    await sync(pipe, flavour, {**valves, "MODEL_ACCESS": "all"})
    gpt = (await rows())[f"openrouter.{GPT4O}"]
    assert readers(gpt, flavour) == ([("user", "*")] if flavour == "async" else None)
    assert pipe._records.status["state"] == "ok", pipe._records.status


async def test_an_admin_rename_and_capability_survive(flavour, emulator):
    pipe, _ = load_function(SOURCE, "openrouter", flavour)
    valves = {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-test", "MODEL_ID": GPT4O}
    await sync(pipe, flavour, valves)
    mod = importlib.import_module("open_webui.models.models")
    row = (await rows())[f"openrouter.{GPT4O}"]
    form = row.model_dump()
    form["name"] = "Ours"
    form["meta"]["capabilities"]["citations"] = False
    await call(mod.Models.update_model_by_id, row.id, mod.ModelForm(**form))
    await sync(pipe, flavour, {**valves, "MODEL_NAME_PREFIX": "OR ", "MODEL_ACCESS": "all"})
    row = (await rows())[f"openrouter.{GPT4O}"]
    assert row.name == "Ours" and row.meta.capabilities["citations"] is False
    assert readers(row, flavour) == ([("user", "*")] if flavour == "async" else None)


async def test_two_instances_racing_write_one_record_each(flavour, emulator):
    valves = {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-test", "MODEL_ACCESS": "all"}
    first, _ = load_function(SOURCE, "openrouter", flavour)
    second, _ = load_function(SOURCE, "openrouter", flavour)
    await asyncio.gather(sync(first, flavour, valves), sync(second, flavour, valves))
    listed = [m for m in await list_models(first, "openrouter", stored_valves=valves,
                                           flavour=flavour)
              if m["id"].split(".", 1)[1] not in ("_health",)
              and not m["id"].split(".", 1)[1].startswith("_status")]
    assert len(await rows()) == len(listed)
    assert {first._records.status["state"], second._records.status["state"]} == {"ok"}
