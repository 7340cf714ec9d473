"""PDF text extraction with pypdf: one segment per page, so answers can cite "p. N"."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from pathlib import Path

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError

from longdoc.errors import InputError, UsageError
from longdoc.ingest import Document
from longdoc.sanitize import safe_text

# pypdf logs a warning for every small defect it repairs ("EOF marker not found", odd xrefs);
# those would drown the progress display, and real failures surface as exceptions anyway.
logging.getLogger("pypdf").setLevel(logging.ERROR)

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_pages(spec: str, n_pages: int) -> list[int]:
    """Turn a --pages spec such as "1-5,9" into sorted, distinct 1-based page numbers.

    A pure function so the option can be validated and tested without a PDF. Malformed or
    out-of-range specs are usage errors: silently reading other pages would give answers
    about text the user did not ask for.
    """
    pages: set[int] = set()
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise UsageError(f"--pages {spec!r}: {part.strip()!r} is not a page or range like 1-5,9")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if first < 1 or last < first:
            raise UsageError(f"--pages {spec!r}: {part.strip()!r} is not a valid range (pages start at 1)")
        if last > n_pages:
            raise UsageError(f"--pages {spec!r}: page {last} is past the end ({n_pages} pages)")
        pages.update(range(first, last + 1))
    return sorted(pages)


def check_pages(spec: str) -> None:
    """Check the syntax of a --pages spec before any PDF is read (its page count is not known yet)."""
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise UsageError(f"--pages {spec!r}: {part.strip()!r} is not a page or range like 1-5,9")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first < 1 or last < first:
            raise UsageError(f"--pages {spec!r}: {part.strip()!r} is not a valid range (pages start at 1)")


def is_pdf(name: str, data: bytes) -> bool:
    """By suffix or by the "%PDF-" magic, so a PDF saved without its extension is not read as text."""
    return name.lower().endswith(".pdf") or data.startswith(b"%PDF-")


def read_pdf(path: Path, pages: str | None = None) -> Document:
    """Read a PDF file; see read_pdf_bytes."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    return read_pdf_bytes(str(path), data, pages)


# PDFs with fewer selected pages are read too fast for progress reports to help (pages take ~10-40 ms).
PROGRESS_MIN_PAGES = 200


def read_pdf_bytes(
    name: str, data: bytes, pages: str | None = None, progress: Callable[[int, int], None] | None = None
) -> Document:
    """Extract the text of the selected pages of a PDF held in memory (a file, or piped on stdin).

    Pages without a text layer (scans) are left out with a warning rather than failing the
    run, unless no selected page has text at all: then there is nothing to answer from.
    `progress` hears (pages done, pages) for PDFs of PROGRESS_MIN_PAGES pages or more.
    """
    reader = _open(name, data)
    numbers = parse_pages(pages, len(reader.pages)) if pages else list(range(1, len(reader.pages) + 1))
    segments: list[tuple[str, str]] = []
    unreadable: list[int] = []
    for done, number in enumerate(numbers):
        if progress is not None and len(numbers) >= PROGRESS_MIN_PAGES:
            progress(done, len(numbers))
        try:
            text = reader.pages[number - 1].extract_text()
        except DependencyError:  # not damage: a missing crypto package must not read as "no text layer"
            raise InputError(_crypto_message(name)) from None
        except Exception:  # a damaged page should not lose the rest of the document
            text = ""
            unreadable.append(number)
        if text.strip():
            segments.append((f"p. {number}", safe_text(text.strip())))

    if not segments:
        raise InputError(
            f"{name}: none of the {len(numbers)} selected pages has a text layer "
            "(scanned or image-only PDF?); OCR it first, e.g. with ocrmypdf"
        )
    warnings = []
    empty = len(numbers) - len(segments) - len(unreadable)
    if empty:
        warnings.append(f"{name}: {empty} of {len(numbers)} pages have no text layer; OCR them first")
    if unreadable:
        listed = ", ".join(str(n) for n in unreadable)
        warnings.append(f"{name}: text could not be extracted from damaged pages {listed}")
    return Document(source=name, kind="pdf", segments=segments, pages=len(numbers), warnings=warnings)


def _open(name: str, data: bytes) -> PdfReader:
    """Open and, if needed, decrypt a PDF, turning every pypdf failure into a one-line InputError.

    pypdf raises its own errors for most damage but plain ValueError, KeyError, TypeError and
    others for some corrupt files, so everything is caught: a user must never see a traceback.
    """
    try:
        reader = PdfReader(io.BytesIO(data))
        # pypdf has already tried the empty user password (files that only restrict printing or
        # copying use it); asking again is how to learn whether that worked.
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise InputError(f"{name} is encrypted with a password; decrypt it first (e.g. qpdf --decrypt)")
        len(reader.pages)  # forces the page tree to load, where truncated files fail
    except InputError:
        raise
    except DependencyError:
        raise InputError(_crypto_message(name)) from None
    except Exception as error:  # see docstring
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise InputError(f"{name} is not a readable PDF (truncated or corrupt: {detail})") from None
    return reader


def _crypto_message(name: str) -> str:
    return (
        f"{name} is encrypted (AES); reading it needs the 'cryptography' package, which longdoc depends on "
        "(pip install 'pypdf[crypto]'), or decrypt it first (e.g. qpdf --decrypt)"
    )
