"""The web app: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``),
``GET /v1/models`` and ``/v1/models/{id}`` (the one served model), and ``GET /health`` (open even when
a bearer token is required).

A chat-completions request passes, in order: the Host check of a key-less server (DNS rebinding,
400), the API key (401), the content type (JSON only, 415), the declared body size (413, before a byte
is read), a slot (429), the body within its cap and deadline (413, 408), the request's checks (400),
the model's name (404), and the characters and tokens of its prompt (400, exit code 4's message).
Any other failure gets 500 with one line, and the server carries on. A client that goes away
(mid-stream, while queued, or while waiting for a whole answer) stops its job (``Job.stop``).

This module imports FastAPI: ``longdoc.serve`` imports it only when an app is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from longdoc.errors import LongdocError, UsageError
from longdoc.serve import limits, protocol, streaming
from longdoc.serve.documents import cache_salt
from longdoc.serve.outcome import JsonObject, Outcome
from longdoc.serve.protocol import ApiError, ChatRequest, Reply, StreamOptions
from longdoc.serve.scheduler import SHUTTING_DOWN, Cancelled, Job, Scheduler, Slot
from longdoc.serve.streaming import VisibleText, sse

if TYPE_CHECKING:
    from longdoc.runtime.local import LocalBackend

log = logging.getLogger("longdoc.serve")


@dataclass(frozen=True)
class Settings:
    """What the routes need besides the scheduler (``app.state.settings``)."""

    api_key: str | None
    max_body: int  # bytes
    body_timeout_s: float
    #: whether answers tell a document-cache hit (not to key-less clients of a private cache)
    report_cache: bool


def create_app(
    backend: LocalBackend,
    *,
    api_key: str | None,
    concurrency: int = 1,
    queue: int = 8,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    max_body: int | None = None,
    body_timeout_s: float = limits.BODY_TIMEOUT_S,
    doc_cache: str = "private",
) -> FastAPI:
    """The app serving ``backend`` (loads its model now). ``app.state.scheduler`` is its ``Scheduler``.

    ``doc_cache``: "private" salts served requests' entry keys (``cache_salt``) and reports a cache hit
    only to a client that sent the API key (the entry's owner: clients without a key cannot be told
    apart); "shared" uses the user's own entries as a local run does and reports every hit.
    """
    if doc_cache not in ("private", "shared"):
        raise UsageError(f"--doc-cache must be private or shared, not {doc_cache!r}")
    private = doc_cache == "private" and backend.cfg.doc_cache
    scheduler = Scheduler(backend, concurrency, queue, model_name, cache_salt(api_key) if private else b"")
    limit = max_body or limits.default_max_body(scheduler.context_length)
    if limit < 1:
        raise UsageError("--max-body must be at least 1 byte")
    settings = Settings(api_key, limit, body_timeout_s, report_cache=doc_cache == "shared" or api_key is not None)

    app = FastAPI(title="longdoc", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.settings = settings
    if api_key is None:  # a web page can reach a key-less server only under a name of its own (rebinding)
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=limits.allowed_hosts(host), www_redirect=False)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    guarded = [Depends(authorized)]
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=guarded)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.scheduler.shutdown()


def _scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# --------------------------------------------------------------------------------------------------
# errors


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(ApiError(exc.status_code, str(exc.detail), "invalid_request_error"))


def _bug(scheduler: Scheduler, exc: BaseException) -> ApiError:
    """A request that failed on a bug: one line on stderr, then the traceback a report needs; the
    client gets the line as a 500."""
    scheduler.reporter.error(f"request failed: {protocol.one_line(exc)}")
    log.error("the traceback of that failure:", exc_info=exc)
    return protocol.internal_error(exc)


def authorized(request: Request) -> None:
    """The /v1 routes' guard: with an API key, a request must send it as its bearer token."""
    api_key = _settings(request).api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


# --------------------------------------------------------------------------------------------------
# the model


async def health(request: Request) -> JsonObject:
    scheduler = _scheduler(request)
    return {"status": "ok", "model": scheduler.model_name, "running": scheduler.running, "admitted": scheduler.admitted}


def _model_card(scheduler: Scheduler) -> JsonObject:
    return protocol.model_card(scheduler.model_name, scheduler.created, scheduler.context_length)


async def list_models(request: Request) -> JsonObject:
    return {"object": "list", "data": [_model_card(_scheduler(request))]}


async def get_model(request: Request, model: str) -> JsonObject:
    scheduler = _scheduler(request)
    if model != scheduler.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {scheduler.model_name!r}")
    return _model_card(scheduler)


# --------------------------------------------------------------------------------------------------
# chat completions


def _check_content_type(request: Request) -> None:
    """What a browser may send across sites without asking first (text/plain, forms) is refused."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the request body must be application/json, not {media or 'untyped'}")


def _too_large(settings: Settings) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {settings.max_body:,} bytes (--max-body)")


async def _read_body(request: Request, settings: Settings) -> bytes:
    """The body, up to ``settings.max_body`` bytes (413 past it) and within its deadline (408)."""
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body:
                raise _too_large(settings)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), settings.body_timeout_s)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        timeout = settings.body_timeout_s
        raise ApiError(408, f"the request body did not arrive within {timeout:g}s", code="timeout") from None
    return b"".join(chunks)


async def _read_chat(request: Request, settings: Settings, scheduler: Scheduler) -> ChatRequest:
    """The request's body, read and checked, for the served model."""
    chat = protocol.parse_request(protocol.parse_json(await _read_body(request, settings)))
    if not scheduler.serves(chat.model):
        raise ApiError(
            404,
            f"the model {chat.model!r} does not exist; this server serves {scheduler.model_name!r}",
            code="model_not_found",
            param="model",
        )
    return chat


