"""``longdoc summarize``: the inputs together, or one by one (``--each``, cli.batch); map-reduce when
they do not fit at once."""

from __future__ import annotations

from typing import Annotated

import typer

from longdoc import errors
from longdoc.cli import knobs
from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import RunState, handled
from longdoc.cli.settings import settings
from longdoc.errors import UsageError

# --style's values (longdoc.prompt.summary_instructions checks them) and default.
STYLES = "brief|detailed|bullets"
DEFAULT_STYLE = "brief"


@takes(
    *o.INPUTS,
    *o.MODEL_OPTIONS,
    *o.LONG_CONTEXT_OPTIONS,
    *o.DECODING_OPTIONS,
    *o.OUTPUTS,
    "no_cache",
    *o.REMOTE_OPTIONS,
    "concurrency",
    keys=knobs.keys_for("summarize"),
)
def summarize(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH...", help="Inputs ('-' for stdin).")] = None,
    style: Annotated[
        str, typer.Option("--style", metavar=STYLES, rich_help_panel=o.OUTPUT, help="How the summary reads.")
    ] = DEFAULT_STYLE,
    max_words: Annotated[
        int | None,
        typer.Option("--max-words", metavar="N", rich_help_panel=o.OUTPUT, help="Word limit for the summary."),
    ] = None,
    each: Annotated[
        bool,
        typer.Option(
            "--each", metavar=o.FLAG, rich_help_panel=o.INPUT, help="One summary per input (JSONL with --json)."
        ),
    ] = False,
    paths_from: Annotated[
        str | None,
        typer.Option(
            "--paths-from",
            metavar="FILE|-",
            rich_help_panel=o.INPUT,
            help="Also read input paths from FILE ('-': stdin), one per line.",
        ),
    ] = None,
    null: Annotated[
        bool,
        typer.Option(
            "-0",
            "--null",
            metavar=o.FLAG,
            rich_help_panel=o.INPUT,
            help="--paths-from input is NUL-separated (find -print0).",
        ),
    ] = False,
    *,
    given: o.Given,
) -> None:
    """Summarize the inputs (together, or one by one with --each); map-reduce when they do not fit at once."""
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet, json_mode=given.json_out)
    state = RunState()
    # --each: Ctrl-C within an input gives that input its line (Summaries.one_of_each); before the first
    # input starts, the command-wide handler prints the partial result of ``state``
    with handled(reporter, state):
        from longdoc.prompt import summary_instructions

        if null and paths_from is None:
            raise UsageError("-0/--null applies to --paths-from; give --paths-from FILE or -")
        if paths_from == "-" and "-" in (paths or []):
            raise UsageError("stdin cannot be both an input ('-') and the --paths-from list")
        summary_instructions(style, max_words)  # a bad --style is a usage error before any work
        if max_words is not None and max_words < 1:
            raise UsageError("--max-words must be at least 1")
        run = settings(given)
        from longdoc.tasks.summarize import read_paths_from

        paths = list(paths or []) + (read_paths_from(paths_from, null) if paths_from is not None else [])
        if not paths:
            raise UsageError("give at least one PATH to summarize ('-' reads stdin), or --paths-from FILE")
        from longdoc.cli.batch import Summaries

        summaries = Summaries(reporter, run, given, style, max_words)
        if not each:
            summaries.together(paths, state)
            return
        failures = summaries.each(paths)
        if failures:
            # any unreadable input: 3; only inputs that did not fit: 4 (README "Exit codes")
            raise typer.Exit(errors.EXIT_INPUT if errors.EXIT_INPUT in failures else errors.EXIT_DOES_NOT_FIT)
