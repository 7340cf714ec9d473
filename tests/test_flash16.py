"""The int16-product prefill attention kernel (longdoc/native/flash16.c through longdoc.native.flash16): its
paths against each other bit for bit, against the float64 reference on the inputs as the kernel quantizes
them, and against the exact float64 attention within its design's error; tails of query tiles and key
blocks, GQA groups, head sizes up to 256 at the codes' extremes, float16 K/V, strided views, thread
counts, the ISA cap, its refusals, and its place in ``attend_cpu``.

The tolerances follow from the arithmetic (flash16.c's header):
* Every path performs the same float operations in the same order and the integer sums are exact, so
  the AVX2 path gives the scalar path's bits.
* Against the float64 attention of the dequantized inputs (q, k, v rounded to their codes as the kernel
  rounds them, ``dequantized`` below) only the probabilities' 13-bit codes and float32 roundings remain.
  A code whose product lands within an ulp of a half can round the other way in this float32 replica,
  so a row's lse may differ by one step of its largest score term: the lse tolerance is two such steps.
  The output's: 64 keys' probability steps of half max p' / PMAX, times max |v|, over l: 1e-3 max|v|.
* Against the exact attention: 12 and 11 bits of q and k per row (after the channel factors) and 12 of
  v: on N(0, 1) inputs with one channel of the keys 15 units off centre (the model's key biases),
  errors below 5e-3 (lse) and 5e-3 max|v| (out); float32 attention's are about 1e-5.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from longdoc import cpu, native
from longdoc.attention import kernels
from longdoc.attention.kernels import attend_reference
from longdoc.native import flash16

from .helpers import build_driver, program

DRIVER = Path(__file__).parent / "data" / "flash16_driver.c"
SOURCE = Path(native.__file__).with_name("flash16.c")

QMAX, KMAX, VMAX = 4095, 2047, 4095

needs_flash16 = pytest.mark.skipif(not native.likely_available("flash16"), reason="no C compiler or CPU flags here")
pytestmark = needs_flash16


def levels() -> list[int]:
    return list(flash16.PATHS)


def skip_unless_runs(level: int) -> None:
    if level not in flash16.paths():
        pytest.skip(f"the {flash16.PATHS[level]} path does not run here")


def inputs(
    b: int, h: int, hkv: int, lq: int, lk: int, d: int, seed: int, kv: torch.dtype = torch.float32, bias: float = 15.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    k[..., d // 3] += bias  # a channel large in every key, as the model's key biases make
    v = torch.randn(b, hkv, lk, d, generator=g) * 2
    return q, k.to(kv), v.to(kv)


def codes(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flash16.c's per-row codes in [-top, top] and their scale, in float32 as it computes them."""
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(float(top)) / amax, torch.zeros(()))
    return torch.round(x * inv).clamp(-top, top), amax / top


