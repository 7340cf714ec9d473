"""The model cache under faults, with processes (not threads) and a tiny fake conversion:

    python -m tools.fuzz.cache_faults --kills 20 --racers 2 --seed 0

* ``kill -9`` a converting process at a random moment, N times, in one cache: the next run must get
  a verified model, and no half-written conversion may ever be taken for a good one;
* several processes converting the same model at once: one conversion, every process answers;
* a lock held by another process: the waiter gives up after LONGDOC_LOCK_TIMEOUT with a message.

The conversion is the real code path (hashing, lock, temp dir, manifest, atomic rename) with only the
GGUF dequantization replaced by a slow writer of a tiny model (``save_tiny_qwen2`` of tests/helpers.py).
Figures go to benchmarks/out/fuzz.json under "cache".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.fuzz.run import OUT, save

# The child: convert (slowly, in steps, so a kill can land anywhere) and report the verified folder.
CHILD = r"""
import json, sys, time
from pathlib import Path
from longdoc import models
from longdoc.errors import ModelError
from longdoc.models import convert
from tests.helpers import save_tiny_qwen2

def slow_convert(gguf_path, out_dir, progress):
    with open(sys.argv[2], "a") as log:
        log.write("convert\n")
    for step in range(5):          # the kill may land between any two of these writes
        (out_dir / f"scratch-{step}.bin").write_bytes(b"x" * 100_000)
        time.sleep(float(sys.argv[3]) / 5)
    for step in range(5):
        (out_dir / f"scratch-{step}.bin").unlink()
    save_tiny_qwen2(out_dir)

convert._convert_gguf = slow_convert
try:
    folder = models.ensure_converted(models.resolve_model(sys.argv[1]), progress=lambda m: print(m, file=sys.stderr))
except ModelError as error:
    print(json.dumps({"error": error.message}))
    sys.exit(3)
print(json.dumps({"folder": str(folder), "verified": models.check_conversion(folder) is None}))
"""


def _gguf(path: Path) -> str:
    from tests.helpers import write_gguf_header

    return str(write_gguf_header(path, "qwen2"))


def _child(gguf: str, log: Path, delay: float, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, gguf, str(log), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kills(n: int, rng: random.Random, work: Path) -> dict[str, Any]:
    """N kill -9 at random moments of a conversion, then one undisturbed run."""
    env = {**os.environ, "LONGDOC_CACHE_DIR": str(work / "cache-kills"), "PYTHONPATH": os.getcwd()}
    gguf, log = _gguf(work / "tiny-kill.gguf"), work / "kills.log"
    killed_at, reached_end = [], 0
    for _ in range(n):
        started = log.read_text().count("convert") if log.exists() else 0
        child = _child(gguf, log, 2.0, env)
        # wait for this child's conversion to start (imports take seconds on a busy machine), then kill
        # it at a random moment of the conversion (2 s of writes, then the model and the manifest)
        deadline = time.monotonic() + 300
        while child.poll() is None and time.monotonic() < deadline:
            if log.exists() and log.read_text().count("convert") > started:
                break
            time.sleep(0.05)
        delay = rng.uniform(0.0, 2.6)
        time.sleep(delay)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed_at.append(round(delay, 2))
        else:
            reached_end += 1
        child.communicate()
    final = _child(gguf, log, 0.2, env)
    out, err = final.communicate(timeout=300)
    result = json.loads(out.strip().splitlines()[-1])
    models_dir = work / "cache-kills" / "models"
    leftovers = [p.name for p in models_dir.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]
    return {
        "kills": len(killed_at),
        "finished_before_kill": reached_end,
        "kill_times_after_conversion_start_s": killed_at,
        "conversions_started": log.read_text().count("convert") if log.exists() else 0,
        "final_exit": final.returncode,
        "final_verified": result.get("verified") is True,
        "leftover_temp_dirs": leftovers,
    }


def race(n: int, work: Path) -> dict[str, Any]:
    """N processes converting the same model at once."""
    env = {**os.environ, "LONGDOC_CACHE_DIR": str(work / "cache-race"), "PYTHONPATH": os.getcwd()}
    gguf, log = _gguf(work / "tiny-race.gguf"), work / "race.log"
    children = [_child(gguf, log, 2.0, env) for _ in range(n)]
    outputs = [c.communicate(timeout=600) for c in children]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    waited = sum("waiting up to" in err for _, err in outputs)
    return {
        "processes": n,
        "conversions": log.read_text().count("convert"),
        "all_answered": all(a.get("verified") for a in answers) and len({a["folder"] for a in answers}) == 1,
        "exits": [c.returncode for c in children],
        "said_waiting": waited,
    }


def lock_timeout(work: Path) -> dict[str, Any]:
    """A lock held elsewhere: the waiter gives up after LONGDOC_LOCK_TIMEOUT seconds, with a message."""
    import filelock

    from longdoc import models
    from longdoc.models import convert

    cache = work / "cache-lock"
    env = {**os.environ, "LONGDOC_CACHE_DIR": str(cache), "PYTHONPATH": os.getcwd(), "LONGDOC_LOCK_TIMEOUT": "3"}
    gguf = _gguf(work / "tiny-lock.gguf")
    os.environ["LONGDOC_CACHE_DIR"] = str(cache)
    source = models.resolve_model(gguf)
    target = models.converted_path(source, convert._source_sha256(source, None))
    target.parent.mkdir(parents=True, exist_ok=True)
    holder = filelock.FileLock(str(target.parent / f".{target.name}.lock"))
    holder.acquire()
    try:
        t0 = time.perf_counter()
        child = _child(gguf, work / "lock.log", 0.2, env)
        out, err = child.communicate(timeout=120)
        waited = time.perf_counter() - t0
    finally:
        holder.release()
    message = json.loads(out.strip().splitlines()[-1]).get("error", "")
    return {
        "exit": child.returncode,
        "waited_s": round(waited, 1),
        "message": message,
        "said_waiting": "waiting" in err,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--racers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="longdoc-cache-faults-") as tmp:
        work = Path(tmp)
        figures = {
            "seed": args.seed,
            "kill9": kills(args.kills, random.Random(args.seed), work),
            "race": race(args.racers, work),
            "lock_timeout": lock_timeout(work),
        }
    save("cache", figures, args.out)
    print(json.dumps(figures, indent=1))
    ok = (
        figures["kill9"]["final_verified"]
        and figures["race"]["conversions"] == 1
        and figures["race"]["all_answered"]
        and figures["lock_timeout"]["exit"] == 3
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
