"""Summary quality as a figure: of each page's own facts, how many reach a map-reduce summary.

Each document is summarized with ``--max-context`` small enough that every page is mapped on its
own and the partial summaries are then combined. A page's facts are its distinctive tokens: numbers
and capitalized terms (HX-3, RoPE, 42.7) that occur on that page and on no other page of the
document. A page counts as recalled when the final summary contains at least one of them. The same
documents can be run with another revision of longdoc (``--before REV``, from a temporary git
worktree) in the same invocation, so prompt changes are compared side by side.

    python -m benchmarks.bench_recall --before 1236822
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import CORPUS, REPO, save
from longdoc.ingest import ingest_paths

SAMPLES = REPO / "sample_docs"
# (path, pages, --max-context, --max-new-tokens): the sample report and the first pages of three corpus
# papers, each with a context just large enough for one page per map step
DOCS = [
    (SAMPLES / "report.pdf", "1-3", 480, 96),
    (CORPUS / "chunkllama.pdf", "1-4", 1536, 160),
    (CORPUS / "longlora.pdf", "1-4", 1536, 160),
    (CORPUS / "yarn.pdf", "1-4", 1536, 160),
]
TERM = re.compile(r"(?<![\w.])(?:\d+(?:[.,]\d+)+%?|\d{2,}%?|[A-Za-z]*[A-Z][a-z]*[A-Z0-9][\w-]*)(?![\w])")


def page_facts(path: Path, pages: str) -> list[set[str]]:
    """Per selected page, the terms found on it and on no other selected page of the document."""
    doc = ingest_paths([str(path)], pages=pages)[0]
    # figure axes extract as runs of digits ("01234567"): not facts anyone would state
    terms = [{t for t in TERM.findall(text) if not (t.isdigit() and len(t) > 6)} for _, text in doc.segments]
    return [t - set().union(*(o for j, o in enumerate(terms) if j != i)) for i, t in enumerate(terms)]


def summarize(path: Path, pages: str, context: int, new: int, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    args = [str(path), "--pages", pages, "--max-context", str(context), "--max-new-tokens", str(new)]
    cmd = [sys.executable, "-m", "longdoc", "summarize", *args, "--json", "--quiet", "--no-recycle"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=pythonpath or REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else proc.returncode}
    data = json.loads(proc.stdout)
    return {"summary": data["answer"], "plan": data.get("plan"), "wall_s": round(time.perf_counter() - t0, 1)}


def score(summary: str, facts: list[set[str]]) -> dict:
    hits = [sorted(t for t in page if t in summary) for page in facts]
    scored = [i for i, page in enumerate(facts) if page]
    return {
        "pages_recalled": sum(1 for i in scored if hits[i]),
        "pages": len(scored),
        "terms_recalled": sum(len(h) for h in hits),
        "terms": sum(len(p) for p in facts),
        "hits": hits,
        "filler": bool(re.search(r"\bthis (part|summary|section) of the (input|text|document)", summary, re.I)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=None, help="also run this git revision (e.g. the last landed commit)")
    ap.add_argument("--only", default=None, help="comma-separated document names (default: all)")
    ap.add_argument("--name", default="recall")
    a = ap.parse_args()
    variants: dict[str, str | None] = {"current": None}
    worktree = None
    if a.before:
        worktree = tempfile.mkdtemp(prefix="longdoc-before-")
        subprocess.run(["git", "worktree", "add", "--detach", worktree, a.before], cwd=REPO, check=True)
        variants = {f"before ({a.before})": worktree, **variants}
    rows = []
    try:
        for path, pages, context, new in DOCS:
            if not path.exists() or (a.only and path.name not in a.only.split(",")):
                continue
            facts = page_facts(path, pages)
            row: dict = {"doc": path.name, "pages": pages, "context": context, "new": new}
            for name, pythonpath in variants.items():
                run = summarize(path, pages, context, new, pythonpath)
                row[name] = {**run, **(score(run["summary"], facts) if "summary" in run else {})}
                print(path.name, name, {k: v for k, v in row[name].items() if k != "summary"}, file=sys.stderr)
            rows.append(row)
    finally:
        if worktree:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=REPO, check=False)
    totals = {
        name: {
            key: sum(r[name].get(key, 0) for r in rows)
            for key in ("pages_recalled", "pages", "terms_recalled", "terms", "filler")
        }
        for name in variants
    }
    print(json.dumps(totals), file=sys.stderr)
    print(save(a.name, {"totals": totals, "rows": rows}))


if __name__ == "__main__":
    main()
