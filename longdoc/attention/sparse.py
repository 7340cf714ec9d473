"""Sparse prefill: each block of queries attends exactly to its neighbourhood and to the attention
sinks, and beyond that only to the key blocks that a cheap estimate says matter.

At 64K tokens three quarters of an exact prefill is attention, nearly all of it spent on keys far
from the query that get almost no weight. So, for one prefill step (queries at ``start..end-1``,
within one DCA chunk as ``chunk_steps`` makes them):

* exact: the causal diagonal block (the step's own keys), the local band of ``band`` keys before
  the step, and the first ``block`` keys (the sinks that soak up attention in every head);
* selected: the keys in between, in blocks of ``block`` keys. Per group of ``query_block`` queries
  and KV head, a block's score is the mean query of the group against the block's mean key (the mean
  of the block's query-key scores, since the score is bilinear), taken at the rotation DCA uses for
  that block's region and maximized over the KV head's query heads. The ``budget // block`` best
  blocks over all regions are kept.

Every part is an ordinary kernel call returning its log-sum-exp, merged exactly (``merge_partials``):
the result is exact attention restricted to the kept keys, and equals exact attention when the budget
covers every block. The kernel reads one set of keys per KV head, so within a region all KV heads
take as many blocks as the head that wants most there (each its own best): a head then attends to a
few more keys than it asked for, never fewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longdoc.attention.dca import ChunkLayout, Rotate, chunked_attention, key_positions, query_positions
from longdoc.attention.kernels import Kernel, attend_blocks, block_keys, merge_partials

PREFILL_MODES = ("auto", "exact", "sparse")


@dataclass(frozen=True)
class SparseConfig:
    """Sizes in tokens."""

    budget: int = 2048  # selected keys per query, beyond the band and the sinks
    band: int = 1024  # exact keys right before each prefill step
    block: int = 64  # key block (selection unit); the first block is the sinks
    query_block: int = 128  # queries sharing one selection
    # The last tokens of each prefill are exact: the question sits there, and the last position's
    # attention predicts the first answer token (decoding itself is always exact).
    exact_tail: int = 512

    def __post_init__(self) -> None:
        if min(self.budget, self.block, self.query_block) < 1 or self.band < 0:
            raise ValueError("sparse prefill sizes must be positive")

    def block_for(self, layout: ChunkLayout | None) -> int:
        """The key block used under ``layout``: DCA regions start at multiples of the chunk length,
        and a block must not straddle two regions (they rotate the query differently), so the block
        halves (down to 8) until it divides the chunk length; 0 when it never does."""
        block = self.block
        if layout is None:
            return block
        while block > 8 and layout.chunk_len % block:
            block //= 2
        return 0 if layout.chunk_len % block else block

    def describe(self) -> str:
        return f"sparse/b{self.budget}/w{self.band}/k{self.block}/q{self.query_block}/t{self.exact_tail}"


@dataclass
class SparseStats:
    """(query, key) pairs attended vs. what exact causal attention attends, summed over layers."""

    kept: int = 0
    total: int = 0
    # tests set ``record``: every selection is then kept as (first query, end query, key indices (Hkv, n))
    record: bool = False
    picks: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 1.0

    def count_exact(self, queries: int, start: int) -> None:
        """A step of ``queries`` queries at ``start`` that attended to every earlier key."""
        pairs = queries * start + queries * (queries + 1) // 2
        self.kept += pairs
        self.total += pairs


def past_regions(
    pos: torch.Tensor, own: torch.Tensor, start: int, layout: ChunkLayout | None
) -> list[tuple[torch.Tensor, int, int]]:
    """The keys before ``start`` by DCA region, as (query rotation positions (Lq,), first key, end key):
    the own chunk's earlier keys (rotated at ``own``, the positions the step's keys were rotated at), the
    previous chunk, and everything before it (``chunked_attention``'s split). Empty regions are left out."""
    if layout is None:
        return [(own, 0, start)] if start > 0 else []
    c = layout.chunk_len
    chunk_start = (start // c) * c
    _, succ, inter = query_positions(pos, layout)
    prev = max(0, chunk_start - c)
    regions = [(own, chunk_start, start), (succ, prev, chunk_start), (inter, 0, prev)]
    return [r for r in regions if r[2] > r[1]]


def block_scores(q: torch.Tensor, keys: torch.Tensor, block: int, query_block: int) -> torch.Tensor:
    """Estimated importance of key blocks for groups of queries.

    q:    (H, Lq, D) rotated queries; keys: (Hkv, n * block, D) rotated keys
    returns (Hkv, ceil(Lq / query_block), n) float32: mean query of each group . mean key of each block,
    maximized over the query heads that read each KV head.
    """
    h, _, d = q.shape
    hkv = keys.shape[0]
    pooled_q = torch.stack([g.float().mean(1) for g in q.split(query_block, dim=1)], dim=1)  # (H, S, D)
    pooled_k = keys.float().view(hkv, -1, block, d).mean(2)  # (Hkv, n, D)
    scores = pooled_q.view(hkv, h // hkv, -1, d) @ pooled_k.transpose(-1, -2).unsqueeze(1)  # (Hkv, G, S, n)
    return scores.amax(1)


def sparse_chunked_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    rotate: Rotate,
    layout: ChunkLayout | None,
    kernel: Kernel,
    scale: float,
    cfg: SparseConfig,
    stats: SparseStats | None = None,
) -> torch.Tensor:
    """``chunked_attention`` (same arguments and result, batch 1) with the far keys of each region
    restricted to selected blocks; falls back to it where nothing is far enough to select from."""
    lq = q.shape[2]
    block = cfg.block_for(layout)
    band_lo = 0 if not block else max(block, (start - cfg.band) // block * block)  # exact band [band_lo, start)
    if lq == 1 or not block or band_lo <= block:
        if stats is not None:
            stats.count_exact(lq, start)
        return chunked_attention(q, k_cache, v_cache, start, rotate, layout, kernel, scale)

    end = start + lq
    pos = torch.arange(start, end, device=q.device)
    own = key_positions(pos, layout)
    q_own = rotate(q, own)
    parts = [kernel(q_own, k_cache[:, :, start:end], v_cache[:, :, start:end], True, scale)]
    kept = lq * (lq + 1) // 2
    selectable = []  # (rotated queries, first key, number of blocks)
    for rot_pos, a, b in past_regions(pos, own, start, layout):
        qr = q_own if rot_pos is own else rotate(q, rot_pos)
        for x, y in ((a, min(b, block)), (max(a, band_lo), b)):  # the sinks, the band
            if y > x:
                parts.append(kernel(qr, k_cache[:, :, x:y], v_cache[:, :, x:y], False, scale))
                kept += lq * (y - x)
        lo, hi = max(a, block), min(b, band_lo)
        if hi > lo:
            selectable.append((qr, lo, (hi - lo) // block))

    if selectable:
        scores = torch.cat(
            [
                block_scores(qr[0], k_cache[0, :, lo : lo + n * block], block, cfg.query_block)
                for qr, lo, n in selectable
            ],
            dim=-1,
        )  # (Hkv, S, all blocks)
        picks = scores.topk(min(scores.shape[-1], max(1, cfg.budget // block)), dim=-1).indices
        first_block = 0
        for qr, lo, n in selectable:
            in_region = ((picks >= first_block) & (picks < first_block + n)).sum(-1).amax(0).tolist()  # per group
            if any(in_region):
                # each KV head's best blocks of the region, per group: the first in_region[group] are used
                chosen = scores[..., first_block : first_block + n].topk(max(in_region), dim=-1).indices
                k_region, v_region = k_cache[:, :, lo : lo + n * block], v_cache[:, :, lo : lo + n * block]
                parts.append(
                    attend_blocks(kernel, qr, k_region, v_region, chosen, in_region, cfg.query_block, block, scale)
                )
                for group, count in enumerate(in_region):
                    a, b = group * cfg.query_block, min(lq, (group + 1) * cfg.query_block)
                    kept += (b - a) * count * block
                    if count and stats is not None and stats.record:
                        stats.picks.append((start + a, start + b, block_keys(lo, chosen[:, group, :count], block)))
            first_block += n
    if stats is not None:
        stats.kept += kept
        stats.total += lq * start + lq * (lq + 1) // 2
    result, _ = merge_partials(parts)
    return result
