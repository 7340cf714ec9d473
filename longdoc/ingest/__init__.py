"""Turn paths (files, folders, '-') into Documents: labelled text segments ready for a prompt."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from longdoc.errors import InputError


@dataclass
class Document:
    """One input source.

    `segments` are (label, text) pairs: a PDF page ("p. 3"), a code file ("src/app.py"), or a
    whole text file (its path). Labels are what answers cite.
    """

    source: str
    kind: str  # "pdf" | "code" | "text"
    segments: list[tuple[str, str]]
    pages: int = 0  # PDF pages in the selection; 0 for other kinds
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(t for _, t in self.segments)


def ingest_paths(
    paths: list[str],
    *,
    pages: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_file_bytes: int = 1_000_000,
    stdin: bytes | None = None,
) -> list[Document]:
    """Read each command-line path into a Document, in the order given.

    '-' is standard input (`stdin` stands in for it in tests), a folder is read as a tree,
    a PDF by page, anything else as text. `pages` applies to PDFs given directly;
    `include`, `exclude` and `max_file_bytes` to folders. Every problem raises InputError
    naming the path, so it is reported before a model is loaded.
    """
    # Imported here: the readers import Document from this module.
    from longdoc.ingest.code import read_tree
    from longdoc.ingest.pdf import is_pdf, read_pdf_bytes
    from longdoc.ingest.text import is_binary, read_text

    documents = []
    for raw in paths:
        if raw == "-":
            name = "<stdin>"
            data = sys.stdin.buffer.read() if stdin is None else stdin
        elif _is_dir(raw):
            documents.append(read_tree(Path(raw), list(include), list(exclude), max_file_bytes))
            continue
        else:
            name, data = raw, _read_bytes(raw)
        if is_pdf(name, data):
            documents.append(read_pdf_bytes(name, data, pages))
        elif is_binary(data):
            raise InputError(f"{name} is a binary file, not text")
        else:
            documents.append(read_text(name, data))
    return documents


def _is_dir(raw: str) -> bool:
    """Whether `raw` is a folder; InputError if it cannot be looked at (missing, no permission)."""
    try:
        return stat.S_ISDIR(os.stat(raw).st_mode)
    except FileNotFoundError:
        raise InputError(f"{raw}: no such file or directory") from None
    except OSError as error:
        raise InputError(f"{raw}: cannot read ({error.strerror or error})") from None


def _read_bytes(raw: str) -> bytes:
    try:
        return Path(raw).read_bytes()
    except OSError as error:
        raise InputError(f"{raw}: cannot read ({error.strerror or error})") from None
