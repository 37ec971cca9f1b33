"""Pure telemetry helpers: redaction (fuzzed), percentiles, the health report."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import _REDACTION_TRIGGER as REDACTION_TRIGGER
from openrouter_responses_pipe import _REDACTIONS as REDACTIONS
from openrouter_responses_pipe import _SECRETS as SECRETS
from openrouter_responses_pipe import (
    AdmissionGate,
    CatalogRegistry,
    Telemetry,
    health_markdown,
    health_snapshot,
    percentile,
    redact,
    register_secret,
)

SECRET = "correct-horse-battery-staple-42"
register_secret(SECRET)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_a_registered_secret_never_survives_redaction(before, after):
    assert SECRET not in redact(before + SECRET + after)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"sk-or-v1-[a-f0-9]{16,64}", fullmatch=True), st.text(max_size=40))
def test_openrouter_keys_are_redacted_anywhere(key, noise):
    out = redact(f"{noise} key={key} {noise}")
    assert key not in out and key[6:] not in out


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9+/]{16,200}={0,2}", fullmatch=True))
def test_data_url_payloads_are_redacted(payload):
    out = redact(f'"image_url": "data:image/png;base64,{payload}"')
    assert payload not in out and "data:image/png;base64,[payload]" in out


def test_bearer_and_authorization_values_are_redacted():
    text = redact("headers={'Authorization': 'Bearer abcdef123456'} Bearer zzzzzz999999")
    assert "abcdef123456" not in text and "zzzzzz999999" not in text


_PIECES = st.sampled_from([
    "sk-or-v1-abcdef0123", "Bearer ", "bearer\t", "AUTHORIZATION", "Authorization: ",
    "gAAAAA" + "x" * 24, "data:image/png;base64,", "QUJDREVGR0hJSktMTU5PUA==", "x-api-key",
    "API_KEY=", "Token", "client_secret", "Cookie", "cookie=", '"', "'", ":", "=", " ", "\n",
    "}", ",", "model=openai/gpt-4o", "Done: 12 tokens", "é", "-", "_"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=12))
def test_a_line_the_quick_scan_skips_is_one_no_redaction_would_change(pieces):
    """redact() skips its patterns on lines where the quick scan finds no trigger word: no
    pattern may match such a line (the trigger list must cover every pattern)."""
    text = "".join(pieces)
    if REDACTION_TRIGGER.search(text) is None:
        assert [p.pattern for p, _ in REDACTIONS if p.search(text)] == []
        assert redact(text) == text or any(s in text for s in SECRETS)


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1,
                max_size=200), st.sampled_from([1, 25, 50, 90, 95, 99, 100]))
def test_percentile_is_the_nearest_rank(values, q):
    result = percentile(values, q)
    n = len(values)
    assert result in values
    assert sum(v <= result for v in values) * 100 >= q * n     # at least q% at or below
    assert sum(v < result for v in values) * 100 < q * n       # fewer than q% strictly below


def test_percentile_of_nothing_is_none():
    assert percentile([], 50) is None


def test_health_report_mentions_every_section():
    tel = Telemetry(lambda: 0.0)
    tel.requests = 3
    tel.upstream(200, 0.1)
    tel.upstream(429, 0.2)

    async def never(settings):
        raise AssertionError

    data = health_snapshot(tel, AdmissionGate(), CatalogRegistry(never, lambda: 0.0), 10.0)
    report = health_markdown(data)
    assert data["upstream"]["latency_ms_p50"] == 100.0
    for needle in ("0 in flight", "3 served", "200: 1, 429: 1", "Catalog: 0 models", "```json"):
        assert needle in report, needle
