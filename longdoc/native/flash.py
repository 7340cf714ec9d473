"""Bindings of ``flash.c``: exact bfloat16 attention with its log-sum-exp (the build is ``longdoc.native``)."""

from __future__ import annotations

import ctypes

import torch

from longdoc.native import library, why_unavailable

# flash.c's tile of queries and block of keys. Fewer queries than a tile would leave most of its rows
# empty: decode steps stay on torch's kernel.
FLASH_TILE, FLASH_BLOCK = 16, 64


def flash_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``flash_attention`` runs on these inputs here: bfloat16 on the CPU, head size a multiple of
    32 up to 256, the last dimension contiguous with even strides, and at least a tile of queries."""
    return (
        q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.device.type == k.device.type == v.device.type == "cpu"
        and q.shape[-1] % 32 == 0
        and 32 <= q.shape[-1] <= 256
        and q.shape[2] >= FLASH_TILE
        and k.shape[2] >= 1
        and all(t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:3]) for t in (k, v))
        and all(t.data_ptr() % 4 == 0 for t in (k, v))
        and library("flash") is not None
    )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    blocks: tuple[torch.Tensor, list[int], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash.c on inputs ``flash_takes``: q (B, H, Lq, D), k and v (B, Hkv, Lk, D) -> out (B, H, Lq, D)
    bfloat16 and lse (B, H, Lq) float32 (the kernel contract of ``kernels.py``).

    ``blocks`` = (numbers (Hkv, S, C) int64, counts (S), group), batch 1 and not causal: block-sparse
    attention, where the queries of group s (``group`` queries each, a multiple of ``FLASH_TILE``) attend
    only to the first ``counts[s]`` of their KV head's listed ``FLASH_BLOCK``-key blocks of k and v; a
    group with none gets out 0 and lse -inf."""
    lib = library("flash")
    if lib is None:
        raise RuntimeError(f"the attention kernel is not available: {why_unavailable('flash')}")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(b, h, lq, d, dtype=torch.bfloat16)
    lse = torch.empty(b, h, lq, dtype=torch.float32)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    numbers = counts = None
    width = group = 0
    if blocks is not None:
        numbers = blocks[0].to(torch.int64).contiguous()
        counts = torch.tensor(blocks[1], dtype=torch.int64)
        width, group = numbers.shape[-1], blocks[2]
        if numbers.shape[:2] != (hkv, len(counts)) or len(counts) != -(-lq // group):
            raise ValueError("block lists need (Hkv, groups, n) numbers and a count per group")
    rc = lib.longdoc_flash_attention(
        q.data_ptr(),
        strides[0],
        k.data_ptr(),
        strides[1],
        v.data_ptr(),
        strides[2],
        None if numbers is None else numbers.data_ptr(),
        None if counts is None else counts.data_ptr(),
        width,
        group,
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
    )
    if rc != 0:
        why = "refused its input" if rc == 1 else "ran out of memory"
        raise RuntimeError(f"the attention kernel {why}")
    return out, lse
