"""Bindings of ``step.c``: a decode step's decoder layers in one call, over Q8_0 weights (``q8.c``) and a
16-bit KV cache (``attn16.c``), the two kernels' entry points handed to it (the build is
``longdoc.native``). ``engine.longmodel.LongModel`` runs its decode steps through it where every layer's
linears are q8 and its attention is attn16's (``engine.nativestep``)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from longdoc.native import attn16, library, why_unavailable
from longdoc.native.q8 import Q8Matmul


class _Linear(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("level", ctypes.c_int32),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps1", ctypes.c_float),
        ("eps2", ctypes.c_float),
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("inter", ctypes.c_int64),
        ("bf16", ctypes.c_int32),
        ("head_stride", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("threads", ctypes.c_int32),
        ("attn_level", ctypes.c_int32),
        ("q8", ctypes.c_void_p),
        ("attn", ctypes.c_void_p),
    ]


class _Keys(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("head_stride", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
        ("row", ctypes.c_int64),
        ("ranges", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class HeldKeys:
    """The keys one layer's decode step attends to where they are not the cache's (a recycled set,
    ``engine.recycled.RecycledSet``): buffers ``keys``, ``values`` (1, Hkv, capacity, D) of the cache's
    dtype, rows along dim 2; ``ranges`` (R, Hkv, 2) int64: each key region's first and end row per KV
    head (R as the step's rotations; a region may be empty); ``row``: where the step's key and value go
    in the buffers (the regions' rows lie within 0..row)."""

    keys: torch.Tensor
    values: torch.Tensor
    row: int
    ranges: torch.Tensor


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights as ``step.c`` reads them: the two RMSNorm weights (hidden,) float32 and
    their epsilons, and the four Q8_0 products: q/k/v stacked (hidden -> (H + 2 Hkv) D), the output
    projection (H D -> hidden), gate/up stacked (hidden -> 2 I), down (I -> hidden)."""

    norm1: torch.Tensor
    eps1: float
    norm2: torch.Tensor
    eps2: float
    qkv: Q8Matmul
    o: Q8Matmul
    gate_up: Q8Matmul
    down: Q8Matmul


def _linear(m: Q8Matmul) -> _Linear:
    bias = None if m.bias is None else m.bias.data_ptr()
    return _Linear(m.packed.data_ptr(), bias, m.n, m.bits, m.level)


def _address(entry: Any) -> int:
    """A loaded library's function's address (``step.c`` calls it)."""
    address = ctypes.cast(entry, ctypes.c_void_p).value
    if address is None:
        raise RuntimeError("a kernel entry point has no address")
    return address


class StepLayers:
    """Decode steps of ``layers`` in one ``step.c`` call each, over the KV cache layers ``k``, ``v`` (each
    (1, Hkv, capacity, D), float16 for a float32 run or bfloat16 for a bfloat16 one, laid out alike). It
    holds their addresses, not them: whoever calls it keeps them alive (``reads`` checks them).

    ``heads`` query heads of ``head_dim``; ``bf16``: the run's dtype is bfloat16 (else float32); ``scale``:
    the softmax scale; ``attn_level``: attn16's path (its best by default); ``threads``: the kernels'
    (torch's count by default)."""

    def __init__(
        self,
        layers: Sequence[LayerWeights],
        heads: int,
        k: Sequence[torch.Tensor],
        v: Sequence[torch.Tensor],
        bf16: bool,
        scale: float,
        attn_level: int | None = None,
        threads: int | None = None,
    ):
        lib = library("step")
        if lib is None:
            raise RuntimeError(f"the native decode step is not available: {why_unavailable('step')}")
        first = layers[0]
        hidden, inter = first.qkv.k, first.down.k
        kv_dim = (first.qkv.n - first.o.k) // 2
        head_dim = int(k[0].shape[-1])
        attention = attn16.CacheAttention(heads, k[0], v[0], scale, attn_level, threads)
        if len(k) != len(layers) or len(v) != len(layers):
            raise ValueError("StepLayers takes one K and one V cache tensor per layer")
        if any((t.shape, t.dtype, t.stride()) != attention.layout for t in (*k, *v)):
            raise ValueError("StepLayers takes K/V cache layers laid out alike")
        if bf16 != (k[0].dtype == torch.bfloat16):
            raise ValueError("StepLayers reads a bfloat16 cache in a bfloat16 run, a float16 one in a float32 run")
        for w in layers:
            shapes = [(m.k, m.n) for m in (w.qkv, w.o, w.gate_up, w.down)]
            want = [(hidden, heads * head_dim + 2 * kv_dim), (heads * head_dim, hidden), (hidden, 2 * inter)]
            if shapes != [*want, (inter, hidden)] or kv_dim != int(k[0].shape[1]) * head_dim:
                raise ValueError(f"StepLayers can't take a layer of shapes {shapes}")
            for norm in (w.norm1, w.norm2):
                if norm.dtype != torch.float32 or norm.shape != (hidden,) or not norm.is_contiguous():
                    raise ValueError(f"StepLayers takes norm weights ({hidden},) float32")
        self.lib, self.weights, self.capacity = lib, list(layers), int(k[0].shape[2])
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, int(k[0].shape[1]), head_dim
        self.model = _Model(
            hidden,
            heads,
            self.kv_heads,
            head_dim,
            inter,
            int(bf16),
            k[0].stride(1),
            k[0].stride(2),
            float(scale),
            attention.threads,
            attention.level,
            _address(first.qkv.lib.longdoc_q8_matmul),
            _address(attention.scored),
        )
        self.layers = (_Layer * len(layers))()
        for i, w in enumerate(layers):
            self.layers[i] = _Layer(
                w.norm1.data_ptr(),
                w.norm2.data_ptr(),
                w.eps1,
                w.eps2,
                _linear(w.qkv),
                _linear(w.o),
                _linear(w.gate_up),
                _linear(w.down),
                k[i].data_ptr(),
                v[i].data_ptr(),
            )
        # the caches' addresses (not the tensors: a cache dropped by its owner is freed; ``reads`` tells
        # whether tensors are these)
        self.layout, self.addresses = attention.layout, tuple(t.data_ptr() for t in (*k, *v))
        self.threads = threads

    def reads(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> bool:
        """Whether the K/V cache layers k, v are those this was made over (same addresses and layout): a
        grown cache's are not."""
        return (
            len(k) + len(v) == len(self.addresses)
            and (k[0].shape, k[0].dtype, k[0].stride()) == self.layout
            and all(t.data_ptr() == a for t, a in zip((*k, *v), self.addresses, strict=True))
        )

    def held(
        self, h: torch.Tensor, pos: int, key_rot: torch.Tensor, query_rot: torch.Tensor, sets: Sequence[HeldKeys]
    ) -> None:
        """``__call__`` for a recycled step: layer i attends to ``sets[i]`` (its regions' rows per KV head)
        instead of the cache's positions, and the step's K/V are written to ``sets[i]``'s row as well as
        the cache at ``pos``."""
        regions = int(query_rot.shape[0])
        self._check(h, pos, key_rot, query_rot, regions)
        if len(sets) != len(self.weights):
            raise ValueError("StepLayers.held takes one set of keys per layer")
        kv_heads = self.kv_heads
        keys = (_Keys * len(sets))()
        for i, held in enumerate(sets):
            buffers = (held.keys, held.values)
            if (
                any(t.dtype != self.layout[1] or t.dim() != 4 or t.stride(3) != 1 for t in buffers)
                or held.keys.shape != held.values.shape
                or held.keys.stride() != held.values.stride()
                or held.keys.shape[1] != kv_heads
                or held.keys.shape[3] != self.head_dim
                or not 0 <= held.row < held.keys.shape[2]
                or held.ranges.dtype != torch.int64
                or held.ranges.shape != (regions, kv_heads, 2)
                or not held.ranges.is_contiguous()
            ):
                raise ValueError("StepLayers.held takes 16-bit key/value buffers laid out as the cache, and ranges")
            keys[i] = _Keys(
                held.keys.data_ptr(),
                held.values.data_ptr(),
                held.keys.stride(1),
                held.keys.stride(2),
                held.row,
                held.ranges.data_ptr(),
            )
        self._run(self.lib.longdoc_step_sets, h, pos, key_rot, query_rot, keys)

    def _check(self, h: torch.Tensor, pos: int, key_rot: torch.Tensor, query_rot: torch.Tensor, regions: int) -> None:
        if (
            h.shape != (self.hidden,)
            or h.dtype != torch.float32
            or not h.is_contiguous()
            or key_rot.shape != (2, self.head_dim)
            or query_rot.shape != (regions, 2, self.head_dim)
            or any(t.dtype != torch.float32 or not t.is_contiguous() for t in (key_rot, query_rot))
        ):
            raise ValueError("StepLayers takes a float32 hidden state and rotations")
        if not 0 <= pos < self.capacity:
            raise RuntimeError(f"KV store full: {pos + 1} > capacity {self.capacity}")

    def _run(
        self, entry: Any, h: torch.Tensor, pos: int, key_rot: torch.Tensor, query_rot: torch.Tensor, *rest: Any
    ) -> None:
        """One ``step.c`` entry point's call over the layers (its arguments after the query rotations:
        ``rest``), at the kernels' thread count; a refusal or failure raised."""
        self.model.threads = torch.get_num_threads() if self.threads is None else self.threads
        layers, regions = len(self.layers), int(query_rot.shape[0])
        args = (h.data_ptr(), pos, key_rot.data_ptr(), regions, query_rot.data_ptr())
        rc = entry(ctypes.byref(self.model), self.layers, layers, *args, *rest)
        if rc != 0:
            what = "refused its input" if rc == 1 else "ran out of memory" if rc == 2 else f"failed ({rc})"
            raise RuntimeError(f"the native decode step {what}")

    def __call__(
        self,
        h: torch.Tensor,
        pos: int,
        key_rot: torch.Tensor,
        query_rot: torch.Tensor,
        bounds: torch.Tensor,
        select: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> None:
        """Run the token whose hidden state is h (hidden,) float32 (bfloat16 values in a bfloat16 run) at
        position ``pos`` through the layers, in place (h: the state after the last layer, before the final
        norm), writing its K/V at ``pos``. key_rot (2, D): the key's rotation (cos, signed sin); query_rot
        (R, 2, D): each key region's query rotation; bounds (R, 2) int64: each region's first and end
        position (R = 1 to 3; DCA's regions, intra first).

        Where given, ``select`` (layers, Hkv, pos + 1) float32 receives each layer's log-probabilities of
        keys 0..pos in this step's attention, the max over each KV head's query heads (from the kernel's
        own scores: recycled decoding ranks keys by them), and ``queries`` (layers, H * D) float32 each
        layer's query before its rotation, as the run stores it."""
        regions = int(bounds.shape[0])
        self._check(h, pos, key_rot, query_rot, regions)
        if bounds.dtype != torch.int64 or not bounds.is_contiguous() or bounds.shape != (regions, 2):
            raise ValueError("StepLayers takes int64 region bounds")
        layers, kv_heads, q_len = len(self.layers), self.kv_heads, self.heads * self.head_dim
        for out, shape in ((select, (layers, kv_heads, pos + 1)), (queries, (layers, q_len))):
            if out is not None and (out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous()):
                raise ValueError(f"StepLayers writes its selection scores and queries to float32 {shape}")
        outputs = (None if out is None else out.data_ptr() for out in (select, queries))
        self._run(self.lib.longdoc_step_layers, h, pos, key_rot, query_rot, bounds.data_ptr(), *outputs)
