"""Recycled Attention decoding (Xu, Goyal, Choi 2024; later "RefreshKV").

The whole KV cache is kept. A *full* step attends over all of it and, per layer and KV head, keeps
the top-K key positions of that step's attention (max over the query heads of a GQA group, then
max-pooled along the keys so neighbours of a peak come along). The following *recycled* steps attend
only to that set plus every token generated since the full step, so their cost is O(K), not
O(context). With DCA each selected key is scored with the query rotation of its region (intra,
successive or inter) relative to the current query's chunk.

A StreamingLLM-style baseline (attention sinks + recent window of the same budget) lives here too,
only so evaluations can compare against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longdoc.attention.dca import ChunkLayout, query_positions
from longdoc.attention.patch import Attend, PatchedModel
from longdoc.config import RecycleConfig
from longdoc.engine.decode import DecodePolicy
from longdoc.engine.kvstore import KVStore

POOL_KERNEL = 7  # max-pool width along keys when choosing the recycled set


def rotated_queries(model: PatchedModel, q: torch.Tensor, pos: int) -> torch.Tensor:
    """q (1, H, 1, D) un-rotated at position ``pos`` -> (R, 1, Hkv, G, D): R = 1 rotation without DCA,
    3 with DCA (intra, successive, inter)."""
    layout = model.settings.layout
    p = torch.tensor([pos], device=q.device)
    rotations = (p,) if layout is None else query_positions(p, layout)
    h, d = q.shape[1], q.shape[3]
    hkv = model.n_kv_heads
    return torch.stack([model.rope.rotate(q, r).view(1, hkv, h // hkv, d) for r in rotations])


def key_regions(idx: torch.Tensor, pos: int, layout: ChunkLayout | None) -> torch.Tensor | None:
    """Region of each key index relative to a query at ``pos``: 0 intra, 1 successive, 2 inter."""
    if layout is None:
        return None
    c = layout.chunk_len
    gap = pos // c - torch.div(idx, c, rounding_mode="floor")
    return gap.clamp(max=2)


def scores_for(model: PatchedModel, qr: torch.Tensor, keys: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
    """qr (R, 1, Hkv, G, D), keys (1, Hkv, N, D) -> scaled scores (1, Hkv, G, N) in float32 (float64 stays), each key
    scored with its region's query rotation."""
    s = torch.matmul(qr, keys.unsqueeze(0).transpose(-1, -2))  # (R, 1, Hkv, G, N)
    s = (s if s.dtype == torch.float64 else s.float()) * model.scale
    if regions is None:
        return s[0]
    # regions (N,) or (1, Hkv, N): pick rotation r for each key
    n = regions.shape[-1]
    reg = regions.view(1, 1, -1, 1, n) if regions.dim() == 3 else regions.view(1, 1, 1, 1, n)
    reg = reg.expand(1, *s.shape[1:])
    return s.gather(0, reg)[0]


