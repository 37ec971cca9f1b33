"""VALVES_REFERENCE.md must match the code that defines the valves."""

from __future__ import annotations

from pathlib import Path

import gen_valves_reference as gen

import openrouter_responses_pipe as orp


def test_every_valve_has_a_group():
    assert gen.ungrouped() == []


def test_reference_file_is_up_to_date():
    on_disk = (Path(__file__).resolve().parents[2] / "VALVES_REFERENCE.md").read_text()
    assert on_disk == gen.render(), "run: python tools/gen_valves_reference.py"


def test_reference_lists_every_valve_with_its_description():
    text = gen.render()
    for model in (orp.Valves, orp.UserValves):
        for name, info in model.model_fields.items():
            assert f"`{name}`" in text and info.description.split(".")[0] in text
