"""Turn paths (files, folders, '-') into Documents: labelled text segments ready for a prompt."""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from longdoc.errors import InputError
from longdoc.sanitize import safe_text

# Caps on what one run reads (raised with --max-file-size / --max-total-size): a multi-gigabyte file
# or /dev/zero-like input must be refused with a message, not read whole into memory. A 256 MB file is
# far more text than any context holds (PDFs are larger than their text, so the cap is generous).
MAX_FILE_SIZE = 256 * 1024**2
MAX_TOTAL_SIZE = 1024**3
# Progress callback: (done, to do), in files of a folder or pages of a PDF.
FileProgress = Callable[[int, int], None]


def human_size(n: int) -> str:
    """Sizes in messages, in the units --max-file-size accepts."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n} bytes"


def parse_size(spec: str, option: str) -> int:
    """A size option such as 512K, 256M, 2G or a plain byte count; ValueError with a usage message."""
    text = spec.strip().upper().removesuffix("B")
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{option} {spec!r}: expected a size such as 500K, 256M or 2G") from None
    if not value >= 1 or value * scale > 2**62:
        raise ValueError(f"{option} {spec!r}: the size must be at least 1 byte")
    return int(value * scale)


class ReadBudget:
    """The size caps of one run and what was read so far, shared by every input of that run."""

    def __init__(self, max_file: int = MAX_FILE_SIZE, max_total: int = MAX_TOTAL_SIZE) -> None:
        self.max_file = max_file
        self.max_total = max_total
        self.total = 0

    def file_error(self, name: str, size: int) -> str | None:
        """Why a file of ``size`` bytes may not be read, or None."""
        if size > self.max_file:
            return (
                f"{name}: {human_size(size)} is over the per-file limit of {human_size(self.max_file)}; "
                "raise it with --max-file-size"
            )
        return None

    def take(self, name: str, size: int) -> None:
        """Count ``size`` more bytes read; InputError once the run is over its total cap."""
        self.total += size
        if self.total > self.max_total:
            raise InputError(
                f"{name}: the inputs add up to more than the total limit of {human_size(self.max_total)}; "
                "pass fewer inputs, narrow folders with --include/--exclude, or raise --max-total-size"
            )


def read_regular(path: str, budget: ReadBudget, name: str | None = None) -> bytes:
    """The bytes of the regular file ``path``, within the caps; OSError or InputError otherwise.

    Opened without blocking and checked on the open descriptor, so a FIFO, socket or device (or a
    file swapped for one after a check) is refused, never waited on or read forever; reading stops
    one byte past the cap, so a file that grows while it is read cannot exceed it either.
    """
    name = name or path
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(special_file_message(name, mode))
        problem = budget.file_error(name, os.fstat(fd).st_size)
        if problem:
            raise InputError(problem)
        data = f.read(budget.max_file + 1)
    problem = budget.file_error(name, len(data))
    if problem:
        raise InputError(problem)
    budget.take(name, len(data))
    return data


def special_file_message(name: str, mode: int) -> str:
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return f"{name} is {kind}, not a regular file; to read a stream, pipe it in as '-' (e.g. cat {name} | longdoc ...)"


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
        return safe_text(  # lone surrogates (from non-UTF-8 bytes) break tokenizers
            "\n\n".join(t for _, t in self.segments)
        )


def ingest_paths(
    paths: list[str],
    *,
    pages: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_file_bytes: int = 1_000_000,
    stdin: bytes | None = None,
    budget: ReadBudget | None = None,
    progress: FileProgress | None = None,
) -> list[Document]:
    """Read each command-line path into a Document, in the order given.

    '-' is standard input (`stdin` stands in for it in tests), a folder is read as a tree,
    a PDF by page, anything else as text. `pages` applies to PDFs given directly;
    `include`, `exclude` and `max_file_bytes` (the size above which a tree's text files are
    skipped) to folders; `budget` caps every file and the whole run. FIFOs, sockets and devices
    are refused. Every problem raises InputError naming the path, so it is reported before a
    model is loaded.
    """
    # Imported here: the readers import Document from this module.
    from longdoc.ingest.code import read_tree
    from longdoc.ingest.pdf import is_pdf, read_pdf_bytes
    from longdoc.ingest.text import is_binary, read_text

    budget = budget or ReadBudget()
    documents = []
    for raw in paths:
        if raw == "-":
            name = "<stdin>"
            data = _read_stdin(budget) if stdin is None else stdin
        elif _is_dir(raw):
            documents.append(
                read_tree(Path(raw), list(include), list(exclude), max_file_bytes, budget=budget, progress=progress)
            )
            continue
        else:
            name, data = raw, _read_bytes(raw, budget)
        if is_pdf(name, data):
            documents.append(read_pdf_bytes(name, data, pages, progress=progress))
        elif is_binary(data):
            raise InputError(f"{name} is a binary file, not text")
        else:
            documents.append(read_text(name, data))
    return documents


def _is_dir(raw: str) -> bool:
    """Whether `raw` is a folder; InputError if it cannot be looked at (missing, no permission,
    a symlink loop) or is a FIFO, socket or device (reading one could block or never end)."""
    try:
        mode = os.stat(raw).st_mode
    except FileNotFoundError:
        raise InputError(f"{raw}: no such file or directory") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InputError(f"{raw}: symlink loop (too many levels of symbolic links)") from None
        raise InputError(f"{raw}: cannot read ({error.strerror or error})") from None
    except ValueError as error:  # an embedded NUL byte in the path
        raise InputError(f"{raw}: not a valid path ({error})") from None
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        raise InputError(special_file_message(raw, mode))
    return stat.S_ISDIR(mode)


def _read_bytes(raw: str, budget: ReadBudget) -> bytes:
    try:
        return read_regular(raw, budget)
    except OSError as error:
        raise InputError(f"{raw}: cannot read ({error.strerror or error})") from None


def _read_stdin(budget: ReadBudget) -> bytes:
    """Standard input, up to the per-file cap (a stream has no size to check beforehand)."""
    data = sys.stdin.buffer.read(budget.max_file + 1)
    if len(data) > budget.max_file:
        raise InputError(
            f"<stdin>: more than the per-file limit of {human_size(budget.max_file)}; raise it with --max-file-size"
        )
    budget.take("<stdin>", len(data))
    return data
