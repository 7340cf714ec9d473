"""Run the fuzz cases of cases.py through ingestion, the CLI, or Ctrl-C at random points; write figures.

    python -m tools.fuzz.run ingest --cases 10000 --seed 0        # in-process ingestion
    python -m tools.fuzz.run cli --cases 40 --seed 0              # `count`, `ask`, `summarize --each`
    python -m tools.fuzz.run sigint --runs 20 --seed 0            # SIGINT at random times, real CLI
    python -m tools.fuzz.run serve --seed 0                       # longdoc serve under load and faults

Every case must end read, or refused with exit 3 (InputError) and exactly one message line, within
the time limit; anything else is a crash or a hang. Figures (tried, crashes, hangs, slowest case)
go to benchmarks/out/fuzz.json under the mode's key; the same seed gives the same cases.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from tools.fuzz.cases import REPO, SAMPLES, make_case, remove

OUT = REPO / "benchmarks" / "out" / "fuzz.json"
# Caps used by the fuzz (lower than the defaults, so that the cap paths are exercised often and a run
# stays fast); the huge inputs of cases.py exceed them.
FUZZ_MAX_FILE = 16 * 1024**2
FUZZ_MAX_TOTAL = 64 * 1024**2


# A case's wall-clock limit is this many times its CPU limit: a blocked read uses no CPU (the wall
# clock catches it), a loop burns CPU (the CPU clock catches it, however busy the machine is).
WALL_FACTOR = 5


class Hang(BaseException):
    """Raised by the timers: a BaseException, so that no `except Exception` in the code under test hides it."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


def _arm(limit_s: float) -> None:
    signal.setitimer(signal.ITIMER_PROF, limit_s)
    signal.setitimer(signal.ITIMER_REAL, limit_s * WALL_FACTOR)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_PROF, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)


def one_line(render: Any, message: str, kind: str) -> bool:
    """Whether ``message`` prints as exactly one line through the CLI's reporter."""
    from longdoc.render import Reporter, console

    out = io.StringIO()
    reporter = Reporter()
    reporter.err = console(out)
    getattr(reporter, kind)(message)
    return out.getvalue().count("\n") == 1


def ingest_case(case: Any) -> tuple[str, str]:
    """Outcome ("read" | "refused" | "crash") and a detail line for one case, in process."""
    from longdoc.errors import InputError
    from longdoc.ingest import ReadBudget, ingest_paths
    from longdoc.prompt import format_documents

    try:
        docs = ingest_paths(case.paths, stdin=case.stdin, budget=ReadBudget(FUZZ_MAX_FILE, FUZZ_MAX_TOTAL))
    except InputError as error:
        if not one_line(None, error.message, "error"):
            return "crash", f"multi-line message: {error.message!r}"
        return "refused", error.message
    format_documents(docs).encode("utf-8")  # the prompt text must be encodable (and so tokenizable)
    for doc in docs:
        for warning in doc.warnings:
            if not one_line(None, warning, "warn"):
                return "crash", f"multi-line warning: {warning!r}"
    return "read", f"{len(docs)} document(s)"


