"""Linear layers pre-packed for oneDNN on the CPU (``--pack``): the packing and whether it pays."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from longdoc.cpu import onednn_packs
from longdoc.models.weights import linear_weight


class PackedLinear(nn.Module):
    """A Linear whose weight is pre-packed for oneDNN on CPU.

    Without packing, every bfloat16 matmul re-lays out the weight for the AMX kernels; with the few
    rows of a decode step that re-layout dominates (measured 3x on q/k/v/o/MLP shapes and 3x on the
    LM head here). Packing once at load makes a decode step's linear work cheap.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        """``dtype``: the run's, where the weight is still in its stored (narrower) dtype; it is widened
        here, one layer at a time, so a float32 model never holds a float32 copy beside its packing."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        dtype = dtype or linear.weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype))
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_pays(dtype: torch.dtype) -> bool:
    """Whether ``pack_linears`` makes a CPU model of this dtype faster here: wherever oneDNN packs it.
    bfloat16 decode steps where its matmuls are native, float32 ones on AVX2 (LM head and MLP alike;
    benchmarks/RESULTS.md, "CPU paths")."""
    return onednn_packs(dtype)


def can_pack(model: nn.Module, dtype: torch.dtype | None = None) -> bool:
    """Whether ``pack_linears`` runs on this model (in ``dtype``, by default its linears')."""
    weight = linear_weight(model)
    dtype = dtype or weight.dtype
    return weight.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and onednn_packs(dtype)


def pack_linears(
    model: nn.Module, dtype: torch.dtype | None = None, after_each: Callable[[], object] | None = None
) -> int:
    """Replace the decoder's and LM head's Linear layers by ``PackedLinear`` in place, widened to
    ``dtype`` where given; returns how many.

    Only on CPU with bfloat16/float32 weights; the model then serves longdoc's engine (its outputs are
    unchanged, only faster). ``after_each`` runs after every replacement, e.g. to drop the pages of a
    memory-mapped weights file that packing just read (so peak memory is not weights twice).
    """
    if not can_pack(model, dtype):
        return 0
    # (parent, name) pairs, not the layers: holding every original Linear until the loop ends kept a
    # second copy of all the weights alive while packing (peak RSS 4.76 against 2.89 GB, float32).
    # Largest first: the LM head's transient copy then comes while the rest is still narrow.
    slots = [(p, n) for p in model.modules() for n, c in p.named_children() if isinstance(c, nn.Linear)]
    slots.sort(key=lambda slot: -getattr(*slot).weight.numel())
    for parent, name in slots:
        setattr(parent, name, PackedLinear(getattr(parent, name), dtype))
        if after_each is not None:
            after_each()
    return len(slots)
