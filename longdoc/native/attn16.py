"""Bindings of ``attn16.c``: a decode step's attention (one query row per head, GQA) over a float16 or
bfloat16 KV cache, with its log-sum-exp, on every CPU (the build is ``longdoc.native``).

``attend16`` keeps the contract of ``longdoc.attention.kernels.attend_reference`` (non-causal) for one
query row: out (1, H, 1, D) and lse (1, H, 1), both float32. It reads the cache where it lies: k and v
(1, Hkv, capacity, D), or a view of them whose positions start anywhere ([:, :, a:b]), of which the
first ``n_keys`` positions count. ``CacheAttention`` makes the same calls for a decode step's layers
with the checks done once.

The kernel has one loop per instruction set (``PATHS``); ``paths()`` lists those that run here, which
the ISA cap (``cpu.isa_cap()``) narrows as it narrows ``cpu.flags()``: under ``LONGDOC_ISA=none`` only
the scalar loop runs."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

from longdoc.native import library, runnable_paths, why_unavailable

# the kernel's paths (its `level` argument; 0 asks it for the best it runs)
SCALAR, AVX2, NEON = 1, 2, 3
PATHS = {SCALAR: "scalar", AVX2: "AVX2", NEON: "NEON"}
# the CPU flags, as cpu.flags() names them (so less those above the ISA cap), each SIMD path needs
PATH_FLAGS = {AVX2: frozenset({"avx2", "fma", "f16c"}), NEON: frozenset({"asimd"})}
MAX_D = 256
KV_DTYPES = (torch.float16, torch.bfloat16)


def paths() -> list[int]:
    """The kernel's paths that run here, lowest first (``PATHS``): those its own CPU probe finds, less
    those whose flags the ISA cap drops (``native.runnable_paths``). Empty where the kernel isn't
    available at all."""
    return runnable_paths("attn16", PATHS, SCALAR, PATH_FLAGS)


# the settings paths() depends on besides the CPU and the loaded library: its answer is kept per value
# of them (a call of attend16 then reads 3 variables, not the cap and the flags: 2 us instead of 5)
_SETTINGS = ("LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
_known_paths: dict[tuple[object, ...], list[int]] = {}


def _paths_now() -> list[int]:
    """``paths()``, kept per loaded library and value of the settings it depends on."""
    env = os.environ
    key = (id(library("attn16")), env.get(_SETTINGS[0]), env.get(_SETTINGS[1]), env.get(_SETTINGS[2]))
    found = _known_paths.get(key)
    if found is None:
        found = _known_paths[key] = paths()
    return found


def best_path() -> int:
    """The path ``attend16`` takes by default here (``paths()``'s last)."""
    found = paths()
    if not found:
        raise RuntimeError(f"the 16-bit KV attention kernel is not available: {why_unavailable('attn16')}")
    return found[-1]


def _layout_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel can't take these tensors (shapes, dtypes, devices, strides), or None. (Once per
    decode step and layer: each tensor attribute is read once.)"""
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return "q, k and v must be 4-dimensional"
    if not (q.is_cpu and k.is_cpu and v.is_cpu):
        return "it runs on the CPU"
    b, h, lq, d = qs
    if b != 1 or lq != 1:
        return f"it takes one query row of batch 1, not q {tuple(qs)}"
    if q.dtype not in (torch.float32, torch.bfloat16):
        return f"q must be float32 or bfloat16, not {q.dtype}"
    kd = k.dtype
    if kd not in KV_DTYPES or v.dtype != kd:
        return f"k and v must both be float16 or bfloat16, not {kd} and {v.dtype}"
    if ks != vs or ks[0] != 1 or ks[3] != d:
        return f"k and v must be (1, Hkv, L, {d}) alike, not {tuple(ks)} and {tuple(vs)}"
    hkv = ks[1]
    if not 1 <= d <= MAX_D or hkv < 1 or h % hkv:
        return f"head size {d} must be 1..{MAX_D} and {h} query heads a multiple of {hkv} KV heads"
    st = k.stride()
    if v.stride() != st or st[3] != 1 or st[2] < d or st[1] < 0:
        return f"k and v need the same strides, channels contiguous, not {st} and {v.stride()}"
    return None


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attend16`` runs on these tensors here: the CPU, one query row (1, H, 1, D) float32 or
    bfloat16, k and v (1, Hkv, L, D) float16 or bfloat16 with the same strides and contiguous channels,
    D up to 256, H a multiple of Hkv, and the kernel available."""
    return _layout_problem(q, k, v) is None and bool(_paths_now())


def _kernel(level: int | None) -> tuple[ctypes.CDLL, int]:
    """The loaded library and the path to run: ``level``, or the best here by None."""
    lib = library("attn16")
    found = _paths_now()
    if lib is None or not found:
        raise RuntimeError(f"the 16-bit KV attention kernel is not available: {why_unavailable('attn16')}")
    level = found[-1] if level is None else level
    if level not in found:
        raise RuntimeError(f"the 16-bit KV attention kernel's {PATHS.get(level, level)} path does not run here")
    return lib, level


