"""Attention kernels that return the output *and* its log-sum-exp, so partial results over disjoint
key sets can be merged exactly (Dual Chunk Attention makes up to four calls per query block: earlier keys of its own
chunk, the causal diagonal block, the previous chunk, and everything before that).

Every kernel has the same signature::

    kernel(q, k, v, causal, scale) -> (out, lse)

    q:   (B, H, Lq, D)     queries, already rotated
    k,v: (B, Hkv, Lk, D)   keys (rotated) and values; H is a multiple of Hkv (GQA: query head h
                           reads KV head h // (H // Hkv))
    causal: query j sees keys 0..j; requires Lq == Lk (the square block on the diagonal)
    out: (B, H, Lq, D) in q's dtype
    lse: (B, H, Lq) float32 natural-log log-sum-exp of the scaled scores (float64 for float64 input)

Back ends are chosen by name ("reference", "cpu", "cpu-torch", "cuda", or "auto") so tests and benchmarks
can force one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from longdoc.native import attn16, flash, flash16

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]


def attend_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive attention with a materialized score matrix: the yardstick for every other path."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(compute).reshape(b, hkv, g * lq, d)
    scores = (qg @ k.to(compute).transpose(-1, -2)) * scale  # (B, Hkv, G*Lq, Lk)
    scores = scores.view(b, hkv, g, lq, lk)
    if causal:
        if lq != lk:
            raise ValueError("causal attention needs a square block (Lq == Lk)")
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, G, Lq)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = probs.reshape(b, hkv, g * lq, lk) @ v.to(compute)
    return out.reshape(b, h, lq, d).to(q.dtype), lse.reshape(b, h, lq)


def _grouped(
    op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an MHA-only op on GQA inputs without copying K/V per query head.

    Non-causal: a group's query heads are folded into the query length, (B, Hkv, G*Lq, D).
    Causal: the mask depends on the query index, so the group is looped instead (G calls).
    """
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    if g == 1:
        return op(q, k, v, causal, scale)
    if not causal:
        out, lse = op(q.reshape(b, hkv, g * lq, d), k, v, False, scale)
        return out.reshape(b, h, lq, d), lse.reshape(b, h, lq)
    out = q.new_empty(b, h, lq, d)
    lse = torch.empty(b, h, lq, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    for j in range(g):
        # heads j, j+G, j+2G, ... read KV heads 0, 1, 2, ... in order
        o, s = op(q[:, j::g], k, v, True, scale)
        out[:, j::g] = o
        lse[:, j::g] = s
    return out, lse


def _cpu_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.contiguous(), k, v, 0.0, causal, scale=scale
    )
    return out, lse


def attend_torch_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused CPU flash kernel (never builds the Lq x Lk matrix). A 16-bit KV cache's keys and
    values are widened to q's dtype first (the kernel takes one dtype)."""
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return _grouped(_cpu_flash, q, k, v, causal, scale)


def attend_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """longdoc's AVX-512 BF16 kernel (``flash.c``, about twice torch's on the model's shapes) where it
    takes the input (bfloat16, a tile of queries or more, a CPU and compiler for it); for float32, the
    int16-product kernel (``flash16.c``) where its AVX2 loop runs (benchmarks/RESULTS.md, "Prefill
    attention on int16 products"); a decode step's one query row over a 16-bit KV cache through
    ``attn16.c`` (it reads the cache as stored, at memory speed: benchmarks/RESULTS.md, "Decode attention
    over a 16-bit KV cache"; float16 caches are float32 runs', bfloat16 ones bfloat16 runs', where it
    beats torch's bfloat16 kernel too: benchmarks/HISTORY.md, twelfth session); else torch's."""
    if q.shape[2] == 1 and not causal and k.dtype in attn16.KV_DTYPES and attn16.takes(q, k, v):
        out, lse = attn16.attend16(q, k, v, None, scale)
        return out.to(q.dtype), lse
    if flash.flash_takes(q, k, v):
        return flash.flash_attention(q, k, v, causal, scale)
    if flash16.takes(q, k, v) and flash16.fast():
        return flash16.flash16(q, k, v, causal, scale)
    return attend_torch_cpu(q, k, v, causal, scale)


