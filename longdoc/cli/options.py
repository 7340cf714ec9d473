"""The options the commands share, each declared once: its flags, type, default (the config
dataclasses'), help panel and help text, as a field of ``Given``.

A command names the options it takes with ``command.takes(...)`` and receives them as one typed
``Given``; typer sees them as ordinary parameters of the command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import typer

from longdoc.cli import env, knobs
from longdoc.config import DCAConfig, GenerationConfig, PrefillConfig, RecycleConfig, RunConfig

# The help panels, in the order a reader meets them.
INPUT = "Input"
MODEL = "Model"
LONG_CONTEXT = "Long context"
DECODING = "Decoding"
OUTPUT = "Output"
CACHE = "Cache"
REMOTE = "Remote (--endpoint)"
PANELS = (INPUT, MODEL, LONG_CONTEXT, DECODING, OUTPUT, CACHE, REMOTE)

# The metavar of an on/off flag: nothing (typer would show <bool>).
FLAG = ""

# The size caps' defaults as the options show them: longdoc.ingest.MAX_FILE_SIZE and MAX_TOTAL_SIZE
# (not imported: --help stays light; tests/test_options.py checks they agree).
MAX_FILE_SIZE = "256M"
MAX_TOTAL_SIZE = "1G"
# --timeout's default: longdoc.runtime.remote.READ_TIMEOUT_S (which imports torch; checked by the same test).
REMOTE_TIMEOUT_S = 300.0


def opt(*decls: str, panel: str, help: str, metavar: str | None = None, **kw: Any) -> dict[str, Any]:
    """A field's typer declaration, kept in its metadata."""
    return {"option": typer.Option(*decls, rich_help_panel=panel, help=help, metavar=metavar, **kw)}


def choices(values: tuple[str, ...]) -> str:
    return "|".join(values)


