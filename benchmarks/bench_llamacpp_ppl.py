"""Perplexity of llama.cpp's model (the embedded Q4_K_M GGUF) against longdoc's on the same token ids.

What ``--quantize int4`` gives up is judged against bfloat16 (benchmarks/RESULTS.md); this puts the
4-bit model that llama.cpp runs, the one the decode race is run against, on the same scale. The
ids are the shared corpus's first ``--length`` tokens by the model's tokenizer (what ``longdoc eval
ppl ../shared/corpus`` measures), fed to both as ids. longdoc runs without DCA, every position
through the named weights (``none`` is bfloat16). Each configuration runs in its own process.

    python -m benchmarks.bench_llamacpp_ppl --length 4096 --configs llamacpp,longdoc:none

Needs llama-cpp-python (see benchmarks/bench_llamacpp.py); llama.cpp keeps the logits of every
position, ``length`` x 151,936 float32 (2.5 GB at 4,096).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from benchmarks.bench_llamacpp import embedded_gguf, prompt_ids
from benchmarks.common import child_rows, save_rows

SLICE = 512  # positions per log-softmax


def nll_llamacpp(ids: list[int]) -> tuple[float, int]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(embedded_gguf()),
        n_ctx=len(ids),
        n_threads=torch.get_num_threads(),
        n_batch=512,
        logits_all=True,
        verbose=False,
    )
    llm.eval(ids)
    targets = torch.tensor(ids[1:])
    total = 0.0
    for s in range(0, len(targets), SLICE):
        logits = torch.from_numpy(llm.scores[s : s + SLICE]).float()[: len(targets) - s]
        total += float(torch.nn.functional.cross_entropy(logits, targets[s : s + len(logits)], reduction="sum"))
    return total, len(targets)


def nll_longdoc(quantize: str, ids: list[int]) -> tuple[float, int]:
    from longdoc.config import DCAConfig, RunConfig
    from longdoc.evals.ppl import nll_sum
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

    cfg = RunConfig(dtype="bfloat16", quantize=quantize, doc_cache=False, dca=DCAConfig(enabled=False))
    return nll_sum(LocalBackend(cfg, Reporter(quiet=True)), ids)


def child(spec: str, length: int) -> dict[str, Any]:
    ids = prompt_ids(length)
    mode, _, quantize = spec.partition(":")
    total, count = nll_llamacpp(ids) if mode == "llamacpp" else nll_longdoc(quantize or "none", ids)
    model = "gguf Q4_K_M" if mode == "llamacpp" else f"longdoc {quantize or 'none'}"
    return {"config": spec, "model": model, "length": length, "tokens": count, "ppl": round(math.exp(total / count), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--spec", default="llamacpp")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--configs", default="llamacpp,longdoc:none")
    ap.add_argument("--name", default="llamacpp_ppl")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.spec, a.length)))
        return
    specs = a.configs.split(",")
    rows = child_rows("bench_llamacpp_ppl.py", [["--spec", spec, "--length", str(a.length)] for spec in specs])
    command = f"python -m benchmarks.bench_llamacpp_ppl --length {a.length} --configs {a.configs}"
    save_rows(a.name, command, rows)


if __name__ == "__main__":
    main()
