"""The command line: parse options into config objects, call the core, map errors to exit codes."""

from __future__ import annotations

import _thread
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, Any

# The partial result of a run interrupted before any command started (importing, parsing arguments).
STARTED_JSON = '{"answer": "", "interrupted": true, "stage": "start"}'

try:
    import typer

    from longdoc import errors, render
    from longdoc.config import (
        PREFILL_MODES,
        QUANTIZE_CHOICES,
        DCAConfig,
        GenerationConfig,
        PrefillConfig,
        RecycleConfig,
        RunConfig,
    )
    from longdoc.errors import LongdocError, UsageError
    from longdoc.render import Reporter, console, human_bytes, plain
except KeyboardInterrupt:  # Ctrl-C while starting up: interrupted, without a traceback
    if "--json" in sys.argv:  # scripts still get their (empty) partial result
        print(STARTED_JSON, flush=True)
    raise SystemExit(130) from None

if TYPE_CHECKING:  # imported where used: they bring torch, which --help and bad arguments never need
    from longdoc.runtime.backend import Backend
    from longdoc.runtime.result import Citation, Result, Source

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Ask questions about, and summarize, documents far longer than a small model's window.",
)
eval_app = typer.Typer(no_args_is_help=True, help="Built-in long-context checks on the chosen model and settings.")
app.add_typer(eval_app, name="eval")

# Options shared by every command that runs the model (names are part of the contract).
Model = Annotated[
    str | None,
    typer.Option(
        "-m",
        "--model",
        help="Model: default embedded, a local HF folder, or a .gguf file. With --endpoint only its tokenizer is"
        " used, to count tokens for the fit checks: an estimate when the server runs another model.",
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto | bfloat16 | float32 | float16")]
Quantize = Annotated[
    str,
    typer.Option(
        "--quantize",
        help="Quantized linears for decoding: auto (int5 on x86 CPUs with AVX-512 VNNI and a C compiler, else int8"
        " where VNNI is) | none | int5 | int8 | int4 (made once, cached).",
    ),
]
Prefill = Annotated[
    str,
    typer.Option(
        "--prefill", help="Prefill attention: auto (sparse for long prompts) | exact | sparse (see RESULTS.md)."
    ),
]
PrefillBudget = Annotated[
    int | None,
    typer.Option(
        "--prefill-budget",
        help="Sparse prefill: keys each query picks beyond its local band (default: "
        f"{PrefillConfig.budget_default}, {PrefillConfig.budget_long} from {PrefillConfig.long_min_tokens:,} tokens).",
    ),
]
Dca = Annotated[
    bool | None,
    typer.Option("--dca/--no-dca", help="Dual Chunk Attention (default: on when the prompt exceeds the model window)."),
]
ChunkSize = Annotated[
    int | None, typer.Option("--chunk-size", help="DCA chunk size s (default 3/4 of the model window).")
]
DcaTemperature = Annotated[
    bool,
    typer.Option(
        "--dca-temperature/--no-dca-temperature",
        help="Scale attention logits by (0.1 ln(L/W) + 1)^2 beyond the window (default off; see RESULTS.md).",
    ),
]
LocalWindow = Annotated[
    int | None, typer.Option("--local-window", help="DCA local window w (default 1/8 of the model window).")
]
Recycle = Annotated[
    bool | None,
    typer.Option("--recycle/--no-recycle", help="Recycled Attention decoding (default: on for contexts >= 8K)."),
]
RecycleK = Annotated[int, typer.Option("--recycle-k", help="Recycled keys per layer and KV head.")]
RecycleStride = Annotated[int, typer.Option("--recycle-stride", help="A full-attention step every N decode steps.")]
RecycleSchedule = Annotated[str, typer.Option("--recycle-schedule", help="fixed | dynamic")]
RecycleThreshold = Annotated[
    float,
    typer.Option("--recycle-threshold", help="Dynamic schedule: query cosine similarity below which a full step runs."),
]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout and nothing else there.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or timings on stderr.")]
MaxContext = Annotated[int | None, typer.Option("--max-context", help="Refuse prompts longer than this many tokens.")]
Pages = Annotated[str | None, typer.Option("--pages", help="PDF pages, e.g. 1-5,9.")]
Include = Annotated[list[str] | None, typer.Option("--include", help="Only files matching GLOB (folders).")]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", help="Skip files matching GLOB (folders).")]
MaxFileSize = Annotated[
    str, typer.Option("--max-file-size", metavar="SIZE", help="Refuse any one input larger than this (e.g. 1G).")
]
MaxTotalSize = Annotated[
    str, typer.Option("--max-total-size", metavar="SIZE", help="Refuse inputs adding up to more than this.")
]
Prompts = Annotated[
    str | None,
    typer.Option(
        "--prompts", metavar="DIR", help="Prompt templates (ask.txt, ...) overriding the packaged ones file by file."
    ),
]

NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the document KV cache (see `longdoc cache`).")
]
CacheMaxGb = Annotated[
    float,
    typer.Option("--cache-max-gb", help="Document KV cache size cap in GB; least recently used entries go first."),
]

# --endpoint: the model calls go to an OpenAI-compatible server (longdoc.runtime.remote); the rest stays here.
Endpoint = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        metavar="URL",
        help="Send the model calls to this OpenAI-compatible server (longdoc serve, vLLM, llama-server), e.g."
        " http://127.0.0.1:8000/v1; reading, prompts, fit checks and the JSON stay local.",
    ),
]
# Not $OPENAI_API_KEY: that key is meant for OpenAI, and --endpoint may name any server.
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LONGDOC_API_KEY", show_envvar=True, help="With --endpoint: its bearer token."),
]
RemoteTimeout = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="With --endpoint: the longest the server may stay silent within an answer (a long prefill).",
    ),
]
RemoteModel = Annotated[
    str | None,
    typer.Option(
        "--remote-model", metavar="NAME", help="With --endpoint: the served model to use (default: the first listed)."
    ),
]
Concurrency = Annotated[
    int,
    typer.Option(
        "--concurrency",
        help="With --endpoint: requests sent at once by --each and map-reduce (a batching server runs them together).",
    ),
]

# --timeout's default, as the option shows it (longdoc.runtime.remote.READ_TIMEOUT_S; not imported: it imports torch).
DEFAULT_REMOTE_TIMEOUT_S = 300.0

