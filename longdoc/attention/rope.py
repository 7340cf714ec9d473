"""Rotary position embedding applied at arbitrary integer positions (DCA rotates queries and keys at
positions other than their absolute ones, so the model's own per-forward rotation cannot be used)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeTable:
    """cos/sin rows for positions 0..n-1, grown on demand.

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
        self.sin = (emb.sin() * self.scaling).to(self.dtype)

    def angles(self, positions: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows (L, D) for positions (L,). Pass ``top`` (> every position) when the caller
        knows it, to skip reading the maximum back from the device."""
        self.ensure(top if top is not None else int(positions.max()) + 1)
        return self.cos[positions], self.sin[positions]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, L, D) rotated by rows cos, sin (L, D) -> same shape and dtype as x."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, L, D) rotated at positions (L,) -> same shape and dtype."""
        return self.apply(x, *self.angles(positions))
