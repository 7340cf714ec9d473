"""``summarize --each`` over the five corpus papers: in process vs through ``longdoc serve``
(``--endpoint``) with ``--concurrency 1`` and ``2``, in one run, with the server's overhead per request.

The document KV cache is warmed first: a local pass prefills each paper's prompt prefix and saves it, and
the server (same model and settings, same cache folder) finds the same entries, since ``--endpoint``
marks where the documents end. Every timed variant then loads each prefix from the cache, so they
differ by what runs around the model, and the run stays affordable on 2 cores. Each variant is one
``longdoc summarize --each --json`` process, timed whole (its start-up, reading the PDFs and, in process,
loading the model included). The server's overhead of a request is the client's time for it minus the
server's own prefill and decode time (its ``server.timings``): HTTP, queueing, templating, tokenizing.

    python -m benchmarks.bench_serve --new 64 --pages 1-5

``--pages`` keeps the warm-up affordable: the five whole papers are ~91K tokens, about 15 minutes of
prefill on 2 CPU cores before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CORPUS, REPO, save


def summarize_each(pdfs: list[str], new: int, env: dict[str, str], extra: list[str]) -> dict[str, Any]:
    """One ``longdoc summarize --each --json`` process: its wall time and its JSON lines."""
    cmd = [sys.executable, "-m", "longdoc", "summarize", "--each", "--json", "--max-new-tokens", str(new)]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *extra, *pdfs], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"longdoc summarize {' '.join(extra)} failed ({proc.returncode}): {proc.stderr[-800:]}")
    return {"wall_s": round(wall, 2), "lines": [json.loads(line) for line in proc.stdout.splitlines()]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], log: Path, concurrency: int) -> tuple[subprocess.Popen[bytes], str]:
    """``longdoc serve`` in its own process; returns it and its URL once it serves (its log in a file, so
    that a full pipe never blocks it)."""
    port = free_port()
    # the warm-up's entries are the user's own: a private served cache would never see them
    cmd = [sys.executable, "-m", "longdoc", "serve", "--port", str(port), "--concurrency", str(concurrency)]
    cmd += ["--doc-cache", "shared"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    end = time.monotonic() + 600
    while "serving" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"longdoc serve did not start: {log.read_text(errors='replace')[-800:]}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}/v1"


def row(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """A variant's figures: wall time, per-paper time to first token, and (through the server) its overhead."""
    lines = run["lines"]
    out: dict[str, Any] = {
        "variant": name,
        "wall_s": run["wall_s"],
        "papers": len(lines),
        "ttft_s": [line["timings"]["ttft_s"] for line in lines],
        "summaries": [line["summary"][:120] for line in lines],
    }
    served = [line for line in lines if "server" in line]
    if served:
        own = [line["server"]["timings"]["prefill_s"] + line["server"]["timings"]["decode_s"] for line in served]
        overhead = [line["timings"]["request_s"] - s for line, s in zip(served, own, strict=True)]
        out["overhead_s"] = [round(x, 3) for x in overhead]
        out["overhead_mean_s"] = round(statistics.mean(overhead), 3)
        out["server_cache_hits"] = sum(bool(line["server"].get("cache", {}).get("hit")) for line in served)
    else:
        out["cache_hits"] = sum(bool(line.get("cache", {}).get("hit")) for line in lines)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=64, help="--max-new-tokens of every summary")
    parser.add_argument("--pages", default=None, help="--pages of every paper (default: all)")
    parser.add_argument("--name", default="serve")
    args = parser.parse_args(argv)
    pdfs = sorted(str(p) for p in CORPUS.glob("*.pdf"))
    if not pdfs:
        raise SystemExit(f"no PDFs in {CORPUS}")
    with tempfile.TemporaryDirectory(prefix="longdoc-bench-serve-") as tmp:
        # an empty document cache, shared by every client process and the server
        env = {**os.environ, "LONGDOC_DOC_CACHE_DIR": str(Path(tmp) / "documents")}
        pages = ["--pages", args.pages] if args.pages else []
        cold = summarize_each(pdfs, args.new, env, pages)
        print(f"warm-up (cold document cache, in process): {cold['wall_s']} s", file=sys.stderr)
        server, url = start_server(env, Path(tmp) / "serve.log", concurrency=2)
        try:
            endpoint = [*pages, "--endpoint", url]
            runs = {
                "in process": summarize_each(pdfs, args.new, env, pages),
                "--endpoint, --concurrency 1": summarize_each(pdfs, args.new, env, endpoint),
                "--endpoint, --concurrency 2": summarize_each(pdfs, args.new, env, [*endpoint, "--concurrency", "2"]),
            }
        finally:
            server.terminate()
            server.wait(60)
    rows = [row(name, run) for name, run in runs.items()]
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "summaries"}), file=sys.stderr)
    same = len({tuple(r["summaries"]) for r in rows}) == 1
    payload = {
        "rows": rows,
        "cold_wall_s": cold["wall_s"],
        "prompt_tokens": [line["prompt_tokens"] for line in cold["lines"]],
        "papers": [Path(p).name for p in pdfs],
        "pages": args.pages,
        "new_tokens": args.new,
        "server_concurrency": 2,
        "same_summaries": same,
        "cpu": _cpu(),
    }
    print(save(args.name, payload))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
