"""``longdoc ask``: questions about the inputs, the documents prefilled once for all of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from longdoc.cli import knobs, output
from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import RunState, handled
from longdoc.cli.settings import open_backend, settings
from longdoc.errors import UsageError

if TYPE_CHECKING:
    from longdoc.runtime.result import Result


@takes(
    *o.INPUTS,
    *o.MODEL_OPTIONS,
    *o.LONG_CONTEXT_OPTIONS,
    *o.DECODING_OPTIONS,
    *o.OUTPUTS,
    "no_cache",
    *o.REMOTE_OPTIONS,
    keys=knobs.keys_for("ask"),
)
def ask(
    args: Annotated[
        list[str], typer.Argument(metavar="PATH... QUESTION", help="Inputs ('-' for stdin), then the question.")
    ],
    question: Annotated[
        list[str] | None,
        typer.Option(
            "-Q",
            "--question",
            metavar="TEXT",
            rich_help_panel=o.INPUT,
            help="A question (repeatable); with it every argument is a PATH.",
        ),
    ] = None,
    questions: Annotated[
        str | None,
        typer.Option(
            "--questions",
            metavar="FILE|-",
            rich_help_panel=o.INPUT,
            help="Questions, one per line ('-': stdin); args are PATHs.",
        ),
    ] = None,
    *,
    given: o.Given,
) -> None:
    """Answer one or more questions about the inputs (the documents are prefilled once)."""
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet, json_mode=given.json_out)
    state = RunState()
    with handled(reporter, state):
        paths, asked = paths_and_questions(args, question, questions)
        run = settings(given)
        from longdoc.runtime.result import sources_of
        from longdoc.tasks.chat import ask_all, read_questions
        from longdoc.tasks.citations import extract_citations

        if questions is not None:
            asked += read_questions(questions)
        state.stage = "ingest"
        docs, ingest_s = output.read_inputs(reporter, paths, given, run.budget)
        state.stage = "load"
        session = open_backend(run, reporter)
        state.model = session.name
        state.sources = sources = sources_of(docs, session.count)
        state.stage = "generate"
        many = len(asked) > 1

        def before(q: str) -> None:
            if many and not given.json_out:
                reporter.stream(f"Q: {q}\n")

        def emit(q: str, result: Result) -> None:
            state.result = result
            result.question = q
            output.add_reading(result, ingest_s, extract_citations(result.answer, docs))
            output.finish(reporter, result)
            if many and not given.json_out:
                reporter.stream("\n")
            state.result = None

        ask_all(session, docs, asked, sources, emit, before=before, on_text=reporter.stream)


def paths_and_questions(
    args: list[str], options: list[str] | None, from_file: str | None
) -> tuple[list[str], list[str]]:
    """Split ask's arguments: with --question/--questions every argument is a path, else the last is
    the question. The --questions file is read by the caller."""
    if options or from_file is not None:
        paths, asked = list(args), list(options or [])
    else:
        if len(args) < 2:
            raise UsageError('give at least one PATH and a QUESTION, e.g. longdoc ask paper.pdf "What is proposed?"')
        *paths, last = args
        asked = [last]
    if not paths:
        raise UsageError("give at least one PATH to ask about")
    if any(not q.strip() for q in asked):
        raise UsageError("the question is empty; ask something about the documents")
    if from_file == "-" and "-" in paths:
        raise UsageError("stdin cannot be both an input ('-') and the --questions list")
    return paths, [q.strip() for q in asked]
