"""Server-sent events as an OpenAI stream sends them: ``data:`` lines of JSON chunks, comment lines
while nothing else is sent, ``data: [DONE]`` at the end; and the streamed text cut to what the whole
answer shows."""

from __future__ import annotations

import json
from collections.abc import Iterator

from longdoc.serve.outcome import JsonObject

DONE = "data: [DONE]\n\n"  # how an OpenAI event stream ends
KEEPALIVE = ": keep-alive\n\n"  # a comment line: keeps proxies from timing out while nothing is sent


def sse(obj: JsonObject) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def iter_sse(lines: Iterator[str]) -> Iterator[JsonObject]:
    """The JSON events of a server-sent event stream's lines, up to ``data: [DONE]`` (for tests and
    clients that read the stream without the openai library)."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


class VisibleText:
    """Streamed pieces cut to what the non-streamed answer shows (the answer is stripped): leading
    whitespace is never sent, trailing whitespace only once text follows it."""

    def __init__(self) -> None:
        self.raw = ""
        self.sent = ""

    def push(self, piece: str) -> str:
        self.raw += piece
        visible = self.raw.strip()
        out = visible[len(self.sent) :]
        self.sent = visible
        return out

    def finish(self, answer: str) -> str:
        """Whatever of the final answer was not sent yet (e.g. a character held back as incomplete)."""
        return answer[len(self.sent) :] if answer.startswith(self.sent) else ""
