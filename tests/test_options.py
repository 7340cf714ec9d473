"""The command line's options: declared once (defaults from the config), grouped in help panels, the
expert settings behind -o KEY=VALUE with their old flags as hidden aliases, the environment variables
in one table, the checks in the config's constructors, and docs/options.md current with --help."""

from __future__ import annotations

import inspect
import itertools
import re
import subprocess
import sys

import pytest

from longdoc import config
from longdoc.cli import env, knobs, options, reference
from longdoc.config import DCAConfig, GenerationConfig, PrefillConfig, RecycleConfig, RunConfig
from longdoc.errors import UsageError

from .helpers import REPO, invoke

DOCS = REPO / "docs" / "options.md"
COMMANDS = [
    ("ask",),
    ("summarize",),
    ("count",),
    ("chat",),
    ("serve",),
    ("cache", "ls"),
    ("cache", "clear"),
    ("doctor",),
    ("models",),
    ("options",),
    ("eval", "passkey"),
    ("eval", "needle"),
    ("eval", "ppl"),
]


def help_of(*command: str) -> str:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.stderr
    return result.stdout


# ---- docs/options.md -------------------------------------------------------------------------------


def test_options_reference_is_current():
    """docs/options.md is what the generator makes from the CLI's declarations today."""
    assert DOCS.read_text() == reference.reference(), (
        "docs/options.md is stale: python -m longdoc.cli.reference > docs/options.md"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_options_reference_has_every_option_of_help(command, monkeypatch):
    """Every flag --help shows for a command is in that command's section of docs/options.md, and the
    section lists no visible flag that --help lacks."""
    monkeypatch.setenv("COLUMNS", "200")
    shown = set()
    for line in help_of(*command).splitlines():
        if line.startswith("│ -"):  # a row of an options panel: its flags, then the metavar and help
            shown |= set(itertools.takewhile(lambda word: word.startswith("-"), line[1:].split()))
    shown -= {"-h", "--help"}
    section = DOCS.read_text().split(f"\n## longdoc {' '.join(command)}\n")[1].split("\n## ")[0]
    documented = {
        flag for row in section.splitlines() if row.startswith("| `-") for flag in re.findall(r"`(--?[\w-]+)`", row)
    }
    assert shown and documented == shown or command == ("options",)


# ---- panels, metavars, -h, --version ----------------------------------------------------------------


def test_help_groups_options_in_panels_without_python_type_names(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = help_of("ask")
    for panel in options.PANELS:
        assert f"─ {panel} ─" in text
    for command in COMMANDS:
        assert not re.search(r"<(bool|str|int|float|list\[\w+\])>", help_of(*command)), command


def test_short_help_and_version():
    assert invoke("ask", "-h").stdout == invoke("ask", "--help").stdout
    assert invoke("-h").exit_code == 0 and "Commands" in invoke("-h").stdout
    from importlib import metadata

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"longdoc {metadata.version('longdoc')}"


def test_expert_flags_are_hidden_and_still_parsed():
    text = help_of("ask")
    assert "--option" in text and "-o" in text
    for knob in knobs.REGISTRY:
        if knob.flag:
            assert knob.flag_name not in text


def test_defaults_come_from_the_config():
    given = options.Given()
    assert (given.max_new_tokens, given.temperature, given.top_p) == (
        GenerationConfig.max_new_tokens,
        GenerationConfig.temperature,
        GenerationConfig.top_p,
    )
    assert (given.device, given.dtype, given.quantize, given.prefill) == (
        RunConfig.device,
        RunConfig.dtype,
        RunConfig.quantize,
        PrefillConfig.mode,
    )
    assert knobs.Knobs() == knobs.Knobs(
        chunk_size=DCAConfig.chunk_size,
        recycle_k=RecycleConfig.k,
        prefill_step=RunConfig.prefill_step,
        cache_max_gb=RunConfig.cache_max_gb,
    )


def test_defaults_kept_apart_from_heavy_modules_agree():
    """Defaults the CLI states without importing their module (--help stays light) match it."""
    from longdoc import ingest, prompt, serve, store
    from longdoc.attention.kernels import KERNELS
    from longdoc.cli import serve as serve_cmd
    from longdoc.cli import summarize
    from longdoc.runtime import remote

    assert ingest.parse_size(options.MAX_FILE_SIZE, "") == ingest.MAX_FILE_SIZE
    assert ingest.parse_size(options.MAX_TOTAL_SIZE, "") == ingest.MAX_TOTAL_SIZE
    assert options.REMOTE_TIMEOUT_S == remote.READ_TIMEOUT_S
    assert ("auto", *KERNELS) == config.KERNEL_CHOICES
    assert "|".join(prompt.STYLES) == summarize.STYLES and summarize.DEFAULT_STYLE in prompt.STYLES
    defaults = {k: p.default for k, p in inspect.signature(serve.serve).parameters.items()}
    assert (defaults["host"], defaults["port"], defaults["concurrency"], defaults["queue"]) == (
        serve_cmd.HOST,
        serve_cmd.PORT,
        serve_cmd.CONCURRENCY,
        serve_cmd.QUEUE,
    )
    assert defaults["doc_cache"] == serve_cmd.DOC_CACHES[0]
    assert (
        f"(default {store.LOCK_TIMEOUT_S:.0f})"
        in next(v for v in env.VARIABLES if v.name == "LONGDOC_LOCK_TIMEOUT").meaning
    )


# ---- -o KEY=VALUE -------------------------------------------------------------------------------------


def run_config_of(monkeypatch, *args: str) -> RunConfig:
    """The RunConfig ``longdoc ask`` builds from ``args`` (stopped before any input is read)."""
    from longdoc.cli import ask, settings

    seen = []

    def capture(given):
        seen.append(settings.run_config(given))
        raise UsageError("stop")

    monkeypatch.setattr(ask, "settings", capture)
    result = invoke("ask", "missing.pdf", "q", *args)
    assert result.exit_code == 2 and "error: stop" in result.stderr, result.stderr
    return seen[0]


# every expert setting with an old flag: the flag's arguments and the same value as -o KEY=VALUE
ALIASES = [
    (("--chunk-size", "512"), "chunk_size=512"),
    (("--local-window", "64"), "local_window=64"),
    (("--dca-temperature",), "dca_temperature=true"),
    (("--prefill-budget", "1024"), "prefill_budget=1024"),
    (("--recycle-k", "128"), "recycle_k=128"),
    (("--recycle-stride", "4"), "recycle_stride=4"),
    (("--recycle-schedule", "dynamic"), "recycle_schedule=dynamic"),
    (("--recycle-threshold", "0.5"), "recycle_threshold=0.5"),
    (("--cache-max-gb", "2.5"), "cache_max_gb=2.5"),
]


@pytest.mark.parametrize("flag,setting", ALIASES, ids=[s for _, s in ALIASES])
def test_o_and_the_old_flag_make_the_same_config(monkeypatch, flag, setting):
    by_flag = run_config_of(monkeypatch, *flag)
    by_o = run_config_of(monkeypatch, "-o", setting)
    assert by_flag == by_o != RunConfig()
    assert run_config_of(monkeypatch, *flag, "-o", setting) == by_o  # the same value twice is fine


def test_every_old_flag_has_a_test():
    assert {f[0].split("/")[0] for f, _ in ALIASES} == {k.flag_name for k in knobs.REGISTRY if k.flag}


def test_o_sets_the_settings_without_a_flag(monkeypatch):
    cfg = run_config_of(monkeypatch, "-o", "kernel=reference", "-o", "pack=off", "--option", "prefill-step=512")
    assert (cfg.kernel, cfg.pack, cfg.prefill_step) == ("reference", "off", 512)
    assert run_config_of(monkeypatch, "-o", "chunk_size=512", "-o", "chunk_size=auto").dca.chunk_size is None


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("-o", "chunk_size"), "give KEY=VALUE"),
        (("-o", "chunk_sise=3"), "-o chunk_sise: no such setting"),
        (("-o", "chunk_size=big"), "-o chunk_size takes integer|auto, not 'big'"),
        (("-o", "dca_temperature=maybe"), "true|false"),
        (("-o", "recycle_k=0"), "--recycle-k and --recycle-stride must be at least 1"),
        (("-o", "kernel=gpu"), "-o kernel accepts auto, reference"),
        (("-o", "pack=yes"), "-o pack accepts auto, on, off"),
        (("-o", "prefill_step=0"), "-o prefill_step must be at least 1"),
        (("-o", "chunk_size=64", "-o", "local_window=64"), "--local-window must be smaller than --chunk-size"),
        (("--recycle-k", "5", "-o", "recycle_k=6"), "--recycle-k and -o recycle_k disagree"),
    ],
)
def test_bad_settings_are_usage_errors_before_any_input_is_read(tmp_path, args, fragment):
    result = invoke("ask", str(tmp_path / "missing.pdf"), "q", *args)
    assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_settings_a_command_does_not_take_are_refused(tmp_path):
    result = invoke("eval", "passkey", "-o", "recycle_k=8")
    assert result.exit_code == 2 and "-o recycle_k does not apply to this command" in result.stderr
    assert invoke("doctor", "-o", "chunk_size=8").exit_code == 2


