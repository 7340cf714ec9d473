"""Bindings of ``q8.c``: the Q8_0 format (llama.cpp's: int8 weights, one float16 scale per block of 32
input channels), the kernel's packed layout, its matmul on every CPU, and the float64 reference of
what it computes (the build is ``longdoc.native``).

The kernel has one loop per instruction set (``PATHS``); ``paths()`` lists those that run here, which
the ISA cap (``cpu.isa_cap()``) narrows as it narrows ``cpu.flags()``: under ``LONGDOC_ISA=none`` only
the scalar loop runs. ``--quantize q8`` runs decode steps' linears through it (``longdoc.quant.schemes``,
kind "q8")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from longdoc.native import library, runnable_paths, why_unavailable
from longdoc.native.matmul import run_matmul

# input channels per block; rows per group of the packed layout; bytes of one block of a group
BLOCK, GROUP, GROUP_BLOCK_BYTES = 32, 8, 272
# the 5-bit layout of the same format (codes in -16..15, llama.cpp's Q5_0 grid): bytes of a group's block
FIVE_BLOCK_BYTES = 176
# the packed layouts, by bits a code
BLOCK_BYTES = {8: GROUP_BLOCK_BYTES, 5: FIVE_BLOCK_BYTES}
# a weight whose 5-bit codes stand for it within this relative error (Frobenius norm) lies on a 5-bit grid
# already (the GGUF's Q5_0 blocks, rounded to bfloat16: about 0.002); any other weight is 20-40 times
# further (benchmarks/HISTORY.md, eleventh session)
ON_GRID = 0.01
# the largest activation code: the matmul (decode) quantizes activations to 8 bits, the gemm (prefill's
# many rows) to 16 (q8.c)
TOP8, TOP16 = 127, 32767

# the kernel's paths (its `level` argument; 0 asks it for the best it runs)
SCALAR, AVX2, NEON, NEON_DOT, VNNI = 1, 2, 3, 4, 5
PATHS = {SCALAR: "scalar", AVX2: "AVX2", NEON: "NEON", NEON_DOT: "NEON dot product", VNNI: "AVX-512 VNNI"}
# the paths that take the 5-bit layout (the x86 ones: their loop is one source, q8_rows.h)
FIVE_BIT_PATHS = frozenset({SCALAR, AVX2, VNNI})
# the CPU flags, as cpu.flags() names them (so less those above the ISA cap), each SIMD path needs
PATH_FLAGS = {
    AVX2: frozenset({"avx2", "fma", "f16c"}),
    VNNI: frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    NEON: frozenset({"asimd"}),
    NEON_DOT: frozenset({"asimd", "asimddp"}),
}


def quantize_q8(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (N, K), K a multiple of 32, -> its codes (N, K) int8 in -127..127 and scales (N, K/32)
    float16: per block of 32, scale = max|w| / 127 rounded to float16, and codes = round(w / scale)
    (half to even) with that rounded scale. A block of zeros has scale 0 and codes 0. Rows are done
    ``chunk_rows`` at a time, so an LM head needs no float32 copy of itself."""
    return _quantize_blocks(weight, chunk_rows, "Q8_0", lambda w: w.abs().amax(-1) / 127, -127, 127)


