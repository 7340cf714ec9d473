"""Prompt construction: documents first, the request last, in the model's chat template.

Documents come first so that a document's prefill can later be reused across questions; each source
and segment gets a header carrying the label that answers should cite.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from longdoc.errors import DoesNotFitError, UsageError
from longdoc.ingest import Document
from longdoc.sanitize import safe_text

STYLES = {
    "brief": "Write one short paragraph.",
    "detailed": "Write a detailed summary with one paragraph per main topic.",
    "bullets": "Write the summary as a bulleted list of the main points.",
}


# Each template and the placeholders it may use; the first ones listed are required (a template
# without {documents} would silently drop the inputs from the prompt).
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "system": ((), ()),
    "ask": (("documents", "question"), ()),
    "summarize": (("documents",), ("style_instruction", "length_instruction")),
    "map": (("documents",), ("part", "parts", "length_instruction")),
    "reduce": (("documents",), ("style_instruction", "length_instruction")),
}
# Environment overrides, file by file; LONGDOC_PROMPTS is the older name, still honoured.
PROMPTS_ENV = ("LONGDOC_PROMPTS_DIR", "LONGDOC_PROMPTS")
# The folder given with --prompts (set by the CLI; takes precedence over the environment).
_prompts_dir: Path | None = None


def use_prompts_dir(folder: str | None) -> None:
    """Take templates from ``folder`` where it has them (--prompts DIR); None restores the default."""
    global _prompts_dir
    if folder is None:
        _prompts_dir = None
        return
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"--prompts {folder}: not a folder (it should hold files such as ask.txt)")
    _prompts_dir = path


def override_dir() -> Path | None:
    """Where user templates come from: --prompts, else $LONGDOC_PROMPTS_DIR (or $LONGDOC_PROMPTS)."""
    if _prompts_dir is not None:
        return _prompts_dir
    for name in PROMPTS_ENV:
        if os.environ.get(name):
            return Path(os.environ[name])
    return None


def template_source(name: str) -> Path | None:
    """The user's file for template ``name``, or None when the packaged one applies."""
    folder = override_dir()
    if folder is not None and (folder / f"{name}.txt").is_file():
        return folder / f"{name}.txt"
    return None


def packaged_template(name: str) -> str:
    """A template shipped with longdoc: package data ``longdoc.prompts`` (the top-level ``prompts/``
    folder mapped there by setuptools), or ``prompts/`` beside the package in a source checkout
    whose install predates that mapping."""
    try:
        return resources.files("longdoc.prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return (Path(__file__).resolve().parents[1] / "prompts" / f"{name}.txt").read_text(encoding="utf-8")


def template(name: str) -> str:
    """The text of prompt template ``name``: the user's file if an override folder has one (to try other
    wordings, e.g. in benchmarks), else the packaged one. User files are checked (``check_template``)."""
    source = template_source(name)
    if source is None:
        return packaged_template(name)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"prompt template {source}: cannot read ({error})") from None
    check_template(name, text, str(source))
    return text


def check_template(name: str, text: str, where: str) -> None:
    """A clear usage error for a template that ``str.format`` would fail on or that drops an input:
    a stray brace, an unknown or positional placeholder, or a required placeholder missing."""
    required, optional = TEMPLATES[name]
    hint = "write a literal brace as {{ or }}"
    allowed = ", ".join("{" + f + "}" for f in (*required, *optional)) or "none"
    try:
        fields = [
            (field, spec, conversion)
            for _, field, spec, conversion in string.Formatter().parse(text)
            if field is not None
        ]
    except ValueError as error:
        raise UsageError(f"prompt template {where}: {error}; {hint}") from None
    for field, spec, conversion in fields:
        if field not in (*required, *optional) or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UsageError(f"prompt template {where}: unknown placeholder {shown} (allowed: {allowed}); {hint}")
    missing = [f for f in required if f not in {field for field, _, _ in fields}]
    if missing:
        raise UsageError(f"prompt template {where}: the {{{missing[0]}}} placeholder is missing")


def check_templates() -> None:
    """Check every template a run may use (the user's and the packaged ones) before any work starts."""
    for name in TEMPLATES:
        if template_source(name) is None:
            check_template(name, packaged_template(name), f"{name}.txt (packaged)")
        else:
            template(name)


