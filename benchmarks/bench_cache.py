"""Time to first token for a second question about the same document: cold (prefill) vs warm (the
document KV cache), through the real CLI, in one run.

For each length a text document of that many tokens is cut from the shared corpus; the cache starts
empty; ``longdoc ask`` runs twice with different questions. The first pays the prefill and writes
the entry; the second loads it. Reports both runs' time to first token, the entry's size on disk and
its load time, and the warm/cold ratio (target: at most 3%).

    python -m benchmarks.bench_cache --lengths 16384,32768
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

from benchmarks.common import REPO, corpus_text, cpu_info, save
from longdoc.models.resolve import DEFAULT_MODEL

QUESTIONS = ("What problem does the paper address?", "Which datasets are used in the experiments?")


def document(tokens: int, folder: Path) -> Path:
    """The first ``tokens`` tokens of the corpus (model tokenizer) as a text file."""
    from longdoc.runtime.plan import model_info

    tokenizer = model_info(DEFAULT_MODEL, "cpu", "auto").tokenizer
    ids = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"][:tokens]
    path = folder / f"doc{tokens}.txt"
    path.write_text(tokenizer.decode(ids))
    return path


def ask(path: Path, question: str, env: dict[str, str], new: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "longdoc", "ask", str(path), question, "--json", "--max-new-tokens", str(new)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"longdoc ask failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    return {
        "wall_s": round(wall, 2),
        "ttft_s": data["timings"]["ttft_s"],
        "load_s": data["timings"]["load_s"],
        "prompt_tokens": data["prompt_tokens"],
        "cache": data["cache"],
        "dca": data["dca"]["enabled"],
        "answer": data["answer"][:200],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--name", default="cache")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="longdoc-bench-cache-") as tmp:
        folder = Path(tmp)
        for tokens in (int(x) for x in args.lengths.split(",")):
            docs_cache = folder / f"documents-{tokens}"  # an empty document cache; the converted model is shared
            env = {**os.environ, "LONGDOC_DOC_CACHE_DIR": str(docs_cache)}
            path = document(tokens, folder)
            cold = ask(path, QUESTIONS[0], env, args.new)
            warm = ask(path, QUESTIONS[1], env, args.new)
            assert not cold["cache"]["hit"] and warm["cache"]["hit"], (cold["cache"], warm["cache"])
            row = {
                "tokens": tokens,
                "cold": cold,
                "warm": warm,
                "entry_bytes": warm["cache"]["bytes"],
                "entry_load_s": warm["cache"]["load_s"],
                "save_s": cold["cache"].get("save_s"),
                "ttft_ratio": round(warm["ttft_s"] / cold["ttft_s"], 4),
            }
            print(json.dumps({k: v for k, v in row.items() if k not in ("cold", "warm")}), file=sys.stderr)
            rows.append(row)
    import torch

    payload = {"rows": rows, "new_tokens": args.new, "torch": torch.__version__, "cpu": cpu_info()["cpu"]}
    print(save(args.name, payload))


if __name__ == "__main__":
    main()
