"""``longdoc chat``: questions about the same documents, each answered in the context of the earlier ones."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from longdoc import errors
from longdoc.cli import knobs, output
from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import RunState, handled
from longdoc.cli.settings import open_backend, settings
from longdoc.errors import UsageError


@takes(
    *o.INPUTS,
    *o.MODEL_OPTIONS,
    *o.LONG_CONTEXT_OPTIONS,
    *o.DECODING_OPTIONS,
    *o.OUTPUTS,
    "no_cache",
    *o.REMOTE_OPTIONS,
    keys=knobs.keys_for("chat"),
)
def chat(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH...", help="Inputs ('-' for stdin).")] = None,
    *,
    given: o.Given,
) -> None:
    """Questions about the same documents, each answer in context of the earlier ones.

    In a terminal: line editing and history; Ctrl-C stops an answer, Ctrl-D leaves. Otherwise one
    question per line of stdin (JSON lines with --json).
    """
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet, json_mode=given.json_out)
    state = RunState()
    with handled(reporter, state):
        if not paths:
            raise UsageError("give at least one PATH to chat about")
        interactive = sys.stdin.isatty()
        if "-" in paths and not interactive:
            raise UsageError("chat reads its questions from stdin; pass the documents as files, not '-'")
        run = settings(given)
        from longdoc.runtime.result import sources_of
        from longdoc.tasks.chat import piped_questions, terminal_questions
        from longdoc.tasks.citations import extract_citations

        state.stage = "ingest"
        docs, ingest_s = output.read_inputs(reporter, paths, given, run.budget)
        state.stage = "load"
        session = open_backend(run, reporter)
        state.model = session.name
        state.sources = sources = sources_of(docs, session.count)
        conversation = session.chat(docs, sources)
        conversation.prepare()
        state.stage = "generate"
        if interactive:
            from longdoc.store import cache_dir

            reporter.status("ready: ask about the documents (Ctrl-D to leave)")
            asked = terminal_questions(cache_dir() / "chat_history")
        else:
            asked = piped_questions(sys.stdin)
        for q in asked:
            try:
                result = conversation.turn(q, on_text=reporter.stream)
            except errors.DoesNotFitError as exc:
                reporter.error(exc.message)
                raise typer.Exit(exc.exit_code) from None
            output.add_reading(result, ingest_s, extract_citations(result.answer, docs))
            if interactive and result.interrupted:  # Ctrl-C in a terminal stops the answer, not the chat
                reporter.end_answer()
                reporter.status("(stopped)")
                continue
            state.result = result
            output.finish(reporter, result)
            state.result = None
