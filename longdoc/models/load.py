"""Loading a model for inference, checking a model folder, and listing what is known and cached.

Loading never runs code shipped with a model and never unpickles: weights come only from
safetensors, with ``trust_remote_code`` off.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longdoc import store
from longdoc.errors import ModelError
from longdoc.models.convert import Progress, check_conversion, ensure_converted, quiet_transformers, safe_name
from longdoc.models.decoder import SUPPORTED_MODEL_TYPES, unsupported_features
from longdoc.models.resolve import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    ModelSource,
    packages_installed,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from longdoc.models.weights import build_model

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode with requires_grad off
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    name: str
    source: ModelSource
    #: the model's trained context window (config.max_position_embeddings)
    window: int
    dtype: torch.dtype
    device: torch.device
    #: wall time of load_model, including verification (and conversion on a first run)
    load_s: float
    #: the folder the weights were loaded from (a cache entry for GGUF sources)
    folder: Path


def check_model_folder(folder: Path) -> dict[str, Any]:
    """Validate a model folder without running or unpickling anything; returns its config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except OSError as exc:
        raise ModelError(f"{folder}: cannot read config.json ({exc.strerror})") from exc
    except ValueError as exc:
        raise ModelError(f"{folder}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{folder}: config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{folder}: model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    dropped = unsupported_features(config)
    if dropped:
        raise ModelError(f"{folder}: longdoc cannot run this model faithfully: it uses {', '.join(dropped)}")
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") for n in names):
        pickled = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
        if pickled:
            raise ModelError(
                f"{folder}: weights are only in pickle format ({', '.join(pickled[:3])}), which longdoc "
                "never loads (it can run arbitrary code); convert them to safetensors first"
            )
        raise ModelError(f"{folder}: no *.safetensors weights found")
    return config


def load_model(
    spec: str | ModelSource | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    progress: Progress | None = None,
    warn: Progress | None = None,
    tokenizer: Any = None,
    narrow_linears: bool = False,
    skip_linears: bool = False,
) -> LoadedModel:
    """Resolve, verify (converting once if needed) and load a model for inference.

    Pass an already loaded ``tokenizer`` to skip loading it again (about a second here). With
    ``narrow_linears`` the Linear weights stay in their stored dtype until ``pack_linears`` widens them
    (``longdoc.models.weights.build_model``); with ``skip_linears`` they are not read at all (quantized
    layers replace them).
    """
    start = time.perf_counter()
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = ensure_converted(source, progress=progress, warn=warn)
    config = check_model_folder(folder)

    from transformers import AutoTokenizer

    if progress:
        progress(f"loading {source.name} ({str(dt).removeprefix('torch.')}, {dev})")
    try:
        with quiet_transformers():
            model = build_model(folder, dt, dev, narrow_linears, skip_linears)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load model from {folder}: {first}") from exc
    window = int(getattr(model.config, "max_position_embeddings", 0) or config.get("max_position_embeddings", 0))
    if window <= 0:
        raise ModelError(f"{folder}: config.json gives no max_position_embeddings (the trained window)")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        source=source,
        window=window,
        dtype=dt,
        device=dev,
        load_s=time.perf_counter() - start,
        folder=folder,
    )


# --------------------------------------------------------------------------------------------------
# listing


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def list_models() -> list[dict[str, Any]]:
    """Known models (installed? converted?) and every cached conversion, for ``longdoc models``.

    Uses the cheap manifest check (sizes and headers, no hashing); loading does the full check.
    """
    root = store.models_dir()
    cached: dict[str, dict[str, Any]] = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            manifest = store.read_manifest(d) or {}
            src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
            reason = check_conversion(d, full_hash=False)
            cached[d.name] = {
                "name": (src or {}).get("name") or d.name,
                "kind": "cached",
                "source_kind": (src or {}).get("kind"),
                "path": str(d),
                "size_bytes": _dir_size(d),
                "valid": reason is None,
                "problem": reason,
            }
    rows: list[dict[str, Any]] = []
    for alias, known in KNOWN_MODELS.items():
        entry = None
        if known.sha256:
            entry = cached.get(f"{safe_name(alias)}-{known.sha256[:12]}")
        else:
            entry = next((c for c in cached.values() if c["name"] == alias and c["valid"]), None)
        rows.append(
            {
                "name": alias,
                "kind": "embedded",
                "default": alias == DEFAULT_MODEL,
                "description": known.description,
                "installed": packages_installed(known),
                "install": known.pip_hint,
                "cached": bool(entry and entry["valid"]),
                "path": entry["path"] if entry else None,
                "size_bytes": entry["size_bytes"] if entry else None,
            }
        )
    listed = {r["path"] for r in rows if r["path"]}
    rows.extend(c for c in cached.values() if c["path"] not in listed)
    return rows
