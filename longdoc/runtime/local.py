"""The model in this process, as a ``Backend``: prompt -> fit checks -> model -> prefill -> decode -> result.

``LocalBackend`` resolves and verifies the model, loads it on first use, and answers prompts through
a ``Conversation``: a KV cache holding a document prefix (prefilled, or loaded from the document
cache) and the questions or chat turns that follow it. Tasks, the CLI, the server, tests and
benchmarks all run the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from longdoc import models
from longdoc.attention.kernels import get_kernel
from longdoc.config import RunConfig
from longdoc.cpu import onednn_packs
from longdoc.engine.decode import generate
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import Progress, prefill
from longdoc.engine.recycled import RecycledPolicy
from longdoc.errors import DoesNotFitError, ModelError, UsageError
from longdoc.ingest import Document
from longdoc.models.weights import trim_heap
from longdoc.prompt import Prompt, ask_prompt, follow_up
from longdoc.quant import schemes
from longdoc.quant.cache import load_quantized
from longdoc.quant.packing import pack_linears, packing_pays
from longdoc.render import Reporter, TokenStreamer
from longdoc.runtime import doccache, machine
from longdoc.runtime.backend import Answer, OnText, PromptTokens
from longdoc.runtime.plan import ModelInfo, Plan, make_plan, model_info, prefill_entry
from longdoc.runtime.result import (
    Cache,
    Dca,
    LocalEngine,
    Memory,
    Recycle,
    Result,
    Source,
    Timings,
    peak_rss_bytes,
)

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class LocalBackend:
    """The model in this process plus settings, reused across runs (``--each``, evals, map-reduce)."""

    cfg: RunConfig
    reporter: Reporter
    info: ModelInfo = field(init=False)
    _loaded: models.LoadedModel | None = None
    _identity: str | None = None
    tokens: PromptTokens = field(init=False)
    load_s: float = 0.0
    packed: bool = False  # whether the linears were packed for oneDNN at load

    def __post_init__(self) -> None:
        # transformers' model code takes over a second to import: import it while the tokenizer loads
        # and the weights are verified, rather than after (loaded() waits for it). The package itself
        # first, here: a thread importing it half-way would show the tokenizer import a partial module.
        import transformers  # noqa: F401

        self._model_code = threading.Thread(target=_import_model_code, daemon=True)
        self._model_code.start()
        self.info = model_info(
            self.cfg.model,
            self.cfg.device,
            self.cfg.dtype,
            progress=self.reporter.status,
            warn=self.reporter.warn,
            quantize=self.cfg.quantize,
        )
        self.tokens = PromptTokens(self.info.tokenizer)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    def loaded(self) -> models.LoadedModel:
        if self._loaded is None:
            t0 = time.perf_counter()
            self._model_code.join()
            hint = machine.slow_path_hint(self.paths) if self.info.device.type == "cpu" else None
            if hint:
                self.reporter.status(hint)
            self.reporter.status(f"loading {self.info.name} ({self.info.numerics}, {self.info.device})")
            # the folder is verified already: load it as a plain folder source
            folder = models.ModelSource(kind="folder", name=self.info.name, path=self.info.folder)
            # packed runs load their linears as stored and widen each while packing it (no float32 copy
            # of the weights beside the packed one)
            pack = self.cfg.pack == "on" or (self.cfg.pack == "auto" and packing_pays(self.info.dtype))
            pack = pack and self.info.device.type == "cpu" and onednn_packs(self.info.dtype)
            # q8 holds the only copy of the linears' weights: they are not even read, and prefill unpacks
            # the quantized ones a few at a time (benchmarks/RESULTS.md, "One copy of the weights")
            one_copy = self.info.quant_folder is not None and self.info.quantize in schemes.ONE_COPY
            self._loaded = models.load_model(
                folder,
                self.info.device,
                self.info.dtype,
                tokenizer=self.tokenizer,
                narrow_linears=pack and not one_copy,
                skip_linears=one_copy,
            )
            if self.info.quant_folder is not None:
                # wrapped before packing: pack_linears then packs the wrapped layers (prefill's path)
                tensors = load_quantized(self.info.quant_folder)
                try:
                    schemes.quantize_linears(
                        self._loaded.model, self.info.quantize, tensors, dtype=self.info.dtype, keep_dense=not one_copy
                    )
                except ValueError as exc:
                    raise ModelError(f"{self.info.quant_folder}: {exc}") from exc
                finally:
                    tensors.close()
                trim_heap()  # the codes read and freed while packing
            self.packed = bool(pack and pack_linears(self._loaded.model, self.info.dtype, after_each=trim_heap))
            if (
                not onednn_packs(self.info.dtype)
                and self.info.device.type == "cpu"
                and self.info.dtype == torch.bfloat16
            ):
                self.reporter.warn(
                    "this CPU (or the ISA cap) has no native bfloat16 matmuls: bfloat16 runs slowly here;"
                    " --dtype float32 (what auto picks here) is faster"
                )
            for note in machine.kernel_notes(self.paths):
                self.reporter.warn(note)
            self.load_s = time.perf_counter() - t0
        return self._loaded

    def count(self, text: str | Prompt) -> int:
        return self.tokens.count(text)

    def split(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        """A prompt's token ids as (document prefix, request), tokenized apart (``prompt.Prompt``)."""
        return self.tokens.split(prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokens.encode(text)

    def model_identity(self) -> str:
        if self._identity is None:
            self._identity = doccache.model_identity(self.info.folder)
        return self._identity

    def long_model(self, plan: Plan) -> LongModel:
        kernel = get_kernel(self.cfg.kernel, self.info.device)
        settings = AttentionSettings(
            plan.layout, kernel, plan.logit_scale, sparse=plan.sparse, kv_dtype=self.info.kv_dtype
        )
        return LongModel(self.loaded().model, settings)

    @property
    def paths(self) -> machine.MachinePaths:
        """What this run gets on this machine (dtype, packing, quantization, attention kernel) and why."""
        info, cfg = self.info, self.cfg
        return machine.paths(info.device, info.dtype, info.quantize, cfg.pack, cfg.kernel, info.model_why)

    def describe(self) -> LocalEngine:
        paths = self.paths
        return LocalEngine(
            model=self.info.name,
            device=str(self.info.device),
            dtype=self.info.numerics,
            cpu=paths.cpu_class,
            isa_cap=paths.isa_cap,
            packed=paths.packed,
            quantize=paths.quantize,
            attention=paths.attention,
        )

    def empty(self, sources: list[Source]) -> Result:
        return Result.empty(self.info.name, self.describe(), sources, self.load_s, quantize=self.info.quantize)

    def plan(self, prompt_tokens: int, reserve: int = 0) -> Plan:
        """The plan for a prompt this long (``make_plan``: the fit checks, context and memory)."""
        return make_plan(self.cfg, self.info, prompt_tokens, reserve)

    def run(
        self,
        prompt: Prompt,
        sources: list[Source],
        on_text: OnText | None = None,
        cache: bool = True,
        max_new_tokens: int | None = None,
    ) -> Result:
        """Prefill ``prompt`` and decode an answer, with another answer budget where given (map-reduce
        steps). A prompt with a document prefix reuses the document cache (unless ``cache`` is off);
        Ctrl-C is handled as in ``Conversation.answer``."""
        if max_new_tokens is None:
            return self._run(prompt, sources, on_text, cache)
        cfg = self.cfg
        self.cfg = replace(cfg, generation=replace(cfg.generation, max_new_tokens=max_new_tokens))
        try:
            return self._run(prompt, sources, on_text, cache)
        finally:
            self.cfg = cfg

    def _run(self, prompt: Prompt, sources: list[Source], on_text: OnText | None, cache: bool) -> Result:
        prefix, request = self.split(prompt)
        conversation = Conversation(self, prefix, len(prefix) + len(request), sources, use_cache=cache)
        return conversation.answer(request, sources, on_text)

    def answerer(self, prompts: Sequence[Prompt], sources: list[Source]) -> Answer:
        """One ``Conversation`` holds the documents' prefix for every question."""
        splits = [self.split(p) for p in prompts]
        prefix = splits[0][0]
        conversation = Conversation(self, prefix, max(len(a) + len(b) for a, b in splits), sources)

        def answer(prompt: Prompt, on_text: OnText | None) -> Result:
            head, request = self.split(prompt)  # the prefix's ids are remembered: only the question is tokenized
            if head == prefix:
                return conversation.answer(request, sources, on_text)
            # a user template that puts the question before the documents: nothing to share
            return self._run(prompt, sources, on_text, True)

        return answer

    def chat(self, docs: list[Document], sources: list[Source]) -> LocalChat:
        return LocalChat(self, docs, sources)

    def stop(self) -> None:
        """Nothing runs in other threads here: a Ctrl-C lands in the generation itself."""

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``fn`` over ``items``, results in order: one at a time here (one model on shared cores, and a
        Ctrl-C must land in the generation, which runs in the main thread)."""
        return [fn(item) for item in items]


def _import_model_code() -> None:
    """Import transformers' modeling code ahead of its use (a failure surfaces at the real import)."""
    with contextlib.suppress(Exception):  # the load imports it again and reports what is wrong
        importlib.import_module("transformers.modeling_utils")


def device_kind(device: torch.device) -> str:
    """The device as the document cache keys it: values computed by other kernels round differently."""
    if device.type == "cuda":
        return f"cuda/{torch.cuda.get_device_name(device)}"
    amx = "amx" if "amx_bf16" in models.cpu_flags() else "no-amx"
    return f"cpu/{torch.backends.cpu.get_cpu_capability()}/{amx}"


class Conversation:
    """A KV store holding a document prefix, prefilled or loaded from the document cache, and what
    follows it: independent questions (``answer`` from the prefix) or a chat (``answer`` after the
    last turn, with ``follow=True``).

    The plan is made once, for the longest request it will see (``prompt_tokens``) plus ``reserve``
    tokens of room for a chat to grow into.
    """

    def __init__(
        self,
        session: LocalBackend,
        prefix_ids: list[int],
        prompt_tokens: int,
        sources: list[Source],
        reserve: int = 0,
        use_cache: bool = True,
        cache_salt: bytes = b"",
    ):
        self.session = session
        self.sources = sources
        self.cache_salt = cache_salt  # longdoc serve's requests: entry keys of their own (serve.documents.cache_salt)
        self.plan = make_plan(session.cfg, session.info, prompt_tokens, reserve)
        self.model = session.long_model(self.plan)
        self.kv = self.model.new_cache(self.plan.prompt_tokens + self.plan.max_new_tokens + reserve)
        self.prefix_ids = prefix_ids
        self.use_cache = use_cache and session.cfg.doc_cache and len(prefix_ids) >= doccache.MIN_PREFIX_TOKENS
        self.ready = not prefix_ids  # whether the prefix is in the store
        self.pos = len(prefix_ids)  # where the next turn starts (chat: after the last answer)
        self.pending: list[int] = []  # tokens generated but not yet fed (the last one of a cut answer)
        self.cache = Cache(hit=False, bytes=0, load_s=0.0)

    def _key(self) -> str:
        info, plan, cfg = self.session.info, self.plan, self.session.cfg
        parts = doccache.KeyParts(
            model=self.session.model_identity(),
            dtype=f"{info.numerics} kv:{str(info.kv_dtype).removeprefix('torch.')}",
            device=device_kind(info.device),
            kernel=self.model.settings.kernel.__name__,
            layout=(plan.layout.chunk_size, plan.layout.local_window) if plan.layout else None,
            logit_scale=round(plan.logit_scale, 6),
            prefill=plan.sparse.describe() if plan.sparse else "exact",
            prefill_step=cfg.prefill_step,
        )
        key = doccache.entry_key(parts, self.prefix_ids)
        if self.cache_salt:  # a salted key is found only by requests with the same salt, never by a local run
            key = hmac.new(self.cache_salt, key.encode(), hashlib.sha256).hexdigest()
        return key

    def _open(self, progress: Progress) -> float:
        """Put the prefix in the store: from the document cache when it has it, else by prefill (then
        saved). Returns the seconds the prefill took (0 on a hit)."""
        rep = self.session.reporter
        key = self._key() if self.use_cache else ""
        if key:
            try:
                loaded = doccache.load(key, self.kv, self.prefix_ids)
            except doccache.DamagedEntry as exc:
                rep.warn(f"document cache entry {key[:12]} was damaged ({exc}); deleted it, prefilling again")
                loaded = None
            if loaded is not None:
                self.cache = Cache(hit=True, bytes=loaded.bytes, load_s=round(loaded.load_s, 3), key=key[:16])
                rep.status(
                    f"document cache hit: {len(self.prefix_ids):,} tokens in {loaded.load_s:.2f}s "
                    f"({loaded.bytes / 1e6:,.0f} MB)"
                )
                self.ready = True
                return 0.0
        t0 = time.perf_counter()
        ids = torch.tensor([self.prefix_ids], device=self.session.info.device)
        prefill(self.model, ids, self.kv, self.session.cfg.prefill_step, progress=progress)
        self.ready = True
        prefill_s = time.perf_counter() - t0
        if key:
            self._save(key)
        return prefill_s

    def _save(self, key: str) -> None:
        rep, info = self.session.reporter, self.session.info
        t0 = time.perf_counter()
        meta = {
            "model": info.name,
            "sources": json.dumps([_absolute(s.path) for s in self.sources]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            size = doccache.save(key, self.kv, self.prefix_ids, meta)
            doccache.evict(int(self.session.cfg.cache_max_gb * 1e9), keep=key, warn=rep.warn)
        except OSError as exc:  # a full or read-only disk costs the next run its reuse, not this answer
            rep.warn(f"could not write the document cache ({exc.strerror or exc}); the answer is unaffected")
            return
        save_s = round(time.perf_counter() - t0, 3)
        self.cache = Cache(hit=False, bytes=size, load_s=0.0, key=key[:16], save_s=save_s)
        rep.status(f"saved the document prefix to the cache ({size / 1e6:,.0f} MB in {save_s:.2f}s)")

    def prepare(self) -> None:
        """Bring the prefix in now (a chat, before its first question) rather than with the first answer."""
        if self.ready:
            return
        rep, total, t0 = self.session.reporter, len(self.prefix_ids), time.perf_counter()
        with rep.progress("prefill", total):
            self._open(lambda n, _, left: rep.advance(n, total, n / max(1e-9, time.perf_counter() - t0), left))

    def answer(
        self,
        ids: list[int],
        sources: list[Source],
        on_text: OnText | None = None,
        follow: bool = False,
    ) -> Result:
        """Prefill ``ids`` (the request) after the prefix, or with ``follow`` after the last turn,
        and decode an answer; returns the JSON result.

        On Ctrl-C during prefill or decoding the partial answer (empty during prefill) is kept: the
        result is returned with ``interrupted: true`` (the caller exits 130).
        """
        session = self.session
        cfg, rep, device = session.cfg, session.reporter, session.info.device
        first = not self.ready
        start = self.pos if follow else len(self.prefix_ids)
        ids = (self.pending if follow else []) + ids
        self._make_room(start + len(ids) + cfg.generation.max_new_tokens)
        total = len(self.prefix_ids) + len(ids) if first else len(ids)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        t0 = time.perf_counter()
        interrupted = prefilled = False
        prefix_s = 0.0
        try:
            with rep.progress("prefill", total):
                done = 0

                def progress(n: int, _: int, left: float | None) -> None:
                    # the question after the prefix costs little next to it: the prefix's clock is the ETA
                    rep.advance(done + n, total, (done + n) / max(1e-9, time.perf_counter() - t0), left)

                if first:
                    prefix_s = self._open(progress)
                    done = len(self.prefix_ids)
                logits = prefill(
                    self.model, torch.tensor([ids], device=device), self.kv, cfg.prefill_step, start, progress
                )
                prefilled = True
        except KeyboardInterrupt:  # Ctrl-C before the first token: a result with nothing generated
            interrupted = True
        prefill_s = time.perf_counter() - t0
        # an answer after the one that brought the prefix in reuses it from memory
        cache = self.cache if first else replace(self.cache, hit=True, load_s=0.0, in_memory=True)

        plan = self.plan
        policy = RecycledPolicy(cfg.recycle, session.info.n_layers) if plan.recycle else None
        streamer = TokenStreamer(session.tokenizer)
        ttft = None
        pos = start + len(ids)
        t1 = time.perf_counter()
        try:
            tokens = (
                ()
                if interrupted
                else generate(self.model, logits, pos, self.kv, cfg.generation, session.info.stop_ids, policy)
            )
            for token in tokens:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                piece = streamer.push(token)
                if piece and on_text:
                    on_text(piece)
        except KeyboardInterrupt:
            interrupted = True
        decode_s = time.perf_counter() - t1
        n_gen = len(streamer.ids)
        # generate feeds every token it yields except the last one of a cut answer (max tokens or
        # Ctrl-C); a chat's next turn feeds that one first
        fed = n_gen if not interrupted and n_gen < cfg.generation.max_new_tokens else max(0, n_gen - 1)
        if prefilled:  # a turn whose request was cut short leaves no trace in the conversation
            self.pos, self.pending = pos + fed, streamer.ids[fed:]
        prompt_tokens = len(self.prefix_ids) + len(ids) if not follow else start + len(ids)
        decode_tok_s = round(max(0, n_gen - 1) / decode_s, 2) if decode_s and n_gen > 1 else 0.0
        layout = plan.layout
        return Result(
            answer=streamer.text().strip(),
            model=session.info.name,
            engine=session.describe(),
            quantize=session.info.quantize,
            prompt_tokens=prompt_tokens,
            generated_tokens=n_gen,
            sources=sources,
            timings=Timings(
                load_s=round(session.load_s, 3),
                prefill_s=round(prefill_s, 3),
                decode_s=round(decode_s, 3),
                prefill_tok_s=round(total / prefill_s, 1) if prefill_s else 0.0,
                decode_tok_s=decode_tok_s,
                ttft_s=round(ttft if ttft is not None else prefill_s, 3),
                prefix_prefill_s=round(prefix_s, 3) if first and prefix_s else None,
            ),
            memory=Memory(
                peak_rss_bytes=peak_rss_bytes(),
                kv_cache_bytes=self.kv.nbytes,
                gpu_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            ),
            dca=Dca(
                enabled=layout is not None,
                chunk_size=layout.chunk_size if layout else 0,
                local_window=layout.local_window if layout else 0,
                logit_scale=round(plan.logit_scale, 4),
            ),
            recycle=Recycle.of(policy.stats if policy else None),
            prefill=prefill_entry(plan, self.model.settings.sparse_stats),
            cache=replace(cache, prefix_tokens=len(self.prefix_ids)),
            interrupted=True if interrupted else None,
        )

    def _make_room(self, needed: int) -> None:
        """Grow the store for a chat turn, up to the context limit (then refuse the turn)."""
        if needed <= self.kv.capacity:
            return
        # without DCA, positions past the trained window are out of the model's range
        limit = self.plan.max_context if self.plan.layout else min(self.plan.max_context, self.plan.window)
        if needed > limit:
            raise DoesNotFitError(
                f"this turn would bring the conversation to {needed:,} tokens, over the context limit of {limit:,};"
                " start a new chat (or raise --max-context)"
            )
        self.kv.grow(min(limit, max(needed, 2 * self.kv.capacity)))


def _absolute(path: str) -> str:
    """A source as `cache ls` shows it: an absolute path where it is one (not stdin)."""
    return os.path.abspath(path) if os.path.exists(path) else path


# A chat's room beyond its first question: the turns it may grow into before it must be restarted.
CHAT_RESERVE = 4096
# Room for the first question's own tokens in the plan made before it is known.
QUESTION_ROOM = 256


class LocalChat:
    """A conversation over documents in this process's KV cache: the first question rides on the
    documents' prefix (from the document cache when it has it), later ones follow the previous answer."""

    def __init__(self, backend: LocalBackend, docs: list[Document], sources: list[Source]):
        self.backend = backend
        self.docs = docs
        self.sources = sources
        # the prefix is the same whatever the question: render with a stand-in to find it
        head, _ = backend.split(ask_prompt(backend.tokenizer, docs, "?"))
        self.conversation = Conversation(backend, head, len(head) + QUESTION_ROOM, sources, reserve=CHAT_RESERVE)
        self.turns = 0

    def prepare(self) -> None:
        """Prefill (or load) the documents before the first question is asked."""
        self.conversation.prepare()

    def turn(self, question: str, on_text: OnText | None = None) -> Result:
        backend = self.backend
        if self.turns == 0:
            head, request = backend.split(ask_prompt(backend.tokenizer, self.docs, question))
            if head != self.conversation.prefix_ids:
                raise UsageError("chat needs an ask template that puts {documents} before {question}")
            result = self.conversation.answer(request, self.sources, on_text)
        else:
            ids = backend.encode(follow_up(backend.tokenizer, question))
            result = self.conversation.answer(ids, self.sources, on_text, follow=True)
        if not result.interrupted or result.generated_tokens:
            self.turns += 1  # an answer (even a cut one) is in context; a turn cut during its prefill is not
        result.question = question
        result.turn = self.turns
        return result
