"""One run end to end: documents -> prompt -> fit checks -> model -> prefill -> decode -> result.

The CLI calls these functions; they report through a ``Reporter`` and return plain dicts (the JSON
result of DESIGN.md section 2), so scripts, tests and benchmarks use the same path as users.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import json
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch

from longdoc import models
from longdoc.attention.dca import ChunkLayout
from longdoc.attention.kernels import get_kernel
from longdoc.attention.sparse import SparseConfig, SparseStats
from longdoc.config import RunConfig
from longdoc.cpu import onednn_packs
from longdoc.engine.decode import generate
from longdoc.engine.kvcache import KVCache
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import Progress, prefill
from longdoc.engine.recycled import RecycledPolicy
from longdoc.errors import DoesNotFitError, ModelError
from longdoc.ingest import Document
from longdoc.models.weights import trim_heap
from longdoc.prompt import Budget, Prompt
from longdoc.quant import schemes
from longdoc.quant.cache import QUANT_FILE, ensure_quantized, load_quantized
from longdoc.quant.choose import default_quantize, quant_slower, quant_unavailable
from longdoc.quant.packing import pack_linears, packing_pays
from longdoc.render import Reporter, TokenStreamer
from longdoc.runtime import doccache, machine

# With DCA no relative distance exceeds the chunk size, so length is limited by memory, not the
# model; 4x the trained window is the default ceiling (raise it with --max-context).
DCA_CONTEXT_FACTOR = 4
# Activations of one prefill step, the allocator's slack and the Python runtime, beyond weights + KV.
WORKING_SET_BYTES = 1_200_000_000

_T = TypeVar("_T")
_R = TypeVar("_R")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class ModelInfo:
    """Everything about a model that planning needs, known before its weights are loaded."""

    name: str
    source: models.ModelSource
    folder: Path
    tokenizer: Any
    window: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int
    stop_ids: set[int]
    #: quantization of the decode step's linears ("none", "int5", "int8", "int4") and its verified
    #: cache folder (``longdoc.quant.cache``); "none" where asked for or where the kernel is missing
    quantize: str = "none"
    quant_folder: Path | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def numerics(self) -> str:
        """The dtype, and the quantization where there is one (what the document cache keys on)."""
        return self.dtype_name if self.quantize == "none" else f"{self.dtype_name}+{self.quantize}"


def model_info(
    spec: str | None,
    device: str,
    dtype: str,
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    quantize: str = "none",
) -> ModelInfo:
    """Resolve and verify a model (converting it once if needed) and read its config and tokenizer;
    with ``quantize``, verify (or make once) its quantized weights too."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    source = models.resolve_model(spec)
    dev = models.resolve_device(device)
    dt = models.resolve_dtype(dtype, dev)
    folder = models.ensure_converted(source, progress=progress, warn=warn)
    config = models.check_model_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    n_params = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n_params += math.prod(st.get_slice(key).get_shape())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    stop_ids = set()
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stop_ids.add(int(tokenizer.eos_token_id))
    weight_bytes = n_params * torch.empty(0, dtype=dt).element_size()
    quant_folder = None
    say = warn or (lambda _m: None)
    if quantize == "auto":
        quantize = default_quantize(dev, dt, config)
    elif quant_slower(quantize, dev, dt):
        say(f"--quantize {quantize}: {quant_slower(quantize, dev, dt)} (--quantize auto picks none)")
    if quantize != "none":
        why = quant_unavailable(quantize, dev, dt, config)
        if why:
            say(f"--quantize {quantize}: {why}; running unquantized")
            quantize = "none"
        else:
            quant_folder = ensure_quantized(folder, quantize, source.name, progress=progress, warn=warn)
            weight_bytes += (quant_folder / QUANT_FILE).stat().st_size
    return ModelInfo(
        name=source.name,
        source=source,
        folder=folder,
        tokenizer=tokenizer,
        window=int(config["max_position_embeddings"]),
        n_layers=int(config["num_hidden_layers"]),
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        device=dev,
        dtype=dt,
        weight_bytes=weight_bytes,
        stop_ids=stop_ids,
        quantize=quantize,
        quant_folder=quant_folder,
    )


@dataclass
class Plan:
    """What a prompt of a given length will run with, decided before any weights are loaded."""

    prompt_tokens: int
    max_new_tokens: int
    window: int
    layout: ChunkLayout | None
    max_context: int
    recycle: bool
    kv_bytes: int
    weight_bytes: int
    logit_scale: float = 1.0
    sparse: SparseConfig | None = None  # sparse prefill's settings; None = exact

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + WORKING_SET_BYTES


