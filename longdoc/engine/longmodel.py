"""A decoder whose attention runs through longdoc: DCA or plain, exact or sparse, over a ``KVCache``.

``LongModel`` is ``models.decoder.Decoder`` plus the attention settings of one run (chunk layout,
kernel, temperature, sparse prefill): it rotates each new key at its DCA key position and chooses each
step's attention, prefill steps through ``chunked_attention`` (or its sparse variant) and decode steps
through ``step_attend``. Recycled decoding and the baselines (``engine.recycled``, ``engine.baselines``)
pass their own ``attend``; a ``NativeAttend`` (recycled decoding's) the native decode step takes as well.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from longdoc.attention.dca import ChunkLayout, chunked_attention, key_positions, query_positions, region_bounds
from longdoc.attention.kernels import Kernel, attend_cpu, merge_partials
from longdoc.attention.sparse import SparseConfig, SparseStats, sparse_chunked_attention
from longdoc.engine.kvcache import KVCache
from longdoc.engine.nativestep import layer_weights
from longdoc.models.decoder import Attend, Decoder, rms_norm
from longdoc.models.rope import RopeTable
from longdoc.native import attn16, library
from longdoc.native.step import LayerWeights, StepLayers


@dataclass
class AttentionSettings:
    layout: ChunkLayout | None  # None = plain causal attention
    kernel: Kernel
    # Multiplies the softmax scale: the DCA attention temperature for lengths beyond the window.
    logit_scale: float = 1.0
    # Sparse prefill (None = exact); what it kept is counted in ``sparse_stats``.
    sparse: SparseConfig | None = None
    sparse_stats: SparseStats = field(default_factory=SparseStats)
    # The KV cache's dtype (None: the model's); the kernels widen a narrower one as they read it.
    kv_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class StepInputs:
    """A decode step's inputs to ``native.step.StepLayers``: the token's hidden state h (hidden,) float32
    (written in place), its position, its key rotation (2, D), every key region's query rotation
    (R, 2, D; R = 1 plain, 3 with DCA: intra, successive, inter), and the bounds (first, end) of the
    cache's regions that hold keys (a prefix of those: intra first)."""

    h: torch.Tensor
    pos: int
    key_rot: torch.Tensor
    query_rot: torch.Tensor
    bounds: torch.Tensor

    def cache_rotations(self) -> torch.Tensor:
        """The query rotations of the cache's regions (R', 2, D), as ``bounds`` orders them."""
        return self.query_rot[: self.bounds.shape[0]]


