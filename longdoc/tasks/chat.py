"""Several questions over one set of documents: ``ask`` with more than one question, and ``chat``.

The backend shares the documents' prefix: locally one ``Conversation`` holds it. ``ask`` answers each
question from the prefix alone; ``chat`` keeps every turn in context, so the KV cache grows with the
conversation and DCA and recycled decoding run over all of it. Questions come from a file, a pipe,
or a terminal with line editing and history.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from longdoc.errors import UsageError
from longdoc.ingest import Document
from longdoc.prompt import ask_prompt
from longdoc.runtime.backend import Backend, OnText
from longdoc.runtime.result import Result, Source

HISTORY_LINES = 1000

# Receives each question and its result (and may end the run, e.g. on an interrupted answer).
Emit = Callable[[str, Result], None]


def read_questions(source: str, stdin: TextIO | None = None) -> list[str]:
    """Questions from FILE (or '-': stdin), one per line; blank lines are skipped."""
    try:
        if source == "-":
            text = (stdin or sys.stdin).read()
        else:
            text = Path(source).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read --questions {source}: {exc.strerror or exc}") from None
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise UsageError(f"--questions {source} holds no question")
    return questions


def ask_all(
    session: Backend,
    docs: list[Document],
    questions: list[str],
    sources: list[Source],
    emit: Emit,
    before: Callable[[str], None] | None = None,
    on_text: OnText | None = None,
) -> None:
    """Answer each question from the documents' prefix, prefilled (or loaded) once; ``emit`` gets
    each question and its result (and may end the run, e.g. on an interrupted answer)."""
    prompts = [ask_prompt(session.tokenizer, docs, q) for q in questions]
    answer = session.answerer(prompts, sources)
    for question, prompt in zip(questions, prompts, strict=True):
        if before:
            before(question)
        try:
            result = answer(prompt, on_text)
        except KeyboardInterrupt:  # between the steps of an answer: the question still gets its result
            result = session.empty(sources)
            result.interrupted = True
        emit(question, result)


def terminal_questions(history: Path | None) -> Iterator[str]:
    """Questions typed at a terminal, with line editing and history (readline). Ctrl-C clears the
    line; Ctrl-D (or 'exit') leaves."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input()
        readline = None  # type: ignore[assignment]
    if readline is not None and history is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
        readline.set_history_length(HISTORY_LINES)
    try:
        while True:
            try:
                line = input("you> ")
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            except EOFError:
                print(file=sys.stderr)
                return
            if line.strip() in ("exit", "quit"):
                return
            if line.strip():
                yield line.strip()
    finally:
        if readline is not None and history is not None:
            with contextlib.suppress(OSError):
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history)


def piped_questions(stream: TextIO) -> Iterator[str]:
    """One question per line of a pipe or file; blank lines are skipped."""
    for line in stream:
        if line.strip():
            yield line.strip()
