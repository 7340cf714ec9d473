"""``longdoc serve``: an OpenAI-compatible HTTP server over the local engine.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``),
``GET /v1/models`` (the one served model, with its context length as ``max_model_len`` like vLLM and
``context_length`` like llama.cpp), and ``GET /health`` (open even when a bearer token is required).

Each request runs through ``pipeline.Conversation``, so DCA, recycled decoding and the document KV
cache apply as they do locally. The rendered prompt is split into a document prefix and the rest
(``prompt.Prompt``), tokenized apart: two requests about the same long document share the prefix's
token ids, and so its cache entry (the same one a local ``longdoc ask`` makes and uses when the split
matches). Where the prefix ends:

* ``"longdoc_prefix_chars": N`` in the request (``extra_body`` of the openai client): the first N
  characters of the last user message are the document part. A request built like longdoc's own ask
  prompt (system message = the system template, user message = the filled ask template, N = the
  characters up to the end of the documents) gets exactly the token ids of the local path.
* Otherwise a heuristic: the last user message is split at its last blank line ("\\n\\n"), the usual
  "documents, blank line, question" layout; with no blank line the prefix is everything before that
  message (system text and earlier turns).

The model is one: generations run in worker threads (``concurrency`` of them, default 1, so one at a
time); each has its own KV store and shares only the read-only weights. At most ``queue`` more
requests wait; beyond that a request gets 429. A prompt that does not fit gets 400 with the message
of exit code 4, checked before it queues; a malformed request gets 400; any other failure gets 500
with one line, and the server carries on. A client that goes away (mid-stream, or while waiting for a
non-streamed answer) stops its generation at the next prefill step or token, freeing its slot.

FastAPI and uvicorn are an optional extra (``pip install 'longdoc[serve]'``); importing this module
does not import them, nor torch.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# (``request: Request``) at runtime, and those names are imported inside ``create_app``.
import asyncio
import contextlib
import copy
import hmac
import ipaddress
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from longdoc.errors import DoesNotFitError, LongdocError, UsageError
from longdoc.render import Reporter, safe_text

if TYPE_CHECKING:
    from fastapi import FastAPI

    from longdoc.config import RunConfig
    from longdoc.pipeline import Session
    from longdoc.prompt import Prompt

log = logging.getLogger("longdoc.serve")

INSTALL_HINT = "longdoc serve needs FastAPI and uvicorn: pip install 'longdoc[serve]'"
# A comment line on an event stream while nothing else is sent (a long prefill): keeps proxies from
# timing out, and a write to a client that went away is how some servers notice it.
KEEPALIVE_S = 10.0
# How often a handler waiting for a non-streamed answer checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
# On shutdown (Ctrl-C) every generation is cancelled; connections get this long to finish.
SHUTDOWN_GRACE_S = 3.0
# What the document cache lists as the source of a prefix that came from a request.
SERVED_SOURCE = "(longdoc serve request)"
SHUTTING_DOWN = "the generation was cancelled: the server is shutting down"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Stands in for the end of the document part while the chat template is rendered (prompt.render's trick).
_PREFIX_MARK = "\ue000longdoc-prefix\ue000"


def check_installed() -> None:
    """A clear usage error when the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