def quantize_q5(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (N, K), K a multiple of 32, -> codes (N, K) int8 in -16..15 and scales (N, K/32) float16 on
    llama.cpp's Q5_0 grid: per block, the weight of largest magnitude m (the first, on ties) gets code
    -16, scale = m / -16 rounded to float16, and codes = round(w / scale) (half to even) clamped to
    -16..15. A block of zeros has scale 0 and codes 0. A block quantized so by llama.cpp comes back to the
    same codes, even from its weights rounded to bfloat16 (their error, 2^-9 of each, moves no code)."""

    def scale(w: torch.Tensor) -> torch.Tensor:
        return w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1) / -16

    return _quantize_blocks(weight, chunk_rows, "Q5_0", scale, -16, 15)


def _quantize_blocks(
    weight: torch.Tensor,
    chunk_rows: int,
    what: str,
    scale_of: Callable[[torch.Tensor], torch.Tensor],
    low: int,
    high: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_q8's and quantize_q5's loop: per block of 32, scale = ``scale_of`` (blocks (R, K/32, 32)
    float32 -> (R, K/32)) rounded to float16, codes = round(w / scale) clamped to low..high (0 where the
    scale is 0), ``chunk_rows`` rows at a time."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"{what} needs the input width to be a multiple of {BLOCK}, not {k}")
    qs = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // BLOCK, dtype=torch.float16)
    for r in range(0, n, chunk_rows):
        w = weight[r : r + chunk_rows].detach().float().reshape(-1, k // BLOCK, BLOCK)
        s = scale_of(w).to(torch.float16)
        if not torch.isfinite(s).all():
            raise ValueError(f"{what} scales overflow float16: the weight has values too large or not finite")
        wide = s.float().unsqueeze(-1)
        codes = torch.where(wide != 0, torch.round(w / wide), torch.zeros_like(w)).clamp_(low, high)
        qs[r : r + chunk_rows] = codes.reshape(-1, k).to(torch.int8)
        scales[r : r + chunk_rows] = s
    return qs, scales


def relative_error(weight: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, chunk_rows: int = 4096) -> float:
    """||weight - dequantized|| / ||weight|| (Frobenius norms), a few rows at a time; 0 for a zero weight."""
    err = norm = 0.0
    for r in range(0, weight.shape[0], chunk_rows):
        w = weight[r : r + chunk_rows].detach().double()
        err += float((w - dequantize_q8(qs[r : r + chunk_rows], scales[r : r + chunk_rows])).pow(2).sum())
        norm += float(w.pow(2).sum())
    return (err / norm) ** 0.5 if norm > 0 else 0.0


def quantize(weight: torch.Tensor, head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and scales the q8 scheme stores for a weight: its 5-bit ones (``quantize_q5``) where they
    stand for it within ``ON_GRID`` (it lies on a 5-bit grid already: nothing is lost, and decode reads the
    5-bit layout on AVX2) or where it is the model's LM head (``head``: the largest read of a decode step,
    about a third of its bytes in 8 bits; 5 bits there cost the embedded model 0.2-0.3% of perplexity,
    benchmarks/HISTORY.md, eleventh session), else the 8-bit ones (``quantize_q8``)."""
    qs, scales = quantize_q5(weight)
    if head or relative_error(weight, qs, scales) < ON_GRID:
        return qs, scales
    return quantize_q8(weight)


def fits_five(qs: torch.Tensor) -> bool:
    """Whether codes (N, K) int8 all lie in -16..15, so pack to the 5-bit layout."""
    return bool(qs.numel() == 0 or (int(qs.min()) >= -16 and int(qs.max()) <= 15))


def dequantize_q8(qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) and scales (N, K/32) -> the weight they stand for, (N, K) float64 (exact)."""
    n, k = qs.shape
    return (qs.double().view(n, k // BLOCK, BLOCK) * scales.double().unsqueeze(-1)).view(n, k)


# groups of 8 rows packed per step: bounds pack's temporaries (a few MB) whatever the weight's size
_PACK_GROUPS = 512


def _rows(parts: Sequence[torch.Tensor], r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1-1 of the parts stacked (without stacking them all)."""
    pieces, first = [], 0
    for part in parts:
        a, b = max(r0, first), min(r1, first + part.shape[0])
        if a < b:
            pieces.append(part[a - first : b - first])
        first += part.shape[0]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def pack(
    qs: torch.Tensor | Sequence[torch.Tensor], scales: torch.Tensor | Sequence[torch.Tensor], bits: int = 8
) -> torch.Tensor:
    """Codes (N, K) int8 and scales (N, K/32) float16 -> the kernel's layout, (ceil(N/8), K/32 * 272)
    uint8: groups of 8 rows (the last padded with zero rows, scale 0), each a run of blocks in input
    order; a block is the 8 rows' float16 scales, then 8 steps of 32 bytes, step s holding each row's
    weights 4s..4s+3 of the block in turn (q8.c). With ``bits`` 5 (codes in -16..15: ``fits_five``),
    the 5-bit layout, (ceil(N/8), K/32 * 176): the scales, then the steps' codes + 16 as nibbles (piece t:
    step t low, step t + 4 high) and fifth bits (byte i, bit s: step s's byte i). Lists of codes and
    scales are packed as their rows stacked (linears that share their input). Written in place a few
    groups at a time: beyond the codes and the result it holds a few MB (an LM head's codes alone are
    136 MB)."""
    qparts = [qs] if isinstance(qs, torch.Tensor) else list(qs)
    sparts = [scales] if isinstance(scales, torch.Tensor) else list(scales)
    k = int(qparts[0].shape[1])
    nb = k // BLOCK
    for q, sc in zip(qparts, sparts, strict=True):
        if k % BLOCK or q.shape[1] != k or sc.shape != (q.shape[0], nb):
            raise ValueError(f"codes {tuple(q.shape)} and scales {tuple(sc.shape)} are not a Q8_0 weight")
    if bits not in BLOCK_BYTES:
        raise ValueError(f"the Q8_0 kernel packs 8 or 5 bits a code, not {bits}")
    n = sum(int(q.shape[0]) for q in qparts)
    groups = -(-n // GROUP)
    out = torch.empty(groups, nb * BLOCK_BYTES[bits], dtype=torch.uint8)
    blocks = out.view(groups, nb, BLOCK_BYTES[bits])
    for g0 in range(0, groups, _PACK_GROUPS):
        g1 = min(groups, g0 + _PACK_GROUPS)
        r0, r1, count = g0 * GROUP, min(n, g1 * GROUP), g1 - g0
        q = _rows(qparts, r0, r1).to(torch.int8)
        s = _rows(sparts, r0, r1).to(torch.float16)
        pad = count * GROUP - (r1 - r0)
        if pad:
            q = torch.cat([q, q.new_zeros(pad, k)])
            s = torch.cat([s, s.new_zeros(pad, nb)])
        # scales: (group, row, block) -> (group, block, row); codes: (group, row, block, step, j) ->
        # (group, block, step, row, j)
        blocks[g0:g1, :, : 2 * GROUP].copy_(s.view(count, GROUP, nb).transpose(1, 2).contiguous().view(torch.uint8))
        steps = q.view(count, GROUP, nb, BLOCK // 4, 4).permute(0, 2, 3, 1, 4)  # (group, block, step, row, j)
        if bits == 8:
            blocks[g0:g1, :, 2 * GROUP :].view(count, nb, BLOCK // 4, GROUP, 4).copy_(steps.view(torch.uint8))
            continue
        if not fits_five(q):
            raise ValueError("codes beyond -16..15 do not pack to 5 bits")
        u = (steps.to(torch.int16) + 16).reshape(count, nb, BLOCK // 4, 32)  # step s's 32 bytes, 0..31
        nibbles = (u[:, :, :4] & 15) | ((u[:, :, 4:] & 15) << 4)
        fifth = ((u >> 4) << torch.arange(BLOCK // 4, dtype=torch.int16).view(1, 1, -1, 1)).sum(2)
        blocks[g0:g1, :, 2 * GROUP : 2 * GROUP + 128].copy_(nibbles.reshape(count, nb, 128).to(torch.uint8))
        blocks[g0:g1, :, 2 * GROUP + 128 :].copy_(fifth.to(torch.uint8))
    return out


def paths() -> list[int]:
    """The kernel's paths that run here, lowest first (``PATHS``): those its own CPU probe finds, less
    those whose flags the ISA cap drops (``native.runnable_paths``). Empty where the kernel isn't
    available at all."""
    return runnable_paths("q8", PATHS, SCALAR, PATH_FLAGS)


def best_path() -> int:
    """The path a ``Q8Matmul`` takes by default here (``paths()``'s last)."""
    found = paths()
    if not found:
        raise RuntimeError(f"the Q8_0 kernel is not available: {why_unavailable('q8')}")
    return found[-1]


def gemm_fast() -> bool:
    """Whether the kernel's gemm (``Q8Matmul.gemm``) runs its AVX2 loop here: built with it, and the
    AVX2 path runs under the ISA cap."""
    lib = library("q8")
    return lib is not None and AVX2 in paths() and bool(lib.longdoc_q8_gemm_fast())


def quantize_activations(x: torch.Tensor, top: int = TOP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (M, K) -> the kernel's codes (M, K/32, 32) in -top..top, as float32, and their scales (M,
    K/32) float32: per block, scale = max|x| / top and codes = round(x * (top / max|x|)) half to even,
    each operation rounded to float32 as q8.c rounds it (torch's float32 division by a tensor is
    correctly rounded; the reciprocal is taken in float64 and rounded once, which is the same)."""
    m, k = x.shape
    groups = x.float().view(m, k // BLOCK, BLOCK)
    amax = groups.abs().amax(-1)
    inv = torch.where(amax > 0, (top / amax.double()).float(), torch.zeros_like(amax))
    codes = torch.round(groups * inv.unsqueeze(-1)).clamp_(-top, top)
    return codes, (amax.double() / top).float()


def reference_terms(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, top: int = TOP8) -> torch.Tensor:
    """Each block's term of out = x @ W^T, (M, N, K/32) float64, exactly: the int32 sum of the block's
    codes (activations quantized to ``top``) times the product of its two scales."""
    codes, sx = quantize_activations(x, top)
    n, k = qs.shape
    dots = torch.einsum("mbj,nbj->mnb", codes.double(), qs.double().view(n, k // BLOCK, BLOCK))
    return dots * (scales.double().unsqueeze(0) * sx.double().unsqueeze(1))


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What the kernel's ``norm`` does to rows x (M, K) float32: weight * (x * r), r = 1 / sqrt(mean(x^2)
    + eps) rounded to float32 (the models' RMSNorm in float32, the sum taken in float64)."""
    r = (1 / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True).float().double() + eps)).float()
    return weight.float() * (x.float() * r)


def reference_q8_matmul(
    x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, top: int = TOP8
) -> torch.Tensor:
    """What the kernel promises, in float64: rows (M, K) quantized per block (``quantize_activations``:
    ``TOP8`` for its matmul, ``TOP16`` for its gemm) times the Q8_0 weight, block sums exact, plus bias
    -> (M, N). The kernel differs only by rounding its float32 scale products and its block-by-block
    float32 accumulation, and its output."""
    out = reference_terms(x, qs, scales, top).sum(-1)
    return out if bias is None else out + bias.double()


def reference_silu(x: torch.Tensor) -> torch.Tensor:
    """silu in float64: x / (1 + exp(-x))."""
    x = x.double()
    return x / (1 + torch.exp(-x))


def reference_glu(
    x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What ``Q8Matmul.glu`` promises, in float64: the weight's first half of rows is the gate, the second
    the up; silu(gate) * up, each the gemm's product (``reference_q8_matmul`` with ``TOP16``)."""
    both = reference_q8_matmul(x, qs, scales, bias, top=TOP16)
    gate, up = both.chunk(2, dim=-1)
    return reference_silu(gate) * up


class Q8Matmul:
    """Calls of the kernel for one packed Q8_0 weight (N, K), bias added, on one path (``level``: one of
    ``paths()``; the best here by default). ``bits``: the packed layout, 8 or 5 (``pack``; 5 runs on the
    scalar and AVX2 paths)."""

    def __init__(
        self,
        packed: torch.Tensor,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        level: int | None = None,
        bits: int = 8,
    ):
        lib = library("q8")
        if lib is None:
            raise RuntimeError(f"the Q8_0 kernel is not available: {why_unavailable('q8')}")
        groups = -(-out_features // GROUP)
        if (
            bits not in BLOCK_BYTES
            or in_features % BLOCK
            or packed.shape != (groups, in_features // BLOCK * BLOCK_BYTES[bits])
        ):
            raise ValueError(
                f"a packed Q8_0 weight ({in_features} -> {out_features}, {bits} bits) is not {tuple(packed.shape)}"
            )
        self.level = best_path() if level is None else level
        if self.level not in paths():
            raise RuntimeError(f"the Q8_0 kernel's {PATHS.get(self.level, self.level)} path does not run here")
        if bits == 5 and self.level not in FIVE_BIT_PATHS:
            raise RuntimeError(f"the Q8_0 kernel's {PATHS[self.level]} path takes the 8-bit layout only")
        self.bits = bits
        self.lib, self.packed, self.k, self.n = lib, packed.contiguous(), in_features, out_features
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(
        self,
        rows: torch.Tensor,
        dtype: torch.dtype,
        threads: int | None = None,
        norm: tuple[torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """rows (M, K) bfloat16 or float32 -> (M, N) in ``dtype`` (bfloat16 or float32), on ``threads``
        threads (torch's count by default). With ``norm`` (weight (K,) float32, eps) each row is first
        RMS-normalized (``reference_rms_norm``), in the same call."""
        if rows.dim() != 2 or rows.shape[1] != self.k:
            raise RuntimeError(f"the Q8_0 kernel takes rows (M, {self.k}), not {tuple(rows.shape)}")
        if norm is not None and (norm[0].dtype != torch.float32 or norm[0].shape != (self.k,)):
            raise RuntimeError(f"the Q8_0 kernel's norm weight must be ({self.k},) float32")
        threads = torch.get_num_threads() if threads is None else threads
        shape = (self.k, self.n)
        weight = None if norm is None else norm[0].contiguous()  # held until the call returns
        return run_matmul(
            self.lib.longdoc_q8_matmul,
            "the Q8_0 kernel",
            rows,
            self.packed,
            shape,
            self.bias,
            dtype,
            threads,
            self.level,
            None if weight is None else weight.data_ptr(),
            0.0 if norm is None else norm[1],
            self.bits,
        )

    @property
    def gemm_fast(self) -> bool:
        """Whether ``gemm`` has its AVX2 loop on this path (``gemm_fast()``; the AVX-512 VNNI path's gemm
        is the AVX2 one); elsewhere only its scalar loop runs, many times slower than a float32 matmul on
        the weight unpacked (``rows``)."""
        return self.level in (AVX2, VNNI) and gemm_fast()

    def gemm(self, rows: torch.Tensor, dtype: torch.dtype, threads: int | None = None) -> torch.Tensor:
        """rows (M, K) bfloat16 or float32 -> (M, N) in ``dtype``, bias added, with the activations
        quantized to 16 bits (``reference_q8_matmul`` with ``TOP16``): prefill's many-row products, on
        the AVX2 loop where ``gemm_fast``, else the scalar one."""
        return self._many_rows(self.lib.longdoc_q8_gemm, "the Q8_0 gemm", self.n, rows, dtype, threads)

    def glu(self, rows: torch.Tensor, dtype: torch.dtype, threads: int | None = None) -> torch.Tensor:
        """A gated MLP's first half: this weight holds the gate's N/2 rows then the up's (N/2 a multiple of
        8); rows (M, K) -> silu(gate) * up, (M, N/2) in ``dtype``, each product as ``gemm`` computes it
        (``reference_glu``), without the two (M, N/2) products ever being stored."""
        if self.n % (2 * GROUP):
            raise RuntimeError(f"a glu's gate and up are {self.n // 2} rows each, not a multiple of {GROUP}")
        return self._many_rows(self.lib.longdoc_q8_glu, "the Q8_0 glu", self.n // 2, rows, dtype, threads)

    def _many_rows(
        self, entry: Any, what: str, width: int, rows: torch.Tensor, dtype: torch.dtype, threads: int | None
    ) -> torch.Tensor:
        """``gemm``'s and ``glu``'s call: ``entry`` over rows (M, K) -> (M, ``width``)."""
        if rows.dim() != 2 or rows.shape[1] != self.k:
            raise RuntimeError(f"the Q8_0 kernel takes rows (M, {self.k}), not {tuple(rows.shape)}")
        threads = torch.get_num_threads() if threads is None else threads
        level = AVX2 if self.gemm_fast else SCALAR
        return run_matmul(entry, what, rows, self.packed, (self.k, width), self.bias, dtype, threads, level, self.bits)

    def rows(self, ids: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` (M,) int64 of the weight (all N when None), dequantized -> (M, K) in ``dtype``
        (float32, exact; or bfloat16, rounded): prefill's matmuls and a tied embedding's lookups."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise RuntimeError("the Q8_0 kernel unpacks to float32 or bfloat16")
        index = None if ids is None else ids.reshape(-1).to(torch.int64).contiguous()
        m = self.n if index is None else int(index.numel())
        out = torch.empty(m, self.k, dtype=dtype)
        rc = self.lib.longdoc_q8_rows(
            self.packed.data_ptr(),
            self.k,
            self.n,
            None if index is None else index.data_ptr(),
            m,
            out.data_ptr(),
            int(dtype == torch.bfloat16),
            torch.get_num_threads(),
            self.bits,
            self.level,
        )
        if rc != 0:
            raise RuntimeError(f"the Q8_0 weight has {self.n} rows: row ids out of range")
        return out
