"""The document KV cache: a document prefix's prefilled keys and values, kept on disk across runs.

Asking a second question about the same documents then costs loading the entry (about a second)
instead of prefilling them again (minutes). An entry is one safetensors file (never pickle),
``<cache>/documents/<key>.safetensors``, named by a hash of everything the keys and values depend on:
the model's verified weights, dtype, device kind, attention kernel, DCA layout and logit scale,
prefill mode and step, and the prefix token ids. The file holds the ids too (checked against the
run's on load) and a sha256 of the tensor bytes in its metadata, so a damaged or truncated entry
is reported, deleted and rebuilt rather than trusted.

Writes go to a temporary file that is fsynced and renamed over the entry, so a reader sees either
nothing or a whole entry, and two processes writing the same entry leave one valid entry. Use
refreshes an entry's mtime; past the size cap the least recently used entries go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longdoc.engine.kvcache import KVCache
from longdoc.store import atomic_file, discard, documents_dir, read_manifest

FORMAT = 1
SUFFIX = ".safetensors"
# Below this many prefix tokens a prefill takes well under a second: an entry would only churn the cache.
MIN_PREFIX_TOKENS = 256

_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_HASH_BLOCK = 64 << 20


class DamagedEntry(Exception):
    """An entry that cannot be trusted (truncated, corrupted, or not what its name says)."""


@dataclass(frozen=True)
class KeyParts:
    """Everything a prefix's keys and values depend on, besides the token ids."""

    model: str  # identity of the verified weights (model_identity)
    dtype: str
    device: str  # device kind: cpu | cuda
    kernel: str
    layout: tuple[int, int] | None  # DCA (chunk_size, local_window), None without DCA
    logit_scale: float
    prefill: str  # prefill mode: exact (sparse prefill would change the values)
    prefill_step: int  # step boundaries change float rounding, so they are part of the identity


def model_identity(folder: Path) -> str:
    """A stable identity for the model in ``folder``: its manifest's recorded checksums (converted
    models, verified on every load), else the weights' sizes and modification times."""
    manifest = read_manifest(folder)
    files = manifest.get("files") if manifest else None
    if isinstance(files, dict) and files:
        listed = sorted((name, str(meta.get("sha256"))) for name, meta in files.items() if isinstance(meta, dict))
        return "sha256:" + hashlib.sha256(json.dumps(listed).encode()).hexdigest()
    stats = []
    for p in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        with contextlib.suppress(OSError):
            st = p.stat()
            stats.append((p.name, st.st_size, st.st_mtime_ns))
    return "stat:" + hashlib.sha256(json.dumps([str(folder.resolve()), stats]).encode()).hexdigest()


