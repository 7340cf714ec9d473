"""What makes a function a longdoc command: the shared options it takes (``takes``), and help that
shows what to type rather than Python's type names (``Command``, ``Group``).

``takes`` also gives a command the expert settings it accepts (``knobs``): one ``-o KEY=VALUE``
option, and the settings' old long flags as hidden aliases, so that scripts that use them keep working
(``--chunk-size 3072`` is ``-o chunk_size=3072``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any, get_type_hints

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from longdoc.cli import knobs
from longdoc.cli.options import PANELS, Given

_OPTIONS = {f.name: f for f in fields(Given) if "option" in f.metadata}
_HINTS = get_type_hints(Given)


def takes(
    *names: str, keys: tuple[str, ...] = (), defaults: dict[str, object] | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the shared options ``names`` (``defaults``: other defaults than the config's, by
    name) and the expert settings ``keys``; the command declares its own parameters and one more,
    ``given: Given``, which receives the shared ones."""
    unknown = [n for n in names if n not in _OPTIONS]
    assert not unknown, f"no shared option {unknown}"
    names = (*names, "options") if keys and "options" not in names else names
    default = {n: _OPTIONS[n].default for n in names} | (defaults or {})
    shared = [_parameter(n, Annotated[_HINTS[n], _OPTIONS[n].metadata["option"]], default[n]) for n in names]
    aliased = knobs.aliased(keys)
    aliases = [_parameter(k.key, Annotated[k.kind | None, typer.Option(k.flag, hidden=True)], None) for k in aliased]

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "given"]
        clash = {p.name for p in own} & {p.name for p in shared + aliases}
        assert not clash, f"{fn.__name__}: {clash} declared twice"

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            flags = tuple((k.key, v) for k in aliased if (v := kwargs.pop(k.key)) is not None)
            values = {n: kwargs.pop(n) for n in names}
            fn(**kwargs, given=Given(**values, present=frozenset(names), keys=keys, flags=flags))

        arguments = [p for p in own if _panel(p) is None]
        options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if _panel(p) is not None]
        params = arguments + sorted(options + shared, key=_rank) + aliases
        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.knob_keys = keys  # type: ignore[attr-defined]  # for -o help (knobs.help_callback)
        return command

    return wrap


def _panel(param: inspect.Parameter) -> str | None:
    """The help panel of an option parameter ("" for none given); None for an argument."""
    info = next(
        (m for m in getattr(param.annotation, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)), None
    )
    return None if info is None else info.rich_help_panel or ""


def _rank(param: inspect.Parameter) -> int:
    """Options in the order of the panels: the command's own panels (Server, Eval) first, then the shared
    ones in ``PANELS`` order (typer shows panels in the order of their first option)."""
    panel = _panel(param)
    return PANELS.index(panel) + 1 if panel in PANELS else 0


def _parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _no_type_names(command: Any, help_option: Any) -> Any:
    """Nothing after -h/--help (typer writes <bool>), and only the metavar of an argument that has one
    (typer adds <list[str]>)."""
    if help_option is not None:
        help_option.metavar = ""
    for param in command.params:
        if isinstance(param, TyperArgument) and param.metavar:
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
    return help_option


class Command(TyperCommand):
    def get_help_option(self, ctx: Any) -> Any:
        return _no_type_names(self, super().get_help_option(ctx))


class Group(TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _no_type_names(self, super().get_help_option(ctx))
