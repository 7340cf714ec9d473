"""Decode throughput of full attention vs Recycled Attention at long contexts, one prefill per length,
both decoders in the same process back to back; plus where a decode step's time goes.

    python -m benchmarks.bench_recycle --lengths 8192,16384,32768 --new 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import profile

from benchmarks.common import corpus_text, save
from longdoc.config import GenerationConfig, RecycleConfig, RunConfig
from longdoc.engine.decode import DecodePolicy, generate
from longdoc.engine.prefill import prefill
from longdoc.engine.recycled import RecycledPolicy
from longdoc.pipeline import Session, make_plan
from longdoc.render import Reporter

LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")
ATTN_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::gather",
    "aten::matmul",
    "aten::bmm",
    "aten::_softmax",
    "aten::topk",
    "aten::max_pool1d",
    "aten::amax",
)


def breakdown(model, first_logits, pos, kv, policy: DecodePolicy | None, steps: int = 16) -> dict:
    """Profile ``steps`` decode steps: seconds per step in linear layers (weight reads), attention
    (KV reads, incl. recycled selection/gathers), and everything else (Python and small-op overhead)."""
    gen = GenerationConfig(max_new_tokens=steps + 1)
    with profile() as prof:
        t0 = time.perf_counter()
        n = len(list(generate(model, first_logits, pos, kv, gen, set(), policy)))
        wall = time.perf_counter() - t0
    linear = attn = 0.0
    for evt in prof.key_averages():
        if evt.key in LINEAR_OPS:
            linear += evt.self_cpu_time_total / 1e6
        elif evt.key in ATTN_OPS:
            attn += evt.self_cpu_time_total / 1e6
    per = max(1, n - 1)
    return {
        "step_ms": round(1000 * wall / per, 2),
        "linear_ms": round(1000 * linear / per, 2),
        "attention_ms": round(1000 * attn / per, 2),
        "other_ms": round(1000 * (wall - linear - attn) / per, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--name", default="recycle")
    a = ap.parse_args()
    cfg = RunConfig(generation=GenerationConfig(max_new_tokens=a.new))
    session = Session(cfg, Reporter(quiet=True))
    all_ids = session.encode(corpus_text())
    rows = []
    for length in [int(x) for x in a.lengths.split(",")]:
        ids = all_ids[:length]
        plan = make_plan(cfg, session.info, len(ids))
        model = session.patched(plan)
        kv = model.new_store(len(ids) + a.new + 32)
        t0 = time.perf_counter()
        logits = prefill(model, torch.tensor([ids]), kv, cfg.prefill_step)
        prefill_s = time.perf_counter() - t0
        row: dict = {
            "length": len(ids),
            "dca": plan.layout is not None,
            "prefill_tok_s": round(len(ids) / prefill_s, 1),
            "k": a.k,
            "stride": a.stride,
            "new": a.new,
        }
        outputs = {}
        for name in ("full", "recycled"):
            policy = (
                RecycledPolicy(RecycleConfig(k=a.k, stride=a.stride), session.info.n_layers)
                if name == "recycled"
                else None
            )
            t1 = time.perf_counter()
            toks = list(generate(model, logits, len(ids), kv, GenerationConfig(max_new_tokens=a.new), set(), policy))
            dt = time.perf_counter() - t1
            outputs[name] = toks
            row[f"{name}_decode_tok_s"] = round((len(toks) - 1) / dt, 2)
        row["speedup"] = round(row["recycled_decode_tok_s"] / row["full_decode_tok_s"], 3)
        same = sum(1 for x, y in zip(outputs["full"], outputs["recycled"], strict=False) if x == y)
        first_diff = next(
            (i for i, (x, y) in enumerate(zip(outputs["full"], outputs["recycled"], strict=False)) if x != y), None
        )
        row["identical_prefix_tokens"] = first_diff if first_diff is not None else len(outputs["full"])
        row["same_position_tokens"] = same
        row["full_step"] = breakdown(model, logits, len(ids), kv, None)
        row["recycled_step"] = breakdown(
            model, logits, len(ids), kv, RecycledPolicy(RecycleConfig(k=a.k, stride=10**9), session.info.n_layers)
        )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(save(a.name, {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
