"""Run settings as plain dataclasses; the CLI fills them from options, the core reads them.

Each constructor checks its own values (``__post_init__``) and raises ``UsageError`` naming the
command-line option that sets the value, so a bad setting fails before any input is read or model
loaded, however it was given (an option, ``-o key=value``, or code). The checks that need the model's
trained window (the DCA layout rule) or the machine (devices, dtypes) run later, at planning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from longdoc.errors import UsageError

# Quantizations of the linears that decode steps run (longdoc.quant.schemes), and the --quantize
# values: those or "auto" (see RunConfig.quantize).
QUANTIZE_SCHEMES: tuple[str, ...] = ("none", "int8", "int4", "int5", "q8")
QUANTIZE_CHOICES: tuple[str, ...] = ("auto", *QUANTIZE_SCHEMES)


@dataclass
class DCAConfig:
    # None = automatic: on when prompt + answer budget exceed the model's trained window.
    enabled: bool | None = None
    # None = derived from the trained window W: chunk_size 3W/4, local_window W/8 (ChunkLlama).
    chunk_size: int | None = None
    local_window: int | None = None
    # Attention temperature for prompts beyond the window: the softmax scale times (0.1 ln(L/W) + 1)^2, L the
    # prompt length, i.e. that factor on both q and k. The 0.1 is vLLM's dual-chunk backend's (and YaRN's);
    # ChunkLlama's get_mscale scales q and k by 0.05 ln(L/W) + 1. Off by default (benchmarks/RESULTS.md,
    # "Long-context accuracy").
    temperature: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 2:
            raise UsageError("--chunk-size must be at least 2")
        if self.local_window is not None and self.local_window < 0:
            raise UsageError("--local-window must be at least 0")
        if self.chunk_size is not None and self.local_window is not None and self.local_window >= self.chunk_size:
            raise UsageError("--local-window must be smaller than --chunk-size")
        # the rest of the layout rule needs the model's trained window: ChunkLayout.for_window, at planning


# --recycle-schedule values
RECYCLE_SCHEDULES: tuple[str, ...] = ("fixed", "dynamic")


@dataclass
class RecycleConfig:
    # None = automatic: on for contexts of at least `auto_min_context` tokens.
    enabled: bool | None = None
    # Recycled set per layer and KV head, as RefreshKV at 32K: the smallest that keeps the late-needed fact
    # of the summarize-then-quote benchmark (benchmarks/RESULTS.md, "Summarize, then quote the pass key",
    # and "Recycled decode at 32K with DCA, K=4096" for its speed).
    k: int = 4096
    # A full step every `stride` decode steps (fixed schedule).
    stride: int = 16
    schedule: str = "fixed"  # "fixed" | "dynamic"
    # Dynamic schedule: full step when a layer's query cosine similarity to its last full step drops below this.
    threshold: float = 0.9
    # Below this context the full cache is small enough that recycling does not pay.
    auto_min_context: int = 8192
    # The same where a decode step runs in one native call (q8 on the CPU over the 16-bit KV cache): there
    # full attention (exact) decodes 8K prompts as fast as recycled steps, also native, and recycling
    # wins from 16K (benchmarks/HISTORY.md, thirteenth and fourteenth sessions).
    auto_min_context_native: int = 16384

    def __post_init__(self) -> None:
        if self.k < 1 or self.stride < 1:
            raise UsageError("--recycle-k and --recycle-stride must be at least 1")
        if not (math.isfinite(self.threshold) and -1 <= self.threshold <= 1):
            raise UsageError(f"--recycle-threshold is a cosine similarity between -1 and 1, not {self.threshold}")
        if self.schedule not in RECYCLE_SCHEDULES:
            raise UsageError("--recycle-schedule must be fixed or dynamic")


# --prefill values: exact attention, sparse (longdoc.attention.sparse), or auto: sparse from a length on.
PREFILL_MODES: tuple[str, ...] = ("auto", "exact", "sparse")


@dataclass
class PrefillConfig:
    """Sparse or exact prefill. Sparse prefill costs quality in proportion to what it skips, and pays in
    proportion too. So by default (``budget`` None) the budget follows the prompt's length:
    ``budget_default``, within the 2% quality gate, from ``auto_min_tokens``; ``budget_long`` from
    ``long_min_tokens``, where an exact prefill takes many minutes on a laptop's cores
    (benchmarks/RESULTS.md, "Sparse prefill: quality against exact" and "Where prefill time goes")."""

    mode: str = "auto"
    # Selected keys per query beyond the exact band and sinks (longdoc.attention.sparse.SparseConfig);
    # None = ``budget_for`` the prompt's length.
    budget: int | None = None
    # auto: sparse from this many prompt tokens on.
    auto_min_tokens: int = 24576
    long_min_tokens: int = 65536
    budget_default: int = 8192
    budget_long: int = 2048

    def __post_init__(self) -> None:
        if self.mode not in PREFILL_MODES:
            raise UsageError(f"--prefill accepts {', '.join(PREFILL_MODES)}, not {self.mode!r}")
        if self.budget is not None and self.budget < 1:
            raise UsageError("--prefill-budget must be at least 1")

    def budget_for(self, prompt_tokens: int) -> int:
        if self.budget is not None:
            return self.budget
        return self.budget_long if prompt_tokens >= self.long_min_tokens else self.budget_default


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # checked here because a bad value fails only after the prefill (NaN probabilities); a budget of
        # 0 new tokens is a plan's (the fit of the prompt alone), which a command refuses (cli.settings)
        if self.max_new_tokens < 0:
            raise UsageError("--max-new-tokens must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature must be 0 (greedy) or more, not {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UsageError(f"--top-p must be above 0 and at most 1, not {self.top_p}")


# Pre-packed linears (RunConfig.pack) and attention back ends (RunConfig.kernel; the names of
# longdoc.attention.kernels.KERNELS, which tests/test_options.py checks against these).
PACK_CHOICES: tuple[str, ...] = ("auto", "on", "off")
KERNEL_CHOICES: tuple[str, ...] = ("auto", "reference", "cpu", "cpu-torch", "cuda")


@dataclass
class RunConfig:
    model: str | None = None  # None = auto: longdoc.models.choose picks a known model for this machine
    device: str = "auto"
    dtype: str = "auto"
    # Quantized linears for decode steps: auto | none | q8 | int5 | int8 | int4 (longdoc.quant.schemes).
    # "auto" is longdoc.quant.choose.default_quantize: int5 for bfloat16 where its kernel runs (AVX-512
    # VNNI), else q8 where the Q8_0 kernel has a SIMD loop (AVX2, NEON), else int8 where torch's int8 GEMM
    # runs, else none. int5 and q8 stay within the 1% of perplexity a default may lose (benchmarks/RESULTS.md,
    # "Quantization: quality against bfloat16"); int4 does not.
    quantize: str = "auto"
    # Linears pre-packed for oneDNN on CPU: auto | on | off. "auto" packs where it pays (bfloat16 with
    # native matmuls; see ``longdoc.quant.packing.packing_pays``), "on"/"off" force it (benchmarks).
    pack: str = "auto"
    kernel: str = "auto"  # attention back end: auto | reference | cpu | cpu-torch | cuda
    # Prefill step in tokens: bounds working memory (activations of one step) and paces the progress bar.
    prefill_step: int = 2048
    max_context: int | None = None  # None = what the model and settings support
    # The document KV cache (longdoc.runtime.doccache): reuse a document prefix's prefill across runs.
    doc_cache: bool = True
    # Its size cap in GB (least recently used entries go first).
    cache_max_gb: float = 10.0
    dca: DCAConfig = field(default_factory=DCAConfig)
    recycle: RecycleConfig = field(default_factory=RecycleConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise UsageError(f"--quantize accepts {', '.join(QUANTIZE_CHOICES)}, not {self.quantize!r}")
        if self.pack not in PACK_CHOICES:
            raise UsageError(f"-o pack accepts {', '.join(PACK_CHOICES)}, not {self.pack!r}")
        if self.kernel not in KERNEL_CHOICES:
            raise UsageError(f"-o kernel accepts {', '.join(KERNEL_CHOICES)}, not {self.kernel!r}")
        if self.prefill_step < 1:
            raise UsageError("-o prefill_step must be at least 1")
        if self.max_context is not None and self.max_context < 1:
            raise UsageError("--max-context must be at least 1")
        if not (math.isfinite(self.cache_max_gb) and self.cache_max_gb > 0):
            raise UsageError(f"--cache-max-gb must be a size in GB above 0, not {self.cache_max_gb}")
