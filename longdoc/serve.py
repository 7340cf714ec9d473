"""``longdoc serve``: an OpenAI-compatible HTTP server over the local engine.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``),
``GET /v1/models`` (the one served model, with its context length as ``max_model_len`` like vLLM and
``context_length`` like llama.cpp), and ``GET /health`` (open even when a bearer token is required).

Each request runs through ``local.Conversation``, so DCA, recycled decoding and the document KV
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
requests wait; beyond that a request gets 429. A request takes its slot before its body is read, so
``concurrency + queue`` also bounds the bodies being read and the prompts being tokenized. A prompt
that does not fit gets 400 with the message of exit code 4, checked before it queues; a malformed
request gets 400; any other failure gets 500 with one line, and the server carries on. A client that
goes away (mid-stream, while queued, or while waiting for a non-streamed answer) frees its slot at
once when queued, else stops its generation at the next prefill step or token.

What a request may cost before it is admitted is bounded (README "Serving"): JSON only (415), a body
cap (``max_body``, 413, checked on Content-Length before reading), read deadlines on the head and the
body (``DeadlineProtocol``, 408), a character count that no prompt within the context can exceed
(400 before tokenizing), and without an API key only Host names that are this machine's (DNS
rebinding). Served requests keep their document-cache entries apart (``doc_cache``).

FastAPI and uvicorn are an optional extra (``pip install 'longdoc[serve]'``); importing this module
does not import them, nor torch.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# (``request: Request``) at runtime, and those names are imported inside ``create_app``.
import asyncio
import contextlib
import copy
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from longdoc.errors import DoesNotFitError, LongdocError, UsageError
from longdoc.render import Reporter
from longdoc.sanitize import safe_text

if TYPE_CHECKING:
    from pathlib import Path

    from fastapi import FastAPI

    from longdoc.config import RunConfig
    from longdoc.prompt import Prompt
    from longdoc.runtime.local import Session

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

# Limits on what a request costs before it is admitted (README "Serving", "Limits").
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
KEEP_ALIVE_S = 5  # uvicorn's timeout_keep_alive: an idle kept-alive connection is closed after this
MAX_HEADER_BYTES = 16 * 1024  # uvicorn's h11_max_incomplete_event_size: a larger head gets 400
# uvicorn's limit_concurrency: connections (open ones, slow ones until their deadline) beyond this get
# 503; far above any --concurrency + --queue, and below the usual limit of 1,024 open files.
MAX_CONNECTIONS = 500
# Temperatures below this are greedy (vLLM's rule; 1e-39 would overflow the logits), above MAX refused.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit integer
# Fields refused unless they ask for what longdoc does anyway: ignoring them would change the answer.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "tool_choice": ("none", "auto"),  # with no tools, "auto" calls none
    "tools": ([],),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "stop": ([], ""),
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Served requests' document cache (doc_cache="private"): a folder beside the user's, and the secret
# that salts its entry keys (made once, readable by the user only).
SERVED_DOCUMENTS = "served-documents"
SECRET_NAME = ".longdoc-serve-secret"
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


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether a field's value asks for nothing longdoc would ignore (None, or one of ``allowed``)."""
    if value is None:
        return True
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        return False  # JSON true is not the number 1, nor false 0
    return any(type(value) is type(a) or (_is_number(value) and _is_number(a)) for a in allowed if value == a)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_request(body: Any) -> ChatRequest:
    """Check a chat-completions body; raises ApiError(400) with a one-line message for what is wrong.

    Fields outside the subset longdoc implements are ignored, except those whose silent omission would
    change the answer's meaning (``n`` > 1, ``stop``, ``tools``, ``logprobs``, ``response_format``,
    ``logit_bias``, the penalties; ``NEUTRAL``): those are refused unless they ask for the default.
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
        if not isinstance(role, str) or role not in ROLES:  # a list or an object is no key of ROLES
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
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise _bad(
            f"'temperature' must be between 0 (greedy) and {MAX_TEMPERATURE:g}, not {temperature:g}", "temperature"
        )
    if temperature is not None and temperature < MIN_TEMPERATURE:
        temperature = 0.0  # greedy: dividing the logits by 1e-39 would overflow them
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad(f"'top_p' must be above 0 and at most 1, not {top_p:g}", "top_p")
    seed = _integer(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad("'seed' must be a 64-bit integer", "seed")
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
    if not _neutral(body.get("stop"), NEUTRAL["stop"]):
        raise _bad("stop sequences are not supported by longdoc serve", "stop")
    for name, allowed in NEUTRAL.items():
        if not _neutral(body.get(name), allowed):
            raise _bad(f"'{name}' is not supported by longdoc serve (only its default)", name)
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


class Slot:
    """A place among the ``concurrency + queue`` a server admits, taken before a request's body is read
    and given back once, whichever way the request ends (``release`` is idempotent)."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.held = True

    def release(self) -> None:
        with self.engine._lock:
            if self.held:
                self.held = False
                self.engine.admitted -= 1


