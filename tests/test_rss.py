"""What loading and running a q8 model must not hold in this process's memory: the embedding table, and
the LM head's codes beside the other layers."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from longdoc import native
from longdoc.models.weights import FileEmbedding, build_model
from longdoc.quant import cache as mq
from longdoc.quant import schemes

from .helpers import save_tiny_qwen2

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
needs_q8 = pytest.mark.skipif(not native.likely_available("q8"), reason="no C compiler here")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@needs_proc
def test_a_q8_models_embedding_table_stays_in_the_file(tmp_path):
    """Rows looked up are read, and nothing else: a table mapped from the file took the kernel's
    fault-around pages with each row (64 KiB or more), here all 32 MiB of it for every 64th row."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=32768,
        hidden_size=256,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    dense = Qwen2ForCausalLM(config).eval()
    dense.save_pretrained(tmp_path)  # float32: 1 KiB a row, 32 MiB in all
    model = build_model(tmp_path, torch.float32, torch.device("cpu"), skip_linears=True)
    embed = model.model.embed_tokens
    assert isinstance(embed, FileEmbedding)
    ids = torch.arange(1, config.vocab_size, 64)
    embed(ids[:2])  # first-call costs
    before = rss_kib()
    rows = embed(ids.view(2, -1))
    grown = rss_kib() - before
    assert grown < 8 << 10, f"looking up {len(ids)} rows took {grown} KiB"
    assert torch.equal(rows, dense.model.embed_tokens(ids.view(2, -1)))


class Watched(Mapping[str, torch.Tensor]):
    """A quantized cache's tensors, noting which were read while an LM head's codes were still held."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], head: str):
        self.tensors, self.head = tensors, head
        self.reads: list[str] = []
        self.held: list[weakref.ref[torch.Tensor]] = []
        self.beside_head: list[str] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self.tensors[key]
        self.reads.append(key)
        if key.startswith(f"{self.head}."):
            self.held.append(weakref.ref(tensor))
        elif any(ref() is not None for ref in self.held):
            self.beside_head.append(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@needs_q8
def test_the_lm_head_is_quantized_first_and_its_codes_freed_before_the_rest_is_read(tmp_path):
    """Load's peak: the LM head's codes (136 MB for the 0.5B model) are read whole, so they must not sit
    beside every other layer's packed weights."""
    dense, _ = save_tiny_qwen2(tmp_path / "tiny")
    folder = mq.ensure_quantized(tmp_path / "tiny", "q8", "tiny")
    model = build_model(tmp_path / "tiny", torch.float32, torch.device("cpu"), skip_linears=True)
    tensors = mq.load_quantized(folder)
    watched = Watched(tensors, "lm_head")
    try:
        schemes.quantize_linears(model, "q8", watched, dtype=torch.float32, keep_dense=False)
    finally:
        tensors.close()
    assert watched.reads[:2] == ["lm_head.qweight", "lm_head.scales"]
    assert len(watched.reads) == len(tensors) and not watched.beside_head
    assert isinstance(model.lm_head, schemes.QuantLinear) and model.lm_head.dense is None
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad(), schemes.every_row(model):
        got = model(ids).logits
        want = dense(ids).logits
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
