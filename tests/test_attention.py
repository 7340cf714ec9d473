"""Attention kernels and Dual Chunk Attention against naive float64 references."""

from __future__ import annotations

import pytest
import torch

from longdoc.attention.dca import ChunkLayout, chunk_steps, key_positions, query_positions
from longdoc.attention.kernels import attend_cpu, attend_reference, merge_partials
from longdoc.attention.reference import naive_dca

from .helpers import load_vectors, run_chunked

KERNELS = [attend_reference, attend_cpu]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
# (dtype, output tolerance, log-sum-exp tolerance). bfloat16 outputs carry bfloat16's rounding; their
# log-sum-exp is float32, but torch's AVX2 kernel forms bfloat16 scores its own way and lands up to
# 5.5e-5 from float64 (1e-5 holds on AVX-512); 2e-4 still fails a wrong scale or a dropped key (1e-2+).
@pytest.mark.parametrize(
    "dtype,tol,lse_tol",
    [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-4)],
)
def test_kernels_match_reference(kernel, causal, dtype, tol, lse_tol):
    torch.manual_seed(1)
    q = torch.randn(2, 6, 9, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 9, 16, dtype=torch.float64), torch.randn(2, 2, 9, 16, dtype=torch.float64)
    q, k, v = (x.to(dtype) for x in (q, k, v))  # compare on the same (rounded) inputs
    ref_out, ref_lse = attend_reference(q.double(), k.double(), v.double(), causal, 0.25)
    out, lse = kernel(q, k, v, causal, 0.25)
    assert out.dtype == dtype and lse.shape == (2, 6, 9)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=lse_tol, rtol=lse_tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_lse_merge_of_key_splits_is_exact(kernel):
    torch.manual_seed(2)
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 23, 8, dtype=torch.float64), torch.randn(1, 2, 23, 8, dtype=torch.float64)
    whole = attend_reference(q, k, v, False, 0.3)
    parts = [kernel(q, k[:, :, a:b], v[:, :, a:b], False, 0.3) for a, b in [(0, 7), (7, 8), (8, 23)]]
    out, lse = merge_partials(parts)
    torch.testing.assert_close(out, whole[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, whole[1], atol=1e-12, rtol=0)


def test_query_and_key_positions():
    layout = ChunkLayout(chunk_size=10, local_window=4)  # c = 6
    pos = torch.arange(20)
    assert key_positions(pos, layout).tolist() == [p % 6 for p in range(20)]
    intra, succ, inter = query_positions(pos, layout)
    assert intra.tolist() == [p % 6 for p in range(20)]
    assert succ.tolist() == [min(p % 6 + 6, 10) for p in range(20)]
    assert inter.tolist() == [10] * 20
    # no relative distance beyond s: largest query index minus smallest key index
    assert int(torch.stack([intra, succ, inter]).max()) - 0 <= layout.chunk_size


def test_layout_rule_defaults_and_limits():
    from longdoc.attention.dca import LayoutError

    assert ChunkLayout.for_window(32768) == ChunkLayout(24576, 4096)  # 3W/4 and W/8
    assert ChunkLayout.for_window(32768, chunk_size=2048) == ChunkLayout(2048, 256)  # s/8 when only s is given
    assert ChunkLayout.for_window(32768, chunk_size=2048, local_window=0) == ChunkLayout(2048, 0)
    assert ChunkLayout.for_window(32768, local_window=100) == ChunkLayout(24576, 100)
    for bad in ({"chunk_size": 32768}, {"chunk_size": 1}, {"local_window": 24576}, {"local_window": -1}):
        with pytest.raises(LayoutError):
            ChunkLayout.for_window(32768, **bad)


def test_chunk_steps_never_cross_chunks():
    layout = ChunkLayout(16, 4)  # c = 12
    steps = chunk_steps(5, 50, 7, layout)
    assert steps[0] == (5, 12) and steps[-1][1] == 50
    assert all(a // 12 == (b - 1) // 12 and b - a <= 7 for a, b in steps)
    assert chunk_steps(0, 10, 4, None) == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", [None, ChunkLayout(8, 2), ChunkLayout(7, 3), ChunkLayout(12, 0)])
@pytest.mark.parametrize("step", [1, 4, 100])
def test_dca_matches_naive_reference(kernel, layout, step):
    """GQA, several chunks, chunk lengths that do not divide L, prefill steps and 1-token decode."""
    torch.manual_seed(3)
    q = torch.randn(4, 29, 8, dtype=torch.float64)
    k, v = torch.randn(2, 29, 8, dtype=torch.float64), torch.randn(2, 29, 8, dtype=torch.float64)
    got = run_chunked(q, k, v, layout, 10000.0, kernel, step)
    torch.testing.assert_close(got, naive_dca(q, k, v, layout, 10000.0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dca_equals_plain_when_input_fits_one_chunk(kernel):
    torch.manual_seed(4)
    q = torch.randn(4, 20, 8, dtype=torch.float64)
    k, v = torch.randn(2, 20, 8, dtype=torch.float64), torch.randn(2, 20, 8, dtype=torch.float64)
    dca = run_chunked(q, k, v, ChunkLayout(24, 4), 10000.0, kernel, 6)  # c = 20 = L
    plain = run_chunked(q, k, v, None, 10000.0, kernel, 6)
    torch.testing.assert_close(dca, plain, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("step", [5, 4096])
def test_shared_dca_vectors(kernel, step):
    f, cases = load_vectors()
    assert len(cases) >= 4
    for case in cases:
        name = case["name"]
        q, k, v = (f.get_tensor(f"{name}.{x}") for x in "qkv")
        layout = ChunkLayout(case["s"], case["w"])
        got = run_chunked(q, k, v, layout, case["theta"], kernel, step)
        torch.testing.assert_close(got, f.get_tensor(f"{name}.out"), atol=1e-10, rtol=0)
        plain = run_chunked(q, k, v, None, case["theta"], kernel, step)
        torch.testing.assert_close(plain, f.get_tensor(f"{name}.plain_out"), atol=1e-10, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_kernel_matches_reference(causal, dtype, tol):
    from longdoc.attention.kernels import attend_cuda

    torch.manual_seed(5)
    q = torch.randn(1, 6, 40, 64, dtype=torch.float64)
    k, v = torch.randn(1, 2, 40, 64, dtype=torch.float64), torch.randn(1, 2, 40, 64, dtype=torch.float64)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    ref_out, ref_lse = attend_reference(q.double(), k.double(), v.double(), causal, 0.125)
    out, lse = attend_cuda(q.cuda(), k.cuda(), v.cuda(), causal, 0.125)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-3, rtol=1e-3)
