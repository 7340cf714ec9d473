"""Passkey retrieval (the DCA paper's task): a random 5-digit key hidden at a depth in filler text;
correct when the generated key matches exactly."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from longdoc.engine.baselines import SlidingWindow
from longdoc.evals.common import answers, filler_ids
from longdoc.runtime.local import LocalBackend

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


def run(
    session: LocalBackend,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    window: int | None = None,
) -> dict[str, Any]:
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
                row = {
                    "length": length,
                    "tokens": len(ids),
                    "depth": depth,
                    "key": str(key),
                    "answer": got,
                    "correct": got == str(key),
                    **stats,
                }
                results.append(row)
                if on_result:
                    on_result(row)
    accuracy = sum(r["correct"] for r in results) / max(1, len(results))
    return {"task": "passkey", "accuracy": accuracy, "window": window, "results": results}
