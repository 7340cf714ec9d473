"""User-supplied text made safe to print, encode and tokenize: file names that are not UTF-8, and
control characters that would break a status line or drive a terminal."""

from __future__ import annotations


def safe_text(value: object) -> str:
    """A user-supplied string (a path, a file name) in a form that can be printed and encoded.

    File names that are not UTF-8 reach Python as lone surrogates, which no UTF-8 stream can write
    and no tokenizer accepts; their bytes are shown as ``\\xNN`` escapes instead.
    """
    text = str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Control characters (C0, DEL, C1) that a file name may hold; on a status line they would break the
# line (newline, carriage return) or drive the terminal (escape sequences).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def printable(value: object) -> str:
    """``safe_text`` for one line of a terminal or log: control characters shown as escapes."""
    return safe_text(value).translate(_CONTROLS)


# An answer keeps its lines and tabs; every other control character (escape sequences that set the
# title or colours, a carriage return that overwrites a line) is shown escaped on a terminal.
_ANSWER_CONTROLS = {c: e for c, e in _CONTROLS.items() if c not in (ord("\n"), ord("\t"))}


def terminal_safe(text: str) -> str:
    """Model output for a terminal: C0 and C1 controls other than newline and tab shown as escapes (a
    document can steer a model into copying them; a terminal would obey them)."""
    return text.translate(_ANSWER_CONTROLS)
