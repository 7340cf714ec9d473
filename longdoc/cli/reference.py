"""docs/options.md, the options reference: every command with its usage, help and options by panel,
the expert settings of ``-o`` and the environment variables, read from the same declarations that
``--help`` shows. Regenerate it with ``python -m longdoc.cli.reference > docs/options.md``;
tests/test_options.py fails when the file is stale."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from longdoc.cli import env, knobs

HEADER = """# Options reference

Every command and option, generated from the command line's own declarations (what `longdoc COMMAND -h`
shows) by `python -m longdoc.cli.reference > docs/options.md`; a test fails when this file is stale.
Options are checked before any input is read or any model is loaded: a bad value exits 2.
"""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def _default(param: Any) -> str:
    value = param.default
    if value is None or param.is_flag or isinstance(value, (list, tuple)) or not param.show_default:
        return ""
    return _code(str(value))


def _rows(cmd: Any, ctx: Any) -> dict[str, list[str]]:
    """The command's visible parameters as table rows, by help panel in the order --help shows them."""
    panels: dict[str, list[str]] = {}
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        if param.param_type_name == "argument":
            name = param.metavar or param.name.upper()
            panels.setdefault("Arguments", []).append(f"| {_code(name)} | {_cell(param.help or '')} |")
            continue
        names = ", ".join(_code(o) for o in param.opts)
        if param.secondary_opts:
            names += " / " + ", ".join(_code(o) for o in param.secondary_opts)
        meaning = _cell(param.help or "")
        if param.envvar:
            meaning += f" (env: `{param.envvar}`)"
        panel = getattr(param, "rich_help_panel", None) or "Options"
        row = f"| {names} | {_code(param.metavar or '')} | {_default(param)} | {meaning} |"
        panels.setdefault(panel, []).append(row)
    return panels


def _command(lines: list[str], cmd: Any, ctx: Any, path: str, env_name: str) -> None:
    lines += ["", f"## {path}", "", f"Usage: `{path} {' '.join(cmd.collect_usage_pieces(ctx))}`", ""]
    lines += [inspect.cleandoc(cmd.help or "")]
    for panel, rows in _rows(cmd, ctx).items():
        header = (
            "| argument | meaning |\n| --- | --- |"
            if panel == "Arguments"
            else ("| option | value | default | meaning |\n| --- | --- | --- | --- |")
        )
        lines += ["", f"### {panel}", "", header, *rows]
    variables = env.of(env_name)
    if variables:
        lines += ["", "Environment: " + ", ".join(f"`{v.name}`" for v in variables) + "."]


def _walk(lines: list[str], group: Any, ctx: Any, path: str, env_name: str | None) -> None:
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        sub = cmd.context_class(cmd, info_name=name, parent=ctx)
        if hasattr(cmd, "list_commands"):
            lines += ["", f"## {path} {name}", "", inspect.cleandoc(cmd.help or "")]
            _walk(lines, cmd, sub, f"{path} {name}", name)
        else:
            _command(lines, cmd, sub, f"{path} {name}", env_name or name)


def reference() -> str:
    """The whole of docs/options.md."""
    import typer.main

    from longdoc.cli.app import app

    root: Any = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="longdoc")
    lines = [HEADER, f"Usage: `longdoc {' '.join(root.collect_usage_pieces(ctx))}`", ""]
    lines += ["| option | meaning |", "| --- | --- |"]
    lines += [
        f"| {', '.join(_code(o) for o in p.opts)} | {_cell(p.help or '')} |"
        for p in root.get_params(ctx)
        if not getattr(p, "hidden", False)
    ]
    _walk(lines, root, ctx, "longdoc", None)
    lines += ["", "## Expert settings (`-o KEY=VALUE`)", ""]
    lines += [
        "What a normal run never touches, set with the repeatable `-o KEY=VALUE` of the commands listed"
        " (`-o help` lists a command's own; `longdoc options` all of them). The old flag still works.",
        "",
        "| key | type | default | commands | old flag | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{k.key}` | {_code(k.type_name)} | {_code(k.default_text)} | {_cell(knobs.commands_of(k))} |"
        f" {_code(k.flag)} | {_cell(k.meaning)} |"
        for k in knobs.REGISTRY
    ]
    lines += ["", "## Environment variables", "", "| variable | meaning | commands |", "| --- | --- | --- |"]
    lines += [f"| `{v.name}` | {_cell(v.meaning)} | {_cell(', '.join(v.commands))} |" for v in env.VARIABLES]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
