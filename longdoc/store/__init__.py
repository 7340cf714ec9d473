"""longdoc's on-disk state: where the cache lives, and how anything in it is written, checked and locked.

Converted models (``longdoc.models``) and the document KV cache (``longdoc.runtime.doccache``) both keep
files that other longdoc processes may read at any moment or that a run killed half-way may have
left behind, so both rely on the same rules:

* a file is written under a hidden temporary name and renamed into place (``atomic_file``): a
  reader sees the old file or the complete new one, never a torn one;
* a folder written as a unit lists its files with sizes and sha256 in a manifest written last
  (``write_manifest``), and is trusted only if it still matches (``check_manifest``);
* work that must happen once at a time holds a lock file (``lock``) that dies with its holder.

Light commands (``longdoc models``, ``longdoc cache ls``) use this module too: it must not import
torch or transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock

from longdoc.errors import LongdocError, ModelError, UsageError

MANIFEST_NAME = "longdoc-manifest.json"
MANIFEST_FORMAT = 1

# How long a run waits for another process's lock before giving up ($LONGDOC_LOCK_TIMEOUT, seconds):
# a model conversion takes about a minute, several on a slow or busy machine.
LOCK_TIMEOUT_S = 900.0


# --------------------------------------------------------------------------------------------------
# locations


def cache_dir() -> Path:
    """``$LONGDOC_CACHE_DIR`` if set, else the platform's user cache dir for longdoc."""
    env = os.environ.get("LONGDOC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("longdoc"))


def models_dir() -> Path:
    """Converted models, one folder each (made by the first conversion)."""
    return cache_dir() / "models"


def documents_dir() -> Path:
    """The document KV cache: ``$LONGDOC_DOC_CACHE_DIR`` if set (a faster disk, say), else ``documents``
    in the cache dir (made by the first ``atomic_file`` or ``lock`` under it)."""
    env = os.environ.get("LONGDOC_DOC_CACHE_DIR")
    return Path(env).expanduser() if env else cache_dir() / "documents"


# --------------------------------------------------------------------------------------------------
# files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it replaces ``path``.

    The temporary name is hidden and unique per process and call (``.{name}.{pid}.{hex}.tmp``), so
    concurrent writers never share one and cleanups can recognize strays of killed writers. On any
    exception, KeyboardInterrupt included, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        # the data must be on disk before the rename is: else a crash can leave a renamed, empty file
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Best effort: some platforms and filesystems refuse to
    open or sync a folder, and the rename itself has already happened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def discard(path: Path) -> None:
    """Move ``path`` out of the way atomically (to a hidden ``.{name}.trash-*``), then delete it: a
    reader never sees a half-deleted folder, and a kill mid-delete leaves only a hidden one."""
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    if trash.is_dir() and not trash.is_symlink():
        remove_tree(trash)
    else:
        with contextlib.suppress(OSError):
            trash.unlink()


# --------------------------------------------------------------------------------------------------
# locks


def lock_timeout() -> float:
    try:
        return float(os.environ.get("LONGDOC_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    except ValueError:
        raise UsageError("LONGDOC_LOCK_TIMEOUT must be a number of seconds") from None


@contextlib.contextmanager
def lock(
    path: Path,
    what: str,
    progress: Callable[[str], None] | None = None,
    error: type[LongdocError] = ModelError,
) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created with its folder if missing).

    filelock uses flock on POSIX, which the kernel releases when the holder dies, even by kill -9, so
    a crashed run never blocks the next one. Busy: says so through ``progress``, waits at most
    ``lock_timeout()``, then raises ``error``. ``what`` is what the holder is doing, as a phrase that
    follows "another longdoc process" (e.g. "converting the model").
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    held = filelock.FileLock(str(path))
    try:
        held.acquire(timeout=0)
    except filelock.Timeout:
        timeout = lock_timeout()
        if progress:
            progress(f"waiting up to {timeout:.0f}s for another longdoc process to finish {what}")
        try:
            held.acquire(timeout=timeout, poll_interval=0.2)
        except filelock.Timeout:
            raise error(
                f"gave up after {timeout:.0f}s waiting for another longdoc process {what} (lock "
                f"{path}); try again when it is done, or raise LONGDOC_LOCK_TIMEOUT"
            ) from None
    try:
        yield
    finally:
        held.release()


# --------------------------------------------------------------------------------------------------
# manifests


def write_manifest(folder: Path, source: Mapping[str, Any]) -> dict[str, Any]:
    """Record every file in ``folder`` (size, sha256) in its manifest. Write it last: a folder whose
    manifest is missing is an unfinished write. Hidden files (temporaries) are not recorded."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST_NAME or p.name.startswith(".") or not p.is_file():
            continue
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": dict(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or None if it is missing or not a JSON object."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_manifest(folder: Path, manifest: Mapping[str, Any] | None = None, *, full_hash: bool = True) -> str | None:
    """Why the files that ``folder``'s manifest lists can't be trusted, or None if they can.

    Every listed file must be present with its recorded size and, with ``full_hash``, its sha256
    (~0.65 s per GB here). Pass ``manifest`` when the caller has already read it (to apply its own
    rules first). Files the manifest does not list are ignored.
    """
    if not folder.is_dir():
        return "missing"
    if manifest is None:
        manifest = read_manifest(folder)
        if manifest is None:
            return f"no readable {MANIFEST_NAME} (an interrupted or foreign write)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    # sizes of all files first: a truncated file is found without hashing the others
    for name, meta in files.items():
        if not isinstance(meta, dict) or "/" in name or name.startswith("."):
            return f"manifest entry {name!r} is malformed"
        try:
            size = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != meta.get("size"):
            return f"{name} has {size} bytes, manifest says {meta.get('size')}"
    if full_hash:
        for name, meta in files.items():
            try:
                digest = sha256_file(folder / name)
            except OSError as exc:
                return f"{name} is unreadable ({exc.strerror})"
            if digest != meta.get("sha256"):
                return f"{name} fails its sha256 check"
    return None
