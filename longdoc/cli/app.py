"""The command line's table of contents: the commands, in the order ``--help`` lists them, ``-h``,
``--version``, and the environment variables at the end of each ``--help``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from longdoc.cli import ask, cache, chat, count, doctor, env, evals, knobs, models, serve, summarize
from longdoc.cli.command import Command, Group

HELP = ["-h", "--help"]


app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": HELP},
    help="Ask questions about, and summarize, documents far longer than a small model's window.",
    epilog=env.epilog(),
)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("longdoc")
        except metadata.PackageNotFoundError:  # run from a source tree that is not installed
            from longdoc import __version__ as version
        print(f"longdoc {version}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", metavar="", is_eager=True, callback=_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Ask questions about, and summarize, documents far longer than a small model's window."""


def _command(target: typer.Typer, name: str, fn: Callable[..., None], help_name: str | None = None) -> None:
    """Register ``fn`` as ``name``, its --help ending with the environment variables it reads."""
    target.command(name, cls=Command, epilog=env.epilog(help_name or name))(fn)


_command(app, "ask", ask.ask)
_command(app, "summarize", summarize.summarize)
_command(app, "count", count.count)
_command(app, "chat", chat.chat)
_command(app, "serve", serve.serve)

cache_app = typer.Typer(
    cls=Group, no_args_is_help=True, help="The document KV cache: prefilled documents kept across runs."
)
_command(cache_app, "ls", cache.ls, "cache")
_command(cache_app, "clear", cache.clear, "cache")
app.add_typer(cache_app, name="cache")

_command(app, "doctor", doctor.doctor)
_command(app, "models", models.models)
app.command("options", cls=Command)(knobs.options_cmd)

eval_app = typer.Typer(
    cls=Group, no_args_is_help=True, help="Built-in long-context checks on the chosen model and settings."
)
_command(eval_app, "passkey", evals.passkey, "eval")
_command(eval_app, "needle", evals.needle, "eval")
_command(eval_app, "ppl", evals.ppl, "eval")
app.add_typer(eval_app, name="eval")
