"""Every parser that reads user-controlled text runs in time linear in its input.

Adversarial shapes (what any user can put into a chat's history by editing a message or
through the API) are doubled; the time may grow about linearly (x2), never quadratically
(x4). Each measurement is the best of several runs of CPU time, and the allowed factor is
generous, so a busy machine does not make the test flaky; a quadratic parser fails it by far.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from openrouter_responses_pipe import (
    redact,
    repair_orphans,
    sent_reasoning_ids,
    split_markers,
    strip_markers,
    strip_reasoning_blocks,
    strip_think_blocks,
    strip_tool_cards,
    tool_cards_as_text,
)

N = 2_000      # the base size (repetitions of the shape); the big run uses 8 x N
GROWTH = 8
ALLOWED = 24   # linear: ~8; quadratic: ~64


def cpu_seconds(fn: Callable[[], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def growth_ratio(parse: Callable[[str], object], make: Callable[[int], str]) -> float:
    small, big = make(N), make(N * GROWTH)
    loops = 16  # the small input is timed over several calls so its time is measurable
    t_small = cpu_seconds(lambda: [parse(small) for _ in range(loops)]) / loops
    t_big = cpu_seconds(lambda: parse(big), repeat=3)
    return t_big / max(t_small, 1e-6)


CASES: dict[str, tuple[Callable[[str], object], Callable[[int], str]]] = {
    "think-openers": (strip_think_blocks, lambda n: "<think>" * n),
    "think-openers-then-one-close": (strip_think_blocks, lambda n: "<think>" * n + "</think"),
    "reasoning-openers": (strip_reasoning_blocks, lambda n: '<details type="reasoning"' * n),
    "reasoning-open-tags": (strip_reasoning_blocks, lambda n: '<details type="reasoning">' * n),
    "reasoning-upper": (strip_reasoning_blocks,
                        lambda n: '<details TYPE="REASONING">x' * n + "<details"),
    "card-openers": (tool_cards_as_text, lambda n: '<details type="tool_calls"' * n),
    "card-tags-no-newline": (tool_cards_as_text,
                             lambda n: '<details type="tool_calls">' * n + "</details>"),
    "card-tags-no-close": (tool_cards_as_text, lambda n: '<details type="tool_calls">\n' * n),
    "card-long-attribute-word": (tool_cards_as_text, lambda n: '<details type="tool_calls" '
                                 + "a" * (n * 8) + '="x>\n</details>'),
    "card-many-attributes": (tool_cards_as_text, lambda n: '<details type="tool_calls" '
                             + 'a="' * n + '>\n</details>'),
    "details-with-ids": (lambda t: strip_tool_cards(t, {"x"}),
                         lambda n: '<details type="tool_calls" id="x">' * n),
    "details-without-ids": (lambda t: strip_tool_cards(t, {"x"}),
                            lambda n: '<details type="tool_calls" ' * n + ">"),
    "marker-prefixes": (split_markers, lambda n: "[orp:" * n),
    "marker-lines-then-junk": (split_markers, lambda n: "[orp:abcdefgh]: #\n" * n + "x"),
    "marker-trailing-blanks": (strip_markers, lambda n: "[orp:abcdefgh]: #" + " \t" * n * 4),
    "redact-bearers": (redact, lambda n: "Bearer " * n),
    "redact-authorization": (redact, lambda n: "authorization: " * n),
    "redact-data-urls": (redact, lambda n: "data:" + "a" * n * 4),
    "redact-unclosed-key-quotes": (redact, lambda n: 'api_key: "x ' * n),
    "redact-long-key-word": (redact, lambda n: "a" * n * 8 + "key"),
    "redact-key-words": (redact, lambda n: "x-api-key" * n),
    "sent-reasoning-ids": (lambda t: sent_reasoning_ids(
        *json.loads(t)), lambda n: json.dumps(
        [[{"type": "reasoning", "id": f"rs_{i}", "summary": []} for i in range(n // 4)],
         {f"a{i}": {"type": "reasoning", "id": f"rs_{i}", "summary": []}
          for i in range(n // 4)}])),
    "repair-many-calls": (lambda t: repair_orphans(json.loads(t)), lambda n: json.dumps(
        [{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"}
         for i in range(n // 4)]
        + [{"type": "function_call_output", "call_id": f"c{i}", "output": "x"}
           for i in range(n // 4)])),
}


@pytest.mark.parametrize("shape", sorted(CASES))
def test_adversarial_text_is_parsed_in_linear_time(shape: str) -> None:
    parse, make = CASES[shape]
    ratio = growth_ratio(parse, make)
    assert ratio < ALLOWED, f"{shape}: x{GROWTH} input took x{ratio:.1f} the time"


def test_replaced_blocks_keep_their_meaning() -> None:
    """The linear scanners remove exactly what the regexes they replace removed."""
    text = ('a<think>x</think>  b<think>y\n</think>c<think>open')
    assert strip_think_blocks(text) == "abc<think>open"
    text = ('A<details type="reasoning" done="true">\n<summary>T</summary>\nx\n</details>\n'
            'B<DETAILS type="reasoning">y</Details>C<details type="reasoning">z')
    assert strip_reasoning_blocks(text) == 'ABC<details type="reasoning">z'
    cards = ('<details type="tool_calls" id="x" name="f">\n<summary>s</summary>\n</details>\n'
             'mid <details type="tool_calls" name="g">\n</details>'
             '<details type="tool_calls" id="y">\n</details> end')
    assert strip_tool_cards(cards, {"x"}) == ('mid <details type="tool_calls" name="g">\n'
                                              '</details><details type="tool_calls" id="y">\n'
                                              '</details> end')
    assert tool_cards_as_text('<details type="tool_calls">no newline</details>') == \
        '<details type="tool_calls">no newline</details>'
