"""Prompt construction: documents first, the request last, in the model's chat template.

Documents come first so that a document's prefill can later be reused across questions; each source
and segment gets a header carrying the label that answers should cite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from longdoc.errors import DoesNotFitError, UsageError
from longdoc.ingest import Document

STYLES = {
    "brief": "Write one short paragraph.",
    "detailed": "Write a detailed summary with one paragraph per main topic.",
    "bullets": "Write the summary as a bulleted list of the main points.",
}


def template(name: str) -> str:
    """The text of prompt template ``name``: from $LONGDOC_PROMPTS when that folder has it (to try
    other wordings, e.g. in benchmarks), else the packaged one."""
    override = os.environ.get("LONGDOC_PROMPTS")
    if override and (Path(override) / f"{name}.txt").is_file():
        return (Path(override) / f"{name}.txt").read_text(encoding="utf-8")
    return resources.files("longdoc").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")


def format_document(doc: Document) -> str:
    """One source as text, each segment under a header with its citation label."""
    if doc.kind == "pdf":
        head = f"=== Document: {doc.source} (PDF, {doc.pages} pages) ==="
        body = "\n\n".join(f"[{label}]\n{text.strip()}" for label, text in doc.segments)
    elif doc.kind == "code":
        head = f"=== Folder: {doc.source} ({len(doc.segments)} files) ==="
        body = "\n\n".join(f"--- {label} ---\n{text.rstrip()}" for label, text in doc.segments)
    else:
        head = f"=== Document: {doc.source} ==="
        body = "\n\n".join(text.strip() for _, text in doc.segments)
    return f"{head}\n{body}"


def format_documents(docs: list[Document]) -> str:
    return "\n\n".join(format_document(d) for d in docs)


def render(tokenizer: Any, name: str, **fields: str) -> str:
    """Fill template ``name`` and wrap it as one user turn of the model's chat template."""
    user = template(name).format(**fields).strip()
    messages = [{"role": "system", "content": template("system").strip()}, {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return f"{messages[0]['content']}\n\n{user}\n\nAnswer:"


def ask_prompt(tokenizer: Any, docs: list[Document], question: str) -> str:
    if not question.strip():
        raise UsageError("the question is empty; ask something about the documents")
    return render(tokenizer, "ask", documents=format_documents(docs), question=question.strip())


def summary_instructions(style: str, max_words: int | None) -> dict[str, str]:
    if style not in STYLES:
        raise UsageError(f"unknown --style {style!r}; choose from {', '.join(STYLES)}")
    length = f" Use at most {max_words} words." if max_words else ""
    return {"style_instruction": STYLES[style], "length_instruction": length}


@dataclass
class Budget:
    prompt_tokens: int
    max_new_tokens: int
    max_context: int

    @property
    def needed(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    def check(self, hint: str) -> None:
        """Refuse, never truncate: say by how much the prompt is over and what to do."""
        if self.needed > self.max_context:
            over = self.needed - self.max_context
            raise DoesNotFitError(
                f"prompt of {self.prompt_tokens:,} tokens + {self.max_new_tokens:,} answer tokens exceeds the "
                f"context limit of {self.max_context:,} by {over:,} tokens; {hint}"
            )
