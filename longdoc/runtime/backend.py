"""What runs a prompt, as the tasks see it: one protocol with two implementations, the model in this
process (``runtime.local.LocalBackend``) and an OpenAI-compatible server (``runtime.remote.RemoteBackend``).

The tasks (ask, chat, summarize, batch) hold a ``Backend`` and never ask which one it is: everything
that differs between the two (how a document prefix is shared between questions, how a chat keeps
its context, what a plan checks) is a method here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from longdoc.config import RunConfig
from longdoc.ingest import Document
from longdoc.prompt import Prompt
from longdoc.render import Reporter
from longdoc.runtime.plan import Plan
from longdoc.runtime.result import LocalEngine, RemoteEngine, Result, Source

_T = TypeVar("_T")
_R = TypeVar("_R")

# Receives the answer's text as it streams, piece by piece.
OnText = Callable[[str], None]
# One answer for a prompt of a batch that shares its document prefix (``Backend.answerer``).
Answer = Callable[[Prompt, OnText | None], Result]


class Chat(Protocol):
    """A conversation over documents: each turn sees the documents and every earlier turn."""

    def prepare(self) -> None:
        """Bring the documents in before the first question, where that can be done ahead."""

    def turn(self, question: str, on_text: OnText | None = None) -> Result:
        """The answer to the next question (``question`` and ``turn`` set on the result)."""
        ...


class Backend(Protocol):
    """Runs prompts on one model, with one configuration, reporting through one reporter."""

    cfg: RunConfig
    reporter: Reporter
    #: seconds spent making the model ready (loading it, or connecting to the server)
    load_s: float

    @property
    def name(self) -> str:
        """The model's name, as results record it."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The tokenizer that renders and counts prompts (a transformers tokenizer)."""

    def encode(self, text: str) -> list[int]: ...

    def count(self, text: str | Prompt) -> int:
        """Tokens in ``text``, a prompt counted as the model will read it."""
        ...

    def plan(self, prompt_tokens: int, reserve: int = 0) -> Plan:
        """The plan for a prompt this long, after the fit checks (which raise ``DoesNotFitError``)."""
        ...

    def run(
        self,
        prompt: Prompt,
        sources: list[Source],
        on_text: OnText | None = None,
        cache: bool = True,
        max_new_tokens: int | None = None,
    ) -> Result:
        """Answer one prompt. ``cache``: reuse (and keep) the prompt's document prefix where the backend
        can; ``max_new_tokens``: another answer budget (map-reduce steps). A Ctrl-C during the answer
        returns what was produced, ``interrupted`` set."""
        ...

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``fn`` over ``items``, results in order, as many at once as the backend can run well."""
        ...

    def describe(self) -> LocalEngine | RemoteEngine:
        """What runs the model: the JSON result's ``engine``."""
        ...

    def empty(self, sources: list[Source]) -> Result:
        """A result with every section and nothing run (a run interrupted before its first step)."""
        ...

    def answerer(self, prompts: Sequence[Prompt], sources: list[Source]) -> Answer:
        """How each of ``prompts`` (one set of documents, several questions) gets its answer, sharing
        the documents' prefix between them as well as this backend can."""
        ...

    def chat(self, docs: list[Document], sources: list[Source]) -> Chat:
        """A conversation over ``docs``."""
        ...

    def stop(self) -> None:
        """End the work in flight in other threads (after a Ctrl-C in the main thread)."""


class PromptTokens:
    """A tokenizer as both backends use it: text to ids, and a prompt's document prefix and request
    tokenized apart (``prompt.Prompt``), the last prefix remembered (the same documents come back with
    every question, fit check and chat turn). Safe to share between threads."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._prefix: tuple[str, list[int]] | None = None

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        """A prompt's ids as (document prefix, request)."""
        if not prompt.prefix:
            return [], self.encode(prompt.request)
        known = self._prefix
        if known is None or known[0] != prompt.prefix:
            known = self._prefix = (prompt.prefix, self.encode(prompt.prefix))
        return known[1], self.encode(prompt.request)

    def count(self, text: str | Prompt) -> int:
        if isinstance(text, Prompt):
            return sum(len(ids) for ids in self.split(text))
        return len(self.encode(text))
