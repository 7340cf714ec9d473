"""Prefill's linears on Q8_0 weights: the q8 kernel's gemm (16-bit activations, ``Q8Matmul.gemm``) against
what prefill ran before it, the weight unpacked to float32 for the call and torch's ``F.linear`` (unpacking
included), on a model's prefill shapes at 1 and 2 threads (issue 26).

Each (shape, rows, threads) cell alternates the two ``--rounds`` times (shared, noisy cores) and keeps each
one's best call; GFLOP/s counts 2 M N K. The gemm's AVX2 loop must run here (``q8.gemm_fast``): elsewhere
prefill unpacks, and there is nothing to compare. Writes benchmarks/out/<name>.json.

    python -m benchmarks.bench_q8_gemm
    python -m benchmarks.bench_q8_gemm --model qwen2.5-coder-1.5b --name q8_gemm_1.5b
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import cpu_info, save
from longdoc.native import q8

# hidden, MLP width, KV width (q/k/v stacked: hidden + 2 KV), as the models' configs give them
MODELS = {"qwen2.5-coder-0.5b": (896, 4864, 128), "qwen2.5-coder-1.5b": (1536, 8960, 256)}


def shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, in, out) of a layer's linears as longdoc stacks them (q/k/v and gate/up share an input)."""
    hidden, inter, kv = MODELS[model]
    return [
        ("q/k/v", hidden, hidden + 2 * kv),
        ("o", hidden, hidden),
        ("gate/up", hidden, 2 * inter),
        ("down", inter, hidden),
    ]


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_times(matmul: q8.Q8Matmul, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Best seconds of each way over ``rounds`` alternating rounds."""
    best = {"gemm": float("inf"), "unpacked": float("inf")}
    for _ in range(rounds):
        best["gemm"] = min(best["gemm"], seconds(lambda: matmul.gemm(x, torch.float32)))
        best["unpacked"] = min(best["unpacked"], seconds(lambda: F.linear(x, matmul.rows(dtype=torch.float32))))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(MODELS))
    ap.add_argument("--rows", default="1024,2048", help="activation rows per call (prefill's MLP takes 1024 at a time)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="q8_gemm")
    a = ap.parse_args()
    if not q8.gemm_fast():
        raise SystemExit("the q8 gemm's AVX2 loop does not run here: prefill unpacks the weights instead")
    torch.manual_seed(0)
    rows = []
    for name, k, n in shapes(a.model):
        qs, scales = q8.quantize_q8(torch.randn(n, k) * 0.05)
        matmul = q8.Q8Matmul(q8.pack(qs, scales), k, n, None)
        for m in [int(v) for v in a.rows.split(",")]:
            x = torch.randn(m, k)
            for threads in [int(v) for v in a.threads.split(",")]:
                torch.set_num_threads(threads)
                best = best_times(matmul, x, a.rounds)
                gflop = 2 * m * n * k / 1e9
                row = {
                    "shape": name,
                    "in": k,
                    "out": n,
                    "rows": m,
                    "threads": threads,
                    "gemm_ms": round(best["gemm"] * 1e3, 2),
                    "unpacked_ms": round(best["unpacked"] * 1e3, 2),
                    "gemm_gflops": round(gflop / best["gemm"], 1),
                    "unpacked_gflops": round(gflop / best["unpacked"], 1),
                    "speedup": round(best["unpacked"] / best["gemm"], 2),
                }
                print(row, flush=True)
                rows.append(row)
    payload = {
        "command": "python -m benchmarks.bench_q8_gemm " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "model": a.model,
        **cpu_info(),
        "rows": rows,
    }
    print(save(a.name, payload))


if __name__ == "__main__":
    main()
