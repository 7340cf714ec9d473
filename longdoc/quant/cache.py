"""Weight-only quantized copies of a model's linears, made once into the verified model cache.

``--quantize int5|q8|int8|int4`` runs the decoder's linears through ``longdoc.quant.schemes.QuantLinear``.
Their quantized weights are computed once per model and scheme, from the verified bfloat16 folder
(a cached GGUF conversion, or the user's model folder), and kept beside it as
``<cache>/models/<base>-<scheme>/``: ``quantized.safetensors`` (``<linear>.qweight`` and
``<linear>.scales`` for every ``nn.Linear``, the tied LM head included), a copy of ``config.json``, and
a manifest written last that records every file's sha256 and which base weights it was made from.
Each use verifies the manifest and the base identity; a damaged or stale entry is reported, deleted and
rebuilt, under the same lock and atomic-rename rules as conversions (``longdoc.store``).
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from longdoc import store
from longdoc.errors import ModelError
from longdoc.models.convert import Progress, check_conversion, quiet_transformers, safe_name
from longdoc.models.weights import SafetensorsReader
from longdoc.quant import schemes

QUANT_FILE = "quantized.safetensors"


def base_identity(folder: Path) -> str:
    """What the quantized weights were made from: the sha256 of the base manifest's weights (cached
    conversions, verified on load), else of the weights files' names, sizes and mtimes (a user's
    folder, which is not hashed on every run)."""
    manifest = store.read_manifest(folder)
    files = manifest.get("files") if manifest else None
    digest = hashlib.sha256()
    if isinstance(files, dict):
        for name in sorted(files):
            if name.endswith(".safetensors") and isinstance(files[name], dict):
                digest.update(f"{name}:{files[name].get('sha256')}\n".encode())
        return digest.hexdigest()
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        digest.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def quantized_path(base: Path, scheme: str) -> Path:
    """``<base>-<scheme>`` beside a cached conversion; for a user's folder, named after it and its
    path (never written inside the user's folder)."""
    root = store.models_dir()
    if base.parent.resolve() == root.resolve():
        return root / f"{base.name}-{scheme}"
    tag = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:12]
    return root / f"{safe_name(base.name)}-{tag}-{scheme}"


def check_quantized(folder: Path, base: Path, scheme: str) -> str | None:
    """Why the quantized entry in ``folder`` can't be trusted for ``base``, or None if it can."""
    reason = check_conversion(folder)
    if reason is not None:
        return reason
    manifest = store.read_manifest(folder) or {}
    source = manifest.get("source")
    if not isinstance(source, dict):
        return "manifest names no source"
    if QUANT_FILE not in (manifest.get("files") or {}):
        return f"manifest lists no {QUANT_FILE}"
    if source.get("quantize") != scheme:
        return f"it holds {source.get('quantize')!r} weights, not {scheme}"
    if source.get("version") != schemes.QUANT_VERSION:
        return f"it was made by quantization version {source.get('version')}, not {schemes.QUANT_VERSION}"
    if source.get("base_identity") != base_identity(base):
        return "it was made from other weights than the model's current ones"
    return None


def ensure_quantized(
    base: Path, scheme: str, name: str, progress: Progress | None = None, warn: Progress | None = None
) -> Path:
    """The verified folder of ``scheme`` weights for the model folder ``base``, made once if needed."""
    target = quantized_path(base, scheme)
    if target.exists():
        if progress:
            progress(f"verifying cached {scheme} weights")
        reason = check_quantized(target, base, scheme)
        if reason is None:
            return target
        (warn or (lambda _m: None))(f"cached {scheme} weights of {name} cannot be used ({reason}); rebuilding them")
    try:
        _quantize_locked(base, scheme, name, target, progress)
    except OSError as exc:
        raise ModelError(
            f"could not write the {scheme} weights under {target.parent} ({exc}); "
            "set LONGDOC_CACHE_DIR to a writable folder with a GB free"
        ) from exc
    return target


def _quantize_locked(base: Path, scheme: str, name: str, target: Path, progress: Progress | None) -> None:
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with store.lock(root / f".{target.name}.lock", f"quantizing the model to {scheme}", progress):
        if target.exists():
            if check_quantized(target, base, scheme) is None:  # another process made it while we waited
                return
            store.discard(target)
        for stale in [*root.glob(f".{target.name}.tmp-*"), *root.glob(f".{target.name}.trash-*")]:
            store.remove_tree(stale)
        work = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        try:
            if progress:
                progress(f"quantizing {name} to {scheme} (one time, about half a minute)")
            _build(base, scheme, work)
            store.write_manifest(
                work,
                {
                    "kind": "quantized",
                    "name": name,
                    "quantize": scheme,
                    "version": schemes.QUANT_VERSION,
                    "group": {"int4": schemes.INT4_GROUP, "int5": 32, "q8": 32}.get(scheme),
                    "base": str(base),
                    "base_identity": base_identity(base),
                },
            )
            os.replace(work, target)
        finally:
            store.remove_tree(work)


def _linear_sources(base: Path) -> tuple[dict[str, str], str | None]:
    """Each ``nn.Linear`` of the model in ``base`` -> the weights key it is read from (a tied LM head
    reads the input embedding), and the LM head's name. Builds the model on the meta device: no weights
    are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(base), trust_remote_code=False)
        with torch.device("meta"):
            model: Any = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed.weight
    head = model.get_output_embeddings()
    names = schemes.quantized_names(model)
    head_name = next((name for name in names if model.get_submodule(name) is head), None)
    sources = {name: f"{embed_name}.weight" if tied and name == head_name else f"{name}.weight" for name in names}
    return sources, head_name


def _build(base: Path, scheme: str, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    keys: dict[str, Path] = {}
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys.update({k: f for k in st.keys()})  # noqa: SIM118 (safe_open is not a mapping)
    tensors: dict[str, torch.Tensor] = {}
    sources, head = _linear_sources(base)
    for name, key in sources.items():
        if key not in keys:
            raise ModelError(f"{base}: no weights {key} for the linear {name}")
        with safe_open(str(keys[key]), "pt") as st:
            weight = st.get_tensor(key)
        qweight, scales = schemes.quantize(scheme, weight, head=name == head)
        tensors[f"{name}.{schemes.QWEIGHT}"] = qweight.contiguous()
        tensors[f"{name}.{schemes.QSCALES}"] = scales.contiguous()
        del weight
    save_file(tensors, str(out / QUANT_FILE), metadata={"quantize": scheme})
    shutil.copyfile(base / "config.json", out / "config.json")
    del tensors
    gc.collect()


class QuantizedTensors(Mapping[str, torch.Tensor]):
    """The tensors of a quantized cache, read one at a time from the file when asked for, with plain
    reads (so loading holds neither the whole file nor its mapped pages next to the layers built from
    it)."""

    def __init__(self, folder: Path):
        try:
            self._file = SafetensorsReader(folder / QUANT_FILE)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not read the quantized weights in {folder}: {exc}") from exc
        self._keys = self._file.names()
        self._lock = threading.Lock()  # quantize_linears reads from several threads; one file position

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._file.header:
            raise KeyError(key)
        with self._lock:
            return self._file.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        self._file.close()


def load_quantized(folder: Path) -> QuantizedTensors:
    return QuantizedTensors(folder)
