"""Decode throughput of full attention vs Recycled Attention at long contexts, one prefill per length,
both decoders in the same process back to back; plus where a decode step's time goes.

    python -m benchmarks.bench_recycle --lengths 8192,16384,32768 --new 256 [--before REV]

With ``--before REV`` the same prefilled cache is also decoded by that git revision's code (from a
temporary worktree, in a child process), so "before" and "after" speeds come from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import profile

from benchmarks.common import REPO, corpus_text, kv_path, prefilled, save
from longdoc.config import GenerationConfig, RecycleConfig, RunConfig
from longdoc.engine.decode import DecodePolicy, generate
from longdoc.engine.recycled import RecycledPolicy
from longdoc.render import Reporter
from longdoc.runtime.local import LocalBackend

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


# Decodes full and recycled attention with another revision's code over a prefill saved by this
# process; only APIs that revision shares with this one are used.
BEFORE_CHILD = """
import json, sys, time
from safetensors.torch import load_file
from longdoc.config import GenerationConfig, RecycleConfig, RunConfig
from longdoc.engine.decode import generate
from longdoc.engine.recycled import RecycledPolicy
from longdoc.runtime.local import LocalBackend
from longdoc.runtime.plan import make_plan
from longdoc.render import Reporter
a = json.loads(sys.argv[1])
cfg = RunConfig(generation=GenerationConfig(max_new_tokens=a["new"]))
session = LocalBackend(cfg, Reporter(quiet=True))
plan = make_plan(cfg, session.info, a["n"])
model = session.long_model(plan)
kv = model.new_cache(a["n"] + a["new"] + 1)
saved = load_file(a["kv"])
for i in range(len(kv.k)):
    kv.k[i][:, :, : a["n"]] = saved[f"k{i}"]
    kv.v[i][:, :, : a["n"]] = saved[f"v{i}"]
out = {"dca": plan.layout is not None}
for name in ("full", "recycled"):
    cfg_r = RecycleConfig(k=a["k"], stride=a["stride"])
    policy = RecycledPolicy(cfg_r, session.info.n_layers) if name == "recycled" else None
    t0 = time.perf_counter()
    toks = list(generate(model, saved["logits"], a["n"], kv, cfg.generation, set(), policy))
    out[name + "_decode_tok_s"] = round((len(toks) - 1) / (time.perf_counter() - t0), 2)
print(json.dumps(out))
"""


def before_run(rev_dir: str, kv_file: Path, n: int, new: int, k: int, stride: int) -> dict:
    args = json.dumps({"kv": str(kv_file), "n": n, "new": new, "k": k, "stride": stride})
    env = {**os.environ, "PYTHONPATH": rev_dir}
    proc = subprocess.run(
        [sys.executable, "-c", BEFORE_CHILD, args], cwd=rev_dir, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--k", type=int, default=RecycleConfig.k)
    ap.add_argument("--stride", type=int, default=RecycleConfig.stride)
    ap.add_argument("--schedule", default=RecycleConfig.schedule, help="fixed | dynamic (this revision only)")
    ap.add_argument("--threshold", type=float, default=RecycleConfig.threshold)
    ap.add_argument("--before", default=None, help="also decode with this git revision's code, same prefill")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the profiled step breakdown")
    ap.add_argument("--name", default="recycle")
    a = ap.parse_args()
    cfg = RunConfig(generation=GenerationConfig(max_new_tokens=a.new))
    session = LocalBackend(cfg, Reporter(quiet=True))
    all_ids = session.encode(corpus_text())
    worktree = None
    if a.before:
        worktree = tempfile.mkdtemp(prefix="longdoc-before-")
        subprocess.run(["git", "worktree", "add", "--detach", worktree, a.before], cwd=REPO, check=True)
    rows = []
    try:
        for length in [int(x) for x in a.lengths.split(",")]:
            ids = all_ids[:length]
            model, kv, logits, prefill_s = prefilled(session, cfg, ids, a.new + 32)
            row: dict = {
                "length": len(ids),
                "dca": model.settings.layout is not None,
                "prefill_tok_s": round(len(ids) / prefill_s, 1),
                "k": a.k,
                "stride": a.stride,
                "new": a.new,
            }
            outputs = {}
            for name in ("full", "recycled"):
                policy = (
                    RecycledPolicy(
                        RecycleConfig(k=a.k, stride=a.stride, schedule=a.schedule, threshold=a.threshold),
                        session.info.n_layers,
                    )
                    if name == "recycled"
                    else None
                )
                t1 = time.perf_counter()
                toks = list(generate(model, logits, len(ids), kv, cfg.generation, set(), policy))
                dt = time.perf_counter() - t1
                outputs[name] = toks
                row[f"{name}_decode_tok_s"] = round((len(toks) - 1) / dt, 2)
            row["speedup"] = round(row["recycled_decode_tok_s"] / row["full_decode_tok_s"], 3)
            row["schedule"] = dataclasses.asdict(policy.stats) if policy else None
            pairs = list(zip(outputs["full"], outputs["recycled"], strict=False))
            first_diff = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
            row["identical_prefix_tokens"] = first_diff if first_diff is not None else len(outputs["full"])
            row["same_position_tokens"] = sum(1 for x, y in pairs if x == y)
            if worktree:
                before = before_run(
                    worktree, kv_path(session, ids, model.settings.layout), len(ids), a.new, a.k, a.stride
                )
                row["before"] = {"rev": a.before, **before}
            if not a.no_breakdown:
                row["full_step"] = breakdown(model, logits, len(ids), kv, None)
                row["recycled_step"] = breakdown(
                    model,
                    logits,
                    len(ids),
                    kv,
                    RecycledPolicy(RecycleConfig(k=a.k, stride=10**9), session.info.n_layers),
                )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        if worktree:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=REPO, check=False)
    print(save(a.name, {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