def make_plan(cfg: RunConfig, info: ModelInfo, prompt_tokens: int, reserve: int = 0) -> Plan:
    """Decide DCA, context ceiling and recycling for this prompt; refuse what does not fit.

    ``reserve`` is room beyond prompt and answer that a chat may grow into: it counts towards
    turning DCA on and towards memory, not towards the fit check.
    """
    window = info.window
    need = prompt_tokens + cfg.generation.max_new_tokens + reserve
    dca_on = cfg.dca.enabled if cfg.dca.enabled is not None else need > window
    # built (and so validated) even when DCA stays off: a bad --chunk-size is an error either way
    candidate = ChunkLayout.for_window(window, cfg.dca.chunk_size, cfg.dca.local_window)
    layout = candidate if dca_on else None
    ceiling = window * DCA_CONTEXT_FACTOR if cfg.dca.enabled is not False else window
    max_context = cfg.max_context or ceiling
    hint = "pass fewer inputs, select pages with --pages, narrow a folder with --include/--exclude" + (
        ", or allow DCA (drop --no-dca)" if cfg.dca.enabled is False else ", or raise --max-context"
    )
    Budget(prompt_tokens, cfg.generation.max_new_tokens, max_context).check(hint)
    need = min(need, max_context)
    recycle = cfg.recycle.enabled if cfg.recycle.enabled is not None else prompt_tokens >= cfg.recycle.auto_min_context
    plan = Plan(
        prompt_tokens=prompt_tokens,
        max_new_tokens=cfg.generation.max_new_tokens,
        window=window,
        layout=layout,
        max_context=max_context,
        recycle=recycle,
        kv_bytes=need * KVCache.bytes_per_token(info.n_layers, info.n_kv_heads, info.head_dim, info.dtype),
        weight_bytes=info.weight_bytes,
    )
    mode = cfg.prefill.mode
    if mode == "sparse" or (mode == "auto" and prompt_tokens >= cfg.prefill.auto_min_tokens):
        plan.sparse = SparseConfig(budget=cfg.prefill.budget_for(prompt_tokens))
    if layout is not None and cfg.dca.temperature and prompt_tokens > window:
        plan.logit_scale = (0.1 * math.log(prompt_tokens / window) + 1) ** 2
    check_memory(plan, info.device)
    return plan


def prefill_entry(plan: Plan, stats: SparseStats) -> dict[str, Any]:
    """The JSON result's "prefill": the mode, the sparse budget, and the share of exact attention's
    (query, key) pairs that this run's prefill attended to (1.0 when exact, or when nothing was
    prefilled: a document cache hit)."""
    if plan.sparse is None:
        return {"mode": "exact", "budget": None, "kept_fraction": 1.0}
    return {"mode": "sparse", "budget": plan.sparse.budget, "kept_fraction": round(stats.kept_fraction, 4)}


