"""``--quantize auto``: which scheme a run gets here, and why an explicit one can't run or is slower.

The rules are measured (benchmarks/RESULTS.md, "CPU paths"): q8 where longdoc's Q8_0 kernel has a SIMD
loop (AVX2 or NEON; float32 or bfloat16: one decode step's linears in benchmarks/out/q8.json, from
benchmarks/bench_q8.py), else int8 where torch's int8 GEMM has VNNI, else none; on AVX2 torch's int8
and int4 CPU kernels are weight-only and decode slower than float32. q8 is picked over int5 on AVX-512
too: it decodes as fast there and holds one copy of the weights where int5 holds two (the AVX-512
headline in benchmarks/RESULTS.md; benchmarks/HISTORY.md, "One copy of the weights on AVX-512"); int5
stays for whoever asks for it.
"""

from __future__ import annotations

from typing import Any

import torch

from longdoc import native
from longdoc.cpu import onednn_packs
from longdoc.native import int5, q8
from longdoc.quant import schemes


def default_quantize(device: torch.device, dtype: torch.dtype, config: dict[str, Any]) -> str:
    """What ``--quantize auto`` runs: q8 where its kernel has a SIMD loop here (AVX2, NEON) and fits the
    model's widths, else int8 for bfloat16 where the int8 GEMM runs, else none; none off the CPU (torch's
    weight-only kernels are slower than float32 on CPUs where none of these runs; q8's scalar loop is
    not picked)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return "none"
    if q8_simd() and quant_unavailable("q8", device, dtype, config) is None:
        return "q8"
    return "int8" if dtype == torch.bfloat16 and schemes.int8_gemm_available() else "none"


def q8_simd() -> bool:
    """Whether the Q8_0 kernel runs a SIMD loop here (AVX2 or NEON), not only its scalar one."""
    return any(level != q8.SCALAR for level in q8.paths())


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
    if scheme == "q8":
        if native.library("q8") is None:
            return f"the Q8_0 kernel can't run here: {native.why_unavailable('q8')}"
        widths = schemes.input_widths(config)
        if any(w % q8.BLOCK for w in widths):
            return f"q8 needs the model's layer widths ({', '.join(map(str, widths))}) to be multiples of {q8.BLOCK}"
    if not schemes.kernel_available(scheme, dtype):
        return f"this torch build has no CPU {scheme} weight-only kernel for {str(dtype).removeprefix('torch.')}"
    return None


def quant_slower(scheme: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why an explicit ``scheme`` decodes slower here than no quantization (one phrase), or None."""
    if device.type != "cpu" or scheme in ("none", "int5"):
        return None
    if scheme == "q8" and not q8_simd():
        return "only the Q8_0 kernel's scalar loop runs here (no AVX2 or NEON): likely slower than unquantized"
    if scheme == "int8" and not schemes.int8_gemm_available():
        return "without VNNI torch's int8 kernel is weight-only and decodes slower than unquantized here"
    if scheme == "int4" and (dtype != torch.bfloat16 or not onednn_packs(torch.bfloat16)):
        return "torch's int4 kernel is fast only for bfloat16 on AVX-512; here it decodes far slower than unquantized"
    return None
