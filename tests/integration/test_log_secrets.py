"""Secrets and hidden prompts never reach an ordinary user's log citation (issue #11, item 3).

The admin runs LOG_LEVEL=DEBUG (the request body, with the admin's system prompt and remote
MCP server headers, goes into the turn's log); a turn fails, and the default
REQUEST_LOG_CITATION=errors attaches that log to the user's message.
"""

from __future__ import annotations

import json
import logging

from helpers import body, stream

from openrouter_responses_pipe import EncryptedStr, Pipe, redact, redact_payload

GPT4O = "openai/gpt-4o"
KEY = "sk-or-v1-0123456789abcdefSECRET"
SYSTEM = "ADMIN-ONLY SYSTEM PROMPT: the discount code is PELICAN-42"
MCP = [{"server_label": "crm", "server_url": "https://mcp.example.com/sse",
        "headers": {"X-Custom-Auth": "mcp-header-value-7f3a9c", "Authorization":
                    "Bearer mcp-bearer-value-55aa11"},
        "authorization": "oauth-access-value-99bb22", "require_approval": "never"}]
SECRETS = ("PELICAN-42", "mcp-header-value-7f3a9c", "mcp-bearer-value-55aa11",
           "oauth-access-value-99bb22", KEY)


def log_citations(events):
    return [d["document"][0] for d in events.of("citation")
            if d["source"]["name"].startswith("Pipe log")]


async def failing_turn(pipe: Pipe, emulator, events, role: str) -> tuple[str, str]:
    pipe.valves = pipe.Valves(BASE_URL=emulator.base_url, API_KEY=KEY, LOG_LEVEL="DEBUG",
                              REMOTE_MCP_SERVERS_JSON=json.dumps(MCP))
    payload = body(GPT4O, "[emu:http_error status=402] hi")
    payload["messages"].insert(0, {"role": "system", "content": SYSTEM})
    out = await stream(pipe, payload, __event_emitter__=events,
                       __user__={"id": f"{role}-1", "role": role, "valves": None})
    (citation,) = log_citations(events)
    return out.error or "", citation


async def test_a_users_log_citation_has_no_body_prompt_or_header(pipe, emulator, events):
    error, citation = await failing_turn(pipe, emulator, events, "user")
    assert "Insufficient credits" in error
    sent = emulator.requests[-1]["json"]  # the request did carry them upstream
    assert SYSTEM in json.dumps(sent) and "mcp-header-value-7f3a9c" in json.dumps(sent)
    assert "Turn failed (UpstreamStatusError, HTTP 402)" in citation  # still useful
    for secret in SECRETS:
        assert secret not in citation, secret
    assert "Request body" not in citation and '"input"' not in citation
    assert "admin-only line(s) not shown" in citation


async def test_the_admin_sees_the_body_but_never_a_credential(pipe, emulator, events):
    _, citation = await failing_turn(pipe, emulator, events, "admin")
    assert "Request body" in citation and "PELICAN-42" in citation  # the admin's own prompt
    for secret in SECRETS[1:]:
        assert secret not in citation, secret
    assert '"X-Custom-Auth":"[redacted]"' in citation


def test_header_like_keys_are_redacted_in_payloads_and_text():
    payload = {"headers": {"X-Anything": "v1"}, "Authorization": "Bearer abc",
               "x-api-key": "k1", "api-key": "k2", "Cookie": "s=1", "refresh_token": "t",
               "client_secret": "s", "OPENAI_API_KEY": "o", "max_output_tokens": 5,
               "input": [{"role": "user", "content": "what is a key?"}]}
    clean = redact_payload(payload)
    assert clean["max_output_tokens"] == 5 and clean["input"] == payload["input"]
    assert {clean[k] for k in payload if k not in ("max_output_tokens", "input",
                                                   "headers")} == {"[redacted]"}
    assert clean["headers"] == {"X-Anything": "[redacted]"}
    assert payload["x-api-key"] == "k1"  # pure: the payload itself is untouched
    text = redact("""{"x-api-key": "k-123", 'cookie': 'a=1; b=2', api_key=abc refresh_token:
                  "t-9" "tokens": 5}""")
    for leaked in ("k-123", "a=1", "abc", "t-9"):
        assert leaked not in text, text
    assert '"tokens": 5' in text


def test_dict_arguments_are_redacted_wherever_a_line_is_written(caplog):
    from openrouter_responses_pipe import CURRENT_LOG, LOG, RequestLog, flush_logs

    log = RequestLog("r1", level=logging.DEBUG)
    token = CURRENT_LOG.set(log)
    try:
        LOG.warning("headers were %s", {"Authorization": "Bearer zzz-top-secret-1"})
        LOG.warning("server %r", {"api_key": "plain-key-value-2"})
    finally:
        CURRENT_LOG.reset(token)
    flush_logs()
    text = log.text()
    assert "zzz-top-secret-1" not in text and "plain-key-value-2" not in text
    assert text.count("[redacted]") == 2


def test_remote_mcp_servers_are_stored_encrypted_and_plaintext_still_works(monkeypatch):
    monkeypatch.setenv("WEBUI_SECRET_KEY", "test-secret-key")
    valves = Pipe.Valves(REMOTE_MCP_SERVERS_JSON=json.dumps(MCP))
    stored = valves.model_dump()["REMOTE_MCP_SERVERS_JSON"]
    assert stored.startswith("encrypted:") and "mcp-header-value" not in stored
    schema = Pipe.Valves.model_json_schema()["properties"]["REMOTE_MCP_SERVERS_JSON"]
    assert schema["input"] == {"type": "password"}
    assert EncryptedStr(stored).reveal() == json.dumps(MCP)
    again = Pipe.Valves(**valves.model_dump())  # Open WebUI reloads stored valves like this
    assert again.REMOTE_MCP_SERVERS_JSON == stored
    from openrouter_responses_pipe import RequestSettings

    for source in (valves, again):
        settings = RequestSettings.merge(source, None)
        assert json.loads(settings.tools.mcp_servers_json) == MCP
    monkeypatch.delenv("WEBUI_SECRET_KEY")  # an old plaintext value (stored without a secret)
    plain = Pipe.Valves(REMOTE_MCP_SERVERS_JSON=json.dumps(MCP))
    assert json.loads(RequestSettings.merge(plain, None).tools.mcp_servers_json) == MCP
