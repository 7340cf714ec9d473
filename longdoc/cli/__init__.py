"""The command line: parse options into config objects, call the core, map errors to exit codes.

One module per command (ask, summarize, chat, count, serve, models, cache, doctor, evals), and the
modules they share: ``options`` (every shared option declared once), ``knobs`` (the expert settings
of ``-o KEY=VALUE``), ``settings`` (a command line to a checked ``RunConfig`` and a backend),
``interrupts`` (errors and Ctrl-C), ``batch`` (``summarize --each``), ``output`` (results printed),
``env`` (the environment variables), ``reference`` (docs/options.md), and ``app`` (the commands).
Heavy modules (torch) are imported inside the commands: ``--help`` and usage errors never load them.
"""

from __future__ import annotations

import sys

try:
    from longdoc.cli import interrupts
    from longdoc.cli.app import app
except KeyboardInterrupt:  # Ctrl-C while starting up: interrupted, without a traceback
    if "--json" in sys.argv:  # scripts still get their (empty) partial result
        print('{"answer": "", "interrupted": true, "stage": "start"}', flush=True)
    raise SystemExit(130) from None

__all__ = ["app", "main"]


def main() -> None:
    """The ``longdoc`` program."""
    interrupts.run(app)
