"""How to quantize the activations of int8 linears: perplexity of emulated choices (issue 13).

torch's x86 int8 GEMM quantizes its input with one scale and zero point per call. This benchmark
emulates, in float32, int8 weights (per output channel, as ``--quantize int8`` stores them) times
activations quantized in several ways, and measures perplexity at 4K on the shared corpus with every
position through the emulated linears (as ``eval ppl --quantize`` does). It chose ``schemes.ACT_BLOCK``
and ``schemes.BLOCKED_INPUTS``; the kernel path itself is tested against a float64 emulation in
tests/test_quant.py and measured by ``eval ppl --quantize int8``.

Modes: ``w`` weight-only; ``sym`` symmetric 8-bit per row; ``asymB`` asymmetric B-bit per row (the
kernel's rule; 7 bits is its reduced range); ``blkN`` symmetric 8-bit per block of N channels;
``ablkB_N`` asymmetric B-bit per block of N.

    python -m benchmarks.bench_act_quant --length 4096
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import corpus_text, save_rows


def fake_quantize(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x (R, K) float32 with its activations quantized as ``mode`` says, and dequantized."""
    if mode == "w":
        return x
    if mode == "sym":
        step = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
        return torch.round(x / step).clamp(-127, 127) * step
    if mode.startswith("blk"):
        xb = x.view(x.shape[0], -1, int(mode[3:]))
        step = (xb.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
        return (torch.round(xb / step).clamp(-127, 127) * step).view_as(x)
    if mode.startswith("ablk"):
        bits, block = (int(v) for v in mode[4:].split("_"))
        xb = x.view(x.shape[0], -1, block)
        return asymmetric(xb, bits).view_as(x)
    if mode.startswith("asym"):
        return asymmetric(x, int(mode[4:]))
    raise ValueError(mode)


def asymmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    top = 2**bits - 1
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    step = ((hi - lo) / top).clamp(min=1e-12)
    zero = torch.round(-lo / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, top) - zero) * step


class Emulated(nn.Module):
    """A linear with int8 weights and activations quantized by ``mode``, in float32."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        from longdoc.quant import schemes

        q, s = schemes.quantize_int8(linear.weight)
        self.weight = (q.float() * s[:, None]).T.contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = fake_quantize(x.float().reshape(-1, x.shape[-1]), self.mode)
        out = rows @ self.weight
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], -1)


def _ends(*suffixes: str) -> Callable[[str], bool]:
    return lambda n: n.endswith(suffixes)


per_row_ones = _ends("o_proj", "down_proj")
# selection -> (linear name -> mode, or None for bfloat16)
SELECTIONS: dict[str, Callable[[str], str | None]] = {
    "bfloat16": lambda n: None,
    "int8 weight-only": lambda n: "w",
    "sym per row": lambda n: "sym",
    "asym8 per row (the kernel's rule)": lambda n: "asym8",
    "asym7 per row (reduced range)": lambda n: "asym7",
    "sym per block of 32": lambda n: "blk32",
    "sym per block of 128": lambda n: "blk128",
    "sym per row, down_proj and lm_head weight-only": lambda n: "w" if n.endswith(("down_proj", "lm_head")) else "sym",
    "asym8 per row, down_proj per block of 128": lambda n: "blk128" if n.endswith("down_proj") else "asym8",
    "asym8 per row, down_proj weight-only": lambda n: "w" if n.endswith("down_proj") else "asym8",
    "asym8 per row, down_proj per block of 128, lm_head weight-only": lambda n: (
        "blk128" if n.endswith("down_proj") else "w" if n == "lm_head" else "asym8"
    ),
    "sym per block of 128, down_proj asym8 per row": lambda n: "asym8" if n.endswith("down_proj") else "blk128",
    "sym per block of 128, o_proj and down_proj asym8 per row (shipped)": lambda n: (
        "asym8" if per_row_ones(n) else "blk128"
    ),
    "asym8 per block of 128, down_proj asym8 per row": lambda n: "asym8" if n.endswith("down_proj") else "ablk8_128",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--selections", default=";".join(SELECTIONS), help="semicolon-separated names of SELECTIONS")
    ap.add_argument("--name", default="act_quant")
    a = ap.parse_args()

    from longdoc import models
    from longdoc.config import DCAConfig, RunConfig
    from longdoc.evals.ppl import nll_sum
    from longdoc.quant import schemes
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

    cfg = RunConfig(dca=DCAConfig(enabled=False), doc_cache=False, quantize="none")
    session = LocalBackend(cfg, Reporter(quiet=True))
    ids = session.encode(corpus_text())[: a.length]
    info = session.info
    rows: list[dict[str, Any]] = []
    for label in a.selections.split(";"):
        t0 = time.perf_counter()
        source = models.ModelSource(kind="folder", name=info.name, path=info.folder)
        loaded = models.load_model(source, info.device, info.dtype, tokenizer=session.tokenizer)
        for name in schemes.quantized_names(loaded.model):
            mode = SELECTIONS[label](name)
            if mode is not None:
                parent, _, child = name.rpartition(".")
                owner = loaded.model.get_submodule(parent) if parent else loaded.model
                setattr(owner, child, Emulated(loaded.model.get_submodule(name), mode))
        session._loaded = loaded
        total, count = nll_sum(session, ids)
        row = {"selection": label, "ppl": round(math.exp(total / count), 4), "seconds": round(time.perf_counter() - t0)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    cmd = f"python -m benchmarks.bench_act_quant --length {a.length}"
    save_rows(a.name, cmd, rows, length=a.length)


if __name__ == "__main__":
    main()
