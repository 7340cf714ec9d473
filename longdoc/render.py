"""Terminal output: the answer streams to stdout; progress, timings and memory go to stderr.

When stdout is not a terminal nothing decorative is written there, and ``--json`` replaces the
streamed answer with one JSON object.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GB"


class Reporter:
    """Everything a run shows. ``quiet`` silences stderr chatter (errors still print)."""

    def __init__(self, quiet: bool = False, json_mode: bool = False, out: TextIO | None = None):
        self.quiet = quiet
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.err = Console(stderr=True, highlight=False)
        self._progress: Progress | None = None
        self._task: Any = None

    # stderr: status, warnings, progress -------------------------------------------------------
    def status(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"[dim]{message}[/dim]")

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}")

    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/bold red] {message}", soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: int, unit: str = "tok") -> Iterator[None]:
        if self.quiet:
            yield
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{unit} · {{task.fields[rate]}}"),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        self._progress = progress
        self._task = progress.add_task(description, total=total, rate="")
        with progress:
            yield
        self._progress = None

    def advance(self, done: int, total: int, rate: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total, rate=f"{rate:,.0f}/s" if rate else "")

    # stdout: the answer -----------------------------------------------------------------------
    def stream(self, text: str) -> None:
        if not self.json_mode:
            self.out.write(text)
            self.out.flush()

    def end_answer(self) -> None:
        if not self.json_mode:
            self.out.write("\n")
            self.out.flush()

    def json(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()

    def stats(self, result: dict[str, Any]) -> None:
        """One line of timings and memory on stderr."""
        if self.quiet:
            return
        t, m = result["timings"], result["memory"]
        parts = [
            f"load {t['load_s']:.1f}s",
            f"prefill {result['prompt_tokens']:,} tok at {t['prefill_tok_s']:,.0f} tok/s",
            f"decode {result['generated_tokens']} tok at {t['decode_tok_s']:.1f} tok/s",
            f"ttft {t['ttft_s']:.1f}s",
            f"peak RSS {human_bytes(m['peak_rss_bytes'])}",
            f"KV {human_bytes(m['kv_cache_bytes'])}",
        ]
        if m.get("gpu_peak_bytes") is not None:
            parts.append(f"GPU peak {human_bytes(m['gpu_peak_bytes'])}")
        if result["dca"]["enabled"]:
            parts.append(f"DCA chunk {result['dca']['chunk_size']}")
        if result["recycle"]["enabled"]:
            r = result["recycle"]
            parts.append(
                f"recycle k={r['effective_k']} {r['schedule']}/{r['stride']} "
                f"({r['full_steps']} full / {r['recycled_steps']} recycled steps)"
            )
        self.err.print("[dim]" + " · ".join(parts) + "[/dim]")


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
