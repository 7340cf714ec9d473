"""Expert settings: what a normal run never touches (the DCA layout, recycled decoding's schedule, the
sparse prefill budget, kernels, the cache cap), set with one repeatable option, ``-o KEY=VALUE``, as
``llm -o`` does. ``-o help`` and ``longdoc options`` list them. The settings that had a long flag of
their own keep it as a hidden alias (scripts use them): ``--chunk-size 3072`` is ``-o chunk_size=3072``.

Defaults are the config dataclasses'; the values are checked by their constructors (``config.py``).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_args, get_type_hints

import typer

from longdoc.config import (
    KERNEL_CHOICES,
    PACK_CHOICES,
    RECYCLE_SCHEDULES,
    DCAConfig,
    PrefillConfig,
    RecycleConfig,
    RunConfig,
)
from longdoc.errors import UsageError

# Groups of settings, as commands take them.
DCA = "dca"
PREFILL = "prefill"
RECYCLE = "recycle"
ENGINE = "engine"
CACHE = "cache"
# The groups each command takes (eval: its three subcommands).
COMMANDS: dict[str, tuple[str, ...]] = {
    "ask": (DCA, PREFILL, RECYCLE, ENGINE, CACHE),
    "summarize": (DCA, PREFILL, RECYCLE, ENGINE, CACHE),
    "chat": (DCA, PREFILL, RECYCLE, ENGINE, CACHE),
    "serve": (DCA, PREFILL, RECYCLE, ENGINE, CACHE),
    "eval": (DCA, PREFILL, ENGINE),
    "doctor": (ENGINE,),
}


def knob(flag: str, group: str, meaning: str, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    """A setting's description, kept in its field's metadata: its old flag ("" for none), group, meaning."""
    return {"flag": flag, "group": group, "meaning": meaning, "choices": choices}


@dataclass(frozen=True)
class Knobs:
    """The expert settings of one command line, typed; the defaults are the config's."""

    chunk_size: int | None = field(
        default=DCAConfig.chunk_size,
        metadata=knob("--chunk-size", DCA, "DCA chunk size s in tokens (auto: 3/4 of the model's trained window)."),
    )
    local_window: int | None = field(
        default=DCAConfig.local_window,
        metadata=knob(
            "--local-window", DCA, "DCA local window w in tokens, below chunk_size (auto: 1/8 of the trained window)."
        ),
    )
    dca_temperature: bool = field(
        default=DCAConfig.temperature,
        metadata=knob(
            "--dca-temperature/--no-dca-temperature",
            DCA,
            "Scale attention logits by (0.1 ln(L/W) + 1)^2 for prompts beyond the window W (benchmarks/RESULTS.md).",
        ),
    )
    prefill_budget: int | None = field(
        default=PrefillConfig.budget,
        metadata=knob(
            "--prefill-budget",
            PREFILL,
            "Sparse prefill: keys each query picks beyond its local band (auto: "
            f"{PrefillConfig.budget_default}, {PrefillConfig.budget_long} from {PrefillConfig.long_min_tokens:,}"
            " prompt tokens).",
        ),
    )
    prefill_step: int = field(
        default=RunConfig.prefill_step,
        metadata=knob("", PREFILL, "Tokens per prefill step: bounds the working memory of one step."),
    )
    recycle_k: int = field(
        default=RecycleConfig.k, metadata=knob("--recycle-k", RECYCLE, "Recycled keys kept per layer and KV head.")
    )
    recycle_stride: int = field(
        default=RecycleConfig.stride,
        metadata=knob("--recycle-stride", RECYCLE, "Fixed schedule: a full-attention decode step every N steps."),
    )
    recycle_schedule: str = field(
        default=RecycleConfig.schedule,
        metadata=knob(
            "--recycle-schedule",
            RECYCLE,
            "When a full step runs: fixed (every recycle_stride steps) or dynamic (recycle_threshold).",
            RECYCLE_SCHEDULES,
        ),
    )
    recycle_threshold: float = field(
        default=RecycleConfig.threshold,
        metadata=knob(
            "--recycle-threshold", RECYCLE, "Dynamic schedule: query cosine similarity below which a full step runs."
        ),
    )
    kernel: str = field(
        default=RunConfig.kernel,
        metadata=knob(
            "",
            ENGINE,
            "Attention back end: auto follows the device; cpu takes longdoc's kernels where they run (flash.c,"
            " flash16.c, attn16.c), cpu-torch only torch's fused kernel.",
            KERNEL_CHOICES,
        ),
    )
    pack: str = field(
        default=RunConfig.pack,
        metadata=knob("", ENGINE, "Linears pre-packed for oneDNN on CPU: auto packs where it pays.", PACK_CHOICES),
    )
    cache_max_gb: float = field(
        default=RunConfig.cache_max_gb,
        metadata=knob("--cache-max-gb", CACHE, "Document KV cache cap in GB; least recently used entries go first."),
    )


