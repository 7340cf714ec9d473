"""Fidelity to the definitions (issue 24): the log-sum-exp merge's precision and range, DCA's inter-chunk
query index as ChunkLlama computes it, decode logits against a float64 recompute of the whole sequence
across DCA chunk crossings, and the attention temperature's length."""

from __future__ import annotations

import math

import pytest
import torch

from longdoc.attention.dca import ChunkLayout, key_positions, query_positions
from longdoc.attention.kernels import attend_cpu, attend_reference, merge_partials
from longdoc.config import RecycleConfig
from longdoc.engine.decode import decode_one_token
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import prefill
from longdoc.engine.recycled import RecycledPolicy

from .helpers import THETA, run_chunked, tiny_model

# ---- the log-sum-exp merge ----------------------------------------------------------------------


def merge64(parts):
    """The merge by its definition, in float64: softmax weights of the parts' LSEs."""
    outs = torch.stack([o.double() for o, _ in parts])
    lses = torch.stack([s.double() for _, s in parts])
    total = torch.logsumexp(lses, dim=0)
    return (torch.exp(lses - total).unsqueeze(-1) * outs).sum(0), total


def three_way_split(dtype, n=3000):
    """Attention of 4 queries over n keys, as three partial attentions in ``dtype`` (kernel outputs
    in that dtype, LSEs in float32 as the kernels give them)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, m, 64, dtype=torch.float64).to(dtype) for m in (4, n, n))
    bounds = [(0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n)]
    return [attend_cpu(q, k[:, :, a:b], v[:, :, a:b], False, 0.125) for a, b in bounds]


def test_merge_is_float32_accurate_for_float32_parts():
    parts = three_way_split(torch.float32)
    out, lse = merge_partials(parts)
    expected, expected_lse = merge64(parts)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=0)


def test_merge_of_bfloat16_parts_rounds_only_once():
    """The merged bfloat16 output is the float64 merge of the same parts rounded once to bfloat16: within
    half an ulp (2^-8 of the value). Weights rounded to bfloat16 on the way cost several ulps."""
    parts = three_way_split(torch.bfloat16)
    out, _ = merge_partials(parts)
    expected, _ = merge64(parts)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - expected).abs() <= 2**-8 * expected.abs()).all()


@pytest.mark.parametrize("level", [100.0, -120.0])
def test_merge_of_large_and_small_log_sum_exps(level):
    """exp(100) overflows float32 and exp(-120) underflows it: the merge must subtract the maximum."""
    torch.manual_seed(1)
    outs = [torch.randn(1, 2, 3, 8) for _ in range(3)]
    lses = [level + torch.randn(1, 2, 3) for _ in range(3)]
    parts = list(zip(outs, lses, strict=True))
    out, lse = merge_partials(parts)
    expected, expected_lse = merge64(parts)
    # float32 LSEs near +-100 are exact to ~4e-6: so are the weights
    torch.testing.assert_close(out.double(), expected, atol=3e-5, rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_row_with_every_part_empty_is_zero(dtype):
    """A query row no part has a key for (every LSE -inf) merges to output 0 and LSE -inf, not NaN; the
    other rows are unaffected."""
    torch.manual_seed(2)
    parts = []
    for _ in range(3):
        out, lse = torch.randn(1, 2, 3, 8, dtype=dtype), torch.randn(1, 2, 3, dtype=dtype)
        out[:, :, 1], lse[:, :, 1] = 0.0, float("-inf")  # row 1: no keys in any part
        parts.append((out, lse))
    out, lse = merge_partials(parts)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :, 1] == 0).all() and (lse[:, :, 1] == float("-inf")).all()
    expected, expected_lse = merge64([(o[:, :, ::2], s[:, :, ::2]) for o, s in parts])
    torch.testing.assert_close(out[:, :, ::2].double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse[:, :, ::2].double(), expected_lse, atol=1e-6, rtol=0)


# ---- DCA by its definition (ChunkLlama's code) ----------------------------------------------------


def chunkllama_query_index(pos: int, key: int, layout: ChunkLayout | None) -> int:
    """The rotation index of a query at ``pos`` against a key at ``key`` as ChunkLlama computes it
    (chunkllama_attn_replace.py): ``pos mod c`` in its own chunk, the clamped table
    ``min(pos mod c + c, s)`` for the previous chunk, and that table's entry for ``c - 1`` further back."""
    if layout is None:
        return pos
    c, s = layout.chunk_len, layout.chunk_size
    gap = pos // c - key // c
    successive = [min(i + c, s) for i in range(c)]
    return pos % c if gap == 0 else successive[pos % c] if gap == 1 else successive[c - 1]


