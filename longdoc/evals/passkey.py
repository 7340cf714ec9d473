"""Passkey retrieval (the DCA paper's task): a random 5-digit key hidden at a depth in filler text;
correct when the generated key matches exactly."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import Any

from longdoc.engine.baselines import SlidingWindow
from longdoc.evals.common import Settings, answers, filler_ids
from longdoc.runtime.local import LocalBackend
from longdoc.runtime.result import json_of, omitted

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def sentence(key: int) -> str:
    """The sentence that hides the key (the DCA paper's phrasing)."""
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def build(session: LocalBackend, length: int, depth: float, key: int) -> list[int]:
    """Token ids of about ``length`` tokens with the key sentence at ``depth`` (0 = start, 1 = end)."""
    head = session.encode(INTRO)
    needle = session.encode(sentence(key))
    tail = session.encode(QUESTION)
    body = filler_ids(session, max(0, length - len(head) - len(needle) - len(tail)))
    cut = int(len(body) * depth)
    return head + body[:cut] + needle + body[cut:] + tail


@dataclass(frozen=True)
class PasskeyRow:
    """One trial: the prompt's length and tokens, where the key sat, the key and the answer."""

    length: int
    tokens: int
    depth: float
    key: str
    answer: str
    correct: bool
    prefill_s: float
    decode_s: float
    generated: int
    dca: bool


@dataclass
class PasskeyReport:
    accuracy: float
    window: int | None  # the sliding-window baseline's width; None: DCA
    results: list[PasskeyRow]
    settings: Settings | None = omitted()
    task: str = "passkey"

    def to_json(self) -> dict[str, Any]:
        return dict(json_of(self))


def run(
    session: LocalBackend,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    on_result: Callable[[PasskeyRow], None] | None = None,
    window: int | None = None,
) -> PasskeyReport:
    """Accuracy over lengths x depths x trials; ``window`` runs the sliding-window baseline instead."""
    rng = random.Random(seed)
    results = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                ids = build(session, length, depth, key)
                [(text, stats)] = answers(session, ids, 8, [None], SlidingWindow(window) if window else None)
                found = re.search(r"\d{5}", text)
                got = found.group(0) if found else text.strip()[:20]
                row = PasskeyRow(length, len(ids), depth, str(key), got, got == str(key), *astuple(stats))
                results.append(row)
                if on_result:
                    on_result(row)
    accuracy = sum(r.correct for r in results) / max(1, len(results))
    return PasskeyReport(accuracy=accuracy, window=window, results=results)