def full_attention_probs(
    model: PatchedModel, q: torch.Tensor, kv: KVStore, layer: int, pos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query at ``pos`` over keys 0..pos with materialized probabilities.

    Returns (out (1, H, 1, D), probs (1, Hkv, G, pos+1) float32). The score row is O(context) per
    head, which a full step pays once; it never forms an L x L matrix.
    """
    n = pos + 1
    keys, values = kv.k[layer][:, :, :n], kv.v[layer][:, :, :n]
    qr = rotated_queries(model, q, pos)
    regions = key_regions(torch.arange(n, device=q.device), pos, model.settings.layout)
    probs = torch.softmax(scores_for(model, qr, keys, regions), dim=-1)
    out = torch.matmul(probs.to(values.dtype), values)  # (1, Hkv, G, D); head h = kv * G + g
    return out.reshape(1, q.shape[1], 1, q.shape[3]), probs


def select_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """probs (1, Hkv, G, N) -> sorted key indices (1, Hkv, min(k, N)): the top-k positions of the
    group-max attention, max-pooled along keys."""
    group_max = probs.amax(dim=2)  # (1, Hkv, N)
    pooled = F.max_pool1d(group_max, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
    n = pooled.shape[-1]
    if k >= n:
        return torch.arange(n, device=probs.device).expand(1, probs.shape[1], n)
    return pooled.topk(k, dim=-1).indices.sort(dim=-1).values


def compact_attention(
    model: PatchedModel, q: torch.Tensor, pos: int, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """Attention of one query at ``pos`` over a compact set of cached keys.

    keys, values: (1, Hkv, N, D) copies of cache rows; idx (1, Hkv, N) their positions (for DCA
    regions). Returns (1, H, 1, D).
    """
    qr = rotated_queries(model, q, pos)
    probs = torch.softmax(scores_for(model, qr, keys, key_regions(idx, pos, model.settings.layout)), dim=-1)
    out = torch.matmul(probs.to(values.dtype), values)
    return out.reshape(1, q.shape[1], 1, q.shape[3])


def sparse_attention(
    model: PatchedModel, q: torch.Tensor, kv: KVStore, layer: int, pos: int, idx: torch.Tensor
) -> torch.Tensor:
    """Attention of one query at ``pos`` over the key indices idx (1, Hkv, N) of the cache -> (1, H, 1, D)."""
    gather = idx.unsqueeze(-1).expand(-1, -1, -1, q.shape[3])
    return compact_attention(model, q, pos, kv.k[layer].gather(2, gather), kv.v[layer].gather(2, gather), idx)


class RecycledSet:
    """One layer's recycled keys: copies of the selected cache rows plus every row decoded since the
    full step, in preallocated buffers, so a recycled step reads O(K) contiguous memory and allocates
    nothing (capacity doubles in the rare case the schedule runs long)."""

    def __init__(self, kv: KVStore, layer: int, selected: torch.Tensor, extra: int):
        hkv, n = selected.shape[1], selected.shape[2]
        d = kv.k[layer].shape[3]
        cap = n + max(1, extra)
        self.keys = kv.k[layer].new_empty(1, hkv, cap, d)
        self.values = kv.v[layer].new_empty(1, hkv, cap, d)
        self.idx = selected.new_empty(1, hkv, cap)
        gather = selected.unsqueeze(-1).expand(-1, -1, -1, d)
        torch.gather(kv.k[layer], 2, gather, out=self.keys[:, :, :n])
        torch.gather(kv.v[layer], 2, gather, out=self.values[:, :, :n])
        self.idx[:, :, :n] = selected
        self.n = n

    def append(self, kv: KVStore, layer: int, pos: int) -> None:
        if self.n == self.keys.shape[2]:
            self.keys = torch.cat([self.keys, torch.empty_like(self.keys)], dim=2)
            self.values = torch.cat([self.values, torch.empty_like(self.values)], dim=2)
            self.idx = torch.cat([self.idx, torch.empty_like(self.idx)], dim=2)
        self.keys[:, :, self.n] = kv.k[layer][:, :, pos]
        self.values[:, :, self.n] = kv.v[layer][:, :, pos]
        self.idx[:, :, self.n] = pos
        self.n += 1

    def attend(self, model: PatchedModel, q: torch.Tensor, pos: int) -> torch.Tensor:
        n = self.n
        return compact_attention(model, q, pos, self.keys[:, :, :n], self.values[:, :, :n], self.idx[:, :, :n])


class RecycledPolicy(DecodePolicy):
    """Chooses full or recycled attention for each decode step and keeps the recycled sets.

    A full step at position p selects the top-K among keys 0..p-1 and adds p itself; each recycled
    step adds its own position. So with K covering the context every key is attended, exactly once.
    """

    def __init__(self, cfg: RecycleConfig, n_layers: int):
        self.cfg = cfg
        self.sets: list[RecycledSet | None] = [None] * n_layers
        self.full_queries: list[torch.Tensor | None] = [None] * n_layers
        self.last_full_pos = -1
        self.full_steps = 0
        self.recycled_steps = 0
        self._refresh = True  # the first step after prefill is full

    @property
    def stats(self) -> dict[str, int]:
        return {
            "k": self.cfg.k,
            "stride": self.cfg.stride,
            "full_steps": self.full_steps,
            "recycled_steps": self.recycled_steps,
        }

    def is_full_step(self, step: int) -> bool:
        if self._refresh or self.last_full_pos < 0:
            return True
        return self.cfg.schedule == "fixed" and step % self.cfg.stride == 0

    def attend_for(self, model: PatchedModel, kv: KVStore, step: int) -> Attend:
        if self.is_full_step(step):
            self._refresh = False
            self.full_steps += 1
            return self._full(model, kv)
        self.recycled_steps += 1
        return self._recycled(model, kv)

    def _full(self, model: PatchedModel, kv: KVStore) -> Attend:
        # room for the tokens decoded before the next full step (grown if a schedule runs longer)
        extra = min(self.cfg.stride, 256) if self.cfg.schedule == "fixed" else 64

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            out, probs = full_attention_probs(model, q, kv, layer, start)
            selected = (
                select_top_k(probs[..., :start], self.cfg.k)
                if start > 0
                else probs.new_empty(1, model.n_kv_heads, 0, dtype=torch.long)
            )
            recycled = RecycledSet(kv, layer, selected, extra)
            recycled.append(kv, layer, start)
            self.sets[layer] = recycled
            self.full_queries[layer] = q.flatten().float()
            self.last_full_pos = start
            return out

        return attend

    def _recycled(self, model: PatchedModel, kv: KVStore) -> Attend:
        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            recycled = self.sets[layer]
            assert recycled is not None
            recycled.append(kv, layer, start)
            if self.cfg.schedule == "dynamic":
                ref = self.full_queries[layer]
                assert ref is not None
                if F.cosine_similarity(q.flatten().float(), ref, dim=0) < self.cfg.threshold:
                    self._refresh = True  # next step is full
            return recycled.attend(model, q, start)

        return attend


class StreamingPolicy(DecodePolicy):
    """Baseline only: attention sinks plus a recent window, ``budget`` keys in all (StreamingLLM)."""

    def __init__(self, budget: int, sinks: int = 4):
        self.budget = budget
        self.sinks = sinks

    def attend_for(self, model: PatchedModel, kv: KVStore, step: int) -> Attend:
        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            n = start + 1
            if n <= self.budget:
                idx = torch.arange(n, device=q.device)
            else:
                recent = torch.arange(n - (self.budget - self.sinks), n, device=q.device)
                idx = torch.cat([torch.arange(self.sinks, device=q.device), recent])
            return sparse_attention(model, q, kv, layer, start, idx.expand(1, model.n_kv_heads, -1))

        return attend