def entry_key(parts: KeyParts, ids: list[int]) -> str:
    """The entry name for a prefix: sha256 of the key parts and the token ids."""
    digest = hashlib.sha256(json.dumps([FORMAT, parts.__dict__], sort_keys=True, default=list).encode())
    digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def entry_path(key: str) -> Path:
    return documents_dir() / f"{key}{SUFFIX}"


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous tensor, without a copy."""
    return memoryview(t.contiguous().view(torch.uint8).numpy().data).cast("B")


def save(key: str, kv: KVCache, ids: list[int], meta: dict[str, str]) -> int:
    """Write positions ``0 .. len(ids)`` of ``kv`` as entry ``key``; returns its size in bytes.

    Written tensor by tensor (one layer's keys at a time in memory, not a copy of the whole prefix),
    hashing as it goes; the hash goes at the end of the metadata, whose size is fixed up front.
    """
    n = len(ids)
    dtype = kv.k[0].dtype
    names = ["ids"] + [f"{kind}.{layer}" for layer in range(len(kv.k)) for kind in ("k", "v")]
    shape = [kv.k[0].shape[1], n, kv.k[0].shape[3]]
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        size = n * 4 if name == "ids" else math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": "I32" if name == "ids" else _DTYPES[dtype],
            "shape": [n] if name == "ids" else shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    metadata = {**meta, "format": str(FORMAT), "key": key, "tokens": str(n), "sha256": "0" * 64}
    header["__metadata__"] = metadata
    digest = hashlib.sha256()

    def tensors() -> Iterator[torch.Tensor]:
        yield torch.tensor(ids, dtype=torch.int32)
        for layer in range(len(kv.k)):
            yield kv.k[layer][0, :, :n]
            yield kv.v[layer][0, :, :n]

    path = entry_path(key)
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        head = _header_bytes(header)
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors():
            data = _as_bytes(t.cpu())
            digest.update(data)
            f.write(data)
        # the digest's 64 hex digits replace the 64 zeros written above: same length, same offsets
        metadata["sha256"] = digest.hexdigest()
        f.seek(8)
        f.write(_header_bytes(header))
    return path.stat().st_size


def _header_bytes(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes


@dataclass
class Loaded:
    bytes: int
    load_s: float


def load(key: str, kv: KVCache, ids: list[int]) -> Loaded | None:
    """Fill positions ``0 .. len(ids)`` of ``kv`` from entry ``key``; None when there is no entry.

    Raises DamagedEntry (after deleting the entry) when it fails its checks; the caller then
    prefills as if there were none.
    """
    from safetensors import safe_open

    path = entry_path(key)
    if not path.exists():
        return None
    t0 = time.perf_counter()
    try:
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("format") != str(FORMAT) or meta.get("key") != key:
                raise DamagedEntry("its header does not match its name")
            digest = hashlib.sha256()
            stored = st.get_tensor("ids")
            digest.update(_as_bytes(stored))
            if stored.tolist() != ids:
                raise DamagedEntry("its token ids differ from this prompt's")
            n = len(ids)
            for layer in range(len(kv.k)):
                for kind, dest in (("k", kv.k[layer]), ("v", kv.v[layer])):
                    t = st.get_tensor(f"{kind}.{layer}")
                    if t.dtype != dest.dtype or tuple(t.shape) != (dest.shape[1], n, dest.shape[3]):
                        raise DamagedEntry(f"{kind}.{layer} has shape {tuple(t.shape)} {t.dtype}")
                    digest.update(_as_bytes(t))
                    dest[0, :, :n] = t
            if digest.hexdigest() != meta.get("sha256"):
                raise DamagedEntry("it fails its sha256 check")
    except DamagedEntry:
        discard(path)
        raise
    except Exception as exc:  # safetensors reports truncation and bad headers with assorted errors
        discard(path)
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DamagedEntry(f"it is unreadable ({why})") from None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: evicted last
    return Loaded(bytes=path.stat().st_size, load_s=time.perf_counter() - t0)


@dataclass(frozen=True)
class Entry:
    """One cached document prefix, as ``longdoc cache ls`` lists it."""

    key: str
    path: str
    bytes: int
    used: float  # last use, seconds since the epoch
    tokens: int
    model: str
    sources: list[str]
    valid: bool  # whether its header could be read


def entries() -> list[Entry]:
    """Every entry, most recently used first: key, bytes, last use, tokens, model and sources."""
    folder = documents_dir()
    out = []
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            st = path.stat()
        except OSError:
            continue  # removed meanwhile
        meta = _metadata(path)
        out.append(
            Entry(
                key=path.name.removesuffix(SUFFIX),
                path=str(path),
                bytes=st.st_size,
                used=st.st_mtime,
                tokens=int(meta.get("tokens", 0) or 0),
                model=meta.get("model", ""),
                sources=json.loads(meta.get("sources", "[]")) if meta else [],
                valid=bool(meta),
            )
        )
    return sorted(out, key=lambda e: -e.used)


def _metadata(path: Path) -> dict[str, str]:
    """An entry's metadata from its header alone (cheap: the tensors are not read)."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 16 << 20:
                return {}
            header = json.loads(f.read(n))
        meta = header.get("__metadata__", {})
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, struct.error):
        return {}


def evict(max_bytes: int, keep: str | None = None, warn: Callable[[str], None] | None = None) -> int:
    """Delete least recently used entries (never ``keep``) until the cache holds at most ``max_bytes``;
    returns how many went. Stray temporary files of killed writers older than an hour go too."""
    folder = documents_dir()
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > 3600:
                tmp.unlink()
    listed = entries()
    total = sum(e.bytes for e in listed)
    removed = 0
    for e in reversed(listed):
        if total <= max_bytes:
            break
        if e.key == keep:
            continue
        discard(Path(e.path))
        total -= e.bytes
        removed += 1
    if removed and warn:
        warn(f"document cache over its {max_bytes / 1e9:.1f} GB cap: removed {removed} least recently used entries")
    return removed


def clear() -> tuple[int, int]:
    """Delete every entry; returns (entries, bytes) removed."""
    count = size = 0
    for e in entries():
        discard(Path(e.path))
        count += 1
        size += e.bytes
    return count, size