@dataclass(eq=False)  # compared and hashed by identity (the engine keeps a set of them)
class Job:
    """One admitted request: its token ids, its settings, its slot, and its cancel flag."""

    id: str
    cfg: "RunConfig"
    prefix_ids: list[int]
    rest_ids: list[int]
    slot: Slot | None = None
    cache_salt: bytes = b""
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    future: "Future[dict[str, Any]] | None" = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.rest_ids)

    def stop(self) -> None:
        """Its client went away (or the server stops): a running generation ends at its next step, a
        queued one never starts and gives its slot back now (``Engine.submit``'s done callback)."""
        self.cancel.set()
        if self.future is not None:
            self.future.cancel()


class Engine:
    """The served session: request preparation (template, tokens, fit), admission (``concurrency``
    running + ``queue`` waiting), and the worker threads that run generations."""

    def __init__(
        self,
        session: "Session",
        concurrency: int,
        queue: int,
        model_name: str | None,
        cache_salt: bytes = b"",
    ):
        from longdoc.runtime import local

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
        self.context_length = local.make_plan(probe, session.info, 1).max_context
        # No token is longer than the vocabulary's longest string: a text of more characters than this
        # cannot fit, whatever its tokens (a bound checked before tokenizing, which is the costly part).
        self.max_chars = self.context_length * longest_token(session.tokenizer)
        self.cache_salt = cache_salt
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
    def check_chars(self, request: ChatRequest) -> None:
        """ApiError(400) for messages too long for the context whatever their tokens, before tokenizing."""
        chars = sum(len(m["content"]) for m in request.messages)
        if chars > self.max_chars:
            raise ApiError(
                400,
                f"the messages hold {chars:,} characters, more than the context limit of {self.context_length:,}"
                f" tokens can hold ({self.max_chars:,} characters at most)",
                code="context_length_exceeded",
                param="messages",
            )

    def prepare(self, request: ChatRequest, slot: Slot | None = None) -> Job:
        """Template, tokens and fit check of a request (off the event loop: a long document takes a
        while to tokenize). Raises ApiError(400) for a prompt that does not fit."""
        from longdoc.config import GenerationConfig
        from longdoc.runtime import local

        self.check_chars(request)
        session = self.session
        with self._tokenizer_lock:
            prompt = chat_prompt(session.tokenizer, request.messages, request.prefix_chars)
            prefix_ids, rest_ids = local.split_ids(session, prompt)
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
            local.make_plan(cfg, session.info, prompt_tokens)
        except DoesNotFitError as exc:
            raise ApiError(400, exc.message, code="context_length_exceeded", param="messages") from None
        return Job(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            cfg=cfg,
            prefix_ids=prefix_ids,
            rest_ids=rest_ids,
            slot=slot,
            cache_salt=self.cache_salt,
        )

    # admission ---------------------------------------------------------------------------------------
    def reserve(self) -> Slot:
        """A slot for a request about to be read, or ApiError 429 when ``concurrency + queue`` are taken."""
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
        return Slot(self)

    def submit(self, job: Job) -> Future[dict[str, Any]]:
        """Queue ``job`` (its slot reserved: ``reserve``) for a worker. A job whose future is cancelled
        before a worker took it (``Job.stop``: its client left) gives its slot back at once."""
        if job.slot is None:  # a job prepared without a slot (tests): take one now
            job.slot = self.reserve()
        with self._lock:
            self.jobs.add(job)
        try:
            future = self.executor.submit(self._run, job)
        except RuntimeError:  # shutting down
            self._release(job)
            raise ApiError(503, "the server is shutting down", "server_error", "shutting_down") from None
        future.add_done_callback(lambda f: self._dropped(job) if f.cancelled() else None)
        job.future = future
        return future

    def _dropped(self, job: Job) -> None:
        """A job cancelled before a worker took it: counted, and its slot given back."""
        with self._lock:
            self.stats["cancelled"] += 1
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._lock:
            self.jobs.discard(job)
        if job.slot is not None:
            job.slot.release()

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.stop()

    def shutdown(self) -> None:
        self.cancel_all()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # running (in a worker thread) ---------------------------------------------------------------------
    def _run(self, job: Job) -> dict[str, Any]:
        from longdoc.runtime import local

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
            conversation = local.Conversation(
                session, job.prefix_ids, job.prompt_tokens, sources, cache_salt=job.cache_salt
            )
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


