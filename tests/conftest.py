"""Shared fixtures: tiny random-weight models of each supported family, built from configs in code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from longdoc.attention.dca import ChunkLayout

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
# float64 DCA test vectors, vendored from shared/testdata so a clone without shared/ still passes
TESTDATA = REPO / "tests" / "data"


def query_index(pos: int, key: int, layout: ChunkLayout | None) -> int:
    """The rotation index of a query at ``pos`` against a key at ``key`` (DCA by its definition)."""
    if layout is None:
        return pos
    c, s = layout.chunk_len, layout.chunk_size
    gap = pos // c - key // c
    return pos % c if gap == 0 else (min(pos % c + c, s) if gap == 1 else min(2 * c - 1, s))


FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_model(
    family: str = "qwen2", dtype: torch.dtype = torch.float64, seed: int = 0, hidden: int = 64, mlp: int = 128
) -> torch.nn.Module:
    """3 layers, 4 query heads over 2 KV heads (GQA), random weights large enough that greedy
    decoding does not collapse onto one token. ``hidden`` and ``mlp``: the widths."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval().to(dtype)


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
