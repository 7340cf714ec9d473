"""Quantized linears for CPU decoding (``--quantize int5|q8|int8|int4``): the schemes as pure tensor
functions, and the module that runs them.

A decode step multiplies one row by every weight of the model, so its time is the time to read the
weights; quantized weights are fewer bytes to read. torch's CPU weight-only kernels do the multiply
without materializing the dequantized weight: ``_weight_int8pack_mm`` (per output channel, symmetric)
and ``_weight_int4pack_mm_for_cpu`` (per group of input channels, asymmetric: scale and minimum).

Those kernels lose to oneDNN's packed matmul on prefill-sized inputs, and so does dequantizing per
call. So a ``QuantLinear`` keeps the layer it replaces (packed, as ``pack_linears`` leaves it) for
inputs of more than ``max_rows`` rows and uses the quantized weight only for the few rows of a decode
step: prefill steps run unquantized (all but a final step of at most ``max_rows`` tokens), so the
prompt's KV cache is the unquantized model's. The cost is memory: the quantized copy comes on top
(benchmarks/RESULTS.md, "Peak memory of each --quantize").

int8 runs as llama.cpp runs its Q8_0 weights: the activations are quantized too, per block, and the
product is an int8 x uint8 matrix multiply (torch's x86 ``quantized::linear_dynamic``, fbgemm with
VNNI). torch's int8 *weight-only* kernel is compute-bound on these CPUs; the int8 GEMM reads the
weights at memory speed. The kernel quantizes its whole input with one scale and zero point (per row,
for a decode step's one row), which loses to the few large channels of a normalized hidden state. So
the inputs that are normalized hidden states (q, k, v, gate, up, the LM head) are cut into blocks of
``ACT_BLOCK`` channels, each block scaled to its own maximum and placed on its own row of a
block-diagonal matrix: the kernel then quantizes every block with the same relative step, and the
rows' outputs, times their block maxima, add up to the product. A block-diagonal row costs no more
weight reads than one row. Where the int8 GEMM is missing or saturates (CPUs without VNNI add pairs of
products in 16 bits), int8 falls back to the weight-only kernel.

int5 runs longdoc's own kernel (``longdoc.native.int5``, ``int5.c``: 5-bit weights in groups of 32 with
a float16 step and minimum, 6 bits per weight, times int16 activations per group of 32), built once per
machine where a C compiler and AVX-512 VNNI are found. It reads fewer bytes than int8 and keeps the
activations' large channels to their own groups. Quality and speed: benchmarks/RESULTS.md,
"Quantization: quality against bfloat16" and the headline tables.

q8 runs longdoc's Q8_0 kernel (``longdoc.native.q8``, ``q8.c``: llama.cpp's Q8_0 weights, int8 with a
float16 scale per block of 32 input channels, times int8 activations per block of 32) on every CPU: a
scalar loop, and AVX2, AVX-512 VNNI and NEON loops chosen at run time under the ISA cap. It takes float32 activations,
so it is the decode path of CPUs without AVX-512 (issue 26). The cache stores the codes (N, K) int8 and
scales (N, K/32) float16; the kernel's packed layout is made as the model loads. Weights on a 5-bit grid
(most of the embedded model's: its GGUF holds them in Q5_0) and the LM head get codes in -16..15
(``q8.quantize``), which pack to the kernel's 5-bit layout where its x86 SIMD loops run (AVX2, AVX-512
VNNI): a decode step reads 35% fewer bytes for them.

Quantization itself happens once, when the model is converted (``longdoc.quant.cache``).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from longdoc.config import QUANTIZE_SCHEMES
from longdoc.models.decoder import NormedRows
from longdoc.models.resolve import cpu_has_fast_bf16
from longdoc.models.weights import linear_weight, trim_heap
from longdoc.native import int5, q8

SCHEMES = QUANTIZE_SCHEMES

# Bumped when quantization changes its output: cached quantized weights of another version are rebuilt.
QUANT_VERSION = 5

# int4 group size (input channels sharing one scale and minimum): 32, the finest the CPU kernel takes,
# and the sub-block size of the GGUF Q4_K weights the embedded model comes from. Its perplexity cost is
# in benchmarks/RESULTS.md ("Quantization: quality against bfloat16").
INT4_GROUP = 32

# Inputs of at most this many rows use the quantized kernel; larger ones the unquantized layer: where the
# quantized kernels stop winning on one decoder layer's seven linears (benchmarks/HISTORY.md, "Weight-only
# quantization and llama.cpp"). A decode step has one row; short prefill steps (a question's last few
# tokens) stay near the crossover.
MAX_QUANT_ROWS = 4

# int8 activations: blocks of this many input channels get their own scale (llama.cpp's Q8_0 uses 32):
# most of per-row scaling's perplexity cost recovered (benchmarks/RESULTS.md, "Quantization: quality
# against bfloat16").
ACT_BLOCK = 128
# The linears whose input is a normalized hidden state (blocked); o_proj's and down_proj's inputs are
# quantized per row (blocking them too gained little for many times the rows).
BLOCKED_INPUTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
# Linears of one module that get the same input: one quantized matmul each set (fewer, larger calls per step).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# Schemes whose quantized weights are the model's only copy (``quantize_linears(keep_dense=False)``):
# prefill unpacks them (``QuantGemm.unpacked_matmul``). int5 keeps its bfloat16 copy: its unpacking is
# unwritten and its AVX-512 machines unmeasured here.
ONE_COPY = ("q8",)

# The tensor names a quantized cache stores for each quantized linear ``<module>``.
QWEIGHT, QSCALES = "qweight", "scales"


def in_features(scheme: str, qweight: torch.Tensor) -> int:
    """The input size K of a linear from its quantized weight's width."""
    width = int(qweight.shape[1])
    return width * 2 if scheme == "int4" else width * int5.BLOCK // 80 if scheme == "int5" else width  # q8: K


