"""What this machine gets: the dtype, packing, quantization and attention kernel that ``auto`` picks
for the CPU class at hand, and why, in one place (``longdoc doctor``, the JSON result's ``engine``).

The rules, each measured (benchmarks/RESULTS.md, "CPU paths", rendered from ``bench_paths``):

* dtype: bfloat16 where oneDNN has native bfloat16 matmuls (AMX, AVX-512 BF16), else float32. Without
  them a bfloat16 matmul runs several times slower than float32.
* packing: linears are packed for oneDNN wherever it packs their dtype: decode steps run faster packed,
  bfloat16 and float32 alike. Each weight is widened from its stored bfloat16 as it is packed, so
  packing costs no second copy.
* quantization: q8 where longdoc's Q8_0 kernel has an AVX2 or NEON loop (float32 or bfloat16;
  benchmarks/out/q8.json, from ``bench_q8``; on AVX-512 as fast a decode as int5's, with one copy of
  the weights), else int8 where torch's int8 GEMM has VNNI, else none. On AVX2 torch's int8 and int4
  CPU kernels are weight-only and decode slower than float32, so ``auto`` never picks them there and
  an explicit choice says so.
* attention: longdoc's ``flash.c`` for bfloat16 prefill where AVX-512 BF16 runs it, ``flash16.c`` for
  float32 prefill where its AVX2 loop runs, else torch's fused CPU kernel; decode steps read the 16-bit
  KV cache through ``attn16.c``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from longdoc import cpu, native
from longdoc.cpu import onednn_packs
from longdoc.models.resolve import cpu_has_fast_bf16
from longdoc.native import flash16, q8
from longdoc.quant.choose import quant_slower
from longdoc.quant.packing import packing_pays
from longdoc.quant.schemes import ONE_COPY, prefill_on_gemm

# CPU classes with native bfloat16 matmuls, longdoc's int5 kernel and its attention kernel (for the
# one-line hint on slower classes).
FAST_CLASSES = "a CPU with AVX-512 BF16 or AMX (Zen 4 and later, Xeon Sapphire Rapids and later)"


@dataclass(frozen=True)
class MachinePaths:
    """The choices for one run, as the JSON result's ``engine`` and ``longdoc doctor`` report them."""

    cpu_class: str
    isa_cap: str | None
    dtype: str
    packed: bool
    quantize: str
    attention: str
    #: one phrase per choice: why it is what it is here
    why: dict[str, str]


