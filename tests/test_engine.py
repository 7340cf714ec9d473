"""The patched model, prefill and decode on tiny random models, against transformers' own forward."""

from __future__ import annotations

import pytest
import torch

from longdoc.attention.dca import ChunkLayout, key_positions
from longdoc.attention.kernels import get_kernel
from longdoc.config import GenerationConfig
from longdoc.engine.decode import generate
from longdoc.engine.longmodel import AttentionSettings, LongModel
from longdoc.engine.prefill import prefill
from longdoc.engine.sampling import sample
from longdoc.models.decoder import rms_norm

from .helpers import tiny_model

CPU = torch.device("cpu")


def patched(model, layout=None, kernel="cpu"):
    return LongModel(model, AttentionSettings(layout, get_kernel(kernel, CPU)))


def every_logit(pm, ids, step, layout=None):
    kv = pm.new_cache(ids.shape[1])
    from longdoc.attention.dca import chunk_steps

    out = [pm.logits(pm.hidden_states(ids[:, a:b], a, kv))[0] for a, b in chunk_steps(0, ids.shape[1], step, layout)]
    return torch.cat(out), kv


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_plain_attention_equals_transformers(family, kernel):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits[0].double()
    got, _ = every_logit(patched(model, None, kernel), ids, step=8)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)  # HF rounds RoPE angles in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_rms_norm_equals_the_models_module(family, dtype):
    """The layer loop's norm gives the module's numbers bit for bit, on the model's own norms (their
    weights made non-trivial) and hidden states with a few large channels."""
    model = tiny_model(family, dtype=dtype)
    norm = model.model.layers[1].post_attention_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.1, 3.0, norm.weight.shape[0]))
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(0)).to(dtype) * 4
    x[..., 3] *= 50
    assert torch.equal(rms_norm(norm, x), norm(x))


def test_dca_in_one_chunk_equals_transformers(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    layout = ChunkLayout(48, 8)  # c = 40 = L
    got, _ = every_logit(patched(model, layout), ids, step=7, layout=layout)
    torch.testing.assert_close(got, model(ids).logits[0].double(), atol=2e-5, rtol=0)


def test_dca_differs_from_plain_across_chunks():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    layout = ChunkLayout(16, 4)
    dca, _ = every_logit(patched(model, layout), ids, step=5, layout=layout)
    plain, _ = every_logit(patched(model), ids, step=5)
    torch.testing.assert_close(dca[:12], plain[:12], atol=1e-9, rtol=0)  # first chunk: identical
    assert (dca[30:] - plain[30:]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", [None, ChunkLayout(16, 4), ChunkLayout(11, 3)])
def test_prefill_step_size_does_not_change_results(layout):
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(3))
    pm = patched(model, layout)
    a, _ = every_logit(pm, ids, step=50, layout=layout)
    b, _ = every_logit(pm, ids, step=3, layout=layout)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("layout", [None, ChunkLayout(16, 4)])
def test_decode_after_prefill_equals_recompute(layout):
    """Greedy tokens from prefill + one-token decode steps equal re-running the whole sequence."""
    model = tiny_model()
    pm = patched(model, layout)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    kv = pm.new_cache(60)
    logits = prefill(pm, ids, kv, step=8)
    tokens = list(generate(pm, logits, 30, kv, GenerationConfig(max_new_tokens=20), set()))
    assert len(set(tokens)) > 3  # the tiny model does not collapse to one token
    seq = ids[0].tolist()
    for t in tokens:
        full, _ = every_logit(pm, torch.tensor([seq]), step=64, layout=layout)
        assert int(full[-1].argmax()) == t
        seq.append(t)


def test_cached_keys_are_rotated_at_dca_key_positions():
    model = tiny_model()
    layout = ChunkLayout(10, 4)  # c = 6
    pm = patched(model, layout)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    _, kv = every_logit(pm, ids, step=6, layout=layout)
    # recompute layer 0's keys by hand: project, rotate at p mod c
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    k = attn.k_proj(x).view(1, 20, -1, pm.head_dim).transpose(1, 2)
    pos = torch.arange(20)
    expected = pm.rope.rotate(k, pos % 6)
    torch.testing.assert_close(kv.k[0][:, :, :20], expected, atol=1e-12, rtol=0)
    assert key_positions(pos, layout).max() == 5
    # and a key at position 6 is rotated exactly like the key at position 0 would be
    torch.testing.assert_close(pm.rope.rotate(k[:, :, 6:7], pos[6:7] % 6), pm.rope.rotate(k[:, :, 6:7], pos[:1]))


def test_sampling_greedy_and_seeded():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, 0.0, 1.0, None) == 1
    draws = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    # top-p small enough keeps only the best token
    assert {sample(logits, 1.0, 0.3, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    spread = {sample(logits, 5.0, 1.0, torch.Generator().manual_seed(s)) for s in range(50)}
    assert len(spread) > 2


def test_generation_stops_on_stop_id_and_budget():
    model = tiny_model()
    pm = patched(model)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))
    kv = pm.new_cache(40)
    logits = prefill(pm, ids, kv, step=12)
    tokens = list(generate(pm, logits, 12, kv, GenerationConfig(max_new_tokens=8), set()))
    assert len(tokens) == 8
    kv = pm.new_cache(40)
    logits = prefill(pm, ids, kv, step=12)
    stopped = list(generate(pm, logits, 12, kv, GenerationConfig(max_new_tokens=8), {tokens[2]}))
    assert stopped == tokens[: tokens.index(tokens[2])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_give_identical_outputs(dtype):
    from longdoc.quant.packing import PackedLinear, can_pack, pack_linears

    model = tiny_model(dtype=dtype)
    if not can_pack(model):
        pytest.skip("oneDNN packing unavailable")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(8))
    before, _ = every_logit(patched(model), ids, step=7)
    assert pack_linears(model) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert isinstance(model.lm_head, PackedLinear)
    after, _ = every_logit(patched(model), ids, step=7)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # oneDNN may sum in another order


