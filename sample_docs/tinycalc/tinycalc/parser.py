"""Recursive-descent parser that evaluates as it parses (no syntax tree is needed for arithmetic).

Grammar, lowest precedence first:
    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/" | "%") unary)*
    unary  := "-" unary | power
    power  := atom ("**" unary)?        # right-associative, binds tighter than unary minus
    atom   := NUMBER | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tinycalc.tokens import CalcError, Token, tokenize

CONSTANTS = {"pi": math.pi, "e": math.e}
FUNCTIONS: dict[str, Callable[..., float]] = {"sqrt": math.sqrt, "abs": abs, "min": min, "max": max}


class Parser:
    def __init__(self, source: str) -> None:
        self.tokens = tokenize(source)
        self.i = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self, text: str | None = None) -> Token:
        token = self.tokens[self.i]
        if text is not None and token.text != text:
            raise CalcError(f"expected {text!r}, found {token.text or 'end of input'!r}", token.pos)
        self.i += 1
        return token

    def expr(self) -> float:
        value = self.term()
        while self.peek().text in ("+", "-"):
            op = self.take()
            right = self.term()
            value = value + right if op.text == "+" else value - right
        return value

    def term(self) -> float:
        value = self.unary()
        while self.peek().text in ("*", "/", "%"):
            op = self.take()
            right = self.unary()
            if op.text != "*" and right == 0:
                raise CalcError("division by zero", op.pos)
            value = value * right if op.text == "*" else value / right if op.text == "/" else value % right
        return value

    def unary(self) -> float:
        if self.peek().text == "-":
            self.take()
            return -self.unary()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        if self.peek().text == "**":
            self.take()
            return base ** self.unary()
        return base

    def atom(self) -> float:
        token = self.take()
        if token.kind == "num":
            try:
                return int(token.text) if token.text.isdigit() else float(token.text)
            except ValueError:
                raise CalcError(f"bad number {token.text!r}", token.pos) from None
        if token.text == "(":
            value = self.expr()
            self.take(")")
            return value
        if token.kind == "name" and self.peek().text == "(":
            return self.call(token)
        if token.kind == "name" and token.text in CONSTANTS:
            return CONSTANTS[token.text]
        raise CalcError(f"unexpected {token.text or 'end of input'!r}", token.pos)

    def call(self, name: Token) -> float:
        if name.text not in FUNCTIONS:
            raise CalcError(f"unknown function {name.text!r}", name.pos)
        self.take("(")
        args = [self.expr()]
        while self.peek().text == ",":
            self.take()
            args.append(self.expr())
        self.take(")")
        return FUNCTIONS[name.text](*args)


def evaluate(source: str) -> float:
    """Evaluate an arithmetic expression; raise CalcError on bad syntax or division by zero."""
    parser = Parser(source)
    value = parser.expr()
    leftover = parser.peek()
    if leftover.kind != "end":
        raise CalcError(f"unexpected {leftover.text!r}", leftover.pos)
    return value
