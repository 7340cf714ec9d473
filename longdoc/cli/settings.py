"""From a command line to the settings of a run: the ``RunConfig`` (its constructors check its values),
the read budget, the remote options; and the backend they open. Every option is checked here, before
any input is read or model loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from longdoc.cli.options import Given
from longdoc.config import DCAConfig, GenerationConfig, PrefillConfig, RecycleConfig, RunConfig
from longdoc.errors import UsageError

if TYPE_CHECKING:  # they bring torch, which --help and bad arguments never need
    from longdoc.ingest import ReadBudget
    from longdoc.render import Reporter
    from longdoc.runtime.backend import Backend
    from longdoc.runtime.remote import RemoteOptions


@dataclass(frozen=True)
class Settings:
    """A command's checked settings."""

    cfg: RunConfig
    budget: ReadBudget | None  # the size caps (commands that read inputs)
    remote: RemoteOptions | None  # --endpoint and its companions, where given


def settings(given: Given) -> Settings:
    """Every option a command has, checked before any input is read or model loaded.

    Sampling values are checked because a bad one fails only after the prefill (NaN probabilities),
    the device and dtype because a typo should not cost a model load, and the inputs' options
    because a typo should not cost reading a large folder.
    """
    cfg = run_config(given)
    from longdoc import models

    models.resolve_dtype(cfg.dtype, models.resolve_device(cfg.device))
    if given.pages:
        from longdoc.ingest.pdf import check_pages

        check_pages(given.pages)
    for globs, option in ((given.include, "--include"), (given.exclude, "--exclude")):
        _check_globs(globs or [], option)
    budget = read_budget(given) if "max_file_size" in given.present else None
    remote = remote_options(given) if "endpoint" in given.present else None
    if "prompts" in given.present:  # commands that build prompts: a broken template is a usage error up front
        from longdoc import prompt

        prompt.use_prompts_dir(given.prompts)
        prompt.check_templates()
    return Settings(cfg, budget, remote)


def run_config(given: Given) -> RunConfig:
    """The run settings of a command line (its expert settings included); options a command does not
    take keep their defaults."""
    expert = given.expert()
    if given.max_new_tokens < 1:  # a run answers something (the config allows 0: a plan of the prompt alone)
        raise UsageError("--max-new-tokens must be at least 1")
    return RunConfig(
        model=given.model,
        device=given.device,
        dtype=given.dtype,
        quantize=given.quantize,
        pack=expert.pack,
        kernel=expert.kernel,
        prefill_step=expert.prefill_step,
        max_context=given.max_context,
        doc_cache=not given.no_cache,
        cache_max_gb=expert.cache_max_gb,
        dca=DCAConfig(
            enabled=given.dca,
            chunk_size=expert.chunk_size,
            local_window=expert.local_window,
            temperature=expert.dca_temperature,
        ),
        prefill=PrefillConfig(mode=given.prefill, budget=expert.prefill_budget),
        recycle=RecycleConfig(
            enabled=given.recycle,
            k=expert.recycle_k,
            stride=expert.recycle_stride,
            schedule=expert.recycle_schedule,
            threshold=expert.recycle_threshold,
        ),
        generation=GenerationConfig(
            max_new_tokens=given.max_new_tokens,
            temperature=given.temperature,
            top_p=given.top_p,
            seed=given.seed,
        ),
    )


def _check_globs(globs: list[str], option: str) -> None:
    import pathspec

    for glob in globs:
        try:
            pathspec.GitIgnoreSpec.from_lines([glob])
        except Exception as exc:  # pathspec raises assorted errors for malformed patterns
            raise UsageError(f"{option} {glob!r} is not a valid pattern ({exc})") from None


def read_budget(given: Given) -> ReadBudget:
    """The size caps of --max-file-size and --max-total-size."""
    from longdoc.ingest import ReadBudget, parse_size

    try:
        return ReadBudget(
            parse_size(given.max_file_size, "--max-file-size"), parse_size(given.max_total_size, "--max-total-size")
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def remote_options(given: Given) -> RemoteOptions | None:
    from longdoc.runtime import remote

    return remote.options(
        given.endpoint,
        api_key=given.api_key,
        model=given.remote_model,
        concurrency=given.concurrency,
        timeout=given.timeout,
        quantize=given.quantize,
    )


def open_backend(run: Settings, reporter: Reporter) -> Backend:
    """The backend a command runs on: the local model, or with --endpoint a server (``remote.RemoteBackend``:
    the local tokenizer only, never the weights)."""
    from longdoc.runtime import local, remote

    if run.remote is None:
        return local.LocalBackend(run.cfg, reporter)
    ignored = remote.local_only(run.cfg)
    if ignored:
        reporter.warn(f"{', '.join(ignored)}: not applicable with --endpoint (the server runs the model its own way)")
    return remote.RemoteBackend(run.cfg, reporter, run.remote)
