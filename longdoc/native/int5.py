"""Bindings of ``int5.c``: the kernel's weight layout and its matmul (the build is ``longdoc.native``)."""

from __future__ import annotations

import torch

from longdoc.native import library, why_unavailable
from longdoc.native.matmul import run_matmul

# int5 super-blocks: input channels, and bytes per output channel of each
BLOCK, BLOCK_BYTES = 128, 96


def layout(bits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A quantized int5 weight as stored, nibbles and fifth bits (N, K/128 * 80) uint8 and each group's
    step and minimum (N, K/32, 2), -> the kernel's layout, (ceil(N/4), K/128 * 4 * 96) uint8: quads of
    rows, their super-blocks interleaved (int5.c)."""
    n = bits.shape[0]
    sb = bits.shape[1] // 80
    half = scales.to(torch.float16).view(n, sb, 4, 2).transpose(-1, -2).contiguous()  # (n, sb, step/min, 4)
    blocks = torch.cat([bits.view(n, sb, 80), half.view(torch.uint8).view(n, sb, 16)], dim=-1)
    pad = -n % 4
    if pad:
        blocks = torch.cat([blocks, blocks.new_zeros(pad, sb, BLOCK_BYTES)])
    return blocks.view(-1, 4, sb, BLOCK_BYTES).transpose(1, 2).reshape(-1, 4 * sb * BLOCK_BYTES).contiguous()


class Int5Matmul:
    """Calls of the kernel for one packed weight (N, K), bias added."""

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None):
        lib = library("int5")
        if lib is None:
            raise RuntimeError(f"the int5 kernel is not available: {why_unavailable('int5')}")
        self.lib, self.packed, self.k = lib, packed.contiguous(), in_features
        self.n = out_features
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """rows (M, K) bfloat16 or float32 -> (M, N) in ``dtype`` (bfloat16 or float32)."""
        return run_matmul(
            self.lib.longdoc_int5_matmul,
            "the int5 kernel",
            rows,
            self.packed,
            (self.k, self.n),
            self.bias,
            dtype,
            torch.get_num_threads(),
        )
