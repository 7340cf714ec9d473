"""The 16-bit KV decode attention kernel (longdoc/native/attn16.c through longdoc.native.attn16): every
path against the float64 reference (``attend_reference`` on the float16 or bfloat16 K/V widened to
float64) and against each other, GQA groups, views of the cache that start at an offset, thread counts,
large scores with a running maximum that moves, the ISA cap's hold on its dispatch, its refusals, and
its NEON path cross-compiled and run under qemu-aarch64.

The tolerance: a path must be as accurate as plain float32 attention. Per query head, its largest
output error against the float64 reference is within 4 times that of ``attend_reference`` run in
float32 on the same inputs, plus 8 float32 ulps of the head's largest |v|; its lse error within 4
times the float32 one plus 8 ulps of max(1, |lse|). (The kernel rounds q * scale, the scores, the
weights and the sums in float32, in another order than torch's matmuls: measured, its errors are 0.1
to 1.3 times the float32 reference's.) Two paths are then within the sum of their tolerances of each
other, and one path on 1, 2 or 3 threads gives the same bits (the work is cut by n_keys alone)."""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from longdoc import cpu, native
from longdoc.attention.kernels import attend_reference
from longdoc.native import attn16

from .helpers import build_driver, driver_report, program

DRIVER = Path(__file__).parent / "data" / "attn16_driver.c"
SOURCE = Path(native.__file__).with_name("attn16.c")

ULP = 2.0**-24
# (query heads, KV heads): GQA groups of 1, 2, 7 (the 0.5B's 14 over 2) and 6 (the 1.5B's 12 over 2)
HEADS = [(3, 3), (4, 2), (14, 2), (12, 2)]
DIMS = [64, 128, 40]
KEYS = [0, 1, 7, 33, 1000, 4099]
# every K/V dtype, thread count and position of the view in its cache, cycled over the (heads, keys) pairs
COMBOS = list(itertools.product([torch.float16, torch.bfloat16], [1, 2], [0, 5]))

# judged without building (collection must not write a cache): the tests themselves build the kernel
needs_attn16 = pytest.mark.skipif(not native.likely_available("attn16"), reason="no C compiler or CPU flags here")


def cache(
    h: int, hkv: int, d: int, n: int, dtype: torch.dtype, offset: int, seed: int, magnitude: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (1, H, 1, D) float32 and the views k, v (1, Hkv, n, D) at position ``offset`` of caches with room
    for 3 more positions after them. Every position outside the views is NaN: a read of one shows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, 1, d, generator=g) * magnitude
    capacity = offset + n + 3
    k = torch.full((1, hkv, capacity, d), math.nan, dtype=dtype)
    v = torch.full((1, hkv, capacity, d), math.nan, dtype=dtype)
    k[:, :, offset : offset + n] = (torch.randn(1, hkv, n, d, generator=g) * magnitude).to(dtype)
    v[:, :, offset : offset + n] = (torch.randn(1, hkv, n, d, generator=g) * 2).to(dtype)
    return q, k[:, :, offset : offset + n], v[:, :, offset : offset + n]


def expected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 reference's out and lse, and the tolerances of out (per head, (1, H, 1, 1)) and lse."""
    want, want_lse = attend_reference(q.double(), k.double(), v.double(), False, scale)
    approx, approx_lse = attend_reference(q, k.float(), v.float(), False, scale)
    g = q.shape[1] // k.shape[1]
    vmax = v.double().abs().flatten(2).max(dim=2, keepdim=False).values if v.shape[2] else v.new_zeros(v.shape[:2])
    vmax = vmax.double().repeat_interleave(g, dim=1)  # (1, H)
    err32 = (approx.double() - want).abs().amax(dim=(2, 3))
    tol = 4 * (err32 + 8 * ULP * vmax)
    lse_tol = 4 * ((approx_lse.double() - want_lse).abs() + 8 * ULP * want_lse.abs().clamp(min=1))
    return want, want_lse, tol[:, :, None, None], lse_tol


