"""Terminal output: the answer streams to stdout; progress, timings and memory go to stderr.

When stdout is not a terminal nothing decorative is written there, and ``--json`` replaces the
streamed answer with one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from longdoc.sanitize import printable, terminal_safe

# Width given to consoles that are not terminals: rich would otherwise wrap or cut at 80 columns, and
# logs and pipes want whole lines (full paths) instead.
UNBOUNDED_WIDTH = 100_000
# Plain progress lines (stderr not a terminal): one per this share of the work, or after this many
# seconds without one, and none for work that ends before PLAIN_PROGRESS_AFTER_S.
PLAIN_PROGRESS_STEP = 0.1
PLAIN_PROGRESS_EVERY_S = 30.0
PLAIN_PROGRESS_AFTER_S = 3.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def plain(value: object, style: str = "") -> Text:
    """User-supplied text for rich, never parsed: "[bold]x.txt" prints as itself, not as markup,
    and a name holding a newline or an escape sequence cannot break the line or drive the terminal."""
    return Text(printable(value), style=style)


def console(file: TextIO) -> Console:
    """A console for ``file`` that never interprets markup or emoji codes in what it is given as str,
    and that never wraps or cuts lines when ``file`` is not a terminal (pipes, logs)."""
    out = Console(file=file, highlight=False, emoji=False, markup=False, soft_wrap=True)
    if not out.is_terminal:
        out.width = UNBOUNDED_WIDTH
    return out


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GB"


# Whether any reporter of this process printed a JSON object: a Ctrl-C caught outside every command
# (while the arguments are parsed) prints the empty partial result only if none did.
json_printed_by_any = False


class Reporter:
    """Everything a run shows. ``quiet`` silences stderr chatter (errors still print)."""

    def __init__(self, quiet: bool = False, json_mode: bool = False, out: TextIO | None = None):
        self.quiet = quiet
        self.json_mode = json_mode
        self.out = out or sys.stdout
        # answers are escaped only for a terminal: piped and --json output stays byte-exact
        self.out_is_terminal = _is_terminal(self.out)
        self.err = console(sys.stderr)
        self.json_printed = False  # whether a JSON object is out already (an interrupt must not add one)
        self._progress: Progress | None = None
        self._plain: PlainProgress | None = None
        self._pending: tuple[str, str] | None = None  # a lazy bar not started yet: (description, unit)
        self._task: Any = None

    # stderr: status, warnings, progress -------------------------------------------------------
    # Messages carry user-supplied strings (paths, file names): they go out as Text, never as markup.
    def status(self, message: str) -> None:
        if not self.quiet:
            self.err.print(plain(message, "dim"))

    def warn(self, message: str) -> None:
        self.err.print(Text.assemble(("warning:", "yellow"), " ", plain(message)))

    def error(self, message: str) -> None:
        self.err.print(Text.assemble(("error:", "bold red"), " ", plain(message)))

    @contextmanager
    def progress(self, description: str, total: int, unit: str = "tok", lazy: bool = False) -> Iterator[None]:
        """Progress of one long step: a bar in a terminal, plain lines at a steady pace otherwise.

        ``lazy`` starts the bar on the first ``advance`` only (ingestion: most inputs are read before
        a bar would be worth drawing, and the reader reports only large folders).
        """
        if self.quiet:
            yield
            return
        if not self.err.is_terminal:
            self._plain = PlainProgress(self.err, description, unit)
            try:
                yield
            finally:
                self._plain = None
            return
        if lazy:
            self._pending = (description, unit)
            try:
                yield
            finally:
                self._pending = None
                self._stop_bar()
            return
        self._start_bar(description, unit, total)
        try:
            yield
        finally:
            self._stop_bar()

    def _start_bar(self, description: str, unit: str, total: int) -> None:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{unit} · {{task.fields[rate]}}"),
            LeftColumn(),
            console=self.err,
            transient=True,
        )
        self._progress = progress
        self._task = progress.add_task(description, total=total, rate="", left=None)
        progress.start()

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def advance(self, done: int, total: int, rate: float | None = None, left: float | None = None) -> None:
        """``left``: seconds to go when the caller models them (a prefill's later steps cost more);
        else the bar extrapolates from the rate."""
        if self._plain is not None:
            self._plain.update(done, total, rate, left)
            return
        if self._pending is not None and self._progress is None:
            self._start_bar(*self._pending, total)
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, total=total, rate=f"{rate:,.0f}/s" if rate else "", left=left
            )

    # stdout: the answer -----------------------------------------------------------------------
    def stream(self, text: str) -> None:
        if not self.json_mode:
            self.out.write(terminal_safe(text) if self.out_is_terminal else text)
            self.out.flush()

    def end_answer(self) -> None:
        if not self.json_mode:
            self.out.write("\n")
            self.out.flush()

    def json(self, obj: dict[str, Any]) -> None:
        """One JSON object on a line, always valid UTF-8: a path that is not (a non-UTF-8 file name)
        turns the object into ASCII with \\u escapes rather than failing or writing bad bytes."""
        text = json.dumps(obj, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(obj, ensure_ascii=True)
        self.out.write(text + "\n")
        self.out.flush()
        self.json_printed = True
        global json_printed_by_any
        json_printed_by_any = True

    def stats(self, line: str) -> None:
        """One line of timings and memory on stderr (``Result.stats_line``), escaped like any text from
        outside: through --endpoint the model name is the server's (rich would keep an ESC)."""
        if not self.quiet:
            self.err.print(plain(line, "dim"))


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LeftColumn(TimeRemainingColumn):
    """Time remaining: the caller's estimate (``left`` field) when it gives one, else rich's own."""

    def render(self, task: Task) -> Text:
        left = task.fields.get("left")
        if left is None:
            return super().render(task)
        return Text(_duration(left), style="progress.remaining")


class PlainProgress:
    """Progress as plain stderr lines, for logs and CI where a bar would not show: one line each
    PLAIN_PROGRESS_STEP of the work or PLAIN_PROGRESS_EVERY_S seconds, with the amount done, the
    rate and the time left; silent for work that is over in a few seconds."""

    def __init__(self, err: Console, description: str, unit: str) -> None:
        self.err = err
        self.description = description
        self.unit = unit
        self.start = time.monotonic()
        self.last_time = self.start
        self.last_share = 0.0

    def update(self, done: int, total: int, rate: float | None = None, left: float | None = None) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        share = done / total if total > 0 else 0.0
        if elapsed < PLAIN_PROGRESS_AFTER_S or done >= total:
            return
        if share - self.last_share < PLAIN_PROGRESS_STEP - 1e-9 and now - self.last_time < PLAIN_PROGRESS_EVERY_S:
            return
        self.last_share, self.last_time = share, now
        rate = rate or done / max(elapsed, 1e-9)
        eta = left if left is not None else (total - done) / rate if rate > 0 else 0.0
        self.err.print(
            Text(
                f"{self.description}: {done:,}/{total:,} {self.unit} ({share:.0%}), "
                f"{rate:,.1f} {self.unit}/s, {_duration(elapsed)} elapsed, ETA {_duration(eta)}",
                style="dim",
            )
        )


class TokenStreamer:
    """Turns token ids into text increments, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece

    def text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
