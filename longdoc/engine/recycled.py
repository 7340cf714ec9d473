"""Recycled Attention decoding (Xu, Goyal, Choi 2024; later "RefreshKV").

The whole KV cache is kept. A *full* step attends over all of it with the attention kernel and, per
layer and KV head, keeps the top-K key positions of that step's attention (float32 probabilities,
max over the query heads of a GQA group, then max-pooled along the keys so neighbours of a peak come
along). The following *recycled* steps attend only to that set plus every token generated since the
full step, so their cost is O(K), not O(context).

Recycled steps call the same kernel as full attention, one call per DCA key region (intra,
successive, inter: each region's keys are a contiguous run of the position-sorted set, scored with
that region's query rotation), and merge the results through their log-sum-exps. So when the set
holds every key, a recycled step computes exactly what a full step computes, in any dtype.

Where a decode step runs in one native call (``LongModel.native_step``), so do recycled decoding's:
a step in which every layer is recycled (``RecycledStep``) hands ``step.c`` each set's buffers and
region rows, and a step in which every layer is full (``FullStep``) gets back from it each layer's key
log-probabilities (the attention kernel's own scores) and query, and the sets are chosen from those.
The dynamic schedule's checks, which decide per layer mid-step, stay on the torch path.

Schedules: ``fixed`` refreshes every layer every ``stride`` steps; ``dynamic`` checks every
``stride`` steps how far each layer's query has drifted (cosine similarity to its query at that
layer's last refresh) and refreshes, in that same step, only the layers below the threshold.

A StreamingLLM-style baseline (attention sinks + recent window of the same budget) lives here too,
only so evaluations can compare against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longdoc.attention.dca import ChunkLayout, region_bounds
from longdoc.attention.kernels import merge_partials
from longdoc.config import RecycleConfig
from longdoc.engine.decode import DecodePolicy
from longdoc.engine.kvcache import KVCache
from longdoc.engine.longmodel import LongModel, NativeAttend, StepInputs
from longdoc.models.decoder import Attend
from longdoc.models.rope import RopeTable
from longdoc.native.step import HeldKeys, StepLayers

POOL_KERNEL = 7  # max-pool width along keys when choosing the recycled set

# (cos, sin) rows (R, D) of one query position's rotations: R = 1 plain, 3 with DCA
Rotations = tuple[torch.Tensor, torch.Tensor]


def rotated(q: torch.Tensor, rot: Rotations, r: int) -> torch.Tensor:
    """q (1, H, 1, D) at rotation r of ``rot`` -> (1, H, 1, D) in q's dtype."""
    return RopeTable.apply(q, rot[0][r : r + 1].to(q.dtype), rot[1][r : r + 1].to(q.dtype))