def format_document(doc: Document) -> str:
    """One source as text, each segment under a header with its citation label."""
    source = doc.source
    if doc.kind == "pdf":
        head = f"=== Document: {source} (PDF, {doc.pages} pages) ==="
        body = "\n\n".join(f"[{label}]\n{text.strip()}" for label, text in doc.segments)
    elif doc.kind == "code":
        head = f"=== Folder: {source} ({len(doc.segments)} files) ==="
        body = "\n\n".join(f"--- {label} ---\n{text.rstrip()}" for label, text in doc.segments)
    else:
        head = f"=== Document: {source} ==="
        body = "\n\n".join(text.strip() for _, text in doc.segments)
    return safe_text(f"{head}\n{body}")  # non-UTF-8 file names (lone surrogates) would break the tokenizer


def format_documents(docs: list[Document]) -> str:
    return "\n\n".join(format_document(d) for d in docs)


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt in two parts: the document prefix (system text and documents) and the request.

    The two are tokenized separately, so BPE merges never cross the boundary and the prefix's tokens,
    and so its KV cache, are the same whatever the question. A prompt with no reusable prefix has an
    empty one.
    """

    prefix: str
    request: str

    @property
    def text(self) -> str:
        """The whole prompt as the model reads it."""
        return self.prefix + self.request


# Stands in for the documents while a template is rendered, to find where they end in the chat text.
_DOCUMENTS_MARK = "\ue000longdoc-documents\ue000"


def render(tokenizer: Any, name: str, **fields: str) -> Prompt:
    """Fill template ``name`` and wrap it as one user turn of the model's chat template.

    The result's prefix runs to the end of the ``{documents}`` field (empty for a template without
    one). A user template that puts the question before the documents still works; its prefix just
    differs from question to question, so it is never reused.
    """
    documents = fields.pop("documents", None)
    # the stand-in's character is dropped from the other fields, so they can never hold it
    fields = {name: value.replace(_DOCUMENTS_MARK[0], "") for name, value in fields.items()}
    if documents is None:
        return Prompt("", _chat(tokenizer, template(name).format(**fields)))
    text = _chat(tokenizer, template(name).format(documents=_DOCUMENTS_MARK, **fields))
    if text.count(_DOCUMENTS_MARK) != 1:  # a user template with {documents} twice: no reusable prefix
        return Prompt("", _chat(tokenizer, template(name).format(documents=documents, **fields)))
    head, _, tail = text.partition(_DOCUMENTS_MARK)
    return Prompt(head + safe_text(documents), tail)


def _chat(tokenizer: Any, user_text: str) -> str:
    # safe_text: a non-UTF-8 file name or argument (lone surrogates) would make the tokenizer fail
    user = safe_text(user_text.strip())
    return chat_text(
        tokenizer, [{"role": "system", "content": template("system").strip()}, {"role": "user", "content": user}]
    )


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` in the model's chat template, ready for the answer; without a template, plain
    turns: the system text, then each user turn followed by a blank line and ``Answer:``."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    text = ""
    for m in messages:
        if m["role"] == "assistant":
            text += " " + m["content"]
        else:
            text += ("\n\n" if text else "") + m["content"] + ("\n\nAnswer:" if m["role"] == "user" else "")
    return text


def ask_prompt(tokenizer: Any, docs: list[Document], question: str) -> Prompt:
    if not question.strip():
        raise UsageError("the question is empty; ask something about the documents")
    return render(tokenizer, "ask", documents=format_documents(docs), question=question.strip())


def follow_up(tokenizer: Any, question: str) -> str:
    """The text that closes the model's last answer and asks ``question`` as the next user turn.

    Rendered from the chat template with a stand-in answer, so it is right for any template; the
    answer's own tokens stay as generated (they are never re-tokenized).
    """
    if not question.strip():
        raise UsageError("the question is empty")
    mark = "\ue000longdoc-answer\ue000"
    question = safe_text(question.strip())
    if not getattr(tokenizer, "chat_template", None):
        return f"\n\n{question}\n\nAnswer:"
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": mark},
        {"role": "user", "content": question},
    ]
    text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return text.partition(mark)[2]


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
