"""The one call both weight kernels share (``int5.c``'s and ``q8.c``'s matmul entry points take the same
leading arguments): rows in, outputs out, bias added, the return code turned into an error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def run_matmul(
    entry: Callable[..., int],
    what: str,
    rows: torch.Tensor,
    packed: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    *extra: Any,
) -> torch.Tensor:
    """rows (M, K) bfloat16 or float32 times a packed weight of ``shape`` (K, N) -> (M, N) in ``dtype``
    (bfloat16 or float32), bias (N) float32 added; ``extra``: the entry point's trailing arguments."""
    if rows.dtype not in (torch.bfloat16, torch.float32) or dtype not in (torch.bfloat16, torch.float32):
        raise RuntimeError(f"{what} takes bfloat16 or float32")
    k, n = shape
    rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=dtype)
    rc = entry(
        rows.data_ptr(),
        int(rows.dtype == torch.bfloat16),
        rows.shape[0],
        k,
        packed.data_ptr(),
        n,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        *extra,
    )
    if rc != 0:
        raise RuntimeError(f"{what} refused its input" if rc == 1 else f"{what} ran out of memory")
    return out