def selection_probs(
    model: LongModel, q: torch.Tensor, kv: KVCache, layer: int, pos: int, rot: Rotations | None = None
) -> torch.Tensor:
    """Float32 attention probabilities (1, Hkv, G, pos+1) of the query at ``pos`` over keys 0..pos
    (``rot``: the step's ``LongModel.query_rotations`` in the table's dtype, computed once for all
    layers when given).

    Each region's keys are upcast and scored with that region's query rotation, one contiguous slice
    at a time, so no key is copied once per rotation. The query is rotated in its own dtype, as the
    attention kernel gets it, then widened: these are that step's attention's probabilities (a native
    decode step hands back the kernel's own, ``FullStep``). Used only to choose the recycled set; the
    full step's output comes from the attention kernel.
    """
    rot = rot if rot is not None else model.query_rotations(pos, model.rope.dtype)
    inter_end, intra_start = region_bounds(pos, model.settings.layout)
    hkv, d = model.n_kv_heads, model.head_dim
    keys = kv.k[layer][:, :, : pos + 1].float()  # one upcast; regions are slices of it
    scores = keys.new_empty(1, hkv, q.shape[1] // hkv, pos + 1)
    # regions in key order: inter [0, inter_end), successive [inter_end, intra_start), intra [intra_start, pos]
    for r, (a, b) in ((2, (0, inter_end)), (1, (inter_end, intra_start)), (0, (intra_start, pos + 1))):
        if b > a:
            qr = rotated(q, rot, r).float().view(1, hkv, -1, d)
            torch.matmul(qr, keys[:, :, a:b].transpose(-1, -2), out=scores[..., a:b])
    return torch.softmax(scores.mul_(model.scale), dim=-1)


def select_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """probs (1, Hkv, G, N) -> sorted key indices (1, Hkv, min(k, N)): the top-k positions of the
    group-max attention, max-pooled along keys."""
    return top_k_of(probs.amax(dim=2), k)


def top_k_of(group_max: torch.Tensor, k: int) -> torch.Tensor:
    """``select_top_k`` of the group-max attention (1, Hkv, N) (probabilities, or their logarithms: the
    same order but where a probability rounds to 0)."""
    pooled = F.max_pool1d(group_max, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
    n = pooled.shape[-1]
    if k >= n:
        return torch.arange(n, device=group_max.device).expand(1, group_max.shape[1], n)
    return pooled.topk(k, dim=-1).indices.sort(dim=-1).values


@dataclass(frozen=True)
class RecycleStats:
    """What a recycled decode did (the JSON result's ``recycle``); the defaults are a run without it."""

    k: int = 0
    effective_k: int = 0
    stride: int = 0
    schedule: str = "none"
    threshold: float = 0.0
    full_steps: int = 0
    recycled_steps: int = 0
    layer_refreshes: int = 0


class RecycledSet:
    """One layer's recycled keys: copies of the selected cache rows, sorted by position, plus every
    row decoded since, in preallocated buffers (capacity doubles if a schedule runs long). A recycled
    step reads O(K) contiguous memory and allocates nothing.

    ``splits`` holds, per KV head, how many of its keys lie before the previous chunk and before the
    current chunk (host integers, refreshed only when the set is rebuilt or a chunk boundary is
    crossed): the DCA regions are then contiguous slices of the buffers.
    """

    def __init__(self, kv: KVCache, layer: int, selected: torch.Tensor, extra: int):
        hkv, n = selected.shape[1], selected.shape[2]
        d = kv.k[layer].shape[3]
        cap = n + max(1, extra)
        self.keys = kv.k[layer].new_empty(1, hkv, cap, d)
        self.values = kv.v[layer].new_empty(1, hkv, cap, d)
        self.idx = selected.new_empty(1, hkv, cap)
        for h in range(hkv):  # index_select per head: an order of magnitude faster than gather here
            torch.index_select(kv.k[layer][0, h], 0, selected[0, h], out=self.keys[0, h, :n])
            torch.index_select(kv.v[layer][0, h], 0, selected[0, h], out=self.values[0, h, :n])
        self.idx[:, :, :n] = selected
        self.n = n
        self.splits: list[tuple[int, int]] = [(0, 0)] * hkv

    def take_row(self, pos: int) -> int:
        """The row the key and value at ``pos`` go to, held from now on (the caller writes them)."""
        if self.n == self.keys.shape[2]:
            self.keys = torch.cat([self.keys, torch.empty_like(self.keys)], dim=2)
            self.values = torch.cat([self.values, torch.empty_like(self.values)], dim=2)
            self.idx = torch.cat([self.idx, torch.empty_like(self.idx)], dim=2)
        self.idx[:, :, self.n] = pos
        self.n += 1
        return self.n - 1

    def append(self, kv: KVCache, layer: int, pos: int) -> None:
        row = self.take_row(pos)
        self.keys[:, :, row] = kv.k[layer][:, :, pos]
        self.values[:, :, row] = kv.v[layer][:, :, pos]

    def ranges(self, dca: bool) -> list[list[tuple[int, int]]]:
        """Each key region's rows per KV head, in the order ``attend`` takes them (intra, successive,
        inter with DCA; one region without)."""
        n = self.n
        if not dca:
            return [[(0, n)] * len(self.splits)]
        return [[((b2, n), (b1, b2), (0, b1))[r] for b1, b2 in self.splits] for r in range(3)]

    def counts_below(self, bounds: torch.Tensor) -> torch.Tensor:
        """(Hkv, len(bounds)): per head, how many held positions lie below each bound (on device)."""
        return (self.idx[0, :, : self.n, None] < bounds).sum(dim=1)

    def attend(self, model: LongModel, q: torch.Tensor, rot: Rotations) -> torch.Tensor:
        """Attention of q (1, H, 1, D) over the held keys -> (1, H, 1, D): one kernel call per DCA
        region (per head only where heads split differently), merged through the log-sum-exps in the
        order full attention merges them (intra, successive, inter)."""
        kernel, scale, n = model.settings.kernel, model.scale, self.n
        if model.settings.layout is None:
            return kernel(rotated(q, rot, 0), self.keys[:, :, :n], self.values[:, :, :n], False, scale)[0]
        parts = []
        for r, ranges in enumerate(self.ranges(True)):
            if all(b <= a for a, b in ranges):
                continue
            qr = rotated(q, rot, r)
            if len(set(ranges)) == 1:
                a, b = ranges[0]
                parts.append(kernel(qr, self.keys[:, :, a:b], self.values[:, :, a:b], False, scale))
            else:
                parts.append(self._per_head(model, qr, ranges))
        return merge_partials(parts)[0]

    def _per_head(
        self, model: LongModel, qr: torch.Tensor, ranges: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = qr.shape[1] // len(ranges)
        outs, lses = [], []
        for h, (a, b) in enumerate(ranges):
            qh = qr[:, h * g : (h + 1) * g]
            if b > a:
                o, s = model.settings.kernel(
                    qh, self.keys[:, h : h + 1, a:b], self.values[:, h : h + 1, a:b], False, model.scale
                )
            else:  # this head holds no key of the region: zero weight in the merge
                o = torch.zeros_like(qh)
                s = torch.full(qh.shape[:3], float("-inf"), device=qh.device)
            outs.append(o)
            lses.append(s.float() if s.dtype != torch.float64 else s)
        return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


class RecycledStep(NativeAttend):
    """A decode step in which every layer attends to its recycled set: ``attend`` (the sets' torch path)
    called per layer, or each set's buffers and region rows handed to the native decode step."""

    def __init__(self, attend: Attend, sets: Sequence[RecycledSet], dca: bool):
        self.attend, self.sets, self.dca = attend, sets, dca

    def __call__(self, layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
        return self.attend(layer, q, start)

    def run_native(self, step: StepLayers, inputs: StepInputs) -> None:
        step.held(inputs.h, inputs.pos, inputs.key_rot, inputs.query_rot, self.held_keys(inputs.pos))

    def held_keys(self, pos: int) -> list[HeldKeys]:
        """Each set's buffers and region rows for the step at ``pos``, a row of each taken for its K/V."""
        rows = [held.take_row(pos) for held in self.sets]
        ranges = torch.tensor([held.ranges(self.dca) for held in self.sets], dtype=torch.int64)
        return [
            HeldKeys(held.keys, held.values, row, ranges[i])
            for i, (held, row) in enumerate(zip(self.sets, rows, strict=True))
        ]


class FullStep(NativeAttend):
    """A decode step in which every layer attends fully and refreshes its set: ``attend`` (the torch path:
    the attention kernel, then the selection's own float32 scores) called per layer, or the native
    decode step, whose attention hands back each layer's key log-probabilities and query, the sets
    then chosen from them."""

    def __init__(self, attend: Attend, policy: RecycledPolicy, kv: KVCache, extra: int):
        self.attend, self.policy, self.kv, self.extra = attend, policy, kv, extra

    def __call__(self, layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
        return self.attend(layer, q, start)

    def run_native(self, step: StepLayers, inputs: StepInputs) -> None:
        layers, pos = len(self.policy.sets), inputs.pos
        select = torch.empty(layers, step.kv_heads, pos + 1)
        queries = torch.empty(layers, step.heads * step.head_dim)
        step(inputs.h, pos, inputs.key_rot, inputs.cache_rotations(), inputs.bounds, select, queries)
        for layer in range(layers):
            self.policy.refresh(self.kv, layer, pos, select[layer : layer + 1, :, :pos], queries[layer], self.extra)


class RecycledPolicy(DecodePolicy):
    """Chooses full or recycled attention for each layer and decode step and keeps the recycled sets.

    A full step at position p selects the top-K among keys 0..p-1 and adds p itself; each recycled
    step adds its own position. So with K covering the context every key is attended, exactly once.
    Host reads happen once per step (region splits after a refresh or a chunk boundary), except at the
    dynamic schedule's checks: there each layer reads its verdict before it attends, so that a layer
    whose query drifted attends fully in the very step that saw the drift (the next layer's query
    depends on this layer's output, so the verdicts cannot be read all at once).
    """

    def __init__(self, cfg: RecycleConfig, n_layers: int):
        self.cfg = cfg
        self.n_layers = n_layers
        self.sets: list[RecycledSet | None] = [None] * n_layers
        # each layer's query at its last refresh: the dynamic schedule's reference
        self.full_queries: list[torch.Tensor | None] = [None] * n_layers
        self._stale: set[int] = set()  # layers whose region splits must be recounted
        self._split_chunk = -1
        self.full_steps = 0
        self.recycled_steps = 0
        self.layer_refreshes = 0  # dynamic schedule: layers refreshed at checks (within recycled steps)
        self.effective_k = 0  # largest recycled set chosen (K, or the context when shorter)

    @property
    def stats(self) -> RecycleStats:
        return RecycleStats(
            k=self.cfg.k,
            effective_k=self.effective_k,
            stride=self.cfg.stride,
            schedule=self.cfg.schedule,
            threshold=self.cfg.threshold if self.cfg.schedule == "dynamic" else 0.0,
            full_steps=self.full_steps,
            recycled_steps=self.recycled_steps,
            layer_refreshes=self.layer_refreshes,
        )

    def full_layers(self, step: int) -> list[bool]:
        """Which layers are due a full step (and a refresh of their set) at this decode step, before
        the dynamic schedule's check adds the layers whose query drifted."""
        if step == 0 or any(s is None for s in self.sets):
            return [True] * self.n_layers  # the first step after prefill is full
        if self.cfg.schedule == "fixed":
            return [step % self.cfg.stride == 0] * self.n_layers
        return [False] * self.n_layers

    def drifted(self, layer: int, q: torch.Tensor) -> bool:
        """Dynamic schedule: the query's cosine similarity to the layer's query at its last refresh
        is below the threshold (one host read)."""
        ref = self.full_queries[layer]
        assert ref is not None
        return bool(F.cosine_similarity(q.flatten().float(), ref, dim=0) < self.cfg.threshold)

    def attend_for(self, model: LongModel, kv: KVCache, step: int, pos: int) -> Attend:
        full = self.full_layers(step)
        if all(full):
            self.full_steps += 1
        else:
            self.recycled_steps += 1
            self._recount_splits(model.device, model.settings.layout, pos, [i for i, f in enumerate(full) if not f])
        check = self.cfg.schedule == "dynamic" and step % self.cfg.stride == 0 and not all(full)
        rot = model.query_rotations(pos, model.rope.dtype)
        default = model.step_attend(kv, pos)  # full attention, rotations and regions worked out once
        # room for the tokens decoded before the next refresh (grown if a schedule runs longer)
        extra = min(self.cfg.stride, 256) if self.cfg.schedule == "fixed" else 64

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            refresh = full[layer]
            if not refresh and check and self.drifted(layer, q):
                refresh = True
                self.layer_refreshes += 1
            if refresh:
                out = default(layer, q, start)
                probs = selection_probs(model, q, kv, layer, start, rot)[..., :start] if start > 0 else None
                self.refresh(kv, layer, start, None if probs is None else probs.amax(dim=2), q.flatten().float(), extra)
                return out
            recycled = self.sets[layer]
            assert recycled is not None
            recycled.append(kv, layer, start)
            return recycled.attend(model, q, rot)

        # every layer full, or every layer recycled and none checked: the native decode step can take it
        if all(full):
            return FullStep(attend, self, kv, extra)
        if any(full) or check:
            return attend
        return RecycledStep(attend, [self._set(i) for i in range(self.n_layers)], model.settings.layout is not None)

    def refresh(
        self, kv: KVCache, layer: int, pos: int, group_max: torch.Tensor | None, query: torch.Tensor, extra: int
    ) -> None:
        """A full step of ``layer`` at ``pos``: its set rebuilt from the top-K of keys 0..pos-1 by
        ``group_max`` (1, Hkv, pos), their attention's group max (``top_k_of``; None where pos is 0), plus
        pos itself; ``query`` (H D,) float32 kept as the dynamic schedule's reference."""
        selected = (
            top_k_of(group_max, self.cfg.k)
            if group_max is not None and pos > 0
            else torch.empty(1, kv.k[layer].shape[1], 0, dtype=torch.long, device=query.device)
        )
        self.effective_k = max(self.effective_k, selected.shape[-1])
        fresh = RecycledSet(kv, layer, selected, extra)
        fresh.append(kv, layer, pos)
        self.sets[layer] = fresh
        self.full_queries[layer] = query
        self._stale.add(layer)

    def _recount_splits(self, device: torch.device, layout: ChunkLayout | None, pos: int, layers: list[int]) -> None:
        """Refresh the region splits of the given layers' sets if they were rebuilt or the query
        entered a new chunk: one host read for all of them.

        At a chunk boundary the held keys are re-split into regions (attention over them stays
        exact) but not re-ranked under the new chunk's rotations; the next refresh re-ranks them.
        A forced refresh at each crossing was weighed and not taken: with the default layout (c =
        20,480 for the embedded model) none of the summarize-then-quote benchmark's decodes (prompts
        of 16,384-32,000 tokens, 240 new) crosses a boundary, so it would change none of its
        figures, and the fixed schedule re-ranks within ``stride`` steps of any crossing anyway (at
        most 15 steps per 20,480 decoded tokens keep the previous chunk's ranking)."""
        if layout is None:
            return
        chunk = pos // layout.chunk_len
        todo = layers if chunk != self._split_chunk else [i for i in layers if i in self._stale]
        self._split_chunk = chunk
        if not todo:
            return
        bounds = torch.tensor(region_bounds(pos, layout), device=device)
        counts = torch.stack([self._set(i).counts_below(bounds) for i in todo])
        for i, per_head in zip(todo, counts.tolist(), strict=True):
            self._set(i).splits = [(b1, b2) for b1, b2 in per_head]
            self._stale.discard(i)

    def _set(self, layer: int) -> RecycledSet:
        recycled = self.sets[layer]
        assert recycled is not None
        return recycled
