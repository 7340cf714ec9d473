"""Served requests' document cache (``--doc-cache private``, the default): a folder beside the user's,
so that requests neither find nor evict the user's own entries, and entry keys salted with a secret
of that folder and the API key, so that one key's clients never find another key's entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

SERVED_DOCUMENTS = "served-documents"
# The secret that salts served entry keys (made once, readable by the user only).
SECRET_NAME = ".longdoc-serve-secret"


def served_documents_dir() -> Path:
    """Where served requests' document-cache entries go by default: ``served-documents`` beside the
    user's document cache."""
    from longdoc.store import documents_dir

    return documents_dir().parent / SERVED_DOCUMENTS


def cache_salt(api_key: str | None) -> bytes:
    """The salt of served requests' entry keys: a secret kept in the served cache folder (made once,
    readable by the user only) and the API key, so one key's clients never find another key's entries."""
    from longdoc.store import documents_dir

    folder = documents_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
    else:
        secret = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
    return hmac.new(secret, (api_key or "").encode(), hashlib.sha256).digest()


@contextlib.contextmanager
def documents_dir_set_to(folder: Path | None) -> Iterator[None]:
    """The process's document cache folder set to ``folder`` while serving (None: left as it is)."""
    if folder is None:
        yield
        return
    name = "LONGDOC_DOC_CACHE_DIR"  # read by longdoc.store.documents_dir at every use
    previous = os.environ.get(name)
    os.environ[name] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
