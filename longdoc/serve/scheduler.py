"""The served model's scheduler: a request's preparation (template, tokens, fit check), its admission
(``concurrency`` running and ``queue`` waiting), and the worker threads that run generations.

The model is one: generations run in worker threads (``concurrency`` of them, default 1, so one at a
time); each has its own KV store and shares only the read-only weights. At most ``queue`` more
requests wait; beyond that a request gets 429. A request takes its slot before its body is read, so
``concurrency + queue`` also bounds the bodies being read and the prompts being tokenized. A client
that goes away frees its slot at once when queued, else stops its generation at the next prefill step
or token (``Job.stop``).

Importing this module imports neither torch nor the runtime: they come with the first request.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from longdoc.errors import DoesNotFitError, UsageError
from longdoc.render import Reporter
from longdoc.serve.outcome import Outcome, outcome_of, served_sources
from longdoc.serve.prompting import chat_prompt
from longdoc.serve.protocol import ApiError, ChatRequest

if TYPE_CHECKING:
    from longdoc.config import RunConfig
    from longdoc.runtime.local import LocalBackend

SHUTTING_DOWN = "the generation was cancelled: the server is shutting down"


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

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.held = True

    def release(self) -> None:
        with self.scheduler._lock:
            if self.held:
                self.held = False
                self.scheduler.admitted -= 1


@dataclass(eq=False)  # compared and hashed by identity (the scheduler keeps a set of them)
class Job:
    """One admitted request: its token ids, its settings, its slot, and its cancel flag."""

    id: str
    cfg: RunConfig
    prefix_ids: list[int]
    request_ids: list[int]
    slot: Slot | None = None
    cache_salt: bytes = b""
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    future: Future[Outcome] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.request_ids)

    def stop(self) -> None:
        """Its client went away (or the server stops): a running generation ends at its next step, a
        queued one never starts and gives its slot back now (``Scheduler.submit``'s done callback)."""
        self.cancel.set()
        if self.future is not None:
            self.future.cancel()


def longest_token(tokenizer: Any) -> int:
    """The most characters one token stands for: the longest string in the vocabulary (byte-level BPE
    strings hold a character per byte, so at least as many as the text they decode to)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        vocab = {}
    return max((len(token) for token in vocab), default=0) or 64


class Scheduler:
    """The served backend's requests: preparation, admission, and the worker threads that run them.
    ``admitted`` (running or waiting), ``running`` and ``stats`` are what /health and tests read."""

    def __init__(
        self,
        backend: LocalBackend,
        concurrency: int,
        queue: int,
        model_name: str | None,
        cache_salt: bytes = b"",
    ):
        from longdoc.runtime.plan import make_plan

        if concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        if queue < 0:
            raise UsageError("--queue must be 0 or more")
        self.backend = backend
        self.concurrency = concurrency
        self.queue = queue
        self.model_name = model_name or backend.info.name
        self.created = int(time.time())
        # the context limit as the fit check applies it (prompt + answer), known before any request
        probe = replace(backend.cfg, generation=replace(backend.cfg.generation, max_new_tokens=1))
        self.context_length = make_plan(probe, backend.info, 1).max_context
        # No token is longer than the vocabulary's longest string: a text of more characters than this
        # cannot fit, whatever its tokens (a bound checked before tokenizing, which is the costly part).
        self.max_chars = self.context_length * longest_token(backend.tokenizer)
        self.cache_salt = cache_salt
        # load now (not in the first request) and compute what every request's copy of the backend shares
        backend.loaded()
        backend.model_identity()
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="longdoc-generate")
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self.admitted = 0  # running or waiting
        self.running = 0
        self.jobs: set[Job] = set()
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    @property
    def reporter(self) -> Reporter:
        """The server's reporter (its status line and warnings)."""
        return self.backend.reporter

    def serves(self, model: str | None) -> bool:
        """Whether a request naming ``model`` (None: any) is for the served model."""
        return model is None or model in (self.model_name, self.backend.info.name)

    # preparing -------------------------------------------------------------------------------------
    def check_chars(self, chat: ChatRequest) -> None:
        """ApiError(400) for messages too long for the context whatever their tokens, before tokenizing."""
        if chat.chars > self.max_chars:
            raise ApiError(
                400,
                f"the messages hold {chat.chars:,} characters, more than the context limit of"
                f" {self.context_length:,} tokens can hold ({self.max_chars:,} characters at most)",
                code="context_length_exceeded",
                param="messages",
            )

    def prepare(self, chat: ChatRequest, slot: Slot | None = None) -> Job:
        """Template, tokens and fit check of a request (off the event loop: a long document takes a
        while to tokenize). Raises ApiError(400) for a prompt that does not fit."""
        from longdoc.config import GenerationConfig
        from longdoc.runtime.plan import make_plan

        self.check_chars(chat)
        backend = self.backend
        with self._tokenizer_lock:
            prompt = chat_prompt(backend.tokenizer, chat.messages, chat.prefix_chars)
            prefix_ids, request_ids = backend.split(prompt)
        if not request_ids:  # the prefill of the request's part yields the first token's logits
            prefix_ids, request_ids = prefix_ids[:-1], prefix_ids[-1:]
        prompt_tokens = len(prefix_ids) + len(request_ids)
        default, sampling = backend.cfg.generation, chat.sampling
        max_new = sampling.max_tokens
        if max_new is None:  # what the server gives by default, within what the context has left
            max_new = max(1, min(default.max_new_tokens, self.context_length - prompt_tokens))
        generation = GenerationConfig(
            max_new_tokens=max_new,
            temperature=default.temperature if sampling.temperature is None else sampling.temperature,
            top_p=default.top_p if sampling.top_p is None else sampling.top_p,
            seed=default.seed if sampling.seed is None else sampling.seed,
        )
        cfg = replace(backend.cfg, generation=generation)
        try:
            make_plan(cfg, backend.info, prompt_tokens)
        except DoesNotFitError as exc:
            raise ApiError(400, exc.message, code="context_length_exceeded", param="messages") from None
        return Job(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            cfg=cfg,
            prefix_ids=prefix_ids,
            request_ids=request_ids,
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

    def submit(self, job: Job) -> Future[Outcome]:
        """Queue ``job`` (its slot reserved: ``reserve``) for a worker. A job whose future is cancelled
        before a worker took it (``Job.stop``: its client left) gives its slot back at once."""
        if job.slot is None:  # a job prepared without a slot (tests): take one now
            job.slot = self.reserve()
        with self._lock:
            self.jobs.add(job)
        try:
            future = self.executor.submit(self._generate, job)
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
    def _generate(self, job: Job) -> Outcome:
        from longdoc.runtime import local

        status = "failed"
        outcome: Outcome | None = None
        with self._lock:
            self.running += 1
        try:
            if job.cancel.is_set():
                raise Cancelled()
            # the backend as this request sees it: its own settings and reporter, the shared model
            backend = copy.copy(self.backend)
            backend.cfg = job.cfg
            backend.reporter = _RequestReporter(job.cancel, self.backend.reporter)

            def on_text(piece: str) -> None:
                if job.cancel.is_set():
                    raise Cancelled()
                if job.on_text is not None:
                    job.on_text(piece)

            sources = served_sources(len(job.prefix_ids))
            conversation = local.Conversation(
                backend, job.prefix_ids, job.prompt_tokens, sources, cache_salt=job.cache_salt
            )
            result = conversation.answer(job.request_ids, sources, on_text)
            outcome = outcome_of(result, job.cfg.generation.max_new_tokens)
            status = "completed"
            return outcome
        except Cancelled:
            status = "cancelled"
            raise
        finally:
            with self._lock:
                self.running -= 1
                self.stats[status] += 1
            self._release(job)
            self._log(job, outcome, status)

    def _log(self, job: Job, outcome: Outcome | None, status: str) -> None:
        took = time.perf_counter() - job.started
        if outcome is not None:
            prefix = (
                f"prefix {outcome.prefix_tokens:,} tok {'from the cache' if outcome.cache_hit else 'prefilled'}"
                if outcome.prefix_tokens
                else "no prefix"
            )
            self.reporter.status(
                f"{job.id[9:21]}: {outcome.prompt_tokens:,} + {outcome.generated_tokens:,} tokens, {prefix},"
                f" {took:.1f}s"
            )
        elif status == "cancelled":
            self.reporter.status(f"{job.id[9:21]}: cancelled (the client went away, or shutdown) after {took:.1f}s")
