"""Valves, encrypted secrets, error translation and the retry policy."""

from __future__ import annotations

import socket
import ssl

import pytest

from openrouter_responses_pipe import (
    ConfigError,
    PipeError,
    RequestSettings,
    UpstreamConnectionError,
    UpstreamStatusError,
    UserValves,
    Valves,
    describe_error,
    failure_reason,
    parse_retry_after,
    parse_upstream_error,
    retry_delay,
)


def test_api_key_is_stored_encrypted_and_revealed(monkeypatch):
    monkeypatch.setenv("WEBUI_SECRET_KEY", "secret-one")
    valves = Valves(API_KEY="sk-or-v1-abc")
    stored = valves.model_dump()["API_KEY"]
    assert stored.startswith("encrypted:") and "sk-or-v1-abc" not in stored
    reloaded = Valves(**valves.model_dump())  # what Open WebUI does on every call
    assert RequestSettings.merge(reloaded, None).api_key == "sk-or-v1-abc"


def test_rotated_secret_gives_an_actionable_config_error(monkeypatch):
    monkeypatch.setenv("WEBUI_SECRET_KEY", "secret-one")
    stored = Valves(API_KEY="sk-or-v1-abc").model_dump()
    monkeypatch.setenv("WEBUI_SECRET_KEY", "secret-two")
    with pytest.raises(ConfigError, match="re-enter API_KEY"):
        RequestSettings.merge(Valves(**stored), None)


def test_api_key_is_a_password_field_and_every_valve_is_described():
    schema = Valves.model_json_schema()
    assert schema["properties"]["API_KEY"]["input"] == {"type": "password"}
    for model in (Valves, UserValves):
        for name, info in model.model_fields.items():
            assert info.description, name
    Valves()  # every field has a default
    UserValves()


def test_missing_key_is_a_config_error_that_names_the_valve():
    with pytest.raises(ConfigError, match="API_KEY"):
        RequestSettings.merge(Valves(API_KEY=""), None).require_api_key()


def test_user_valves_accept_inherit_in_any_case_and_none():
    assert UserValves(REASONING_EFFORT="Inherit").REASONING_EFFORT == "inherit"
    assert UserValves(REASONING_SUMMARY=None).REASONING_SUMMARY == "inherit"
    assert UserValves(SHOW_FINAL_STATUS=True).SHOW_FINAL_STATUS == "on"
    with pytest.raises(ValueError):
        UserValves(REASONING_EFFORT="ludicrous")


def test_402_explains_itself_with_openrouters_message():
    err = parse_upstream_error(402, b'{"error":{"code":402,"message":"Insufficient credits. '
                                    b'Add more using https://openrouter.ai/settings/credits"}}',
                               {})
    text = describe_error(err)
    assert "out of credits" in text and "Insufficient credits" in text and "HTTP 402" in text


def test_provider_raw_message_and_moderation_reasons_are_shown():
    body = (b'{"error":{"code":400,"message":"Provider returned error","metadata":'
            b'{"raw":"at most 64 tools are allowed","provider_name":"OpenAI"}}}')
    assert "at most 64 tools are allowed" in describe_error(parse_upstream_error(400, body, {}))
    body = (b'{"error":{"code":403,"message":"Your input was flagged","metadata":'
            b'{"reasons":["harassment"],"flagged_input":"..."}}}')
    assert "harassment" in describe_error(parse_upstream_error(403, body, {}))


def test_non_json_error_body_is_still_shown():
    err = parse_upstream_error(502, b"<html>Bad gateway</html>", {})
    assert "Bad gateway" in describe_error(err)


SETTINGS = RequestSettings.merge(Valves(API_KEY="k", MAX_RETRIES=2, RETRY_MAX_WAIT_SECONDS=10),
                                 None)


def status(code, retry_after=None):
    return UpstreamStatusError(status=code, provider_message="x", retry_after=retry_after)


@pytest.mark.parametrize("code", [400, 401, 402, 403, 404, 413, 422])
def test_client_errors_are_not_retried(code):
    assert retry_delay(status(code), 0, SETTINGS) is None


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 524, 529])
def test_transient_errors_are_retried_with_backoff(code):
    assert 0 < retry_delay(status(code), 0, SETTINGS, rand=lambda: 0) == 0.5
    assert retry_delay(status(code), 1, SETTINGS, rand=lambda: 0) == 1.0
    assert retry_delay(status(code), 2, SETTINGS) is None  # MAX_RETRIES reached


def test_retry_after_is_honoured_up_to_the_cap():
    assert retry_delay(status(429, retry_after=3), 0, SETTINGS) == 3
    assert retry_delay(status(429, retry_after=60), 0, SETTINGS) is None
    text = describe_error(status(429, retry_after=60))
    assert "Retry after about 60 seconds" in text


def test_network_errors_are_retried_but_other_errors_are_not():
    assert retry_delay(UpstreamConnectionError("refused"), 0, SETTINGS) is not None


def test_retry_after_header_forms():
    assert parse_retry_after("20") == 20
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    err = parse_upstream_error(503, b'{"error":{"code":503,"message":"busy","availability":'
                                    b'{"retryable":true,"retry_after":7}}}', {})
    assert err.retry_after == 7


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(("exc", "reason"), [
    (TimeoutError(), "timed out"),
    (ConnectionRefusedError(111, "Connect call failed ('10.0.0.5', 443)"), "connection refused"),
    (_caused(RuntimeError("Cannot connect to host 10.0.0.5:443"),
             ConnectionRefusedError(111, "refused")), "connection refused"),
    (socket.gaierror(-2, "Name or service not known"), "DNS failure"),
    (ssl.SSLCertVerificationError(1, "certificate verify failed: db.internal"), "TLS error"),
    (FileNotFoundError(2, "No such file or directory", "/app/backend/data/uploads/x"),
     "file missing"),
    (PermissionError(13, "Permission denied", "/srv/x"), "permission denied"),
    (OSError(113, "No route to host"), "host unreachable"),
    (ValueError("postgresql://admin@10.0.0.5/owui SELECT * FROM file"), "network error"),
])
def test_a_failure_is_named_by_its_kind_never_its_text(exc, reason):
    assert failure_reason(exc) == reason


def test_aiohttp_connector_errors_are_named_by_kind():
    import aiohttp

    key = aiohttp.client_reqrep.ConnectionKey("10.0.0.5", 443, True, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    assert failure_reason(refused) == "connection refused"
    assert failure_reason(aiohttp.ServerDisconnectedError()) == "connection closed"
    assert failure_reason(aiohttp.ClientPayloadError("x")) == "answer broke off"
    assert failure_reason(OSError("odd"), "storage error") == "storage error"


def test_describe_error_redacts_what_it_returns():
    text = describe_error(PipeError("It failed with key sk-or-zq9x8w7v6u5t attached."))
    assert text == "It failed with key sk-or-[redacted] attached."
