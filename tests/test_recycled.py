"""Recycled Attention decoding against independent references: exactness when K covers the context
(float32 and bfloat16), recycled steps and selection against naive float64 attention over exactly
the held keys, the schedules replayed from recorded queries, and the StreamingLLM baseline."""

from __future__ import annotations

import pytest
import torch

from longdoc.attention.dca import ChunkLayout
from longdoc.attention.kernels import get_kernel
from longdoc.config import GenerationConfig, RecycleConfig
from longdoc.engine.baselines import StreamingPolicy, streaming_positions
from longdoc.engine.decode import DecodePolicy, generate
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import prefill
from longdoc.engine.recycled import POOL_KERNEL, RecycledPolicy, RecycledSet, select_top_k, selection_probs

from .helpers import query_index, tiny_model

CPU = torch.device("cpu")
N_LAYERS = 3


def decode(model, layout, policy, n_prompt=70, new=25, seed=0, kernel="cpu"):
    pm = LongModel(model, AttentionSettings(layout, get_kernel(kernel, CPU)))
    ids = torch.randint(0, 256, (1, n_prompt), generator=torch.Generator().manual_seed(seed))
    kv = pm.new_cache(n_prompt + new)
    logits = prefill(pm, ids, kv, step=16)
    return list(generate(pm, logits, n_prompt, kv, GenerationConfig(max_new_tokens=new), set(), policy)), pm, kv


def naive_attention(pm, q, kv, layer, pos, keys_per_head, probs_only=False):
    """Float64 attention of q (1, H, 1, D) at ``pos`` over the listed cached key positions of each KV
    head, every score with its own query rotation. Returns (1, H, 1, D), or per-head probability
    rows over ``keys_per_head`` when ``probs_only``: then q is rotated in its own dtype, as the
    attention kernel gets it (the selection ranks keys by that step's attention), and widened."""
    h, d = q.shape[1], q.shape[3]
    g = h // pm.n_kv_heads
    out = torch.zeros(1, h, 1, d, dtype=torch.float64)
    rows = []
    for head in range(h):
        kh = head // g
        keys = keys_per_head[kh]
        row = q[:, head : head + 1] if probs_only else q[:, head : head + 1].double()
        qs = [pm.rope.rotate(row, torch.tensor([query_index(pos, j, pm.settings.layout)])).double() for j in keys]
        scores = torch.stack([(qs[i][0, 0, 0] @ kv.k[layer][0, kh, j].double()) * pm.scale for i, j in enumerate(keys)])
        p = torch.softmax(scores, dim=0)
        rows.append(p)
        out[0, head, 0] = p @ kv.v[layer][0, kh, keys].double()
    return rows if probs_only else out


class Recorder(DecodePolicy):
    """Wraps a policy and records, per step and layer, the query and whether the layer attended fully."""

    def __init__(self, inner: RecycledPolicy):
        self.inner = inner
        self.steps: list[list[tuple[torch.Tensor, bool]]] = []

    def attend_for(self, model, kv, step, pos):
        before = [s for s in self.inner.sets]
        attend = self.inner.attend_for(model, kv, step, pos)
        record: list[tuple[torch.Tensor, bool]] = []
        self.steps.append(record)

        def wrapped(layer, q, start):
            out = attend(layer, q, start)
            record.append((q.flatten().double().clone(), self.inner.sets[layer] is not before[layer]))
            return out

        return wrapped


