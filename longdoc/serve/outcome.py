"""What a served request's run came to, as the response tells it.

``outcome_of`` turns the run's ``Result`` into an ``Outcome`` in the worker thread, and everything after
it (the response bodies, the stream's last chunks, the server's log line) reads the ``Outcome``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longdoc.runtime.result import Cache, Result, Source, json_of

# A JSON object as it comes off or goes on the wire (a request's body, a response's, a section of one).
JsonObject = dict[str, Any]
# What the document cache lists as the source of a prefix that came from a request.
SERVED_SOURCE = "(longdoc serve request)"


@dataclass(frozen=True)
class Outcome:
    """A finished generation: its answer and counts, why it ended, and longdoc's own figures."""

    answer: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "length" when the answer ran into its token budget, else "stop"
    prefix_tokens: int = 0  # the document prefix's tokens (0: the request had none)
    cache_hit: bool = False  # whether that prefix came from the document cache (or memory)
    #: the result's sections that a response carries in its ``longdoc`` extension field, as JSON
    sections: JsonObject = field(default_factory=dict)


def outcome_of(result: Result, max_new_tokens: int) -> Outcome:
    """The outcome of a run whose answer budget was ``max_new_tokens``."""
    cache = result.cache or Cache()
    sections = {"cache": result.cache, "timings": result.timings, "dca": result.dca, "recycle": result.recycle}
    return Outcome(
        answer=result.answer,
        prompt_tokens=result.prompt_tokens,
        generated_tokens=result.generated_tokens,
        finish_reason="length" if result.generated_tokens >= max_new_tokens else "stop",
        prefix_tokens=cache.prefix_tokens or 0,
        cache_hit=cache.hit,
        sections={name: json_of(part) for name, part in sections.items() if part is not None},
    )


def served_sources(prefix_tokens: int) -> list[Source]:
    """The sources of a served request's run: one, the request's document prefix."""
    return [Source(path=SERVED_SOURCE, kind="text", pages=0, tokens=prefix_tokens)]
