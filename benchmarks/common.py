"""Helpers shared by the benchmark scripts: real prompt text from the shared corpus, subprocess runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
OUT = REPO / "benchmarks" / "out"


def corpus_text() -> str:
    """All five shared papers' text (about 75K tokens), in a fixed order."""
    from longdoc.ingest import ingest_paths
    from longdoc.prompt import format_documents

    if not CORPUS.exists():
        raise SystemExit(f"shared corpus not found at {CORPUS}")
    pdfs = sorted(str(p) for p in CORPUS.glob("*.pdf"))
    return format_documents(ingest_paths(pdfs))


def cpu_info() -> dict[str, Any]:
    """The CPU a row ran on: model name, the bfloat16 matrix units, threads."""
    from longdoc.models import cpu_flags

    name = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    from longdoc import cpu

    return {
        "cpu": name,
        "cpu_class": cpu.cpu_class(),
        "isa_cap": cpu.isa_cap(),
        "amx": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "threads": torch.get_num_threads(),
    }


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """Run one configuration in its own process so its peak RSS is its own."""
    module = "benchmarks." + script.removesuffix(".py")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"args": args, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def save(name: str, payload: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def child_rows(script: str, arg_lists: list[list[str]]) -> list[dict[str, Any]]:
    """``run_child`` for each argument list, back to back; each row is printed to stderr as it comes."""
    rows = []
    for args in arg_lists:
        row = run_child(script, args)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def save_rows(name: str, command: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Save a benchmark's rows with the command, torch version and CPU that produced them; print where."""
    print(save(name, {"command": command, "torch": torch.__version__, **cpu_info(), **extra, "rows": rows}))


KV_DIR = Path("/tmp/longdoc-bench-kv")


def kv_path(session: Any, prompt_ids: list[int], layout: Any, kv_dir: Path = KV_DIR) -> Path:
    """Where the prefill of these ids (this model dtype and DCA layout) is kept between runs."""
    key = json.dumps([prompt_ids, session.info.dtype_name, str(layout)]).encode()
    return kv_dir / f"{hashlib.sha256(key).hexdigest()[:24]}.safetensors"


def prefilled(session: Any, cfg: Any, prompt_ids: list[int], new: int, kv_dir: Path = KV_DIR) -> tuple[Any, ...]:
    """Prefill (or load the saved prefill of) one prompt; returns (model, kv, first logits, prefill_s)."""
    from safetensors.torch import load_file, save_file

    from longdoc.engine.prefill import prefill
    from longdoc.runtime.plan import make_plan

    plan = make_plan(cfg, session.info, len(prompt_ids))
    model = session.long_model(plan)
    kv = model.new_cache(len(prompt_ids) + new + 1)
    n = len(prompt_ids)
    path = kv_path(session, prompt_ids, plan.layout, kv_dir)
    if path.exists():
        saved = load_file(str(path))
        for i in range(len(kv.k)):
            kv.k[i][:, :, :n] = saved[f"k{i}"]
            kv.v[i][:, :, :n] = saved[f"v{i}"]
        return model, kv, saved["logits"], float(saved["prefill_s"])
    t0 = time.perf_counter()
    logits = prefill(model, torch.tensor([prompt_ids]), kv, cfg.prefill_step)
    prefill_s = time.perf_counter() - t0
    kv_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"k{i}": kv.k[i][:, :, :n].contiguous() for i in range(len(kv.k))}
    tensors.update({f"v{i}": kv.v[i][:, :, :n].contiguous() for i in range(len(kv.v))})
    tensors.update({"logits": logits, "prefill_s": torch.tensor(prefill_s)})
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return model, kv, logits, prefill_s


def hf_generate_timed(
    folder: Path, dtype: torch.dtype, ids: list[int], new: int
) -> tuple[Any, float, float, list[float]]:
    """Plain transformers (SDPA) greedy ``generate`` of ``new`` tokens after ``ids``, timed per token.

    Returns (model, load_s, t_start, stamps): ``stamps[0]`` is the prompt's ``put``, ``stamps[1]`` the first
    generated token (the end of the prefill), then one per token; a short warm-up runs first, as longdoc's
    path gets one.
    """
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    load_s = time.perf_counter() - t0
    stamps: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value: torch.Tensor) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    x = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(x[:, :16], max_new_tokens=2, do_sample=False)
        stamps.clear()
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=Clock())
    return model, load_s, t1, stamps