def check(
    got: tuple[torch.Tensor, torch.Tensor],
    want: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    where: object,
) -> None:
    """out and lse (``got``) within the tolerances of the float64 reference (``expected``); without keys
    exactly 0 and -inf."""
    out, lse = got
    ref, ref_lse, tol, lse_tol = want
    assert out.shape == ref.shape and out.dtype == torch.float32, where
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32, where
    if (ref_lse == -math.inf).all():  # no keys
        assert (out == 0).all() and (lse == -math.inf).all(), where
        return
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), (where, f"out error {err.amax().item():.3g}, tolerance {tol.amin().item():.3g}")
    lse_err = (lse.double() - ref_lse).abs()
    assert (lse_err <= lse_tol).all(), (
        where,
        f"lse error {lse_err.amax().item():.3g}, tolerance {lse_tol.amin().item():.3g}",
    )


def levels() -> list[int]:
    return sorted(attn16.PATHS)


def skip_unless_runs(level: int) -> None:
    if level not in attn16.paths():
        pytest.skip(f"the {attn16.PATHS[level]} path does not run here (the NEON one runs under qemu below)")


@needs_attn16
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("level", levels(), ids=[attn16.PATHS[lv] for lv in levels()])
def test_every_path_matches_the_float64_reference_and_the_scalar_path(level, d):
    """GQA groups of 1, 2 and 7, head sizes with and without a tail of the SIMD width, 0 to 4099 keys
    (tails of the key blocks and chunks, several segments), each combination of K/V dtype, thread count
    and view offset: within the tolerance of the float64 reference (the module docstring), and within
    the sum of both tolerances of the scalar path."""
    skip_unless_runs(level)
    combos = itertools.cycle(COMBOS)
    seen = set()
    for (h, hkv), n in itertools.product(HEADS, KEYS):
        dtype, threads, offset = next(combos)
        seen.add((dtype, threads, offset))
        q, k, v = cache(h, hkv, d, n, dtype, offset, seed=h * 10000 + n + d)
        scale = 1 / math.sqrt(d)
        want = expected(q, k, v, scale)
        out, lse = attn16.attend16(q, k, v, n, scale, level=level, threads=threads)
        where = (h, hkv, d, n, dtype, threads, offset)
        check((out, lse), want, where)
        if level != attn16.SCALAR and n:
            scalar, scalar_lse = attn16.attend16(q, k, v, n, scale, level=attn16.SCALAR, threads=1)
            assert ((out - scalar).abs() <= 2 * want[2]).all(), where
            assert ((lse - scalar_lse).abs() <= 2 * want[3]).all(), where
    assert seen == set(COMBOS)


@needs_attn16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level", levels(), ids=[attn16.PATHS[lv] for lv in levels()])
def test_large_scores_and_a_moving_maximum(level, dtype):
    """Scores up to about +-80 (q and k scaled up; exp of them would overflow float32 without the
    running maximum), on keys whose magnitude grows along the positions (the maximum moves chunk after
    chunk: acc and l are rescaled often) and shrinks (the first keys dominate, the rest underflow)."""
    skip_unless_runs(level)
    n, d, h, hkv = 3000, 64, 14, 2
    for ramp in (torch.linspace(0.25, 1.5, n), torch.linspace(1.5, 0.25, n)):
        q, k, v = cache(h, hkv, d, n, dtype, 2, seed=7, magnitude=4.0)
        k.mul_(ramp.to(dtype)[None, None, :, None])
        scale = 1 / math.sqrt(d)
        want = expected(q, k, v, scale)
        assert want[1].abs().amax() > 60  # the scores are as large as meant
        check(attn16.attend16(q, k, v, n, scale, level=level, threads=2), want, ramp[0].item())


@needs_attn16
@pytest.mark.parametrize("level", levels(), ids=[attn16.PATHS[lv] for lv in levels()])
def test_each_query_head_reads_its_own_kv_head(level):
    """Values constant per KV head (1, 2, 3 ...): each query head's output is its own KV head's value, so
    query head h reads KV head h // (H / Hkv)."""
    skip_unless_runs(level)
    h, hkv, d, n = 12, 3, 40, 70
    q, k, v = cache(h, hkv, d, n, torch.float16, 1, seed=3)
    v.copy_(torch.arange(1, hkv + 1, dtype=torch.float16)[None, :, None, None].expand_as(v))
    out, _ = attn16.attend16(q, k, v, n, 0.1, level=level, threads=2)
    heads = (torch.arange(h) // (h // hkv) + 1).float()
    assert torch.allclose(out[0, :, 0], heads[:, None].expand(h, d), rtol=1e-5, atol=0)


@needs_attn16
@pytest.mark.parametrize("level", levels(), ids=[attn16.PATHS[lv] for lv in levels()])
def test_one_path_gives_the_same_bits_on_any_thread_count(level):
    """The keys are cut in segments by n_keys alone and the partial results merged in order, so the
    thread count changes nothing: 1, 2 and 3 threads, up to 16 segments (9000 keys), the same bits."""
    skip_unless_runs(level)
    for n in (1, 700, 9000):
        q, k, v = cache(14, 2, 64, n, torch.bfloat16, 0, seed=n)
        runs = [attn16.attend16(q, k, v, n, 0.125, level=level, threads=t) for t in (1, 2, 3)]
        for out, lse in runs[1:]:
            assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])


