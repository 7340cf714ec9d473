"""Time per layer of prefill attention on int16 products (longdoc/native/flash16.c) against torch's fused
CPU flash kernel on float32 (``_scaled_dot_product_flash_attention_for_cpu``, called as
``longdoc.attention.kernels.attend_torch_cpu`` calls it: one call per query head of a GQA group), causal,
on the shapes of the embedded 0.5B model (14 query heads over 2 KV heads, head size 64) and of the 1.5B
(12 over 2, head size 128), at 2K and 8K tokens, on 1 and 2 threads.

Rounds alternate between the kernels (shared, noisy cores); a kernel's time is its best round. GFLOP/s
counts the causal products, 4 * L^2 / 2 * D per query head. Each size also reports both kernels' largest
errors against the float64 reference on the first 512 tokens (out and lse). Writes
benchmarks/out/flash16.json.

    python -m benchmarks.bench_flash16
    python -m benchmarks.bench_flash16 --lengths 2048 --reps 2
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Any

import torch

from benchmarks.common import cpu_info, save

SHAPES = {"0.5b": (14, 2, 64), "1.5b": (12, 2, 128)}


@functools.cache  # per shape: the same for every length
def errors(heads: int, kv: int, d: int) -> dict[str, dict[str, float]]:
    from longdoc.attention.kernels import attend_reference, attend_torch_cpu
    from longdoc.native import flash16

    g = torch.Generator().manual_seed(1)
    n = 512
    q, k, v = (torch.randn(1, h, n, d, generator=g) for h in (heads, kv, kv))
    scale = 1 / math.sqrt(d)
    ref, ref_lse = attend_reference(q.double(), k.double(), v.double(), True, scale)
    found = {}
    for name, fn in (("flash16", flash16.flash16), ("torch", attend_torch_cpu)):
        out, lse = fn(q, k, v, True, scale)
        found[name] = {
            "out": float((out.double() - ref).abs().max()),
            "lse": float((lse.double() - ref_lse).abs().max()),
        }
    return found


def measure(model: str, n: int, reps: int) -> dict[str, Any]:
    from longdoc.attention.kernels import attend_torch_cpu
    from longdoc.native import flash16

    heads, kv, d = SHAPES[model]
    torch.manual_seed(0)
    q, k, v = torch.randn(1, heads, n, d), torch.randn(1, kv, n, d), torch.randn(1, kv, n, d)
    scale = 1 / math.sqrt(d)
    calls = {"torch": attend_torch_cpu, "flash16": flash16.flash16}
    saved = torch.get_num_threads()
    best = {f"{name} {t}t": math.inf for name in calls for t in (1, 2)}
    try:
        for _ in range(reps):
            for t in (2, 1):
                torch.set_num_threads(t)
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    fn(q, k, v, True, scale)
                    key = f"{name} {t}t"
                    best[key] = min(best[key], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    flop = 4 * n * n / 2 * d * heads
    return {
        "model": model,
        "tokens": n,
        "shape": {"heads": heads, "kv_heads": kv, "head_dim": d},
        "ms_per_layer": {key: round(s * 1e3, 1) for key, s in best.items()},
        "gflop_per_s": {key: round(flop / s / 1e9, 1) for key, s in best.items()},
        "speedup_vs_torch": {f"{t}t": round(best[f"torch {t}t"] / best[f"flash16 {t}t"], 2) for t in (1, 2)},
        "max_error_vs_float64_512": errors(heads, kv, d),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,8192", help="prompt tokens, comma separated")
    ap.add_argument("--models", default="0.5b,1.5b", help="shapes: " + ", ".join(SHAPES))
    ap.add_argument("--reps", type=int, default=3, help="rounds per kernel (best counts)")
    ap.add_argument("--name", default="flash16")
    a = ap.parse_args()
    from longdoc.native import flash16, why_unavailable

    if not flash16.fast():
        raise SystemExit(f"flash16's AVX2 loop does not run here: {why_unavailable('flash16') or 'no AVX2'}")
    rows = []
    for model in a.models.split(","):
        for n in (int(x) for x in a.lengths.split(",")):
            row = measure(model, n, a.reps)
            rows.append(row)
            print(row, flush=True)
    payload = {
        "command": "python -m benchmarks.bench_flash16"
        + (f" --lengths {a.lengths}" if a.lengths != "2048,8192" else "")
        + (f" --name {a.name}" if a.name != "flash16" else ""),
        "torch": torch.__version__,
        **cpu_info(),
        "flash16_paths": [flash16.PATHS[lv] for lv in flash16.paths()],
        "rows": rows,
    }
    print(save(a.name, payload))


if __name__ == "__main__":
    main()
