"""``--quantize auto``: which scheme a run gets here, and why an explicit one can't run or is slower.

The rules are measured (benchmarks/RESULTS.md, "CPU paths"): int5 where longdoc's kernel runs (AVX-512
VNNI), else int8 where torch's int8 GEMM has VNNI, else none; on AVX2 torch's int8 and int4 CPU kernels
are weight-only and decode slower than float32.
"""

from __future__ import annotations

from typing import Any

import torch

from longdoc import native
from longdoc.cpu import onednn_packs
from longdoc.native import int5
from longdoc.quant import schemes


def default_quantize(device: torch.device, dtype: torch.dtype, config: dict[str, Any]) -> str:
    """What ``--quantize auto`` runs: int5 where its kernel runs (and fits the model's widths), else
    int8 where the int8 GEMM runs, else none; none off the CPU and for float32 on CPUs where neither
    runs (torch's weight-only kernels are slower than float32 there)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return "none"
    if quant_unavailable("int5", device, dtype, config) is None:
        return "int5"
    return "int8" if schemes.int8_gemm_available() else "none"


def quant_unavailable(scheme: str, device: torch.device, dtype: torch.dtype, config: dict[str, Any]) -> str | None:
    """Why ``scheme`` can't run here, or on the model of ``config`` (a phrase), or None if it can."""
    if device.type != "cpu":
        return f"the weight-only kernels are CPU kernels, and this run is on {device.type}"
    if scheme == "int5":
        if native.library("int5") is None:
            return f"the int5 kernel can't run here: {native.why_unavailable('int5')}"
        widths = schemes.input_widths(config)
        if any(w % int5.BLOCK for w in widths):
            return (
                f"int5 needs the model's layer widths ({', '.join(map(str, widths))}) to be multiples of {int5.BLOCK}"
            )
    if not schemes.kernel_available(scheme, dtype):
        return f"this torch build has no CPU {scheme} weight-only kernel for {str(dtype).removeprefix('torch.')}"
    return None


def quant_slower(scheme: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why an explicit ``scheme`` decodes slower here than no quantization (one phrase), or None."""
    if device.type != "cpu" or scheme in ("none", "int5"):
        return None
    if scheme == "int8" and not schemes.int8_gemm_available():
        return "without VNNI torch's int8 kernel is weight-only and decodes slower than unquantized here"
    if scheme == "int4" and (dtype != torch.bfloat16 or not onednn_packs(torch.bfloat16)):
        return "torch's int4 kernel is fast only for bfloat16 on AVX-512; here it decodes far slower than unquantized"
    return None