def attend_blocks(
    kernel: Kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    counts: list[int],
    group: int,
    block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse non-causal attention: the queries of group s (``group`` queries of q (1, H, Lq, D)
    each) attend to the first ``counts[s]`` of the ``block``-key blocks ``blocks`` (Hkv, S, C) of their KV
    head's k and v (1, Hkv, n * block, D). Queries of a group with none get out 0 and lse -inf.

    flash.c runs it in one call (the keys packed once for all groups) when ``kernel`` is ``attend_cpu``
    and the sizes are its own; otherwise ``kernel`` runs per group on gathered copies."""
    if (
        kernel is attend_cpu
        and block == flash.FLASH_BLOCK
        and group % flash.FLASH_TILE == 0
        and flash.flash_takes(q, k, v)
    ):
        return flash.flash_attention(q, k, v, False, scale, blocks=(blocks, counts, group))
    lq = q.shape[2]
    out = torch.zeros_like(q)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full(q.shape[:3], -math.inf, dtype=lse_dtype, device=q.device)
    for s, count in enumerate(counts):
        if count:
            a, b = s * group, min(lq, (s + 1) * group)
            idx = block_keys(0, blocks[:, s, :count], block)
            out[:, :, a:b], lse[:, :, a:b] = kernel(q[:, :, a:b], _gather(k[0], idx), _gather(v[0], idx), False, scale)
    return out, lse


def block_keys(first: int, blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Block numbers (Hkv, n) counted from key ``first`` -> their key indices (Hkv, n * block)."""
    offsets = torch.arange(block, device=blocks.device)
    return (first + blocks[..., None] * block + offsets).flatten(1)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (Hkv, L, D), index (Hkv, n) -> x's rows ``index`` per head, (1, Hkv, n, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])).unsqueeze(0)


def _cuda_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.dtype in (torch.float16, torch.bfloat16):
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    # the flash op takes half precision only; the memory-efficient op also returns the LSE (padded
    # along the query axis to a multiple of its block size)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]


def attend_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn when installed (GQA native, half precision), else torch's CUDA SDPA ops with LSE."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return _grouped(_cuda_sdpa, q, k, v, causal, scale)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return _grouped(_cuda_sdpa, q, k, v, causal, scale)
    out, lse, _ = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,
        return_attn_probs=True,
    )
    return out.transpose(1, 2), lse.float()


KERNELS: dict[str, Kernel] = {
    "reference": attend_reference,
    "cpu": attend_cpu,
    "cpu-torch": attend_torch_cpu,
    "cuda": attend_cuda,
}


def get_kernel(name: str, device: torch.device) -> Kernel:
    """Pick a back end by name; "auto" follows the device."""
    if name == "auto":
        name = "cuda" if device.type == "cuda" else "cpu"
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown attention kernel {name!r}; choose from auto, {', '.join(KERNELS)}") from None


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union.

    out = sum_r exp(lse_r - logsumexp_r(lse_r)) * out_r, accumulated in float32 (float64 for float64).
    Shapes: each out_r (B, H, L, D), lse_r (B, H, L); returns the same. A row whose parts all have
    lse -inf (no key anywhere) gives output 0 and lse -inf.
    """
    if len(parts) == 1:
        return parts[0]
    outs, lses = zip(*parts, strict=True)
    # float32 at least: the weights of bfloat16 parts rounded to bfloat16 would cost several ulps
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    lse_all = torch.stack([s.to(acc) for s in lses])  # (R, B, H, L)
    # logsumexp subtracts the maximum first: exp(lse) alone overflows float32 from lse ~ 89
    total = torch.logsumexp(lse_all, dim=0)
    # where every part is empty, -inf - -inf would be NaN; subtracting 0 there gives weights exp(-inf) = 0
    shift = torch.where(total == float("-inf"), 0.0, total)
    weights = torch.exp(lse_all - shift).unsqueeze(-1)
    # accumulated in place: one pass per part, no converted copies (a long prefill merges every step)
    out = outs[0] * weights[0]
    for w, o in zip(weights[1:], outs[1:], strict=True):
        out.addcmul_(o, w)
    return out.to(outs[0].dtype), total
