"""What a run will be, decided before any weights are loaded: the model's facts (``ModelInfo``, read
from its verified folder) and the plan for a prompt of a given length (``Plan``: DCA or not, the
context ceiling, recycling, sparse prefill, the memory it needs), with the fit checks that refuse
what would not fit, saying by how much and what would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from longdoc import models, native
from longdoc.attention.dca import ChunkLayout
from longdoc.attention.sparse import SparseConfig, SparseStats
from longdoc.config import RunConfig
from longdoc.engine.kvcache import KVCache
from longdoc.errors import DoesNotFitError
from longdoc.prompt import Budget
from longdoc.quant.cache import QUANT_FILE, ensure_quantized
from longdoc.quant.choose import default_quantize, quant_slower, quant_unavailable
from longdoc.quant.schemes import ONE_COPY
from longdoc.runtime.result import Prefill

# With DCA no relative distance exceeds the chunk size, so length is limited by memory, not the
# model; 4x the trained window is the default ceiling (raise it with --max-context).
DCA_CONTEXT_FACTOR = 4
# Activations of one prefill step, the allocator's slack and the Python runtime, beyond weights + KV.
WORKING_SET_BYTES = 1_200_000_000


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
    #: why this model: "asked for", or what ``--model auto`` decided here (``models.choose_model``)
    model_why: str = "asked for"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: 16 bits on every CPU class (half the memory and the document cache of
        float32, and half the bytes a decode step's attention reads): float16 for float32 runs, whose
        conversions are single instructions on AVX2 (F16C) and NEON, else the run's own dtype."""
        return torch.float16 if self.device.type == "cpu" and self.dtype == torch.float32 else self.dtype

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

    dev = models.resolve_device(device)
    dt = models.resolve_dtype(dtype, dev)
    model_why = "asked for"
    if spec is None or spec.strip().lower() in ("", models.AUTO_MODEL):
        choice = models.choose_model(dev, dt)
        spec, model_why = choice.alias, f"--model auto: {choice.why}"
        if choice.note and progress:
            progress(choice.note)
    source = models.resolve_model(spec)
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
        say(f"--quantize {quantize}: {quant_slower(quantize, dev, dt)} (--quantize auto picks what is faster here)")
    if quantize != "none":
        why = quant_unavailable(quantize, dev, dt, config)
        if why:
            say(f"--quantize {quantize}: {why}; running unquantized")
            quantize = "none"
        else:
            quant_folder = ensure_quantized(folder, quantize, source.name, progress=progress, warn=warn)
            quant_bytes = (quant_folder / QUANT_FILE).stat().st_size
            # one copy: the quantized weights replace the linears (the embedding table stays in the file)
            weight_bytes = quant_bytes if quantize in ONE_COPY else weight_bytes + quant_bytes
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
        model_why=model_why,
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


def decodes_natively(info: ModelInfo) -> bool:
    """Whether this run's decode steps run in one native call (``native.step``: q8 on the CPU over its
    16-bit KV cache, the kernels buildable here), where full attention (exact) decodes as fast as
    recycled steps up to longer contexts (``RecycleConfig.auto_min_context_native``)."""
    return (
        info.quantize == "q8"
        and info.device.type == "cpu"
        and info.dtype in (torch.float32, torch.bfloat16)
        and all(native.likely_available(name) for name in ("q8", "attn16", "step"))
    )


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
    auto_min = cfg.recycle.auto_min_context_native if decodes_natively(info) else cfg.recycle.auto_min_context
    recycle = cfg.recycle.enabled if cfg.recycle.enabled is not None else prompt_tokens >= auto_min
    plan = Plan(
        prompt_tokens=prompt_tokens,
        max_new_tokens=cfg.generation.max_new_tokens,
        window=window,
        layout=layout,
        max_context=max_context,
        recycle=recycle,
        kv_bytes=need * KVCache.bytes_per_token(info.n_layers, info.n_kv_heads, info.head_dim, info.kv_dtype),
        weight_bytes=info.weight_bytes,
    )
    mode = cfg.prefill.mode
    if mode == "sparse" or (mode == "auto" and prompt_tokens >= cfg.prefill.auto_min_tokens):
        plan.sparse = SparseConfig(budget=cfg.prefill.budget_for(prompt_tokens))
    if layout is not None and cfg.dca.temperature and prompt_tokens > window:
        plan.logit_scale = (0.1 * math.log(prompt_tokens / window) + 1) ** 2
    check_memory(plan, info.device)
    return plan


def prefill_entry(plan: Plan, stats: SparseStats) -> Prefill:
    """The result's "prefill": the mode, the sparse budget, and the share of exact attention's (query,
    key) pairs that this run's prefill attended to (1.0 when exact, or when nothing was prefilled: a
    document cache hit)."""
    if plan.sparse is None:
        return Prefill(mode="exact", budget=None, kept_fraction=1.0)
    return Prefill(mode="sparse", budget=plan.sparse.budget, kept_fraction=round(stats.kept_fraction, 4))


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