def check_memory(plan: Plan, device: torch.device) -> None:
    """Refuse before loading what would not fit in RAM (or VRAM), and say what would."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = "GPU memory"
    else:
        free = psutil.virtual_memory().available
        where = "RAM"
    if plan.total_bytes > free:
        per_token = plan.kv_bytes / max(1, plan.prompt_tokens + plan.max_new_tokens)
        fits = int(max(0, free - plan.weight_bytes - WORKING_SET_BYTES) / per_token)
        raise DoesNotFitError(
            f"this run needs about {plan.total_bytes / 1e9:.1f} GB of {where} (weights {plan.weight_bytes / 1e9:.1f} GB"
            f" + KV cache {plan.kv_bytes / 1e9:.1f} GB + working set), but {free / 1e9:.1f} GB is available;"
            f" about {fits:,} tokens would fit"
        )


@dataclass
class Session:
    """A loaded model plus settings, reused across runs (``--each``, evals, map-reduce)."""

    cfg: RunConfig
    reporter: Reporter
    info: ModelInfo = field(init=False)
    _loaded: models.LoadedModel | None = None
    _identity: str | None = None
    _prefix: tuple[str, list[int]] | None = None  # the last document prefix and its ids (split_ids)
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
            self._loaded = models.load_model(
                folder, self.info.device, self.info.dtype, tokenizer=self.tokenizer, narrow_linears=pack
            )
            if self.info.quant_folder is not None:
                # wrapped before packing: pack_linears then packs the wrapped layers (prefill's path)
                tensors = load_quantized(self.info.quant_folder)
                try:
                    schemes.quantize_linears(self._loaded.model, self.info.quantize, tensors, dtype=self.info.dtype)
                except ValueError as exc:
                    raise ModelError(f"{self.info.quant_folder}: {exc}") from exc
                del tensors
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

    def count(self, text: str) -> int:
        return sum(len(ids) for ids in split_ids(self, text))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def model_identity(self) -> str:
        if self._identity is None:
            self._identity = doccache.model_identity(self.info.folder)
        return self._identity

    def patched(self, plan: Plan) -> LongModel:
        kernel = get_kernel(self.cfg.kernel, self.info.device)
        settings = AttentionSettings(plan.layout, kernel, plan.logit_scale, sparse=plan.sparse)
        return LongModel(self.loaded().model, settings)

    # The engine's side of the pipeline: ``remote.RemoteSession`` overrides these four to send the model
    # calls to a server, so that summarize, ask and chat run the same code either way.
    @property
    def paths(self) -> machine.MachinePaths:
        """What this run gets on this machine (dtype, packing, quantization, attention kernel) and why."""
        info, cfg = self.info, self.cfg
        return machine.paths(info.device, info.dtype, info.quantize, cfg.pack, cfg.kernel)

    @property
    def engine(self) -> dict[str, Any]:
        """What runs the model, as the JSON result records it."""
        paths = self.paths
        return {
            "kind": "local",
            "model": self.info.name,
            "device": str(self.info.device),
            "dtype": self.info.numerics,
            "cpu": paths.cpu_class,
            "isa_cap": paths.isa_cap,
            "packed": paths.packed,
            "quantize": paths.quantize,
            "attention": paths.attention,
        }

    def plan(self, prompt_tokens: int, reserve: int = 0) -> Plan:
        """The plan for a prompt this long (``make_plan``: the fit checks, context and memory)."""
        return make_plan(self.cfg, self.info, prompt_tokens, reserve)

    def run_prompt(
        self,
        prompt: str,
        sources: list[dict[str, Any]],
        on_text: Callable[[str], None] | None = None,
        cache: bool = True,
        max_new_tokens: int | None = None,
    ) -> dict[str, Any]:
        """``run_prompt`` in this session, with another answer budget where given (map-reduce steps)."""
        if max_new_tokens is None:
            return run_prompt(self, prompt, sources, on_text, cache)
        cfg = self.cfg
        self.cfg = replace(cfg, generation=replace(cfg.generation, max_new_tokens=max_new_tokens))
        try:
            return run_prompt(self, prompt, sources, on_text, cache)
        finally:
            self.cfg = cfg

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``fn`` over ``items``, results in order: one at a time here (one model on shared cores, and a
        Ctrl-C must land in the generation, which runs in the main thread)."""
        return [fn(item) for item in items]


def _import_model_code() -> None:
    """Import transformers' modeling code ahead of its use (a failure surfaces at the real import)."""
    with contextlib.suppress(Exception):  # the load imports it again and reports what is wrong
        importlib.import_module("transformers.modeling_utils")


def source_entries(docs: list[Document], count: Callable[[str], int]) -> list[dict[str, Any]]:
    return [{"path": d.source, "kind": d.kind, "pages": d.pages, "tokens": count(d.text)} for d in docs]


def device_kind(device: torch.device) -> str:
    """The device as the document cache keys it: values computed by other kernels round differently."""
    if device.type == "cuda":
        return f"cuda/{torch.cuda.get_device_name(device)}"
    amx = "amx" if "amx_bf16" in models.cpu_flags() else "no-amx"
    return f"cpu/{torch.backends.cpu.get_cpu_capability()}/{amx}"


def split_ids(session: Session, prompt: str) -> tuple[list[int], list[int]]:
    """A prompt's token ids as (document prefix, rest), tokenized apart (``prompt.Prompt``)."""
    if isinstance(prompt, Prompt) and prompt.prefix_chars:
        prefix = prompt.prefix
        # the same documents come back with every question, fit check and chat turn: tokenize them once
        if session._prefix is None or session._prefix[0] != prefix:
            session._prefix = (prefix, session.encode(prefix))
        return session._prefix[1], session.encode(prompt.rest)
    return [], session.encode(prompt)


