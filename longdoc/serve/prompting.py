"""Chat messages as a longdoc prompt: rendered with the model's chat template and split where the
document part of the last user message ends (``prompt.Prompt``), so that two requests about one
document share the prefix's token ids, and so its document-cache entry.

Where the prefix ends:

* ``"longdoc_prefix_chars": N`` in the request: the first N characters of the last user message are
  the document part. A request built like longdoc's own ask prompt (system message = the system
  template, user message = the filled ask template, N = the characters up to the end of the
  documents) gets exactly the token ids of the local path.
* Otherwise a heuristic: the last user message is split at its last blank line ("\\n\\n"), the usual
  "documents, blank line, question" layout; with no blank line the prefix is everything before that
  message (system text and earlier turns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from longdoc.prompt import Prompt, chat_text
from longdoc.sanitize import safe_text
from longdoc.serve.protocol import Message

# Stands in for the end of the document part while the chat template is rendered (prompt.render's trick).
_PREFIX_MARK = "\ue000longdoc-prefix\ue000"


def document_chars(content: str, prefix_chars: int | None) -> int:
    """How many characters of the last user message are its document part: ``prefix_chars`` when the
    request says, else up to its last blank line (0 when it has none)."""
    if prefix_chars is not None:
        return prefix_chars
    return max(0, content.rfind("\n\n"))


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def chat_prompt(tokenizer: Any, messages: Sequence[Message], prefix_chars: int | None = None) -> Prompt:
    """Render ``messages`` with the model's chat template (generation prompt added) as a
    ``prompt.Prompt`` whose prefix ends after the document part of the last user message.

    Rendered with a stand-in at that point, as ``prompt.render`` renders with one for the documents,
    so the split is exact for any template that copies content through. Without a chat template the
    messages are laid out as ``prompt`` lays out its fallback (``system``, blank line, ``user``, blank
    line, ``Answer:``).
    """
    # the stand-in's character is dropped from the content, so it can never hold it
    clean = [Message(m.role, safe_text(m.content).replace(_PREFIX_MARK[0], "")) for m in messages]
    last = clean[-1].content
    cut = min(document_chars(last, prefix_chars), len(last))
    marked = [*clean[:-1], Message(clean[-1].role, last[:cut] + _PREFIX_MARK + last[cut:])]
    text = chat_text(tokenizer, _as_dicts(marked))
    if text.count(_PREFIX_MARK) != 1:  # a template that repeats or drops the content: no shared prefix
        return Prompt("", chat_text(tokenizer, _as_dicts(clean)))
    head, _, tail = text.partition(_PREFIX_MARK)
    return Prompt(head, tail)
