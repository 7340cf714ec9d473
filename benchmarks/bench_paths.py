"""Which path each choice gives on the machine at hand: dtype, packed linears, quantization scheme and
attention kernel, one row per choice, each in its own process (peak RSS is per process), back to back
and repeated in alternation so the ratios compare like with like on shared cores.

Every row runs the embedded model as a user gets it (``LocalBackend``, the document's prompt through
``prefill`` and greedy ``generate``): load time (weights into memory, packing and quantized copies
included), prefill and decode tok/s, and peak RSS. ``auto`` is what ``--dtype/--quantize auto`` pick
here; the others force one choice. ``rev:COMMIT`` runs the same measurement (``bench_llamacpp``'s
child) on another revision checked out in a temporary worktree, and ``llamacpp`` runs llama.cpp on the
same GGUF (when llama-cpp-python is installed), so "no slower than before" and "against llama.cpp"
come from the same run. The table in RESULTS.md ("CPU paths") is rendered from the JSON.

    python -m benchmarks.bench_paths --length 512 --new 48 --repeat 3 \\
        --configs auto,float32:plain,rev:34b3aea,llamacpp,float32:pack:int8,float32:pack:int4,bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_llamacpp import prompt_ids, rss
from benchmarks.common import REPO, cpu_info, run_child, save

CONFIGS = "auto,float32:pack,float32:plain:int8,float32:plain:int4,bfloat16:plain,llamacpp"


def child(dtype: str, pack: str, quantize: str, kernel: str, length: int, new: int) -> dict[str, Any]:
    from longdoc.config import GenerationConfig, RunConfig
    from longdoc.engine.decode import generate
    from longdoc.engine.prefill import prefill
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend
    from longdoc.runtime.plan import make_plan

    ids = prompt_ids(length)
    cfg = RunConfig(
        dtype=dtype,
        pack=pack,
        quantize=quantize,
        kernel=kernel,
        doc_cache=False,
        generation=GenerationConfig(max_new_tokens=new),
    )
    t0 = time.perf_counter()
    session = LocalBackend(cfg, Reporter(quiet=True))
    session.loaded()
    load_s = time.perf_counter() - t0
    plan = make_plan(cfg, session.info, len(ids))
    model = session.long_model(plan)
    # first-call costs (kernel set-up for each shape) outside the timings, as bench_llamacpp's children
    prefill(model, torch.tensor([ids[:16]]), model.new_cache(32), cfg.prefill_step)
    kv = model.new_cache(len(ids) + new)
    t1 = time.perf_counter()
    logits = prefill(model, torch.tensor([ids]), kv, cfg.prefill_step)
    prefill_s = time.perf_counter() - t1
    stamps = [time.perf_counter() for _ in generate(model, logits, len(ids), kv, cfg.generation, set(), None)]
    decode_s = stamps[-1] - stamps[0]
    return {
        "dtype": session.info.dtype_name,
        "packed": session.packed,
        "quantize": session.info.quantize,
        "attention": session.describe().attention,
        "load_s": round(load_s, 2),
        "model_load_s": round(session.load_s, 2),
        "prefill_tok_s": round(len(ids) / prefill_s, 1),
        "decode_tok_s": round((len(stamps) - 1) / decode_s, 2),
        "peak_rss_bytes": rss(),
        "length": len(ids),
        "generated": len(stamps),
    }


def run_revision(commit: str, length: int, new: int) -> dict[str, Any]:
    """``bench_llamacpp``'s longdoc child (``--quantize auto``) on another revision, in a worktree."""
    # beside this checkout, so the revision finds ../shared/corpus as this one does
    with tempfile.TemporaryDirectory(dir=REPO.parent, prefix=".bench-rev-") as tmp:
        tree = Path(tmp)  # (empty: git worktree takes it)
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO, check=True, capture_output=True
        )
        try:
            args = ["--child", "--mode", "longdoc", "--quantize", "auto", "--length", str(length), "--new", str(new)]
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_llamacpp", *args],
                cwd=tree,
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PYTHONPATH": str(tree)},
            )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def one(spec: str, length: int, new: int) -> dict[str, Any]:
    if spec.startswith("rev:"):
        row = run_revision(spec[4:], length, new)
    elif spec == "llamacpp":
        row = run_child("bench_llamacpp.py", ["--mode", "llamacpp", "--length", str(length), "--new", str(new)])
    else:
        parts = (spec.split(":") + ["", "", ""])[:4]
        dtype, pack, quantize, kernel = (p or "auto" for p in parts)
        pack = {"plain": "off", "pack": "on"}.get(pack, pack)
        args = ["--dtype", dtype, "--pack", pack, "--quantize", quantize, "--kernel", kernel]
        row = run_child("bench_paths.py", [*args, "--length", str(length), "--new", str(new)])
    row["config"] = spec
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--pack", default="auto")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all configs, alternating")
    ap.add_argument(
        "--configs",
        default=CONFIGS,
        help="comma-separated: auto | DTYPE:pack|plain[:QUANTIZE[:KERNEL]] | rev:COMMIT | llamacpp",
    )
    ap.add_argument("--name", default="paths")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.dtype, a.pack, a.quantize, a.kernel, a.length, a.new)))
        return
    rows = []
    for round_ in range(a.repeat):
        for spec in a.configs.split(","):
            row = {**one(spec, a.length, a.new), "round": round_}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    command = "python -m benchmarks.bench_paths " + " ".join(sys.argv[1:])
    payload = {"command": command, "torch": torch.__version__, **cpu_info(), "rows": rows}
    print(save(a.name, payload))


if __name__ == "__main__":
    main()
