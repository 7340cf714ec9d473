"""The Q8_0 kernel's 5-bit layout (``q8.pack(..., bits=5)``, q8.c): weights whose codes lie in -16..15
(llama.cpp's Q5_0 grid, ``q8.quantize_q5``) packed in 176 bytes a block instead of 272. Every path that
takes it (scalar, AVX2, AVX-512 VNNI) must give the very bits the 8-bit layout of the same codes gives on
the scalar path: decode's matmul (every pass shape), the norm, prefill's gemm and glu, and the unpacked
rows. The q8 scheme stores 5-bit codes only for weights already on such a grid (``q8.quantize``), and a
model's linears pack to 5 bits only where an x86 SIMD loop runs (AVX2, AVX-512 VNNI)."""

from __future__ import annotations

import pytest
import torch

from longdoc import native
from longdoc.native import q8

from .test_q8 import activations

needs_q8 = pytest.mark.skipif(not native.likely_available("q8"), reason="no C compiler or CPU flags here")

KS = [32, 96, 896]
NS = [1, 3, 8, 13, 37, 151]
MS = [1, 2, 3, 4, 5, 9]


def grid_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """A weight on a 5-bit grid as llama.cpp's Q5_0 leaves it, rounded to bfloat16 as a converted model
    holds it: per block of 32, a float16 step d and codes in -16..15 with -16 present (the block's
    largest magnitude); a zero block; and a heavy channel (large steps)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().double()
    d[:, :, 0] *= torch.where(torch.rand(n, k // 32, generator=g) < 0.5, -1.0, 1.0)
    codes = torch.randint(-16, 16, (n, k // 32, 32), generator=g)
    codes[:, :, 7] = -16
    w = (codes * d).view(n, k)
    w[:, 32 * ((k // 32) // 2) :][:, :32] *= 40
    if n > 2:
        w[n // 2, :32] = 0
    return w.to(torch.bfloat16).float()


def unpack_five(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The codes (N, K) a 5-bit packed weight holds, read by the layout's definition (q8.c): block b of
    group g is 16 bytes of scales, 4 pieces of 32 nibble bytes (piece t: step t low, step t + 4 high),
    32 bytes of fifth bits (byte i, bit s: step s's byte i); step s's byte 4r + j is row r's weight
    4s + j of the block."""
    nb = k // 32
    blocks = packed.view(-1, nb, q8.FIVE_BLOCK_BYTES).to(torch.int32)
    codes = torch.empty(blocks.shape[0] * 8, k, dtype=torch.int32)
    for s in range(8):
        low = (blocks[:, :, 16 + 32 * (s % 4) : 16 + 32 * (s % 4) + 32] >> (4 * (s // 4))) & 15
        five = (blocks[:, :, 16 + 128 : 16 + 160] >> s) & 1
        step = (low + 16 * five - 16).view(-1, nb, 8, 4)  # (group, block, row, j)
        for j in range(4):
            codes.view(-1, 8, nb, 32)[:, :, :, 4 * s + j] = step[:, :, :, j].transpose(1, 2)
    return codes[:n]


def test_quantize_q5_puts_each_blocks_largest_weight_at_minus_16():
    torch.manual_seed(0)
    w = torch.randn(5, 64)
    w[2, :32] = 0
    qs, scales = q8.quantize_q5(w)
    assert qs.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (5, 2)
    assert q8.fits_five(qs) and int(qs.min()) == -16
    blocks = w.view(5, 2, 32)
    top = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(scales, (top / -16).half())
    assert (qs[2, :32] == 0).all() and scales[2, 0] == 0
    at = blocks.abs().argmax(-1)
    extreme = qs.view(5, 2, 32).gather(-1, at.unsqueeze(-1)).squeeze(-1)
    assert (extreme[scales != 0] == -16).all()
    err = (q8.dequantize_q8(qs, scales) - w.double()).view(5, 2, 32).abs()
    # half a step plus the float16 scale's rounding times the largest code; a step where the far side's
    # weights beyond 15.5 steps clip to 15 (Q5_0's grid is one step short on that side)
    step = scales.double().abs().unsqueeze(-1)
    clipped = qs.view(5, 2, 32) == 15
    assert (err[~clipped] <= (step * (0.5 + 16 * 2**-11)).expand_as(err)[~clipped] + 1e-12).all()
    assert (err <= step * (1 + 16 * 2**-11) + 1e-12).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        q8.quantize_q5(torch.randn(4, 48))


def test_a_weight_on_a_five_bit_grid_keeps_its_codes_and_the_q8_scheme_keeps_them():
    w = grid_weight(24, 96, seed=3)
    qs, scales = q8.quantize_q5(w)
    assert q8.relative_error(w, qs, scales) < 0.004
    chosen, chosen_scales = q8.quantize(w)
    assert torch.equal(chosen, qs) and torch.equal(chosen_scales, scales)
    # a weight off any such grid keeps its 8-bit codes
    off = torch.randn(24, 96)
    qs8, scales8 = q8.quantize(off)
    assert q8.relative_error(off, *q8.quantize_q5(off)) > 3 * q8.ON_GRID
    head = q8.quantize(off, head=True)  # the LM head: 5 bits whatever its grid
    assert torch.equal(head[0], q8.quantize_q5(off)[0]) and torch.equal(head[1], q8.quantize_q5(off)[1])
    want8 = q8.quantize_q8(off)
    assert not q8.fits_five(qs8) and torch.equal(qs8, want8[0]) and torch.equal(scales8, want8[1])


def test_the_five_bit_layout_holds_the_codes_and_scales():
    w = grid_weight(13, 96, seed=1)
    qs, scales = q8.quantize_q5(w)
    packed = q8.pack(qs, scales, bits=5)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3 * q8.FIVE_BLOCK_BYTES)
    assert torch.equal(unpack_five(packed, 13, 96), qs.to(torch.int32))
    assert torch.equal(unpack_five(packed, 16, 96)[13:], torch.zeros(3, 96, dtype=torch.int32))  # padded rows
    blocks = packed.view(2, 3, q8.FIVE_BLOCK_BYTES)
    assert torch.equal(blocks[0, :, :16].contiguous().view(torch.float16), scales[:8].T)
    edge = torch.tensor([[-16, 15]], dtype=torch.int8)
    assert q8.fits_five(edge) and not q8.fits_five(edge - 1) and not q8.fits_five(edge + 1)
    with pytest.raises(ValueError, match="5 bits"):
        q8.pack(*q8.quantize_q8(torch.randn(8, 32)), bits=5)
    with pytest.raises(ValueError, match="8 or 5"):
        q8.pack(qs, scales, bits=4)


@needs_q8
@pytest.mark.parametrize("k", KS)
def test_every_path_on_five_bits_equals_the_scalar_path_on_eight_bit_for_bit(k):
    """Decode's matmul (1 row: 4 groups side by side; 2: 2; more: 1 group, up to 4 rows a pass), with
    and without the norm, bfloat16 and float32, 1 and 2 threads; rows that leave every tail of a group."""
    levels = [lv for lv in sorted(q8.FIVE_BIT_PATHS) if lv in q8.paths()]
    for n in NS:
        qs, scales = q8.quantize_q5(grid_weight(n, k, seed=n + k))
        eight, five = q8.pack(qs, scales), q8.pack(qs, scales, bits=5)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
        norm = (torch.rand(k) + 0.5, 1e-6)
        for m in MS:
            x = activations(m, k, seed=m * n + k)
            for dtype, threads, with_norm in [(torch.float32, 1, False), (torch.bfloat16, 2, True)]:
                kw = {"threads": threads, "norm": norm if with_norm else None}
                want = q8.Q8Matmul(eight, k, n, bias, level=q8.SCALAR)(x.to(dtype), dtype, **kw)
                for level in levels:
                    got = q8.Q8Matmul(five, k, n, bias, level=level, bits=5)(x.to(dtype), dtype, **kw)
                    assert torch.equal(got, want), (n, m, k, level, dtype)


@needs_q8
@pytest.mark.parametrize("k", KS)
def test_gemm_glu_and_rows_on_five_bits_equal_eight_bit_for_bit(k):
    levels = [lv for lv in sorted(q8.FIVE_BIT_PATHS) if lv in q8.paths()]
    for n in [8, 16, 40, 13]:
        qs, scales = q8.quantize_q5(grid_weight(n, k, seed=2 * n + k))
        eight, five = q8.pack(qs, scales), q8.pack(qs, scales, bits=5)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
        x = activations(7, k, seed=n)
        ref = q8.Q8Matmul(eight, k, n, bias, level=q8.SCALAR)
        ids = torch.tensor([n - 1, 0, n // 2])
        for level in levels:
            unpacker = q8.Q8Matmul(five, k, n, None, level=level, bits=5)
            assert torch.equal(unpacker.rows(), q8.dequantize_q8(qs, scales).float())
            assert torch.equal(unpacker.rows(dtype=torch.bfloat16), ref.rows(dtype=torch.bfloat16))
            assert torch.equal(unpacker.rows(ids, torch.bfloat16), ref.rows(ids, torch.bfloat16))
            mm = q8.Q8Matmul(five, k, n, bias, level=level, bits=5)
            # the gemm's AVX2 loop and its scalar loop give the same bits (test_q8_gemm); so on 5 bits
            assert torch.equal(mm.gemm(x, torch.float32), ref.gemm(x, torch.float32)), (n, k, level)
            if n % 16 == 0:
                assert torch.equal(mm.glu(x, torch.float32), ref.glu(x, torch.float32)), (n, k, level)


@needs_q8
def test_the_int16_sums_of_four_steps_hold_the_largest_codes():
    """Every code 15 (31 once offset) against activation codes of 127 in every lane, and every code -16:
    the AVX2 loop's int16 sums of four steps' products reach 4 * 2 * 31 * 127 = 31496, just under 2^15."""
    levels = [lv for lv in (q8.SCALAR, q8.AVX2) if lv in q8.paths()]
    for code in (15, -16):
        qs = torch.full((16, 64), code, dtype=torch.int8)
        scales = torch.full((16, 2), 0.5, dtype=torch.float16)
        want = q8.Q8Matmul(q8.pack(qs, scales), 64, 16, None, level=q8.SCALAR)
        for m in (1, 2, 3):
            x = torch.full((m, 64), 3.0)
            x[m - 1] = -3.0
            for level in levels:
                got = q8.Q8Matmul(q8.pack(qs, scales, bits=5), 64, 16, None, level=level, bits=5)(x, torch.float32)
                assert torch.equal(got, want(x, torch.float32)), (code, m, level)
                assert abs(float(got[0, 0]) - code * 64 * float(x[0, 0]) * 0.5) < 1e-3


@needs_q8
def test_the_kernel_refuses_a_layout_it_does_not_know_and_a_shape_that_is_not_it():
    lib = native.library("q8")
    assert lib is not None
    qs, scales = q8.quantize_q5(grid_weight(8, 64, seed=0))
    five = q8.pack(qs, scales, bits=5)
    x, out = torch.randn(1, 64), torch.empty(8, 64)
    for bits in (4, 6, 0):
        args = (x.data_ptr(), 0, 1, 64, five.data_ptr(), 8, None, out.data_ptr(), 0, 1, 1)
        assert lib.longdoc_q8_matmul(*args, None, 0.0, bits) == 1
        assert lib.longdoc_q8_gemm(*args, bits) == 1
        assert lib.longdoc_q8_rows(five.data_ptr(), 64, 8, None, 1, out.data_ptr(), 0, 1, bits, 0) == 1
    with pytest.raises(ValueError, match="5 bits"):
        q8.Q8Matmul(q8.pack(qs, scales), 64, 8, None, bits=5)
    with pytest.raises(ValueError, match="8 bits"):
        q8.Q8Matmul(five, 64, 8, None)


@needs_q8
def test_a_models_linears_pack_to_five_bits_only_where_an_x86_simd_loop_runs(monkeypatch):
    from longdoc.quant.schemes import QuantGemm

    on_grid = q8.quantize(grid_weight(16, 64, seed=5))
    off_grid = q8.quantize(torch.randn(16, 64))
    x = torch.randn(1, 64)
    for best in [lv for lv in (q8.VNNI, q8.AVX2) if lv in q8.paths()] + [q8.SCALAR]:
        monkeypatch.setattr(q8, "best_path", lambda best=best: best)
        alone = QuantGemm("q8", [on_grid[0]], [on_grid[1]], [None], torch.float32)
        mixed = QuantGemm("q8", [on_grid[0], off_grid[0]], [on_grid[1], off_grid[1]], [None, None], torch.float32)
        assert alone.q8.bits == (8 if best == q8.SCALAR else 5)
        assert mixed.q8.bits == 8  # one part off the grid: the whole stack in 8 bits
        assert alone.nbytes == 2 * 2 * (q8.GROUP_BLOCK_BYTES if best == q8.SCALAR else q8.FIVE_BLOCK_BYTES)
        want = q8.reference_q8_matmul(x, *on_grid)
        assert torch.allclose(alone.matmul(x).double(), want, rtol=1e-5, atol=1e-5)