# --------------------------------------------------------------------------------------------------
# requests


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None, param=None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    messages: list[dict[str, str]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    prefix_chars: int | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number, not {json.dumps(value)[:40]}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise _bad(f"'{name}' must be an integer, not {json.dumps(value)[:40]}", name)
    return int(value)


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or a list of text parts (joined with newlines, as vLLM does)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    if not content.strip():
        raise _bad(f"messages[{i}].content is empty", "messages")
    return content


def parse_request(body: Any) -> ChatRequest:
    """Check a chat-completions body; raises ApiError(400) with a one-line message for what is wrong.

    Fields outside the subset longdoc implements are ignored, except those whose silent omission would
    change the answer's meaning (``n`` > 1, ``stop``, ``tools``, ``logprobs``): those are refused.
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = message.get("role")
        if role not in ROLES:
            shown = json.dumps(role)[:40] if role is not None else "missing"
            raise _bad(f"messages[{i}].role {shown} is not one of system, user, assistant", "messages")
        parsed.append({"role": ROLES[role], "content": _content(message, i)})
    if parsed[-1]["role"] != "user":
        raise _bad("the last message must be the user's", "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"'max_tokens' must be at least 1, not {max_tokens}", "max_tokens")
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise _bad(f"'temperature' must be 0 (greedy) or more, not {temperature:g}", "temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad(f"'top_p' must be above 0 and at most 1, not {top_p:g}", "top_p")
    seed = _integer(body, "seed")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _bad("'stream_options.include_usage' must be true or false", "stream_options")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise _bad("only n=1 is supported", "n")
    if body.get("stop"):
        raise _bad("stop sequences are not supported by longdoc serve", "stop")
    for name in ("tools", "functions", "logprobs"):
        if body.get(name):
            raise _bad(f"'{name}' is not supported by longdoc serve", name)
    prefix_chars = _integer(body, "longdoc_prefix_chars")
    last = parsed[-1]["content"]
    if prefix_chars is not None and not 0 <= prefix_chars <= len(last):
        raise _bad(
            f"'longdoc_prefix_chars' must be between 0 and the last message's length ({len(last)}), not {prefix_chars}",
            "longdoc_prefix_chars",
        )
    return ChatRequest(
        messages=parsed,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stream=bool(stream),
        include_usage=bool(include_usage),
        prefix_chars=prefix_chars,
    )


def document_chars(content: str, prefix_chars: int | None) -> int:
    """How many characters of the last user message are its document part: ``prefix_chars`` when the
    client says, else up to its last blank line (0 when it has none)."""
    if prefix_chars is not None:
        return prefix_chars
    return max(0, content.rfind("\n\n"))


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]], prefix_chars: int | None = None) -> "Prompt":
    """Render ``messages`` with the model's chat template (generation prompt added) as a
    ``prompt.Prompt`` whose prefix ends after the document part of the last user message.

    Rendered with a stand-in at that point, as ``prompt.render`` renders with one for the documents,
    so the split is exact for any template that copies content through. Without a chat template the
    messages are laid out as ``prompt`` lays out its fallback (``system``, blank line, ``user``, blank
    line, ``Answer:``).
    """
    from longdoc.prompt import Prompt, chat_text

    # the stand-in's character is dropped from the content, so it can never hold it
    clean = [{**m, "content": safe_text(m["content"]).replace(_PREFIX_MARK[0], "")} for m in messages]
    last = clean[-1]["content"]
    cut = min(document_chars(last, prefix_chars), len(last))
    marked = [*clean[:-1], {**clean[-1], "content": last[:cut] + _PREFIX_MARK + last[cut:]}]
    text = chat_text(tokenizer, marked)
    if text.count(_PREFIX_MARK) != 1:  # a template that repeats or drops the content: no shared prefix
        return Prompt("", chat_text(tokenizer, clean))
    head, _, tail = text.partition(_PREFIX_MARK)
    return Prompt(head, tail)


# --------------------------------------------------------------------------------------------------
# the engine side: admission, worker threads, cancellation


class Cancelled(Exception):
    """Raised inside a generation whose client went away (or at shutdown) to stop it."""


class _RequestReporter(Reporter):
    """A request's reporter: no progress or status chatter (requests may run side by side), warnings
    to the server's stderr, and a cancellation check at every prefill step."""

    def __init__(self, cancel: threading.Event, server: Reporter):
        super().__init__(quiet=True)
        self.cancel = cancel
        self.server = server

    def advance(self, done: int, total: int, rate: float | None = None, left: float | None = None) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def warn(self, message: str) -> None:
        self.server.warn(message)


@dataclass(eq=False)  # compared and hashed by identity (the engine keeps a set of them)
class Job:
    """One admitted request: its token ids, its settings, and its cancel flag."""

    id: str
    cfg: "RunConfig"
    prefix_ids: list[int]
    rest_ids: list[int]
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.rest_ids)


