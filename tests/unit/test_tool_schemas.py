"""Tool names, strict schemas, MCP valve parsing, argument parsing (pure parts of §10)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    ConfigError,
    ToolSpec,
    assign_tool_names,
    parse_arguments,
    parse_body_tools,
    parse_mcp_servers,
    result_text,
    strictify,
    tool_set,
    truncate,
)

VALID = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# -- names -------------------------------------------------------------------------------

names = st.lists(st.text(min_size=0, max_size=90), max_size=12)


@given(names)
def test_names_are_valid_injective_and_reversible(raw: list[str]) -> None:
    mapping = assign_tool_names(raw)
    assert set(mapping) == set(raw)
    assert all(VALID.fullmatch(v) for v in mapping.values())
    assert len(set(mapping.values())) == len(mapping)  # injective
    reverse = {v: k for k, v in mapping.items()}
    assert all(reverse[mapping[n]] == n for n in raw)  # exact way back


@given(names, st.randoms())
def test_names_do_not_depend_on_order(raw: list[str], rnd: Any) -> None:
    shuffled = list(raw)
    rnd.shuffle(shuffled)
    assert assign_tool_names(raw) == assign_tool_names(shuffled)


@given(st.lists(st.from_regex(VALID, fullmatch=True), max_size=8))
def test_valid_names_are_kept(raw: list[str]) -> None:
    assert assign_tool_names(raw) == {n: n for n in raw}


def test_clashes_get_suffixes() -> None:
    assert assign_tool_names(["ok\n"]) == {"ok\n": "ok"}  # `$` would accept the newline
    assert assign_tool_names(["a.b", "a b", "a_b"]) == {"a_b": "a_b", "a b": "a_b_2",
                                                        "a.b": "a_b_3"}
    long = "x" * 70
    mapping = assign_tool_names([long, long + "!"])
    assert sorted(mapping.values()) == ["x" * 62 + "_2", "x" * 64]


# -- strict mode: the rules, encoded independently of the implementation -----------------

FORBIDDEN = {"allOf", "not", "if", "then", "else", "patternProperties", "oneOf",
             "prefixItems", "default"}


def strict_violations(schema: Any, root: Any, path: str = "$") -> list[str]:
    """OpenAI strict-mode rules: every object closed with all properties required; every
    node typed (type/enum/const/anyOf/$ref); refs resolve locally; no unsupported keywords."""
    out: list[str] = []
    if not isinstance(schema, dict):
        return [f"{path}: not an object schema"]
    out += [f"{path}: forbidden {k}" for k in FORBIDDEN & schema.keys()]
    for defs in ("$defs", "definitions"):
        for name, sub in (schema.get(defs) or {}).items():
            out += strict_violations(sub, root, f"{path}.{defs}.{name}")
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/") if schema["$ref"] != "#" else []:
            target = target.get(part) if isinstance(target, dict) else None
        return out + ([] if isinstance(target, dict) else [f"{path}: dangling $ref"])
    if "anyOf" in schema:
        for i, sub in enumerate(schema["anyOf"]):
            out += strict_violations(sub, root, f"{path}.anyOf[{i}]")
        return out
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if kind is None and "enum" not in schema and "const" not in schema:
        return [*out, f"{path}: untyped"]
    if "object" in kinds:
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is not False:
            out.append(f"{path}: additionalProperties not false")
        if set(schema.get("required", [])) != set(props):
            out.append(f"{path}: not all properties required")
        for name, sub in props.items():
            out += strict_violations(sub, root, f"{path}.{name}")
    if "array" in kinds:
        out += strict_violations(schema.get("items"), root, f"{path}[]")
    return out


def accepts_null(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return (kind == "null" or (isinstance(kind, list) and "null" in kind)
            or any(accepts_null(s) for s in schema.get("anyOf", [])))


leaf = st.sampled_from([{"type": "string"}, {"type": "integer", "minimum": 0},
                        {"type": "number"}, {"type": "boolean"},
                        {"type": "string", "enum": ["a", "b"]},
                        {"type": "string", "default": "x", "description": "d"}])
FREE_FORM: list[dict[str, Any]] = [
    {"type": "object"}, {}, {"type": "object", "properties": {}},
    {"type": "object", "additionalProperties": True},
    {"type": "object", "additionalProperties": {"type": "string"}},
    {"allOf": [{"type": "string"}]}, {"type": "array", "items": [{"type": "string"}]}]
free_form = st.sampled_from(FREE_FORM)


def has_free_form(node: Any) -> bool:
    """Whether a generated schema contains one of the FREE_FORM nodes anywhere."""
    if isinstance(node, dict):
        return node in FREE_FORM or any(has_free_form(v) for v in node.values())
    if isinstance(node, list):
        return any(has_free_form(v) for v in node)
    return False


def objects(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), children,
                           min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req}))


def compound(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        objects(children),
        children.map(lambda c: {"type": "array", "items": c}),
        st.lists(children, min_size=1, max_size=3).map(lambda cs: {"anyOf": cs}),
        st.lists(children, min_size=1, max_size=3).map(lambda cs: {"oneOf": cs}))


strictifiable = st.recursive(leaf | st.just({"$ref": "#/$defs/Point"}), compound,
                             max_leaves=12)
POINT = {"type": "object", "properties": {"x": {"type": "number"},
                                          "label": {"type": "string"}}, "required": ["x"]}


@settings(max_examples=300)
@given(objects(strictifiable))
def test_strictified_schemas_follow_the_strict_rules(schema: dict[str, Any]) -> None:
    schema = {**schema, "$defs": {"Point": POINT}}
    result, strict = strictify(schema)
    assert strict
    assert strict_violations(result, result) == []
    for name in schema["properties"]:
        assert name in result["properties"]  # nothing renamed or lost
        if name not in schema.get("required", []):
            assert accepts_null(result["properties"][name]), name  # optional -> nullable


@settings(max_examples=200)
@given(objects(st.recursive(leaf | free_form, compound, max_leaves=8)))
def test_unstrictifiable_schemas_are_sent_unchanged(schema: dict[str, Any]) -> None:
    result, strict = strictify(schema)
    assert strict is not has_free_form(schema)  # one free-form node anywhere: non-strict
    if strict:
        assert strict_violations(result, result) == []
    else:
        assert result == schema


@pytest.mark.parametrize("free", [{"type": "object"}, {"type": "object", "properties": {}},
                                  {"type": "object", "additionalProperties": True}])
def test_free_form_objects_are_sent_non_strict_at_the_root_or_nested(free: dict[str, Any]
                                                                     ) -> None:
    assert strictify(free) == (free, False)  # the model may pass any keys
    nested = {"type": "object", "properties": {"data": free, "n": {"type": "integer"}},
              "required": ["n"]}
    assert strictify(nested) == (nested, False)


def test_closed_objects_stay_strict() -> None:
    closed = {"type": "object", "properties": {}, "additionalProperties": False}
    assert strictify(closed) == ({**closed, "required": []}, True)
    declared, strict = strictify({"type": "object", "properties": {"a": {"type": "string"}}})
    assert strict and declared["additionalProperties"] is False  # as OpenAI's SDK does


def test_strictify_examples() -> None:
    schema = {"type": "object", "properties": {
        "when": {"type": "string", "default": "now"},
        "where": {"$ref": "#/$defs/Place"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "mode": {"oneOf": [{"type": "string"}, {"type": "integer"}]}},
        "required": ["tags"],
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    result, strict = strictify(schema)
    assert strict
    assert result["properties"]["when"] == {"type": ["string", "null"]}
    assert result["properties"]["where"] == {"anyOf": [{"$ref": "#/$defs/Place"},
                                                       {"type": "null"}]}
    assert result["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert result["properties"]["mode"] == {"anyOf": [{"type": "string"},
                                                      {"type": "integer"}, {"type": "null"}]}
    assert result["$defs"]["Place"] == {"type": "object", "properties": {
        "city": {"type": ["string", "null"]}}, "required": ["city"],
        "additionalProperties": False}
    assert strictify(None) == ({"type": "object", "properties": {}, "required": [],
                                "additionalProperties": False}, True)
    assert strictify({"type": "string"}) == ({"type": "string"}, False)


def test_strictify_results_are_independent_copies() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    first, _ = strictify(schema)
    first["properties"]["a"]["type"] = "mutated"
    again, _ = strictify(schema)
    assert again["properties"]["a"]["type"] == ["string", "null"]
    assert schema == {"type": "object", "properties": {"a": {"type": "string"}}}


# -- the request's tool set --------------------------------------------------------------


async def _noop(**kwargs: Any) -> str:
    return ""


def test_tool_set_merges_owui_and_body_tools() -> None:
    body = parse_body_tools([
        {"type": "function", "function": {"name": "search_web", "description": "web",
                                          "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "shared", "description": "from body"}},
        {"type": "weird"}, "junk"])
    owui = {"shared": {"callable": _noop, "spec": {"name": "shared", "description": "owui"}},
            "my.tool": {"callable": _noop, "spec": {"name": "my.tool"}}}
    piped = tool_set(owui, body, strict=True, runnable_only=True)
    assert [w["name"] for w in piped.wire] == ["my_tool", "shared"]
    assert piped.find("my_tool").spec.name == "my.tool"  # type: ignore[union-attr]
    assert piped.wire[1]["description"] == "owui"
    passthrough = tool_set(owui, body, strict=False, runnable_only=False)
    assert [w["name"] for w in passthrough.wire] == ["my_tool", "search_web", "shared"]
    assert all(w["strict"] is False for w in passthrough.wire)


# -- MCP valve ---------------------------------------------------------------------------


def test_mcp_every_server_kept() -> None:
    raw = json.dumps([{"server_label": "a", "server_url": "https://a.example/mcp"},
                      {"server_label": "b", "server_url": "wss://b.example",
                       "require_approval": "never", "allowed_tools": ["x"]}])
    assert parse_mcp_servers(raw) == (
        {"type": "mcp", "server_label": "a", "server_url": "https://a.example/mcp"},
        {"type": "mcp", "server_label": "b", "server_url": "wss://b.example",
         "require_approval": "never", "allowed_tools": ["x"]})
    one = parse_mcp_servers('{"server_label": "solo", "server_url": "http://h:8080/x"}')
    assert [s["server_label"] for s in one] == ["solo"]
    assert parse_mcp_servers("  ") == ()


@pytest.mark.parametrize(("raw", "message"), [
    ("{nope", "is not valid JSON"),
    ("[1]", "server #1 is not an object"),
    ('[{"server_label": "a b", "server_url": "https://x"}]', "needs a server_label"),
    ('[{"server_label": "a", "server_url": "ftp://x"}]', "(a) needs a server_url"),
    ('[{"server_label": "a", "server_url": "https://x", "url": 1}]', "unknown key(s) ['url']"),
    ('[{"server_label": "a", "server_url": "https://x", "headers": {"k": 1}}]',
     "headers must map names to strings"),
    ('[{"server_label": "a", "server_url": "https://x"},'
     ' {"server_label": "a", "server_url": "https://y"}]', "server_label 'a' twice"),
])
def test_mcp_bad_json_is_a_clear_config_error(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_mcp_servers(raw)
    assert message in str(err.value) and "REMOTE_MCP_SERVERS_JSON" in str(err.value)


# -- arguments and results ---------------------------------------------------------------


@given(st.text(max_size=40))
def test_arguments_are_parsed_or_refused_never_guessed(raw: str) -> None:
    try:
        expected = json.loads(raw) if raw.strip() else {}
    except ValueError:
        expected = None
    schema = {"type": "object", "properties": {k: {} for k in expected}} \
        if isinstance(expected, dict) else {"type": "object", "properties": {}}
    if isinstance(expected, dict):
        assert parse_arguments(raw, schema) == {
            k: v for k, v in expected.items() if not k.startswith("__")}
    else:
        with pytest.raises(Exception, match="JSON"):
            parse_arguments(raw, schema)


def test_null_optional_arguments_are_dropped() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"},
                                               "c": {"type": "integer"}}, "required": ["b"]}
    assert parse_arguments('{"a": null, "b": null, "c": 1}', schema) == {"b": None, "c": 1}


NESTED = {"type": "object", "properties": {
    "opts": {"type": "object", "properties": {
        "limit": {"type": "integer"}, "tag": {"type": ["string", "null"]},
        "must": {"type": "integer"}, "where": {"$ref": "#/$defs/Place"}},
        "required": ["must"]},
    "rows": {"type": "array", "items": {"$ref": "#/$defs/Place"}},
    "pick": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/Place"}]}},
    "required": ["opts"],
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_nested_null_optional_arguments_are_dropped() -> None:
    assert parse_arguments('{"opts": {"limit": null}}', NESTED) == {"opts": {}}
    raw = json.dumps({"opts": {"limit": None, "tag": None, "must": None,
                               "where": {"city": None}},
                      "rows": [{"city": None}, {"city": "Rio"}], "pick": {"city": None}})
    assert parse_arguments(raw, NESTED) == {  # required or nullable nulls stay
        "opts": {"tag": None, "must": None, "where": {}},
        "rows": [{}, {"city": "Rio"}], "pick": {}}
    assert parse_arguments('{"opts": null}', NESTED) == {"opts": None}  # required: kept


def test_result_text_and_truncation() -> None:
    assert result_text({"a": "ç"}) == '{"a": "ç"}'
    assert result_text(None) == ""
    assert result_text("lone \ud800 surrogate") == "lone \ufffd surrogate"
    assert truncate("abcdef", 3) == "abc\n…[truncated: 3 more characters]"
    assert truncate("abc", 3) == "abc"


def test_tool_spec_parse() -> None:
    assert parse_body_tools([{"name": "bare", "parameters": "x"}]) == (ToolSpec("bare"),)


def test_nullable_object_property_keeps_null() -> None:
    schema = {"type": "object", "properties": {"opt": {
        "type": ["object", "null"], "properties": {"a": {"type": "string"}}}},
        "required": ["opt"]}
    result, strict = strictify(schema)
    assert strict and result["properties"]["opt"]["type"] == ["object", "null"]
    assert result["properties"]["opt"]["required"] == ["a"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["server_label", "server_url", "headers", "name",
                                       "function", "parameters", "type", "x"]),
                      children, max_size=5), max_leaves=15)


@given(json_values)
def test_mcp_parser_never_crashes_and_keeps_only_valid_servers(value: Any) -> None:
    try:
        tools = parse_mcp_servers(json.dumps(value))
    except ConfigError as exc:
        assert "REMOTE_MCP_SERVERS_JSON" in str(exc)
        return
    for tool in tools:
        assert tool["type"] == "mcp" and VALID.fullmatch(tool["server_label"])
        assert re.match(r"(https?|wss?)://", tool["server_url"])


@given(json_values)
def test_body_tools_parser_never_crashes(value: Any) -> None:
    specs = parse_body_tools(value)
    assert all(isinstance(s.name, str) and s.name for s in specs)
    wire = tool_set({}, specs, strict=True, runnable_only=False).wire
    assert all(VALID.fullmatch(w["name"]) for w in wire)


def test_tool_cards_in_history_become_readable_lines() -> None:
    from openrouter_responses_pipe import tool_card, tool_cards_as_text

    card = tool_card("call_1", "weather", '{"city": "Zürich \\"old\\""}', 'Sun & <rain>\n2')
    text = f"Let me check.\n\n{card}\nIt is sunny."
    assert tool_cards_as_text(text) == (
        'Let me check.\n\n[Tool call weather({"city": "Zürich \\"old\\""}) returned: '
        "Sun & <rain>\n2]\n\nIt is sunny.")
    assert tool_cards_as_text("plain") == "plain"


def test_undeclared_argument_names_are_dropped() -> None:
    declared = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert parse_arguments('{"a": 1, "zz": 2}', declared) == {"a": 1}
    # no schema, or one without properties: the tool gets no arguments at all
    assert parse_arguments('{"a": 1, "zz": 2}') == {}
    assert parse_arguments('{"a": 1, "zz": 2}', {"type": "object"}) == {}
    assert parse_arguments('{"a": 1}', {"type": "object", "properties": {}}) == {}


IMPERSONATION = {"__user__": {"id": "u-bob", "role": "admin"}, "__event_emitter__": "x",
                 "__request__": 1, "__metadata__": {}, "__oauth_token__": "t", "__x__": 0,
                 "__id": 1}


@pytest.mark.parametrize("schema", [
    None, {"type": "object"}, {"type": "object", "properties": {}},
    {"type": "object", "properties": {"q": {"type": "string"}}},
    # even a schema that (wrongly) declares the reserved names never lets them through
    {"type": "object", "properties": {k: {} for k in [*IMPERSONATION, "q"]}},
])
def test_reserved_arguments_never_reach_a_tool(schema: Any) -> None:
    raw = json.dumps({**IMPERSONATION, "q": "hi"})
    args = parse_arguments(raw, schema)
    assert not any(k.startswith("__") for k in args)
    declared = isinstance(schema, dict) and "q" in schema.get("properties", {})
    assert args == ({"q": "hi"} if declared else {})


def test_citations_number_urls_once_and_keep_source_names_distinct() -> None:
    from openrouter_responses_pipe import CitationBook, citation_suffix, source_event

    def ann(url: str, title: str) -> dict[str, Any]:
        return {"type": "url_citation", "url": url, "title": title}

    book = CitationBook()
    used, new = book.cite([ann("https://a.example/1", "News"), ann("https://b.example", "B")])
    assert used == [1, 2] and citation_suffix(used) == " [1][2]"
    used, new2 = book.cite([ann("https://b.example", "B"), ann("https://c.example/x", "News")])
    assert used == [2, 3] and [n for n, _ in new2] == [3]  # a later round keeps number 2
    # Open WebUI 0.6.28 numbers chips by distinct source name: equal titles must differ
    names = [source_event(n, a)["data"]["metadata"][0]["name"] for n, a in [*new, *new2]]
    assert names == ["News", "B", "News (https://c.example/x)"]


def test_absurdly_deep_arguments_are_reported_to_the_model_not_raised():
    from openrouter_responses_pipe import BadToolArguments, parse_arguments

    deep = '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"
    with pytest.raises(BadToolArguments, match="not valid JSON"):
        parse_arguments(deep)
