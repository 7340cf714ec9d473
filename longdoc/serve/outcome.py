"""What a served request's run came to, as the response tells it.

The one place in the serve package that touches the run result's types (what
``local.Conversation.answer`` takes as sources and returns): ``outcome_of`` turns a result into an
``Outcome`` in the worker thread, and everything after it (the response bodies, the stream's last
chunks, the server's log line) reads the ``Outcome``. The lines that read the result are marked
``# run result``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A JSON object as it comes off or goes on the wire (a request's body, a response's, a section of one).
JsonObject = dict[str, Any]
# The run result, as local.Conversation.answer returns it.
RunResult = Any  # run result
# What the document cache lists as the source of a prefix that came from a request.
SERVED_SOURCE = "(longdoc serve request)"
# The sections of a result that a response carries in its ``longdoc`` extension field.
EXTENSION_SECTIONS = ("cache", "timings", "dca", "recycle")


@dataclass(frozen=True)
class Outcome:
    """A finished generation: its answer and counts, why it ended, and longdoc's own figures."""

    answer: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "length" when the answer ran into its token budget, else "stop"
    prefix_tokens: int = 0  # the document prefix's tokens (0: the request had none)
    cache_hit: bool = False  # whether that prefix came from the document cache (or memory)
    #: the extension's sections as JSON (``EXTENSION_SECTIONS``, those the result has)
    sections: JsonObject = field(default_factory=dict)


def outcome_of(result: RunResult, max_new_tokens: int) -> Outcome:
    """The outcome of a run whose answer budget was ``max_new_tokens``."""
    data = result.to_json()  # run result: the JSON of a local run, a section missing where it has none
    generated = int(data["generated_tokens"])  # run result
    cache = data.get("cache") or {}  # run result
    return Outcome(
        answer=data["answer"],  # run result
        prompt_tokens=int(data["prompt_tokens"]),  # run result
        generated_tokens=generated,
        finish_reason="length" if generated >= max_new_tokens else "stop",
        prefix_tokens=cache.get("prefix_tokens", 0),
        cache_hit=bool(cache.get("hit")),
        sections={k: data[k] for k in EXTENSION_SECTIONS if k in data},  # run result
    )


def served_sources(prefix_tokens: int) -> list[Any]:
    """The sources of a served request's run: one, the request's document prefix."""
    from longdoc.runtime.result import Source  # run result

    return [Source(path=SERVED_SOURCE, kind="text", pages=0, tokens=prefix_tokens)]  # run result
