"""longdoc's AVX-512 BF16 attention kernel (flash.c) against the float64 reference: shapes, GQA, masks,
strided cache views, DCA on the shared vectors, and the fallbacks to torch's kernel."""

from __future__ import annotations

import math

import pytest
import torch

from longdoc import native
from longdoc.attention.dca import ChunkLayout, chunk_steps, key_positions
from longdoc.attention.kernels import attend_cpu, attend_reference, attend_torch_cpu
from longdoc.attention.reference import naive_dca
from longdoc.attention.sparse import SparseConfig, SparseStats, sparse_chunked_attention
from longdoc.models.rope import RopeTable
from longdoc.native import flash as flash_c

from .helpers import THETA, load_vectors, run_chunked

needs_flash = pytest.mark.skipif(
    not native.likely_available("flash"), reason="no C compiler, CPU flags or AVX-512 BF16 here"
)


def rounded(*shape: int, scale: float = 1.0) -> torch.Tensor:
    """bfloat16 values held as float64, so the reference sees exactly the kernel's inputs."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).bfloat16().double()


def check(q, k, v, causal, scale, out_tol=1.5e-2):
    """The kernel's output and log-sum-exp against the float64 reference on the same inputs. The output
    is rounded to bfloat16 once (2^-9 relative) after the probabilities were (as torch's kernel rounds
    them); the log-sum-exp stays float32 throughout, so a lost term or a wrong mask shows at 1e-4."""
    assert flash_c.flash_takes(q.bfloat16(), k.bfloat16(), v.bfloat16())
    out, lse = flash_c.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal, scale)
    ref_out, ref_lse = attend_reference(q, k, v, causal, scale)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=out_tol, rtol=out_tol)
    return out, lse


@needs_flash
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "b, h, hkv, lq, lk, d",
    [
        (1, 14, 2, 16, 16, 64),  # the model's heads, one tile
        (1, 14, 2, 100, 100, 64),  # tiles and key blocks with remainders
        (2, 4, 4, 37, 37, 128),  # MHA, batch 2, two column passes
        (1, 6, 2, 130, 130, 96),  # a 64-column pass and a 32-column one
        (1, 2, 1, 17, 17, 32),
    ],
)
def test_kernel_matches_reference(b, h, hkv, lq, lk, d, causal):
    torch.manual_seed(lq + d)
    q, k, v = rounded(b, h, lq, d, scale=2.0), rounded(b, hkv, lk, d, scale=2.0), rounded(b, hkv, lk, d)
    check(q, k, v, causal, d**-0.5)


@needs_flash
@pytest.mark.parametrize("lq, lk", [(16, 1), (20, 63), (48, 64), (33, 65), (128, 1000)])
def test_kernel_non_causal_key_counts(lq, lk):
    """Keys past the last full block are masked, whatever their count (a padded key would get weight)."""
    torch.manual_seed(lk)
    q, k, v = rounded(1, 14, lq, 64, scale=2.0), rounded(1, 2, lk, 64, scale=2.0), rounded(1, 2, lk, 64)
    check(q, k, v, False, 0.125)


@needs_flash
def test_kernel_reads_strided_cache_views_and_large_scores():
    """K/V as slices of a bigger cache (DCA's regions), q transposed, and scores large enough that the
    running maximum moves many times (each move rescales what was summed)."""
    torch.manual_seed(5)
    cache_k, cache_v = rounded(1, 2, 400, 64, scale=3.0), rounded(1, 2, 400, 64)
    k, v = cache_k[:, :, 37:300], cache_v[:, :, 37:300]
    q = rounded(1, 70, 14, 64, scale=3.0).transpose(1, 2)  # (1, 14, 70, 64), not contiguous
    ramp = torch.linspace(0, 6, 263, dtype=torch.float64)[None, None, :, None]
    k = (k + ramp * q.mean((1, 2), keepdim=True)).bfloat16().double()  # later keys score higher
    out, lse = check(q, k, v, False, 0.125)
    assert lse.max() > 20  # the maximum really moved far


@needs_flash
def test_kernel_agrees_with_torchs_on_the_models_shapes():
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, h, 200, 64).bfloat16() for h in (14, 2, 2))
    for causal in (False, True):
        out, lse = flash_c.flash_attention(q, k, v, causal, 0.125)
        want, want_lse = attend_torch_cpu(q, k, v, causal, 0.125)
        torch.testing.assert_close(out.float(), want.float(), atol=1.5e-2, rtol=1.5e-2)
        torch.testing.assert_close(lse, want_lse, atol=2e-4, rtol=0)


@needs_flash
@pytest.mark.parametrize("step", [16, 64])
def test_dca_on_shared_vectors_through_the_kernel(step):
    """DCA's production path with attend_cpu on bfloat16 inputs, where the kernel takes every step of at
    least a tile of queries, against the float64 DCA reference on the same rounded inputs."""
    f, cases = load_vectors()
    case = next(c for c in cases if c["D"] % 32 == 0)  # gqa_large_base: D 32, L 130, three chunk regions
    q, k, v = (f.get_tensor(f"{case['name']}.{x}").bfloat16().double() for x in "qkv")
    layout = ChunkLayout(case["s"], case["w"])
    calls = []

    def spy(q_, k_, v_, causal, scale):
        calls.append(flash_c.flash_takes(q_, k_, v_))
        return attend_cpu(q_, k_, v_, causal, scale)

    got = run_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, case["theta"], spy, step)
    want = naive_dca(q, k, v, layout, case["theta"])
    assert any(calls)
    # the rotations round q and k to bfloat16 again, hence the wider tolerance than the kernel's own
    torch.testing.assert_close(got.double(), want, atol=4e-2, rtol=4e-2)
    assert (got.double() - want).abs().mean() < 4e-3


def test_inputs_the_kernel_does_not_take_go_to_torchs():
    q, k, v = torch.randn(1, 4, 20, 64), torch.randn(1, 2, 20, 64), torch.randn(1, 2, 20, 64)
    assert not flash_c.flash_takes(q, k, v)  # float32
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert not flash_c.flash_takes(qb[:, :, :3], kb, vb)  # fewer queries than a tile: decode steps
    assert not flash_c.flash_takes(torch.randn(1, 4, 20, 48).bfloat16(), kb[..., :48], vb[..., :48])  # head size
    for x in (q, qb[:, :, :3]):
        out, lse = attend_cpu(x, k.to(x.dtype), v.to(x.dtype), False, 0.125)
        want, want_lse = attend_reference(x.double(), k.double(), v.double(), False, 0.125)
        torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


def test_switched_off_kernel_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # a CPU with VNNI but no BF16
    native.library.cache_clear()
    try:
        q, k, v = (torch.randn(1, h, 20, 64).bfloat16() for h in (4, 2, 2))
        assert not flash_c.flash_takes(q, k, v)
        assert "caps the CPU below AVX-512 BF16" in (native.why_unavailable("flash") or "")
        out, _ = attend_cpu(q, k, v, True, 0.125)
        want, _ = attend_reference(q.double(), k.double(), v.double(), True, 0.125)
        torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    finally:
        native.library.cache_clear()


@needs_flash
def test_block_lists_equal_attention_to_the_listed_blocks():
    """Sparse prefill's call: per KV head and group of queries, the first count[group] of a list of
    64-key blocks (unsorted, a partial last block, a group with none), against the reference on
    gathered copies; numbers outside the keys are refused, not read."""
    torch.manual_seed(7)
    k, v = rounded(1, 2, 300, 64, scale=2.0), rounded(1, 2, 300, 64)  # 5 blocks, the last 44 keys
    q = rounded(1, 14, 80, 64, scale=2.0)  # groups of 32: 32, 32, 16 queries
    blocks = torch.stack([torch.stack([torch.randperm(5)[:4] for _ in range(3)]) for _ in range(2)])  # (2, 3, 4)
    counts = [4, 0, 2]
    out, lse = flash_c.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), False, 0.125, (blocks, counts, 32))
    for g, count in enumerate(counts):
        a, b = 32 * g, min(80, 32 * g + 32)
        if not count:
            assert out[:, :, a:b].abs().max() == 0 and lse[:, :, a:b].eq(-math.inf).all()
            continue
        keys = [
            torch.cat([torch.arange(64 * n, min(300, 64 * n + 64)) for n in blocks[h, g, :count]]) for h in range(2)
        ]
        for h in range(2):
            heads = slice(7 * h, 7 * h + 7)
            want_out, want_lse = attend_reference(
                q[:, heads, a:b], k[:, h : h + 1, keys[h]], v[:, h : h + 1, keys[h]], False, 0.125
            )
            torch.testing.assert_close(lse[:, heads, a:b].double(), want_lse, atol=1e-4, rtol=0)
            torch.testing.assert_close(out[:, heads, a:b].double(), want_out, atol=1.5e-2, rtol=1.5e-2)
    with pytest.raises(RuntimeError, match="refused"):
        flash_c.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), False, 0.125, (blocks + 3, counts, 32))


@needs_flash
def test_sparse_prefill_through_the_kernel_equals_the_reference_path(monkeypatch):
    """Sparse prefill in bfloat16 with attend_cpu, where flash.c runs the selections as block lists,
    against the same prefill with the float64 reference kernel on the same (rounded, rotated) inputs:
    the same blocks are chosen, and the outputs agree to bfloat16's rounding. (The reference path itself
    is checked against naive DCA restricted to the kept keys in test_sparse.py.)"""
    n, step, hkv = 1024, 256, 2
    torch.manual_seed(8)
    q, k, v = rounded(4, n, 64, scale=2.0), rounded(hkv, n, 64, scale=2.0), rounded(hkv, n, 64)
    layout = ChunkLayout(400, 16)  # c = 384: three regions by the end
    cfg = SparseConfig(budget=128, band=64, block=64, query_block=32)
    table = RopeTable(1.0 / THETA ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64), dtype=torch.float64)
    listed = []
    flash = flash_c.flash_attention

    def spy(*args, blocks=None):
        listed.append(blocks is not None)
        return flash(*args, blocks=blocks)

    monkeypatch.setattr(flash_c, "flash_attention", spy)  # where attend_cpu and attend_blocks find it

    def run(dtype, kernel):
        def rotate(x, pos):
            return table.rotate(x.double(), pos).bfloat16().to(dtype)

        kc = rotate(k[None], key_positions(torch.arange(n), layout))
        stats = SparseStats(record=True)
        out = [
            sparse_chunked_attention(
                q[None, :, a:b].to(dtype), kc, v[None].to(dtype), a, rotate, layout, kernel, 64**-0.5, cfg, stats
            )
            for a, b in chunk_steps(0, n, step, layout)
        ]
        return torch.cat(out, dim=2)[0].double(), stats

    got, stats = run(torch.bfloat16, attend_cpu)
    want, want_stats = run(torch.float64, attend_reference)
    assert any(listed) and not all(listed)  # block lists for the selections; band, sinks, diagonal as slices
    assert stats.picks and 0.2 < stats.kept_fraction < 0.9 and stats.kept == want_stats.kept
    assert all(torch.equal(x[2], y[2]) for x, y in zip(stats.picks, want_stats.picks, strict=True))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