def extension(result: dict[str, Any], report_cache: bool = True) -> dict[str, Any]:
    """What longdoc adds to a response (a field OpenAI clients keep and ignore): cache, timings, DCA,
    recycling. Without ``report_cache`` the cache says only how long the document prefix was, not
    whether it was found (which would tell a client what another one sent)."""
    out: dict[str, Any] = {k: result[k] for k in ("cache", "timings", "dca", "recycle") if k in result}
    if not report_cache and "cache" in out:
        out["cache"] = {"prefix_tokens": out["cache"].get("prefix_tokens", 0)}
    return out


def longest_token(tokenizer: Any) -> int:
    """The most characters one token stands for: the longest string in the vocabulary (byte-level BPE
    strings hold a character per byte, so at least as many as the text they decode to)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        vocab = {}
    return max((len(token) for token in vocab), default=0) or 64


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


def default_max_body(context_length: int) -> int:
    """The body cap when ``--max-body`` is not given: MAX_BODY_PER_TOKEN bytes a token of context."""
    return max(MIN_MAX_BODY, MAX_BODY_PER_TOKEN * context_length)


def allowed_hosts(host: str) -> list[str]:
    """The Host names a server without an API key answers: this machine's loopback names and the
    address it listens on (a browser page reaching it by DNS rebinding sends its own name)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return sorted({*LOOPBACK_NAMES, shown.lower()})


def served_documents_dir() -> "Path":
    """Where served requests' document-cache entries go by default: ``served-documents`` beside the
    user's document cache, so that requests neither find nor evict the user's own entries."""
    from longdoc.store import documents_dir

    return documents_dir().parent / SERVED_DOCUMENTS


def cache_salt(api_key: str | None) -> bytes:
    """The salt of served requests' entry keys: a secret kept in the served cache folder (made once,
    readable by the user only) and the API key, so one key's clients never find another key's entries."""
    from longdoc.store import documents_dir

    folder = documents_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
    else:
        secret = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
    return hmac.new(secret, (api_key or "").encode(), hashlib.sha256).digest()


def _declared_length(headers: Any) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def create_app(
    session: "Session",
    *,
    api_key: str | None,
    concurrency: int = 1,
    queue: int = 8,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    max_body: int | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
    doc_cache: str = "private",
) -> "FastAPI":
    """The FastAPI app serving ``session`` (loads its model now). ``app.state.engine`` is the ``Engine``.

    ``doc_cache``: "private" salts served requests' entry keys (``cache_salt``) and reports a cache hit
    only to a client that sent the API key (the entry's owner: clients without a key cannot be told
    apart); "shared" uses the user's own entries as a local run does and reports every hit.
    """
    check_installed()
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    if doc_cache not in ("private", "shared"):
        raise UsageError(f"--doc-cache must be private or shared, not {doc_cache!r}")
    private = doc_cache == "private" and session.cfg.doc_cache
    engine = Engine(session, concurrency, queue, model_name, cache_salt(api_key) if private else b"")
    report_cache = doc_cache == "shared" or api_key is not None
    limit = max_body or default_max_body(engine.context_length)
    if limit < 1:
        raise UsageError("--max-body must be at least 1 byte")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="longdoc", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.max_body = limit
    app.state.body_timeout_s = body_timeout_s
    if api_key is None:  # a web page can reach a key-less server only under a name of its own (rebinding)
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host), www_redirect=False)

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

    def too_large() -> ApiError:
        return ApiError(413, f"the request body is over the server's limit of {limit:,} bytes (--max-body)")

    async def read_body(request: Request) -> bytes:
        """The body, up to ``limit`` bytes (413 past it) and within ``body_timeout_s`` (408)."""
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large()
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), body_timeout_s)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            raise ApiError(408, f"the request body did not arrive within {body_timeout_s:g}s", code="timeout") from None
        return b"".join(chunks)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Response:
        slot: Slot | None = None
        job: Job | None = None
        try:
            # what a browser may send across sites without asking first (text/plain, forms) is refused
            media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                raise ApiError(415, f"the request body must be application/json, not {media or 'untyped'}")
            declared = _declared_length(request.headers)
            if declared is not None and declared > limit:
                raise too_large()  # refused before a byte of it is read
            slot = engine.reserve()  # from here the request counts against --concurrency + --queue
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                raise _bad(f"the request body is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
            except RecursionError:
                raise _bad("the request body is not valid JSON (nested too deeply)") from None
            parsed = parse_request(body)
            if parsed.model is not None and parsed.model not in (engine.model_name, session.info.name):
                raise ApiError(
                    404,
                    f"the model {parsed.model!r} does not exist; this server serves {engine.model_name!r}",
                    code="model_not_found",
                    param="model",
                )
            engine.check_chars(parsed)  # here too: an over-long prompt never waits for the tokenizer
            job = await run_in_threadpool(engine.prepare, parsed, slot)
            if parsed.stream:
                return streamed(request, parsed, job)
            return await complete(request, job)
        except ClientDisconnect:  # left while its body was read: nobody to answer
            return Response(status_code=499)
        except ApiError as exc:
            return error(exc)
        except LongdocError as exc:  # e.g. does not fit in memory once admitted
            return error(ApiError(400, exc.message))
        except Exception as exc:  # a bug: one line to the client, and the server stays up
            failed(exc)
            return error(ApiError(500, f"internal error: {_one_line(exc)}", "server_error"))
        finally:
            if slot is not None and (job is None or job.future is None):  # never handed to a worker
                slot.release()

    async def complete(request: Request, job: Job) -> Response:
        future = asyncio.wrap_future(engine.submit(job))
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    job.stop()
            if future.cancelled():  # never started: its client left, or the executor was shut down
                if await request.is_disconnected():
                    return Response(status_code=499)
                raise ApiError(503, SHUTTING_DOWN, "server_error")
            result = future.result()
        except Cancelled:
            if await request.is_disconnected():  # nobody to answer
                return Response(status_code=499)
            raise ApiError(503, SHUTTING_DOWN, "server_error") from None
        finally:
            job.stop()  # a no-op once it is done; stops it when this handler is cancelled
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
                "longdoc": extension(result, report_cache),
            }
        )

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

    def streamed(request: Request, parsed: ChatRequest, job: Job) -> Response:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody to tell
                loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))

        job.on_text = lambda piece: put("text", piece)
        future = engine.submit(job)  # before the response starts: shutting down is a 503
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

        def failure(exc: BaseException) -> ApiError:
            if isinstance(exc, Cancelled | CancelledError):  # the client went away (nobody reads this) or shutdown
                return ApiError(503, SHUTTING_DOWN, "server_error")
            if isinstance(exc, LongdocError):
                return ApiError(400, exc.message)
            failed(exc)
            return ApiError(500, f"internal error: {_one_line(exc)}", "server_error")

        async def events() -> AsyncIterator[str]:
            visible = VisibleText()
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
            except Exception as exc:  # noqa: BLE001 (each kind is answered: failure())
                # an error event, then the end of the stream as OpenAI ends one
                yield _sse(failure(exc).body())
                yield "data: [DONE]\n\n"
                return
            rest = visible.finish(result["answer"])
            if rest:
                yield chunk({"content": rest})
            yield chunk({}, finish_reason(result, job), longdoc=extension(result, report_cache))
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

        return EventStream(events(), job)

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