# Defaults of the size caps, as the options show them (longdoc.ingest.MAX_FILE_SIZE / MAX_TOTAL_SIZE).
DEFAULT_MAX_FILE_SIZE = "256M"
DEFAULT_MAX_TOTAL_SIZE = "1G"


@dataclass
class RunState:
    """What an interrupted run knows so far, for the partial JSON result: the stage it was in, and the
    model, sources and result once they exist."""

    stage: str = "start"
    model: str | None = None
    sources: list[Source] = field(default_factory=list)
    result: Result | None = None


@contextmanager
def handled(reporter: Reporter, state: RunState | None = None) -> Iterator[None]:
    """Turn user errors into one line and their exit code; never a traceback for them.

    Ctrl-C (anywhere: reading inputs, loading, prefill, map-reduce) exits 130, and with --json
    prints the partial result that ``state`` describes unless a JSON object is out already.
    """
    try:
        yield
    except typer.Exit:  # a decided exit (an interrupted result already reported by _finish)
        raise
    except LongdocError as exc:
        reporter.error(exc.message)
        raise typer.Exit(exc.exit_code) from None
    except MemoryError:
        reporter.error("out of memory; try a shorter input or --dtype bfloat16")
        raise typer.Exit(errors.EXIT_DOES_NOT_FIT) from None
    except (KeyboardInterrupt, Exception) as exc:
        if not _caused_by_interrupt(exc):
            raise  # a bug: the traceback is what a report needs
        reporter.error("interrupted")
        if state is not None and reporter.json_mode and not reporter.json_printed:
            reporter.json(partial_result(state).to_json())
        raise typer.Exit(errors.EXIT_INTERRUPTED) from None


# Ctrl-Cs this process has received (counted by main()'s SIGINT handler).
_sigints = 0