class Engine:
    """The served session: request preparation (template, tokens, fit), admission (``concurrency``
    running + ``queue`` waiting), and the worker threads that run generations."""

    def __init__(self, session: "Session", concurrency: int, queue: int, model_name: str | None):
        from longdoc import pipeline

        if concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        if queue < 0:
            raise UsageError("--queue must be 0 or more")
        self.session = session
        self.concurrency = concurrency
        self.queue = queue
        self.model_name = model_name or session.info.name
        self.created = int(time.time())
        # the context limit as the fit check applies it (prompt + answer), known before any request
        probe = replace(session.cfg, generation=replace(session.cfg.generation, max_new_tokens=1))
        self.context_length = pipeline.make_plan(probe, session.info, 1).max_context
        # load now (not in the first request) and compute what every request's copy of the session shares
        session.loaded()
        session.model_identity()
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="longdoc-generate")
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self.admitted = 0  # running or waiting
        self.running = 0
        self.jobs: set[Job] = set()
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    # preparing -------------------------------------------------------------------------------------
    def prepare(self, request: ChatRequest) -> Job:
        """Template, tokens and fit check of a request (off the event loop: a long document takes a
        while to tokenize). Raises ApiError(400) for a prompt that does not fit."""
        from longdoc import pipeline
        from longdoc.config import GenerationConfig

        session = self.session
        with self._tokenizer_lock:
            prompt = chat_prompt(session.tokenizer, request.messages, request.prefix_chars)
            prefix_ids, rest_ids = pipeline.split_ids(session, prompt)
        if not rest_ids:  # the prefill of the request's part yields the first token's logits
            prefix_ids, rest_ids = prefix_ids[:-1], prefix_ids[-1:]
        prompt_tokens = len(prefix_ids) + len(rest_ids)
        default = session.cfg.generation
        max_new = request.max_tokens
        if max_new is None:  # what the server gives by default, within what the context has left
            max_new = max(1, min(default.max_new_tokens, self.context_length - prompt_tokens))
        generation = GenerationConfig(
            max_new_tokens=max_new,
            temperature=default.temperature if request.temperature is None else request.temperature,
            top_p=default.top_p if request.top_p is None else request.top_p,
            seed=default.seed if request.seed is None else request.seed,
        )
        cfg = replace(session.cfg, generation=generation)
        try:
            pipeline.make_plan(cfg, session.info, prompt_tokens)
        except DoesNotFitError as exc:
            raise ApiError(400, exc.message, code="context_length_exceeded", param="messages") from None
        return Job(id=f"chatcmpl-{uuid.uuid4().hex}", cfg=cfg, prefix_ids=prefix_ids, rest_ids=rest_ids)

    # admission ---------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future[dict[str, Any]]:
        """Queue ``job`` for a worker, or refuse it (ApiError 429) when the queue is full."""
        with self._lock:
            if self.admitted >= self.concurrency + self.queue:
                self.stats["rejected"] += 1
                raise ApiError(
                    429,
                    f"the server is busy: {self.concurrency} running and {self.queue} waiting, the most it takes;"
                    " retry later",
                    "rate_limit_error",
                    "server_busy",
                )
            self.admitted += 1
            self.jobs.add(job)
        try:
            return self.executor.submit(self._run, job)
        except RuntimeError:  # shutting down
            self._release(job)
            raise ApiError(503, "the server is shutting down", "server_error", "shutting_down") from None

    def _release(self, job: Job) -> None:
        with self._lock:
            self.admitted -= 1
            self.jobs.discard(job)

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel.set()

    def shutdown(self) -> None:
        self.cancel_all()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # running (in a worker thread) ---------------------------------------------------------------------
    def _run(self, job: Job) -> dict[str, Any]:
        from longdoc import pipeline

        outcome = "failed"
        result: dict[str, Any] = {}
        with self._lock:
            self.running += 1
        try:
            if job.cancel.is_set():
                raise Cancelled()
            # the session as this request sees it: its own settings and reporter, the shared model
            session = copy.copy(self.session)
            session.cfg = job.cfg
            session.reporter = _RequestReporter(job.cancel, self.session.reporter)

            def on_text(piece: str) -> None:
                if job.cancel.is_set():
                    raise Cancelled()
                if job.on_text is not None:
                    job.on_text(piece)

            sources = [{"path": SERVED_SOURCE, "kind": "text", "pages": 0, "tokens": len(job.prefix_ids)}]
            conversation = pipeline.Conversation(session, job.prefix_ids, job.prompt_tokens, sources)
            result = conversation.answer(job.rest_ids, sources, on_text)
            outcome = "completed"
            return result
        except Cancelled:
            outcome = "cancelled"
            raise
        finally:
            with self._lock:
                self.running -= 1
                self.stats[outcome] += 1
            self._release(job)
            self._log(job, outcome, result)

    def _log(self, job: Job, outcome: str, result: dict[str, Any]) -> None:
        rep = self.session.reporter
        took = time.perf_counter() - job.started
        if outcome == "completed":
            cache = result.get("cache", {})
            prefix = (
                f"prefix {cache.get('prefix_tokens', 0):,} tok {'from the cache' if cache.get('hit') else 'prefilled'}"
                if cache.get("prefix_tokens")
                else "no prefix"
            )
            rep.status(
                f"{job.id[9:21]}: {result['prompt_tokens']:,} + {result['generated_tokens']:,} tokens, {prefix},"
                f" {took:.1f}s"
            )
        elif outcome == "cancelled":
            rep.status(f"{job.id[9:21]}: cancelled (the client went away, or shutdown) after {took:.1f}s")