@contextlib.contextmanager
def _documents_dir(folder: "Path | None") -> Iterator[None]:
    """The process's document cache folder set to ``folder`` while serving (None: left as it is)."""
    if folder is None:
        yield
        return
    name = "LONGDOC_DOC_CACHE_DIR"  # read by longdoc.store.documents_dir at every use
    previous = os.environ.get(name)
    os.environ[name] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def serve(
    session: "Session",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    concurrency: int = 1,
    queue: int = 8,
    ready: Callable[[Running], None] | None = None,
    model_name: str | None = None,
    max_body: int | None = None,
    doc_cache: str = "private",
    headers_timeout_s: float = HEADERS_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> None:
    """Serve ``session`` until stopped (Ctrl-C, SIGTERM, or ``Running.stop`` from ``ready``'s argument).

    Port 0 picks a free port (the status line and ``ready`` give the one bound). After a Ctrl-C the
    in-flight generations are cancelled and the server shuts down; uvicorn then raises the
    KeyboardInterrupt again, which the CLI turns into exit 130. With ``doc_cache="private"`` the
    process's document cache is ``served_documents_dir()`` while it serves.
    """
    check_installed()
    private = doc_cache == "private" and session.cfg.doc_cache
    with _documents_dir(served_documents_dir() if private else None):
        app = create_app(
            session,
            api_key=api_key,
            concurrency=concurrency,
            queue=queue,
            model_name=model_name,
            host=host,
            max_body=max_body,
            body_timeout_s=body_timeout_s,
            doc_cache=doc_cache,
        )
        _run(app, session, host, port, api_key, ready, headers_timeout_s)


def _run(
    app: Any,
    session: "Session",
    host: str,
    port: int,
    api_key: str | None,
    ready: Callable[[Running], None] | None,
    headers_timeout_s: float,
) -> None:
    """``serve``'s uvicorn server, until it stops."""
    import uvicorn

    engine: Engine = app.state.engine
    if api_key is None and not _is_loopback(host):
        session.reporter.warn(
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
        http=deadline_protocol(headers_timeout_s, app.state.body_timeout_s),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=MAX_CONNECTIONS,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
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
