"""Fixtures shared by the test modules: the model families, caches kept apart from the user's, the tiny
model folders. Plain helpers (paths, model builders, the DCA path on bare tensors) are in helpers.py."""

from __future__ import annotations

from pathlib import Path

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
