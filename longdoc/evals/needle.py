"""Needle in a haystack with multi-token answers (a short code), single and multi-key, decoded with full
attention, Recycled Attention and a StreamingLLM-style baseline of the same key budget."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import Any

from longdoc.engine.baselines import StreamingPolicy
from longdoc.engine.decode import DecodePolicy
from longdoc.engine.recycled import RecycledPolicy
from longdoc.evals.common import Settings, answers, filler_ids
from longdoc.runtime.local import LocalBackend
from longdoc.runtime.result import json_of, omitted

NAMES = ["Orion", "Vega", "Lyra", "Draco", "Cygnus", "Perseus", "Aquila", "Hydra"]


def make_code(rng: random.Random) -> str:
    return "-".join("".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(4)) for _ in range(3))


def build(session: LocalBackend, length: int, depth: float, keys: dict[str, str], target: str) -> list[int]:
    """Filler of about ``length`` tokens; the target's needle at ``depth``, distractor needles spread out."""
    head = session.encode("Read the text below; it hides secret codes.\n")
    tail = session.encode(
        f"\nWhat is the secret code for {target}? Answer with the code only. The secret code for {target} is"
    )
    needles = {name: session.encode(f" The secret code for {name} is {code}. ") for name, code in keys.items()}
    body = filler_ids(session, max(0, length - len(head) - len(tail) - sum(map(len, needles.values()))))
    others = [n for n in keys if n != target]
    places = sorted([(depth, target)] + [((i + 1) / (len(others) + 1), n) for i, n in enumerate(others)])
    ids, prev = list(head), 0
    for where, name in places:
        cut = int(len(body) * where)
        ids += body[prev:cut] + needles[name]
        prev = cut
    return ids + body[prev:] + tail


@dataclass(frozen=True)
class NeedleRow:
    """One trial of one decoding method: where the target sat, how many needles, the code and the answer."""

    method: str
    length: int
    depth: float
    keys: int
    expected: str
    answer: str
    correct: bool
    prefill_s: float
    decode_s: float
    generated: int
    dca: bool


@dataclass
class NeedleReport:
    accuracy: dict[str, float]  # per decoding method
    budget: int
    stride: int
    results: list[NeedleRow]
    settings: Settings | None = omitted()
    task: str = "needle"

    def to_json(self) -> dict[str, Any]:
        return dict(json_of(self))


def run(
    session: LocalBackend,
    lengths: list[int],
    depths: list[float],
    n_keys: list[int],
    budget: int,
    stride: int,
    trials: int = 1,
    seed: int = 0,
    on_result: Callable[[NeedleRow], None] | None = None,
) -> NeedleReport:
    rng = random.Random(seed)
    n_layers = session.info.n_layers
    methods: dict[str, Callable[[], DecodePolicy | None]] = {
        "full": lambda: None,
        "recycled": lambda: RecycledPolicy(type(session.cfg.recycle)(enabled=True, k=budget, stride=stride), n_layers),
        "streaming": lambda: StreamingPolicy(budget),
    }
    results = []
    for length in lengths:
        for depth in depths:
            for k in n_keys:
                for _ in range(trials):
                    names = rng.sample(NAMES, k)
                    keys = {n: make_code(rng) for n in names}
                    target = names[0]
                    ids = build(session, length, depth, keys, target)
                    outs = answers(session, ids, 16, [make() for make in methods.values()])
                    for method, (text, stats) in zip(methods, outs, strict=True):
                        correct = keys[target] in text
                        row = NeedleRow(method, length, depth, k, keys[target], text.strip(), correct, *astuple(stats))
                        results.append(row)
                        if on_result:
                            on_result(row)
    accuracy = {
        m: sum(r.correct for r in results if r.method == m) / max(1, sum(r.method == m for r in results))
        for m in methods
    }
    return NeedleReport(accuracy=accuracy, budget=budget, stride=stride, results=results)
