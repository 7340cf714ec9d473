"""The Q8_0 kernel's gemm (``Q8Matmul.gemm``, ``longdoc_q8_gemm`` in q8.c): prefill's many-row products on
16-bit activations. Its scalar and AVX2 loops against the float64 reference and each other, on sizes that
leave every tail of its tiles (4 activation rows, 16 weight rows) and of a group of 8; the ISA cap's hold
on it; and prefill's linears taking it where it is fast."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from longdoc import native
from longdoc.native import q8
from longdoc.quant import schemes

from .test_q8 import COMBOS, activations, needs_q8, weight
from .test_q8 import tolerance as q8_tolerance

KS = [32, 96, 896, 4864]
NS = [1, 7, 8, 9, 16, 17, 151, 1152]
MS = [1, 2, 3, 4, 5, 7, 9, 33]


def tolerance(terms: torch.Tensor, want: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """test_q8's bound, with one rounding more per term: a block's int32 sum reaches 32 * 32767 * 127 >
    2^24 with 16-bit codes, so turning it into float rounds, by at most 2^-24 of itself."""
    return q8_tolerance(terms, want, bias, dtype, extra=1)


def gemm_levels() -> list[int]:
    return [q8.SCALAR] + ([q8.AVX2] if q8.gemm_fast() else [])


@needs_q8
@pytest.mark.parametrize("k", KS)
def test_every_gemm_loop_matches_the_float64_reference_and_the_scalar_loop_bit_for_bit(k):
    """1 to 33 activation rows (every tail of a tile of 4), 1 to 1152 weight rows (every tail of a pair of
    groups and of a group), 1 to 152 blocks, each input and output dtype, bias and thread count: within the
    arithmetic's tolerance of the float64 reference on 16-bit activation codes, and the AVX2 loop equal to
    the scalar one bit for bit."""
    combos = itertools.cycle(COMBOS)
    for n in NS:
        w = weight(n, k, seed=n * k + 1)
        qs, scales = q8.quantize_q8(w)
        packed = q8.pack(qs, scales)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n + 1))
        for m in MS:
            x_dtype, dtype, with_bias, threads = next(combos)
            b = bias if with_bias else None
            x = activations(m, k, seed=m * 7 + n + k).to(x_dtype)
            terms = q8.reference_terms(x, qs, scales, q8.TOP16)
            want = terms.sum(-1) + (0 if b is None else b.double())
            assert torch.equal(want, q8.reference_q8_matmul(x, qs, scales, b, top=q8.TOP16))
            tol = tolerance(terms, want, b, dtype)
            outs = []
            for level in gemm_levels():
                out = q8.Q8Matmul(packed, k, n, b, level=level).gemm(x, dtype, threads=threads)
                assert out.shape == (m, n) and out.dtype == dtype
                assert ((out.double() - want).abs() <= tol).all(), (level, n, m, x_dtype, dtype, with_bias, threads)
                if n > 1:
                    assert (out[:, n // 2] == (0 if b is None else b[n // 2].to(dtype))).all()  # the zero row
                outs.append(out)
            for out in outs[1:]:
                assert torch.equal(out, outs[0]), (n, m, x_dtype, dtype, with_bias, threads)


@needs_q8
def test_gemm_activations_are_quantized_per_block_to_16_bits():
    """Against the unquantized inputs the gemm's error is the weights' Q8_0 rounding and, per block, half
    a 16-bit step of the activations: 256 times finer than the decode matmul's 8-bit step."""
    k, n, m = 896, 24, 5
    w = weight(n, k, seed=11)
    qs, scales = q8.quantize_q8(w)
    x = activations(m, k, seed=12)
    codes, sx = q8.quantize_activations(x, q8.TOP16)
    assert codes.abs().max() == q8.TOP16 and torch.equal(codes, codes.round())
    dense = x.double() @ q8.dequantize_q8(qs, scales).T
    xerr = (sx.double().unsqueeze(-1) / 2).expand(-1, -1, 32).reshape(m, k)
    bound = xerr @ q8.dequantize_q8(qs, scales).abs().T + 1e-5
    for level in gemm_levels():
        out = q8.Q8Matmul(q8.pack(qs, scales), k, n, None, level=level).gemm(x, torch.float32)
        assert ((out.double() - dense).abs() <= bound).all()
        # and well inside what the 8-bit matmul is allowed
        assert (out.double() - dense).abs().max() < 0.05 * (
            q8.Q8Matmul(q8.pack(qs, scales), k, n, None)(x, torch.float32).double() - dense
        ).abs().max()


