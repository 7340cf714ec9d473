"""``longdoc count``: tokens per source (the model's tokenizer and a cl100k estimate) and whether the
inputs fit, checked by the same plan a run makes (no weights load)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated

import typer

from longdoc import errors
from longdoc.cli import options as o
from longdoc.cli import output
from longdoc.cli.command import takes
from longdoc.cli.interrupts import handled
from longdoc.cli.settings import settings
from longdoc.errors import UsageError


@dataclass(frozen=True)
class Counted:
    """One source's counts."""

    path: str
    kind: str
    pages: int | None
    tokens: int
    cl100k: int


@dataclass(frozen=True)
class Count:
    """What ``count`` reports (its JSON object, field by field); ``dca`` and ``max_context`` only when
    the prompt fits."""

    sources: list[Counted]
    total_tokens: int
    prompt_tokens: int
    max_new_tokens: int
    model: str
    fits: bool
    reason: str = ""
    dca: bool | None = field(default=None, metadata={"omit": True})
    max_context: int | None = field(default=None, metadata={"omit": True})


@takes(
    *o.INPUTS,
    "model",
    "device",
    "dtype",
    "dca",
    "max_context",
    "max_new_tokens",
    *o.OUTPUTS,
)
def count(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH...", help="Inputs ('-' for stdin).")] = None,
    *,
    given: o.Given,
) -> None:
    """Per-source token counts (model tokenizer and cl100k estimate) and whether they fit."""
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet, json_mode=given.json_out)
    with handled(reporter):
        from longdoc.prompt import ask_prompt
        from longdoc.runtime import local
        from longdoc.runtime.result import json_of, sources_of
        from longdoc.tokens import estimate_cl100k

        if not paths:
            raise UsageError("give at least one PATH to count")
        run = settings(given)
        docs, _ = output.read_inputs(reporter, paths, given, run.budget)
        session = local.LocalBackend(run.cfg, reporter)
        rows = [
            Counted(s.path, s.kind, s.pages, s.tokens, estimate_cl100k(doc.text))
            for s, doc in zip(sources_of(docs, session.count), docs, strict=True)
        ]
        prompt_tokens = session.count(ask_prompt(session.tokenizer, docs, "?"))
        totals = (sum(r.tokens for r in rows), prompt_tokens, given.max_new_tokens, session.info.name)
        try:
            plan = session.plan(prompt_tokens)
            report = Count(rows, *totals, fits=True, dca=plan.layout is not None, max_context=plan.max_context)
        except errors.DoesNotFitError as exc:
            report = Count(rows, *totals, fits=False, reason=exc.message)
        if given.json_out:
            reporter.json(json_of(report))
        else:
            _print(report)
        if not report.fits:
            raise typer.Exit(errors.EXIT_DOES_NOT_FIT)


def _print(report: Count) -> None:
    from rich.table import Table

    from longdoc.render import console, plain

    table = Table("source", "kind", "pages", "tokens", "cl100k")
    for r in report.sources:  # paths as Text: never markup, never cut (the console is unbounded off a terminal)
        table.add_row(plain(r.path), r.kind, str(r.pages or ""), f"{r.tokens:,}", f"{r.cl100k:,}")
    table.add_row("total", "", "", f"{report.total_tokens:,}", f"{sum(r.cl100k for r in report.sources):,}")
    out = console(sys.stdout)
    out.print(table)
    if report.fits:
        mode = "with DCA" if report.dca else "with plain attention"
        out.print(
            f"prompt {report.prompt_tokens:,} tokens + {report.max_new_tokens} answer tokens: fits ({mode}, "
            f"limit {report.max_context:,})"
        )
    else:
        out.print(plain(f"does not fit: {report.reason}"))
