"""Recycled Attention decoding: exactness when K covers the context, selection, schedules."""

from __future__ import annotations

import pytest
import torch

from longdoc.attention.dca import ChunkLayout
from longdoc.attention.kernels import attend_reference, get_kernel
from longdoc.attention.patch import AttentionSettings, PatchedModel
from longdoc.config import GenerationConfig, RecycleConfig
from longdoc.engine.decode import generate
from longdoc.engine.prefill import prefill
from longdoc.engine.recycled import (
    POOL_KERNEL,
    RecycledPolicy,
    RecycledSet,
    StreamingPolicy,
    full_attention_probs,
    select_top_k,
    sparse_attention,
)

from .conftest import tiny_model

CPU = torch.device("cpu")


def decode(model, layout, policy, n_prompt=70, new=25, seed=0):
    pm = PatchedModel(model, AttentionSettings(layout, get_kernel("cpu", CPU)))
    ids = torch.randint(0, 256, (1, n_prompt), generator=torch.Generator().manual_seed(seed))
    kv = pm.new_store(n_prompt + new)
    logits = prefill(pm, ids, kv, step=16)
    return list(generate(pm, logits, n_prompt, kv, GenerationConfig(max_new_tokens=new), set(), policy)), pm, kv


@pytest.mark.parametrize("layout", [None, ChunkLayout(24, 6)])
@pytest.mark.parametrize("schedule", ["fixed", "dynamic"])
def test_recycled_with_k_covering_context_equals_full(layout, schedule):
    model = tiny_model(dtype=torch.float32)
    full, _, _ = decode(model, layout, None)
    policy = RecycledPolicy(RecycleConfig(k=10_000, stride=4, schedule=schedule, threshold=0.5), n_layers=3)
    recycled, _, _ = decode(model, layout, policy)
    assert len(set(full)) > 3
    assert recycled == full
    assert policy.recycled_steps > 0 and policy.full_steps >= 1


def test_small_k_changes_decoding():
    """A test that the equality above is not vacuous: a tiny recycled set does change the output."""
    model = tiny_model(dtype=torch.float32)
    full, _, _ = decode(model, None, None)
    recycled, _, _ = decode(model, None, RecycledPolicy(RecycleConfig(k=2, stride=50), n_layers=3))
    assert recycled != full


def test_fixed_schedule_fires_every_stride():
    policy = RecycledPolicy(RecycleConfig(k=8, stride=5), n_layers=3)
    model = tiny_model(dtype=torch.float32)
    decode(model, None, policy, new=23)  # 22 decode forwards after the prefill's logits
    assert policy.full_steps == len([s for s in range(22) if s % 5 == 0])
    assert policy.recycled_steps == 22 - policy.full_steps


def test_dynamic_schedule_follows_query_similarity():
    model = tiny_model(dtype=torch.float32)
    never = RecycledPolicy(RecycleConfig(k=8, schedule="dynamic", threshold=-1.0), n_layers=3)
    decode(model, None, never)
    assert never.full_steps == 1  # only the first step after prefill
    always = RecycledPolicy(RecycleConfig(k=8, schedule="dynamic", threshold=1.01), n_layers=3)
    decode(model, None, always)
    assert always.full_steps == 12 and always.recycled_steps == 12  # every recycled step asks for a full one


def test_selection_is_top_k_of_pooled_group_max():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 2, 3, 50), dim=-1)
    idx = select_top_k(probs, 10)
    assert idx.shape == (1, 2, 10)
    for h in range(2):
        gm = probs[0, h].max(dim=0).values
        pooled = torch.tensor([gm[max(0, i - POOL_KERNEL // 2) : i + POOL_KERNEL // 2 + 1].max() for i in range(50)])
        expected = sorted(pooled.topk(10).indices.tolist())
        assert idx[0, h].tolist() == expected
    assert select_top_k(probs, 100).shape[-1] == 50


@pytest.mark.parametrize("layout", [None, ChunkLayout(12, 3)])
def test_full_step_probs_and_sparse_attention_match_reference(layout):
    """The full step's probabilities come from the region-correct DCA scores, and sparse attention over
    all indices equals full attention."""
    model = tiny_model()
    pm = PatchedModel(model, AttentionSettings(layout, get_kernel("reference", CPU)))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    kv = pm.new_store(41)
    prefill(pm, ids, kv, step=8)
    q = torch.randn(1, 4, 1, pm.head_dim, dtype=torch.float64)
    k_new = torch.randn(1, 2, 1, pm.head_dim, dtype=torch.float64)
    kv.update(0, 40, k_new, torch.randn_like(k_new))
    expected = pm.default_attend(kv)(0, q, 40)
    out, probs = full_attention_probs(pm, q, kv, 0, 40)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 2, dtype=probs.dtype), atol=1e-9, rtol=0)
    idx = torch.arange(41).expand(1, 2, 41)
    torch.testing.assert_close(sparse_attention(pm, q, kv, 0, 40, idx), expected, atol=1e-10, rtol=0)
    # a subset: equals reference attention over exactly those keys (plain layout only: one rotation)
    if layout is None:
        sub = torch.tensor([0, 3, 17, 39, 40])
        qr = pm.rope.rotate(q, torch.tensor([40]))
        ref, _ = attend_reference(qr, kv.k[0][:, :, sub], kv.v[0][:, :, sub], False, pm.scale)
        got = sparse_attention(pm, q, kv, 0, 40, sub.expand(1, 2, -1))
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_tokens_since_last_full_step_are_always_attended():
    model = tiny_model(dtype=torch.float32)
    policy = RecycledPolicy(RecycleConfig(k=3, stride=100), n_layers=3)
    seen = []
    original = RecycledSet.attend

    def spy(self, pm, q, pos):
        seen.append((pos, self.idx[0, 0, : self.n].tolist()))
        return original(self, pm, q, pos)

    RecycledSet.attend = spy
    try:
        decode(model, None, policy, new=8)
    finally:
        RecycledSet.attend = original
    assert len(seen) == 3 * 6  # 3 layers x 6 recycled steps (8 tokens: 7 decode forwards, the first full)
    for pos, idx in seen:
        assert set(range(policy.last_full_pos, pos + 1)) <= set(idx)
        assert len(idx) == 3 + pos - policy.last_full_pos + 1 == len(set(idx))


def test_recycled_set_grows_past_its_capacity():
    """The dynamic schedule has no stride bound: the recycled buffers must grow, not overflow."""
    model = tiny_model(dtype=torch.float32)
    full, _, _ = decode(model, None, None, new=90, n_prompt=20)
    policy = RecycledPolicy(RecycleConfig(k=10_000, schedule="dynamic", threshold=-1.0), n_layers=3)
    recycled, _, _ = decode(model, None, policy, new=90, n_prompt=20)
    assert policy.full_steps == 1 and recycled == full


def test_streaming_baseline_uses_sinks_and_recent_window():
    model = tiny_model(dtype=torch.float32)
    tokens, _, _ = decode(model, None, StreamingPolicy(budget=20))
    full, _, _ = decode(model, None, None)
    assert len(tokens) == len(full) and tokens != full
