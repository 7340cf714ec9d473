"""``longdoc eval``: built-in long-context checks (passkey, needle, perplexity) on the chosen model and
settings. Recycled decoding is off in their sessions: each task picks its decoding policy itself."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from longdoc.cli import knobs, output
from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import handled
from longdoc.cli.settings import Settings, settings
from longdoc.config import RecycleConfig
from longdoc.errors import UsageError

if TYPE_CHECKING:
    from longdoc.evals.needle import NeedleReport
    from longdoc.evals.passkey import PasskeyReport
    from longdoc.evals.ppl import PplReport
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

EVAL = "Eval"
# The model options of every eval, and ppl's --quantize default: the prefill model (what reads the
# documents) unless a scheme is named; --quantize int8 measures the decode model, every position
# through the quantized weights.
TAKES = (*o.MODEL_OPTIONS, "dca", "prefill", "max_context", *o.OUTPUTS)
PPL_QUANTIZE = "none"
# The needle's recycled-set size and stride (its own baseline settings, not the run's).
NEEDLE_RECYCLE_K = 2048

Lengths = Annotated[
    str, typer.Option("--lengths", metavar="N,...", rich_help_panel=EVAL, help="Prompt lengths in tokens.")
]
Depths = Annotated[str, typer.Option("--depths", metavar="D,...", rich_help_panel=EVAL, help="Depths in [0, 1].")]
Trials = Annotated[
    int, typer.Option("--trials", metavar="N", rich_help_panel=EVAL, help="Trials per length and depth.")
]
Seed = Annotated[int, typer.Option("--seed", metavar="INTEGER", rich_help_panel=EVAL, help="Seed of the hidden keys.")]


@takes(*TAKES, keys=knobs.keys_for("eval"))
def passkey(
    lengths: Lengths = "4096,8192",
    depths: Depths = "0.1,0.5,0.9",
    trials: Trials = 1,
    seed: Seed = 0,
    window: Annotated[
        int | None,
        typer.Option(
            "--window",
            metavar="N",
            rich_help_panel=EVAL,
            help="Baseline: sliding-window attention (sinks + last N keys).",
        ),
    ] = None,
    *,
    given: o.Given,
) -> None:
    """Passkey retrieval: a 5-digit key hidden in filler at each depth."""
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet, json_mode=given.json_out)
    with handled(reporter):
        from longdoc.evals import passkey

        run = _checked(given, trials=trials, window=window)
        lists = _csv(lengths, int, "--lengths"), _csv(depths, float, "--depths", 0.0, 1.0)
        session = _session(reporter, run)
        result = passkey.run(session, *lists, trials, seed, _row(reporter), window)
        _print(reporter, session, result, f"passkey accuracy {result.accuracy:.2f}")


@takes(*TAKES, keys=knobs.keys_for("eval"))
def needle(
    lengths: Lengths = "8192,16384",
    depths: Depths = "0.25,0.75",
    keys: Annotated[
        str, typer.Option("--keys", metavar="N,...", rich_help_panel=EVAL, help="Needle counts (1 = single key).")
    ] = "1,4",
    trials: Trials = 1,
    seed: Seed = 0,
    recycle_k: Annotated[
        int,
        typer.Option("--recycle-k", metavar="N", rich_help_panel=EVAL, help="Recycled and StreamingLLM keys kept."),
    ] = NEEDLE_RECYCLE_K,
    recycle_stride: Annotated[
        int,
        typer.Option(
            "--recycle-stride", metavar="N", rich_help_panel=EVAL, help="Recycled: a full step every N steps."
        ),
    ] = RecycleConfig.stride,
    *,
    given: o.Given,
) -> None:
    """Multi-token needle retrieval: full attention vs Recycled Attention vs a StreamingLLM baseline."""
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet, json_mode=given.json_out)
    with handled(reporter):
        from longdoc.evals import needle

        run = _checked(given, trials=trials, recycle_k=recycle_k, recycle_stride=recycle_stride)
        lists = (
            _csv(lengths, int, "--lengths"),
            _csv(depths, float, "--depths", 0.0, 1.0),
            _csv(keys, int, "--keys"),
        )
        session = _session(reporter, run)
        result = needle.run(session, *lists, recycle_k, recycle_stride, trials, seed, _row(reporter))
        acc = " ".join(f"{m}={a:.2f}" for m, a in result.accuracy.items())
        _print(reporter, session, result, f"needle accuracy {acc}")


@takes(*TAKES, "pages", keys=knobs.keys_for("eval"), defaults={"quantize": PPL_QUANTIZE})
def ppl(
    file: Annotated[str, typer.Argument(metavar="PATH", help="Text, PDF or folder to measure on.")],
    lengths: Lengths = "4096,8192",
    *,
    given: o.Given,
) -> None:
    """Perplexity of a text at given context lengths."""
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet, json_mode=given.json_out)
    with handled(reporter):
        from longdoc.evals import ppl
        from longdoc.prompt import format_documents

        run = _checked(given)
        lists = _csv(lengths, int, "--lengths")
        docs, _ = output.read_inputs(reporter, [file], given)
        session = _session(reporter, run)
        result = ppl.run(session, format_documents(docs), lists)
        line = " ".join(f"{r.length}:{r.ppl if r.ppl is not None else r.error}" for r in result.results)
        _print(reporter, session, result, f"perplexity {line}")


def _checked(given: o.Given, **counts: int | None) -> Settings:
    """The eval's settings (recycled decoding off) and counts, checked before any model loads."""
    run = settings(replace(given, recycle=False))
    for name, value in counts.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return run


def _csv(values: str, cast: Callable[[str], Any], option: str, low: float = 1, high: float = math.inf) -> list[Any]:
    """A comma-separated option value, each item between ``low`` and ``high``; a usage error otherwise."""
    try:
        items = [cast(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} expects a comma-separated list, got {values!r}".strip()) from None
    bad = [v for v in items if not (low <= v <= high)]
    if not items or bad:
        limits = f"between {low} and {high}" if high != math.inf else f"at least {low}"
        raise UsageError(f"{option} {values!r}: every value must be {limits}".strip())
    return items


def _session(reporter: Reporter, run: Settings) -> LocalBackend:
    from longdoc.runtime import local

    return local.LocalBackend(run.cfg, reporter)


def _row(reporter: Reporter) -> Callable[[Any], None]:
    from longdoc.runtime.result import json_of

    return lambda row: reporter.status(" ".join(f"{k}={v}" for k, v in json_of(row).items()))


def _print(
    reporter: Reporter, session: LocalBackend, result: PasskeyReport | NeedleReport | PplReport, line: str
) -> None:
    from longdoc.attention.dca import ChunkLayout
    from longdoc.evals.common import Settings
    from longdoc.render import console, plain

    cfg = session.cfg
    layout = ChunkLayout.for_window(session.info.window, cfg.dca.chunk_size, cfg.dca.local_window)
    result.settings = Settings(
        model=session.info.name,
        dtype=session.info.dtype_name,
        quantize=session.info.quantize,
        dca=cfg.dca.enabled,
        chunk_size=layout.chunk_size,
        local_window=layout.local_window,
        dca_temperature=cfg.dca.temperature,
    )
    if reporter.json_mode:
        reporter.json(result.to_json())
    else:
        console(sys.stdout).print(plain(line))