class NativeAttend(ABC):
    """An ``Attend`` the native decode step can take in its stead (recycled decoding's steps): called
    once per layer on the torch path, or handed the step once for all layers (``run_native``)."""

    @abstractmethod
    def __call__(self, layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of layer ``layer``'s query q (1, H, 1, D) at ``start`` -> (1, H, 1, D)."""

    @abstractmethod
    def run_native(self, step: StepLayers, inputs: StepInputs) -> None:
        """The step's layers through ``step`` (``inputs.h`` in place), doing what calling would per layer:
        asked instead of calling, never as well."""


class LongModel(Decoder):
    """A causal LM whose attention runs through longdoc (DCA or plain) over a ``KVCache``."""

    def __init__(self, model: object, settings: AttentionSettings):
        super().__init__(model, settings.logit_scale)
        self.settings = settings
        # the native decode step: the layers' weights as it reads them (None: not asked yet; []: this
        # model's layers don't take it), and the last step made over a KV cache
        self._step_weights: list[LayerWeights] | None = None
        self._step: StepLayers | None = None

    def new_cache(self, capacity: int) -> KVCache:
        dtype = self.settings.kv_dtype or self.dtype
        return KVCache(len(self.layers), self.n_kv_heads, self.head_dim, capacity, dtype, self.device)

    def default_attend(self, kv: KVCache, exact: bool = False) -> Attend:
        """Attention of prefill steps: sparse when the settings say so, unless ``exact``."""
        layout, kernel, stats = self.settings.layout, self.settings.kernel, self.settings.sparse_stats
        sparse = None if exact else self.settings.sparse
        count = self.settings.sparse is not None  # an exact step of a sparse prefill counts as all kept

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            end = start + q.shape[2]
            k, v = kv.k[layer][:, :, :end], kv.v[layer][:, :, :end]
            if sparse is not None:
                return sparse_chunked_attention(
                    q, k, v, start, self.rope.rotate, layout, kernel, self.scale, sparse, stats
                )
            if count:
                stats.count_exact(q.shape[2], start)
            return chunked_attention(q, k, v, start, self.rope.rotate, layout, kernel, self.scale)

        return attend

    def query_rotations(self, pos: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin rows (R, D) of one query at ``pos``, for the key regions in the order
        intra, successive, inter (R = 1 without DCA, 3 with), in ``dtype`` (the model's by default;
        recycled decoding also scores in float32): computed once per decode step for all layers
        (``chunked_attention`` would index the table again in every layer)."""
        layout = self.settings.layout
        dtype = dtype or self.dtype
        if layout is None:  # the table's row at pos, sliced (as key_rotations)
            self.rope.ensure(pos + 1)
            return self.rope.cos[pos : pos + 1].to(dtype), self.rope.sin[pos : pos + 1].to(dtype)
        rows = torch.cat(query_positions(torch.tensor([pos], device=self.device), layout))
        cos, sin = self.rope.angles(rows, top=layout.chunk_size + 1)
        return cos.to(dtype), sin.to(dtype)

    def step_attend(self, kv: KVCache, pos: int) -> Attend:
        """Full attention of the one query of a decode step at ``pos``: the kernel calls, and their
        merge order, of ``chunked_attention`` for a single query, with the query rotations and the key
        regions worked out once for all layers. No host reads, nothing allocated beyond the outputs.
        Where the kernel would hand the step to ``attn16.c`` (``attend_cpu`` over a 16-bit cache) the
        calls go to it directly (``attn16.CacheAttention``: the same calls, checked once per step; a
        bfloat16 run's queries widened to float32 for it and its outputs rounded back, as
        ``attend_cpu`` does)."""
        kernel, scale = self.settings.kernel, self.scale
        cos, sin = self.query_rotations(pos)
        rots = [(cos[r : r + 1], sin[r : r + 1]) for r in range(cos.shape[0])]
        regions = self.step_regions(pos)
        apply = RopeTable.apply
        direct = self.cache_attention(kv)
        if direct is not None:
            dtype, widen = self.dtype, self.dtype != torch.float32  # a bfloat16 run's queries and outputs

            def region(
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: int, a: int, b: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
                rotated = apply(q, *rots[r])
                out, lse = direct(rotated.float() if widen else rotated, k, v, a, b)
                return (out.to(dtype) if widen else out), lse

            def attend_direct(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
                k, v = kv.k[layer], kv.v[layer]
                if len(regions) == 1:
                    return region(q, k, v, *regions[0])[0]
                return merge_partials([region(q, k, v, *where) for where in regions])[0]

            return attend_direct

        def attend(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            k, v = kv.k[layer], kv.v[layer]
            parts = [kernel(apply(q, *rots[r]), k[:, :, a:b], v[:, :, a:b], False, scale) for r, a, b in regions]
            return parts[0][0] if len(parts) == 1 else merge_partials(parts)[0]

        return attend

    def step_regions(self, pos: int) -> list[tuple[int, int, int]]:
        """The key regions of a decode step's query at ``pos``, as ``chunked_attention`` orders them:
        (query rotation, first key, end key) for the intra, successive and inter regions that have keys
        (one region, all keys, without DCA); the rotation is ``query_rotations``' row, the region's index."""
        prev, chunk_start = region_bounds(pos, self.settings.layout)
        regions = [(0, chunk_start, pos + 1)]
        if chunk_start > 0:
            regions.append((1, prev, chunk_start))
        if prev > 0:
            regions.append((2, 0, prev))
        return regions

    def native_step(self, kv: KVCache) -> StepLayers | None:
        """``native.step.StepLayers`` over ``kv`` where a decode step may run in it: the model's layers take
        it (``engine.nativestep``), its library is built, and the step's attention would be attn16's
        direct path (``cache_attention``); else None. Made once per cache (again after it grows)."""
        if self._step_weights is None:
            self._step_weights = layer_weights(self) or []
        if not self._step_weights or library("step") is None:
            return None
        step = self._step
        if step is not None and step.reads(kv.k, kv.v):
            return step
        self._step = None
        direct = self.cache_attention(kv)
        if direct is None:
            return None
        bf16 = self.dtype == torch.bfloat16
        self._step = StepLayers(self._step_weights, self.n_heads, kv.k, kv.v, bf16, self.scale, direct.level)
        return self._step

    def native_walk(
        self, step: StepLayers, ids: torch.Tensor, pos: int, attend: NativeAttend | None = None
    ) -> torch.Tensor:
        """``walk_layers`` of one token ids (1, 1) at ``pos`` through ``step`` (the same numbers as
        ``walk_row`` with ``step_attend``, or with ``attend`` where given, up to ``step.c``'s arithmetic
        order): its K/V written to the cache ``step`` was made over; the hidden state (1, 1, hidden)
        after the last layer."""
        # a copy of its own: step.c writes it in place
        h = self.model.model.embed_tokens(ids).reshape(-1).to(torch.float32, copy=True)
        cos, sin = self.key_rotations(pos, 1)
        q_cos, q_sin = self.query_rotations(pos)
        bounds = torch.tensor([[a, b] for _, a, b in self.step_regions(pos)], dtype=torch.int64)
        inputs = StepInputs(
            h,
            pos,
            torch.cat([cos, sin]).to(torch.float32),
            torch.stack([q_cos, q_sin], dim=1).to(torch.float32),
            bounds,
        )
        if attend is None:
            step(h, pos, inputs.key_rot, inputs.cache_rotations(), bounds)
        else:
            attend.run_native(step, inputs)
        return h.to(self.dtype).view(1, 1, -1)

    def cache_attention(self, kv: KVCache) -> attn16.CacheAttention | None:
        """``attn16.CacheAttention`` over ``kv``'s layers where ``attend_cpu`` would run a decode step's
        query through ``attn16.attend16`` (a float32 run over a float16 cache, or a bfloat16 run over a
        bfloat16 one; the kernel available here), else None."""
        k, v = kv.k[0], kv.v[0]
        cache = {torch.float32: torch.float16, torch.bfloat16: torch.bfloat16}.get(self.dtype)
        if self.settings.kernel is not attend_cpu or k.dtype != cache:
            return None
        probe = torch.empty(1, self.n_heads, 1, self.head_dim)
        if not attn16.takes(probe, k, v):
            return None
        return attn16.CacheAttention(self.n_heads, k, v, self.scale)

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, start: int, kv: KVCache, attend: Attend | None = None) -> torch.Tensor:
        """Run tokens ``ids`` (1, L) at positions start..start+L-1, appending their K/V to ``kv``; returns
        the hidden states (1, L, hidden) after the final norm (the caller projects them in slices, e.g.
        for perplexity: a full (L, V) logits buffer costs GBs at 8K)."""
        return rms_norm(self.model.model.norm, self.layer_states(ids, start, kv, attend))

    @torch.inference_mode()
    def layer_states(self, ids: torch.Tensor, start: int, kv: KVCache, attend: Attend | None = None) -> torch.Tensor:
        """``hidden_states`` before the final norm.

        The key rotation is looked up once for all layers, and a single token (a decode step) attends
        through ``step_attend``, or runs all its layers in the native decode step where it can
        (``native_step``; through a ``NativeAttend`` where one is passed).
        """
        length = ids.shape[1]
        if length == 1 and (attend is None or isinstance(attend, NativeAttend)):
            step = self.native_step(kv)
            if step is not None:
                return self.native_walk(step, ids, start, attend)
        if attend is None:
            attend = self.step_attend(kv, start) if length == 1 else self.default_attend(kv)
        cos, sin = self.key_rotations(start, length)
        return self.walk_layers(ids, start, kv, attend, cos, sin)

    def key_rotations(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin rows (L, D) in the model's dtype of new keys at start..start+L-1, rotated at
        their DCA key positions (p mod c; absolute without DCA): a slice of the table when the
        positions are consecutive (always without DCA; with DCA unless they wrap past a chunk's end)."""
        layout = self.settings.layout
        table = self.rope
        table.ensure(start + length if layout is None else layout.chunk_len)
        first = start if layout is None else start % layout.chunk_len
        if layout is None or first + length <= layout.chunk_len:
            cos, sin = table.cos[first : first + length], table.sin[first : first + length]
        else:
            key_pos = key_positions(torch.arange(start, start + length, device=self.device), layout)
            cos, sin = table.cos[key_pos], table.sin[key_pos]
        return cos.to(self.dtype), sin.to(self.dtype)

    def forward(self, ids: torch.Tensor, start: int, kv: KVCache, attend: Attend | None = None) -> torch.Tensor:
        """Logits (1, V) of the last position of ``ids`` (``hidden_states``, normalized and projected for
        that position only)."""
        return self.last_logits(self.layer_states(ids, start, kv, attend))