def attention_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The attention kernel that serves prefill, and why."""
    if kernel not in ("auto", "cpu"):
        return kernel, "asked for with kernel=" + kernel
    if device.type == "cuda":
        return "torch-cuda", "torch's fused CUDA attention"
    decode = (
        f"; decode steps read the {'float16' if dtype == torch.float32 else 'bfloat16'} KV cache through"
        " longdoc's attn16.c"
        if native.likely_available("attn16") and dtype in (torch.float32, torch.bfloat16)
        else "; decode steps use torch's too"
    )
    if dtype == torch.bfloat16 and native.likely_available("flash"):
        return "flash.c", "longdoc's AVX-512 BF16 kernel for prefill (about 2x torch's)" + decode
    if dtype == torch.float32 and flash16.fast():
        return "flash16.c", "longdoc's int16-product kernel for prefill (AVX2; about 1.5x torch's float32 one)" + decode
    if dtype != torch.bfloat16:
        return "torch-cpu", "torch's fused CPU kernel for prefill (flash.c is for bfloat16 runs, AVX-512 BF16)" + decode
    return "torch-cpu", "torch's fused CPU kernel: flash.c can't run here (AVX-512 BF16 and a C compiler)" + decode


def paths(
    device: torch.device,
    dtype: torch.dtype,
    quantize: str,
    pack: str = "auto",
    kernel: str = "auto",
    model_why: str = "asked for",
) -> MachinePaths:
    """The choices a run with these resolved settings makes on this machine, with their reasons."""
    klass = cpu.cpu_class() if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})"
    why: dict[str, str] = {"model": model_why}
    fast_bf16 = cpu_has_fast_bf16()
    if device.type != "cpu":
        why["dtype"] = "the GPU's"
    elif dtype == torch.bfloat16:
        why["dtype"] = (
            "native bfloat16 matmuls (oneDNN)"
            if fast_bf16
            else "asked for, but this CPU has no native bfloat16 matmuls: several times slower than float32 here"
        )
    else:
        why["dtype"] = "no native bfloat16 matmuls here" if not fast_bf16 else "asked for"
    packed = device.type == "cpu" and onednn_packs(dtype) and (pack == "on" or (pack == "auto" and packing_pays(dtype)))
    if quantize in ONE_COPY:
        packed = False
        why["packed"] = f"{quantize} keeps one copy of the weights, its own: prefill unpacks them per matmul"
    elif packed:
        why["packed"] = "pre-packed for oneDNN: " + ("3x" if dtype == torch.bfloat16 else "1.3x") + " on decode steps"
    elif device.type != "cpu" or not onednn_packs(dtype):
        why["packed"] = "oneDNN does not pack this dtype here"
    else:
        why["packed"] = "turned off"
    if quantize == "none":
        why["quantize"] = (
            "no quantized kernel here decodes faster (q8 needs AVX2 or NEON, int8 VNNI)"
            if device.type == "cpu"
            else "the quantized kernels are CPU kernels"
        )
    else:
        why["quantize"] = quant_slower(quantize, device, dtype) or (
            f"longdoc's Q8_0 kernel ({q8.PATHS[q8.best_path()]} loop): a quarter of float32's bytes per token"
            + (" or less (its 5-bit layout);" if q8.best_path() in q8.FIVE_BIT_PATHS - {q8.SCALAR} else ";")
            + (
                " prefill on its int16 gemm"
                if prefill_on_gemm(q8.gemm_fast(), dtype)
                else f" prefill on the weights unpacked to {str(dtype).removeprefix('torch.')} per matmul"
            )
            + ("; a decode step's layers in one native call (step.c)" if native.likely_available("step") else "")
            if quantize == "q8"
            else "decodes faster than unquantized here"
        )
    attention, why["attention"] = attention_kernel(kernel, device, dtype)
    return MachinePaths(klass, cpu.isa_cap(), str(dtype).removeprefix("torch."), packed, quantize, attention, why)


def kernel_notes(p: MachinePaths) -> list[str]:
    """What to say once about how the C kernels this run uses will run (one thread without OpenMP)."""
    on = (
        ("int5", p.quantize == "int5"),
        ("q8", p.quantize == "q8"),
        ("flash", p.attention == "flash.c"),
        ("flash16", p.attention == "flash16.c"),
        ("attn16", p.attention in ("torch-cpu", "flash16.c", "flash.c") and p.dtype in ("float32", "bfloat16")),
    )
    used = [name for name, used in on if used]
    return [f"{native.SOURCES[name].what}: {note}" for name in used for note in native.notes(name)]


def slow_path_hint(p: MachinePaths) -> str | None:
    """One line for a CPU run without native bfloat16 matmuls: what it gets, why, and what is faster."""
    if p.cpu_class in ("amx", "avx512bf16") or p.cpu_class.startswith("cuda"):
        return None
    cap = f", capped by the ISA setting at {p.isa_cap}" if p.isa_cap else ""
    if p.quantize == "q8" and q8.gemm_fast():
        how = "prefill multiplies on int16 activations (the q8 gemm); " + FAST_CLASSES + " runs it in bfloat16, faster"
    else:
        how = f"prefill multiplies in {p.dtype}; {FAST_CLASSES} runs it in bfloat16, about twice as fast"
    return (
        f"this CPU ({p.cpu_class}{cap}) runs {p.dtype} weights, quantize {p.quantize}, {p.attention} attention:"
        f" {how} (`longdoc doctor` says why)"
    )


@dataclass(frozen=True)
class CpuReport:
    """The CPU as ``longdoc doctor`` shows it."""

    name: str
    arch: str
    klass: str
    flags: list[str]  # the flags that decide a path, of those this CPU has
    flags_known: bool
    isa_cap: str | None
    torch_capability: str
    threads: int


@dataclass(frozen=True)
class DoctorReport:
    """What ``longdoc doctor`` reports: the CPU, the paths a run gets here and why, each C kernel's state
    (on, or the one-line reason it is off) and the one-line hint of a slow path."""

    cpu: CpuReport
    paths: MachinePaths
    kernels: dict[str, str]
    hint: str | None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cpu"]["class"] = out["cpu"].pop("klass")  # "class" is a keyword, not a field name
        return out


def doctor(p: MachinePaths) -> DoctorReport:
    """The doctor's report for a run with these choices, on this machine."""
    interesting = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "asimddp")
    kernels = {}
    for name in native.SOURCES:
        lib = native.library(name)
        on = "; ".join(["on", *native.notes(name)])
        kernels[name] = on if lib is not None else f"off: {native.why_unavailable(name)}"
    cpu_report = CpuReport(
        name=cpu.model_name(),
        arch=cpu.arch(),
        klass=p.cpu_class,
        flags=[f for f in interesting if f in cpu.flags()],
        flags_known=cpu.flags_known(),
        isa_cap=p.isa_cap,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
    )
    return DoctorReport(cpu=cpu_report, paths=p, kernels=kernels, hint=slow_path_hint(p))
