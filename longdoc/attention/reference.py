"""The float64 oracle for Dual Chunk Attention: DCA by its definition, one (query, key) pair at a time.

Nothing here is fast or shared with the production path (``dca.chunked_attention``): every score is
materialized with its own rotation pair, so an error in the chunk split, the rotation tables, the
log-sum-exp merge or a kernel shows as a difference from this function. The tests compare against it;
the program never calls it.
"""

from __future__ import annotations

import torch

from longdoc.attention.dca import ChunkLayout


def _rotate(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """One vector ``x`` (D,) rotated at integer ``position``: "rotate half" RoPE, as Llama and Qwen2."""
    half = x.shape[0] // 2
    angle = torch.as_tensor(position, dtype=torch.float64) * inv_freq
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    return x * cos + torch.cat([-x[half:], x[:half]]) * sin


def naive_dca(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ChunkLayout | None,
    theta: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence with RoPE applied pair by pair, in float64.

    q:       (H, L, D) queries before RoPE, at absolute positions 0 .. L-1
    k, v:    (Hkv, L, D) keys and values before RoPE; query head h reads KV head h // (H / Hkv)
    layout:  DCA's chunk size s and local window w (chunk length c = s - w); None for plain attention,
             every pair then rotated at its absolute positions
    theta:   the RoPE base; inverse frequencies theta^(-2i/D)
    keep:    (Hkv, L, L) bool, optional: the only keys each query may see (sparse prefill)
    returns: (H, L, D), scores scaled by 1/sqrt(D)

    With DCA a key at p is rotated at p mod c; a query at p at p mod c for keys of its own chunk,
    min(p mod c + c, s) for the previous chunk and s for older ones (ChunkLlama's min(2c - 1, s), which
    is s whenever w < c: the layouts this oracle is used with).
    """
    h, n, d = q.shape
    g = h // k.shape[0]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    out = torch.zeros_like(q)
    for hh in range(h):
        kh = hh // g
        for i in range(n):
            scores, seen = [], []
            for j in range(i + 1):
                if keep is not None and not keep[kh, i, j]:
                    continue
                seen.append(j)
                if layout is None:
                    qp, kp = i, j
                else:
                    c, s = layout.chunk_len, layout.chunk_size
                    kp = j % c
                    gap = i // c - j // c
                    qp = i % c if gap == 0 else (min(i % c + c, s) if gap == 1 else s)
                scores.append(_rotate(q[hh, i], qp, inv_freq) @ _rotate(k[kh, j], kp, inv_freq) / d**0.5)
            p = torch.softmax(torch.stack(scores), 0)
            out[hh, i] = p @ v[kh, seen]
    return out
