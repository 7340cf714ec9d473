"""Time per call of the Q8_0 kernel (longdoc/native/q8.c) on the embedded model's linear shapes, one input
row (a decode step), against torch's float32 ``F.linear`` and oneDNN's packed float32 linear, and the
machine's plain memory-read bandwidth measured in the same run (issue 26).

Every shape is held in enough copies (as many as a decode step's 24 layers would need to leave the
caches: at least ``--mib`` MiB of float32) that each call reads its weight from memory, as in a real
step; one round calls every copy once. Rounds alternate between the kernels and the thread counts
(shared, noisy cores); a kernel's time is the mean over copies of each copy's best call.

The bandwidth is a plain read of a float32 tensor the size of the whole model's Q8_0 weights (24 layers
and the LM head), best of ``--reps``, at each thread count: the better of ``torch.sum`` and ``torch.dot``
of the tensor's halves, measured before and after the shapes. The kernel's effective GB/s (its packed
bytes over its time) is given as a fraction of it. The kernel reads 4 streams per thread and a plain
read 1 or 2, which on some CPUs is slower: a fraction above 1 says so. Writes benchmarks/out/q8.json.

    python -m benchmarks.bench_q8
    python -m benchmarks.bench_q8 --rows 4 --reps 5
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import cpu_info, save

HIDDEN, INTER, KV, VOCAB, LAYERS = 896, 4864, 128, 151936, 24
# (name, in, out, calls per decode step)
SHAPES = [
    ("q/o", HIDDEN, HIDDEN, 2 * LAYERS),
    ("k/v", HIDDEN, KV, 2 * LAYERS),
    ("gate/up", HIDDEN, INTER, 2 * LAYERS),
    ("down", INTER, HIDDEN, LAYERS),
    ("lm_head", HIDDEN, VOCAB, 1),
]


def best_round(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plain_reads(nbytes: int, reps: int, threads: int) -> dict[str, float]:
    """GB/s of two plain reads of a float32 tensor of ``nbytes`` (written first, so its pages are real),
    each best of ``reps``, on ``threads`` threads: ``torch.sum`` (one sequential stream per thread) and
    ``torch.dot`` of its two halves (two streams side by side, as the kernel reads several: on this
    class of CPU one core reads more from several streams than from one)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(nbytes // 4)
        half = data.numel() // 2
        runs = {"torch.sum": data.sum, "torch.dot of halves": lambda: torch.dot(data[:half], data[half : 2 * half])}
        out = {}
        for name, fn in runs.items():
            fn()
            out[name] = round(nbytes / min(best_round(fn) for _ in range(reps)) / 1e9, 2)
    finally:
        torch.set_num_threads(saved)
    return out


def q8_model_bytes() -> int:
    """The packed Q8_0 bytes of the whole model (24 layers' linears and the LM head): 34 bytes per 32
    weights, rows padded to groups of 8."""
    total = 0
    for _, k, n, calls in SHAPES:
        total += math.ceil(n / 8) * 8 * k // 32 * 34 * calls
    return total


def measure_shape(name: str, k: int, n: int, rows: int, reps: int, mib: int) -> dict[str, Any]:
    from longdoc.native import q8
    from longdoc.quant.packing import PackedLinear

    copies = max(1, math.ceil(mib * 2**20 / (n * k * 4)))
    torch.manual_seed(0)
    dense = [torch.randn(n, k) * 0.02 for _ in range(copies)]
    bias = torch.randn(n) * 0.1 if name in ("q/o", "k/v") else None
    level = q8.best_path()
    kernels: list[q8.Q8Matmul] = []
    packed_bytes = 0
    for w in dense:
        qs, scales = q8.quantize_q8(w)
        packed = q8.pack(qs, scales)
        packed_bytes = packed.numel()
        kernels.append(q8.Q8Matmul(packed, k, n, bias, level=level))
    onednn = []
    for w in dense:
        layer = torch.nn.Linear(k, n, bias=bias is not None)
        layer.weight.data = w
        if bias is not None:
            layer.bias.data = bias
        onednn.append(PackedLinear(layer, torch.float32))
    x = torch.randn(rows, k)

    # one call per copy: (threads, the call of copy i)
    calls: dict[str, tuple[int, Callable[[int], object]]] = {}
    for threads in (1, 2):
        calls[f"q8 {threads}t"] = (threads, lambda i, t=threads: kernels[i](x, torch.float32, t))
        calls[f"float32 F.linear {threads}t"] = (threads, lambda i: F.linear(x, dense[i], bias))
        calls[f"float32 oneDNN packed {threads}t"] = (threads, lambda i: onednn[i](x))
    saved = torch.get_num_threads()
    # each copy's best call over the rounds, then their mean: a call that a neighbour's process delayed
    # (a descheduled OpenMP thread costs a time slice) doesn't count, while every call still reads its
    # copy from memory (every other copy was read since)
    best = {key: [float("inf")] * copies for key in calls}
    try:
        for _ in range(reps + 1):  # the first round warms up (and counts: a best is a best)
            for key, (threads, call) in calls.items():
                torch.set_num_threads(threads)
                times = best[key]
                for i in range(copies):
                    t0 = time.perf_counter()
                    call(i)
                    times[i] = min(times[i], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    mean = {key: sum(times) / copies for key, times in best.items()}
    row: dict[str, Any] = {
        "shape": name,
        "in": k,
        "out": n,
        "rows": rows,
        "copies": copies,
        "q8_path": q8.PATHS[level],
        "q8_bytes": packed_bytes,
        "float32_bytes": n * k * 4,
        "us_per_call": {key: round(t * 1e6, 1) for key, t in mean.items()},
    }
    row["gb_per_s"] = {
        key: round((packed_bytes if key.startswith("q8") else n * k * 4) / t / 1e9, 2) for key, t in mean.items()
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1, help="input rows per call (1: a decode step)")
    ap.add_argument("--reps", type=int, default=7, help="rounds per kernel (best counts)")
    ap.add_argument("--mib", type=int, default=256, help="float32 MiB of copies per shape, at least")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    a = ap.parse_args()
    from longdoc.native import q8, why_unavailable

    if not q8.paths():
        raise SystemExit(f"the Q8_0 kernel is not available: {why_unavailable('q8')}")
    model_bytes = q8_model_bytes()
    reads = {t: plain_reads(model_bytes, a.reps, t) for t in (1, 2)}
    print({"plain_reads_gb_per_s": reads}, flush=True)
    rows = []
    wanted = a.shapes.split(",")
    for name, k, n, calls in SHAPES:
        if name not in wanted:
            continue
        row = measure_shape(name, k, n, a.rows, a.reps, a.mib)
        row["calls_per_step"] = calls
        rows.append(row)
        print(row, flush=True)
    # measured again at the end: the best of both counts (the cores are shared)
    for t in (1, 2):
        for name, value in plain_reads(model_bytes, a.reps, t).items():
            reads[t][name] = max(reads[t][name], value)
    read = {t: max(reads[t].values()) for t in (1, 2)}
    for row in rows:
        row["q8_fraction_of_bandwidth"] = {t: round(row["gb_per_s"][f"q8 {t}t"] / read[t], 3) for t in (1, 2)}
    step: dict[str, float] = {}
    if len(rows) == len(SHAPES):  # a decode step's linears: every call of every shape
        for key in rows[0]["us_per_call"]:
            step[key] = round(sum(r["us_per_call"][key] * r["calls_per_step"] for r in rows) / 1e3, 2)
    payload = {
        "command": "python -m benchmarks.bench_q8",
        "torch": torch.__version__,
        **cpu_info(),
        "q8_paths": [q8.PATHS[lv] for lv in q8.paths()],
        "q8_model_bytes": model_bytes,
        "plain_reads_gb_per_s": {f"{t}t": v for t, v in reads.items()},
        "bandwidth_gb_per_s": {f"{t}t": v for t, v in read.items()},
        "shapes": rows,
        "decode_step_linears_ms": step,
    }
    print(save("q8", payload))


if __name__ == "__main__":
    main()
