"""Split an expression into tokens, keeping each token's position for error messages."""

from __future__ import annotations

from dataclasses import dataclass

OPERATORS = ("**", "+", "-", "*", "/", "%", "(", ")", ",")


class CalcError(ValueError):
    """A syntax or arithmetic error, with the 0-based position in the expression."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(f"{message} at position {pos}")
        self.pos = pos


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "name", "op" or "end"
    text: str
    pos: int


def tokenize(source: str) -> list[Token]:
    """Return the tokens of `source`, ending with an "end" token so the parser needs no bounds checks."""
    tokens: list[Token] = []
    i = 0
    while i < len(source):
        ch = source[i]
        if ch.isspace():
            i += 1
        elif ch.isdigit() or ch == ".":
            start = i
            while i < len(source) and (source[i].isdigit() or source[i] == "."):
                i += 1
            tokens.append(Token("num", source[start:i], start))
        elif ch.isalpha() or ch == "_":
            start = i
            while i < len(source) and (source[i].isalnum() or source[i] == "_"):
                i += 1
            tokens.append(Token("name", source[start:i], start))
        else:
            op = next((op for op in OPERATORS if source.startswith(op, i)), None)
            if op is None:
                raise CalcError(f"unexpected character {ch!r}", i)
            tokens.append(Token("op", op, i))
            i += len(op)
    tokens.append(Token("end", "", len(source)))
    return tokens