@pytest.mark.parametrize("command", [("ask",), ("eval", "ppl"), ("doctor",)], ids=" ".join)
def test_o_help_lists_the_commands_settings(command):
    """Without the command's required arguments too: -o help is read first."""
    result = invoke(*command, "-o", "help")
    assert result.exit_code == 0, result.stderr
    keys = knobs.keys_for(command[0])
    assert all(key in result.stdout for key in keys)
    assert all(k.key not in result.stdout for k in knobs.REGISTRY if k.key not in keys)


def test_options_command_lists_every_setting():
    result = invoke("options")
    assert result.exit_code == 0
    for knob in knobs.REGISTRY:
        assert knob.key in result.stdout and knob.type_name in result.stdout


# ---- the config's own checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: GenerationConfig(max_new_tokens=-1), "--max-new-tokens must be at least 1"),
        (lambda: GenerationConfig(temperature=float("nan")), "--temperature"),
        (lambda: GenerationConfig(top_p=0), "--top-p must be above 0 and at most 1"),
        (lambda: DCAConfig(chunk_size=1), "--chunk-size must be at least 2"),
        (lambda: DCAConfig(local_window=-1), "--local-window must be at least 0"),
        (lambda: RecycleConfig(stride=0), "--recycle-stride must be at least 1"),
        (lambda: RecycleConfig(schedule="often"), "--recycle-schedule must be fixed or dynamic"),
        (lambda: RecycleConfig(threshold=2), "--recycle-threshold is a cosine similarity"),
        (lambda: PrefillConfig(mode="fast"), "--prefill accepts auto, exact, sparse"),
        (lambda: PrefillConfig(budget=0), "--prefill-budget must be at least 1"),
        (lambda: RunConfig(quantize="int3"), "--quantize accepts"),
        (lambda: RunConfig(max_context=0), "--max-context must be at least 1"),
        (lambda: RunConfig(cache_max_gb=float("inf")), "--cache-max-gb must be a size in GB above 0"),
    ],
)
def test_configs_check_their_values(make, fragment):
    with pytest.raises(UsageError, match=re.escape(fragment)):
        make()