def input_widths(config: Mapping[str, Any]) -> list[int]:
    """The input sizes of a decoder's linears, from its config: hidden, attention output, MLP."""
    hidden, heads = int(config.get("hidden_size", 0)), int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or hidden // heads)
    return [hidden, heads * head_dim, int(config.get("intermediate_size", 0))]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight (N, K) -> (q int8 (N, K), scales float32 (N,)).

    ``weight ~= q * scales[:, None]``. Scales are rounded to bfloat16 first, so the kernel (which takes
    scales in the activations' dtype) multiplies by exactly the scale q was computed with.
    """
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16).float()
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric int4: weight (N, K) -> (q uint8 (N, K/2): two 4-bit values per byte, low
    nibble first; scales float32 (N, K/group, 2): each group's scale and minimum).

    ``weight[n, j] ~= q[n, j] * scale + minimum`` for j in the group, with q in 0..15, the group's
    range split in 15 steps. (Choosing each group's step for the least squared error instead lowered
    the weights' error by 9% but raised perplexity by 0.6-0.8%: it clips the largest weights;
    benchmarks/RESULTS.md.)
    """
    n, k = weight.shape
    if k % group or group % 2:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size ({group})")
    qs, ss = [], []
    for rows in weight.detach().split(8192):  # bounded temporaries for the LM head
        w = rows.float().view(rows.shape[0], k // group, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        lo = lo.to(torch.bfloat16).float()
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
        qs.append(q.view(rows.shape[0], k))
        ss.append(torch.stack([scale, lo], dim=-1))
    q = torch.cat(qs)
    return q[:, 0::2] | (q[:, 1::2] << 4), torch.cat(ss)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 nibbles -> (N, K) int32 values in 0..15."""
    n = packed.shape[0]
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(n, -1).to(torch.int32)


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)


def quantize_int5(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (32) asymmetric 5-bit: weight (N, K) -> (bits uint8 (N, K/128 * 80): each super-block's
    nibbles and fifth bits in the kernel's order (``pack_int5_bits``), scales float16 (N, K/32, 2): each
    group's step and minimum). ``weight[n, j] ~= q * step + minimum``, q in 0..31, the group's range
    split in 31 steps: weights on a 5-bit grid of 32 levels per group (the GGUF's Q5_0 blocks that span
    them) come back to within their bfloat16 rounding. (Choosing each group's number of steps, 15 to 31,
    for the least squared error, which matches more blocks' grids and clips nothing, raised perplexity
    at 4K from +0.64% to +0.85% in a scratch emulation; benchmarks/RESULTS.md.)
    """
    n, k = weight.shape
    if k % int5.BLOCK:
        raise ValueError(f"int5 needs the input size ({k}) to be a multiple of {int5.BLOCK}")
    bits, scales = [], []
    for rows in weight.detach().split(4096):  # bounded temporaries for the LM head
        w = rows.float().view(rows.shape[0], k // 32, 32)
        lo = w.amin(dim=-1, keepdim=True).to(torch.float16).float()
        step = ((w.amax(dim=-1, keepdim=True) - lo) / 31).to(torch.float16).float()
        step = step.clamp_(min=2.0**-24)  # the least float16 (subnormal): an all-equal group gets q = 0
        q = torch.round((w - lo) / step).clamp_(0, 31).to(torch.uint8)
        bits.append(pack_int5_bits(q.view(rows.shape[0], k)))
        scales.append(torch.cat([step, lo], dim=-1).to(torch.float16))
    return torch.cat(bits), torch.cat(scales)


def pack_int5_bits(q: torch.Tensor) -> torch.Tensor:
    """Values (N, K) in 0..31 -> (N, K/128 * 80) uint8: per super-block of 128, two pairs of groups'
    nibbles (32 bytes each: byte j of a group holds its weights j and j + 16), then per pair a 64-bit
    mask of the fifth bits in the kernel's lane order (a 0-15, b 0-15, a 16-31, b 16-31)."""
    n, k = q.shape
    q = q.view(n, k // 64, 2, 32)  # (row, pair, group a/b, weight)
    nib = ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).reshape(n, k // 128, 64)
    lanes = torch.cat([q[..., 0, :16], q[..., 1, :16], q[..., 0, 16:], q[..., 1, 16:]], dim=-1) >> 4
    masks = (lanes.view(n, k // 64, 8, 8).to(torch.int32) * _BIT_WEIGHTS).sum(-1).to(torch.uint8)
    return torch.cat([nib, masks.reshape(n, k // 128, 16)], dim=-1).reshape(n, -1)


def unpack_int5(bits: torch.Tensor) -> torch.Tensor:
    """(N, K/128 * 80) uint8 -> (N, K) int32 values in 0..31 (the inverse of ``pack_int5_bits``)."""
    n = bits.shape[0]
    b = bits.view(n, -1, 80)
    sb = b.shape[1]
    nib = b[..., :64].reshape(n, sb * 2, 2, 16).to(torch.int32)
    masks = b[..., 64:].reshape(n, sb * 2, 8, 1).to(torch.int32)
    lanes = ((masks >> torch.arange(8, dtype=torch.int32)) & 1).reshape(n, sb * 2, 64)
    high = torch.stack(
        [torch.cat([lanes[..., 0:16], lanes[..., 32:48]], -1), torch.cat([lanes[..., 16:32], lanes[..., 48:64]], -1)],
        dim=2,
    )
    low = torch.cat([nib & 15, nib >> 4], dim=-1)  # (n, pairs, 2, 32)
    return (low | (high << 4)).reshape(n, -1)


def dequantize(scheme: str, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float64 weight (N, K) a quantized one stands for (the reference for tests)."""
    if scheme == "int8":
        return qweight.double() * scales.double()[:, None]
    if scheme == "q8":
        return q8.dequantize_q8(qweight, scales)
    if scheme in ("int4", "int5"):
        q = (unpack_int4(qweight) if scheme == "int4" else unpack_int5(qweight)).double()
        n, groups = scales.shape[:2]
        scale, lo = scales[..., 0].double(), scales[..., 1].double()
        return (q.view(n, groups, -1) * scale[..., None] + lo[..., None]).view(n, -1)
    raise ValueError(f"unknown quantization {scheme!r}")


def quantize(
    scheme: str, weight: torch.Tensor, group: int = INT4_GROUP, head: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (N, K) -> the quantized weight and scales ``scheme`` stores; ``head``: it is the model's LM
    head (q8 stores it in 5 bits, ``q8.quantize``)."""
    if scheme == "int8":
        return quantize_int8(weight)
    if scheme == "int4":
        return quantize_int4(weight, group)
    if scheme == "int5":
        return quantize_int5(weight)
    if scheme == "q8":
        return q8.quantize(weight, head)
    raise ValueError(f"unknown quantization {scheme!r}")


def prefill_on_gemm(gemm_fast: bool, dtype: torch.dtype) -> bool:
    """Whether a q8 run in ``dtype`` multiplies prefill's many rows on the kernel's int16 gemm (where its
    AVX2 loop runs: ``gemm_fast``) rather than on the weights unpacked for a dense matmul: everywhere the
    loop runs but in bfloat16 runs where bfloat16 matmuls are native, whose dense matmul is faster
    (benchmarks/HISTORY.md, "One copy of the weights on AVX-512")."""
    return gemm_fast and not (dtype == torch.bfloat16 and cpu_has_fast_bf16())


@functools.cache
def int8_gemm_available() -> bool:
    """Whether torch's x86 int8 GEMM (``quantized::linear_dynamic``) runs here with full 8-bit
    activations: probed with all-maximal inputs and weights, whose pairwise sums overflow 16 bits on
    CPUs without VNNI (where the kernel saturates instead of adding)."""
    try:
        n, k = 8, 256
        q = torch.full((n, k), 127, dtype=torch.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = torch.ops.quantized.linear_prepack(
                torch._make_per_channel_quantized_tensor(
                    q, torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long), 0
                ),
                None,
            )
        x = torch.ones(1, k)
        x[0, 0] = -1 / 255  # the zero point at 1: every other input quantizes to 255
        out = torch.ops.quantized.linear_dynamic(x, packed, False)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, x @ q.float().T, rtol=1e-2))


@functools.cache
def _block_diagonal(blocks: int) -> torch.Tensor:
    """(M, M, 1) identity: spreads M blocks of one row over M rows."""
    return torch.eye(blocks)[:, :, None]


def prepare_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row x (1, K) -> (blocks (M, K) float32, block maxima (M, 1)), M = K / block: block m of x,
    divided by its largest magnitude, on row m (zeros elsewhere)."""
    k = x.shape[-1]
    xb = x.reshape(k // block, block).float()
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    return (_block_diagonal(k // block) * (xb / amax)).view(-1, k), amax


class QuantGemm:
    """The quantized weights of one or more linears that share their input (q/k/v; gate/up), stacked
    into one matrix, so a decode step makes one kernel call for all of them and hands each its
    columns. Each output channel gets the numbers a call of its own would give. (Fewer, larger calls:
    a scratch timing put 24 layers' q/k/v and gate/up in int4 at 8.7 ms as five calls per layer and
    7.7 ms as two; a whole decode step did not move measurably, benchmarks/RESULTS.md.)

    ``kind`` is the kernel: "gemm" (int8 through the int8 GEMM, where it runs), "int8" (weight-only),
    "int4", "int5" or "q8" (longdoc's own, ``native``; they add the biases themselves). ``act_block``: input
    channels per activation scale of the int8 GEMM (0, or one that does not divide K: per row).
    Outputs are in ``dtype``, biases included.
    """

    def __init__(
        self,
        scheme: str,
        qweights: list[torch.Tensor],
        scales: list[torch.Tensor],
        biases: list[torch.Tensor | None],
        dtype: torch.dtype,
        act_block: int = 0,
    ):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {scheme!r}")
        self.kind = "gemm" if scheme == "int8" and int8_gemm_available() else scheme
        self.dtype = dtype
        self.sizes = [int(q.shape[0]) for q in qweights]
        self.in_features = in_features(scheme, qweights[0])
        # the shared input last computed, its parts' outputs, and which parts have been taken (bits)
        self._last: list[Any] | None = None
        self.act_block = act_block if act_block and self.in_features % act_block == 0 else self.in_features
        self.bias: torch.Tensor | None = None
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [torch.zeros(n) if b is None else b.detach().float() for b, n in zip(biases, self.sizes, strict=True)]
            ).to(torch.float32 if self.kind == "gemm" else dtype)
        self.group = 0
        # a weight unpacked for a dense matmul, kept while ``holding`` (and how many holders there are)
        self._held: torch.Tensor | None = None
        self._holders = 0
        self.gemm_prefill = False
        if self.kind == "q8":  # packed from the parts, without stacking them first (pack's docstring)
            # the 5-bit layout where its loop runs and every code fits it (fewer bytes a decode step reads)
            five = q8.best_path() in q8.FIVE_BIT_PATHS - {q8.SCALAR}
            bits = 5 if five and all(q8.fits_five(q) for q in qweights) else 8
            self.q8 = q8.Q8Matmul(
                q8.pack(qweights, scales, bits), self.in_features, sum(self.sizes), self.bias, bits=bits
            )
            self.bias = None  # added by the kernel
            self.nbytes = self.q8.packed.numel()
            # prefill's products: the gemm, or the weight unpacked for a dense matmul
            self.gemm_prefill = prefill_on_gemm(self.q8.gemm_fast, dtype)
            return
        qweight, scale = torch.cat(qweights), torch.cat(scales)
        if self.kind == "gemm":
            qweight = qweight.to(torch.int8).contiguous()
            with warnings.catch_warnings():  # quantized tensors are deprecated, their kernels are not
                warnings.simplefilter("ignore")
                weight = torch._make_per_channel_quantized_tensor(
                    qweight, scale.double(), torch.zeros(qweight.shape[0], dtype=torch.long), 0
                )
                self.packed = torch.ops.quantized.linear_prepack(weight, None)
            self.nbytes = qweight.numel() + 4 * qweight.shape[0]
        elif self.kind == "int8":
            self.qweight = qweight.to(torch.int8).contiguous()
            self.scales = scale.to(dtype).contiguous()
        elif self.kind == "int5":
            self.int5 = int5.Int5Matmul(int5.layout(qweight, scale), self.in_features, sum(self.sizes), self.bias)
            self.bias = None  # added by the kernel
            self.nbytes = self.int5.packed.numel()
        else:
            self.group = self.in_features // int(scale.shape[1])
            # packed a block of rows at a time: unpacked int32 values of the LM head would be 0.5 GB at once
            self.qweight = torch.cat(
                [
                    torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight[i : i + 8192]), 1)
                    for i in range(0, qweight.shape[0], 8192)
                ]
            )
            # the kernel's layout: (K/group, N, 2) of (scale, zero) with w = (q - 8) * scale + zero
            step, lo = scale[..., 0].float(), scale[..., 1].float()
            self.scales = torch.stack([step, lo + 8 * step], dim=-1).transpose(0, 1).contiguous().to(dtype)
        if self.kind in ("int8", "int4"):
            self.nbytes = sum(t.numel() * t.element_size() for t in (self.qweight, self.scales))

    def row(self, x: torch.Tensor) -> torch.Tensor:
        """int8 GEMM of one row x (1, K) -> (1, N) float32, biases included."""
        if self.act_block == self.in_features:
            out = torch.ops.quantized.linear_dynamic(x.reshape(1, -1).float(), self.packed, False)
            return out if self.bias is None else out.add_(self.bias)
        blocks, amax = prepare_blocks(x, self.act_block)
        parts = torch.ops.quantized.linear_dynamic(blocks, self.packed, False)  # (M, N)
        amax = amax.view(1, -1)
        return torch.mm(amax, parts) if self.bias is None else torch.addmm(self.bias[None], amax, parts)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) -> (M, N) in ``dtype``, biases included; the int8 GEMM row by row (each row's
        activation scales are its own, as in a decode step)."""
        if self.kind == "gemm":
            out = self.row(rows) if rows.shape[0] == 1 else torch.cat([self.row(r) for r in rows.split(1)])
            return out.to(self.dtype)
        if self.kind == "int5":
            return self.int5(rows, self.dtype)
        if self.kind == "q8":
            return self.q8(rows, self.dtype)
        if self.kind == "int8":
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group, self.scales)
        return out if self.bias is None else out.add_(self.bias)

    @property
    def unpacks(self) -> bool:
        """Whether ``unpacked_matmul`` runs here: the weights can be unpacked for a dense matmul."""
        return self.kind == "q8"

    def unpacked_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) -> (M, N) in ``dtype``, biases included, for prefill's large steps: where the q8
        kernel's gemm has its AVX2 loop (``gemm_prefill``), through it (activations quantized to 16 bits,
        mostly 1.2-1.7x a float32 matmul: benchmarks/RESULTS.md, "Prefill on int16 activations");
        elsewhere, and for bfloat16 runs where bfloat16 matmuls are native, through the weight unpacked
        to ``dtype`` for this call only (kept for the next calls while ``holding``), a dense matmul,
        unpacking costing a few % of it ("One copy of the weights"). Either way this is the weight-only
        quantized model, up to the activations' 16-bit rounding or the weight's bfloat16 one."""
        if self.kind != "q8":
            raise RuntimeError(f"{self.kind} weights are not unpacked for dense matmuls")
        if self.gemm_prefill:
            return self.q8.gemm(rows.reshape(-1, self.in_features), self.dtype)
        bias = None if self.q8.bias is None else self.q8.bias.to(self.dtype)
        weight = self._held if self._held is not None else self.q8.rows(dtype=self.dtype)
        if self._holders:
            self._held = weight
        return torch.nn.functional.linear(rows.to(self.dtype), weight, bias)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Within the block, the weight unpacked by ``unpacked_matmul`` is kept for its next calls, not
        unpacked again (a prefill step's MLP runs its rows in parts, ``Decoder.feed_forward``); dropped
        when the last holder leaves."""
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            if not self._holders:
                self._held = None

    @property
    def fuses_glu(self) -> bool:
        """Whether ``glu`` runs here: two equal parts (a gate and its up, each a multiple of 8 rows) on the
        q8 gemm's AVX2 loop, where prefill takes it (``gemm_prefill``)."""
        return (
            self.gemm_prefill
            and len(self.sizes) == 2
            and self.sizes[0] == self.sizes[1]
            and self.sizes[0] % q8.GROUP == 0
        )

    def glu(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) -> silu(part 0) * part 1, (M, N/2) in ``dtype``, in one call of the q8 kernel
        (``Q8Matmul.glu``): a prefill step's gate and up products are never stored, and the activation
        and the product are no passes of their own."""
        return self.q8.glu(rows, self.dtype)

    def output(self, x: torch.Tensor | NormedRows, part: int, unpacked: bool = False) -> torch.Tensor:
        """x (..., K) -> linear ``part``'s output (..., N_part), through the kernel or, ``unpacked``,
        through ``unpacked_matmul``. With several linears, one call computes every part, and the others
        are kept until each has been taken once for this same input (then dropped: a prefill step's
        outputs are large). ``NormedRows`` are normalized by the kernel (q8) as it reads them."""
        last = self._last
        if last is None or last[0] is not x:
            if isinstance(x, NormedRows):
                weight = x.norm.weight
                weight = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
                rows = x.x.reshape(-1, self.in_features)
                out = self.q8(rows, self.dtype, norm=(weight, float(x.norm.variance_epsilon)))
            else:
                out = self.matmul_rows(x.reshape(-1, self.in_features), unpacked)
            if len(self.sizes) == 1:
                return out.view(*x.shape[:-1], -1)
            # one view, then the split (a decode step's dispatch is microseconds an operation); the parts
            # taken so far as bits
            last = self._last = [x, out.view(*x.shape[:-1], -1).split(self.sizes, dim=-1), 0]
        last[2] |= 1 << part
        if last[2] == (1 << len(self.sizes)) - 1:
            self._last = None
        return last[1][part]

    def matmul_rows(self, rows: torch.Tensor, unpacked: bool) -> torch.Tensor:
        return self.unpacked_matmul(rows) if unpacked else self.matmul(rows)


@functools.cache
def kernel_available(scheme: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch build runs ``scheme``'s CPU kernel for activations of ``dtype`` (probed on a
    tiny weight: builds without the op, or whose op refuses the dtype, fall back to unquantized)."""
    try:
        w = torch.randn(16, 128)
        layer = QuantLinear(nn.Linear(128, 16, bias=False), scheme, *quantize(scheme, w, 32), dtype=dtype)
        layer(torch.randn(1, 128, dtype=dtype))
    except (RuntimeError, AttributeError, NotImplementedError, ValueError):
        return False
    return True


class QuantLinear(nn.Module):
    """A linear layer with a quantized copy for small inputs.

    ``dense`` is the layer being replaced (an ``nn.Linear``, or a ``PackedLinear`` once
    ``pack_linears`` has run over the model, which packs it in place), or None where the quantized
    weight is the only copy (``quantize_linears(keep_dense=False)``). Inputs (..., K) with at most
    ``max_rows`` rows run the quantized kernel of ``gemm`` (its ``part``; a ``QuantGemm`` of this
    layer's own weight where none is given), larger ones run ``dense``, or without it the gemm's
    weight unpacked for the call (``QuantGemm.unpacked_matmul``).
    """

    def __init__(
        self,
        dense: nn.Module | None,
        scheme: str,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        dtype: torch.dtype = torch.bfloat16,
        max_rows: int = MAX_QUANT_ROWS,
        act_block: int = ACT_BLOCK,
        gemm: QuantGemm | None = None,
        part: int = 0,
    ):
        super().__init__()
        self.dense = dense
        self.max_rows = max_rows
        self.in_features = in_features(scheme, qweight)
        self.out_features = int(qweight.shape[0])
        if gemm is None:
            gemm = QuantGemm(scheme, [qweight], [scales], [getattr(dense, "bias", None)], dtype, act_block)
        self.gemm, self.part = gemm, part

    @property
    def takes_normed(self) -> bool:
        """Whether a decode step may hand this layer ``NormedRows`` (the norm done by the q8 kernel in
        float32, as the model's RMSNorm does in a float32 run)."""
        return self.gemm.kind == "q8" and self.gemm.dtype == torch.float32

    def quantized(self, x: torch.Tensor | NormedRows) -> torch.Tensor:
        """x (..., K) through the quantized weight, whatever the number of rows."""
        return self.gemm.output(x, self.part)

    def forward(self, x: torch.Tensor | NormedRows) -> torch.Tensor:
        if isinstance(x, NormedRows):
            if self.takes_normed and x.x.numel() <= self.max_rows * self.in_features:
                return self.quantized(x)
            x = x.value()
        if x.numel() <= self.max_rows * self.in_features:
            return self.quantized(x)
        if self.dense is None:
            return self.gemm.output(x, self.part, unpacked=True)
        out: torch.Tensor = self.dense(x)
        return out

    def holding_unpacked(self) -> contextlib.AbstractContextManager[None]:
        """A block within which this layer's weight, once unpacked for a dense matmul, is kept for the next
        calls (``QuantGemm.holding``; nothing to keep where a dense layer is)."""
        return self.gemm.holding() if self.dense is None and self.gemm.unpacks else contextlib.nullcontext()

    def glu_with(self, up: nn.Module, x: torch.Tensor | NormedRows) -> torch.Tensor | None:
        """silu(self(x)) * up(x) in one kernel call (``QuantGemm.glu``) where this layer is a gate whose
        ``up`` shares its gemm (parts 0 and 1), no dense layer is kept, x is a prefill step's many rows and
        the gemm fuses them here (``fuses_glu``); else None, and the caller runs the two linears."""
        fused = (
            isinstance(up, QuantLinear)
            and up.gemm is self.gemm
            and (self.part, up.part) == (0, 1)
            and self.dense is None
            and self.gemm.fuses_glu
        )
        if not fused or not isinstance(x, torch.Tensor) or x.numel() <= self.max_rows * self.in_features:
            return None
        return self.gemm.glu(x.reshape(-1, self.in_features)).view(*x.shape[:-1], -1)

    @property
    def nbytes(self) -> int:
        """This layer's share of its ``gemm``'s bytes."""
        return self.gemm.nbytes * self.out_features // sum(self.gemm.sizes)


def quantized_names(model: nn.Module) -> list[str]:
    """The linears a quantized cache covers: every ``nn.Linear`` of the model (attention and MLP
    projections and the LM head), by module name."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def quantize_linears(
    model: nn.Module,
    scheme: str,
    tensors: Mapping[str, torch.Tensor],
    max_rows: int = MAX_QUANT_ROWS,
    act_block: int = ACT_BLOCK,
    dtype: torch.dtype | None = None,
    keep_dense: bool = True,
) -> int:
    """Replace each ``nn.Linear`` named in ``tensors`` (``<name>.qweight``, ``<name>.scales``) by a
    ``QuantLinear`` wrapping it; returns how many. Run before ``pack_linears``, which then packs the
    wrapped layers (prefill's path) in place. Without ``keep_dense`` the linears are dropped (they may
    be weightless, on the meta device: ``build_model(skip_linears=True)``) and prefill runs on the
    quantized weights unpacked (schemes whose ``QuantGemm.unpacks``). Raises ValueError when a linear
    has no tensors or the shapes disagree (the cache belongs to another model).

    int8 linears named in ``BLOCKED_INPUTS`` scale their activations per ``act_block`` channels, the
    others per row; the linears of a module that share their input (``SHARED_INPUTS``) share one GEMM.
    """
    # the run's dtype: the linears' unless they wait, narrower, to be widened as they are packed
    run_dtype = dtype or linear_weight(model).dtype
    if not keep_dense and scheme not in ONE_COPY:
        raise ValueError(f"{scheme} weights are not unpacked for prefill: the dense linears must be kept")
    by_parent: dict[str, list[str]] = {}
    for name in quantized_names(model):
        by_parent.setdefault(name.rpartition(".")[0], []).append(name)

    def block_of(child: str) -> int:
        return act_block if child in BLOCKED_INPUTS else 0

    def replace_in(parent: str, names: list[str]) -> int:
        """Quantize the linears of one module: its tensors are read here, and freed once packed."""
        found = {}
        for name in names:
            module = model.get_submodule(name)
            try:
                qweight, scales = tensors[f"{name}.{QWEIGHT}"], tensors[f"{name}.{QSCALES}"]
            except KeyError:
                raise ValueError(f"the quantized weights have no entry for {name}") from None
            if (qweight.shape[0], in_features(scheme, qweight)) != (module.out_features, module.in_features):
                raise ValueError(f"the quantized weights of {name} do not match the model's shape")
            found[name.rpartition(".")[2]] = (module, qweight, scales)
        gemms: dict[str, tuple[QuantGemm | None, int]] = {}
        for siblings in SHARED_INPUTS:
            if all(c in found for c in siblings):
                modules, qweights, scales_ = zip(*(found[c] for c in siblings), strict=True)
                biases = [getattr(m, "bias", None) for m in modules]
                shared = QuantGemm(scheme, list(qweights), list(scales_), biases, run_dtype, block_of(siblings[0]))
                gemms.update({c: (shared, i) for i, c in enumerate(siblings)})
        owner = model.get_submodule(parent) if parent else model
        for child, (module, qweight, scales) in found.items():
            gemm, part = gemms.get(child, (None, 0))
            layer = QuantLinear(
                module, scheme, qweight, scales, run_dtype, max_rows, act_block=block_of(child), gemm=gemm, part=part
            )
            if not keep_dense:
                layer.dense = None
            setattr(owner, child, layer)
        # the codes just read and freed: back to the OS before the next module's are read (left in the
        # workers' heaps, a q8 load's peak RSS rose by a quarter of a GB, benchmarks/HISTORY.md, twelfth session)
        trim_heap()
        return len(found)

    # the LM head's module first and on its own: the head's codes (136 MB for the 0.5B model, read whole)
    # are packed and freed before any other layer's are read, not held beside them (q8 load's peak RSS:
    # 1218 against 1067 MiB, benchmarks/HISTORY.md, ninth session)
    done = 0
    output_embeddings = getattr(model, "get_output_embeddings", None)  # a transformers model's LM head
    head = output_embeddings() if callable(output_embeddings) else None
    head_parent = next((n.rpartition(".")[0] for n, m in model.named_modules() if m is head), None)
    if head is not None and head_parent in by_parent:
        done = replace_in(head_parent, by_parent.pop(head_parent))
    # packing a weight is single-threaded: modules are packed side by side, as many as there are threads
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        return done + sum(pool.map(replace_in, by_parent.keys(), by_parent.values()))


@contextlib.contextmanager
def every_row(model: nn.Module) -> Iterator[None]:
    """Within the block, every input of the model's ``QuantLinear`` layers, however many rows, runs
    through the quantized weight (to measure the quantized model itself, e.g. its perplexity)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [m.max_rows for m in layers]
    for m in layers:
        m.max_rows = sys.maxsize
    try:
        yield
    finally:
        for m, rows in zip(layers, saved, strict=True):
            m.max_rows = rows
