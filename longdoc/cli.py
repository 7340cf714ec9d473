"""The command line: parse options into config objects, call the core, map errors to exit codes."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

from longdoc import errors
from longdoc.config import DCAConfig, GenerationConfig, RecycleConfig, RunConfig
from longdoc.errors import LongdocError, UsageError
from longdoc.render import Reporter

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Ask questions about, and summarize, documents far longer than a small model's window.",
)
eval_app = typer.Typer(no_args_is_help=True, help="Built-in long-context checks on the chosen model and settings.")
app.add_typer(eval_app, name="eval")

# Options shared by every command that runs the model (names are part of the contract).
Model = Annotated[
    str | None, typer.Option("-m", "--model", help="Model: default embedded, a local HF folder, or a .gguf file.")
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto | bfloat16 | float32 | float16")]
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


@contextmanager
def handled(reporter: Reporter) -> Iterator[None]:
    """Turn user errors into one line and their exit code; never a traceback for them."""
    try:
        yield
    except LongdocError as exc:
        reporter.error(exc.message)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        reporter.error("interrupted")
        raise typer.Exit(errors.EXIT_INTERRUPTED) from None
    except MemoryError:
        reporter.error("out of memory; try a shorter input or --dtype bfloat16")
        raise typer.Exit(errors.EXIT_DOES_NOT_FIT) from None


def run_config(opts: dict[str, Any]) -> RunConfig:
    """Build the run settings from a command's parsed options (its ``locals()``); absent options keep
    their defaults, so every command shares one validation."""
    d = RunConfig()
    chunk_size, local_window = opts.get("chunk_size"), opts.get("local_window")
    if opts.get("max_new_tokens", 1) < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if opts.get("recycle_schedule", "fixed") not in ("fixed", "dynamic"):
        raise UsageError("--recycle-schedule must be fixed or dynamic")
    if opts.get("recycle_k", 1) < 1 or opts.get("recycle_stride", 1) < 1:
        raise UsageError("--recycle-k and --recycle-stride must be at least 1")
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
        max_context=opts.get("max_context"),
        dca=DCAConfig(
            enabled=opts.get("dca"),
            chunk_size=chunk_size,
            local_window=local_window,
            temperature=opts.get("dca_temperature", d.dca.temperature),
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


def _finish(reporter: Reporter, result: dict[str, Any]) -> None:
    if reporter.json_mode:
        reporter.json(result)
    else:
        reporter.end_answer()
    reporter.stats(result)
    if result.get("interrupted"):
        raise typer.Exit(errors.EXIT_INTERRUPTED)


def _ingest(
    reporter: Reporter, paths: list[str], pages: str | None, include: list[str] | None, exclude: list[str] | None
) -> tuple[list[Any], float]:
    from longdoc import ingest

    t0 = time.perf_counter()
    reporter.status(f"reading {', '.join(paths) if len(paths) <= 3 else f'{len(paths)} inputs'}")
    docs = ingest.ingest_paths(paths, pages=pages, include=include or [], exclude=exclude or [])
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
    model: Model = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    recycle: Recycle = None,
    recycle_k: RecycleK = 2048,
    recycle_stride: RecycleStride = 16,
    recycle_schedule: RecycleSchedule = "fixed",
    recycle_threshold: RecycleThreshold = 0.9,
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
) -> None:
    """Answer a question about the inputs."""
    from longdoc import pipeline
    from longdoc.citations import extract_citations
    from longdoc.prompt import ask_prompt

    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        if len(args) < 2:
            raise UsageError('give at least one PATH and a QUESTION, e.g. longdoc ask paper.pdf "What is proposed?"')
        *paths, question = args
        if not question.strip():
            raise UsageError("the question is empty; ask something about the documents")
        cfg = run_config(locals())
        docs, ingest_s = _ingest(reporter, paths, pages, include, exclude)
        session = pipeline.Session(cfg, reporter)
        prompt = ask_prompt(session.tokenizer, docs, question)
        sources = pipeline.source_entries(docs, session.count)
        result = pipeline.run_prompt(session, prompt, sources, on_text=reporter.stream)
        result["timings"]["ingest_s"] = ingest_s
        result["citations"] = extract_citations(result["answer"], docs)
        _finish(reporter, result)


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
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    recycle: Recycle = None,
    recycle_k: RecycleK = 2048,
    recycle_stride: RecycleStride = 16,
    recycle_schedule: RecycleSchedule = "fixed",
    recycle_threshold: RecycleThreshold = 0.9,
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
) -> None:
    """Summarize the inputs (together, or one by one with --each); map-reduce when they do not fit at once."""
    from longdoc import pipeline
    from longdoc.citations import extract_citations
    from longdoc.prompt import summary_instructions
    from longdoc.summarize import read_paths_from
    from longdoc.summarize import summarize as summarize_docs

    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        paths = list(paths or [])
        if null and paths_from is None:
            raise UsageError("-0/--null applies to --paths-from; give --paths-from FILE or -")
        if paths_from is not None:
            if paths_from == "-" and "-" in paths:
                raise UsageError("stdin cannot be both an input ('-') and the --paths-from list")
            paths += read_paths_from(paths_from, null)
        if not paths:
            raise UsageError("give at least one PATH to summarize ('-' reads stdin), or --paths-from FILE")
        summary_instructions(style, max_words)  # a bad --style is a usage error before any work
        if max_words is not None and max_words < 1:
            raise UsageError("--max-words must be at least 1")
        cfg = run_config(locals())
        session: pipeline.Session | None = None
        groups = [[p] for p in paths] if each else [paths]
        failures: list[int] = []
        for group in groups:
            try:
                docs, ingest_s = _ingest(reporter, group, pages, include, exclude)
                session = session or pipeline.Session(cfg, reporter)
                if each:
                    reporter.status(f"summarizing {group[0]}")
                result = summarize_docs(session, docs, style, max_words, reporter, on_text=reporter.stream)
            except (errors.InputError, errors.DoesNotFitError) as exc:
                if not each:
                    raise
                failures.append(exc.exit_code)
                reporter.error(exc.message)
                if json_out:
                    reporter.json({"path": group[0], "error": exc.message})
                continue
            result["timings"]["ingest_s"] = ingest_s
            result["citations"] = extract_citations(result["answer"], docs)
            if each and json_out:
                line = {
                    "path": group[0],
                    "summary": result["answer"],
                    "prompt_tokens": result["prompt_tokens"],
                    "timings": result["timings"],
                    "plan": result["plan"],
                }
                if result["citations"]:
                    line["citations"] = result["citations"]
                reporter.json(line)
                reporter.stats(result)
                if result.get("interrupted"):
                    raise typer.Exit(errors.EXIT_INTERRUPTED)
            else:
                _finish(reporter, result)
        if failures:
            # an unreadable input outranks one that did not fit
            raise typer.Exit(errors.EXIT_INPUT if errors.EXIT_INPUT in failures else max(failures))


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
) -> None:
    """Per-source token counts (model tokenizer and cl100k estimate) and whether they fit."""
    from rich.table import Table

    from longdoc import pipeline
    from longdoc.prompt import ask_prompt
    from longdoc.tokens import estimate_cl100k

    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        if not paths:
            raise UsageError("give at least one PATH to count")
        cfg = RunConfig(
            model=model,
            device=device,
            dtype=dtype,
            max_context=max_context,
            dca=DCAConfig(enabled=dca),
            generation=GenerationConfig(max_new_tokens=max_new_tokens),
        )
        docs, _ = _ingest(reporter, paths, pages, include, exclude)
        session = pipeline.Session(cfg, reporter)
        rows = [
            {**entry, "cl100k": estimate_cl100k(doc.text)}
            for entry, doc in zip(pipeline.source_entries(docs, session.count), docs, strict=True)
        ]
        prompt_tokens = session.count(ask_prompt(session.tokenizer, docs, "?"))
        verdict: dict[str, Any] = {"fits": True, "reason": ""}
        try:
            plan = pipeline.make_plan(cfg, session.info, prompt_tokens)
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
            for r in rows:
                table.add_row(r["path"], r["kind"], str(r["pages"] or ""), f"{r['tokens']:,}", f"{r['cl100k']:,}")
            table.add_row("total", "", "", f"{summary['total_tokens']:,}", f"{sum(r['cl100k'] for r in rows):,}")
            out = Console(file=sys.stdout, highlight=False)
            out.print(table)
            if verdict["fits"]:
                mode = "with DCA" if verdict.get("dca") else "with plain attention"
                out.print(
                    f"prompt {prompt_tokens:,} tokens + {max_new_tokens} answer tokens: fits ({mode}, "
                    f"limit {verdict['max_context']:,})"
                )
            else:
                out.print(f"does not fit: {verdict['reason']}")
        if not verdict["fits"]:
            raise typer.Exit(errors.EXIT_DOES_NOT_FIT)


@app.command("models")
def models_cmd(json_out: Json = False) -> None:
    """The default model, known models, cached conversions, and what --model accepts."""
    from longdoc import models

    reporter = Reporter(json_mode=json_out)
    with handled(reporter):
        rows = models.list_models()
        if json_out:
            reporter.json({"models": rows, "cache_dir": str(models.cache_dir())})
            return
        out = Console(file=sys.stdout, highlight=False)
        for row in rows:
            out.print(" · ".join(f"{k}: {v}" for k, v in row.items() if v not in (None, "")))
        out.print(f"cache: {models.cache_dir()}")
        out.print(
            "--model accepts: an alias above, a local Hugging Face folder (config.json + *.safetensors; "
            "llama, qwen2, mistral), or a .gguf file"
        )


def _csv(values: str, cast: Any) -> list[Any]:
    try:
        return [cast(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"expected a comma-separated list, got {values!r}") from None


def _eval_session(reporter: Reporter, opts: dict[str, Any]) -> Any:
    """A session for the evals: their decoding policy is chosen per task, so recycling is off here."""
    from longdoc import pipeline

    return pipeline.Session(run_config({**opts, "recycle": False}), reporter)


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
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    max_context: MaxContext = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Passkey retrieval: a 5-digit key hidden in filler at each depth."""
    from longdoc.evals import passkey

    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        session = _eval_session(reporter, locals())
        result = passkey.run(
            session, _csv(lengths, int), _csv(depths, float), trials, seed, _eval_row(reporter), window
        )
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
    dca: Dca = None,
    chunk_size: ChunkSize = None,
    local_window: LocalWindow = None,
    dca_temperature: DcaTemperature = False,
    max_context: MaxContext = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Multi-token needle retrieval: full attention vs Recycled Attention vs a StreamingLLM baseline."""
    from longdoc.evals import needle

    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        session = _eval_session(reporter, locals())
        result = needle.run(
            session,
            _csv(lengths, int),
            _csv(depths, float),
            _csv(keys, int),
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
    from longdoc.evals import ppl
    from longdoc.prompt import format_documents

    reporter = Reporter(quiet=quiet, json_mode=json_out)
    with handled(reporter):
        docs, _ = _ingest(reporter, [file], pages, None, None)
        session = _eval_session(reporter, locals())
        result = ppl.run(session, format_documents(docs), _csv(lengths, int))
        line = " ".join(f"{r['length']}:{r.get('ppl', r.get('error'))}" for r in result["results"])
        _print_eval(reporter, session, result, f"perplexity {line}")


def _print_eval(reporter: Reporter, session: Any, result: dict[str, Any], line: str) -> None:
    from longdoc.attention.dca import ChunkLayout

    cfg = session.cfg
    layout = ChunkLayout.for_window(session.info.window, cfg.dca.chunk_size, cfg.dca.local_window)
    result["settings"] = {
        "model": session.info.name,
        "dtype": session.info.dtype_name,
        "dca": cfg.dca.enabled,
        "chunk_size": layout.chunk_size,
        "local_window": layout.local_window,
        "dca_temperature": cfg.dca.temperature,
    }
    if reporter.json_mode:
        reporter.json(result)
    else:
        Console(file=sys.stdout, highlight=False).print(line)


def main() -> None:
    app()