@needs_q8
def test_the_isa_cap_turns_the_gemms_avx2_loop_off(monkeypatch):
    """Under LONGDOC_ISA=none the gemm's AVX2 loop does not run (its scalar one does, and prefill unpacks
    the weights instead); asking the library for a loop it does not have is refused."""
    for var in ("LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    fast = q8.gemm_fast()
    assert fast == (q8.AVX2 in q8.paths() and bool(native.library("q8").longdoc_q8_gemm_fast()))
    monkeypatch.setenv("LONGDOC_ISA", "none")
    assert not q8.gemm_fast()
    qs, scales = q8.quantize_q8(torch.randn(8, 64))
    matmul = q8.Q8Matmul(q8.pack(qs, scales), 64, 8, None)
    assert not matmul.gemm_fast
    lib = native.library("q8")
    x, out = torch.randn(2, 64), torch.empty(2, 8)
    packed = matmul.packed
    call = (x.data_ptr(), 0, 2)
    for level in (q8.NEON, q8.NEON_DOT, 9):
        assert lib.longdoc_q8_gemm(*call, 64, packed.data_ptr(), 8, None, out.data_ptr(), 0, 1, level, 8) == 1
    assert lib.longdoc_q8_gemm(*call, 48, packed.data_ptr(), 8, None, out.data_ptr(), 0, 1, 1, 8) == 1
    with pytest.raises(RuntimeError, match=r"rows \(M, 64\)"):
        matmul.gemm(torch.randn(2, 32), torch.float32)


@needs_q8
@pytest.mark.parametrize("fast", [True, False])
def test_prefill_linears_take_the_gemm_where_it_is_fast_and_unpack_elsewhere(monkeypatch, fast):
    """A q8 linear's many-row input (prefill) goes through the gemm where its AVX2 loop runs, and through
    the weight unpacked for a float32 matmul elsewhere; both are the weight-only model, up to the
    activations' 16-bit rounding."""
    if fast and not q8.gemm_fast():
        pytest.skip("the gemm's AVX2 loop does not run here")
    monkeypatch.setattr(q8.Q8Matmul, "gemm_fast", property(lambda self: fast and self.level in (q8.AVX2, q8.VNNI)))
    g = torch.Generator().manual_seed(5)
    dense = nn.Linear(96, 40)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(40, 96, generator=g) * 0.1)
    qs, scales = q8.quantize_q8(dense.weight)
    gemm = schemes.QuantGemm("q8", [qs], [scales], [dense.bias], torch.float32)
    layer = schemes.QuantLinear(None, "q8", qs, scales, dtype=torch.float32, max_rows=2, gemm=gemm)
    x = torch.randn(1, 9, 96, generator=g)
    got = layer(x)
    weight = q8.dequantize_q8(qs, scales).float()
    unpacked = nn.functional.linear(x, weight, dense.bias)
    if fast:
        assert torch.equal(got.view(9, 40), layer.gemm.q8.gemm(x.view(9, 96), torch.float32))
        assert not torch.equal(got, unpacked)
    else:
        assert torch.equal(got, unpacked)
    torch.testing.assert_close(got, unpacked, rtol=1e-4, atol=1e-4)


def glu_tolerance(
    x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
):
    """How far ``glu`` may be from ``reference_glu``: each product within the gemm's bound (``tolerance``),
    carried through silu (|silu'| <= 1.1) and the product; then silu's own rounding (its exp within 2 ulp,
    an addition, a division and the product: 2^-20 of the output covers them), and a bfloat16 output's."""
    terms = q8.reference_terms(x, qs, scales, q8.TOP16)
    both = terms.sum(-1) + (0 if bias is None else bias.double())
    tol = tolerance(terms, both, bias, torch.float32)
    (gate, up), (tg, tu) = both.chunk(2, dim=-1), tol.chunk(2, dim=-1)
    want = q8.reference_silu(gate) * up
    bound = 1.1 * tg * (up.abs() + tu) + q8.reference_silu(gate).abs() * tu + 2.0**-20 * want.abs() + 1e-30
    if dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (want.abs() + bound)
    return want, bound


