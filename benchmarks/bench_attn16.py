"""Time per call of a decode step's attention over a 16-bit KV cache (longdoc/native/attn16.c) on the
embedded model's shapes (14 query heads, 2 KV heads, head size 64), one query row, at 2K, 8K and 32K
cached keys: its best path and its scalar path against torch's fused CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``) on float32 K/V, called as
``longdoc.attention.kernels.attend_torch_cpu`` calls it (the 7 query heads of a KV head folded into
the query length), which is what decode steps run today.

Every size is held in enough copies (at least ``--mib`` MiB of float32 K/V) that each call reads its
K/V from memory, as a decode step's 24 layers do; one round calls every copy once. Rounds alternate
between the kernels and thread counts (shared, noisy cores); a kernel's time is the mean over copies
of each copy's best call. Effective GB/s = the K/V bytes a call reads (2 or 4 per element) over its
time; a plain read of a float32 tensor (``torch.sum``, best of ``--reps``) gives the machine's own.
The kernel's output is checked against torch's on each size (max |difference|). Writes
benchmarks/out/attn16.json.

    python -m benchmarks.bench_attn16
    python -m benchmarks.bench_attn16 --keys 2048 --reps 3
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import cpu_info, save

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64


def plain_read(nbytes: int, reps: int, threads: int) -> float:
    """GB/s of ``torch.sum`` over a float32 tensor of ``nbytes`` (written first), best of ``reps``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(nbytes // 4)
        data.sum()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return round(nbytes / best / 1e9, 2)


def measure(n: int, reps: int, mib: int, scalar: bool) -> dict[str, Any]:
    from longdoc.attention.kernels import attend_torch_cpu
    from longdoc.native import attn16

    scale = 1 / math.sqrt(HEAD_DIM)
    elements = 2 * KV_HEADS * n * HEAD_DIM  # K and V
    copies = max(2, math.ceil(mib * 2**20 / (elements * 4)))
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, 1, HEAD_DIM)
    half = [
        (torch.randn(1, KV_HEADS, n, HEAD_DIM).half(), torch.randn(1, KV_HEADS, n, HEAD_DIM).half())
        for _ in range(copies)
    ]
    wide = [(k.float(), v.float()) for k, v in half]
    brain = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in half[: max(2, copies // 2)]]
    best = attn16.best_path()

    # one call per copy: (threads, bytes per element read, the call of copy i)
    calls: dict[str, tuple[int, int, Callable[[int], object]]] = {}
    for t in (1, 2):
        calls[f"attn16 {attn16.PATHS[best]} float16 {t}t"] = (
            t,
            2,
            lambda i, t=t: attn16.attend16(q, *half[i], n, scale, level=best, threads=t),
        )
        calls[f"torch flash float32 {t}t"] = (t, 4, lambda i: attend_torch_cpu(q, *wide[i], False, scale))
    calls[f"attn16 {attn16.PATHS[best]} bfloat16 2t"] = (
        2,
        2,
        lambda i: attn16.attend16(q, *brain[i % len(brain)], n, scale, level=best, threads=2),
    )
    if scalar:
        calls["attn16 scalar float16 2t"] = (
            2,
            2,
            lambda i: attn16.attend16(q, *half[i], n, scale, level=attn16.SCALAR, threads=2),
        )

    out, lse = attn16.attend16(q, *half[0], n, scale, threads=2)
    ref, ref_lse = attend_torch_cpu(q, *wide[0], False, scale)
    diff = max((out - ref).abs().max().item(), (lse - ref_lse).abs().max().item())

    saved = torch.get_num_threads()
    times = {key: [math.inf] * copies for key in calls}
    try:
        for _ in range(reps + 1):  # the first round warms up (and counts: a best is a best)
            for key, (threads, _, call) in calls.items():
                torch.set_num_threads(threads)
                rounds = 1 if "scalar" in key else copies  # the slow scalar loop: one copy per round
                for i in range(rounds):
                    t0 = time.perf_counter()
                    call(i)
                    times[key][i] = min(times[key][i], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    mean = {key: sum(x for x in ts if x < math.inf) / sum(x < math.inf for x in ts) for key, ts in times.items()}
    row: dict[str, Any] = {
        "keys": n,
        "copies": copies,
        "kv_bytes_16bit": elements * 2,
        "kv_bytes_float32": elements * 4,
        "max_abs_difference_vs_torch": diff,
        "us_per_call": {key: round(t * 1e6, 1) for key, t in mean.items()},
        "gb_per_s": {key: round(elements * calls[key][1] / t / 1e9, 2) for key, t in mean.items()},
    }
    torch_2t = mean["torch flash float32 2t"]
    row["speedup_vs_torch_2t"] = {key: round(torch_2t / t, 2) for key, t in mean.items() if key.startswith("attn16")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", default="2048,8192,32768", help="cached keys, comma separated")
    ap.add_argument("--reps", type=int, default=5, help="rounds per kernel (best counts)")
    ap.add_argument("--mib", type=int, default=128, help="float32 MiB of K/V copies per size, at least")
    ap.add_argument("--no-scalar", action="store_true", help="leave out the (slow) scalar path")
    a = ap.parse_args()
    from longdoc.native import attn16, why_unavailable

    if not attn16.paths():
        raise SystemExit(f"the 16-bit KV attention kernel is not available: {why_unavailable('attn16')}")
    reads = {f"{t}t": plain_read(a.mib * 2**20, a.reps, t) for t in (1, 2)}
    print({"plain_read_gb_per_s": reads}, flush=True)
    rows = []
    for n in (int(x) for x in a.keys.split(",")):
        row = measure(n, a.reps, a.mib, not a.no_scalar)
        rows.append(row)
        print(row, flush=True)
    payload = {
        "command": "python -m benchmarks.bench_attn16",
        "torch": torch.__version__,
        **cpu_info(),
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "query_rows": 1},
        "attn16_paths": [attn16.PATHS[lv] for lv in attn16.paths()],
        "plain_read_gb_per_s": reads,
        "rows": rows,
    }
    print(save("attn16", payload))


if __name__ == "__main__":
    main()
