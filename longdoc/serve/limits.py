"""What a request may cost before it is admitted, and what a connection may hold (README "Serving",
"Limits"): the body cap, the read deadlines on a request's head and body (``deadline_protocol``), the
Host names a key-less server answers, and uvicorn's own limits.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

# The default body cap: bytes of request per token of context (JSON escapes of non-Latin text take up
# to 12 bytes a character), at least MIN_MAX_BODY: 4 MiB for the embedded model's 131,072 tokens.
MAX_BODY_PER_TOKEN = 32
MIN_MAX_BODY = 1 << 20
# A request's head must arrive within this of the connection (or of the previous answer on a kept-alive
# connection), its body within BODY_TIMEOUT_S of its head: slow-loris connections are closed.
HEADERS_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
# After the app answered early (413, 429), the rest of a body is read and dropped (so that the client
# reads the answer, not a reset) for at most this long before the connection is closed.
DRAIN_TIMEOUT_S = 5.0
IDLE_CONNECTION_S = 5  # uvicorn's timeout_keep_alive: an idle kept-alive connection is closed after this
MAX_HEADER_BYTES = 16 * 1024  # uvicorn's h11_max_incomplete_event_size: a larger head gets 400
# uvicorn's limit_concurrency: connections (open ones, slow ones until their deadline) beyond this get
# 503; far above any --concurrency + --queue, and below the usual limit of 1,024 open files.
MAX_CONNECTIONS = 500
# On shutdown (Ctrl-C) every generation is cancelled; connections get this long to finish.
SHUTDOWN_GRACE_S = 3.0
# An event stream's comment line while nothing else is sent (a long prefill): keeps proxies from
# timing out, and a write to a client that went away is how some servers notice it.
STREAM_KEEPALIVE_S = 10.0
# How often a handler waiting for a non-streamed answer checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def default_max_body(context_length: int) -> int:
    """The body cap when ``--max-body`` is not given: MAX_BODY_PER_TOKEN bytes a token of context."""
    return max(MIN_MAX_BODY, MAX_BODY_PER_TOKEN * context_length)


def allowed_hosts(host: str) -> list[str]:
    """The Host names a server without an API key answers: this machine's loopback names and the
    address it listens on (a browser page reaching it by DNS rebinding sends its own name)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return sorted({*LOOPBACK_NAMES, shown.lower()})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def declared_length(headers: Any) -> int | None:
    """A request's Content-Length, where it sent a valid one."""
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def deadline_protocol(headers_timeout_s: float, body_timeout_s: float) -> type:
    """uvicorn's h11 protocol with read deadlines, which uvicorn lacks (its keep-alive timer starts
    only after a first answer, and any byte restarts it): a connection that has not sent a request's
    whole head ``headers_timeout_s`` after it opened (or after the previous answer), or its body
    ``body_timeout_s`` after the head (the app answers 408 first; this is the backstop), or the rest of
    a body the app already refused within DRAIN_TIMEOUT_S, is closed. Slow-loris clients hold no more
    than a socket for that long."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: tuple[Any, bool] | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm(None, None)
            super().connection_lost(exc)

        def _watch(self) -> None:
            """(Re)arm the deadline of the phase the connection is in, when it changed."""
            theirs, answered = self.conn.their_state, self.conn.our_state is h11.DONE
            if (theirs, answered) == self._phase:
                return
            if theirs is h11.IDLE:
                limit: float | None = headers_timeout_s
            elif theirs is h11.SEND_BODY:
                limit = DRAIN_TIMEOUT_S if answered else body_timeout_s + 1.0
            else:  # the request is in: the answer takes as long as it takes
                limit = None
            self._arm((theirs, answered), limit)

        def _arm(self, phase: tuple[Any, bool] | None, limit: float | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._phase = phase
            self._deadline = None if limit is None else self.loop.call_later(limit, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return DeadlineProtocol