@needs_attn16
def test_only_the_first_n_keys_count_and_the_defaults():
    """n_keys None reads the whole view; a smaller n_keys equals the view cut to it; q may be bfloat16
    (widened to float32 first); threads and level default to torch's count and the best path."""
    q, k, v = cache(4, 2, 64, 50, torch.float16, 4, seed=11)
    whole = attn16.attend16(q, k, v, None, 0.125)
    assert torch.equal(whole[0], attn16.attend16(q, k, v, 50, 0.125, level=attn16.best_path())[0])
    part = attn16.attend16(q, k, v, 20, 0.125)
    cut = attn16.attend16(q, k[:, :, :20], v[:, :, :20], None, 0.125)
    assert torch.equal(part[0], cut[0]) and torch.equal(part[1], cut[1])
    qb = q.to(torch.bfloat16)
    assert torch.equal(attn16.attend16(qb, k, v, 50, 0.125)[0], attn16.attend16(qb.float(), k, v, 50, 0.125)[0])


@needs_attn16
def test_the_isa_cap_steers_the_paths(monkeypatch):
    """The kernel itself is never capped off (it needs no instruction set), but its SIMD loops are:
    under LONGDOC_ISA=none only the scalar loop runs, and asking for another is refused."""
    for var in ("LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    uncapped = attn16.paths()
    assert uncapped[0] == attn16.SCALAR and attn16.best_path() == uncapped[-1]
    flags = cpu._raw_flags()[0]
    assert (attn16.AVX2 in uncapped) == (cpu.arch() == "x86_64" and attn16.PATH_FLAGS[attn16.AVX2] <= flags)
    assert (attn16.NEON in uncapped) == (cpu.arch() in ("aarch64", "arm64"))
    for cap in ("none", "avx2"):
        monkeypatch.setenv("LONGDOC_ISA", cap)
        assert native.library("attn16") is not None and native._switched_off(native.SOURCES["attn16"]) is None
        assert attn16.paths() == ([attn16.SCALAR] if cap == "none" else uncapped)
    monkeypatch.setenv("LONGDOC_ISA", "none")
    assert attn16.best_path() == attn16.SCALAR
    q, k, v = cache(2, 1, 8, 3, torch.float16, 0, seed=1)
    out, _ = attn16.attend16(q, k, v, 3, 0.5)
    assert torch.equal(out, attn16.attend16(q, k, v, 3, 0.5, level=attn16.SCALAR)[0])
    for level in set(attn16.PATHS) - {attn16.SCALAR}:
        with pytest.raises(RuntimeError, match="does not run here"):
            attn16.attend16(q, k, v, 3, 0.5, level=level)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # torch's own cap, set by hand, caps it too
    monkeypatch.delenv("LONGDOC_ISA")
    assert attn16.paths() == [attn16.SCALAR]


@needs_attn16
def test_what_it_takes_and_what_it_refuses():
    q, k, v = cache(4, 2, 64, 10, torch.float16, 0, seed=5)
    assert attn16.takes(q, k, v) and attn16.takes(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16))
    refused = {
        "float32 K/V": (q, k.float(), v.float()),
        "two query rows": (q.expand(1, 4, 2, 64), k, v),
        "K and V dtypes": (q, k, v.to(torch.bfloat16)),
        "float64 q": (q.double(), k, v),
        "heads": (q[:, :3], k, v),
        "head size": (q[..., :32], k[..., :32], v),
        "strides": (q, k, v.contiguous()),  # v's heads 10 positions apart, k's (in its cache) 13
        "channels not contiguous": (q[..., ::2], k[..., ::2], v[..., ::2]),
        "batch 2": (q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)),
    }
    for why, (qq, kk, vv) in refused.items():
        assert not attn16.takes(qq, kk, vv), why
        with pytest.raises(ValueError, match="can't take these tensors"):
            attn16.attend16(qq, kk, vv, None, 0.125)
    with pytest.raises(ValueError, match="n_keys 11 is not within the 10 positions"):
        attn16.attend16(q, k, v, 11, 0.125)
    # the kernel's own refusal (return code 1) of what the bindings pass on: a scale that isn't finite
    with pytest.raises(RuntimeError, match=r"refused its input \(return code 1\)"):
        attn16.attend16(q, k, v, 10, math.nan)

    lib = native.library("attn16")
    assert lib is not None
    out, lse = torch.empty(4, 64), torch.empty(4)

    def call(h: int = 4, hkv: int = 2, d: int = 64, head: int = 832, row: int = 64, n: int = 10, **kw: object) -> int:
        args = dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), scale=0.125, level=0) | kw
        return int(
            lib.longdoc_attn16(
                args["q"],
                h,
                hkv,
                d,
                args["k"],
                args["v"],
                0,
                head,
                row,
                n,
                args["scale"],
                out.data_ptr(),
                lse.data_ptr(),
                1,
                args["level"],
            )
        )

    assert call() == 0
    bad = [
        call(d=0),
        call(d=257),
        call(hkv=3),
        call(hkv=0),
        call(h=1),
        call(n=-1),
        call(row=63),
        call(head=-1),
        call(level=9),
        call(level=-1),
        call(q=None),
        call(k=None),
        call(scale=math.inf),
    ]
    assert bad == [1] * len(bad)
    assert call(k=None, v=None, n=0) == 0 and (out == 0).all() and (lse == -math.inf).all()