async def chat_completions(request: Request) -> Response:
    scheduler, settings = _scheduler(request), _settings(request)
    slot: Slot | None = None
    job: Job | None = None
    try:
        _check_content_type(request)
        declared = limits.declared_length(request.headers)
        if declared is not None and declared > settings.max_body:
            raise _too_large(settings)  # refused before a byte of it is read
        slot = scheduler.reserve()  # from here the request counts against --concurrency + --queue
        chat = await _read_chat(request, settings, scheduler)
        scheduler.check_chars(chat)  # here too: an over-long prompt never waits for the tokenizer
        job = await run_in_threadpool(scheduler.prepare, chat, slot)
        if chat.stream is not None:
            return _streamed(scheduler, settings, chat.stream, job)
        return await _complete(request, scheduler, settings, job)
    except ClientDisconnect:  # left while its body was read: nobody to answer
        return Response(status_code=499)
    except ApiError as exc:
        return error_response(exc)
    except LongdocError as exc:  # e.g. does not fit in memory once admitted
        return error_response(ApiError(400, exc.message))
    except Exception as exc:  # a bug: one line to the client, and the server stays up
        return error_response(_bug(scheduler, exc))
    finally:
        if slot is not None and (job is None or job.future is None):  # never handed to a worker
            slot.release()


def _reply(scheduler: Scheduler, job: Job) -> Reply:
    return Reply(id=job.id, created=int(time.time()), model=scheduler.model_name)


async def _complete(request: Request, scheduler: Scheduler, settings: Settings, job: Job) -> Response:
    """The whole answer as one JSON body; the job stops when its client goes away."""
    future = asyncio.wrap_future(scheduler.submit(job))
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=limits.DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                job.stop()
        if future.cancelled():  # never started: its client left, or the executor was shut down
            if await request.is_disconnected():
                return Response(status_code=499)
            raise ApiError(503, SHUTTING_DOWN, "server_error")
        outcome = future.result()
    except Cancelled:
        if await request.is_disconnected():  # nobody to answer
            return Response(status_code=499)
        raise ApiError(503, SHUTTING_DOWN, "server_error") from None
    finally:
        job.stop()  # a no-op once it is done; stops it when this handler is cancelled
    return JSONResponse(protocol.completion_body(_reply(scheduler, job), outcome, settings.report_cache))


class EventStream(StreamingResponse):
    """A stream that stops its job however it ends (finished, client gone while queued or
    generating, shutdown): a queued job gives its slot back at once."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.stop()


# What a worker hands the event stream: a piece of the answer's text, or at the end the job's future.
Piece = str | Future[Outcome]


def _streamed(scheduler: Scheduler, settings: Settings, options: StreamOptions, job: Job) -> Response:
    """The answer as server-sent events: text pieces as the worker makes them, then the end."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Piece] = asyncio.Queue()

    def put(piece: Piece) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody to tell
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

    job.on_text = put
    future = scheduler.submit(job)  # before the response starts: shutting down is a 503
    future.add_done_callback(put)
    reply = _reply(scheduler, job)
    return EventStream(_events(scheduler, settings, options, reply, pieces), job)


def _stream_failure(scheduler: Scheduler, exc: BaseException) -> ApiError:
    if isinstance(exc, Cancelled | CancelledError):  # the client went away (nobody reads this) or shutdown
        return ApiError(503, SHUTTING_DOWN, "server_error")
    if isinstance(exc, LongdocError):
        return ApiError(400, exc.message)
    return _bug(scheduler, exc)


async def _events(
    scheduler: Scheduler, settings: Settings, options: StreamOptions, reply: Reply, pieces: asyncio.Queue[Piece]
) -> AsyncIterator[str]:
    visible = VisibleText()
    yield sse(protocol.chunk_body(reply, options, {"role": "assistant", "content": ""}))
    while True:
        try:
            piece = await asyncio.wait_for(pieces.get(), limits.STREAM_KEEPALIVE_S)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            yield streaming.KEEPALIVE
            continue
        if not isinstance(piece, str):
            end = piece
            break
        text = visible.push(piece)
        if text:
            yield sse(protocol.chunk_body(reply, options, {"content": text}))
    try:
        outcome = end.result()
    except Exception as exc:  # noqa: BLE001 (each kind is answered: _stream_failure)
        # an error event, then the end of the stream as OpenAI ends one
        yield sse(_stream_failure(scheduler, exc).body())
        yield streaming.DONE
        return
    rest = visible.finish(outcome.answer)
    if rest:
        yield sse(protocol.chunk_body(reply, options, {"content": rest}))
    extension = protocol.longdoc_extension(outcome, settings.report_cache)
    yield sse(protocol.chunk_body(reply, options, {}, outcome.finish_reason, extension))
    if options.include_usage:
        yield sse(protocol.usage_chunk_body(reply, outcome))
    yield streaming.DONE