def _count_sigint(signum: int, frame: Any) -> None:
    global _sigints
    _sigints += 1
    raise KeyboardInterrupt


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether an error is a Ctrl-C in disguise. Libraries wrap an interrupted import in their own
    errors, some naming it and some not (transformers' lazy modules raise "Could not import module
    'Qwen2ForCausalLM'", seen in the SIGINT fuzz): once a Ctrl-C has arrived, any error counts."""
    if _sigints:
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt) or "KeyboardInterrupt" in str(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def partial_result(state: RunState) -> Result:
    """The result of a run interrupted before it had one: what it knew, and ``interrupted``."""
    from longdoc.runtime.result import Result

    if state.result is not None:
        return replace(state.result, interrupted=True)
    return Result(answer="", model=state.model, sources=state.sources, interrupted=True, stage=state.stage)


def _positive(opts: dict[str, Any], name: str, option: str) -> None:
    value = opts.get(name)
    if value is not None and value < 1:
        raise UsageError(f"{option} must be at least 1")


def check_options(opts: dict[str, Any]) -> None:
    """Every option a command has, checked before any input is read or model loaded.

    Sampling values are checked here because a bad one fails only after the prefill (NaN
    probabilities), the device and dtype because a typo should not cost a model load, and the
    inputs' options because a typo should not cost reading a large folder.
    """
    from longdoc import models

    for name, option in (("max_new_tokens", "--max-new-tokens"), ("max_context", "--max-context")):
        _positive(opts, name, option)
    cap = opts.get("cache_max_gb", 1.0)
    if not (math.isfinite(cap) and cap > 0):
        raise UsageError(f"--cache-max-gb must be a size in GB above 0, not {cap}")
    if opts.get("recycle_k", 1) < 1 or opts.get("recycle_stride", 1) < 1:
        raise UsageError("--recycle-k and --recycle-stride must be at least 1")
    temperature, top_p = opts.get("temperature", 0.0), opts.get("top_p", 1.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be 0 (greedy) or more, not {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UsageError(f"--top-p must be above 0 and at most 1, not {top_p}")
    threshold = opts.get("recycle_threshold", 0.9)
    if not (math.isfinite(threshold) and -1 <= threshold <= 1):
        raise UsageError(f"--recycle-threshold is a cosine similarity between -1 and 1, not {threshold}")
    models.resolve_dtype(opts.get("dtype", "auto"), models.resolve_device(opts.get("device", "auto")))
    if opts.get("prefill", "auto") not in PREFILL_MODES:
        raise UsageError(f"--prefill accepts {', '.join(PREFILL_MODES)}, not {opts['prefill']!r}")
    _positive(opts, "prefill_budget", "--prefill-budget")
    if opts.get("quantize", "auto") not in QUANTIZE_CHOICES:
        raise UsageError(f"--quantize accepts {', '.join(QUANTIZE_CHOICES)}, not {opts['quantize']!r}")
    if opts.get("pages"):
        from longdoc.ingest.pdf import check_pages

        check_pages(opts["pages"])
    for name in ("include", "exclude"):
        _check_globs(opts.get(name) or [], f"--{name}")
    if "max_file_size" in opts:
        read_budget(opts)
    if "endpoint" in opts:  # commands that can run remotely: --endpoint and its companions
        from longdoc.runtime import remote

        remote.options(opts)
    if "prompts" in opts:  # commands that build prompts: a broken template is a usage error up front
        from longdoc import prompt

        prompt.use_prompts_dir(opts["prompts"])
        prompt.check_templates()


def _check_globs(globs: list[str], option: str) -> None:
    import pathspec

    for glob in globs:
        try:
            pathspec.GitIgnoreSpec.from_lines([glob])
        except Exception as exc:  # pathspec raises assorted errors for malformed patterns
            raise UsageError(f"{option} {glob!r} is not a valid pattern ({exc})") from None


def read_budget(opts: dict[str, Any]) -> Any:
    """The size caps of --max-file-size and --max-total-size."""
    from longdoc.ingest import ReadBudget, parse_size

    try:
        return ReadBudget(
            parse_size(opts.get("max_file_size", DEFAULT_MAX_FILE_SIZE), "--max-file-size"),
            parse_size(opts.get("max_total_size", DEFAULT_MAX_TOTAL_SIZE), "--max-total-size"),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_config(opts: dict[str, Any]) -> RunConfig:
    """Build the run settings from a command's parsed options (its ``locals()``); absent options keep
    their defaults, so every command shares one validation (``check_options``)."""
    d = RunConfig()
    chunk_size, local_window = opts.get("chunk_size"), opts.get("local_window")
    check_options(opts)
    if opts.get("recycle_schedule", "fixed") not in ("fixed", "dynamic"):
        raise UsageError("--recycle-schedule must be fixed or dynamic")
    if chunk_size is not None and chunk_size < 2:
        raise UsageError("--chunk-size must be at least 2")
    if local_window is not None and local_window < 0:
        raise UsageError("--local-window must be at least 0")
    if chunk_size is not None and local_window is not None and local_window >= chunk_size:
        raise UsageError("--local-window must be smaller than --chunk-size")
    # the rest of the layout rule needs the model's trained window: ChunkLayout.for_window, at planning
    return RunConfig(
        model=opts.get("model"),
        device=opts.get("device", d.device),
        dtype=opts.get("dtype", d.dtype),
        quantize=opts.get("quantize", d.quantize),
        max_context=opts.get("max_context"),
        doc_cache=not opts.get("no_cache", False),
        cache_max_gb=opts.get("cache_max_gb", d.cache_max_gb),
        dca=DCAConfig(
            enabled=opts.get("dca"),
            chunk_size=chunk_size,
            local_window=local_window,
            temperature=opts.get("dca_temperature", d.dca.temperature),
        ),
        prefill=PrefillConfig(
            mode=opts.get("prefill", d.prefill.mode), budget=opts.get("prefill_budget", d.prefill.budget)
        ),
        recycle=RecycleConfig(
            enabled=opts.get("recycle", d.recycle.enabled),
            k=opts.get("recycle_k", d.recycle.k),
            stride=opts.get("recycle_stride", d.recycle.stride),
            schedule=opts.get("recycle_schedule", d.recycle.schedule),
            threshold=opts.get("recycle_threshold", d.recycle.threshold),
        ),
        generation=GenerationConfig(
            max_new_tokens=opts.get("max_new_tokens", d.generation.max_new_tokens),
            temperature=opts.get("temperature", d.generation.temperature),
            top_p=opts.get("top_p", d.generation.top_p),
            seed=opts.get("seed"),
        ),
    )


def open_session(cfg: RunConfig, reporter: Reporter, opts: dict[str, Any]) -> Backend:
    """The backend a command runs on: the local model, or with --endpoint a server (``remote.RemoteBackend``:
    the local tokenizer only, never the weights). ``opts`` are the command's parsed options."""
    from longdoc.runtime import local, remote

    options = remote.options(opts)
    if options is None:
        return local.LocalBackend(cfg, reporter)
    ignored = remote.local_only(opts)
    if ignored:
        reporter.warn(f"{', '.join(ignored)}: not applicable with --endpoint (the server runs the model its own way)")
    return remote.RemoteBackend(cfg, reporter, options)


def _finish(reporter: Reporter, result: Result) -> None:
    if reporter.json_mode:
        reporter.json(result.to_json())
    else:
        reporter.end_answer()
    reporter.stats(result.stats_line())
    if result.interrupted:
        reporter.error("interrupted")
        raise typer.Exit(errors.EXIT_INTERRUPTED)


def _ingest(
    reporter: Reporter,
    paths: list[str],
    pages: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    budget: Any = None,
) -> tuple[list[Any], float]:
    from longdoc import ingest

    t0 = time.perf_counter()
    reporter.status(f"reading {', '.join(paths) if len(paths) <= 3 else f'{len(paths)} inputs'}")
    with reporter.progress("reading", 0, unit="files/pages", lazy=True):
        docs = ingest.ingest_paths(
            paths,
            pages=pages,
            include=include or [],
            exclude=exclude or [],
            budget=budget,
            progress=lambda done, total: reporter.advance(done, total),
        )
    for doc in docs:
        for w in doc.warnings:
            reporter.warn(w)
    elapsed = time.perf_counter() - t0
    segments = sum(len(d.segments) for d in docs)
    reporter.status(f"read {len(docs)} source(s), {segments} page(s)/file(s) in {elapsed:.1f}s")
    return docs, round(elapsed, 3)


@app.command()
def ask(
    args: Annotated[
        list[str], typer.Argument(metavar="PATH... QUESTION", help="Inputs ('-' for stdin), then the question.")
    ],
    question: Annotated[
        list[str] | None,
        typer.Option("-Q", "--question", help="A question (repeatable); with it every argument is a PATH."),
    ] = None,
    questions: Annotated[
        str | None,
        typer.Option("--questions", metavar="FILE|-", help="Questions, one per line ('-': stdin); args are PATHs."),
    ] = None,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = RunConfig.quantize,
    prefill: Prefill = PrefillConfig.mode,
    prefill_budget: PrefillBudget = PrefillConfig.budget,
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    recycle: Recycle = None,
    recycle_k: RecycleK = RecycleConfig.k,
    recycle_stride: RecycleStride = RecycleConfig.stride,
    recycle_schedule: RecycleSchedule = RecycleConfig.schedule,
    recycle_threshold: RecycleThreshold = RecycleConfig.threshold,
    max_new_tokens: MaxNew = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    json_out: Json = False,
    quiet: Quiet = False,
    max_context: MaxContext = None,
    pages: Pages = None,
    include: Include = None,
    exclude: Exclude = None,
    max_file_size: MaxFileSize = DEFAULT_MAX_FILE_SIZE,
    max_total_size: MaxTotalSize = DEFAULT_MAX_TOTAL_SIZE,
    prompts: Prompts = None,
    no_cache: NoCache = False,
    cache_max_gb: CacheMaxGb = RunConfig.cache_max_gb,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    remote_model: RemoteModel = None,
    timeout: RemoteTimeout = DEFAULT_REMOTE_TIMEOUT_S,
) -> None:
    """Answer one or more questions about the inputs (the documents are prefilled once)."""
    reporter = Reporter(quiet=quiet, json_mode=json_out)
    state = RunState()
    with handled(reporter, state):
        from longdoc.runtime.result import sources_of
        from longdoc.tasks.chat import ask_all, read_questions
        from longdoc.tasks.citations import extract_citations

        paths, asked = _paths_and_questions(args, question, questions)
        opts = locals()
        cfg = run_config(opts)
        if questions is not None:
            asked += read_questions(questions)
        state.stage = "ingest"
        docs, ingest_s = _ingest(reporter, paths, pages, include, exclude, read_budget(locals()))
        state.stage = "load"
        session = open_session(cfg, reporter, opts)
        state.model = session.name
        state.sources = sources = sources_of(docs, session.count)
        state.stage = "generate"
        many = len(asked) > 1

        def before(q: str) -> None:
            if many and not json_out:
                reporter.stream(f"Q: {q}\n")

        def emit(q: str, result: Result) -> None:
            state.result = result
            result.question = q
            _add_reading(result, ingest_s, extract_citations(result.answer, docs))
            _finish(reporter, result)
            if many and not json_out:
                reporter.stream("\n")
            state.result = None

        ask_all(session, docs, asked, sources, emit, before=before, on_text=reporter.stream)


def _paths_and_questions(
    args: list[str], options: list[str] | None, from_file: str | None
) -> tuple[list[str], list[str]]:
    """Split ask's arguments: with --question/--questions every argument is a path, else the last is
    the question. The --questions file is read by the caller."""
    if options or from_file is not None:
        paths, asked = list(args), list(options or [])
    else:
        if len(args) < 2:
            raise UsageError('give at least one PATH and a QUESTION, e.g. longdoc ask paper.pdf "What is proposed?"')
        *paths, last = args
        asked = [last]
    if not paths:
        raise UsageError("give at least one PATH to ask about")
    if any(not q.strip() for q in asked):
        raise UsageError("the question is empty; ask something about the documents")
    if from_file == "-" and "-" in paths:
        raise UsageError("stdin cannot be both an input ('-') and the --questions list")
    return paths, [q.strip() for q in asked]


@app.command()
def summarize(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH...", help="Inputs ('-' for stdin).")] = None,
    style: Annotated[str, typer.Option("--style", help="brief | detailed | bullets")] = "brief",
    max_words: Annotated[int | None, typer.Option("--max-words", help="Word limit for the summary.")] = None,
    each: Annotated[bool, typer.Option("--each", help="One summary per input (JSONL with --json).")] = False,
    paths_from: Annotated[
        str | None,
        typer.Option(
            "--paths-from", metavar="FILE|-", help="Also read input paths from FILE ('-': stdin), one per line."
        ),
    ] = None,
    null: Annotated[
        bool, typer.Option("-0", "--null", help="--paths-from input is NUL-separated (find -print0).")
    ] = False,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = RunConfig.quantize,
    prefill: Prefill = PrefillConfig.mode,
    prefill_budget: PrefillBudget = PrefillConfig.budget,
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    recycle: Recycle = None,
    recycle_k: RecycleK = RecycleConfig.k,
    recycle_stride: RecycleStride = RecycleConfig.stride,
    recycle_schedule: RecycleSchedule = RecycleConfig.schedule,
    recycle_threshold: RecycleThreshold = RecycleConfig.threshold,
    max_new_tokens: MaxNew = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    json_out: Json = False,
    quiet: Quiet = False,
    max_context: MaxContext = None,
    pages: Pages = None,
    include: Include = None,
    exclude: Exclude = None,
    max_file_size: MaxFileSize = DEFAULT_MAX_FILE_SIZE,
    max_total_size: MaxTotalSize = DEFAULT_MAX_TOTAL_SIZE,
    prompts: Prompts = None,
    no_cache: NoCache = False,
    cache_max_gb: CacheMaxGb = RunConfig.cache_max_gb,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    remote_model: RemoteModel = None,
    concurrency: Concurrency = 1,
    timeout: RemoteTimeout = DEFAULT_REMOTE_TIMEOUT_S,
) -> None:
    """Summarize the inputs (together, or one by one with --each); map-reduce when they do not fit at once."""
    reporter = Reporter(quiet=quiet, json_mode=json_out)
    state = RunState()
    # --each: Ctrl-C within an input gives that input its line (one_of_each); before the first input
    # starts, the command-wide handler prints the partial result of ``state``
    with handled(reporter, state):
        from longdoc.prompt import summary_instructions
        from longdoc.tasks.summarize import read_paths_from

        if null and paths_from is None:
            raise UsageError("-0/--null applies to --paths-from; give --paths-from FILE or -")
        if paths_from == "-" and "-" in (paths or []):
            raise UsageError("stdin cannot be both an input ('-') and the --paths-from list")
        summary_instructions(style, max_words)  # a bad --style is a usage error before any work
        if max_words is not None and max_words < 1:
            raise UsageError("--max-words must be at least 1")
        opts = locals()
        cfg = run_config(opts)
        budget = read_budget(opts)
        paths = list(paths or []) + (read_paths_from(paths_from, null) if paths_from is not None else [])
        if not paths:
            raise UsageError("give at least one PATH to summarize ('-' reads stdin), or --paths-from FILE")
        run = _Summaries(reporter, cfg, style, max_words, (pages, include, exclude, budget), opts)
        if not each:
            run.together(paths, state)
            return
        failures = run.each(paths)
        if failures:
            # any unreadable input: 3; only inputs that did not fit: 4 (README "Exit codes")
            raise typer.Exit(errors.EXIT_INPUT if errors.EXIT_INPUT in failures else errors.EXIT_DOES_NOT_FIT)


class _Summaries:
    """The runs of one ``summarize`` command: all inputs together, or each on its own (``--each``),
    sharing one loaded model (or one connection to --endpoint)."""

    def __init__(
        self,
        reporter: Reporter,
        cfg: RunConfig,
        style: str,
        max_words: int | None,
        inputs: tuple[Any, ...],
        opts: dict[str, Any],
    ) -> None:
        self.reporter = reporter
        self.cfg = cfg
        self.style = style
        self.max_words = max_words
        self.inputs = inputs  # pages, include, exclude, read budget
        self.opts = opts  # the command's options, for open_session
        self.session: Backend | None = None

    def open(self) -> Backend:
        self.session = self.session or open_session(self.cfg, self.reporter, self.opts)
        return self.session

    def read(self, paths: list[str]) -> tuple[list[Any], float]:
        pages, include, exclude, budget = self.inputs
        return _ingest(self.reporter, paths, pages, include, exclude, budget)

    def run(self, docs: list[Any], ingest_s: float, on_text: Callable[[str], None] | None = None) -> Result:
        from longdoc.tasks.citations import extract_citations
        from longdoc.tasks.summarize import summarize as summarize_docs

        result = summarize_docs(self.open(), docs, self.style, self.max_words, self.reporter, on_text=on_text)
        _add_reading(result, ingest_s, extract_citations(result.answer, docs))
        return result

    def summarize(self, paths: list[str], state: RunState) -> Result:
        """Read ``paths``, load the model once, summarize; ``state`` follows the stages for Ctrl-C."""
        state.stage = "ingest"
        docs, ingest_s = self.read(paths)
        state.stage = "load"
        state.model = self.open().name
        state.stage = "generate"
        result = state.result = self.run(docs, ingest_s, on_text=self.reporter.stream)
        return result

    def together(self, paths: list[str], state: RunState) -> None:
        _finish(self.reporter, self.summarize(paths, state))

    def each(self, paths: list[str]) -> list[int]:
        """``--each``: the exit codes of the inputs that failed without stopping the batch."""
        if self.opts.get("concurrency", 1) > 1:
            return self.each_at_once(paths)
        return [code for path in paths if (code := self.one_of_each(path)) is not None]

    def one_of_each(self, path: str) -> int | None:
        """Summarize one input of ``--each``: its JSON line (or streamed text); the exit code of a
        failure that should not stop the batch, or None. Ctrl-C gives the input a line marked
        ``interrupted`` (lines already out stay) and ends the batch with 130."""
        state = RunState()
        try:
            self.reporter.status(f"summarizing {path}")
            result = self.summarize([path], state)
        except (errors.InputError, errors.DoesNotFitError) as exc:
            return self.failed(path, exc)
        except KeyboardInterrupt:
            result = _interrupted_each(state)
        self.emit(path, result)
        return None

    def each_at_once(self, paths: list[str]) -> list[int]:
        """``--each`` with ``--concurrency N`` (through --endpoint): inputs are read here, one after the
        other, and summarized up to N at once in threads; each summary is printed whole, in input order."""
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        failures: list[int] = []
        waiting: deque[tuple[str, Future[Result]]] = deque()
        here = (paths[0], "load")  # what this thread does (a Ctrl-C with nothing waiting cuts it): path, stage
        pool = ThreadPoolExecutor(self.opts["concurrency"], thread_name_prefix="longdoc-each")
        try:
            self.open()  # connect once, before any thread starts
            for path in paths:
                here = (path, "ingest")
                self.reporter.status(f"summarizing {path}")
                try:
                    docs, ingest_s = self.read([path])
                    work = pool.submit(self.run, docs, ingest_s)
                except errors.InputError as exc:
                    work = Future()
                    work.set_exception(exc)
                waiting.append((path, work))
                while waiting and (len(waiting) >= self.opts["concurrency"] or waiting[0][1].done()):
                    self.finish_each(*waiting[0], failures)
                    waiting.popleft()  # only now: a Ctrl-C while it was awaited gives it the interrupted line
            while waiting:
                self.finish_each(*waiting[0], failures)
                waiting.popleft()
        except KeyboardInterrupt:
            if self.session is not None:
                self.session.stop()
            if waiting:  # the first input not printed yet gets the interrupted line
                here = (waiting[0][0], "generate")
            self.emit(here[0], _interrupted_each(RunState(stage=here[1])))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return failures

    def finish_each(self, path: str, work: Any, failures: list[int]) -> None:
        try:
            result = work.result()
        except (errors.InputError, errors.DoesNotFitError) as exc:
            failures.append(self.failed(path, exc))
            return
        if not self.reporter.json_mode:  # summaries made side by side are printed whole, not streamed
            self.reporter.stream(result.answer)
        self.emit(path, result)

    def failed(self, path: str, exc: errors.LongdocError) -> int:
        self.reporter.error(exc.message)
        if self.reporter.json_mode:
            self.reporter.json({"path": path, "error": exc.message})
        return exc.exit_code

    def emit(self, path: str, result: Result) -> None:
        """One input's JSON line (or the end of its streamed text) and stats; exits 130 when interrupted."""
        reporter = self.reporter
        if reporter.json_mode:
            full = result.to_json()
            line = {
                "path": path,
                "summary": result.answer,
                "prompt_tokens": result.prompt_tokens,
                "timings": full.get("timings", {}),
                "plan": full.get("plan"),
            }
            for key in ("engine", "cache", "usage", "server"):  # where known (a full result; through --endpoint)
                if key in full:
                    line[key] = full[key]
            if result.citations:
                line["citations"] = full["citations"]
            if result.interrupted:
                line["interrupted"] = True
                line["stage"] = result.stage or "generate"
            reporter.json(line)
        else:
            reporter.end_answer()
        if result.memory is not None:  # a full result (a partial one from before the model ran has no stats)
            reporter.stats(result.stats_line())
        if result.interrupted:
            reporter.error(f"interrupted while summarizing {path}")
            raise typer.Exit(errors.EXIT_INTERRUPTED)


def _interrupted_each(state: RunState) -> Result:
    """The result of an ``--each`` input that a Ctrl-C cut short: what it had, marked ``interrupted``."""
    return partial_result(state)


def _add_reading(result: Result, ingest_s: float, citations: list[Citation]) -> None:
    """What the CLI adds to a task's result: the time it took to read the inputs, and the citations."""
    if result.timings is not None:
        result.timings.ingest_s = ingest_s
    result.citations = citations


@app.command()
def count(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH...", help="Inputs ('-' for stdin).")] = None,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    dca: Dca = None,
    max_new_tokens: MaxNew = 512,
    json_out: Json = False,
    quiet: Quiet = False,
    max_context: MaxContext = None,
    pages: Pages = None,
    include: Include = None,
    exclude: Exclude = None,
    max_file_size: MaxFileSize = DEFAULT_MAX_FILE_SIZE,
    max_total_size: MaxTotalSize = DEFAULT_MAX_TOTAL_SIZE,
    prompts: Prompts = None,
) -> None:
    """Per-source token counts (model tokenizer and cl100k estimate) and whether they fit."""
    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        from rich.table import Table

        from longdoc.prompt import ask_prompt
        from longdoc.runtime import local
        from longdoc.runtime.result import json_of, sources_of
        from longdoc.tokens import estimate_cl100k

        if not paths:
            raise UsageError("give at least one PATH to count")
        cfg = run_config(locals())
        docs, _ = _ingest(reporter, paths, pages, include, exclude, read_budget(locals()))
        session = local.LocalBackend(cfg, reporter)
        rows = [
            {**json_of(entry), "cl100k": estimate_cl100k(doc.text)}
            for entry, doc in zip(sources_of(docs, session.count), docs, strict=True)
        ]
        prompt_tokens = session.count(ask_prompt(session.tokenizer, docs, "?"))
        verdict: dict[str, Any] = {"fits": True, "reason": ""}
        try:
            plan = session.plan(prompt_tokens)
            verdict["dca"] = plan.layout is not None
            verdict["max_context"] = plan.max_context
        except errors.DoesNotFitError as exc:
            verdict = {"fits": False, "reason": exc.message}
        summary = {
            "sources": rows,
            "total_tokens": sum(r["tokens"] for r in rows),
            "prompt_tokens": prompt_tokens,
            "max_new_tokens": max_new_tokens,
            "model": session.info.name,
            **verdict,
        }
        if json_out:
            reporter.json(summary)
        else:
            table = Table("source", "kind", "pages", "tokens", "cl100k")
            for r in rows:  # paths as Text: never markup, never cut (the console is unbounded off a terminal)
                table.add_row(
                    plain(r["path"]), r["kind"], str(r["pages"] or ""), f"{r['tokens']:,}", f"{r['cl100k']:,}"
                )
            table.add_row("total", "", "", f"{summary['total_tokens']:,}", f"{sum(r['cl100k'] for r in rows):,}")
            out = console(sys.stdout)
            out.print(table)
            if verdict["fits"]:
                mode = "with DCA" if verdict.get("dca") else "with plain attention"
                out.print(
                    f"prompt {prompt_tokens:,} tokens + {max_new_tokens} answer tokens: fits ({mode}, "
                    f"limit {verdict['max_context']:,})"
                )
            else:
                out.print(plain(f"does not fit: {verdict['reason']}"))
        if not verdict["fits"]:
            raise typer.Exit(errors.EXIT_DOES_NOT_FIT)


@app.command()
def chat(
    paths: Annotated[list[str] | None, typer.Argument(metavar="PATH...", help="Inputs ('-' for stdin).")] = None,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = RunConfig.quantize,
    prefill: Prefill = PrefillConfig.mode,
    prefill_budget: PrefillBudget = PrefillConfig.budget,
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    recycle: Recycle = None,
    recycle_k: RecycleK = RecycleConfig.k,
    recycle_stride: RecycleStride = RecycleConfig.stride,
    recycle_schedule: RecycleSchedule = RecycleConfig.schedule,
    recycle_threshold: RecycleThreshold = RecycleConfig.threshold,
    max_new_tokens: MaxNew = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    json_out: Json = False,
    quiet: Quiet = False,
    max_context: MaxContext = None,
    pages: Pages = None,
    include: Include = None,
    exclude: Exclude = None,
    max_file_size: MaxFileSize = DEFAULT_MAX_FILE_SIZE,
    max_total_size: MaxTotalSize = DEFAULT_MAX_TOTAL_SIZE,
    prompts: Prompts = None,
    no_cache: NoCache = False,
    cache_max_gb: CacheMaxGb = RunConfig.cache_max_gb,
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    remote_model: RemoteModel = None,
    timeout: RemoteTimeout = DEFAULT_REMOTE_TIMEOUT_S,
) -> None:
    """Questions about the same documents, each answer in context of the earlier ones.

    In a terminal: line editing and history; Ctrl-C stops an answer, Ctrl-D leaves. Otherwise one
    question per line of stdin (JSON lines with --json).
    """
    reporter = Reporter(quiet=quiet, json_mode=json_out)
    state = RunState()
    with handled(reporter, state):
        from longdoc.runtime.result import sources_of
        from longdoc.tasks.chat import piped_questions, terminal_questions
        from longdoc.tasks.citations import extract_citations

        if not paths:
            raise UsageError("give at least one PATH to chat about")
        interactive = sys.stdin.isatty()
        if "-" in paths and not interactive:
            raise UsageError("chat reads its questions from stdin; pass the documents as files, not '-'")
        opts = locals()
        cfg = run_config(opts)
        state.stage = "ingest"
        docs, ingest_s = _ingest(reporter, paths, pages, include, exclude, read_budget(opts))
        state.stage = "load"
        session = open_session(cfg, reporter, opts)
        state.model = session.name
        state.sources = sources = sources_of(docs, session.count)
        conversation = session.chat(docs, sources)
        conversation.prepare()
        state.stage = "generate"
        if interactive:
            from longdoc.store import cache_dir

            reporter.status("ready: ask about the documents (Ctrl-D to leave)")
            asked = terminal_questions(cache_dir() / "chat_history")
        else:
            asked = piped_questions(sys.stdin)
        for q in asked:
            try:
                result = conversation.turn(q, on_text=reporter.stream)
            except errors.DoesNotFitError as exc:
                reporter.error(exc.message)
                raise typer.Exit(exc.exit_code) from None
            _add_reading(result, ingest_s, extract_citations(result.answer, docs))
            if interactive and result.interrupted:  # Ctrl-C in a terminal stops the answer, not the chat
                reporter.end_answer()
                reporter.status("(stopped)")
                continue
            state.result = result
            _finish(reporter, result)
            state.result = None


@app.command("serve")
def serve_cmd(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (the default, 127.0.0.1, is this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on (0 picks a free one).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LONGDOC_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on the /v1 routes (/health stays open).",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Generations run at once, each with its own KV cache.")
    ] = 1,
    queue: Annotated[int, typer.Option("--queue", help="Requests that may wait for a slot; more get HTTP 429.")] = 8,
    max_body: Annotated[
        str | None,
        typer.Option(
            "--max-body",
            metavar="SIZE",
            help="Refuse request bodies larger than this with HTTP 413 (default: 32 bytes per token of context,"
            " at least 1M).",
        ),
    ] = None,
    doc_cache: Annotated[
        str,
        typer.Option(
            "--doc-cache",
            help="Served requests' document cache: private (a folder of the server's own, keys salted per API"
            " key) or shared (the user's own, as local runs; for a server only you use).",
        ),
    ] = "private",
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = RunConfig.quantize,
    prefill: Prefill = PrefillConfig.mode,
    prefill_budget: PrefillBudget = PrefillConfig.budget,
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    recycle: Recycle = None,
    recycle_k: RecycleK = RecycleConfig.k,
    recycle_stride: RecycleStride = RecycleConfig.stride,
    recycle_schedule: RecycleSchedule = RecycleConfig.schedule,
    recycle_threshold: RecycleThreshold = RecycleConfig.threshold,
    max_new_tokens: MaxNew = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    quiet: Quiet = False,
    max_context: MaxContext = None,
    no_cache: NoCache = False,
    cache_max_gb: CacheMaxGb = RunConfig.cache_max_gb,
) -> None:
    """An OpenAI-compatible server over the local engine: /v1/chat/completions, /v1/models, /health.

    Requests run with DCA, recycled decoding and the document KV cache (two requests about one document
    share its prefill). --max-new-tokens, --temperature, --top-p and --seed are the defaults of requests
    that do not set them. Ctrl-C stops the server (exit 130).
    """
    reporter = Reporter(quiet=quiet)
    with handled(reporter):
        from longdoc import serve as server
        from longdoc.runtime import local

        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, not {port}")
        if concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        if queue < 0:
            raise UsageError("--queue must be 0 or more")
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key (or LONGDOC_API_KEY) is empty")
        if doc_cache not in ("private", "shared"):
            raise UsageError(f"--doc-cache must be private or shared, not {doc_cache!r}")
        body_cap = None
        if max_body is not None:
            from longdoc.ingest import parse_size

            try:
                body_cap = parse_size(max_body, "--max-body")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        cfg = run_config(locals())
        server.check_installed()  # the serve extra, before the model loads
        session = local.LocalBackend(cfg, reporter)
        server.serve(
            session,
            host=host,
            port=port,
            api_key=api_key,
            concurrency=concurrency,
            queue=queue,
            max_body=body_cap,
            doc_cache=doc_cache,
        )


cache_app = typer.Typer(no_args_is_help=True, help="The document KV cache: prefilled documents kept across runs.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(json_out: Json = False) -> None:
    """Entries with their sizes, last use, token counts and source paths (most recent first)."""
    reporter = Reporter(json_mode=json_out)
    with handled(reporter):
        from rich.table import Table

        from longdoc.runtime import doccache
        from longdoc.store import documents_dir

        rows = doccache.entries()
        if json_out:
            reporter.json({"entries": rows, "folder": str(documents_dir()), "bytes": sum(r["bytes"] for r in rows)})
            return
        out = console(sys.stdout)
        table = Table("key", "size", "used", "tokens", "model", "sources")
        now = time.time()
        for r in rows:
            table.add_row(
                r["key"][:12],
                human_bytes(r["bytes"]),
                f"{_age(now - r['used'])} ago",
                f"{r['tokens']:,}",
                plain(r["model"]),
                plain(", ".join(r["sources"]) if r["valid"] else "(unreadable header)"),
            )
        out.print(table)
        out.print(plain(f"{len(rows)} entries, {human_bytes(sum(r['bytes'] for r in rows))} in {documents_dir()}"))


@cache_app.command("clear")
def cache_clear(json_out: Json = False) -> None:
    """Delete every entry of the document KV cache (converted models stay)."""
    reporter = Reporter(json_mode=json_out)
    with handled(reporter):
        from longdoc.runtime import doccache

        count, size = doccache.clear()
        if json_out:
            reporter.json({"removed": count, "bytes": size})
        else:
            console(sys.stdout).print(f"removed {count} entries ({human_bytes(size)})")


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{seconds:.0f} s"


@app.command("doctor")
def doctor_cmd(
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = RunConfig.quantize,
    json_out: Json = False,
) -> None:
    """What this machine gets: the CPU class, and the dtype, packing, quantization and attention kernel
    that a run picks here, each with why (LONGDOC_ISA=avx2|... shows a lesser CPU's)."""
    reporter = Reporter(json_mode=json_out)
    with handled(reporter):
        from longdoc.runtime import machine, plan

        cfg = run_config({"model": model, "device": device, "dtype": dtype, "quantize": quantize})
        info = plan.model_info(cfg.model, cfg.device, cfg.dtype, reporter.status, reporter.warn, cfg.quantize)
        report = machine.doctor(machine.paths(info.device, info.dtype, info.quantize, cfg.pack, cfg.kernel))
        if json_out:
            reporter.json({"model": info.name, **report})
            return
        out = console(sys.stdout)
        c = report["cpu"]
        cap = f" · capped at {c['isa_cap']}" if c["isa_cap"] else ""
        flags = (" ".join(c["flags"]) or "none of note") if c["flags_known"] else "unknown (no /proc/cpuinfo or sysctl)"
        out.print(plain(f"cpu: {c['name']} · {c['arch']} · class {c['class']}{cap} · {c['threads']} threads"))
        out.print(plain(f"flags: {flags} · torch kernels: {c['torch_capability']}"))
        paths = report["paths"]
        for key in ("dtype", "packed", "quantize", "attention"):
            out.print(plain(f"{key}: {paths[key]} ({paths['why'][key]})"))
        for name, state in report["kernels"].items():
            out.print(plain(f"kernel {name}: {state}"))
        if report["hint"]:
            out.print(plain(report["hint"]))


@app.command("models")
def models_cmd(json_out: Json = False) -> None:
    """The default model, known models, cached conversions, and what --model accepts."""
    reporter = Reporter(json_mode=json_out)
    with handled(reporter):
        from longdoc import models

        rows = models.list_models()
        if json_out:
            reporter.json({"models": rows, "cache_dir": str(models.cache_dir())})
            return
        out = console(sys.stdout)
        for row in rows:
            out.print(plain(" · ".join(f"{k}: {v}" for k, v in row.items() if v not in (None, ""))))
        out.print(plain(f"cache: {models.cache_dir()}"))
        out.print(
            "--model accepts: an alias above, a local Hugging Face folder (config.json + *.safetensors; "
            "llama, qwen2, mistral), or a .gguf file"
        )


def _csv(values: str, cast: Any, option: str = "", low: float = 1, high: float = math.inf) -> list[Any]:
    """A comma-separated option value, each item between ``low`` and ``high``; a usage error otherwise."""
    try:
        items = [cast(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} expects a comma-separated list, got {values!r}".strip()) from None
    bad = [v for v in items if not (low <= v <= high)]
    if not items or bad:
        limits = f"between {low} and {high}" if high != math.inf else f"at least {low}"
        raise UsageError(f"{option} {values!r}: every value must be {limits}".strip())
    return items


def _eval_checks(opts: dict[str, Any]) -> dict[str, list[Any]]:
    """The eval options' lists and counts, checked (with the common options) before any model loads."""
    run_config({**opts, "recycle": False})
    for name in ("trials", "window", "recycle_k", "recycle_stride"):
        _positive(opts, name, "--" + name.replace("_", "-"))
    lists = {"lengths": _csv(opts["lengths"], int, "--lengths")}
    if "depths" in opts:
        lists["depths"] = _csv(opts["depths"], float, "--depths", 0.0, 1.0)
    if "keys" in opts:
        lists["keys"] = _csv(opts["keys"], int, "--keys")
    return lists


def _eval_session(reporter: Reporter, opts: dict[str, Any]) -> Any:
    """A session for the evals: their decoding policy is chosen per task, so recycling is off here."""
    from longdoc.runtime import local

    return local.LocalBackend(run_config({**opts, "recycle": False}), reporter)


def _eval_row(reporter: Reporter) -> Any:
    return lambda row: reporter.status(" ".join(f"{k}={v}" for k, v in row.items()))


@eval_app.command("passkey")
def eval_passkey(
    lengths: Annotated[str, typer.Option("--lengths", help="Comma-separated prompt lengths in tokens.")] = "4096,8192",
    depths: Annotated[str, typer.Option("--depths", help="Comma-separated depths in [0, 1].")] = "0.1,0.5,0.9",
    trials: Annotated[int, typer.Option("--trials")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    window: Annotated[
        int | None, typer.Option("--window", help="Baseline: sliding-window attention (sinks + last N keys).")
    ] = None,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = RunConfig.quantize,
    prefill: Prefill = PrefillConfig.mode,
    prefill_budget: PrefillBudget = PrefillConfig.budget,
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    max_context: MaxContext = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Passkey retrieval: a 5-digit key hidden in filler at each depth."""
    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        from longdoc.evals import passkey

        lists = _eval_checks(locals())
        session = _eval_session(reporter, locals())
        result = passkey.run(session, lists["lengths"], lists["depths"], trials, seed, _eval_row(reporter), window)
        _print_eval(reporter, session, result, f"passkey accuracy {result['accuracy']:.2f}")


@eval_app.command("needle")
def eval_needle(
    lengths: Annotated[str, typer.Option("--lengths")] = "8192,16384",
    depths: Annotated[str, typer.Option("--depths")] = "0.25,0.75",
    keys: Annotated[str, typer.Option("--keys", help="Comma-separated needle counts (1 = single key).")] = "1,4",
    trials: Annotated[int, typer.Option("--trials")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    recycle_k: RecycleK = 2048,
    recycle_stride: RecycleStride = 16,
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = RunConfig.quantize,
    prefill: Prefill = PrefillConfig.mode,
    prefill_budget: PrefillBudget = PrefillConfig.budget,
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    max_context: MaxContext = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Multi-token needle retrieval: full attention vs Recycled Attention vs a StreamingLLM baseline."""
    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        from longdoc.evals import needle

        lists = _eval_checks(locals())
        session = _eval_session(reporter, locals())
        result = needle.run(
            session,
            lists["lengths"],
            lists["depths"],
            lists["keys"],
            recycle_k,
            recycle_stride,
            trials,
            seed,
            _eval_row(reporter),
        )
        acc = " ".join(f"{m}={a:.2f}" for m, a in result["accuracy"].items())
        _print_eval(reporter, session, result, f"needle accuracy {acc}")


@eval_app.command("ppl")
def eval_ppl(
    file: Annotated[str, typer.Argument(help="Text, PDF or folder to measure on.")],
    lengths: Annotated[str, typer.Option("--lengths")] = "4096,8192",
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    # the prefill model (what reads the documents) unless a scheme is named: --quantize int8 measures
    # the decode model, every position through the quantized weights
    quantize: Quantize = "none",
    prefill: Prefill = PrefillConfig.mode,
    prefill_budget: PrefillBudget = PrefillConfig.budget,
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    max_context: MaxContext = None,
    json_out: Json = False,
    quiet: Quiet = False,
    pages: Pages = None,
) -> None:
    """Perplexity of a text at given context lengths."""
    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        from longdoc.evals import ppl
        from longdoc.prompt import format_documents

        lists = _eval_checks(locals())
        docs, _ = _ingest(reporter, [file], pages, None, None, read_budget({}))
        session = _eval_session(reporter, locals())
        result = ppl.run(session, format_documents(docs), lists["lengths"])
        line = " ".join(f"{r['length']}:{r.get('ppl', r.get('error'))}" for r in result["results"])
        _print_eval(reporter, session, result, f"perplexity {line}")


def _print_eval(reporter: Reporter, session: Any, result: dict[str, Any], line: str) -> None:
    from longdoc.attention.dca import ChunkLayout

    cfg = session.cfg
    layout = ChunkLayout.for_window(session.info.window, cfg.dca.chunk_size, cfg.dca.local_window)
    result["settings"] = {
        "model": session.info.name,
        "dtype": session.info.dtype_name,
        "quantize": session.info.quantize,
        "dca": cfg.dca.enabled,
        "chunk_size": layout.chunk_size,
        "local_window": layout.local_window,
        "dca_temperature": cfg.dca.temperature,
    }
    if reporter.json_mode:
        reporter.json(result)
    else:
        console(sys.stdout).print(plain(line))


def _redeliver_interrupt(unraisable: Any) -> None:
    """A Ctrl-C that lands while a finalizer (``__del__``) runs cannot propagate from there: Python
    prints it and carries on, and the run would ignore the user (seen in the SIGINT fuzz). Raise the
    signal again, to be handled where the program is, once the finalizer is done."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        # from another thread, a moment later: raised here, inside the hook, it would be lost again
        threading.Timer(0.02, _thread.interrupt_main, args=(signal.SIGINT,)).start()
    else:
        sys.__unraisablehook__(unraisable)


def main() -> None:
    sys.unraisablehook = _redeliver_interrupt
    signal.signal(signal.SIGINT, _count_sigint)
    try:
        app()
    except (SystemExit, KeyboardInterrupt) as exc:
        # The command is over and its output is out. A Ctrl-C from here on lands in the interpreter's
        # teardown, where it would turn the exit status into a death by SIGINT (exit -2 in the SIGINT
        # fuzz, after complete output): ignore it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if isinstance(exc, SystemExit) and exc.code != errors.EXIT_INTERRUPTED:
            raise
        with contextlib.suppress(Exception):  # interrupted: leave now, with what was printed
            if "--json" in sys.argv and not render.json_printed_by_any:  # before any command started
                print(STARTED_JSON, flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(errors.EXIT_INTERRUPTED)
