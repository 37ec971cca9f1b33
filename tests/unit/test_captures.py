"""The real OpenRouter captures live in the repository; a missing one fails, never skips."""

from __future__ import annotations

from pathlib import Path

import captures
import pytest


def test_the_captures_ship_with_the_repository() -> None:
    root = Path(__file__).resolve().parents[1] / "fixtures" / "openrouter-captures"
    assert captures.CAPTURE_DIR == root
    assert [p.name for p in captures.capture_files()] == sorted(captures.EXPECTED)
    source = (root / "SOURCE.md").read_text()
    assert "simonw/llm-openrouter" in source and "Apache" in source
    assert len(captures.streams()) >= 4 and captures.catalogs()


def test_a_missing_capture_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setattr(captures, "CAPTURE_DIR", tmp_path)
    with pytest.raises(captures.MissingCaptures, match=r"test_prompt\.yaml"):
        captures.capture_files()
