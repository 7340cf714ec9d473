"""Tests for longdoc.store: cache locations, atomic writes, locks and manifests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from longdoc import store
from longdoc.errors import InputError, UsageError

# --------------------------------------------------------------------------------------------------
# locations


def test_locations_follow_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("LONGDOC_DOC_CACHE_DIR")
    assert store.cache_dir() == tmp_path / "c"
    assert store.models_dir() == tmp_path / "c" / "models"
    assert store.documents_dir() == tmp_path / "c" / "documents"
    monkeypatch.setenv("LONGDOC_DOC_CACHE_DIR", str(tmp_path / "d"))
    assert store.documents_dir() == tmp_path / "d"


def test_importing_the_store_stays_light():
    """Light commands use the store: importing it must not pull in torch or transformers."""
    code = "import sys, longdoc.store; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_file_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "entry.bin"
    with store.atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.parent.is_dir()
        assert tmp.name.startswith(f".entry.bin.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible until the body is done
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry.bin"]


def test_atomic_file_temp_names_are_unique(tmp_path):
    with store.atomic_file(tmp_path / "a") as first, store.atomic_file(tmp_path / "a") as second:
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert (tmp_path / "a").read_bytes() == b"1"  # the outer write finishes last
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_atomic_file_keeps_the_old_content_when_the_body_raises(tmp_path, exc):
    target = tmp_path / "entry.json"
    target.write_text("old")
    with pytest.raises(exc), store.atomic_file(target) as tmp:
        tmp.write_text("half of the new")
        raise exc
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_atomic_file_body_that_never_wrote(tmp_path):
    with pytest.raises(RuntimeError, match="early"), store.atomic_file(tmp_path / "x") as _:
        raise RuntimeError("early")
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_round_trip(tmp_path):
    path = tmp_path / "d" / "meta.json"
    data = {"b": [1, 2.5, None], "a": {"ü": "ok"}, "n": 3}
    store.write_json_atomic(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    store.write_json_atomic(path, {"again": True})
    assert json.loads(path.read_text()) == {"again": True}
    assert [p.name for p in path.parent.iterdir()] == ["meta.json"]


def test_remove_and_discard(tmp_path):
    folder = tmp_path / "entry"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "f").write_bytes(b"x")
    store.discard(folder)
    assert list(tmp_path.iterdir()) == []
    store.discard(folder)  # already gone: nothing to do
    store.remove_tree(tmp_path / "never-was")


# --------------------------------------------------------------------------------------------------
# locks


@pytest.fixture
def held_lock(tmp_path):
    """A lock file held by another process (killed with -9 at the end, as a crashed run would be)."""
    path = tmp_path / "locks" / ".entry.lock"
    path.parent.mkdir()
    code = (
        "import sys, time, filelock\n"
        "lock = filelock.FileLock(sys.argv[1]); lock.acquire()\n"
        "print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield path, holder
    finally:
        holder.kill()
        holder.wait()


def test_lock_gives_up_after_the_timeout_with_the_given_error(held_lock, monkeypatch):
    path, _ = held_lock
    monkeypatch.setenv("LONGDOC_LOCK_TIMEOUT", "1")
    said: list[str] = []
    with (
        pytest.raises(InputError) as caught,
        store.lock(path, "writing the document cache", progress=said.append, error=InputError),
    ):
        pytest.fail("the lock is held elsewhere")
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith("gave up after 1s waiting for another longdoc process writing the document cache")
    assert str(path) in message and "LONGDOC_LOCK_TIMEOUT" in message
    assert said == ["waiting up to 1s for another longdoc process to finish writing the document cache"]


def test_lock_of_a_killed_holder_is_free(held_lock, monkeypatch):
    path, holder = held_lock
    monkeypatch.setenv("LONGDOC_LOCK_TIMEOUT", "30")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said: list[str] = []
    with store.lock(path, "converting the model", progress=said.append):
        pass
    assert said == []


def test_lock_creates_its_folder_and_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGDOC_LOCK_TIMEOUT", "0")
    path = tmp_path / "new" / ".x.lock"
    with store.lock(path, "testing"):
        assert path.parent.is_dir()
    with store.lock(path, "testing"):  # released: a zero timeout is enough
        pass


def test_lock_timeout_env(monkeypatch):
    monkeypatch.delenv("LONGDOC_LOCK_TIMEOUT", raising=False)
    assert store.lock_timeout() == store.LOCK_TIMEOUT_S
    monkeypatch.setenv("LONGDOC_LOCK_TIMEOUT", "2.5")
    assert store.lock_timeout() == 2.5
    monkeypatch.setenv("LONGDOC_LOCK_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="LONGDOC_LOCK_TIMEOUT must be a number"):
        store.lock_timeout()


# --------------------------------------------------------------------------------------------------
# manifests


@pytest.fixture
def recorded(tmp_path) -> Path:
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "a.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "b.json").write_text('{"x": 1}')
    (folder / ".partial.tmp").write_bytes(b"not recorded")
    manifest = store.write_manifest(folder, {"kind": "test"})
    assert set(manifest["files"]) == {"a.bin", "b.json"}
    assert manifest["files"]["a.bin"]["size"] == 10240
    assert store.read_manifest(folder) == manifest
    return folder


def test_manifest_of_an_intact_folder(recorded):
    assert store.check_manifest(recorded) is None
    assert store.check_manifest(recorded, full_hash=False) is None
    assert store.check_manifest(recorded, store.read_manifest(recorded)) is None


def test_manifest_catches_a_truncated_file(recorded):
    data = (recorded / "a.bin").read_bytes()
    (recorded / "a.bin").write_bytes(data[:-1])
    for full_hash in (True, False):
        assert store.check_manifest(recorded, full_hash=full_hash) == "a.bin has 10239 bytes, manifest says 10240"


def test_manifest_catches_a_flipped_byte(recorded):
    data = bytearray((recorded / "a.bin").read_bytes())
    data[5000] ^= 0x01
    (recorded / "a.bin").write_bytes(bytes(data))
    assert store.check_manifest(recorded) == "a.bin fails its sha256 check"
    assert store.check_manifest(recorded, full_hash=False) is None  # sizes only: the cheap check


def test_manifest_catches_missing_pieces(recorded, tmp_path):
    assert store.check_manifest(tmp_path / "nowhere") == "missing"
    (recorded / "b.json").unlink()
    assert store.check_manifest(recorded) == "b.json is missing"
    (recorded / store.MANIFEST_NAME).write_text('{"format": 1, "files": ')
    assert store.read_manifest(recorded) is None
    assert "no readable longdoc-manifest.json" in (store.check_manifest(recorded) or "")


@pytest.mark.parametrize(
    "manifest,reason",
    [
        ({"format": 2, "files": {"a.bin": {"size": 1}}}, "manifest format 2, expected 1"),
        ({"format": 1, "files": {}}, "manifest lists no files"),
        ({"format": 1, "files": ["a.bin"]}, "manifest lists no files"),
        ({"format": 1, "files": {"../a.bin": {"size": 1}}}, "manifest entry '../a.bin' is malformed"),
        ({"format": 1, "files": {"a.bin": 10240}}, "manifest entry 'a.bin' is malformed"),
    ],
)
def test_manifest_structure(recorded, manifest, reason):
    assert store.check_manifest(recorded, manifest) == reason
