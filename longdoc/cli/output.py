"""What a command prints: reading the inputs (with progress on stderr), a result as JSON or as the end
of its streamed answer, and its stats line."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from longdoc import errors
from longdoc.cli.options import Given

if TYPE_CHECKING:
    from longdoc.ingest import Document, ReadBudget
    from longdoc.render import Reporter
    from longdoc.runtime.result import Citation, Result


def read_inputs(
    reporter: Reporter, paths: list[str], given: Given, budget: ReadBudget | None = None
) -> tuple[list[Document], float]:
    """The documents of ``paths`` (with the command's --pages, --include and --exclude), and the
    seconds it took to read them."""
    from longdoc import ingest

    t0 = time.perf_counter()
    reporter.status(f"reading {', '.join(paths) if len(paths) <= 3 else f'{len(paths)} inputs'}")
    with reporter.progress("reading", 0, unit="files/pages", lazy=True):
        docs = ingest.ingest_paths(
            paths,
            pages=given.pages,
            include=given.include or [],
            exclude=given.exclude or [],
            budget=budget,
            progress=lambda done, total: reporter.advance(done, total),
        )
    for doc in docs:
        for w in doc.warnings:
            reporter.warn(w)
    elapsed = time.perf_counter() - t0
    segments = sum(len(d.segments) for d in docs)
    reporter.status(f"read {len(docs)} source(s), {segments} page(s)/file(s) in {elapsed:.1f}s")
    return docs, round(elapsed, 3)


def add_reading(result: Result, ingest_s: float, citations: list[Citation]) -> None:
    """What the CLI adds to a task's result: the time it took to read the inputs, and the citations."""
    if result.timings is not None:
        result.timings.ingest_s = ingest_s
    result.citations = citations


def finish(reporter: Reporter, result: Result) -> None:
    """A result out: its JSON object (or the end of the streamed answer) and its stats; exits 130 when
    the run was interrupted."""
    if reporter.json_mode:
        reporter.json(result.to_json())
    else:
        reporter.end_answer()
    reporter.stats(result.stats_line())
    if result.interrupted:
        reporter.error("interrupted")
        raise typer.Exit(errors.EXIT_INTERRUPTED)


def each_line(reporter: Reporter, path: str, result: Result) -> None:
    """One input's result of ``summarize --each``: its JSON line (or the end of its streamed text) and
    stats; exits 130 when interrupted."""
    if reporter.json_mode:
        full = result.to_json()
        line = {
            "path": path,
            "summary": result.answer,
            "prompt_tokens": result.prompt_tokens,
            "timings": full.get("timings", {}),
            "plan": full.get("plan"),
        }
        for key in ("engine", "cache", "usage", "server"):  # where known (a full result; through --endpoint)
            if key in full:
                line[key] = full[key]
        if result.citations:
            line["citations"] = full["citations"]
        if result.interrupted:
            line["interrupted"] = True
            line["stage"] = result.stage or "generate"
        reporter.json(line)
    else:
        reporter.end_answer()
    if result.memory is not None:  # a full result (a partial one from before the model ran has no stats)
        reporter.stats(result.stats_line())
    if result.interrupted:
        reporter.error(f"interrupted while summarizing {path}")
        raise typer.Exit(errors.EXIT_INTERRUPTED)


def failed(reporter: Reporter, path: str, exc: errors.LongdocError) -> int:
    """An input of ``--each`` that could not be summarized: its error line (and JSON line); its exit code."""
    reporter.error(exc.message)
    if reporter.json_mode:
        reporter.json({"path": path, "error": exc.message})
    return exc.exit_code
