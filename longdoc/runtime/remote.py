"""The remote engine: with ``--endpoint URL``, ``ask``, ``summarize`` and ``chat`` send their model calls to
an OpenAI-compatible server (``longdoc serve``, vLLM, llama.cpp's ``llama-server``).

Everything else stays local and runs the same code: ingestion, prompts, the fit checks, map-reduce,
``--each``, citations and the JSON result. ``RemoteBackend`` is the ``runtime.backend.Backend`` whose
methods (``plan``, ``run``, ``map``, ``chat``) talk to the server; it loads the tokenizer of ``--model``
(token counts for the fit checks: an estimate when the server runs another model) and never the weights.

A prompt goes out as longdoc renders it, as chat messages: the system template as the system message,
the filled template as the user message, and ``longdoc_prefix_chars`` (a field other servers ignore)
saying where its documents end, so that ``longdoc serve`` tokenizes it exactly as a local run does and
reuses the documents' KV cache. Answers stream back; greedy decoding is temperature 0, as locally.

Failures become one line and an exit code (``RemoteBackend._error``): a server that cannot be reached,
fails (5xx), refuses a request, stays silent past the timeouts, answers something that is not the API,
drops the connection or ends an answer without finishing it exits 3, like a model that cannot be
loaded; a refused key 2; a prompt the server finds too long 4. A request is retried with backoff only
before any of its answer arrived: on a refused connection, 429 and 503.

The key sent is ``--api-key`` (or ``LONGDOC_API_KEY``), never the ambient ``OPENAI_API_KEY`` nor the
openai client's organization and project variables: an endpoint is any server the user names.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from longdoc import models
from longdoc.config import RunConfig
from longdoc.errors import DoesNotFitError, LongdocError, ModelError, RemoteError, UsageError
from longdoc.ingest import Document
from longdoc.prompt import Budget, Prompt, ask_prompt, chat_text, follow_up, template
from longdoc.render import Reporter
from longdoc.runtime.backend import Answer, OnText, PromptTokens
from longdoc.runtime.plan import Plan, model_info
from longdoc.runtime.result import (
    REMOTE_DCA,
    REMOTE_PREFILL,
    REMOTE_RECYCLE,
    Cache,
    Memory,
    RemoteEngine,
    Result,
    Source,
    Timings,
    Usage,
    peak_rss_bytes,
)

_T = TypeVar("_T")
_R = TypeVar("_R")

# The key sent when none is given: servers started without one ignore it, and the openai client
# refuses to run without some key (vLLM's documentation uses the same word).
NO_KEY = "EMPTY"
CONNECT_TIMEOUT_S = 10.0
# GET /models is answered at once by any working server: a silent one is given up on after this.
MODELS_TIMEOUT_S = 30.0
# The longest silence tolerated inside an answer (--timeout): a long prefill on a busy server sends
# nothing for minutes (longdoc serve sends keep-alive comments; vLLM and llama.cpp do not).
READ_TIMEOUT_S = 300.0
# Pauses before the retries of a request that got no answer at all (a refused connection: the server
# may still be starting; 429 and 503: busy). A Retry-After header takes precedence, up to the cap.
RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0)
MAX_RETRY_AFTER_S = 30.0
# A 400 whose message says this is about the prompt's length: exit 4, as locally. Seen: longdoc serve
# ("exceeds the context limit", code context_length_exceeded), vLLM ("maximum context length"),
# llama.cpp ("exceeds the available context size", type exceed_context_size_error).
_OVER_LONG = re.compile(r"context[ _](length|limit|size|window)|maximum context|exceed_context", re.IGNORECASE)
TOO_LONG_HINT = (
    "pass fewer inputs, select pages with --pages, narrow a folder with --include/--exclude, or serve a model"
    " with a longer context (vLLM: --max-model-len; llama-server: -c)"
)
# Where the user message starts and ends in the rendered chat text (see RemoteBackend.prompt_messages).
_MARK = "\ue000longdoc-user\ue000"


@dataclass(frozen=True)
class RemoteOptions:
    """``--endpoint`` and its companion options, checked."""

    url: str  # the API's base URL, the one /models and /chat/completions hang off (usually ending in /v1)
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    concurrency: int = 1  # requests in flight at once (--each, map-reduce)
    timeout: float = READ_TIMEOUT_S  # seconds of silence tolerated within an answer (--timeout)


def options(
    url: str | None,
    api_key: str | None = None,
    model: str | None = None,
    concurrency: int = 1,
    timeout: float = READ_TIMEOUT_S,
    quantize: str = "auto",
) -> RemoteOptions | None:
    """The remote options of a command (``--endpoint`` and its companions, ``quantize`` its --quantize),
    or None without --endpoint. Raises UsageError for a malformed URL and for options that need, or
    cannot go with, --endpoint."""
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if not timeout > 0:
        raise UsageError("--timeout must be more than 0 seconds")
    if url is None:
        if model is not None or concurrency != 1 or timeout != READ_TIMEOUT_S:
            raise UsageError(
                "--remote-model, --concurrency and --timeout go with --endpoint URL (a server to send requests to)"
            )
        return None
    if importlib.util.find_spec("openai") is None:
        raise UsageError("--endpoint needs the openai client library: pip install 'longdoc[remote]'")
    if quantize not in ("auto", "none"):
        raise UsageError("--quantize quantizes the local model; with --endpoint the server's weights are its own")
    return RemoteOptions(
        url=base_url(url),
        api_key=api_key or None,
        model=model,
        concurrency=concurrency,
        timeout=timeout,
    )


def exposed_key(url: str, api_key: str | None) -> bool:
    """Whether ``api_key`` would cross the network in clear: plain http to a host that is not this machine."""
    parts = urlsplit(url)
    if not api_key or parts.scheme != "http":
        return False
    host = parts.hostname or ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def base_url(url: str) -> str:
    """The API base of ``--endpoint``: as given, or with /v1 added to a bare address (http://host:8000)."""
    parts = urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--endpoint {url!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") or "/v1", parts.query, ""))


def local_only(cfg: RunConfig) -> list[str]:
    """The settings of ``cfg`` that steer the local engine, which --endpoint replaces, where they differ
    from the defaults: the options that set them."""
    d = RunConfig()
    settings = [
        ("--device", cfg.device, d.device),
        ("--dtype", cfg.dtype, d.dtype),
        ("--dca", cfg.dca.enabled, d.dca.enabled),
        ("--chunk-size", cfg.dca.chunk_size, d.dca.chunk_size),
        ("--local-window", cfg.dca.local_window, d.dca.local_window),
        ("--dca-temperature", cfg.dca.temperature, d.dca.temperature),
        ("--recycle", cfg.recycle.enabled, d.recycle.enabled),
        ("--recycle-k", cfg.recycle.k, d.recycle.k),
        ("--recycle-stride", cfg.recycle.stride, d.recycle.stride),
        ("--recycle-schedule", cfg.recycle.schedule, d.recycle.schedule),
        ("--recycle-threshold", cfg.recycle.threshold, d.recycle.threshold),
        ("--prefill", cfg.prefill.mode, d.prefill.mode),
        ("--prefill-budget", cfg.prefill.budget, d.prefill.budget),
        ("--cache-max-gb", cfg.cache_max_gb, d.cache_max_gb),
        ("-o prefill_step", cfg.prefill_step, d.prefill_step),
        ("-o kernel", cfg.kernel, d.kernel),
        ("-o pack", cfg.pack, d.pack),
    ]
    return [name for name, value, default in settings if value != default]


def reported_context(card: dict[str, Any]) -> int | None:
    """The context length a /models entry reports: ``max_model_len`` (vLLM, longdoc serve),
    ``context_length`` (longdoc serve, some proxies), ``meta.n_ctx`` / ``meta.n_ctx_train`` (llama.cpp)."""
    meta = card.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    for value in (card.get("max_model_len"), card.get("context_length"), meta.get("n_ctx"), meta.get("n_ctx_train")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class RemoteBackend:
    """The model runs on a server: the tokenizer of ``--model`` is loaded (prompts and counts), the
    weights never are. Requests run up to ``concurrency`` at once, in threads of ``map``."""

    def __init__(self, cfg: RunConfig, reporter: Reporter, remote: RemoteOptions) -> None:
        import openai

        t0 = time.perf_counter()
        self.cfg = cfg
        self.reporter = reporter
        self.url = remote.url
        self.concurrency = remote.concurrency
        self.timeout = remote.timeout
        if exposed_key(remote.url, remote.api_key):
            reporter.warn(f"the API key goes to {remote.url} over plain http: anyone on the way can read it")
        omit: Any = openai.Omit()  # a header the client must leave out
        self.client = openai.OpenAI(
            base_url=remote.url,
            api_key=remote.api_key or NO_KEY,
            max_retries=0,  # retried here, where it is known what is safe to retry
            timeout=openai.Timeout(remote.timeout, connect=CONNECT_TIMEOUT_S),
            # the client would add $OPENAI_ORG_ID and $OPENAI_PROJECT_ID, meant for OpenAI, to every request
            default_headers={"OpenAI-Organization": omit, "OpenAI-Project": omit},
        )
        self._slots = threading.BoundedSemaphore(remote.concurrency)
        self._stop = threading.Event()  # set by a Ctrl-C: requests in flight in other threads end
        self._dropped: set[str] = set()  # optional request fields this server refused
        self.model, reported = self._connect(remote.model)
        if reported is None and cfg.max_context is None:
            raise UsageError(
                f"the server at {self.url} does not report its context length; pass --max-context N (its limit)"
            )
        self.max_context = min(n for n in (reported, cfg.max_context) if n is not None)
        # only the tokenizer is used: auto's choice (a speed probe, maybe a larger model) means nothing here
        spec = cfg.model if cfg.model and cfg.model.strip().lower() != models.AUTO_MODEL else models.DEFAULT_MODEL
        local = model_info(spec, "cpu", "float32", progress=reporter.status, warn=reporter.warn)
        self.tokenizer_name = local.name
        self.tokens = PromptTokens(local.tokenizer)  # counts run in worker threads too: it locks
        self.load_s = time.perf_counter() - t0
        reporter.status(
            f"remote model {self.model} at {self.url} (context {self.max_context:,} tokens); "
            f"counting tokens with the tokenizer of {local.name}"
        )

    @property
    def name(self) -> str:
        return str(self.model)

    @property
    def tokenizer(self) -> Any:
        return self.tokens.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokens.encode(text)

    def count(self, text: str | Prompt) -> int:
        return self.tokens.count(text)

    # the backend ------------------------------------------------------------------------------------
    def describe(self) -> RemoteEngine:
        return RemoteEngine(
            url=self.url, model=self.name, context_length=self.max_context, tokenizer=self.tokenizer_name
        )

    def empty(self, sources: list[Source]) -> Result:
        return Result.empty(self.name, self.describe(), sources, self.load_s)

    def plan(self, prompt_tokens: int, reserve: int = 0) -> Plan:
        """The fit check against the server's context (memory is the server's business)."""
        new = self.cfg.generation.max_new_tokens
        Budget(prompt_tokens, new, self.max_context).check(TOO_LONG_HINT)
        return Plan(
            prompt_tokens=prompt_tokens,
            max_new_tokens=new,
            window=self.max_context,
            layout=None,
            max_context=self.max_context,
            recycle=False,
            kv_bytes=0,
            weight_bytes=0,
        )

    def run(
        self,
        prompt: Prompt,
        sources: list[Source],
        on_text: OnText | None = None,
        cache: bool = True,
        max_new_tokens: int | None = None,
    ) -> Result:
        new = max_new_tokens or self.cfg.generation.max_new_tokens
        tokens = self.count(prompt)
        Budget(tokens, new, self.max_context).check(TOO_LONG_HINT)
        messages, documents = self.prompt_messages(prompt)
        # no document part: longdoc serve then keeps no prefix of this prompt, as a local run would not
        return self.request(messages, documents if cache and self.cfg.doc_cache else 0, new, tokens, sources, on_text)

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``fn`` over ``items``, up to ``concurrency`` at once (a batching server such as vLLM runs them
        together); results in order. A Ctrl-C ends every request in flight."""
        if self.concurrency == 1 or len(items) < 2:
            return [fn(item) for item in items]  # in this thread: a Ctrl-C lands in the request
        pool = ThreadPoolExecutor(min(self.concurrency, len(items)), thread_name_prefix="longdoc-remote")
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def answerer(self, prompts: Sequence[Prompt], sources: list[Source]) -> Answer:
        """One request each: the server shares the documents' prefix between them (``longdoc serve``'s
        document cache, vLLM's prefix caching)."""
        return lambda prompt, on_text: self.run(prompt, sources, on_text)

    def chat(self, docs: list[Document], sources: list[Source]) -> RemoteChat:
        return RemoteChat(self, docs, sources)

    def stop(self) -> None:
        """End the requests in flight (after a Ctrl-C in the main thread), at their next piece."""
        self._stop.set()

    # requests ---------------------------------------------------------------------------------------
    def prompt_messages(self, prompt: Prompt) -> tuple[list[dict[str, str]], int]:
        """The chat messages ``prompt.render`` wrapped into ``prompt`` (the system template, and the
        filled template as the user's), and how many characters of the user message are documents.

        Taken back out of the rendered text by rendering the same two turns with a stand-in for the
        user's, as ``prompt.render`` finds the documents."""
        system = template("system").strip()
        marked = chat_text(self.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": _MARK}])
        head, _, tail = marked.partition(_MARK)
        text = prompt.text
        if len(text) < len(head) + len(tail) or not (text.startswith(head) and text.endswith(tail)):
            raise UsageError(
                "--endpoint sends prompts as chat messages, but the chat template of --model does not pass a"
                " message through unchanged; choose another --model for the tokenizer"
            )
        user = text[len(head) : len(text) - len(tail)]
        documents = min(len(user), max(0, len(prompt.prefix) - len(head)))
        return [{"role": "system", "content": system}, {"role": "user", "content": user}], documents

    def request(
        self,
        messages: list[dict[str, str]],
        documents: int | None,
        max_new: int,
        estimate: int,
        sources: list[Source],
        on_text: OnText | None = None,
    ) -> Result:
        """One streamed chat completion; returns the JSON result (``Conversation.answer``'s fields, with
        ``engine``, the server's ``usage`` and, from longdoc serve, its own figures under ``server``).

        ``documents``: the characters of the last message that are documents (None: not said).
        ``estimate``: the prompt's tokens by the local tokenizer, for when the server reports no usage.
        A Ctrl-C keeps what arrived and marks the result ``interrupted``.
        """
        gen = self.cfg.generation
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_new,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "stream": True,
        }
        if gen.seed is not None:
            body["seed"] = gen.seed
        optional: dict[str, Any] = {"stream_options": {"include_usage": True}}
        if documents is not None:
            optional["longdoc_prefix_chars"] = documents
        pieces: list[str] = []
        usage: Any = None
        extension: dict[str, Any] | None = None
        first: float | None = None
        finished = False  # a finish_reason arrived: the server says the answer is whole
        interrupted = False
        with self._slots:
            t0 = time.perf_counter()
            try:
                stream = self._start(body, optional)
                try:
                    chunks = iter(stream)
                    while not self._stop.is_set():
                        try:
                            chunk = next(chunks)
                        except StopIteration:
                            break
                        except Exception as exc:  # an error event, or a broken connection (the transport's own)
                            raise self._error(exc, "the answer") from None
                        usage = chunk.usage or usage
                        extension = (chunk.model_extra or {}).get("longdoc") or extension
                        for choice in chunk.choices:
                            finished = finished or bool(choice.finish_reason)
                            text = choice.delta.content if choice.delta else None
                            if text:
                                first = first or time.perf_counter()
                                pieces.append(text)
                                if on_text:
                                    on_text(text)
                    interrupted = self._stop.is_set()
                    if not finished and not interrupted:  # cut off: a partial answer is not an answer
                        raise RemoteError(
                            f"the server at {self.url} ended the answer before it was complete (no finish_reason"
                            f" after {sum(map(len, pieces)):,} characters)"
                        )
                finally:
                    stream.close()  # a server that sees the client go stops generating
            except KeyboardInterrupt:
                interrupted = True
            end = time.perf_counter()
        text = "".join(pieces)
        generated = usage.completion_tokens if usage else len(self.encode(text))
        prompt_tokens = usage.prompt_tokens if usage else estimate
        ttft = (first or end) - t0
        decode_s = end - first if first else 0.0
        return Result(
            answer=text.strip(),
            model=self.name,
            engine=self.describe(),
            prompt_tokens=prompt_tokens,
            generated_tokens=generated,
            usage=Usage(usage.prompt_tokens, usage.completion_tokens) if usage else None,
            sources=sources,
            # measured here: the time to first token includes the network and the server's queue
            timings=Timings(
                load_s=round(self.load_s, 3),
                prefill_s=round(ttft, 3),
                decode_s=round(decode_s, 3),
                prefill_tok_s=round(prompt_tokens / ttft, 1) if ttft > 0 else 0.0,
                decode_tok_s=round((generated - 1) / decode_s, 2) if decode_s > 0 and generated > 1 else 0.0,
                ttft_s=round(ttft, 3),
                request_s=round(end - t0, 3),
            ),
            memory=Memory(peak_rss_bytes=peak_rss_bytes()),
            # the server decides its own attention; its own document cache is under "server"
            dca=REMOTE_DCA,
            recycle=REMOTE_RECYCLE,
            prefill=REMOTE_PREFILL,
            cache=Cache(hit=False),
            server=extension or None,
            interrupted=True if interrupted else None,
        )

    def _start(self, body: dict[str, Any], optional: dict[str, Any]) -> Any:
        """Send a streamed request and return the stream once the server answered (before any text)."""
        import openai

        def create() -> Any:
            extra = {name: value for name, value in optional.items() if name not in self._dropped}
            try:
                return self.client.chat.completions.create(**body, extra_body=extra)
            except openai.BadRequestError as exc:
                refused = next((name for name in extra if name in _message(exc)), None)
                if refused is None:
                    raise
                # a server that validates strictly: this one field is not worth failing for
                self._dropped.add(refused)
                self.reporter.status(f"the server at {self.url} refuses '{refused}'; sending requests without it")
                return create()

        return self._retrying(create, "POST /chat/completions")

    def _connect(self, wanted: str | None) -> tuple[str, int | None]:
        """The served model (``wanted``, else the first listed) and the context length it reports."""
        import openai

        quick = self.client.with_options(timeout=openai.Timeout(MODELS_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        raw = self._retrying(lambda: quick.models.with_raw_response.list(), "GET /models")
        kind = raw.headers.get("content-type", "").partition(";")[0].strip() or "no content type"
        not_api = f"the server at {self.url} answered GET /models with {{}}, not an OpenAI model list; is --endpoint"
        not_api += " the API's address (it usually ends in /v1)?"
        if "json" not in kind:
            raise RemoteError(not_api.format(kind))
        try:
            listed = list(raw.parse())
        except Exception:  # noqa: BLE001 (whatever the library makes of malformed JSON: one line, exit 3)
            raise RemoteError(not_api.format("malformed JSON")) from None
        cards = {card.id: card for card in listed if isinstance(getattr(card, "id", None), str)}
        if not cards:
            raise RemoteError(f"the server at {self.url} lists no model (GET /models)")
        if wanted is not None and wanted not in cards:
            served = ", ".join(repr(name) for name in cards)
            raise ModelError(f"the server at {self.url} does not serve {wanted!r} (--remote-model); it serves {served}")
        card = cards[wanted] if wanted is not None else next(iter(cards.values()))
        return card.id, reported_context(card.model_dump())

    def _retrying(self, call: Callable[[], _T], what: str) -> _T:
        """``call``, retried after a pause while that is safe: the connection was refused (nothing was
        sent) or the server answered 429 or 503 (nothing was done); other failures raise at once."""
        import openai

        for attempt in range(len(RETRY_DELAYS_S) + 1):
            try:
                return call()
            except openai.APIError as exc:
                delay = _retry_delay(exc, attempt)
                if delay is None:
                    raise self._error(exc, what) from None
                self.reporter.status(f"{what}: {_reason(exc)}; retrying in {delay:g}s")
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt raises")

    def _error(self, exc: Exception, what: str) -> LongdocError:
        """A failure of ``what`` (a request, or the answer's stream) as one line with its exit code."""
        import openai

        server = f"the server at {self.url}"
        cause = type(exc.__cause__).__name__  # httpx or httpx2, depending on the openai version
        if isinstance(exc, openai.APIConnectionError) and cause in ("ConnectError", "ConnectTimeout"):
            return RemoteError(f"cannot reach {server} ({_reason(exc)}); is it running, and is --endpoint right?")
        if isinstance(exc, openai.APITimeoutError):
            limit = MODELS_TIMEOUT_S if what == "GET /models" else self.timeout
            hint = "" if what == "GET /models" else "; a slow prefill may need a longer --timeout"
            return RemoteError(f"{server} sent nothing for {limit:g}s during {what}{hint}")
        if isinstance(exc, openai.APIConnectionError):  # it was reached: the connection broke afterwards
            return RemoteError(f"the connection to {server} broke during {what} ({_reason(exc)})")
        text = _message(exc)
        if _over_long(exc):
            return DoesNotFitError(f"{server} says the prompt does not fit: {text}")
        if not isinstance(exc, openai.APIStatusError):  # mid-answer: an error event, or the connection broke
            return RemoteError(f"{server} failed during {what}: {text}")
        status = exc.status_code
        if status in (401, 403):
            return UsageError(f"{server} refused the API key ({status}: {text}); pass --api-key or set LONGDOC_API_KEY")
        if status == 404 and what == "GET /models":
            return UsageError(f"no OpenAI-compatible API at {self.url} (GET /models: 404); it usually ends in /v1")
        if status == 404:
            return ModelError(f"{server} does not know the model {self.model!r} ({status}: {text}); see --remote-model")
        if status == 429:
            return RemoteError(f"{server} is still busy after {len(RETRY_DELAYS_S)} retries (429: {text})")
        if status >= 500:
            return RemoteError(f"{server} failed ({status}: {text})")
        return RemoteError(f"{server} refused the request ({status}: {text})")


def _retry_delay(exc: Exception, attempt: int) -> float | None:
    """Seconds to wait before retrying after ``exc``, or None where a retry is unsafe or used up."""
    import openai

    if attempt >= len(RETRY_DELAYS_S):
        return None
    if isinstance(exc, openai.APIConnectionError):
        # refused (nothing was sent) yes; a timeout or a dropped connection may have reached the server: no.
        # Matched by name: the HTTP library is httpx or httpx2, depending on the openai version.
        return RETRY_DELAYS_S[attempt] if type(exc.__cause__).__name__ == "ConnectError" else None
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (429, 503):
        try:
            after = float(exc.response.headers.get("retry-after", ""))
        except ValueError:
            return RETRY_DELAYS_S[attempt]
        return min(max(after, 0.0), MAX_RETRY_AFTER_S)
    return None


def _message(exc: Exception) -> str:
    """The server's message in an API error (OpenAI-style ``{"error": {"message"}}``, vLLM's flat
    ``{"message"}``), on one line."""
    body = getattr(exc, "body", None)
    text = body.get("message") if isinstance(body, dict) else body if isinstance(body, str) else None
    if not isinstance(text, str) or not text.strip():
        text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _over_long(exc: Exception) -> bool:
    body = getattr(exc, "body", None)
    fields = [_message(exc)] + ([str(body.get(k)) for k in ("code", "type")] if isinstance(body, dict) else [])
    status = getattr(exc, "status_code", 400)
    return status == 400 and any(_OVER_LONG.search(f) for f in fields)


def _reason(exc: Exception) -> str:
    """Why a request failed, in a few words: the status, or the transport's own error."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"{status}: {_message(exc)}"
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else _message(exc)


class RemoteChat:
    """``chat`` through ``--endpoint``: the conversation is the list of its messages, sent whole with
    each question. The first request says where the documents end, as ``ask`` does, so that ``longdoc
    serve`` reuses their KV cache; later turns are read again by the server (vLLM's prefix caching and
    llama.cpp's slot cache spare that)."""

    def __init__(self, session: RemoteBackend, docs: list[Document], sources: list[Source]):
        self.session = session
        self.docs = docs
        self.sources = sources
        self.messages: list[dict[str, str]] = []
        self.tokens = 0  # the conversation so far, prompt and answers, as the last turn counted it
        self.turns = 0

    def prepare(self) -> None:
        """Nothing to bring in ahead: the server reads the documents with the first question."""

    def turn(self, question: str, on_text: OnText | None = None) -> Result:
        session = self.session
        new = session.cfg.generation.max_new_tokens
        if not self.messages:
            prompt = ask_prompt(session.tokenizer, self.docs, question)
            messages, documents = session.prompt_messages(prompt)
            tokens: int = session.count(prompt)
            documents_hint: int | None = documents if session.cfg.doc_cache else 0
            Budget(tokens, new, session.max_context).check(TOO_LONG_HINT)
        else:
            # the next turn as the local template writes it (raises for an empty question), for its count
            tokens = self.tokens + len(session.encode(follow_up(session.tokenizer, question)))
            messages, documents_hint = [*self.messages, {"role": "user", "content": question.strip()}], None
            if tokens + new > session.max_context:
                raise DoesNotFitError(
                    f"this turn would bring the conversation to {tokens + new:,} tokens, over the context limit of"
                    f" {session.max_context:,}; start a new chat (or raise --max-context)"
                )
        result = session.request(messages, documents_hint, new, tokens, self.sources, on_text)
        if not result.interrupted or result.generated_tokens:  # an answer, even a cut one, is in context
            self.messages = [*messages, {"role": "assistant", "content": result.answer}]
            self.tokens = result.prompt_tokens + result.generated_tokens
            self.turns += 1
        result.question = question
        result.turn = self.turns
        return result
