"""Plain text: decoding that never fails, and binary detection by content rather than by file name."""

from __future__ import annotations

from longdoc.errors import InputError
from longdoc.ingest import Document

# Enough to judge a file without reading all of it; git and file(1) look at a similar prefix.
SNIFF_BYTES = 8192
# Control bytes that ordinary text contains: tab, newline, form feed, carriage return,
# backspace, escape (ANSI colour codes in logs).
_TEXT_CONTROLS = frozenset(b"\t\n\f\r\b\x1b")
# Share of other control bytes above which a file is treated as binary (text has almost none).
_MAX_CONTROL_SHARE = 0.1


def is_binary(data: bytes) -> bool:
    """Guess whether `data` is binary, so images, archives and compiled files never reach a prompt.

    A NUL byte in the first 8 KiB is decisive (as for git); otherwise a high share of control
    bytes that text never uses gives binaries without NULs away. UTF-16 text counts as binary.
    """
    sample = data[:SNIFF_BYTES]
    if not sample:
        return False
    if b"\x00" in sample:
        return True
    controls = sum(1 for byte in sample if (byte < 0x20 or byte == 0x7F) and byte not in _TEXT_CONTROLS)
    return controls / len(sample) > _MAX_CONTROL_SHARE


def decode_text(name: str, data: bytes) -> tuple[str, list[str]]:
    """Decode as UTF-8 (dropping a BOM), replacing undecodable bytes rather than failing.

    Returns the text and the warnings to show: a few bad bytes should not stop a question
    about an otherwise readable file, but the user should know the text was altered.
    """
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        return text, [f"{name} is not valid UTF-8; undecodable bytes were replaced"]


def read_text(name: str, data: bytes) -> Document:
    """One text input (a file given by path, or stdin named "<stdin>") as a single segment."""
    text, warnings = decode_text(name, data)
    if not text.strip():
        raise InputError(f"{name} is empty")
    return Document(source=name, kind="text", segments=[(name, text)], warnings=warnings)