# ---- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [None, ChunkLayout(24, 6)])
@pytest.mark.parametrize("schedule", ["fixed", "dynamic"])
def test_recycled_with_k_covering_context_equals_full(layout, schedule, dtype):
    """Same kernel, same regions, same merge order: token for token equal in bfloat16 too. The prompt
    spans four DCA chunks and decoding crosses a chunk boundary."""
    model = tiny_model(dtype=dtype)
    full, _, _ = decode(model, layout, None)
    policy = RecycledPolicy(RecycleConfig(k=10_000, stride=4, schedule=schedule, threshold=0.5), N_LAYERS)
    recycled, _, _ = decode(model, layout, policy)
    assert len(set(full)) > 3
    assert recycled == full
    assert policy.recycled_steps > 0 and policy.full_steps >= 1
    assert policy.stats.effective_k >= 70  # every key of the prompt was held


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
@pytest.mark.parametrize("layout", [None, ChunkLayout(12, 3)])
def test_recycled_steps_equal_naive_attention_over_the_held_keys(kernel, layout):
    """Every recycled step's output equals float64 attention over exactly the keys its set holds, each
    scored with its own DCA query rotation; heads that split the regions differently included."""
    model = tiny_model(dtype=torch.float64)
    calls = []
    original = RecycledSet.attend

    def spy(self, pm, q, rot):
        out = original(self, pm, q, rot)
        calls.append((pm, q.clone(), self.idx[0, :, : self.n].clone(), list(self.splits), out.clone()))
        return out

    RecycledSet.attend = spy  # type: ignore[method-assign]
    try:
        _, pm, kv = decode(
            model, layout, RecycledPolicy(RecycleConfig(k=6, stride=5), N_LAYERS), n_prompt=40, new=12, kernel=kernel
        )
    finally:
        RecycledSet.attend = original  # type: ignore[method-assign]
    assert len(calls) == N_LAYERS * 8  # 11 decode forwards: steps 0, 5 and 10 are full
    if layout is not None:
        assert any(len(set(splits)) > 1 for *_, splits, _ in calls)  # per-head splits were exercised
    for layer_call, (pm, q, idx, _, out) in enumerate(calls):
        layer = layer_call % N_LAYERS
        pos = int(idx.max())  # the set's newest key is the query's own position
        expected = naive_attention(pm, q, kv, layer, pos, [row.tolist() for row in idx])
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("layout", [None, ChunkLayout(12, 3)])
def test_selection_probabilities_are_float32_region_scores(layout):
    """The full step chooses from float32 probabilities over every key, each with its region's rotation
    (the query rotated in bfloat16, as the kernel gets it: a float32 rotation here is caught)."""
    model = tiny_model(dtype=torch.bfloat16)
    pm = LongModel(model, AttentionSettings(layout, get_kernel("cpu", CPU)))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    kv = pm.new_cache(41)
    prefill(pm, ids, kv, step=8)
    q = torch.randn(1, 4, 1, pm.head_dim, dtype=torch.bfloat16)
    probs = selection_probs(pm, q, kv, 1, 39)
    assert probs.dtype == torch.float32 and probs.shape == (1, 2, 2, 40)
    expected = naive_attention(pm, q, kv, 1, 39, [list(range(40))] * 2, probs_only=True)
    for head in range(4):
        torch.testing.assert_close(probs[0, head // 2, head % 2].double(), expected[head], atol=2e-6, rtol=1e-4)


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


def test_full_step_keeps_the_most_attended_keys():
    """End to end: after a full step each set holds the K keys of highest (pooled) float32 attention."""
    model = tiny_model(dtype=torch.float32)
    rec = Recorder(RecycledPolicy(RecycleConfig(k=8, stride=100), N_LAYERS))
    _, pm, kv = decode(model, None, rec, n_prompt=60, new=2)
    q_first = rec.steps[0][0][0].view(1, 4, 1, -1).float()
    probs = selection_probs(pm, q_first, kv, 0, 60)[..., :60]
    expected = select_top_k(probs, 8)
    held = rec.inner.sets[0].idx[0, :, :8]
    assert held.tolist() == expected[0].tolist()
    # and those are the largest, not the smallest: every held key outranks every other key
    pooled = torch.nn.functional.max_pool1d(probs.amax(dim=2), POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)[0]
    for h in range(2):
        inside = pooled[h, held[h]]
        outside = pooled[h, [i for i in range(60) if i not in held[h].tolist()]]
        assert inside.min() >= outside.max()


# ---- schedules ----------------------------------------------------------------------------------


def test_fixed_schedule_fires_every_stride():
    """Which steps are full, not only how many: 0, S, 2S, ... (a phase off by one has the same count)."""
    rec = Recorder(RecycledPolicy(RecycleConfig(k=8, stride=5), N_LAYERS))
    decode(tiny_model(dtype=torch.float32), None, rec, new=23)  # 22 decode forwards after the prefill
    full_steps = [step for step, record in enumerate(rec.steps) if all(full for _, full in record)]
    assert full_steps == [0, 5, 10, 15, 20]
    assert not any(full for step, record in enumerate(rec.steps) if step % 5 for _, full in record)
    policy = rec.inner
    assert policy.full_steps == 5 and policy.recycled_steps == 17 and policy.layer_refreshes == 0


# the tiny random model's queries drift far from step to step: at stride 1 thresholds of 0.2 and more
# refresh nearly every layer at every check, which would leave nothing to tell apart
@pytest.mark.parametrize("stride,threshold", [(2, 0.2), (2, 0.5), (1, -0.1), (1, 0.0)])
def test_dynamic_schedule_replays_from_recorded_queries(stride, threshold):
    """Replay the rule from the recorded queries: every ``stride`` steps each layer compares its query
    with its query at its own last refresh, and a layer below the threshold attends fully and
    refreshes in that same step. Stride 1 (a check every step) shows a reference left stale by a
    refresh: the layer would then refresh again and again."""
    rec = Recorder(RecycledPolicy(RecycleConfig(k=8, stride=stride, schedule="dynamic", threshold=threshold), N_LAYERS))
    decode(tiny_model(dtype=torch.float32), None, rec, new=30)
    reference: list[torch.Tensor] = []
    refreshes = 0
    for step, record in enumerate(rec.steps):
        for layer, (q, full) in enumerate(record):
            if step == 0:
                expect = True
                reference.append(q)
            else:
                drift = torch.nn.functional.cosine_similarity(q, reference[layer], dim=0) < threshold
                expect = step % stride == 0 and bool(drift)
            assert full == expect, f"step {step}, layer {layer}"
            if full and step > 0:
                reference[layer] = q  # the next checks compare with this step's query
                refreshes += 1
    checks = N_LAYERS * len([s for s in range(1, len(rec.steps)) if s % stride == 0])
    assert 0 < refreshes < checks  # the rule fired at some checks, not at all of them
    assert rec.inner.layer_refreshes == refreshes
    assert rec.inner.full_steps == 1 and rec.inner.recycled_steps == len(rec.steps) - 1


def test_tokens_since_last_full_step_are_always_attended():
    model = tiny_model(dtype=torch.float32)
    policy = RecycledPolicy(RecycleConfig(k=3, stride=100), N_LAYERS)
    seen = []
    original = RecycledSet.attend

    def spy(self, pm, q, rot):
        seen.append(self.idx[0, 0, : self.n].tolist())
        return original(self, pm, q, rot)

    RecycledSet.attend = spy  # type: ignore[method-assign]
    try:
        decode(model, None, policy, n_prompt=70, new=8)
    finally:
        RecycledSet.attend = original  # type: ignore[method-assign]
    assert len(seen) == N_LAYERS * 6  # 7 decode forwards, the first full
    for i, idx in enumerate(seen):
        pos = 71 + i // N_LAYERS
        assert set(range(70, pos + 1)) <= set(idx)  # the full step's own token and every one since
        assert len(idx) == 3 + pos - 70 + 1 == len(set(idx))


def test_recycled_set_grows_past_its_capacity():
    """The dynamic schedule has no stride bound: the recycled buffers must grow, not overflow."""
    model = tiny_model(dtype=torch.float32)
    full, _, _ = decode(model, None, None, new=90, n_prompt=20)
    policy = RecycledPolicy(RecycleConfig(k=10_000, schedule="dynamic", threshold=-1.0), N_LAYERS)
    recycled, _, _ = decode(model, None, policy, new=90, n_prompt=20)
    assert policy.full_steps == 1 and recycled == full


# ---- the StreamingLLM baseline ------------------------------------------------------------------


def test_streaming_positions():
    assert streaming_positions(10, 20, 4) == list(range(10))
    assert streaming_positions(50, 20, 4) == [0, 1, 2, 3, *range(34, 50)]
    assert len(streaming_positions(1000, 64, 4)) == 64


class NaiveWindow(DecodePolicy):
    """Reference for the baseline: float64 attention over the first 4 keys and the last 16."""

    def attend_for(self, model, kv, step, pos):
        keep = list(range(4)) + list(range(pos + 1 - 16, pos + 1))
        return lambda layer, q, start: naive_attention(model, q, kv, layer, start, [keep] * model.n_kv_heads)


@pytest.mark.parametrize("layout", [None, ChunkLayout(24, 6)])
def test_streaming_baseline_is_four_sinks_and_a_recent_window_of_the_budget(layout):
    model = tiny_model(dtype=torch.float64)
    tokens, _, _ = decode(model, layout, StreamingPolicy(budget=20), kernel="reference")
    expected, _, _ = decode(model, layout, NaiveWindow(), kernel="reference")
    full, _, _ = decode(model, layout, None, kernel="reference")
    assert tokens == expected and tokens != full
