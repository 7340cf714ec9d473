"""Errors and Ctrl-C, wherever they land: user errors become one line and their exit code (``handled``);
a Ctrl-C exits 130 and, with --json, prints the partial result of what the run knew (``RunState``).

``run`` is the process's entry: it counts SIGINTs (an error raised after one is the interrupt in
disguise), re-raises a Ctrl-C that landed in a finalizer, and keeps a Ctrl-C in the interpreter's
teardown from changing the exit status of a command that is over.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import typer

from longdoc import errors
from longdoc.errors import LongdocError

if TYPE_CHECKING:
    from longdoc.render import Reporter
    from longdoc.runtime.result import Result, Source

# The partial result of a run interrupted before any command started (importing, parsing arguments).
STARTED_JSON = '{"answer": "", "interrupted": true, "stage": "start"}'


@dataclass
class RunState:
    """What an interrupted run knows so far, for the partial JSON result: the stage it was in, and the
    model, sources and result once they exist."""

    stage: str = "start"
    model: str | None = None
    sources: list[Source] = field(default_factory=list)
    result: Result | None = None


@contextmanager
def handled(reporter: Reporter, state: RunState | None = None) -> Iterator[None]:
    """Turn user errors into one line and their exit code; never a traceback for them.

    Ctrl-C (anywhere: reading inputs, loading, prefill, map-reduce) exits 130, and with --json
    prints the partial result that ``state`` describes unless a JSON object is out already.
    """
    try:
        yield
    except typer.Exit:  # a decided exit (an interrupted result already reported by output.finish)
        raise
    except LongdocError as exc:
        reporter.error(exc.message)
        raise typer.Exit(exc.exit_code) from None
    except MemoryError:
        reporter.error("out of memory; try a shorter input or --dtype bfloat16")
        raise typer.Exit(errors.EXIT_DOES_NOT_FIT) from None
    except (KeyboardInterrupt, Exception) as exc:
        if not caused_by_interrupt(exc):
            raise  # a bug: the traceback is what a report needs
        reporter.error("interrupted")
        if state is not None and reporter.json_mode and not reporter.json_printed:
            reporter.json(partial_result(state).to_json())
        raise typer.Exit(errors.EXIT_INTERRUPTED) from None


def partial_result(state: RunState) -> Result:
    """The result of a run interrupted before it had one: what it knew, and ``interrupted``."""
    from longdoc.runtime.result import Result

    if state.result is not None:
        return replace(state.result, interrupted=True)
    return Result(answer="", model=state.model, sources=state.sources, interrupted=True, stage=state.stage)


# Ctrl-Cs this process has received (counted by run()'s SIGINT handler).
sigints = 0


def count_sigint(signum: int, frame: Any) -> None:
    global sigints
    sigints += 1
    raise KeyboardInterrupt


def caused_by_interrupt(exc: BaseException) -> bool:
    """Whether an error is a Ctrl-C in disguise. Libraries wrap an interrupted import in their own
    errors, some naming it and some not (transformers' lazy modules raise "Could not import module
    'Qwen2ForCausalLM'", seen in the SIGINT fuzz): once a Ctrl-C has arrived, any error counts."""
    if sigints:
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt) or "KeyboardInterrupt" in str(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def redeliver_interrupt(unraisable: Any) -> None:
    """A Ctrl-C that lands while a finalizer (``__del__``) runs cannot propagate from there: Python
    prints it and carries on, and the run would ignore the user (seen in the SIGINT fuzz). Raise the
    signal again, to be handled where the program is, once the finalizer is done."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        # from another thread, a moment later: raised here, inside the hook, it would be lost again
        threading.Timer(0.02, _thread.interrupt_main, args=(signal.SIGINT,)).start()
    else:
        sys.__unraisablehook__(unraisable)


def run(app: Callable[[], Any]) -> None:
    """Run the command line ``app`` as the process's main program."""
    sys.unraisablehook = redeliver_interrupt
    signal.signal(signal.SIGINT, count_sigint)
    try:
        app()
    except (SystemExit, KeyboardInterrupt) as exc:
        # The command is over and its output is out. A Ctrl-C from here on lands in the interpreter's
        # teardown, where it would turn the exit status into a death by SIGINT (exit -2 in the SIGINT
        # fuzz, after complete output): ignore it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if isinstance(exc, SystemExit) and exc.code != errors.EXIT_INTERRUPTED:
            raise
        with contextlib.suppress(Exception):  # interrupted: leave now, with what was printed
            from longdoc import render

            if "--json" in sys.argv and not render.json_printed_by_any:  # before any command started
                print(STARTED_JSON, flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(errors.EXIT_INTERRUPTED)