def run_ingest(
    seed: int,
    cases: int,
    start: int,
    limit_s: float,
    quiet: bool = False,
    scale: float = 1.0,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Cases ``start .. start + cases`` of ``seed`` through ingestion, each under ``limit_s`` of CPU
    (and WALL_FACTOR times that of wall clock); figures saved to ``checkpoint`` every 500 cases."""
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    slowest = {"index": -1, "kind": "", "seconds": 0.0, "cpu_seconds": 0.0}
    previous = signal.signal(signal.SIGALRM, _alarm), signal.signal(signal.SIGPROF, _alarm)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longdoc-fuzz-") as tmp:
        work = Path(tmp)
        for index in range(start, start + cases):
            case = make_case(seed, index, work, scale)
            kinds[case.kind.split("(")[0]] += 1
            t0, cpu0 = time.perf_counter(), time.process_time()
            _arm(limit_s)
            try:
                outcome, detail = ingest_case(case)
            except Hang:
                outcome, detail = "hang", f"over {limit_s}s of CPU or {limit_s * WALL_FACTOR}s"
            except BaseException as error:  # noqa: BLE001 (a crash is what the fuzz looks for)
                outcome = "crash"
                detail = "".join(traceback.format_exception_only(error)).strip() + " @ " + _where(error)
            finally:
                _disarm()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            case.close()
            remove(work / f"case{index}")
            counts[outcome] += 1
            if cpu > slowest["cpu_seconds"]:
                slowest = {
                    "index": index,
                    "kind": case.kind,
                    "seconds": round(seconds, 3),
                    "cpu_seconds": round(cpu, 3),
                }
            if outcome in ("crash", "hang"):
                failures.append({"index": index, "kind": case.kind, "outcome": outcome, "detail": detail[:500]})
                if not quiet:
                    print(f"case {index} ({case.kind}): {outcome}: {detail[:300]}", file=sys.stderr)
            if (index - start + 1) % 500 == 0:
                if not quiet:
                    print(f"{index - start + 1}/{cases} cases, {dict(counts)}", file=sys.stderr)
                if checkpoint is not None:
                    figures = _ingest_figures(seed, start, index - start + 1, counts, kinds, failures, slowest)
                    save(ingest_key(start), {**figures, "complete": False, "time_limit_cpu_s": limit_s}, checkpoint)
    signal.signal(signal.SIGALRM, previous[0])
    signal.signal(signal.SIGPROF, previous[1])
    return {
        **_ingest_figures(seed, start, cases, counts, kinds, failures, slowest),
        "complete": True,
        "time_limit_cpu_s": limit_s,
        "time_limit_wall_s": limit_s * WALL_FACTOR,
        "total_s": round(time.perf_counter() - t_all, 1),
        "caps": {"max_file_bytes": FUZZ_MAX_FILE, "max_total_bytes": FUZZ_MAX_TOTAL},
        "scale": scale,
    }


def ingest_key(start: int) -> str:
    """Where an ingestion run's figures go: a run of part of the cases (``--start``) keeps its own."""
    return "ingest" if start == 0 else f"ingest_from_{start}"


def _ingest_figures(
    seed: int,
    start: int,
    tried: int,
    counts: Counter[str],
    kinds: Counter[str],
    failures: list[dict[str, Any]],
    slowest: dict[str, Any],
) -> dict[str, Any]:
    return {
        "seed": seed,
        "first_case": start,
        "tried": tried,
        "read": counts["read"],
        "refused": counts["refused"],
        "crashes": counts["crash"],
        "hangs": counts["hang"],
        "slowest": slowest,
        "kinds": dict(sorted(kinds.items())),
        "failures": failures[:50],
    }


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


# ---- the CLI ------------------------------------------------------------------------------------

COMMANDS = [
    ("count",),
    ("ask", "QUESTION", "--max-new-tokens", "1", "--max-context", "8192"),
    ("summarize", "--each", "--json", "--max-new-tokens", "1", "--max-context", "8192"),
]
CLI_CAPS = ("--max-file-size", "256K", "--max-total-size", "1M")


def cli_command(case: Any, rng: random.Random, model: str | None) -> list[str]:
    command = list(rng.choice(COMMANDS))
    args = [sys.executable, "-m", "longdoc", command[0]]
    if command[0] == "ask":
        args += [*case.paths, "What is this about?", *command[2:]]
    else:
        args += [*case.paths, *command[1:]]
    args += [*CLI_CAPS, "--dtype", "float32"] if command[0] != "count" else list(CLI_CAPS)
    return args + (["--model", model] if model else [])


def check_cli(proc: subprocess.CompletedProcess[bytes], each: bool) -> str | None:
    """What is wrong with a finished CLI run, or None: exit 0, 3 or 4, no traceback, one error line,
    valid UTF-8 everywhere, and with --each --json one JSON object per stdout line."""
    out, err = proc.stdout.decode("utf-8", "strict"), proc.stderr.decode("utf-8", "strict")
    if proc.returncode not in (0, 3, 4):
        return f"exit {proc.returncode}"
    if "Traceback" in out + err:
        return "traceback"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    if proc.returncode == 0 and errors:
        return "error line with exit 0"
    if proc.returncode != 0 and not each and len(errors) != 1:
        return f"{len(errors)} error lines"
    if each and "--json" in proc.args:
        for line in out.splitlines():
            json.loads(line)
    return None


def run_cli(seed: int, cases: int, start: int, limit_s: float, model: str | None) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    exits: Counter[int] = Counter()
    failures: list[dict[str, Any]] = []
    slowest = {"index": -1, "kind": "", "seconds": 0.0, "command": ""}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longdoc-fuzz-cli-") as tmp:
        work = Path(tmp)
        # the fuzz's document prefixes never land in (or hit) the user's document cache
        env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LONGDOC_DOC_CACHE_DIR": str(work / "documents")}
        for index in range(start, start + cases):
            case = make_case(seed, index, work)
            rng = random.Random(f"cli:{seed}:{index}")
            args = cli_command(case, rng, model)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(args, input=case.stdin or b"", capture_output=True, timeout=limit_s, env=env)
                problem = check_cli(proc, "--each" in args)
                exits[proc.returncode] += 1
            except subprocess.TimeoutExpired:
                problem = "hang"
            except (UnicodeDecodeError, ValueError) as error:
                problem = f"bad output: {error}"
            seconds = time.perf_counter() - t0
            case.close()
            remove(work / f"case{index}")
            outcome = "hang" if problem == "hang" else "crash" if problem else "ok"
            counts[outcome] += 1
            if seconds > slowest["seconds"]:
                slowest = {"index": index, "kind": case.kind, "seconds": round(seconds, 2), "command": args[3]}
            if problem:
                failures.append({"index": index, "kind": case.kind, "command": args[3:4], "problem": problem})
            print(f"cli case {index} {args[3]} {case.kind}: {outcome} ({seconds:.1f}s)", file=sys.stderr)
    return {
        "seed": seed,
        "first_case": start,
        "tried": cases,
        "model": model or "embedded",
        "ok": counts["ok"],
        "crashes": counts["crash"],
        "hangs": counts["hang"],
        "exit_codes": {str(k): v for k, v in sorted(exits.items())},
        "time_limit_s": limit_s,
        "slowest": slowest,
        "total_s": round(time.perf_counter() - t_all, 1),
        "failures": failures,
    }


# ---- Ctrl-C at random points --------------------------------------------------------------------

SIGINT_COMMANDS = [
    ["ask", str(SAMPLES / "report.pdf"), "What was the measured throughput of the Heron pump?", "--json"],
    ["ask", str(SAMPLES / "notes.md"), "Describe the eviction policy in detail."],
    ["summarize", "--each", "--json", str(SAMPLES / "notes.md"), str(SAMPLES / "report.pdf")],
    ["summarize", str(SAMPLES / "report.pdf"), "--json", "--max-context", "480"],  # map-reduce
    ["ask", str(SAMPLES / "report.pdf"), "-Q", "Who wrote it?", "-Q", "What is the TTL?", "--json"],
    ["chat", str(SAMPLES / "notes.md"), "--json"],  # questions on stdin: CHAT_QUESTIONS
]
CHAT_QUESTIONS = b"Which TCP port does Lighthouse use?\nWhy that one?\n"


def _default_sigint() -> None:
    """Children get the default SIGINT action: a harness started in the background of a shell (`&`,
    nohup) ignores SIGINT, ignored signals are inherited, and Python leaves an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_sigint(seed: int, runs: int, max_delay_s: float, model: str | None) -> dict[str, Any]:
    """SIGINT each run once at a random time; it must exit 130 (or 0 if it finished first), print no
    traceback, keep what it streamed, and with --json print valid JSON marked interrupted."""
    rng = random.Random(f"sigint:{seed}")
    results: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    stages: Counter[str] = Counter()
    # one document cache for the whole harness (not the user's): later runs load what earlier ones saved,
    # so Ctrl-C also lands while an entry is loaded or written
    docs_cache = tempfile.TemporaryDirectory(prefix="longdoc-fuzz-sigint-")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LONGDOC_DOC_CACHE_DIR": docs_cache.name}
    for run in range(runs):
        command = rng.choice(SIGINT_COMMANDS)
        delay = round(rng.uniform(0.2, max_delay_s), 2)
        args = [sys.executable, "-m", "longdoc", *command, "--max-new-tokens", "24", "--dtype", "float32"]
        args += ["--model", model] if model else []
        questions = Path(docs_cache.name) / "questions.txt"
        questions.write_bytes(CHAT_QUESTIONS if command[0] == "chat" else b"")
        with questions.open("rb") as stdin:
            proc = subprocess.Popen(
                args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=_default_sigint
            )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            out_b, err_b = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results["hang"] += 1
            failures.append({"run": run, "delay_s": delay, "problem": "hang"})
            print(f"sigint run {run} {command[0]} at {delay}s: hang", file=sys.stderr)
            continue
        out, err = out_b.decode("utf-8", "replace"), err_b.decode("utf-8", "replace")
        problem = None
        if proc.returncode == -signal.SIGINT:
            # the signal came before Python had set up its handler: the process ends as killed by
            # SIGINT, which a shell reports as 130 too; nothing can be printed that early
            results["killed_at_startup"] += 1
            print(f"sigint run {run} {command[0]} at {delay}s: killed by SIGINT at startup", file=sys.stderr)
            continue
        if proc.returncode not in (0, 130):
            problem = f"exit {proc.returncode}"
        elif "Traceback" in out + err:
            problem = "traceback"
        elif "--json" in command:
            lines = [json.loads(line) for line in out.splitlines() if line.strip()]
            if proc.returncode == 130 and not (lines and lines[-1].get("interrupted") is True):
                problem = "no partial JSON marked interrupted"
            for line in lines:
                if line.get("interrupted"):
                    stages[line.get("stage", "generate")] += 1
        elif proc.returncode == 130 and "interrupted" not in err:
            problem = "no 'interrupted' message"
        outcome = "problem" if problem else "finished" if proc.returncode == 0 else "interrupted"
        results[outcome] += 1
        if problem:
            failures.append(
                {"run": run, "delay_s": delay, "command": command[0], "problem": problem, "stderr": err[-600:]}
            )
        print(f"sigint run {run} {command[0]} at {delay}s: exit {proc.returncode} {problem or ''}", file=sys.stderr)
    docs_cache.cleanup()
    return {
        "seed": seed,
        "runs": runs,
        "model": model or "embedded",
        "interrupted_exit_130": results["interrupted"],
        "finished_before_signal": results["finished"],
        "killed_by_sigint_at_startup": results["killed_at_startup"],
        "problems": results["problem"],
        "hangs": results["hang"],
        "json_stages": dict(stages),
        "failures": failures,
    }


def save(key: str, figures: dict[str, Any], out: Path) -> None:
    data = json.loads(out.read_text()) if out.exists() else {}
    data[key] = figures
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["ingest", "cli", "sigint", "serve"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0, help="first case index (to resume or split a run)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds per case: CPU for ingestion (60; wall 5x), wall for the CLI (180)",
    )
    parser.add_argument("--model", default=None, help="CLI/SIGINT: --model for longdoc (default: embedded)")
    parser.add_argument("--runs", type=int, default=50, help="SIGINT: how many runs")
    parser.add_argument("--max-delay", type=float, default=12.0, help="SIGINT: latest signal, in seconds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.mode == "serve":  # its own harness and figures (benchmarks/out/serve_faults.json unless --out)
        from tools.fuzz import serve_faults

        return serve_faults.main(["--seed", str(args.seed)] + (["--out", str(args.out)] if args.out != OUT else []))
    if args.mode == "ingest":
        figures = run_ingest(args.seed, args.cases, args.start, args.time_limit or 60.0, checkpoint=args.out)
    elif args.mode == "cli":
        figures = run_cli(args.seed, args.cases, args.start, args.time_limit or 180.0, args.model)
    else:
        figures = run_sigint(args.seed, args.runs, args.max_delay, args.model)
    if args.mode == "ingest":
        key = ingest_key(args.start)
    else:  # runs with --model (a tiny local model, say) are kept apart from those with the embedded one
        key = args.mode if args.model is None else f"{args.mode}_local_model"
    save(key, figures, args.out)
    summary = {k: v for k, v in figures.items() if k not in ("failures", "kinds")}
    print(json.dumps(summary), file=sys.stderr)
    bad = figures.get("crashes", 0) + figures.get("hangs", 0) + figures.get("problems", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