def dequantized(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as the kernel multiplies them (float64), and the per-row steps of q and k (float64):
    channel i of q times f_i, of k times 1 / f_i, f_i = sqrt(max|k_i| / max|q_i|) per KV head."""
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    k, v = k.float(), v.float()
    qa, ka = q.abs().reshape(b, hkv, g * lq, d).amax(2), k.abs().amax(2)
    f = torch.where((qa > 0) & (ka > 0), torch.sqrt(ka / qa), torch.ones(()))
    f = torch.where(torch.isfinite(f) & (f > 0), f, torch.ones(()))
    qc, qs = codes(q * f.repeat_interleave(g, dim=1)[:, :, None, :], QMAX)
    kc, ks = codes(k * (1 / f)[:, :, None, :], KMAX)
    vc, vs = codes(v, VMAX)
    return qc.double() * qs.double(), kc.double() * ks.double(), vc.double() * vs.double(), qs.double(), ks.double()


def check_against_dequantized(q, k, v, causal, scale, out, lse) -> None:
    qd, kd, vd, qs, ks = dequantized(q, k, v)
    ro, rl = attend_reference(qd, kd, vd, causal, scale)
    g = q.shape[1] // k.shape[1]
    # one code step of the row's largest score term: q's step times max |k| and k's step times max |q|
    kmax = kd.abs().amax((-1, -2)).repeat_interleave(g, dim=1)[..., None]  # (B, H, 1)
    kstep = ks.amax((-1, -2)).repeat_interleave(g, dim=1)[..., None]
    step = scale * (qs[..., 0] * kmax + kstep * qd.abs().amax(-1))
    assert ((lse.double() - rl).abs() <= 2 * step + 1e-5 * rl.abs().clamp(min=1)).all()
    vmax = vd.abs().amax()
    assert (out.double() - ro).abs().max() <= 1e-3 * vmax


CASES = [
    # b, h, hkv, lq, lk, d, causal: tails of the 16-query tile and the 64-key block, GQA 1, 3, 7
    (1, 14, 2, 200, 200, 64, True),
    (1, 14, 2, 17, 130, 64, False),
    (2, 3, 1, 77, 77, 96, True),
    (1, 4, 4, 16, 1, 64, False),
    (1, 6, 2, 64, 65, 6, False),
    (1, 2, 1, 33, 33, 256, True),
    (1, 2, 2, 40, 129, 2, False),
]


CASE_IDS = [f"b{c[0]}h{c[1]}kv{c[2]}q{c[3]}k{c[4]}d{c[5]}{'c' if c[6] else ''}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("level", levels(), ids=[flash16.PATHS[lv] for lv in levels()])
def test_each_path_matches_the_reference_on_the_codes_and_the_scalar_path(level, case):
    skip_unless_runs(level)
    b, h, hkv, lq, lk, d, causal = case
    q, k, v = inputs(b, h, hkv, lq, lk, d, seed=lq * 7 + d)
    scale = 1 / math.sqrt(d)
    out, lse = flash16.flash16(q, k, v, causal, scale, level)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    check_against_dequantized(q, k, v, causal, scale, out, lse)
    if level != flash16.SCALAR:
        so, sl = flash16.flash16(q, k, v, causal, scale, flash16.SCALAR)
        assert torch.equal(out, so) and torch.equal(lse, sl)


@pytest.mark.parametrize("level", levels(), ids=[flash16.PATHS[lv] for lv in levels()])
def test_the_design_error_against_exact_attention(level):
    skip_unless_runs(level)
    for causal, kv in ((True, torch.float32), (False, torch.float16)):
        q, k, v = inputs(1, 14, 2, 300, 300, 64, seed=3, kv=kv)
        out, lse = flash16.flash16(q, k, v, causal, 0.125, level)
        ro, rl = attend_reference(q.double(), k.double(), v.double(), causal, 0.125)
        assert (lse.double() - rl).abs().max() < 5e-3
        assert (out.double() - ro).abs().max() < 5e-3 * v.float().abs().max()


def test_float16_keys_and_values_are_read_as_stored():
    q, k, v = inputs(1, 4, 2, 48, 70, 64, seed=5, kv=torch.float16)
    o16, l16 = flash16.flash16(q, k, v, False, 0.125)
    o32, l32 = flash16.flash16(q, k.float(), v.float(), False, 0.125)
    assert torch.equal(o16, o32) and torch.equal(l16, l32)


def test_views_and_threads_give_the_same_bits():
    q, k, v = inputs(1, 4, 2, 50, 50, 64, seed=9)
    base = flash16.flash16(q, k, v, True, 0.125)
    # (B, L, H, D) storage seen as (B, H, L, D): strided heads and positions, the last dimension contiguous
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    strided = flash16.flash16(qt, kt, vt, True, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flash16.flash16(q, k, v, True, 0.125)
    finally:
        torch.set_num_threads(threads)
    for other in (strided, one):
        assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1])


def test_codes_at_their_extremes_do_not_overflow():
    """d = 256 with every q and k element at its row's maximum: the int32 sums peak at 256 * QMAX * KMAX,
    the probabilities at 64 * PMAX * VMAX (one key's weight, all its values at the maximum)."""
    d = 256
    q = torch.full((1, 1, 16, d), 0.5)
    k = torch.full((1, 1, 64, d), 0.5)
    v = torch.full((1, 1, 64, d), -3.0)
    out, lse = flash16.flash16(q, k, v, False, 1.0)
    assert torch.allclose(out, torch.full_like(out, -3.0), rtol=1e-3)
    assert torch.allclose(lse, torch.full_like(lse, 64.0 + math.log(64)), rtol=1e-4)


def test_each_query_head_reads_its_own_kv_head():
    q, k, v = inputs(1, 6, 3, 20, 40, 32, seed=11, bias=0.0)
    v[:, 1] += 100  # KV head 1 (query heads 2, 3) sits 100 away from the others
    out, _ = flash16.flash16(q, k, v, False, 0.2)
    means = out.mean((0, 2, 3))
    assert (means[2:4] > 50).all() and (means[[0, 1, 4, 5]].abs() < 5).all()


def test_a_causal_query_never_sees_a_later_key():
    q, k, v = inputs(1, 2, 1, 100, 100, 64, seed=13, bias=0.0)
    out, lse = flash16.flash16(q, k, v, True, 0.125)
    v2 = v.clone()
    v2[:, :, 60:] += 1000  # v's codes are per key: the earlier keys' are unchanged
    out2, lse2 = flash16.flash16(q, k, v2, True, 0.125)
    assert torch.equal(out[:, :, :60], out2[:, :, :60]) and torch.equal(lse, lse2)
    assert ((out2 - out)[:, :, 60:].mean(-1) > 1).all()


def test_attend_cpu_takes_it_for_float32_prefill_where_avx2_runs(monkeypatch):
    q, k, v = inputs(1, 4, 2, 32, 32, 64, seed=17)
    calls = []
    real = flash16.flash16
    monkeypatch.setattr(flash16, "flash16", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out, lse = kernels.attend_cpu(q, k, v, True, 0.125)
    assert len(calls) == (1 if flash16.fast() else 0)
    ro, rl = attend_reference(q.double(), k.double(), v.double(), True, 0.125)
    assert (lse.double() - rl).abs().max() < 5e-3
    # fewer queries than a tile, and bfloat16, stay on torch's kernel
    kernels.attend_cpu(q[:, :, :8], k[:, :, :8], v[:, :, :8], True, 0.125)
    kernels.attend_cpu(q.bfloat16(), k.bfloat16(), v.bfloat16(), True, 0.125)
    assert len(calls) == (1 if flash16.fast() else 0)


def test_the_isa_cap_leaves_only_the_scalar_loop(monkeypatch):
    monkeypatch.setenv("LONGDOC_ISA", "none")
    assert flash16.paths() == [flash16.SCALAR]
    assert not flash16.fast()
    q, k, v = inputs(1, 2, 1, 16, 16, 8, seed=19)
    with pytest.raises(RuntimeError, match="refused"):
        flash16.flash16(q, k, v, False, 0.5, flash16.AVX2)


def test_what_it_takes_and_what_it_refuses():
    q, k, v = inputs(1, 4, 2, 16, 16, 64, seed=23)
    assert flash16.takes(q, k, v)
    assert not flash16.takes(q[:, :, :15], k, v)  # fewer queries than a tile
    assert not flash16.takes(q.bfloat16(), k, v)
    assert not flash16.takes(q, k.half(), v)  # k and v of two dtypes
    assert not flash16.takes(q[..., :63], k[..., :63], v[..., :63])  # odd head size
    assert not flash16.takes(q[:, :3], k, v)  # 3 query heads over 2 KV heads
    q5, k5, v5 = inputs(1, 2, 1, 16, 16, 258, seed=1)
    assert not flash16.takes(q5, k5, v5)  # head size over 256
    with pytest.raises(ValueError):
        flash16.flash16(q.bfloat16(), k, v, False, 0.125)
    with pytest.raises(RuntimeError, match="refused"):
        flash16.flash16(q, k[:, :, :8], v[:, :, :8], True, 0.125)  # causal needs Lq == Lk
    with pytest.raises(RuntimeError, match="refused"):
        flash16.flash16(q, k, v, False, math.inf)


def test_every_build_and_architecture_gives_the_same_bits(tmp_path):
    """tests/data/flash16_driver.c with the kernel, built natively by cc and clang (with and without
    OpenMP where it links) and for aarch64 (run under qemu-aarch64: its scalar path, the one ARM runs):
    on 6 cases (tails of tiles, blocks and columns, GQA, causal, float16 K/V, a key-bias channel) every
    path of every build prints the same checksum of its outputs, the checksum of the native build's
    scalar path, which the tests above hold to float64. Emulated: correctness, not speed."""
    cross = program("aarch64-linux-gnu-gcc", needed_in_ci=True)
    qemu = program("qemu-aarch64", needed_in_ci=True)
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    arm = build_driver([cross], ["-static", "-march=armv8-a"], DRIVER, SOURCE, tmp_path / "arm")
    runs = {"aarch64": [qemu, "-cpu", "max", "-L", "/usr/aarch64-linux-gnu", str(arm)]}
    compilers = {"cc": cc} | ({"clang": [clang]} if (clang := shutil.which("clang")) else {})
    for name, command in compilers.items():
        for openmp in (False, True):
            if openmp and native._openmp(tuple(command)) is not None:
                continue
            build = f"{name}{'-openmp' if openmp else ''}"
            runs[build] = [str(build_driver(command, ["-fopenmp"] if openmp else [], DRIVER, SOURCE, tmp_path / build))]
    sums: dict[str, dict[int, str]] = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (name, proc.stderr)
        sums[name] = {int(w[1]): w[2] for w in (line.split() for line in proc.stdout.splitlines()) if w[0] == "path"}
    assert set(sums["aarch64"]) == {flash16.SCALAR}
    if flash16.PATH_FLAGS[flash16.AVX2] <= cpu._raw_flags()[0]:
        assert all(set(found) == {flash16.SCALAR, flash16.AVX2} for name, found in sums.items() if name != "aarch64")
    assert len({checksum for found in sums.values() for checksum in found.values()}) == 1, sums
