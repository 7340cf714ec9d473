"""A preallocated KV cache: one K and one V tensor per layer, written in place (no per-step allocation)."""

from __future__ import annotations

import torch


class KVCache:
    """K/V for ``n_layers`` layers, each (1, Hkv, capacity, D).

    Keys are stored already rotated (at their DCA key position, or absolute without DCA), values as
    projected. Callers track how many positions they have written.
    """

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ):
        shape = (1, n_kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.capacity = capacity

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (1, Hkv, L, D) at positions start .. start+L-1."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV store full: {end} > capacity {self.capacity}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v

    def grow(self, capacity: int) -> None:
        """Reallocate with room for ``capacity`` positions, keeping what is written (a growing chat)."""
        if capacity <= self.capacity:
            return
        for tensors in (self.k, self.v):
            for layer, old in enumerate(tensors):
                new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, : self.capacity] = old
                tensors[layer] = new
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
