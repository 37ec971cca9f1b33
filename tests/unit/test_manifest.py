"""The file Open WebUI execs: frontmatter, import-rewrite gotcha, honest table of contents."""

from __future__ import annotations

import re
from pathlib import Path

SOURCE = (Path(__file__).resolve().parents[2] / "openrouter_responses_pipe.py").read_text()


def frontmatter() -> dict[str, str]:
    """Parsed the way Open WebUI parses it: line 1 exactly `\"\"\"`, `key: value` lines."""
    lines = SOURCE.splitlines()
    assert lines[0].strip() == '"""'
    meta = {}
    for line in lines[1:]:
        if '"""' in line:
            break
        match = re.match(r"^\s*([a-z_]+):\s*(.*)\s*$", line, re.IGNORECASE)
        if match:
            meta[match.group(1).lower()] = match.group(2)
    return meta


def test_frontmatter_has_the_manifest_keys():
    meta = frontmatter()
    for key in ("title", "version", "requirements", "required_open_webui_version", "license",
                "description"):
        assert meta.get(key), key
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])


def test_no_substring_that_open_webui_would_rewrite():
    # Open WebUI str.replace()s these over the whole source, strings and comments included.
    for needle in ("from utils", "from apps", "from main", "from config"):
        assert needle not in SOURCE, needle


def test_table_of_contents_matches_the_numbered_banners():
    toc = re.findall(r"^#\s{2,}§(\d+)\s+(\w[\w ]*?)(?:\s{2,}|$)", SOURCE, re.MULTILINE)
    banners = re.findall(r"^# ─+\n# §(\d+) (\w[\w ]*?)(?:\s\(.*\))?\n", SOURCE, re.MULTILINE)
    assert toc and [n for n, _ in toc] == [str(i) for i in range(1, len(toc) + 1)]
    assert [(n, t.strip()) for n, t in toc] == [(n, t.strip()) for n, t in banners]


def test_pipe_is_the_last_top_level_class():
    classes = re.findall(r"^class (\w+)", SOURCE, re.MULTILINE)
    assert "Pipe" in classes
    tail = SOURCE[SOURCE.index("class Pipe:"):]
    assert not re.search(r"^class ", tail[1:], re.MULTILINE)
