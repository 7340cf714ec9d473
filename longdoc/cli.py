"""The command line: parse options into config objects, call the core, map errors to exit codes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

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
Model = Annotated[str | None, typer.Option("-m", "--model", help="Model: default embedded, a local HF folder, or a .gguf file.")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto | bfloat16 | float32 | float16")]
Dca = Annotated[bool | None, typer.Option("--dca/--no-dca", help="Dual Chunk Attention (default: on when the prompt exceeds the model window).")]
ChunkSize = Annotated[int | None, typer.Option("--chunk-size", help="DCA chunk size s (default 3/4 of the model window).")]
LocalWindow = Annotated[int | None, typer.Option("--local-window", help="DCA local window w (default 1/8 of the model window).")]
Recycle = Annotated[bool | None, typer.Option("--recycle/--no-recycle", help="Recycled Attention decoding (default: on for contexts >= 8K).")]
RecycleK = Annotated[int, typer.Option("--recycle-k", help="Recycled keys per layer and KV head.")]
RecycleStride = Annotated[int, typer.Option("--recycle-stride", help="A full-attention step every N decode steps.")]
RecycleSchedule = Annotated[str, typer.Option("--recycle-schedule", help="fixed | dynamic")]
RecycleThreshold = Annotated[float, typer.Option("--recycle-threshold", help="Dynamic schedule: query cosine similarity below which a full step runs.")]
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


def run_config(
    model: str | None, device: str, dtype: str, dca: bool | None, chunk_size: int | None, local_window: int | None,
    recycle: bool | None, recycle_k: int, recycle_stride: int, recycle_schedule: str, recycle_threshold: float,
    max_new_tokens: int, temperature: float, top_p: float, seed: int | None, max_context: int | None,
) -> RunConfig:
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if recycle_schedule not in ("fixed", "dynamic"):
        raise UsageError("--recycle-schedule must be fixed or dynamic")
    if chunk_size is not None and chunk_size < 2:
        raise UsageError("--chunk-size must be at least 2")
    if chunk_size is not None and local_window is None:
        local_window = chunk_size // 8
    if chunk_size is not None and local_window is not None and not 0 <= local_window < chunk_size:
        raise UsageError("--local-window must be smaller than --chunk-size")
    return RunConfig(
        model=model, device=device, dtype=dtype, max_context=max_context,
        dca=DCAConfig(enabled=dca, chunk_size=chunk_size, local_window=local_window),
        recycle=RecycleConfig(
            enabled=recycle, k=recycle_k, stride=recycle_stride, schedule=recycle_schedule, threshold=recycle_threshold
        ),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
    )


def _finish(reporter: Reporter, result: dict[str, Any]) -> None:
    if reporter.json_mode:
        reporter.json(result)
    else:
        reporter.end_answer()
    reporter.stats(result)
    if result.get("interrupted"):
        raise typer.Exit(errors.EXIT_INTERRUPTED)


@app.command()
def ask(
    args: Annotated[list[str], typer.Argument(metavar="PATH... QUESTION", help="Inputs ('-' for stdin), then the question.")],
    model: Model = None, device: Device = "auto", dtype: Dtype = "auto",
    dca: Dca = None, chunk_size: ChunkSize = None, local_window: LocalWindow = None,
    recycle: Recycle = None, recycle_k: RecycleK = 2048, recycle_stride: RecycleStride = 16,
    recycle_schedule: RecycleSchedule = "fixed", recycle_threshold: RecycleThreshold = 0.9,
    max_new_tokens: MaxNew = 512, temperature: Temperature = 0.0, top_p: TopP = 1.0, seed: Seed = None,
    json_out: Json = False, quiet: Quiet = False, max_context: MaxContext = None,
    pages: Pages = None, include: Include = None, exclude: Exclude = None,
) -> None:
    """Answer a question about the inputs."""
    from longdoc import ingest, pipeline
    from longdoc.prompt import ask_prompt

    reporter = Reporter(quiet=quiet or json_out and not sys.stderr.isatty() and False, json_mode=json_out)
    with handled(reporter):
        if len(args) < 2:
            raise UsageError("give at least one PATH and a QUESTION, e.g. longdoc ask paper.pdf \"What is proposed?\"")
        *paths, question = args
        cfg = run_config(model, device, dtype, dca, chunk_size, local_window, recycle, recycle_k, recycle_stride,
                         recycle_schedule, recycle_threshold, max_new_tokens, temperature, top_p, seed, max_context)
        docs = _ingest(reporter, paths, pages, include, exclude)
        session = pipeline.Session(cfg, reporter)
        prompt = ask_prompt(session.tokenizer, docs, question)
        sources = pipeline.source_entries(docs, session.count)
        result = pipeline.run_prompt(session, prompt, sources, on_text=reporter.stream,
                                     policy_factory=pipeline.recycle_policy_factory(cfg))
        result["timings"]["ingest_s"] = reporter.ingest_s
        _finish(reporter, result)


def _ingest(reporter: Reporter, paths: list[str], pages: str | None, include: list[str] | None,
            exclude: list[str] | None) -> list[Any]:
    import time

    from longdoc import ingest

    t0 = time.perf_counter()
    docs = ingest.ingest_paths(paths, pages=pages, include=include or [], exclude=exclude or [])
    for doc in docs:
        for w in doc.warnings:
            reporter.warn(w)
    reporter.ingest_s = round(time.perf_counter() - t0, 3)
    return docs


def main() -> None:
    app()
