"""Rotary position embedding applied at arbitrary integer positions (DCA rotates queries and keys at
positions other than their absolute ones, so the model's own per-forward rotation cannot be used)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The model's own formulation (x1, x2) -> (-x2, x1), the yardstick of ``RopeTable.apply``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeTable:
    """cos/sin rows for positions 0..n-1, grown on demand.

    The sine rows are stored signed, (-sin, sin) over the two halves, so a rotation is
    ``x * cos + swap(x) * sin`` with ``swap`` exchanging the halves: the numbers of the model's
    ``x * cos + rotate_half(x) * sin`` (negation is exact), in 4 tensor operations instead of 7,
    which counts in a decode step that rotates a single row per layer.

    ``inv_freq`` (D/2,) and ``attention_scaling`` come from the model's rotary embedding, so RoPE
    variants (Llama-3 scaling, YaRN factors) behave as the model defines them.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0, dtype: torch.dtype = torch.float32):
        # float32 frequencies for models (as transformers computes them); float64 in reference tests
        self.inv_freq = inv_freq if inv_freq.dtype == torch.float64 else inv_freq.float()
        self.scaling = attention_scaling
        self.dtype = dtype
        self.cos = torch.empty(0, 2 * inv_freq.shape[0], dtype=dtype, device=inv_freq.device)
        self.sin = self.cos

    def ensure(self, n: int) -> None:
        if n <= self.cos.shape[0]:
            return
        n = max(n, 2 * self.cos.shape[0])
        pos = torch.arange(n, dtype=self.inv_freq.dtype, device=self.inv_freq.device)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * self.scaling).to(self.dtype)
        sin = emb.sin() * self.scaling
        sin[:, : self.inv_freq.shape[0]].neg_()
        self.sin = sin.to(self.dtype)

    def angles(self, positions: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin rows (L, D) for positions (L,). Pass ``top`` (> every position) when the
        caller knows it, to skip reading the maximum back from the device."""
        self.ensure(top if top is not None else int(positions.max()) + 1)
        return self.cos[positions], self.sin[positions]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, L, D) rotated by rows cos, signed sin (L, D) of x's dtype -> same shape and dtype."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, L, D) rotated at positions (L,) -> same shape and dtype."""
        cos, sin = self.angles(positions)
        return self.apply(x, cos.to(x.dtype), sin.to(x.dtype))
