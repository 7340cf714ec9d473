"""The Q8_0 kernel (longdoc/native/q8.c through longdoc.native.q8): its format and layout, every path
against the float64 reference and against each other, the ISA cap's hold on its dispatch, and its NEON
paths cross-compiled and run under qemu-aarch64."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest
import torch

from longdoc import cpu, native
from longdoc.native import q8

from .helpers import build_driver, driver_report, program

DRIVER = Path(__file__).parent / "data" / "q8_driver.c"
SOURCE = Path(native.__file__).with_name("q8.c")

KS = [32, 96, 896, 4864]
NS = [1, 3, 4, 5, 8, 13, 896, 151]
MS = [1, 2, 3, 5, 16]
# every input dtype, output dtype, bias or not and thread count, cycled over the (N, M) pairs of each K
COMBOS = list(
    itertools.product([torch.float32, torch.bfloat16], [torch.float32, torch.bfloat16], [False, True], [1, 2])
)

# judged without building (collection must not write a cache): the tests themselves build the kernel
needs_q8 = pytest.mark.skipif(not native.likely_available("q8"), reason="no C compiler or CPU flags here")


def tolerance(
    terms: torch.Tensor, want: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, extra: int = 0
) -> torch.Tensor:
    """How far the kernel may be from the float64 reference, per output, from its arithmetic alone. The
    activation codes are the reference's exactly and each block's int32 sum is exact (|sum| <= 32 * 127
    * 127 < 2^24, so it converts to float exactly); what rounds is each block's scale product (once),
    each block's fused multiply-add into the float32 accumulator (once per block) and the bias addition
    (once): every term carries at most nb + 2 factors (1 + d), |d| <= 2^-24, so the output is within
    (nb + 2) 2^-24 / (1 - (nb + 2) 2^-24) of the sum of the terms' and the bias's magnitudes ((nb + 3) 2^-24
    covers the denominator for nb <= 152). A bfloat16 output then rounds once more, by at most 2^-8 of
    itself. ``extra``: roundings more per term that a caller's arithmetic has (the gemm's: test_q8_gemm)."""
    nb = terms.shape[-1]
    magnitude = terms.abs().sum(-1) + (0 if bias is None else bias.double().abs())
    tol = (nb + 3 + extra) * 2.0**-24 * magnitude
    if dtype == torch.bfloat16:
        tol = tol + 2.0**-8 * (want.abs() + tol)
    return tol


def weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Random weights with a heavy channel and, where there are several rows, a row of zeros (its blocks'
    scales are 0) in the middle of a group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 5] *= 20
    if n > 1:
        w[n // 2] = 0
    return w


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Random rows with outliers (one channel 100x, so its block's other codes are mostly 0), an all-zero
    block (scale 0) and exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 100
    x[:, 2 * k // 3] = -300.0
    x[m // 2, -32:] = 0
    x[:, 7::13] = 0
    return x


def test_quantize_q8_is_symmetric_per_block_and_packs_in_groups_of_eight():
    torch.manual_seed(0)
    w = torch.randn(13, 96)
    w[4] = 0
    qs, scales = q8.quantize_q8(w)
    assert qs.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (13, 3)
    blocks = w.view(13, 3, 32)
    assert torch.equal(scales, (blocks.abs().amax(-1) / 127).half())
    assert qs.abs().max() == 127 and (qs != -128).all() and (qs[4] == 0).all() and (scales[4] == 0).all()
    # within half a step of each weight (the float16 scale's rounding may move a code at the edge by one)
    err = (q8.dequantize_q8(qs, scales) - w.double()).view(13, 3, 32).abs()
    assert (err <= scales.double().unsqueeze(-1) * 0.5 + 1e-12).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        q8.quantize_q8(torch.randn(4, 48))

    packed = q8.pack(qs, scales)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3 * q8.GROUP_BLOCK_BYTES)
    for row, b, s, j in [(0, 0, 0, 0), (9, 2, 7, 3), (12, 1, 3, 2), (5, 0, 4, 1)]:
        g, r = divmod(row, 8)
        at = b * q8.GROUP_BLOCK_BYTES
        assert packed[g, at + 16 + 32 * s + 4 * r + j].view(torch.int8) == qs[row, 32 * b + 4 * s + j]
        assert packed[g, at + 2 * r : at + 2 * r + 2].view(torch.float16) == scales[row, b]
    assert (packed[1].view(3, q8.GROUP_BLOCK_BYTES)[:, 16:].view(3, 8, 8, 4)[:, :, 5:] == 0).all()  # padded rows
    assert (packed[1].view(3, q8.GROUP_BLOCK_BYTES)[:, 10:16] == 0).all()  # and their scales


@needs_q8
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("level", sorted(q8.PATHS), ids=[q8.PATHS[lv] for lv in sorted(q8.PATHS)])
def test_every_path_matches_the_float64_reference_and_the_scalar_path_bit_for_bit(level, k):
    """Row counts that leave every tail of a group of 8 (1, 3, 4, 5, 13, 151) and whole groups, 1 to 16
    input rows (tails of the kernel's passes of 4), 1 to 152 blocks, each combination of input and
    output dtype, bias and thread count, within the arithmetic's own tolerance of the float64
    reference; and every SIMD path equal to the scalar one, bit for bit (the same operations in the
    same order, q8.c)."""
    if level not in q8.paths():
        pytest.skip(f"the {q8.PATHS[level]} path does not run here (the NEON ones run under qemu below)")
    combos = itertools.cycle(COMBOS)
    seen = set()
    for n in NS:
        w = weight(n, k, seed=n * k)
        qs, scales = q8.quantize_q8(w)
        packed = q8.pack(qs, scales)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
        for m in MS:
            x_dtype, dtype, with_bias, threads = next(combos)
            seen.add((x_dtype, dtype, with_bias, threads))
            b = bias if with_bias else None
            mm = q8.Q8Matmul(packed, k, n, b, level=level)
            x = activations(m, k, seed=m + n + k).to(x_dtype)
            out = mm(x, dtype, threads=threads)
            assert out.shape == (m, n) and out.dtype == dtype
            terms = q8.reference_terms(x, qs, scales)
            want = terms.sum(-1) + (0 if b is None else b.double())
            tol = tolerance(terms, want, b, dtype)
            assert ((out.double() - want).abs() <= tol).all(), (n, m, x_dtype, dtype, with_bias, threads)
            assert torch.equal(want, q8.reference_q8_matmul(x, qs, scales, b))
            if n > 1:
                assert (out[:, n // 2] == (0 if b is None else b[n // 2].to(dtype))).all()  # the zero row
            if level != q8.SCALAR:
                scalar = q8.Q8Matmul(packed, k, n, b, level=q8.SCALAR)(x, dtype, threads=1)
                assert torch.equal(out, scalar), (n, m, x_dtype, dtype, with_bias, threads)
    assert seen == set(COMBOS)


@needs_q8
def test_activations_are_quantized_per_block_to_8_bits():
    """Against the unquantized inputs the error is the int8 activations' (and the weights'): bounded by
    half a step of each, per block, which an outlier makes coarse only in its own block."""
    torch.manual_seed(1)
    k, n = 896, 13
    w = weight(n, k, seed=3)
    qs, scales = q8.quantize_q8(w)
    x = activations(2, k, seed=4)
    out = q8.Q8Matmul(q8.pack(qs, scales), k, n, None)(x, torch.float32)
    exact = x.double() @ w.double().T
    codes, sx = q8.quantize_activations(x)
    # |x - code * sx| <= sx / 2 per input; |w - q * sw| <= sw / 2 per weight
    xerr = (sx.double().unsqueeze(-1) / 2).expand(-1, -1, 32).reshape(2, k)
    werr = (scales.double().unsqueeze(-1) / 2).expand(-1, -1, 32).reshape(n, k)
    bound = xerr @ w.double().abs().T + x.double().abs() @ werr.T + xerr @ werr.T + 1e-5
    assert ((out.double() - exact).abs() <= bound).all()
    assert codes.abs().max() == 127 and torch.equal(codes, codes.round())


@needs_q8
def test_the_isa_cap_steers_the_paths(monkeypatch):
    """The kernel itself is never capped off (it needs no instruction set), but its SIMD loops are:
    under LONGDOC_ISA=none only the scalar loop runs, and asking for another is refused; under avx2 the
    AVX-512 VNNI loop does not run."""
    for var in ("LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    uncapped = q8.paths()
    assert uncapped[0] == q8.SCALAR and q8.best_path() == uncapped[-1]
    flags = cpu._raw_flags()[0]
    for level in (q8.AVX2, q8.VNNI):
        assert (level in uncapped) == (cpu.arch() == "x86_64" and q8.PATH_FLAGS[level] <= flags)
    for cap in ("none", "avx2"):
        monkeypatch.setenv("LONGDOC_ISA", cap)
        assert native.library("q8") is not None and native._switched_off(native.SOURCES["q8"]) is None
        # the AVX2 cap keeps the AVX2 loop and drops the AVX-512 one
        assert q8.paths() == ([q8.SCALAR] if cap == "none" else [lv for lv in uncapped if lv != q8.VNNI])
    monkeypatch.setenv("LONGDOC_ISA", "none")
    assert q8.best_path() == q8.SCALAR
    qs, scales = q8.quantize_q8(torch.randn(8, 64))
    assert q8.Q8Matmul(q8.pack(qs, scales), 64, 8, None).level == q8.SCALAR
    for level in set(q8.PATHS) - {q8.SCALAR}:
        with pytest.raises(RuntimeError, match="does not run here"):
            q8.Q8Matmul(q8.pack(qs, scales), 64, 8, None, level=level)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # torch's own cap, set by hand, caps it too
    monkeypatch.delenv("LONGDOC_ISA")
    assert q8.paths() == [q8.SCALAR]


@needs_q8
def test_the_kernel_refuses_what_it_cannot_take():
    qs, scales = q8.quantize_q8(torch.randn(8, 64))
    packed = q8.pack(qs, scales)
    mm = q8.Q8Matmul(packed, 64, 8, None)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        mm(torch.randn(1, 64, dtype=torch.float64), torch.float32)
    with pytest.raises(RuntimeError, match=r"rows \(M, 64\)"):
        mm(torch.randn(1, 32), torch.float32)
    with pytest.raises(ValueError, match="is not"):
        q8.Q8Matmul(packed, 64, 9, None)
    assert mm(torch.randn(0, 64), torch.float32).shape == (0, 8)
    lib = native.library("q8")
    assert lib is not None
    out = torch.empty(1, 8)
    x = torch.randn(1, 64)
    assert (
        lib.longdoc_q8_matmul(x.data_ptr(), 0, 1, 48, packed.data_ptr(), 8, None, out.data_ptr(), 0, 1, 0, None, 0.0, 8)
        == 1
    )
    assert (
        lib.longdoc_q8_matmul(x.data_ptr(), 0, 1, 64, packed.data_ptr(), 8, None, out.data_ptr(), 0, 1, 9, None, 0.0, 8)
        == 1
    )


def test_neon_paths_under_qemu_equal_the_scalar_path_and_the_x86_build(tmp_path):
    """tests/data/q8_driver.c with the kernel, built for aarch64 without dot products (armv8-a: the GCC
    build still carries the sdot path, as a function of its own) and with them (armv8.2-a+dotprod), run
    under qemu-aarch64 on a CPU with dot products (max) and one without (cortex-a53, where the sdot path
    must be refused; sizes with K <= 96 only): on 160 cases (every size of the tests above, every dtype
    and bias combination) every path equals the scalar one bit for bit, and the scalar outputs'
    checksum equals the native build's, whose paths the float64 reference checks above."""
    cross = program("aarch64-linux-gnu-gcc", needed_in_ci=True)
    qemu = program("qemu-aarch64", needed_in_ci=True)
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    here = build_driver(cc, [], DRIVER, SOURCE, tmp_path / "native")
    plain = build_driver([cross], ["-static", "-march=armv8-a"], DRIVER, SOURCE, tmp_path / "armv8-a")
    dot = build_driver([cross], ["-static", "-march=armv8.2-a+dotprod"], DRIVER, SOURCE, tmp_path / "armv8.2-a-dotprod")
    runs = {
        "native": [str(here)],
        "armv8-a on max": [qemu, "-cpu", "max", "-L", "/usr/aarch64-linux-gnu", str(plain)],
        # the dispatch without dot products: the small sizes suffice (the large ones ran on max)
        "armv8-a on cortex-a53": [qemu, "-cpu", "cortex-a53", "-L", "/usr/aarch64-linux-gnu", str(plain), "small"],
        "dotprod on max": [qemu, "-cpu", "max", "-L", "/usr/aarch64-linux-gnu", str(dot)],
    }
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in runs.items()
    }
    reports = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        reports[name] = driver_report(subprocess.CompletedProcess(runs[name], proc.returncode, stdout, stderr))
    for name, (paths, _, _) in reports.items():
        cases = 80 if name == "armv8-a on cortex-a53" else 160
        assert all(run == cases and wrong == 0 for run, wrong in paths.values()), (name, paths)
    assert set(reports["armv8-a on max"][0]) == {q8.SCALAR, q8.NEON, q8.NEON_DOT}
    assert reports["armv8-a on max"][1] == q8.NEON_DOT
    assert set(reports["armv8-a on cortex-a53"][0]) == {q8.SCALAR, q8.NEON}
    assert reports["armv8-a on cortex-a53"][1] == q8.NEON
    assert set(reports["dotprod on max"][0]) == {q8.SCALAR, q8.NEON, q8.NEON_DOT}
    if cpu.arch() == "x86_64" and cpu.flags_known():  # the x86 paths whose flags the CPU has
        simd = [lv for lv in (q8.AVX2, q8.VNNI) if q8.PATH_FLAGS[lv] <= cpu._raw_flags()[0]]
        assert reports["native"][0].keys() == {q8.SCALAR, *simd}
        assert reports["native"][1] == (simd or [q8.SCALAR])[-1]
    assert len({checksum for name, (_, _, checksum) in reports.items() if name != "armv8-a on cortex-a53"}) == 1