@needs_q8
@pytest.mark.parametrize("k", [32, 896, 4864])
def test_every_glu_loop_matches_the_float64_reference_and_the_scalar_loop_bit_for_bit(k):
    """silu(gate) * up in one call, gate and up the weight's two halves of rows: every row count's tail,
    widths of one group to the model's 4864, each dtype, bias and thread count, gates large enough to
    reach exp's clamp (activations x 40); within the bound of ``glu_tolerance`` and the AVX2 loop equal to
    the scalar one bit for bit."""
    combos = itertools.cycle(COMBOS)
    for f in [8, 24, 4864] if k < 4864 else [8, 40]:
        w = weight(2 * f, k, seed=f + k)
        qs, scales = q8.quantize_q8(w)
        packed = q8.pack(qs, scales)
        bias = torch.randn(2 * f, generator=torch.Generator().manual_seed(f))
        for m in [1, 3, 4, 5, 9]:
            x_dtype, dtype, with_bias, threads = next(combos)
            b = bias if with_bias else None
            x = (activations(m, k, seed=m + f + k) * (40 if m == 5 else 1)).to(x_dtype)
            want, bound = glu_tolerance(x, qs, scales, b, dtype)
            outs = []
            for level in gemm_levels():
                out = q8.Q8Matmul(packed, k, 2 * f, b, level=level).glu(x, dtype, threads=threads)
                assert out.shape == (m, f) and out.dtype == dtype
                assert ((out.double() - want).abs() <= bound).all(), (level, f, m, x_dtype, dtype, with_bias, threads)
                outs.append(out)
            for out in outs[1:]:
                assert torch.equal(out, outs[0]), (f, m, x_dtype, dtype, with_bias, threads)
    matmul = q8.Q8Matmul(packed, k, 2 * f, None)
    with pytest.raises(RuntimeError, match=r"rows \(M, "):
        matmul.glu(torch.randn(2, k + 32), torch.float32)
    odd = q8.quantize_q8(torch.randn(24, k))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        q8.Q8Matmul(q8.pack(*odd), k, 24, None).glu(torch.randn(2, k), torch.float32)


@needs_q8
def test_a_prefill_steps_mlp_runs_gate_and_up_as_one_glu_call(monkeypatch):
    """With q8 the only copy, a prefill step's MLP hands its rows to one glu call per layer (the gate and
    up products never stored) and gives what the two linears and torch's silu give, up to silu's own
    rounding; where the gemm does not fuse, the two linears run."""
    if not q8.gemm_fast():
        pytest.skip("the gemm's AVX2 loop does not run here")
    from .helpers import tiny_model
    from .test_engine import patched
    from .test_quant import quantized_tensors

    torch.manual_seed(0)
    model = tiny_model("qwen2", dtype=torch.float32)
    schemes.quantize_linears(model, "q8", quantized_tensors(model, "q8"), keep_dense=False)
    pm = patched(model)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    calls: list[int] = []
    real = schemes.QuantGemm.glu

    def counted(self, rows):
        calls.append(rows.shape[0])
        return real(self, rows)

    monkeypatch.setattr(schemes.QuantGemm, "glu", counted)
    fused = pm.hidden_states(ids, 0, pm.new_cache(40))
    assert calls == [40] * len(pm.layers)
    monkeypatch.setattr(schemes.QuantGemm, "fuses_glu", property(lambda self: False))
    plain = pm.hidden_states(ids, 0, pm.new_cache(40))
    assert calls == [40] * len(pm.layers)  # no more calls
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))
    # one row (a decode step) never goes through it
    assert pm.layers[0].mlp.gate_proj.glu_with(pm.layers[0].mlp.up_proj, torch.randn(1, 1, 64)) is None
