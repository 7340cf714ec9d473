"""Helpers shared by the benchmark scripts: real prompt text from the shared corpus, subprocess runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