# ---- the environment variables ----------------------------------------------------------------------


def test_every_variable_longdoc_reads_is_in_the_table():
    read = set()
    for path in (REPO / "longdoc").rglob("*.py"):
        read |= set(re.findall(r"\b(LONGDOC_[A-Z_]+)\b", path.read_text()))
    listed = {v.name for v in env.VARIABLES} | {"LONGDOC_PROMPTS"}  # the older name, in its row's meaning
    assert read <= listed and "CC" in listed


def test_help_ends_with_the_variables():
    text = help_of()
    assert all(v.name in text for v in env.VARIABLES)
    assert "LONGDOC_API_KEY" in help_of("serve") and "LONGDOC_API_KEY" not in help_of("models")


def test_one_api_key_variable_for_endpoint_and_serve(monkeypatch):
    """--api-key reads LONGDOC_API_KEY on ask, summarize, chat and serve; never OPENAI_API_KEY."""
    import typer.main

    from longdoc.cli.app import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root)
    for name in ("ask", "summarize", "chat", "serve"):
        (option,) = [p for p in root.get_command(ctx, name).params if p.name == "api_key"]
        assert option.envvar == env.API_KEY == "LONGDOC_API_KEY"


# ---- start-up stays light ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [("--help",), ("ask", "--help"), ("ask",), ("ask", "x.pdf", "q", "--temperature", "-1")], ids=" ".join
)
def test_help_and_usage_errors_do_not_import_torch(args):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "longdoc", *args], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode in (0, 2), proc.stderr
    assert not re.search(r"\|\s+torch\b", proc.stderr)