@pytest.mark.parametrize("layout", [None, ChunkLayout(chunk_size=24, local_window=6)])
def test_a_16_bit_kv_cache_decodes_through_attn16_close_to_float32(layout, monkeypatch):
    """A float32 model over a float16 KV cache (what float32 runs keep): prefill widens the cache's
    keys and values for torch's kernel, and each decode step's one query row runs ``attn16.c`` (every
    DCA region of it); logits stay within the cache's float16 rounding of the float32 cache's, and the
    greedy tokens are the same."""
    from longdoc.native import attn16

    if not attn16.paths():
        pytest.skip("the attn16 kernel is not available here")
    calls = []
    real = attn16.attend16

    def counted(*args, **kwargs):
        calls.append(args[1].dtype)
        return real(*args, **kwargs)

    def counted_step(self, q, k, v, a, b):  # a decode step's calls, checked once per step
        calls.append(k.dtype)
        return real_step(self, q, k, v, a, b)

    real_step = attn16.CacheAttention.__call__
    monkeypatch.setattr(attn16, "attend16", counted)
    monkeypatch.setattr(attn16.CacheAttention, "__call__", counted_step)
    model = tiny_model("qwen2", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    gen = GenerationConfig(max_new_tokens=12)
    runs = {}
    for kv_dtype in (None, torch.float16):
        pm = LongModel(model, AttentionSettings(layout, get_kernel("cpu", CPU), kv_dtype=kv_dtype))
        kv = pm.new_cache(80)
        assert kv.k[0].dtype == (kv_dtype or torch.float32)
        logits = prefill(pm, ids, kv, 16)
        runs[kv_dtype] = (logits, list(generate(pm, logits, 60, kv, gen, set())))
    (want, want_tokens), (got, got_tokens) = runs[None], runs[torch.float16]
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert got_tokens == want_tokens
    # 11 decode steps x 3 layers, one call per DCA region: all on the float16 cache
    assert len(calls) >= 11 * 3 and set(calls) == {torch.float16}


def test_a_prefill_steps_mlp_runs_in_slices_of_rows_with_the_same_result(monkeypatch):
    """The MLP of a long prefill step runs ``MLP_ROWS`` rows at a time (bounded intermediates): every
    row's hidden state is what one call over all rows gives."""
    from longdoc.models import decoder

    model = tiny_model("qwen2")  # float64
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(4))
    pm = patched(model)
    whole = pm.hidden_states(ids, 0, pm.new_cache(23))
    monkeypatch.setattr(decoder, "MLP_ROWS", 5)
    calls = []
    real = decoder.Decoder.feed_forward

    def counted(mlp, x, *rest):
        calls.append(x.shape[1])
        return real(mlp, x, *rest)

    monkeypatch.setattr(decoder.Decoder, "feed_forward", staticmethod(counted))
    sliced = pm.hidden_states(ids, 0, pm.new_cache(23))
    torch.testing.assert_close(sliced, whole, rtol=1e-12, atol=1e-12)
    assert max(calls) == 23 and 5 in calls and 3 in calls  # 23 rows: 4 slices of 5, one of 3
