"""Bindings of ``flash16.c``: prefill attention with its log-sum-exp on 16-bit integer products, float32 in
and out, on every CPU (the build is ``longdoc.native``).

``flash16`` keeps the contract of ``longdoc.attention.kernels.attend_reference``: q (B, H, Lq, D) float32
against k and v (B, Hkv, Lk, D) float32 or float16 (a 16-bit KV cache, read as stored) -> out (B, H, Lq, D)
and lse (B, H, Lq), float32. The kernel has a scalar loop and an AVX2 one (``PATHS``); ``paths()`` lists
those that run here, which the ISA cap (``cpu.isa_cap()``) narrows. ``fast()`` says whether the AVX2 loop
runs: elsewhere torch's float32 kernel is the faster one, and prefill keeps it."""

from __future__ import annotations

import ctypes

import torch

from longdoc.native import library, runnable_paths, why_unavailable

# the kernel's paths (its `level` argument; 0 asks it for the best it runs)
SCALAR, AVX2 = 1, 2
PATHS = {SCALAR: "scalar", AVX2: "AVX2"}
PATH_FLAGS = {AVX2: frozenset({"avx2", "fma", "f16c"})}
MAX_D = 256
# a tile of queries: fewer would leave most of its rows empty (decode steps take attn16.c)
TILE = 16


def paths() -> list[int]:
    """The kernel's paths that run here, lowest first (``PATHS``), under the ISA cap; empty where the
    kernel isn't available at all."""
    return runnable_paths("flash16", PATHS, SCALAR, PATH_FLAGS)


def fast() -> bool:
    """Whether the AVX2 loop runs here (the only one faster than torch's float32 kernel)."""
    return AVX2 in paths()


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``flash16`` takes these inputs: CPU tensors, q float32 and k, v both float32 or both
    float16, 4-dimensional with matching sizes (GQA: H a multiple of Hkv), D even up to 256, the last
    dimension contiguous, and at least a tile of queries."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return False
    b, h, lq, d = q.shape
    return (
        q.dtype == torch.float32
        and k.dtype == v.dtype
        and k.dtype in (torch.float32, torch.float16)
        and q.device.type == k.device.type == v.device.type == "cpu"
        and k.shape[0] == b
        and k.shape[3] == d
        and h % k.shape[1] == 0
        and 2 <= d <= MAX_D
        and d % 2 == 0
        and lq >= TILE
        and k.shape[2] >= 1
        and all(t.stride(-1) == 1 for t in (k, v))
    )


def flash16(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, level: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash16.c on inputs ``takes`` accepts (causal needs Lq == Lk): out (B, H, Lq, D) and lse (B, H, Lq),
    float32, on path ``level`` (0: the best here)."""
    lib = library("flash16")
    if lib is None:
        raise RuntimeError(f"the int16 attention kernel is not available: {why_unavailable('flash16')}")
    if not takes(q, k, v):
        raise ValueError("flash16 takes float32 q and float32 or float16 k, v of matching shapes (see takes())")
    runs = paths()  # under the ISA cap: the C probe sees the CPU, not the cap
    if level and level not in runs:
        path = PATHS.get(level, str(level))
        raise RuntimeError(f"the int16 attention kernel refused its input: its {path} path doesn't run here")
    level = level or runs[-1]
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(b, h, lq, d, dtype=torch.float32)
    lse = torch.empty(b, h, lq, dtype=torch.float32)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    rc = lib.longdoc_flash16(
        q.data_ptr(),
        strides[0],
        k.data_ptr(),
        strides[1],
        v.data_ptr(),
        strides[2],
        int(k.dtype == torch.float16),
        out.data_ptr(),
        lse.data_ptr(),
        b,
        h,
        hkv,
        lq,
        lk,
        d,
        int(causal),
        scale,
        torch.get_num_threads(),
        level,
    )
    if rc != 0:
        why = "refused its input (or that path doesn't run here)" if rc == 1 else "ran out of memory"
        raise RuntimeError(f"the int16 attention kernel {why}")
    return out, lse
