"""Summarizing all five corpus papers (~75K tokens): one DCA pass vs map-reduce, wall time and peak
memory, each as a separate ``longdoc summarize --json`` process.

    python -m benchmarks.bench_summarize --map-context 8192 --new 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import CORPUS, REPO, save


def run(args: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "longdoc", "summarize", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"args": args, "exit": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:]}
    data = json.loads(proc.stdout)
    return {
        "args": args,
        "wall_s": round(wall, 1),
        "prompt_tokens": data["prompt_tokens"],
        "generated_tokens": data["generated_tokens"],
        "peak_rss_bytes": data["memory"]["peak_rss_bytes"],
        "plan": data.get("plan"),
        "dca": data["dca"],
        "timings": data["timings"],
        "summary": data["answer"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--map-context", type=int, default=8192)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--runs", default="one_pass_dca,map_reduce", help="which of the two runs, comma-separated")
    ap.add_argument("--papers", type=int, default=5, help="how many corpus papers (alphabetical)")
    a = ap.parse_args()
    pdfs = sorted(str(p) for p in CORPUS.glob("*.pdf"))[: a.papers]
    common = [*pdfs, "--json", "--quiet", "--max-new-tokens", str(a.new), "--no-recycle"]
    runs = {"one_pass_dca": common, "map_reduce": [*common, "--max-context", str(a.map_context)]}
    rows = {name: run(args) for name, args in runs.items() if name in a.runs.split(",")}
    for name, row in rows.items():
        print(name, json.dumps({k: v for k, v in row.items() if k != "summary"}), file=sys.stderr)
    print(save("summarize", rows))


if __name__ == "__main__":
    main()
