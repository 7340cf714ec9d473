"""Exact attention kernels on the embedded model's shapes, in one run: longdoc's flash.c against torch's
fused CPU flash kernel, both returning the log-sum-exp DCA's merge needs, against the bfloat16 matmul
ceiling measured in the same run.

Shapes (bfloat16, 14 query heads on 2 KV heads, head size 64) are the calls a prefill makes: the causal
block on a prefill step's diagonal, a step's queries against an earlier DCA region, a sparse group of
128 queries against its selected keys, and one decode query (which stays on torch's kernel: a tile of
flash.c holds 16 queries). The two kernels alternate, best of ``--repeat`` each, so drift on a noisy
machine hits both. FLOPs: 4 * head size per (query, key) pair and query head (half the pairs when
causal).

    python -m benchmarks.bench_attention
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.bench_prefill import matmul_ceiling
from benchmarks.common import cpu_info, save
from longdoc.native import flash

# (label, queries, keys, causal)
SHAPES = [
    ("prefill step, causal diagonal", 2048, 2048, True),
    ("prefill step, causal diagonal", 512, 512, True),
    ("step against an earlier region", 2048, 8192, False),
    ("step against an earlier region", 2048, 24576, False),
    ("sparse group, selected keys", 128, 8192, False),
    ("decode, one query", 1, 32768, False),
]


def _timed(kernel: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    kernel(*args)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--name", default="attention")
    args = parser.parse_args(argv)

    from longdoc import native
    from longdoc.attention.kernels import attend_cpu, attend_reference, attend_torch_cpu

    if native.library("flash") is None:
        raise SystemExit(f"longdoc's attention kernel does not run here: {native.why_unavailable('flash')}")
    ceiling = matmul_ceiling(torch.bfloat16)
    print(f"bfloat16 matmul ceiling: {ceiling:.0f} GFLOP/s", flush=True)
    h, hkv, d, scale = 14, 2, 64, 64**-0.5
    rows = []
    torch.manual_seed(0)
    for label, lq, lk, causal in SHAPES:
        q = torch.randn(1, h, lq, d).bfloat16()
        k, v = torch.randn(1, hkv, lk, d).bfloat16(), torch.randn(1, hkv, lk, d).bfloat16()
        kernels = {"torch": attend_torch_cpu, "longdoc": attend_cpu}
        # the error of each against float64 on the same inputs, on the first 16 queries (the reference is slow)
        ref_out, ref_lse = attend_reference(q[:, :, :16].double(), k.double(), v.double(), False, scale)
        errors = {}
        for name, kernel in kernels.items():
            out, lse = kernel(q, k, v, causal, scale)
            if not causal:
                errors[name] = (
                    float((out[:, :, :16].double() - ref_out).abs().max()),
                    float((lse[:, :, :16].double() - ref_lse).abs().max()),
                )
        best = {name: float("inf") for name in kernels}
        for _ in range(args.repeat):  # alternate the two so both see the same machine
            for name, kernel in kernels.items():
                best[name] = min(best[name], _timed(kernel, q, k, v, causal, scale))
        pairs = lq * (lq + 1) / 2 if causal else lq * lk
        flop = 4 * d * h * pairs
        row = {
            "shape": label,
            "queries": lq,
            "keys": lk,
            "causal": causal,
            "longdoc_kernel": "flash.c" if flash.flash_takes(q, k, v) else "torch (decode)",
            **{f"{name}_ms": round(t * 1e3, 3) for name, t in best.items()},
            **{f"{name}_gflops": round(flop / t / 1e9, 1) for name, t in best.items()},
            **{f"{name}_vs_ceiling": round(flop / t / 1e9 / ceiling, 3) for name, t in best.items()},
            "speedup": round(best["torch"] / best["longdoc"], 2),
            **{f"{name}_max_error": {"out": e[0], "lse": e[1]} for name, e in errors.items()},
        }
        print(row, flush=True)
        rows.append(row)
    save(
        args.name,
        {
            "command": " ".join(["python -m benchmarks.bench_attention", *(argv or __import__("sys").argv[1:])]),
            **cpu_info(),
            "matmul_ceiling_gflops": round(ceiling, 1),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