def finish_reason(result: dict[str, Any], job: Job) -> str:
    """'length' when the answer ran into its token budget, else 'stop' (a stop token ended it)."""
    return "length" if result["generated_tokens"] >= job.cfg.generation.max_new_tokens else "stop"


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(result["prompt_tokens"]), int(result["generated_tokens"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(result: dict[str, Any]) -> dict[str, Any]:
    """What longdoc adds to a response (a field OpenAI clients keep and ignore): cache, timings, DCA, recycling."""
    return {k: result[k] for k in ("cache", "timings", "dca", "recycle") if k in result}


class VisibleText:
    """Streamed pieces cut to what the non-streamed answer shows (``result["answer"]`` is stripped):
    leading whitespace is never sent, trailing whitespace only once text follows it."""

    def __init__(self) -> None:
        self.raw = ""
        self.sent = ""

    def push(self, piece: str) -> str:
        self.raw += piece
        visible = self.raw.strip()
        out = visible[len(self.sent) :]
        self.sent = visible
        return out

    def finish(self, answer: str) -> str:
        """Whatever of the final answer was not sent yet (e.g. a character held back as incomplete)."""
        return answer[len(self.sent) :] if answer.startswith(self.sent) else ""


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# the app


def create_app(
    session: "Session",
    *,
    api_key: str | None,
    concurrency: int = 1,
    queue: int = 8,
    model_name: str | None = None,
) -> "FastAPI":
    """The FastAPI app serving ``session`` (loads its model now). ``app.state.engine`` is the ``Engine``."""
    check_installed()
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response

    engine = Engine(session, concurrency, queue, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="longdoc", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def error(exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return error(ApiError(exc.status_code, str(exc.detail), "invalid_request_error"))

    def failed(exc: BaseException) -> None:
        """A request that failed on a bug: one line on stderr, then the traceback a report needs."""
        session.reporter.error(f"request failed: {_one_line(exc)}")
        log.error("the traceback of that failure:", exc_info=exc)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {
            "id": engine.model_name,
            "object": "model",
            "created": engine.created,
            "owned_by": "longdoc",
            "max_model_len": engine.context_length,
            "context_length": engine.context_length,
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, "running": engine.running, "admitted": engine.admitted}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def get_model(model: str) -> dict[str, Any]:
        if model != engine.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Response:
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                raise _bad(f"the request body is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
            parsed = parse_request(body)
            if parsed.model is not None and parsed.model not in (engine.model_name, session.info.name):
                raise ApiError(
                    404,
                    f"the model {parsed.model!r} does not exist; this server serves {engine.model_name!r}",
                    code="model_not_found",
                    param="model",
                )
            job = await run_in_threadpool(engine.prepare, parsed)
            if parsed.stream:
                return streamed(request, parsed, job)
            return await complete(request, job)
        except ApiError as exc:
            return error(exc)
        except LongdocError as exc:  # e.g. does not fit in memory once admitted
            return error(ApiError(400, exc.message))
        except Exception as exc:  # a bug: one line to the client, and the server stays up
            failed(exc)
            return error(ApiError(500, f"internal error: {_one_line(exc)}", "server_error"))

    async def complete(request: Request, job: Job) -> Response:
        future = asyncio.wrap_future(engine.submit(job))
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancel.set()
            if future.cancelled():  # never started: the executor was shut down
                raise ApiError(503, SHUTTING_DOWN, "server_error")
            result = future.result()
        except Cancelled:
            if await request.is_disconnected():  # nobody to answer
                return Response(status_code=499)
            raise ApiError(503, SHUTTING_DOWN, "server_error") from None
        finally:
            job.cancel.set()  # a no-op once it is done; stops it when this handler is cancelled
        created = int(time.time())
        return JSONResponse(
            {
                "id": job.id,
                "object": "chat.completion",
                "created": created,
                "model": engine.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result["answer"]},
                        "logprobs": None,
                        "finish_reason": finish_reason(result, job),
                    }
                ],
                "usage": usage(result),
                "longdoc": extension(result),
            }
        )

    class EventStream(StreamingResponse):
        """A stream that cancels its generation however it ends (finished, client gone, shutdown)."""

        def __init__(self, content: AsyncIterator[str], cancel: threading.Event):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.cancel = cancel

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.cancel.set()

    def streamed(request: Request, parsed: ChatRequest, job: Job) -> Response:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody to tell
                loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))

        job.on_text = lambda piece: put("text", piece)
        future = engine.submit(job)  # before the response starts: a full queue is a 429
        future.add_done_callback(lambda f: put("end", f))
        created = int(time.time())

        def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> str:
            obj: dict[str, Any] = {
                "id": job.id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": engine.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            }
            if parsed.include_usage:
                obj["usage"] = None
            obj.update(extra)
            return _sse(obj)

        async def events() -> AsyncIterator[str]:
            visible = VisibleText()
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        kind, value = await asyncio.wait_for(pieces.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:  # not the builtin before Python 3.11
                        yield ": keep-alive\n\n"
                        continue
                    if kind == "text":
                        text = visible.push(value)
                        if text:
                            yield chunk({"content": text})
                        continue
                    break
                try:
                    result = value.result()
                except (Cancelled, CancelledError):  # the client went away (nobody reads this) or shutdown
                    yield _sse(
                        ApiError(
                            503, "the generation was cancelled: the server is shutting down", "server_error"
                        ).body()
                    )
                    return
                except LongdocError as exc:
                    yield _sse(ApiError(400, exc.message).body())
                    return
                except Exception as exc:
                    failed(exc)
                    yield _sse(ApiError(500, f"internal error: {_one_line(exc)}", "server_error").body())
                    return
                rest = visible.finish(result["answer"])
                if rest:
                    yield chunk({"content": rest})
                yield chunk({}, finish_reason(result, job), longdoc=extension(result))
                if parsed.include_usage:
                    yield _sse(
                        {
                            "id": job.id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": engine.model_name,
                            "choices": [],
                            "usage": usage(result),
                        }
                    )
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()

        return EventStream(events(), job.cancel)

    return app


# --------------------------------------------------------------------------------------------------
# running it


@dataclass
class Running:
    """A started server, as ``serve``'s ``ready`` callback gets it."""

    url: str  # the API's base URL, ending in /v1
    host: str
    port: int
    stop: Callable[[], None]
    app: Any  # the FastAPI app (``app.state.engine`` holds the counters tests and health read)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    session: "Session",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    concurrency: int = 1,
    queue: int = 8,
    ready: Callable[[Running], None] | None = None,
    model_name: str | None = None,
) -> None:
    """Serve ``session`` until stopped (Ctrl-C, or ``Running.stop`` from ``ready``'s argument).

    Port 0 picks a free port (the status line and ``ready`` give the one bound). After a Ctrl-C the
    in-flight generations are cancelled and the server shuts down; uvicorn then raises the
    KeyboardInterrupt again, which the CLI turns into exit 130.
    """
    check_installed()
    import uvicorn

    app = create_app(session, api_key=api_key, concurrency=concurrency, queue=queue, model_name=model_name)
    engine: Engine = app.state.engine
    if api_key is None and not _is_loopback(host):
        session.reporter.warn(f"serving on {host} without --api-key: anyone who can reach it can use the model")

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.started:  # could not bind: uvicorn said why and exits
                return
            bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{bound}/v1"
            session.reporter.status(f"serving {engine.model_name} on {url}")
            if ready is not None:
                ready(Running(url=url, host=host, port=bound, stop=self.stop, app=app))

        interrupted = False

        def stop(self) -> None:
            engine.cancel_all()
            self.should_exit = True

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.interrupted = self.interrupted or sig == signal.SIGINT
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            engine.cancel_all()  # running generations end at their next step, so connections can close
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
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
        engine.shutdown()
    if server.interrupted:  # uvicorn re-raises the signal, but not where SIGINT is ignored (a background job)
        raise KeyboardInterrupt


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream's lines, up to ``data: [DONE]`` (for tests and
    clients that read the stream without the openai library)."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