def attend16(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_keys: int | None,
    scale: float,
    level: int | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (1, H, 1, D) over the first ``n_keys`` positions (all by None) of k and v
    (1, Hkv, L, D), 16-bit -> out (1, H, 1, D) float32 and lse (1, H, 1) float32 (natural log of the sum
    of exp(scale q.k)); no keys give out 0 and lse -inf. On path ``level`` (one of ``paths()``, the best
    by default), on ``threads`` threads (torch's count by default)."""
    problem = _layout_problem(q, k, v)
    if problem:
        raise ValueError(f"the 16-bit KV attention kernel can't take these tensors: {problem}")
    lib, level = _kernel(level)
    _, h, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    n = length if n_keys is None else n_keys
    if not 0 <= n <= length:
        raise ValueError(f"n_keys {n} is not within the {length} positions of k and v")
    threads = torch.get_num_threads() if threads is None else threads
    rows = q if q.dtype == torch.float32 and q.is_contiguous() else q.to(torch.float32).contiguous()
    geometry = (hkv, int(k.dtype == torch.bfloat16), k.stride(1), k.stride(2))
    return _run(lib.longdoc_attn16, rows, k.data_ptr(), v.data_ptr(), geometry, n, float(scale), threads, level)


def _run(
    entry: Any,
    rows: torch.Tensor,
    k: int,
    v: int,
    geometry: tuple[int, int, int, int],
    n: int,
    scale: float,
    threads: int,
    level: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of ``longdoc_attn16``: rows (1, H, 1, D) float32 contiguous, the addresses of the first
    key and value row read, ``geometry`` (KV heads, bfloat16 or not, head and row strides in elements),
    n keys -> out (1, H, 1, D) and lse (1, H, 1) float32; a refusal raises."""
    _, h, _, d = rows.shape
    out = torch.empty(1, h, 1, d, dtype=torch.float32)
    lse = torch.empty(1, h, 1, dtype=torch.float32)
    hkv, bf16, head_stride, row_stride = geometry
    rc = entry(
        rows.data_ptr(),
        h,
        hkv,
        d,
        k,
        v,
        bf16,
        head_stride,
        row_stride,
        n,
        scale,
        out.data_ptr(),
        lse.data_ptr(),
        threads,
        level,
    )
    if rc != 0:
        what = "refused its input" if rc == 1 else "ran out of memory"
        raise RuntimeError(f"the 16-bit KV attention kernel {what} (return code {rc})")
    return out, lse


class CacheAttention:
    """``attend16``'s calls for the layers of one decode step, its checks made once: each call attends a
    query (1, H, 1, D) float32, contiguous, over keys a..b-1 of k and v laid out as those it was made
    with (the layers of a ``KVCache``: one shape, dtype, device and strides). The same kernel call, and
    so the same numbers, as ``attend16(q, k[:, :, a:b], v[:, :, a:b], None, scale)``, without the views
    and the full check (a decode step attends 24 times or more: 4 us a call instead of 30)."""

    def __init__(
        self,
        heads: int,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        level: int | None = None,
        threads: int | None = None,
    ):
        self.q_shape = (1, heads, 1, int(k.shape[-1]))
        problem = _layout_problem(torch.empty(self.q_shape), k, v)
        if problem:
            raise ValueError(f"the 16-bit KV attention kernel can't take these tensors: {problem}")
        lib, self.level = _kernel(level)
        self.entry, self.scored = lib.longdoc_attn16, lib.longdoc_attn16_scored
        self.layout = (k.shape, k.dtype, k.stride())
        self.geometry = (int(k.shape[1]), int(k.dtype == torch.bfloat16), k.stride(1), k.stride(2))
        self.row_bytes = k.stride(2) * k.element_size()
        self.scale = float(scale)
        self.threads = torch.get_num_threads() if threads is None else threads

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: int, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q over positions a..b-1 of k and v -> out (1, H, 1, D) float32 and lse (1, H, 1)
        float32, as ``attend16``'s."""
        layout = self.layout
        if (
            q.shape != self.q_shape
            or q.dtype != torch.float32
            or not q.is_contiguous()
            or not (q.is_cpu and k.is_cpu and v.is_cpu)
            or (k.shape, k.dtype, k.stride()) != layout
            or (v.shape, v.dtype, v.stride()) != layout
            or not 0 <= a <= b <= layout[0][2]
        ):
            raise ValueError("CacheAttention takes queries and K/V laid out as those it was made for")
        offset = a * self.row_bytes
        k0, v0 = k.data_ptr() + offset, v.data_ptr() + offset
        return _run(self.entry, q, k0, v0, self.geometry, b - a, self.scale, self.threads, self.level)