def test_neon_path_under_qemu_and_the_x86_builds_match_the_reference_and_each_other(tmp_path):
    """tests/data/attn16_driver.c with the kernel, built for aarch64 (armv8-a) and run under qemu-aarch64,
    and built natively by cc and by clang, each with and without OpenMP where it links it (with it, the
    driver's cases alternate 1 and 2 threads): on 24 cases (12 sizes with tails of d, of the key blocks
    and chunks, several segments, scores up to about +-80; float16 and bfloat16) every path is within
    the driver's tolerance of its double-precision reference (as the tests above: as accurate as
    float32 arithmetic), the aarch64 build runs its scalar and NEON paths and picks NEON, and every
    build's scalar outputs have the same checksum (the same float operations in the same order: no
    fused multiply-adds under either compiler), the native cc build's, whose paths the float64
    reference checks above."""
    cross = program("aarch64-linux-gnu-gcc", needed_in_ci=True)
    qemu = program("qemu-aarch64", needed_in_ci=True)
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    arm = build_driver([cross], ["-static", "-march=armv8-a"], DRIVER, SOURCE, tmp_path / "armv8-a")
    runs = {"armv8-a on max": [qemu, "-cpu", "max", "-L", "/usr/aarch64-linux-gnu", str(arm)]}
    compilers = {"cc": cc} | ({"clang": [clang]} if (clang := shutil.which("clang")) else {})
    for name, command in compilers.items():
        for openmp in (False, True):
            if openmp and native._openmp(tuple(command)) is not None:
                continue  # this compiler doesn't link OpenMP here
            build = f"{name}{' -fopenmp' if openmp else ''}"
            flags = ["-fopenmp"] if openmp else []
            runs[build] = [str(build_driver(command, flags, DRIVER, SOURCE, tmp_path / build.replace(" ", "")))]
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in runs.items()
    }
    reports = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        reports[name] = driver_report(subprocess.CompletedProcess(runs[name], proc.returncode, stdout, stderr))
    for name, (paths, _, _) in reports.items():
        assert paths and all(run == 24 and wrong == 0 for run, wrong in paths.values()), (name, paths)
    assert set(reports["armv8-a on max"][0]) == {attn16.SCALAR, attn16.NEON}
    assert reports["armv8-a on max"][1] == attn16.NEON
    if cpu.arch() == "x86_64" and attn16.PATH_FLAGS[attn16.AVX2] <= cpu._raw_flags()[0]:
        for name in set(runs) - {"armv8-a on max"}:
            assert reports[name][0].keys() == {attn16.SCALAR, attn16.AVX2} and reports[name][1] == attn16.AVX2, name
    assert len({checksum for _, _, checksum in reports.values()}) == 1, reports
