"""Dual Chunk Attention (An et al. 2024): attention over any length with no relative distance above
the chunk size s, so a model trained on a window W > s never sees an unseen distance.

Notation (DESIGN.md section 4): s = chunk_size, w = local_window, c = s - w = chunk length.
Keys at absolute position p are rotated once at ``p mod c`` and cached that way. A query at p, in
chunk i = p // c, is rotated three ways: at ``p mod c`` for keys of its own chunk (intra, causal),
at ``min(p mod c + c, s)`` for chunk i-1 (successive), and at ``min(2c - 1, s)`` for chunks <= i-2
(inter). The three attentions are merged exactly through their log-sum-exps.

Plain causal attention is the same computation with no chunking (``layout=None``): positions are
absolute and every key is "intra". One code path serves both, so DCA and plain attention can only
differ where DCA is meant to differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longdoc.attention.kernels import Kernel, merge_partials
from longdoc.errors import UsageError

# rotate(x, positions) -> x rotated at those integer positions; x (B, H, L, D), positions (L,)
Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ChunkLayout:
    """DCA geometry; s and w in tokens."""

    chunk_size: int
    local_window: int

    def __post_init__(self) -> None:
        if not 0 <= self.local_window < self.chunk_size:
            raise ValueError("local_window must be >= 0 and smaller than chunk_size")

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_window

    @classmethod
    def for_window(cls, window: int, chunk_size: int | None = None, local_window: int | None = None) -> ChunkLayout:
        """The one rule for DCA geometry from the trained window W and the user's overrides.

        s defaults to 3W/4 and w to W/8 (ChunkLlama's choice); given only s, w defaults to s/8 (the
        layouts measured in benchmarks/RESULTS.md). s must stay below W (else DCA would use distances the
        model never saw) and 0 <= w < s. Raises ``LayoutError`` naming the option to fix.
        """
        s = chunk_size if chunk_size is not None else (3 * window) // 4
        w = local_window if local_window is not None else (window // 8 if chunk_size is None else s // 8)
        if not 2 <= s < window:
            raise LayoutError(
                f"--chunk-size must be between 2 and {window - 1} (below the model's trained window of {window:,}"
                f" tokens), not {s:,}"
            )
        if not 0 <= w < s:
            raise LayoutError(f"--local-window must be between 0 and {s - 1} (below --chunk-size {s:,}), not {w:,}")
        return cls(s, w)


class LayoutError(UsageError, ValueError):
    """A DCA chunk size or local window the model cannot use (a usage error at the CLI)."""


def key_positions(positions: torch.Tensor, layout: ChunkLayout | None) -> torch.Tensor:
    """Rotation index of cached keys: p mod c (absolute p without DCA)."""
    return positions if layout is None else positions % layout.chunk_len


def query_positions(positions: torch.Tensor, layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intra, successive, inter) rotation indices of queries at absolute ``positions``."""
    c, s = layout.chunk_len, layout.chunk_size
    intra = positions % c
    succ = torch.clamp(intra + c, max=s)
    # as ChunkLlama (chunkllama_attn_replace.py): the successive index of a chunk's last query,
    # min(2c - 1, s). That is s when w < c (the defaults), but 2c - 1 < s when w >= c.
    inter = torch.full_like(positions, min(2 * c - 1, s))
    return intra, succ, inter


def chunk_steps(start: int, end: int, step: int, layout: ChunkLayout | None) -> list[tuple[int, int]]:
    """Split positions [start, end) into prefill steps of at most ``step`` tokens that never cross a
    DCA chunk boundary (each step's queries then share one intra/successive/inter key split)."""
    bounds = []
    pos = start
    while pos < end:
        stop = min(end, pos + step)
        if layout is not None:
            stop = min(stop, (pos // layout.chunk_len + 1) * layout.chunk_len)
        bounds.append((pos, stop))
        pos = stop
    return bounds


def chunked_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    rotate: Rotate,
    layout: ChunkLayout | None,
    kernel: Kernel,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a block of queries against everything cached up to and including them.

    q:        (B, H, Lq, D) queries *before* rotation, at absolute positions start .. start+Lq-1;
              with DCA they must lie within one chunk (see ``chunk_steps``).
    k_cache:  (B, Hkv, >= start+Lq, D) keys already rotated at ``key_positions``; v_cache likewise.
    returns:  (B, H, Lq, D)
    """
    lq = q.shape[2]
    end = start + lq
    pos = torch.arange(start, end, device=q.device)
    prev, chunk_start = region_bounds(start, layout)
    if layout is not None and end > chunk_start + layout.chunk_len:
        raise ValueError("a DCA query block must not cross a chunk boundary")

    parts = []
    q_intra = rotate(q, key_positions(pos, layout))
    if lq == 1:  # one query sees its whole chunk so far: no mask, one call
        parts.append(kernel(q_intra, k_cache[:, :, chunk_start:end], v_cache[:, :, chunk_start:end], False, scale))
    else:
        if start > chunk_start:  # earlier keys of the same chunk: all visible
            parts.append(
                kernel(q_intra, k_cache[:, :, chunk_start:start], v_cache[:, :, chunk_start:start], False, scale)
            )
        parts.append(kernel(q_intra, k_cache[:, :, start:end], v_cache[:, :, start:end], True, scale))
    if layout is not None and chunk_start > 0:
        _, succ, inter = query_positions(pos, layout)
        parts.append(
            kernel(rotate(q, succ), k_cache[:, :, prev:chunk_start], v_cache[:, :, prev:chunk_start], False, scale)
        )
        if prev > 0:
            parts.append(kernel(rotate(q, inter), k_cache[:, :, :prev], v_cache[:, :, :prev], False, scale))
    out, _ = merge_partials(parts)
    return out


def region_bounds(pos: int, layout: ChunkLayout | None) -> tuple[int, int]:
    """(start of the previous chunk, start of the current chunk) for a query at ``pos``: keys below
    the first are inter, between the two successive, from the second on intra. (0, 0) without DCA."""
    if layout is None:
        return 0, 0
    chunk_start = pos // layout.chunk_len * layout.chunk_len
    return max(0, chunk_start - layout.chunk_len), chunk_start