_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


@dataclass(frozen=True)
class Knob:
    """One expert setting as -o and the listings see it."""

    key: str
    kind: type  # int, float, bool or str
    optional: bool  # None ("auto") allowed: derived at planning
    default: object
    flag: str  # its old long flag, kept as a hidden alias ("" for none)
    group: str
    meaning: str
    choices: tuple[str, ...]

    @property
    def type_name(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        name = {int: "integer", float: "number", bool: "true|false"}.get(self.kind, "text")
        return f"{name}|auto" if self.optional else name

    @property
    def default_text(self) -> str:
        if self.default is None:
            return "auto"
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    @property
    def flag_name(self) -> str:
        return self.flag.split("/")[0]

    def parse(self, text: str) -> object:
        value = text.strip()
        if self.optional and value.lower() == "auto":
            return None
        try:
            if self.kind is bool:
                if value.lower() not in _TRUE + _FALSE:
                    raise ValueError(value)
                return value.lower() in _TRUE
            if self.kind is int:
                return int(value)
            if self.kind is float:
                return float(value)
        except ValueError:
            raise UsageError(f"-o {self.key} takes {self.type_name}, not {value!r}") from None
        return value


def _registry() -> tuple[Knob, ...]:
    hints = get_type_hints(Knobs)
    found = []
    for f in fields(Knobs):
        kinds = [t for t in get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        optional = isinstance(hints[f.name], types.UnionType) and type(None) in get_args(hints[f.name])
        found.append(Knob(f.name, kinds[0], optional, f.default, **f.metadata))
    return tuple(found)


REGISTRY = _registry()
BY_KEY = {k.key: k for k in REGISTRY}


def keys_for(command: str) -> tuple[str, ...]:
    """The keys ``command`` takes (``eval`` for its subcommands)."""
    return tuple(k.key for k in REGISTRY if k.group in COMMANDS[command])


def aliased(keys: tuple[str, ...]) -> list[Knob]:
    """The settings among ``keys`` that have an old flag (a hidden alias)."""
    return [BY_KEY[key] for key in keys if BY_KEY[key].flag]


def commands_of(knob: Knob) -> str:
    return ", ".join(name for name, groups in COMMANDS.items() if knob.group in groups)


def parse(items: list[str], flags: dict[str, object], keys: tuple[str, ...]) -> Knobs:
    """The settings of ``-o KEY=VALUE`` items (a later one wins) and of the old flags given (``flags``,
    by key), for a command that takes ``keys``. A flag and an -o that disagree are a usage error."""
    values: dict[str, Any] = {}  # by key, each of its setting's type
    for item in items:
        name, sep, text = item.partition("=")
        key = name.strip().lower().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"-o {item!r}: give KEY=VALUE, e.g. -o chunk_size=3072 (-o help lists the keys)")
        if key not in BY_KEY:
            raise UsageError(f"-o {key}: no such setting (-o help lists them)")
        if key not in keys:
            raise UsageError(f"-o {key} does not apply to this command (-o help lists those that do)")
        values[key] = BY_KEY[key].parse(text)
    for key, value in flags.items():
        if key in values and values[key] != value:
            raise UsageError(f"{BY_KEY[key].flag_name} and -o {key} disagree; give one of them")
        values[key] = value
    return replace(Knobs(), **values)


def print_listing(keys: tuple[str, ...], every_command: bool = False) -> None:
    """The settings among ``keys`` as a table on stdout: key, type, default, meaning (and old flag)."""
    from rich.table import Table

    from longdoc.render import console

    table = Table("key", "type", "default", "meaning", *(["commands"] if every_command else []))
    for knob in (BY_KEY[key] for key in keys):
        meaning = knob.meaning + (f" (also {knob.flag})" if knob.flag else "")
        table.add_row(
            knob.key, knob.type_name, knob.default_text, meaning, *([commands_of(knob)] if every_command else [])
        )
    out = console(sys.stdout)
    out.print(table)
    out.print("Set one with -o KEY=VALUE (repeatable).")


def help_callback(ctx: typer.Context, value: list[str] | None) -> list[str] | None:
    """``-o help``: list the settings of the command at hand and leave (before the arguments are checked)."""
    if value and any(item.strip().lower() == "help" for item in value):
        keys = getattr(ctx.command.callback, "knob_keys", None) or tuple(BY_KEY)
        print_listing(keys)
        raise typer.Exit()
    return value


def options_cmd() -> None:
    """The expert settings that -o KEY=VALUE sets: each key, its type, default and meaning."""
    print_listing(tuple(BY_KEY), every_command=True)
