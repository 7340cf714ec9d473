"""Baselines only, for the evaluations and benchmarks: StreamingLLM-style attention (sinks plus a recent
window) in decoding alone (``StreamingPolicy``) and in prefill and decoding alike (``SlidingWindow``)."""

from __future__ import annotations

from bisect import bisect_left

import torch

from longdoc.attention.dca import region_bounds
from longdoc.attention.kernels import merge_partials
from longdoc.engine.decode import DecodePolicy
from longdoc.engine.kvcache import KVCache
from longdoc.engine.longmodel import LongModel
from longdoc.engine.recycled import RecycledSet
from longdoc.models.decoder import Attend


def streaming_positions(n: int, budget: int, sinks: int) -> list[int]:
    """The keys a StreamingLLM query at position n-1 sees: the first ``sinks`` and the most recent
    ``budget - sinks`` (all n when they fit the budget)."""
    if n <= budget:
        return list(range(n))
    return list(range(sinks)) + list(range(n - (budget - sinks), n))


class StreamingPolicy(DecodePolicy):
    """Baseline only: attention sinks plus a recent window, ``budget`` keys in all (StreamingLLM)."""

    def __init__(self, budget: int, sinks: int = 4):
        if not 0 <= sinks < budget:
            raise ValueError("the streaming baseline needs 0 <= sinks < budget")
        self.budget = budget
        self.sinks = sinks

    def attend_for(self, model: LongModel, kv: KVCache, step: int, pos: int) -> Attend:
        keep = streaming_positions(pos + 1, self.budget, self.sinks)
        rot = model.query_rotations(pos, model.rope.dtype)
        inter_end, intra_start = region_bounds(pos, model.settings.layout)
        split = (bisect_left(keep, inter_end), bisect_left(keep, intra_start))
        idx = torch.tensor(keep, device=model.device).expand(1, model.n_kv_heads, -1)

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            window = RecycledSet(kv, layer, idx, extra=0)
            window.splits = [split] * model.n_kv_heads
            return window.attend(model, q, rot)

        return attend


class SlidingWindow(DecodePolicy):
    """Baseline only: every query sees the first ``sinks`` keys plus the ``window`` keys before its
    prefill step (StreamingLLM-style), in prefill and decode alike. Plain positions (no DCA)."""

    def __init__(self, window: int, sinks: int = 4):
        self.window = window
        self.sinks = sinks

    def attend(self, model: LongModel, kv: KVCache) -> Attend:
        kernel, scale = model.settings.kernel, model.scale

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            keys, values = kv.k[layer], kv.v[layer]
            end = start + q.shape[2]
            qr = model.rope.rotate(q, torch.arange(start, end, device=q.device))
            lo = max(0, start - self.window)
            parts = []
            if lo > 0:
                n = min(self.sinks, lo)
                parts.append(kernel(qr, keys[:, :, :n], values[:, :, :n], False, scale))
            if start > lo:
                parts.append(kernel(qr, keys[:, :, lo:start], values[:, :, lo:start], False, scale))
            parts.append(kernel(qr, keys[:, :, start:end], values[:, :, start:end], q.shape[2] > 1, scale))
            return merge_partials(parts)[0]

        return attend

    def attend_for(self, model: LongModel, kv: KVCache, step: int, pos: int) -> Attend:
        return self.attend(model, kv)
