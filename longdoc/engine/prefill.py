"""Prefill: run the prompt through the model in steps, filling the KV store."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from longdoc.attention.dca import chunk_steps
from longdoc.attention.sparse import SparseConfig
from longdoc.engine.kvcache import KVCache
from longdoc.engine.longmodel import LongModel
from longdoc.models.decoder import Attend

# progress(done_tokens, total_tokens, seconds_left or None while unknown)
Progress = Callable[[int, int, "float | None"], None]


def step_pairs(a: int, b: int, sparse: SparseConfig | None) -> int:
    """(query, key) pairs a prefill step over positions [a, b) attends to, per head and layer: all
    earlier keys, or with sparse prefill at most the diagonal block, band, sinks and budget."""
    n = b - a
    pairs = n * a + n * (n + 1) // 2
    if sparse is not None:
        pairs = min(pairs, n * (sparse.band + sparse.block + sparse.budget) + n * (n + 1) // 2)
    return pairs


class PrefillClock:
    """Time left in a prefill, from a cost model fitted while it runs.

    A step costs ``a * tokens + b * pairs``: linears and norms grow with the step's tokens, attention
    with its (query, key) pairs, which grow with the position. Dividing tokens left by tokens per
    second so far would promise the costliest, last steps at the price of the cheap first ones.
    ``a`` and ``b`` are least-squares fits to the steps done (the first, which pays one-time costs, is
    left out once there are others); until the fit is determined, ``b = prior * a`` with the prior from
    the model's shapes.
    """

    def __init__(self, steps: list[tuple[int, int]], prior: float):
        self.steps = steps  # (tokens, pairs) per step
        self.prior = prior
        self.seconds: list[float] = []

    def record(self, seconds: float) -> float:
        """The time the next step took; returns the seconds left."""
        self.seconds.append(seconds)
        a, b = self.fit()
        return sum(a * t + b * p for t, p in self.steps[len(self.seconds) :])

    def fit(self) -> tuple[float, float]:
        done = list(zip(self.steps, self.seconds, strict=False))
        if len(done) > 2:
            done = done[1:]
        stt = sum(t * t for (t, _), _ in done)
        spp = sum(p * p for (_, p), _ in done)
        stp = sum(t * p for (t, p), _ in done)
        det = stt * spp - stp * stp
        if len(done) >= 2 and det > 1e-6 * stt * spp:
            sty = sum(t * y for (t, _), y in done)
            spy = sum(p * y for (_, p), y in done)
            a, b = (spp * sty - stp * spy) / det, (stt * spy - stp * sty) / det
            if a > 0 and b > 0:
                return a, b
        a = sum(y for _, y in done) / max(1e-9, sum(t + self.prior * p for (t, p), _ in done))
        return a, self.prior * a


def pair_cost_prior(model: LongModel) -> float:
    """Seconds of one (query, key) pair relative to one token's linears, from FLOPs: attention does
    4 * head_dim FLOPs per pair and query head in every layer; a token's linears do 2 per weight.
    Attention kernels run at about half the matmul rate on the CPUs measured (benchmarks/RESULTS.md)."""
    c = model.config
    width = model.head_dim * (model.n_heads * 2 + model.n_kv_heads * 2)  # q, o and k, v projections
    weights = c.hidden_size * (width + 3 * c.intermediate_size) * len(model.layers)
    attention = 4 * model.head_dim * model.n_heads * len(model.layers)
    return 2 * attention / max(1, 2 * weights)


def prefill(
    model: LongModel,
    ids: torch.Tensor,
    kv: KVCache,
    step: int,
    start: int = 0,
    progress: Progress | None = None,
    attend: Attend | None = None,
) -> torch.Tensor:
    """Feed ids (1, L) at positions start.. into ``kv``; returns the last position's logits (1, V).

    Steps never cross a DCA chunk boundary, so each one attends to at most three key sets and the
    working memory is bounded by ``step`` tokens of activations. With sparse prefill the last
    ``exact_tail`` tokens run exact, in steps of their own.
    """
    total = ids.shape[1]
    logits = None
    end = start + total
    sparse = model.settings.sparse
    tail = end if sparse is None else max(start, end - sparse.exact_tail)  # exact from here on
    steps = [
        part
        for a, b in chunk_steps(start, end, step, model.settings.layout)
        for part in (((a, tail), (tail, b)) if a < tail < b else ((a, b),))
    ]
    clock = PrefillClock(
        [(b - a, step_pairs(a, b, sparse if b <= tail else None)) for a, b in steps], pair_cost_prior(model)
    )
    # the tail runs exact unless the caller chose the attention itself
    tail_attend = model.default_attend(kv, exact=True) if attend is None else attend
    for a, b in steps:
        t0 = time.perf_counter()
        logits = model.forward(ids[:, a - start : b - start], a, kv, tail_attend if a >= tail else attend)
        left = clock.record(time.perf_counter() - t0)
        if progress is not None:
            progress(b - start, total, left)
    if logits is None:
        raise ValueError("prefill needs at least one token")
    return logits
