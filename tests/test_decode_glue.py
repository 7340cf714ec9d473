"""A decode step's lean path against the general one: ``Decoder.walk_row`` (one token) against
``walk_rows``, decode steps against a float64 forward over the whole sequence (with and without DCA),
``attn16.CacheAttention`` against ``attn16.attend16`` on views of the cache, the step's key rotations
against the table's lookup, the final norm left to the LM head, and greedy choice against
``torch.argmax``."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from longdoc import native
from longdoc.attention.dca import ChunkLayout, chunk_steps, key_positions, query_positions
from longdoc.attention.kernels import get_kernel
from longdoc.config import GenerationConfig
from longdoc.engine.decode import generate
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import prefill
from longdoc.engine.sampling import greedy
from longdoc.models.decoder import rms_norm
from longdoc.native import attn16

from .helpers import tiny_model

CPU = torch.device("cpu")
# c = 20: decode steps past position 40 attend over three DCA regions
LAYOUTS = [None, ChunkLayout(24, 4)]

needs_attn16 = pytest.mark.skipif(not native.likely_available("attn16"), reason="no C compiler or CPU flags here")


def long_model(model: torch.nn.Module, layout: ChunkLayout | None, kv_dtype: torch.dtype | None = None) -> LongModel:
    return LongModel(model, AttentionSettings(layout, get_kernel("cpu", CPU), kv_dtype=kv_dtype))


@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "dca"])
def test_decode_steps_equal_a_forward_over_the_whole_sequence(family, layout):
    """float64: each decode step's logits (``walk_row``, ``step_attend``, the final norm on the last row
    alone) are those of the same position in prefill steps over the whole sequence (``walk_rows``)."""
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 62), generator=torch.Generator().manual_seed(5))
    n = 44
    pm = long_model(model, layout)
    whole = pm.new_cache(ids.shape[1])
    want = torch.cat(
        [pm.logits(pm.hidden_states(ids[:, a:b], a, whole))[0] for a, b in chunk_steps(0, ids.shape[1], 9, layout)]
    )
    kv = pm.new_cache(ids.shape[1])
    prefill(pm, ids[:, :n], kv, 16)
    got = torch.cat([pm.forward(ids[:, p : p + 1], p, kv) for p in range(n, ids.shape[1])])
    torch.testing.assert_close(got, want[n:], rtol=1e-10, atol=1e-10)
    for layer in range(len(pm.layers)):  # the steps' keys and values went where prefill put them
        torch.testing.assert_close(kv.k[layer], whole.k[layer], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kv.v[layer], whole.v[layer], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walk_row_gives_the_numbers_of_walk_rows_for_one_token(dtype):
    """The one-token loop and the general loop, from the same cache, write the same keys and values and
    return the same hidden states, bit for bit."""
    model = tiny_model("qwen2", dtype=dtype)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    pm = long_model(model, None)
    kv = pm.new_cache(31)
    prefill(pm, ids, kv, 16)
    token = torch.tensor([[7]])
    results = []
    for walk in (pm.walk_row, pm.walk_rows):
        store = copy.deepcopy(kv)
        cos, sin = pm.key_rotations(30, 1)
        with torch.inference_mode():
            h = walk(model.model.embed_tokens(token), 30, store, pm.step_attend(store, 30), cos, sin)
        results.append((h, store))
    (h_row, kv_row), (h_rows, kv_rows) = results
    assert h_row.shape == (1, 1, model.config.hidden_size)
    assert torch.equal(h_row, h_rows)
    for layer in range(len(pm.layers)):
        assert torch.equal(kv_row.k[layer][:, :, :31], kv_rows.k[layer][:, :, :31])
        assert torch.equal(kv_row.v[layer][:, :, :31], kv_rows.v[layer][:, :, :31])


@needs_attn16
@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "dca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_steps_over_a_16_bit_cache_call_attn16_directly_with_attend_cpus_numbers(layout, dtype, monkeypatch):
    """A float32 run over a float16 cache, and a bfloat16 run over a bfloat16 one (its queries widened to
    float32 for the kernel): the steps' attention goes to ``attn16.CacheAttention`` (each DCA region once
    per layer), and gives the logits and tokens that ``attend_cpu``'s calls of ``attend16`` give, bit for
    bit."""
    if not attn16.paths():
        pytest.skip("the attn16 kernel is not available here")
    model = tiny_model("qwen2", dtype=dtype)
    cache = torch.float16 if dtype == torch.float32 else torch.bfloat16
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(3))
    gen = GenerationConfig(max_new_tokens=14)
    direct_calls = []
    real_call = attn16.CacheAttention.__call__

    def counted(self, q, k, v, a, b):
        direct_calls.append((a, b))
        return real_call(self, q, k, v, a, b)

    def run() -> tuple[list[torch.Tensor], list[int]]:
        pm = long_model(model, layout, cache)
        kv = pm.new_cache(70)
        logits = prefill(pm, ids, kv, 16)
        steps = [pm.forward(torch.tensor([[t]]), 50 + i, kv) for i, t in enumerate([3, 99, 41])]
        kv = pm.new_cache(70)
        logits = prefill(pm, ids, kv, 16)
        return steps, list(generate(pm, logits, 50, kv, gen, set()))

    monkeypatch.setattr(attn16.CacheAttention, "__call__", counted)
    direct, direct_tokens = run()
    assert len(direct_calls) >= 16 * 3 * (1 if layout is None else 3)
    monkeypatch.setattr(LongModel, "cache_attention", lambda self, kv: None)
    direct_calls.clear()
    kernel, kernel_tokens = run()
    assert not direct_calls
    for a, b in zip(direct, kernel, strict=True):
        assert torch.equal(a, b)
    assert direct_tokens == kernel_tokens and len(set(direct_tokens)) > 3


@needs_attn16
def test_cache_attention_equals_attend16_on_views_and_refuses_other_layouts():
    if not attn16.paths():
        pytest.skip("the attn16 kernel is not available here")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 90, 64, generator=g).half()
    v = torch.randn(1, 2, 90, 64, generator=g).half()
    other_k, other_v = k.flip(2).contiguous(), v.flip(2).contiguous()  # another layer, laid out alike
    direct = attn16.CacheAttention(14, k, v, 0.125)
    for a, b in [(0, 90), (0, 1), (17, 60), (89, 90), (40, 40)]:
        q = torch.randn(1, 14, 1, 64, generator=g)
        for kk, vv in ((k, v), (other_k, other_v)):
            out, lse = direct(q, kk, vv, a, b)
            want_out, want_lse = attn16.attend16(q, kk[:, :, a:b], vv[:, :, a:b], None, 0.125)
            assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    q = torch.randn(1, 14, 1, 64, generator=g)
    for bad in [
        (q[:, :7], k, v, 0, 5),  # other heads
        (q.double(), k, v, 0, 5),
        (torch.randn(1, 14, 1, 128)[..., ::2], k, v, 0, 5),  # not contiguous
        (q, k[:, :, :50], v[:, :, :50], 0, 5),  # another shape
        (q, k.float(), v.float(), 0, 5),
        (q, k, v, 5, 4),
        (q, k, v, 0, 91),
    ]:
        with pytest.raises(ValueError):
            direct(*bad)
    with pytest.raises(ValueError):
        attn16.CacheAttention(14, k.float(), v.float(), 0.125)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "dca"])
def test_step_rotations_are_the_tables_rows_at_the_key_and_query_positions(layout):
    """The keys' rotations (``key_rotations``: sliced where the positions run on) and a decode step's
    query rotations (``query_rotations``) are the table's rows at their positions."""
    pm = long_model(tiny_model("qwen2"), layout)
    for start, length in [(0, 1), (5, 1), (19, 1), (20, 1), (61, 1), (0, 16), (16, 4), (15, 10), (37, 9)]:
        positions = key_positions(torch.arange(start, start + length), layout)
        top = start + length if layout is None else layout.chunk_len
        want = pm.rope.angles(positions, top=top)
        got = pm.key_rotations(start, length)
        for g_, w in zip(got, want, strict=True):
            assert g_.dtype == pm.dtype and torch.equal(g_, w)
    for pos in [0, 7, 19, 20, 45, 130]:
        p = torch.tensor([pos])
        rows = p if layout is None else torch.cat(query_positions(p, layout))
        want = pm.rope.angles(rows)
        for dtype in (None, torch.float32):
            got = pm.query_rotations(pos, dtype)
            for g_, w in zip(got, want, strict=True):
                assert g_.shape == (rows.shape[0], pm.head_dim) and torch.equal(g_, w.to(dtype or pm.dtype))


def test_last_logits_normalize_the_last_row_as_the_final_norm_does(family):
    model = tiny_model(family)
    pm = long_model(model, None)
    h = torch.randn(1, 5, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = pm.logits(rms_norm(model.model.norm, h))[:, -1]
    got = pm.last_logits(h)
    assert got.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_greedy_is_torch_argmax_ties_nans_and_all():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g)
    cases = [x, x.double(), x.bfloat16(), x[::3], torch.full((9,), -math.inf), torch.zeros(4)]
    tied = x.clone()
    tied[[17, 4000]] = 50.0
    nan = x.clone()
    nan[[300, 20]] = math.nan
    cases += [tied, nan, torch.randn(2, 700, generator=g)[:, 5]]
    for logits in cases:
        assert greedy(logits) == int(torch.argmax(logits))
    assert greedy(tied) == 17 and greedy(nan) == 20
