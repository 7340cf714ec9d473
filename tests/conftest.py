"""Fixtures shared by the test modules: the model families, caches kept apart from the user's, the tiny
model folders, the served backend and its decode gate. Plain helpers (paths, model builders, the DCA path
on bare tensors) are in helpers.py, the serve ones in serve_helpers.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import FAMILIES, save_chat_model, save_tiny_qwen2


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _isolated_cache(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fast tests never read or write the user's real cache (a test that passes only because some
    earlier run left a conversion there proves nothing); the slow ones use it for the converted model,
    never for document prefixes (a hit left by an earlier run would change what they measure)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "longdoc-cache"))
    monkeypatch.setenv("LONGDOC_DOC_CACHE_DIR", str(tmp_path / "longdoc-documents"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen2 folder (window 4096, no chat template) for end-to-end runs without the real
    model. Shared by every test: none writes into it."""
    folder = tmp_path_factory.mktemp("tiny-model") / "tiny"
    save_tiny_qwen2(folder, window=4096)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same tiny model with a ChatML template: what a server needs to render chat messages (remote
    prompts go out as messages). Shared by every test: none writes into it."""
    return save_chat_model(tmp_path_factory.mktemp("chat-model") / "tiny")


@pytest.fixture(scope="module")
def session(tiny_chat: str) -> Any:
    """The local backend the serve tests put behind a server: the tiny chat model in float32, DCA with many
    96-token chunks and recycled decoding with a set far smaller than the context (every path of the
    engine runs behind the server)."""
    from longdoc.config import DCAConfig, GenerationConfig, RecycleConfig, RunConfig
    from longdoc.runtime.local import LocalBackend

    from .serve_helpers import MAX_CONTEXT, NEW, Collect

    cfg = RunConfig(
        model=tiny_chat,
        dtype="float32",
        max_context=MAX_CONTEXT,
        dca=DCAConfig(enabled=True, chunk_size=96, local_window=16),
        recycle=RecycleConfig(enabled=True, k=64, stride=4),
        generation=GenerationConfig(max_new_tokens=NEW),
    )
    return LocalBackend(cfg, Collect())


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Decode steps wait for this event (set it to let generations go on): a request that runs for as
    long as a test needs, deterministically."""
    from longdoc.engine import decode

    event = threading.Event()
    real = decode.decode_one_token

    def gated(*args: Any, **kw: Any) -> Any:
        assert event.wait(30), "the gate was never opened"
        time.sleep(0.01)  # and slowly after: a client that leaves is noticed long before the answer ends
        return real(*args, **kw)

    monkeypatch.setattr(decode, "decode_one_token", gated)
    yield event
    event.set()
