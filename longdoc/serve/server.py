"""Running the app: ``serve`` starts uvicorn with the read deadlines and connection limits of
``limits``, says where it serves, and on Ctrl-C or SIGTERM cancels the generations and stops.

Importing this module imports neither FastAPI nor uvicorn: ``serve`` does, once it runs.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from longdoc.errors import UsageError
from longdoc.serve import limits
from longdoc.serve.documents import documents_dir_set_to, served_documents_dir

if TYPE_CHECKING:
    from longdoc.runtime.local import LocalBackend
    from longdoc.serve.scheduler import Scheduler

INSTALL_HINT = "longdoc serve needs FastAPI and uvicorn: pip install 'longdoc[serve]'"


def check_installed() -> None:
    """A clear usage error when the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


@dataclass
class Running:
    """A started server, as ``serve``'s ``ready`` callback gets it."""

    url: str  # the API's base URL, ending in /v1
    host: str
    port: int
    stop: Callable[[], None]
    app: Any  # the FastAPI app (``app.state.scheduler`` holds the counters tests and health read)


def serve(
    backend: LocalBackend,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    concurrency: int = 1,
    queue: int = 8,
    ready: Callable[[Running], None] | None = None,
    model_name: str | None = None,
    max_body: int | None = None,
    doc_cache: str = "private",
    headers_timeout_s: float = limits.HEADERS_TIMEOUT_S,
    body_timeout_s: float = limits.BODY_TIMEOUT_S,
) -> None:
    """Serve ``backend`` until stopped (Ctrl-C, SIGTERM, or ``Running.stop`` from ``ready``'s argument).

    Port 0 picks a free port (the status line and ``ready`` give the one bound). After a Ctrl-C the
    in-flight generations are cancelled and the server shuts down; uvicorn then raises the
    KeyboardInterrupt again, which the CLI turns into exit 130. With ``doc_cache="private"`` the
    process's document cache is ``served_documents_dir()`` while it serves.
    """
    check_installed()
    from longdoc.serve.app import create_app

    private = doc_cache == "private" and backend.cfg.doc_cache
    with documents_dir_set_to(served_documents_dir() if private else None):
        app = create_app(
            backend,
            api_key=api_key,
            concurrency=concurrency,
            queue=queue,
            model_name=model_name,
            host=host,
            max_body=max_body,
            body_timeout_s=body_timeout_s,
            doc_cache=doc_cache,
        )
        _run_uvicorn(app, backend, host, port, api_key, ready, headers_timeout_s)


def _run_uvicorn(
    app: Any,
    backend: LocalBackend,
    host: str,
    port: int,
    api_key: str | None,
    ready: Callable[[Running], None] | None,
    headers_timeout_s: float,
) -> None:
    """``serve``'s uvicorn server, until it stops."""
    import uvicorn

    scheduler: Scheduler = app.state.scheduler
    if api_key is None and not limits.is_loopback(host):
        backend.reporter.warn(
            f"serving on {host} without --api-key: anyone who can reach it can use the model (requests must"
            f" name {host} or a loopback name as their Host)"
        )

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.started:  # could not bind: uvicorn said why and exits
                return
            bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{bound}/v1"
            backend.reporter.status(f"serving {scheduler.model_name} on {url}")
            if ready is not None:
                ready(Running(url=url, host=host, port=bound, stop=self.stop, app=app))

        interrupted = False

        def stop(self) -> None:
            scheduler.cancel_all()
            self.should_exit = True

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.interrupted = self.interrupted or sig == signal.SIGINT
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            scheduler.cancel_all()  # running generations end at their next step, so connections can close
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=limits.deadline_protocol(headers_timeout_s, app.state.settings.body_timeout_s),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(limits.SHUTDOWN_GRACE_S),
        timeout_keep_alive=limits.IDLE_CONNECTION_S,
        limit_concurrency=limits.MAX_CONNECTIONS,
        h11_max_incomplete_event_size=limits.MAX_HEADER_BYTES,
        lifespan="on",
    )
    server = Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (it has logged why)
        if server.started:
            raise
        why = "is the port in use, or the address not this machine's?"
        raise UsageError(f"could not serve on {host}:{port} ({why})") from None
    finally:
        scheduler.shutdown()
    if server.interrupted:  # uvicorn re-raises the signal, but not where SIGINT is ignored (a background job)
        raise KeyboardInterrupt