@dataclass(frozen=True)
class Given:
    """What the command line said, typed. An option the command does not take keeps its default
    (``present`` names those it takes)."""

    # input
    pages: str | None = field(
        default=None, metadata=opt("--pages", panel=INPUT, metavar="PAGES", help="PDF pages, e.g. 1-5,9.")
    )
    include: list[str] | None = field(
        default=None, metadata=opt("--include", panel=INPUT, metavar="GLOB", help="Only files matching GLOB (folders).")
    )
    exclude: list[str] | None = field(
        default=None, metadata=opt("--exclude", panel=INPUT, metavar="GLOB", help="Skip files matching GLOB (folders).")
    )
    max_file_size: str = field(
        default=MAX_FILE_SIZE,
        metadata=opt(
            "--max-file-size", panel=INPUT, metavar="SIZE", help="Refuse any one input larger than this (e.g. 1G)."
        ),
    )
    max_total_size: str = field(
        default=MAX_TOTAL_SIZE,
        metadata=opt(
            "--max-total-size", panel=INPUT, metavar="SIZE", help="Refuse inputs adding up to more than this."
        ),
    )
    prompts: str | None = field(
        default=None,
        metadata=opt(
            "--prompts",
            panel=INPUT,
            metavar="DIR",
            help="Prompt templates (ask.txt, ...) overriding the packaged ones file by file.",
        ),
    )
    # model
    model: str | None = field(
        default=RunConfig.model,
        metadata=opt(
            "-m",
            "--model",
            panel=MODEL,
            metavar="NAME|PATH",
            help="Model: auto (default: qwen2.5-coder-1.5b where it is installed and this machine is fast enough,"
            " else the embedded 0.5B; `longdoc models` says which), a known name, a local HF folder, or a .gguf"
            " file. With --endpoint only its tokenizer is"
            " used, to count tokens for the fit checks: an estimate when the server runs another model.",
        ),
    )
    device: str = field(
        default=RunConfig.device,
        metadata=opt("--device", panel=MODEL, metavar="auto|cpu|cuda", help="Where the model runs."),
    )
    dtype: str = field(
        default=RunConfig.dtype,
        metadata=opt("--dtype", panel=MODEL, metavar="auto|bfloat16|float32|float16", help="Weights and activations."),
    )
    quantize: str = field(
        default=RunConfig.quantize,
        metadata=opt(
            "--quantize",
            panel=MODEL,
            metavar="auto|none|int5|q8|int8|int4",
            help="Quantized linears for decoding: auto is q8 (one copy of the weights) on x86 CPUs with AVX2 and"
            " on ARM NEON, with a C compiler, else int8 where VNNI is, else none (made once, cached).",
        ),
    )
    # long context
    dca: bool | None = field(
        default=DCAConfig.enabled,
        metadata=opt(
            "--dca/--no-dca",
            panel=LONG_CONTEXT,
            metavar=FLAG,
            help="Dual Chunk Attention (default: on when the prompt exceeds the model window).",
        ),
    )
    recycle: bool | None = field(
        default=RecycleConfig.enabled,
        metadata=opt(
            "--recycle/--no-recycle",
            panel=LONG_CONTEXT,
            metavar=FLAG,
            help=f"Recycled Attention decoding (default: on for contexts of {RecycleConfig.auto_min_context:,} tokens"
            f" or more; {RecycleConfig.auto_min_context_native:,} where a q8 decode step runs in one native call).",
        ),
    )
    prefill: str = field(
        default=PrefillConfig.mode,
        metadata=opt(
            "--prefill",
            panel=LONG_CONTEXT,
            metavar="auto|exact|sparse",
            help=f"Prefill attention: auto is sparse from {PrefillConfig.auto_min_tokens:,} prompt tokens on.",
        ),
    )
    max_context: int | None = field(
        default=RunConfig.max_context,
        metadata=opt(
            "--max-context", panel=LONG_CONTEXT, metavar="TOKENS", help="Refuse prompts longer than this many tokens."
        ),
    )
    options: list[str] | None = field(
        default=None,
        metadata=opt(
            "-o",
            "--option",
            panel=LONG_CONTEXT,
            metavar="KEY=VALUE",
            help="An expert setting (repeatable): the DCA layout, recycled decoding, sparse prefill, kernels, the cache"
            " cap. -o help (or `longdoc options`) lists them.",
            callback=knobs.help_callback,
            is_eager=True,
        ),
    )
    # decoding
    max_new_tokens: int = field(
        default=GenerationConfig.max_new_tokens,
        metadata=opt("--max-new-tokens", panel=DECODING, metavar="TOKENS", help="Most tokens to generate."),
    )
    temperature: float = field(
        default=GenerationConfig.temperature,
        metadata=opt("--temperature", panel=DECODING, metavar="FLOAT", help="Sampling temperature; 0 = greedy."),
    )
    top_p: float = field(
        default=GenerationConfig.top_p,
        metadata=opt(
            "--top-p", panel=DECODING, metavar="FLOAT", help="Nucleus sampling mass (with --temperature above 0)."
        ),
    )
    seed: int | None = field(
        default=GenerationConfig.seed,
        metadata=opt("--seed", panel=DECODING, metavar="INTEGER", help="Random seed for sampling."),
    )
    # output
    json_out: bool = field(
        default=False,
        metadata=opt(
            "--json", panel=OUTPUT, metavar=FLAG, help="Print one JSON object to stdout and nothing else there."
        ),
    )
    quiet: bool = field(
        default=False,
        metadata=opt("--quiet", "-q", panel=OUTPUT, metavar=FLAG, help="No progress or timings on stderr."),
    )
    # cache
    no_cache: bool = field(
        default=not RunConfig.doc_cache,
        metadata=opt(
            "--no-cache",
            panel=CACHE,
            metavar=FLAG,
            help="Neither read nor write the document KV cache (see `longdoc cache`).",
        ),
    )
    # remote
    endpoint: str | None = field(
        default=None,
        metadata=opt(
            "--endpoint",
            panel=REMOTE,
            metavar="URL",
            help="Send the model calls to this OpenAI-compatible server (longdoc serve, vLLM, llama-server), e.g."
            " http://127.0.0.1:8000/v1; reading, prompts, fit checks and the JSON stay local.",
        ),
    )
    # Not $OPENAI_API_KEY: that key is meant for OpenAI, and --endpoint may name any server.
    api_key: str | None = field(
        default=None,
        metadata=opt(
            "--api-key", panel=REMOTE, metavar="KEY", envvar=env.API_KEY, help="With --endpoint: its bearer token."
        ),
    )
    remote_model: str | None = field(
        default=None,
        metadata=opt(
            "--remote-model",
            panel=REMOTE,
            metavar="NAME",
            help="With --endpoint: the served model to use (default: the first listed).",
        ),
    )
    concurrency: int = field(
        default=1,
        metadata=opt(
            "--concurrency",
            panel=REMOTE,
            metavar="N",
            help="With --endpoint: requests sent at once by --each and map-reduce (a batching server runs them"
            " together).",
        ),
    )
    timeout: float = field(
        default=REMOTE_TIMEOUT_S,
        metadata=opt(
            "--timeout",
            panel=REMOTE,
            metavar="SECONDS",
            help="With --endpoint: the longest the server may stay silent within an answer (a long prefill).",
        ),
    )
    # not options: which ones the command takes, its expert settings and those given by their old flags
    present: frozenset[str] = frozenset()
    keys: tuple[str, ...] = ()
    flags: tuple[tuple[str, object], ...] = ()

    def expert(self) -> knobs.Knobs:
        """The expert settings: -o KEY=VALUE and the old flags, typed (a UsageError for a bad one)."""
        return knobs.parse(self.options or [], dict(self.flags), self.keys)


# The options that run the model, by panel (a command lists the groups it takes).
INPUTS = ("pages", "include", "exclude", "max_file_size", "max_total_size", "prompts")
MODEL_OPTIONS = ("model", "device", "dtype", "quantize")
LONG_CONTEXT_OPTIONS = ("dca", "recycle", "prefill", "max_context")
DECODING_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed")
OUTPUTS = ("json_out", "quiet")
REMOTE_OPTIONS = ("endpoint", "api_key", "remote_model", "timeout")