@needs_q8
@pytest.mark.parametrize("n, k", [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)])
def test_the_second_models_widths(n, k):
    """The 1.5B's linears (issue 28: hidden 1536, k/v 256, FFN 8960, the down projection's K of 280
    blocks): a decode row and a few rows, fused norm or not, on every path here within the arithmetic's
    tolerance of the float64 reference, every SIMD path equal to the scalar one bit for bit."""
    g = torch.Generator().manual_seed(n + k)
    w = weight(n, k, seed=n + k)
    qs, scales = q8.quantize_q8(w)
    packed = q8.pack(qs, scales)
    bias = torch.randn(n, generator=g)
    for m in (1, 3):
        x = activations(m, k, seed=m + k)
        terms = q8.reference_terms(x, qs, scales)
        want = terms.sum(-1) + bias.double()
        tol = tolerance(terms, want, bias, torch.float32)
        outs = [q8.Q8Matmul(packed, k, n, bias, level=lv)(x, torch.float32, threads=2) for lv in q8.paths()]
        for out in outs:
            assert ((out.double() - want).abs() <= tol).all(), (n, k, m)
            assert torch.equal(out, outs[0])
    assert torch.equal(q8.Q8Matmul(packed, k, n, None).rows(), q8.dequantize_q8(qs, scales).float())


