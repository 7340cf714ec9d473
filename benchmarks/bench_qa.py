"""Question answering over the five corpus papers, each at full length: how often a model answers right.

The questions are ``benchmarks/qa/questions.json``: per paper (a PDF in the shared corpus), short
questions whose answer is a checkable fact in that paper (a number, a name, a data set, a year), each
with the forms of the answer that count (``accept``) and where in the paper it is (``where``).

Each paper runs through longdoc's own pipeline as a user gets it: ``longdoc ask PAPER -Q q1 -Q q2 ...
--json`` in a subprocess (the paper is prefilled once and its prefix reused for every question), greedy
decoding (``--temperature 0``), the document cache off (``--no-cache``) unless ``--cache`` is given.

Scoring rule: an answer is correct when the answer text, lower-cased with every run of whitespace
collapsed to one space, contains any of the question's ``accept`` strings (lower-cased, whitespace
collapsed the same way) as a substring. Nothing else is normalised; accuracy is correct / asked, per
model (one model per run: ``--name`` should say which).

    python -m benchmarks.bench_qa --model qwen2.5-coder-0.5b --name qa_0.5b
    python -m benchmarks.bench_qa --model qwen2.5-coder-0.5b --papers 1 --questions 1 --name qa_smoke

The output (``benchmarks/out/<name>.json``) has one row per question (paper, question, answer, accept,
correct, prompt tokens, seconds: that question's prefill + decode as the CLI reports them; the first
question's prefill includes the paper's, later ones reuse its prefix), the per-paper wall time of the
subprocess (model load included), the accuracy, and the command.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CORPUS, REPO, cpu_info, save

QUESTIONS = Path(__file__).resolve().parent / "qa" / "questions.json"


def norm(text: str) -> str:
    """Lower-cased, every run of whitespace one space, stripped."""
    return re.sub(r"\s+", " ", text.lower()).strip()


def is_correct(answer: str, accept: list[str]) -> bool:
    """The stated rule: the normalised answer contains any normalised accepted form."""
    said = norm(answer)
    return any(norm(form) in said for form in accept if norm(form))


def load_set(path: Path = QUESTIONS) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["papers"])


def json_objects(stdout: str) -> list[dict[str, Any]]:
    """The JSON objects the CLI printed, one per question (one per line, or concatenated)."""
    decoder = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    i, text = 0, stdout
    while True:
        start = text.find("{", i)
        if start < 0:
            return out
        obj, i = decoder.raw_decode(text, start)
        out.append(obj)


def ask_paper(pdf: Path, questions: list[str], args: argparse.Namespace) -> tuple[list[dict[str, Any]], float, str]:
    """Run ``longdoc ask`` on one paper with its questions; returns (results, wall seconds, stderr tail)."""
    cmd = [sys.executable, "-m", "longdoc", "ask", str(pdf), "--json", "--quiet", "--temperature", "0"]
    cmd += ["--model", args.model, "--quantize", args.quantize, "--max-new-tokens", str(args.max_new_tokens)]
    if not args.cache:
        cmd.append("--no-cache")
    for q in questions:
        cmd += ["-Q", q]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    if proc.returncode != 0:
        print(f"{pdf.name}: exit {proc.returncode}: {tail}", file=sys.stderr, flush=True)
    return json_objects(proc.stdout), wall, tail if proc.returncode else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--papers", type=int, default=None, help="only the first N papers")
    ap.add_argument("--questions", type=int, default=None, help="only the first N questions of each paper")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--cache", action="store_true", help="let the document KV cache be read and written")
    ap.add_argument("--set", type=Path, default=QUESTIONS, help="the question file")
    ap.add_argument("--name", default="qa")
    args = ap.parse_args()
    if not CORPUS.exists():
        raise SystemExit(f"shared corpus not found at {CORPUS}")

    papers = load_set(args.set)[: args.papers]
    rows: list[dict[str, Any]] = []
    per_paper: list[dict[str, Any]] = []
    for paper in papers:
        items = paper["questions"][: args.questions]
        results, wall, error = ask_paper(CORPUS / paper["file"], [it["q"] for it in items], args)
        per_paper.append({"paper": paper["file"], "wall_s": round(wall, 2), "answered": len(results)})
        if error:
            per_paper[-1]["error"] = error
        for k, item in enumerate(items):
            res = results[k] if k < len(results) else {}
            answer = str(res.get("answer") or "")
            timings = res.get("timings") or {}
            row = {
                "paper": paper["file"],
                "question": item["q"],
                "accept": item["accept"],
                "answer": answer,
                "correct": bool(res) and is_correct(answer, item["accept"]),
                "prompt_tokens": res.get("prompt_tokens"),
                "generated_tokens": res.get("generated_tokens"),
                "seconds": round(float(timings.get("prefill_s", 0.0)) + float(timings.get("decode_s", 0.0)), 2),
                "prefill_s": timings.get("prefill_s"),
                "cache_hit": (res.get("cache") or {}).get("hit"),
                "missing": not res,
            }
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)

    right = sum(r["correct"] for r in rows)
    accuracy = {"model": args.model, "quantize": args.quantize, "correct": right, "asked": len(rows)}
    accuracy["accuracy"] = round(right / len(rows), 4) if rows else None
    command = "python -m benchmarks.bench_qa " + " ".join(sys.argv[1:])
    scoring = " ".join(__doc__.split("Scoring rule: ")[1].split("\n\n")[0].split())
    payload = {"command": command, **cpu_info(), "scoring": scoring}
    payload.update({"accuracy": [accuracy], "papers": per_paper, "rows": rows})
    print(save(args.name, payload))
    print(json.dumps(accuracy))


if __name__ == "__main__":
    main()
