"""§6 model records: the pure record builder, the admin-edits-win merge, the sync plan."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    PUBLIC_READ,
    AccessSpec,
    Managed,
    RecordSettings,
    RequestSettings,
    StoredRecord,
    Valves,
    access_control_from_grants,
    access_grants,
    can_output_images,
    describe_model,
    desired_record,
    function_id_from_module,
    grants_from_access_control,
    may_use_models,
    merge_record,
    model_capabilities,
    model_tags,
    new_mark,
    parse_catalog_entry,
    parse_model_access,
    plan_record,
    plan_retirements,
    record_meta,
    record_settings,
    record_wanted,
)


def entry(id="openai/gpt-4o", inputs=("text",), outputs=("text",), params=("tools",),
          prompt="0.0000025", completion="0.00001", description="A model.", context=128000):
    return parse_catalog_entry({
        "id": id, "name": id.split("/")[-1], "description": description,
        "context_length": context,
        "architecture": {"input_modalities": list(inputs), "output_modalities": list(outputs)},
        "pricing": {"prompt": prompt, "completion": completion},
        "supported_parameters": list(params)})


RS = RecordSettings()


@pytest.mark.parametrize(("raw", "expected"), [
    ("admins", AccessSpec("admins")),
    ("", AccessSpec("admins")),
    (" Admins ", AccessSpec("admins")),
    ("all", AccessSpec("all")),
    ("ALL", AccessSpec("all")),
    ("team-a, all", AccessSpec("all")),
    ("team-a, Team B ,team-a", AccessSpec("groups", ("team-a", "Team B"))),
    ("admins, staff", AccessSpec("groups", ("staff",))),
])
def test_parse_model_access(raw, expected):
    assert parse_model_access(raw) == expected


@pytest.mark.parametrize(("spec", "groups", "expected"), [
    (AccessSpec("admins"), {}, ()),
    (AccessSpec("all"), {}, (PUBLIC_READ,)),
    (AccessSpec("groups", ("a", "b")), {"a": "g1", "b": "g2"},
     (("group", "g1", "read"), ("group", "g2", "read"))),
    (AccessSpec("groups", ("a", "missing")), {"a": "g1"}, (("group", "g1", "read"),)),
    (AccessSpec("groups", ("missing",)), {}, ()),  # nobody but admins, never public
])
def test_access_grants(spec, groups, expected):
    assert access_grants(spec, groups) == expected


@pytest.mark.parametrize(("ac", "grants"), [
    (None, (PUBLIC_READ,)),
    ({}, ()),
    ({"read": {"group_ids": ["g1"], "user_ids": []}, "write": {"group_ids": [], "user_ids": []}},
     (("group", "g1", "read"),)),
])
def test_access_control_round_trip(ac, grants):
    assert grants_from_access_control(ac) == grants
    assert access_control_from_grants(grants) == ac


CAPS = ("vision", "file_upload", "web_search", "image_generation", "builtin_tools", "usage",
        "citations")


@pytest.mark.parametrize(("e", "rs", "expected"), [
    (entry(inputs=("text",)), RS, (False, True, True, False, True, True, True)),
    (entry(inputs=("text", "image")), RS, (True, True, True, False, True, True, True)),
    (entry(params=()), RS, (False, True, True, False, False, True, True)),
    (entry(outputs=("text", "image")), RS, (False, True, True, True, True, True, True)),
    (entry(), RecordSettings(web_search=False), (False, True, False, False, True, True, True)),
    (entry(), RecordSettings(image_tool=True), (False, True, True, True, True, True, True)),
    (entry(params=()), RecordSettings(image_tool=True),  # the image tool needs tool support
     (False, True, True, False, False, True, True)),
])
def test_capabilities(e, rs, expected):
    assert model_capabilities(e, rs) == tuple(zip(CAPS, expected, strict=True))


@pytest.mark.parametrize("e", [entry(), entry(params=()), entry(outputs=("text", "image"))])
@pytest.mark.parametrize("tool_model", ["", "google/gemini-2.5-flash-image"])
def test_image_button_follows_what_the_chat_can_output(e, tool_model):
    """Open WebUI shows its Image button exactly where the pipe can return a picture."""
    valves = Valves(IMAGE_TOOL_MODEL=tool_model)
    caps = dict(model_capabilities(e, record_settings(valves)))
    assert caps["image_generation"] is can_output_images(e, RequestSettings.merge(valves, None))


@pytest.mark.parametrize(("e", "tags"), [
    (entry("openai/gpt-4o", inputs=("text", "image")), ("openai", "vision", "tools")),
    (entry("deepseek/r1:free", params=("reasoning",), prompt="0", completion="0"),
     ("deepseek", "free", "reasoning")),
    (entry("google/img", outputs=("text", "image"), params=()), ("google", "image output")),
])
def test_tags(e, tags):
    assert model_tags(e) == tags


@pytest.mark.parametrize(("e", "parts"), [
    (entry(), ["A model.", "Context: 128,000 tokens", "$2.50/M input, $10.00/M output",
               "Reasoning: no"]),
    (entry(prompt="0", completion="0", params=("reasoning",), description=""),
     ["Price: free", "Reasoning: yes"]),
    (entry(prompt="0.00000000005", completion="0.0000000001"), ["$5e-05/M input"]),
])
def test_description(e, parts):
    text = describe_model(e)
    assert all(p in text for p in parts), text


def test_utility_entries_get_a_record_without_controls():
    rec = desired_record("My usage", None, RS, (PUBLIC_READ,))
    assert rec.name == "My usage" and not any(v for _, v in rec.capabilities)
    assert [record_wanted(i) for i in ("_health", "_status-model-id", "_my_usage", "a/b")] == \
        [False, False, True, True]


# -- the merge: a field follows the catalog only while it still holds what the sync wrote ----

BASE = Managed("GPT-4o", "old text", (("vision", True), ("citations", True)),
               ("openai", "vision"), (PUBLIC_READ,), True)
NEW = Managed("GPT-4o (new)", "new text", (("vision", True), ("citations", True)),
              ("openai", "vision", "tools"), (("group", "g1", "read"),), True)


def edit(m: Managed, **kw) -> Managed:
    return dataclasses.replace(m, **kw)


@pytest.mark.parametrize(("current", "expected"), [
    # untouched: everything follows the catalog / valves
    (BASE, NEW),
    # renamed by the admin: the name stays, the rest follows
    (edit(BASE, name="Ours"), edit(NEW, name="Ours")),
    (edit(BASE, description="mine"), edit(NEW, description="mine")),
    # a capability switched off: only that key stays
    (edit(BASE, capabilities=(("vision", True), ("citations", False))),
     edit(NEW, capabilities=(("vision", True), ("citations", False)))),
    # access set by hand (e.g. one user): kept although MODEL_ACCESS changed
    (edit(BASE, access=(("user", "u1", "read"),)), edit(NEW, access=(("user", "u1", "read"),))),
    # switched off by the admin: stays off
    (edit(BASE, is_active=False), edit(NEW, is_active=False)),
    # tags: an admin-removed tag stays removed, an admin-added tag stays
    (edit(BASE, tags=("openai", "favourite")), edit(NEW, tags=("openai", "tools", "favourite"))),
])
def test_merge_keeps_admin_edits(current, expected):
    assert merge_record(current, BASE, NEW) == expected


def test_admin_edits_are_recognised_forever():
    """After a sync the mark keeps the value the sync wrote for an edited field, so the next
    sync (with yet other catalog values) still sees the edit."""
    current = edit(BASE, name="Ours", capabilities=(("vision", True), ("citations", False)))
    merged = merge_record(current, BASE, NEW)
    mark = new_mark(current, BASE, NEW)
    later = edit(NEW, name="GPT-4o v3", description="v3",
                 capabilities=(("vision", False), ("citations", True)))
    again = merge_record(merged, mark, later)
    assert again.name == "Ours" and dict(again.capabilities) == {"vision": False,
                                                                 "citations": False}
    assert again.description == "v3"


def stored(m: Managed, mark: Managed | None, rid="openrouter.a/b") -> StoredRecord:
    return StoredRecord(rid, m, mark, record_meta({}, m, mark or m), {})


def test_plan_record():
    assert plan_record("r", NEW, None).base is None                 # missing: insert
    assert plan_record("r", NEW, stored(NEW, NEW)) is None            # converged: no write
    assert plan_record("r", NEW, stored(BASE, None)) is None          # admin-made: untouched
    write = plan_record("r", NEW, stored(edit(BASE, name="Ours"), BASE))
    assert write.values.name == "Ours" and write.values.description == "new text"
    assert write.mark.name == "GPT-4o" and write.mark.description == "new text"


def test_records_leaving_the_listing_are_switched_off_only_when_untouched():
    recs = {"openrouter.gone": stored(BASE, BASE, "openrouter.gone"),
            "openrouter.edited": stored(edit(BASE, name="x"), BASE, "openrouter.edited"),
            "openrouter.mine": stored(BASE, None, "openrouter.mine"),
            "openrouter.off": stored(edit(BASE, is_active=False),
                                     edit(BASE, is_active=False), "openrouter.off"),
            "other.gone": stored(BASE, BASE, "other.gone"),
            "openrouter.kept": stored(BASE, BASE, "openrouter.kept")}
    plans = plan_retirements(["openrouter.kept"], recs, "openrouter.")
    assert [(w.id, w.values.is_active, w.mark.is_active) for w in plans] == [
        ("openrouter.gone", False, False)]
    # when it comes back, the sync switches it on again (the admin never touched it)
    back = plan_record("openrouter.gone", BASE, stored(plans[0].values, plans[0].mark))
    assert back is not None and back.values.is_active is True


def test_meta_keeps_unmanaged_keys_and_carries_the_mark():
    meta = record_meta({"profile_image_url": "/x.png", "toolIds": ["t"]}, NEW, BASE)
    assert meta["profile_image_url"] == "/x.png" and meta["toolIds"] == ["t"]
    assert meta["tags"] == [{"name": "openai"}, {"name": "vision"}, {"name": "tools"}]
    assert Managed.from_mark(meta["openrouter_pipe_sync"]) == BASE
    assert Managed.from_mark({"garbage": 1}) is None and Managed.from_mark("x") is None


@pytest.mark.parametrize(("module", "fid"), [
    ("function_openrouter", "openrouter"),
    ("function_my_pipe_0123456789abcdef0123456789abcdef", "my_pipe"),
    ("function_my_pipe", "my_pipe"),
    ("openrouter_responses_pipe", None),
])
def test_function_id_from_module(module, fid):
    assert function_id_from_module(module) == fid


# -- fuzz: the two parsers of outside input (the valve text, the mark in an editable record) --

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_model_access_never_fails_and_never_widens(raw):
    spec = parse_model_access(raw)
    assert spec.mode in ("admins", "all", "groups")
    if spec.mode == "all":
        assert "all" in [p.strip().lower() for p in raw.split(",")]
    if spec.mode == "groups":
        assert spec.groups and all(g == g.strip() and g for g in spec.groups)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "description", "capabilities", "tags",
                                        "access", "is_active"]), JSON) | JSON)
def test_a_mangled_mark_is_read_or_ignored_never_raises(raw):
    mark = Managed.from_mark(raw)
    assert mark is None or isinstance(mark, Managed)


@pytest.mark.parametrize(("role", "groups", "access", "allowed"), [
    ("admin", (), "admins", True),
    ("user", (), "admins", False),
    ("user", (), "all", True),
    ("user", ("Team",), "team, ops", True),
    ("user", ("marketing",), "team, ops", False),
    ("pending", (), "admins", False),
])
def test_who_may_use_the_models(role, groups, access, allowed):
    assert may_use_models(role, groups, parse_model_access(access)) is allowed
