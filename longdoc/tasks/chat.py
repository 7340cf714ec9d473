"""Several questions over one prefill: ``ask`` with more than one question, and ``chat``.

Both keep the documents' prefix in one ``pipeline.Conversation``. ``ask`` answers each question
from the prefix alone; ``chat`` keeps every turn in context, so the KV cache grows with the
conversation and DCA and recycled decoding run over all of it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from longdoc.errors import UsageError
from longdoc.ingest import Document
from longdoc.prompt import Prompt, ask_prompt, follow_up
from longdoc.runtime.local import Conversation, Session, run_prompt, split_ids
from longdoc.runtime.remote import RemoteChat, RemoteSession
from longdoc.tasks.summarize import empty_result

# Room a chat plans for beyond the documents and the first question (it grows further on demand, up
# to the context limit): it decides DCA up front, because the prefix's keys depend on it.
CHAT_RESERVE = 4096
# Tokens planned for a chat's first question before it is known (longer ones grow the store).
QUESTION_ROOM = 256
HISTORY_LINES = 1000

Emit = Callable[[str, dict[str, Any]], None]


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
    session: Session,
    docs: list[Document],
    questions: list[str],
    sources: list[dict[str, Any]],
    emit: Emit,
    before: Callable[[str], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> None:
    """Answer each question from the documents' prefix, prefilled (or loaded) once; ``emit`` gets
    each question and its result (and may end the run, e.g. on an interrupted answer)."""
    prompts = [ask_prompt(session.tokenizer, docs, q) for q in questions]
    answer = _prefix_sharing(session, prompts, sources)
    for question, prompt in zip(questions, prompts, strict=True):
        if before:
            before(question)
        try:
            result = answer(prompt, on_text)
        except KeyboardInterrupt:  # between the steps of an answer: the question still gets its result
            result = {**empty_result(session, sources), "interrupted": True}
        emit(question, result)


def _prefix_sharing(
    session: Session, prompts: list[Prompt], sources: list[dict[str, Any]]
) -> Callable[[Prompt, Callable[[str], None] | None], dict[str, Any]]:
    """How each of ``prompts`` (one document prefix, several questions) gets its answer: from one
    ``Conversation`` that holds the prefix; through ``--endpoint`` one request each, the server
    sharing the prefix between them."""
    if isinstance(session, RemoteSession):
        return lambda prompt, on_text: session.run_prompt(prompt, sources, on_text)
    splits = [split_ids(session, p) for p in prompts]
    prefix = splits[0][0]
    conversation = Conversation(session, prefix, max(len(a) + len(b) for a, b in splits), sources)

    def answer(prompt: Prompt, on_text: Callable[[str], None] | None) -> dict[str, Any]:
        head, rest = split_ids(session, prompt)  # the prefix's ids are remembered: only the question is tokenized
        if head == prefix:
            return conversation.answer(rest, sources, on_text)
        # a user template that puts the question before the documents: nothing to share
        return run_prompt(session, prompt, sources, on_text)

    return answer


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


def open_chat(session: Session, docs: list[Document], sources: list[dict[str, Any]]) -> Chat | RemoteChat:
    """A conversation over ``docs``: in this process's KV cache, or through ``--endpoint``."""
    if isinstance(session, RemoteSession):
        return RemoteChat(session, docs, sources)
    return Chat(session, docs, sources)


class Chat:
    """A conversation over documents: the first question rides on the documents' prefix (from the
    document cache when it has it), later ones follow the previous answer."""

    def __init__(self, session: Session, docs: list[Document], sources: list[dict[str, Any]]):
        self.session = session
        self.docs = docs
        self.sources = sources
        # the prefix is the same whatever the question: render with a stand-in to find it
        head, _ = split_ids(session, ask_prompt(session.tokenizer, docs, "?"))
        self.conversation = Conversation(session, head, len(head) + QUESTION_ROOM, sources, reserve=CHAT_RESERVE)
        self.turns = 0

    def prepare(self) -> None:
        """Prefill (or load) the documents before the first question is asked."""
        self.conversation.prepare()

    def turn(self, question: str, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        session = self.session
        if self.turns == 0:
            head, rest = split_ids(session, ask_prompt(session.tokenizer, self.docs, question))
            if head != self.conversation.prefix_ids:
                raise UsageError("chat needs an ask template that puts {documents} before {question}")
            result = self.conversation.answer(rest, self.sources, on_text)
        else:
            ids = session.encode(follow_up(session.tokenizer, question))
            result = self.conversation.answer(ids, self.sources, on_text, follow=True)
        if not result.get("interrupted") or result["generated_tokens"]:
            self.turns += 1  # an answer (even a cut one) is in context; a turn cut during its prefill is not
        result["question"] = question
        result["turn"] = self.turns
        return result
