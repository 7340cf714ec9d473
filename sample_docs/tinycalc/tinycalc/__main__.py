"""Command line: `python -m tinycalc EXPRESSION` prints the value, or the error and exit code 1."""

import sys

from tinycalc import CalcError, evaluate


def main() -> int:
    if len(sys.argv) != 2:
        print('usage: python -m tinycalc "EXPRESSION"', file=sys.stderr)
        return 2
    try:
        print(evaluate(sys.argv[1]))
    except CalcError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
