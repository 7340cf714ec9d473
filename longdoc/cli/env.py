"""The environment variables longdoc reads, in one table: each with what it does and the commands it
affects. ``--help`` ends with the ones of the command at hand (all of them for ``longdoc --help``), and
docs/options.md lists them (``cli.reference``)."""

from __future__ import annotations

from dataclasses import dataclass

# The bearer token of --endpoint (ask, summarize, chat) and the key `longdoc serve` requires: one name
# for both, never the ambient $OPENAI_API_KEY (meant for OpenAI; --endpoint may name any server).
API_KEY = "LONGDOC_API_KEY"

# Commands that load or convert a model, and that run prompts.
_MODEL = ("ask", "summarize", "chat", "count", "serve", "doctor", "eval")
_PROMPTS = ("ask", "summarize", "chat", "count")
_KERNELS = ("ask", "summarize", "chat", "serve", "doctor", "eval")


@dataclass(frozen=True)
class EnvVar:
    name: str
    meaning: str
    commands: tuple[str, ...]  # the commands it affects


VARIABLES: tuple[EnvVar, ...] = (
    EnvVar(
        "LONGDOC_CACHE_DIR",
        "Where converted models, C kernels and the document cache live (default: the user cache dir).",
        (*_MODEL, "models", "cache"),
    ),
    EnvVar(
        "LONGDOC_DOC_CACHE_DIR",
        "The document KV cache alone (default: documents/ in the cache dir).",
        ("ask", "summarize", "chat", "serve", "cache"),
    ),
    EnvVar(
        API_KEY,
        "The bearer token: --endpoint sends it and serve requires it (as --api-key); OPENAI_API_KEY is never sent.",
        ("ask", "summarize", "chat", "serve"),
    ),
    EnvVar(
        "LONGDOC_ISA",
        "none|avx2|avx512|avx512vnni|avx512bf16|amx: choose as that CPU class would (PyTorch's kernels too).",
        _KERNELS,
    ),
    EnvVar("LONGDOC_NATIVE", "0 keeps longdoc's C kernels off.", _KERNELS),
    EnvVar(
        "LONGDOC_PROMPTS_DIR",
        "Prompt templates replacing the packaged ones file by file, as --prompts (older name: LONGDOC_PROMPTS).",
        _PROMPTS,
    ),
    EnvVar(
        "LONGDOC_LOCK_TIMEOUT",
        "Seconds to wait for another process converting the same model (default 900).",
        _MODEL,
    ),
    EnvVar("CC", "The C compiler for longdoc's kernels (may carry arguments, e.g. ccache gcc).", _KERNELS),
)


def of(command: str | None = None) -> list[EnvVar]:
    """The variables that affect ``command`` (every one for None)."""
    return [v for v in VARIABLES if command is None or command in v.commands]


def epilog(command: str | None = None) -> str:
    """The end of ``--help``: the variables that affect ``command``, one per line (rich markup escaped)."""
    rows = of(command)
    width = max(len(v.name) for v in rows)
    lines = ["Environment variables:"] + [f"  {v.name.ljust(width)}  {v.meaning}" for v in rows]
    return "\n".join(line.replace("[", "\\[") for line in lines)