class Conversation:
    """A KV store holding a document prefix, prefilled or loaded from the document cache, and what
    follows it: independent questions (``answer`` from the prefix) or a chat (``answer`` after the
    last turn, with ``follow=True``).

    The plan is made once, for the longest request it will see (``prompt_tokens``) plus ``reserve``
    tokens of room for a chat to grow into.
    """

    def __init__(
        self,
        session: Session,
        prefix_ids: list[int],
        prompt_tokens: int,
        sources: list[dict[str, Any]],
        reserve: int = 0,
        use_cache: bool = True,
        cache_salt: bytes = b"",
    ):
        self.session = session
        self.sources = sources
        self.cache_salt = cache_salt  # longdoc serve's requests: entry keys of their own (serve.cache_salt)
        self.plan = make_plan(session.cfg, session.info, prompt_tokens, reserve)
        self.model = session.patched(self.plan)
        self.kv = self.model.new_cache(self.plan.prompt_tokens + self.plan.max_new_tokens + reserve)
        self.prefix_ids = prefix_ids
        self.use_cache = use_cache and session.cfg.doc_cache and len(prefix_ids) >= doccache.MIN_PREFIX_TOKENS
        self.ready = not prefix_ids  # whether the prefix is in the store
        self.pos = len(prefix_ids)  # where the next turn starts (chat: after the last answer)
        self.pending: list[int] = []  # tokens generated but not yet fed (the last one of a cut answer)
        self.cache: dict[str, Any] = {"hit": False, "bytes": 0, "load_s": 0.0}

    def _key(self) -> str:
        info, plan, cfg = self.session.info, self.plan, self.session.cfg
        parts = doccache.KeyParts(
            model=self.session.model_identity(),
            dtype=info.numerics,
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
                self.cache = {"hit": True, "bytes": loaded.bytes, "load_s": round(loaded.load_s, 3), "key": key[:16]}
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
            "sources": json.dumps([_absolute(s["path"]) for s in self.sources]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            size = doccache.save(key, self.kv, self.prefix_ids, meta)
            doccache.evict(int(self.session.cfg.cache_max_gb * 1e9), keep=key, warn=rep.warn)
        except OSError as exc:  # a full or read-only disk costs the next run its reuse, not this answer
            rep.warn(f"could not write the document cache ({exc.strerror or exc}); the answer is unaffected")
            return
        save_s = round(time.perf_counter() - t0, 3)
        self.cache = {"hit": False, "bytes": size, "load_s": 0.0, "key": key[:16], "save_s": save_s}
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
        sources: list[dict[str, Any]],
        on_text: Callable[[str], None] | None = None,
        follow: bool = False,
    ) -> dict[str, Any]:
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
        cache = self.cache if first else {**self.cache, "hit": True, "load_s": 0.0, "in_memory": True}

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
        result: dict[str, Any] = {
            "answer": streamer.text().strip(),
            "model": session.info.name,
            "engine": session.engine,
            "quantize": session.info.quantize,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": n_gen,
            "sources": sources,
            "timings": {
                "load_s": round(session.load_s, 3),
                "prefill_s": round(prefill_s, 3),
                "decode_s": round(decode_s, 3),
                "prefill_tok_s": round(total / prefill_s, 1) if prefill_s else 0.0,
                "decode_tok_s": round(max(0, n_gen - 1) / decode_s, 2) if decode_s and n_gen > 1 else 0.0,
                "ttft_s": round(ttft if ttft is not None else prefill_s, 3),
            },
            "memory": {
                "peak_rss_bytes": peak_rss_bytes(),
                "kv_cache_bytes": self.kv.nbytes,
                "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            },
            "dca": {
                "enabled": plan.layout is not None,
                "chunk_size": plan.layout.chunk_size if plan.layout else 0,
                "local_window": plan.layout.local_window if plan.layout else 0,
                "logit_scale": round(plan.logit_scale, 4),
            },
            "recycle": {"enabled": policy is not None, **(policy.stats if policy else RecycledPolicy.idle_stats())},
            "prefill": prefill_entry(plan, self.model.settings.sparse_stats),
            "cache": {**cache, "prefix_tokens": len(self.prefix_ids)},
        }
        if first and prefix_s:
            result["timings"]["prefix_prefill_s"] = round(prefix_s, 3)
        if interrupted:
            result["interrupted"] = True
        return result

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


def run_prompt(
    session: Session,
    prompt: str,
    sources: list[dict[str, Any]],
    on_text: Callable[[str], None] | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Prefill ``prompt`` and decode an answer; returns the JSON result.

    A ``prompt.Prompt`` with a document prefix reuses the document cache (unless ``cache`` is off);
    Ctrl-C is handled as in ``Conversation.answer``.
    """
    prefix, rest = split_ids(session, prompt)
    conversation = Conversation(session, prefix, len(prefix) + len(rest), sources, use_cache=cache)
    return conversation.answer(rest, sources, on_text)
