"""``longdoc serve``: an OpenAI-compatible server over the local engine (``longdoc.serve``)."""

from __future__ import annotations

from typing import Annotated

import typer

from longdoc.cli import env, knobs
from longdoc.cli import options as o
from longdoc.cli.command import takes
from longdoc.cli.interrupts import handled
from longdoc.cli.settings import settings
from longdoc.errors import UsageError

SERVER = "Server"
# Defaults of the server's own options (those of longdoc.serve.serve; not imported: it is not needed for --help).
HOST = "127.0.0.1"
PORT = 8000
CONCURRENCY = 1
QUEUE = 8
DOC_CACHES = ("private", "shared")


@takes(
    *o.MODEL_OPTIONS,
    *o.LONG_CONTEXT_OPTIONS,
    *o.DECODING_OPTIONS,
    "quiet",
    "no_cache",
    keys=knobs.keys_for("serve"),
)
def serve(
    host: Annotated[
        str,
        typer.Option(
            "--host",
            metavar="ADDRESS",
            rich_help_panel=SERVER,
            help="Address to listen on (the default is this machine only).",
        ),
    ] = HOST,
    port: Annotated[
        int,
        typer.Option(
            "--port", metavar="PORT", rich_help_panel=SERVER, help="TCP port to listen on (0 picks a free one)."
        ),
    ] = PORT,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            metavar="KEY",
            envvar=env.API_KEY,
            rich_help_panel=SERVER,
            help="Require 'Authorization: Bearer KEY' on the /v1 routes (/health stays open).",
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            metavar="N",
            rich_help_panel=SERVER,
            help="Generations run at once, each with its own KV cache.",
        ),
    ] = CONCURRENCY,
    queue: Annotated[
        int,
        typer.Option(
            "--queue", metavar="N", rich_help_panel=SERVER, help="Requests that may wait for a slot; more get HTTP 429."
        ),
    ] = QUEUE,
    max_body: Annotated[
        str | None,
        typer.Option(
            "--max-body",
            metavar="SIZE",
            rich_help_panel=SERVER,
            help="Refuse request bodies larger than this with HTTP 413 (default: 32 bytes per token of context,"
            " at least 1M).",
        ),
    ] = None,
    doc_cache: Annotated[
        str,
        typer.Option(
            "--doc-cache",
            metavar="|".join(DOC_CACHES),
            rich_help_panel=o.CACHE,
            help="Served requests' document cache: private (a folder of the server's own, keys salted per API"
            " key) or shared (the user's own, as local runs; for a server only you use).",
        ),
    ] = DOC_CACHES[0],
    *,
    given: o.Given,
) -> None:
    """An OpenAI-compatible server over the local engine: /v1/chat/completions, /v1/models, /health.

    Requests run with DCA, recycled decoding and the document KV cache (two requests about one document
    share its prefill). --max-new-tokens, --temperature, --top-p and --seed are the defaults of requests
    that do not set them. Ctrl-C stops the server (exit 130).
    """
    from longdoc.render import Reporter

    reporter = Reporter(quiet=given.quiet)
    with handled(reporter):
        from longdoc import serve as server
        from longdoc.runtime import local

        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, not {port}")
        if concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        if queue < 0:
            raise UsageError("--queue must be 0 or more")
        if api_key is not None and not api_key.strip():
            raise UsageError(f"--api-key (or {env.API_KEY}) is empty")
        if doc_cache not in DOC_CACHES:
            raise UsageError(f"--doc-cache must be private or shared, not {doc_cache!r}")
        body_cap = None
        if max_body is not None:
            from longdoc.ingest import parse_size

            try:
                body_cap = parse_size(max_body, "--max-body")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        run = settings(given)
        server.check_installed()  # the serve extra, before the model loads
        session = local.LocalBackend(run.cfg, reporter)
        server.serve(
            session,
            host=host,
            port=port,
            api_key=api_key,
            concurrency=concurrency,
            queue=queue,
            max_body=body_cap,
            doc_cache=doc_cache,
        )