def test_inter_chunk_query_index_follows_chunkllama():
    """Below the local window the inter index is s (DESIGN.md); with w >= c it is 2c - 1, not s."""
    for layout in (ChunkLayout(10, 4), ChunkLayout(10, 8), ChunkLayout(12, 6), ChunkLayout(9, 0)):
        pos = torch.arange(2 * layout.chunk_len, 60)  # two chunks or more past the key at 0
        _, _, inter = query_positions(pos, layout)
        assert inter.tolist() == [chunkllama_query_index(p, 0, layout) for p in pos.tolist()]
    _, _, inter = query_positions(torch.tensor([10]), ChunkLayout(10, 8))  # c = 2
    assert inter.tolist() == [3]


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., n, D) rotated at positions (n,), "rotate half" RoPE in float64. ``inv_freq``: a model's
    frequencies, whose cos and sin tables are then rounded to float32 as transformers rounds them (so
    does longdoc, to give the model's numbers); by default base THETA's, in float64 throughout."""
    d = x.shape[-1]
    table = torch.float64 if inv_freq is None else torch.float32
    if inv_freq is None:
        inv_freq = 1.0 / THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv_freq.double()
    cos, sin = (torch.cat([f, f], -1).to(table).double() for f in (ang.cos(), ang.sin()))
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def naive_attention(q, k, v, layout, scale, inv_freq=None):
    """Causal DCA attention, q (H, L, D) and k, v (Hkv, L, D) before RoPE, every (query, key) score with
    its own pair of rotations (ChunkLlama's indices), materialized in float64 -> (H, L, D)."""
    h, n, _ = q.shape
    g = h // k.shape[0]
    keys = rope(k, key_positions(torch.arange(n), layout), inv_freq).repeat_interleave(g, 0)
    values = v.repeat_interleave(g, 0)
    out = torch.empty_like(q)
    for i in range(n):
        qpos = torch.tensor([chunkllama_query_index(i, j, layout) for j in range(i + 1)])
        queries = rope(q[:, i : i + 1].expand(h, i + 1, -1), qpos, inv_freq)
        p = torch.softmax((queries * keys[:, : i + 1]).sum(-1) * scale, dim=-1)
        out[:, i] = (p.unsqueeze(-1) * values[:, : i + 1]).sum(1)
    return out


@torch.no_grad()
def recompute_logits(model, ids: torch.Tensor, layout: ChunkLayout | None) -> torch.Tensor:
    """Logits (L, V) of every position of ``ids`` (1, L) from the model's own modules, with the attention
    computed by ``naive_attention``: an independent float64 recompute of the whole sequence. RoPE is the
    model's: its frequencies and float32 tables (float64 ones would move the logits by ~1e-6)."""
    n = ids.shape[1]
    inv_freq = model.model.rotary_emb.inv_freq
    h = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)
        q, k, v = (
            proj(x)[0].view(n, -1, attn.head_dim).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        o = naive_attention(q, k, v, layout, attn.scaling, inv_freq)
        h = h + attn.o_proj(o.transpose(0, 1).reshape(1, n, -1))
        h = h + mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))[0]


@pytest.mark.parametrize("kernel", [attend_reference, attend_cpu])
@pytest.mark.parametrize("layout", [ChunkLayout(10, 8), ChunkLayout(12, 6)])
def test_dca_prefill_with_a_local_window_beyond_the_chunk_length(kernel, layout):
    """w >= c (allowed by the layout rule): the production path equals ChunkLlama's indices in float64."""
    torch.manual_seed(3)
    q = torch.randn(4, 29, 8, dtype=torch.float64)
    k, v = torch.randn(2, 29, 8, dtype=torch.float64), torch.randn(2, 29, 8, dtype=torch.float64)
    for step in (1, 5, 100):
        got = run_chunked(q, k, v, layout, THETA, kernel, step)
        torch.testing.assert_close(got, naive_attention(q, k, v, layout, 8**-0.5), atol=1e-10, rtol=0)


@pytest.mark.parametrize("recycled", [False, True])
@pytest.mark.parametrize("layout", [None, ChunkLayout(16, 4), ChunkLayout(12, 8)])
def test_decode_logits_equal_a_float64_recompute(layout, recycled):
    """Every decode step's logits, greedy from a prefill whose prompt ends mid-chunk, equal the float64
    recompute of the whole sequence at that position within 1e-10, while decoding crosses DCA chunk
    boundaries (c = 12: at 36 and 48; c = 4 with w = 8 >= c: every 4 tokens). Recycled decoding with K
    covering the context must give the same numbers."""
    model = tiny_model(dtype=torch.float64)
    pm = LongModel(model, AttentionSettings(layout, attend_cpu))
    n_prompt, new = 30, 24
    ids = torch.randint(0, 256, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    kv = pm.new_cache(n_prompt + new)
    policy = RecycledPolicy(RecycleConfig(k=10_000, stride=5), 3) if recycled else None
    got = [prefill(pm, ids, kv, step=8)[0]]
    seq = ids[0].tolist()
    for step in range(new):
        pos = len(seq)
        seq.append(int(got[-1].argmax()))
        attend = policy.attend_for(pm, kv, step, pos) if policy else None
        got.append(decode_one_token(pm, seq[-1], pos, kv, attend)[0])
    assert len(set(seq[n_prompt:])) > 3  # the tiny model does not collapse onto one token
    expected = recompute_logits(model, torch.tensor([seq]), layout)[n_prompt - 1 :]
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-10, rtol=0)
    if policy is not None:
        assert policy.recycled_steps > 0


# ---- the attention temperature ------------------------------------------------------------------


def test_attention_temperature_follows_the_prompt_length_only(monkeypatch):
    """(0.1 ln(L/W) + 1)^2 on the logits with L the prompt: the answer budget does not change it."""
    from longdoc.config import DCAConfig, GenerationConfig, RunConfig
    from longdoc.runtime import plan
    from longdoc.runtime.plan import make_plan

    from .helpers import info

    monkeypatch.setattr(plan, "check_memory", lambda plan, device: None)  # whatever RAM is free now

    def scale(prompt, new):
        cfg = RunConfig(dca=DCAConfig(temperature=True), generation=GenerationConfig(max_new_tokens=new))
        return make_plan(cfg, info(), prompt).logit_scale

    window = info().window
    assert scale(2 * window, 0) == scale(2 * window, 4000) == pytest.approx((0.1 * math.log(2) + 1) ** 2)
    assert scale(window - 100, 4000) == 1.0  # DCA on for the answer's room, but the prompt fits the window