@needs_q8
@pytest.mark.parametrize("n, k", [(13, 96), (896, 64), (151, 4864)])
def test_unpacked_rows_are_the_dequantized_weight_exactly(n, k):
    """``Q8Matmul.rows``, on every path here: every row (a group of 8 at a time, the last group short
    where n is not a multiple of 8), or the rows asked for in any order, is codes x scale exactly in
    float32 (and that rounded to bfloat16); a row outside the weight is refused."""
    g = torch.Generator().manual_seed(n + k)
    qs, scales = q8.quantize_q8(torch.randn(n, k, generator=g))
    weight = q8.dequantize_q8(qs, scales).float()
    ids = torch.tensor([n - 1, 0, n // 2, 0])
    for level in q8.paths():
        matmul = q8.Q8Matmul(q8.pack(qs, scales), k, n, None, level=level)
        assert torch.equal(matmul.rows(), weight), level
        assert torch.equal(matmul.rows(dtype=torch.bfloat16), weight.bfloat16()), level
        assert torch.equal(matmul.rows(ids), weight[ids])
        assert torch.equal(matmul.rows(ids, torch.bfloat16), weight[ids].bfloat16())
    for bad in ([n], [-1]):
        with pytest.raises(RuntimeError, match="out of range"):
            matmul.rows(torch.tensor(bad))


def test_packing_a_list_of_weights_packs_their_rows_stacked():
    """Linears that share an input are packed from their parts, a few groups at a time, into what packing
    their stacked rows gives (sizes that straddle groups and steps of ``_PACK_GROUPS`` included)."""
    g = torch.Generator().manual_seed(7)
    parts = [q8.quantize_q8(torch.randn(rows, 64, generator=g)) for rows in (5, 4100, 11)]
    stacked = q8.pack(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]))
    assert torch.equal(q8.pack([q for q, _ in parts], [s for _, s in parts]), stacked)
    # the layout itself: row r's weight j of block b at its place (q8.c's header)
    q, s = parts[1]
    packed = q8.pack(q, s).view(-1, 2, q8.GROUP_BLOCK_BYTES)  # K = 64: two blocks per group
    row, b, j = 4097, 1, 13
    group, r = divmod(row, q8.GROUP)
    assert packed[group, b, 16 + 32 * (j // 4) + 4 * r + j % 4].view(torch.int8) == q[row, 32 * b + j]
    assert packed[group, b, 2 * r : 2 * r + 2].view(torch.float16) == s[row, b]


@needs_q8
@pytest.mark.parametrize("m", [1, 3])
def test_the_kernels_norm_is_the_models_rms_norm_then_the_matmul(m):
    """With ``norm`` the kernel RMS-normalizes each row before quantizing it: the same as the kernel on
    rows normalized by the float32 reference (``reference_rms_norm``), on every path here."""
    g = torch.Generator().manual_seed(m)
    k, n = 896, 40
    qs, scales = q8.quantize_q8(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g) * 3
    weight = torch.rand(k, generator=g) + 0.5
    normed = q8.reference_rms_norm(x, weight, 1e-6)
    for level in q8.paths():
        matmul = q8.Q8Matmul(q8.pack(qs, scales), k, n, None, level)
        got = matmul(x, torch.float32, norm=(weight, 1e-6))
        torch.testing.assert_close(got, matmul(normed, torch.float32), rtol=1e-5, atol=1e-5)
    want = q8.reference_q8_matmul(normed, qs, scales)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="norm weight"):
        matmul(x, torch.float32, norm=(weight[:-1], 1e-6))
