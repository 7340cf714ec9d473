"""Run settings as plain dataclasses; the CLI fills them from options, the core reads them."""

from __future__ import annotations

from dataclasses import dataclass, field

# Quantizations of the linears that decode steps run (longdoc.attention.quant), and the --quantize
# values: those or "auto" (int8 where torch's x86 int8 GEMM runs a bfloat16 model on CPU, else none).
QUANTIZE_SCHEMES: tuple[str, ...] = ("none", "int8", "int4")
QUANTIZE_CHOICES: tuple[str, ...] = ("auto", *QUANTIZE_SCHEMES)


@dataclass
class DCAConfig:
    # None = automatic: on when prompt + answer budget exceed the model's trained window.
    enabled: bool | None = None
    # None = derived from the trained window W: chunk_size 3W/4, local_window W/8 (ChunkLlama).
    chunk_size: int | None = None
    local_window: int | None = None
    # Attention temperature for prompts beyond the window: logits x (0.1 ln(L/W) + 1)^2, i.e. that factor
    # on both q and k (ChunkLlama/vLLM, after YaRN). Off by default: benchmarks/RESULTS.md has the measurement.
    temperature: bool = False


@dataclass
class RecycleConfig:
    # None = automatic: on for contexts of at least `auto_min_context` tokens.
    enabled: bool | None = None
    # Recycled set per layer and KV head. 4096 (as RefreshKV at 32K): on the summarize-then-quote benchmark
    # it stated the late-needed fact as often as full attention where 2048 did not, at 1.5x full attention's
    # decode speed at 32K (benchmarks/RESULTS.md).
    k: int = 4096
    # A full step every `stride` decode steps (fixed schedule).
    stride: int = 16
    schedule: str = "fixed"  # "fixed" | "dynamic"
    # Dynamic schedule: full step when a layer's query cosine similarity to its last full step drops below this.
    threshold: float = 0.9
    # Below this context the full cache is small enough that recycling does not pay.
    auto_min_context: int = 8192


# --prefill values: exact attention, sparse (longdoc.attention.sparse), or auto: sparse from a length on.
PREFILL_MODES: tuple[str, ...] = ("auto", "exact", "sparse")


@dataclass
class PrefillConfig:
    mode: str = "auto"
    # Selected keys per query beyond the exact band and sinks (longdoc.attention.sparse.SparseConfig).
    budget: int = 2048
    # auto: sparse from this many prompt tokens on. Sparse prefill costs quality (corpus perplexity at
    # 32K: 10.30 against 9.55 exact, +7.8%), so auto keeps it for lengths where an exact prefill takes
    # over 20 minutes on 2 cores and sparse is 4-5x faster (benchmarks/RESULTS.md, "Sparse prefill").
    auto_min_tokens: int = 65536


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class RunConfig:
    model: str | None = None  # None = the embedded default model
    device: str = "auto"
    dtype: str = "auto"
    # Quantized linears for decode steps: auto | none | int8 | int4 (longdoc.attention.quant). "auto" is
    # int8 where the int8 GEMM runs (x86 with VNNI, bfloat16 on CPU), else none: measured on an EPYC
    # with AVX-512-BF16 (benchmarks/RESULTS.md), int8 (activations per block of 128) costs +0.21%
    # perplexity at 4K and +0.59% at 16K, and decodes 1.3-1.5x faster than bfloat16 (25.1 vs 17.3
    # tok/s at 2K, 21.5 vs 16.1 at 8K); int4 decodes faster still but costs 4%, over the 1% a default
    # may lose.
    quantize: str = "auto"
    kernel: str = "auto"  # attention back end: auto | reference | cpu | cuda
    # Prefill step in tokens: bounds working memory (activations of one step) and paces the progress bar.
    prefill_step: int = 2048
    max_context: int | None = None  # None = what the model and settings support
    # The document KV cache (longdoc.doccache): reuse a document prefix's prefill across runs.
    doc_cache: bool = True
    # Its size cap in GB (least recently used entries go first); 10 GB holds ~25 prefixes of 32K tokens.
    cache_max_gb: float = 10.0
    dca: DCAConfig = field(default_factory=DCAConfig)
    recycle: RecycleConfig = field(default_factory=RecycleConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
