"""tinycalc: evaluate arithmetic expressions such as "2 * (3 + 4) ** 2"."""

from tinycalc.parser import CalcError, evaluate

__all__ = ["CalcError", "evaluate"]
