"""Prefill and decode throughput and peak RSS: longdoc's engine vs plain transformers ``generate``.

Each configuration runs in its own process (peak RSS is per process); all run back to back in one
invocation so the ratios compare like with like on a noisy machine.

    python benchmarks/bench_engine.py --lengths 2048,8192,16384 --new 32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch

from benchmarks.common import corpus_text, hf_generate_timed, run_child, save


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, dtype: str, length: int, new: int, dca: str, chunk: int | None) -> dict:
    from longdoc.config import DCAConfig, GenerationConfig, RunConfig
    from longdoc.engine.decode import generate
    from longdoc.engine.prefill import prefill
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend
    from longdoc.runtime.plan import make_plan

    dca_flag = {"on": True, "off": False, "auto": None}[dca]
    cfg = RunConfig(
        dtype=dtype, dca=DCAConfig(enabled=dca_flag, chunk_size=chunk), generation=GenerationConfig(max_new_tokens=new)
    )
    session = LocalBackend(cfg, Reporter(quiet=True))
    ids = session.encode(corpus_text())[:length]
    info = session.info
    t0 = time.perf_counter()
    if mode == "hf":
        model, load_s, t1, stamps = hf_generate_timed(info.folder, info.dtype, ids, new)
        n_gen = len(stamps) - 1
        t_prefill = stamps[1] - t1  # the first generated token ends the prefill
        decode_s = stamps[-1] - stamps[1]
        kv_bytes = None
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        dca_on = False
    else:
        plan = make_plan(cfg, info, len(ids))
        model = session.long_model(plan)
        load_s = time.perf_counter() - t0
        warm = model.new_cache(32)
        prefill(model, torch.tensor([ids[:16]]), warm, cfg.prefill_step)
        kv = model.new_cache(len(ids) + new)
        t1 = time.perf_counter()
        logits = prefill(model, torch.tensor([ids]), kv, cfg.prefill_step)
        t_prefill = time.perf_counter() - t1
        t2 = time.perf_counter()
        toks = list(generate(model, logits, len(ids), kv, cfg.generation, set()))
        decode_s = time.perf_counter() - t2
        n_gen = len(toks)
        kv_bytes = kv.nbytes
        weights = info.weight_bytes
        dca_on = plan.layout is not None
    return {
        "mode": mode,
        "dtype": str(info.dtype).removeprefix("torch."),
        "length": len(ids),
        "dca": dca_on,
        "chunk_size": chunk,
        "load_s": round(load_s, 2),
        "prefill_s": round(t_prefill, 2),
        "prefill_tok_s": round(len(ids) / t_prefill, 1),
        "decode_tok_s": round((n_gen - 1) / decode_s, 2) if n_gen > 1 else None,
        "peak_rss_bytes": rss(),
        "weight_bytes": weights,
        "kv_cache_bytes": kv_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="longdoc")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dca", default="auto")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--configs", default="hf:float32,hf:bfloat16,longdoc:auto", help="mode:dtype[:dca[:chunk]] list")
    ap.add_argument("--name", default="engine")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.mode, a.dtype, a.length, a.new, a.dca, a.chunk_size)))
        return
    rows = []
    for length in [int(x) for x in a.lengths.split(",")]:
        for spec in a.configs.split(","):
            mode, dtype, *rest = spec.split(":")
            args = ["--mode", mode, "--dtype", dtype, "--length", str(length), "--new", str(a.new)]
            if rest:
                args += ["--dca", rest[0]]
            if len(rest) > 1:
                args += ["--chunk-size", rest[1]]
            row = run_child("bench_engine.py", args)
            row["config"] = spec
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    payload = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cores": torch.get_num_threads(),
        "new_tokens": a.new,
        "rows": rows,
    }
    print(save(a.name, payload))


if __name__ == "__main__":
    main()
