"""What this CPU can run: its feature flags, its class, and the ISA cap that makes longdoc run as on a
lesser CPU.

Flags come from ``/proc/cpuinfo`` on Linux and from ``sysctl`` on macOS, named as Linux names them
(``avx2``, ``avx512_vnni``, ``avx512_bf16``, ``amx_bf16``, ``asimddp``, ...). Where neither can be
read, ``flags_known()`` is False and callers decide conservatively (a kernel that needs a flag is then
tried by building it and asking its own CPU probe).

``LONGDOC_ISA=none|avx2|avx512|avx512vnni|avx512bf16|amx`` caps the CPU longdoc sees: the flags above
the level are dropped, so every choice (dtype, packing, quantization, kernels) is made as on such a
CPU, and ``apply_torch_cap()`` (run by ``longdoc/__init__.py`` before torch is imported) caps torch's
own kernels the same way (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``), unless they are set
already. torch's two variables, set by hand, cap longdoc too.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from longdoc.errors import UsageError

# The cap levels, lowest first.
ISA_LEVELS: tuple[str, ...] = ("none", "avx2", "avx512", "avx512vnni", "avx512bf16", "amx")

# The flags each level adds over the one below it (x86, and ARM's SIMD extensions under "avx2" and up:
# a cap of "none" is plain scalar code everywhere).
_ADDED: dict[str, frozenset[str]] = {
    "avx2": frozenset({"avx", "avx2", "fma", "f16c", "avx_vnni", "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
    "avx512vnni": frozenset({"avx512_vnni"}),
    "avx512bf16": frozenset({"avx512_bf16"}),
    "amx": frozenset({"amx_bf16", "amx_tile", "amx_int8"}),
}

# What torch is told under each cap (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA); None = leave as is.
_TORCH_CAP: dict[str, tuple[str | None, str | None]] = {
    "none": ("default", "SSE41"),
    "avx2": ("avx2", "AVX2"),
    "avx512": ("avx512", "AVX512_CORE"),
    "avx512vnni": ("avx512", "AVX512_CORE_VNNI"),
    "avx512bf16": ("avx512", "AVX512_CORE_BF16"),
    "amx": (None, None),
}


class IsaCapError(UsageError):
    """LONGDOC_ISA names no level (exit 2, like a bad option)."""


def isa_cap() -> str | None:
    """The cap in force, the lowest of ``LONGDOC_ISA`` and torch's own ISA variables; None = uncapped."""
    levels = []
    asked = os.environ.get("LONGDOC_ISA", "").strip().lower()
    if asked:
        if asked not in ISA_LEVELS:
            raise IsaCapError(f"LONGDOC_ISA accepts {', '.join(ISA_LEVELS)}, not {asked!r}")
        levels.append(asked)
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ("default", "zvector", "vsx"):
        levels.append("none")
    elif aten == "avx2":
        levels.append("avx2")
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if onednn:
        if onednn.startswith("SSE") or onednn == "AVX":
            levels.append("none")
        elif onednn.startswith("AVX2"):
            levels.append("avx2")
        elif onednn == "AVX512_CORE":
            levels.append("avx512")
        elif onednn == "AVX512_CORE_VNNI":
            levels.append("avx512vnni")
        elif onednn == "AVX512_CORE_BF16":
            levels.append("avx512bf16")
    return min(levels, key=ISA_LEVELS.index) if levels else None


def apply_torch_cap() -> None:
    """Tell torch's kernels the ``LONGDOC_ISA`` cap (before torch is imported; a variable already set
    wins). A bad value is left for the CLI to report."""
    asked = os.environ.get("LONGDOC_ISA", "").strip().lower()
    if asked not in _TORCH_CAP:
        return
    aten, onednn = _TORCH_CAP[asked]
    if aten:
        os.environ.setdefault("ATEN_CPU_CAPABILITY", aten)
    if onednn:
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", onednn)


def parse_cpu_flags(text: str) -> frozenset[str]:
    """The first processor's flags ("flags" on x86, "Features" on ARM) from /proc/cpuinfo text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


# macOS sysctl names -> Linux flag names (x86 leaf-7 and ARM feature keys)
_MAC_X86 = {
    "AVX1.0": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VL": "avx512vl",
    "AVX512DQ": "avx512dq",
    "AVX512CD": "avx512cd",
    "AVX512VNNI": "avx512_vnni",
}
_MAC_ARM = {
    "hw.optional.AdvSIMD": "asimd",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
}


def _sysctl(*names: str) -> str:
    try:
        return subprocess.run(["sysctl", *names], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _mac_flags() -> frozenset[str]:
    if platform.machine().lower() in ("arm64", "aarch64"):
        found = set()
        for line in _sysctl(*_MAC_ARM).splitlines():
            key, _, value = line.partition(":")
            if value.strip() == "1" and key.strip() in _MAC_ARM:
                found.add(_MAC_ARM[key.strip()])
        return frozenset(found)
    words = _sysctl("-n", "machdep.cpu.features", "machdep.cpu.leaf7_features").upper().split()
    return frozenset(_MAC_X86[w] for w in words if w in _MAC_X86)


@functools.lru_cache(maxsize=1)
def _raw_flags() -> tuple[frozenset[str], bool]:
    """(flags, whether they were read from the OS) before any cap."""
    try:
        found = parse_cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
        if found:
            return found, True
    except OSError:
        pass
    if platform.system() == "Darwin":
        found = _mac_flags()
        if found:
            return found, True
    return frozenset(), False


def flags_known() -> bool:
    """Whether the CPU's flags could be read (Linux, macOS); else ``flags()`` is empty."""
    return _raw_flags()[1]


def flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them, less those above the ISA cap."""
    found = _raw_flags()[0]
    cap = isa_cap()
    if cap is None:
        return found
    above = ISA_LEVELS[ISA_LEVELS.index(cap) + 1 :]
    dropped = set().union(*(_ADDED[level] for level in above))
    # AVX-512 and AMX flags not named in _ADDED (avx512_fp16, amx_fp16, ...) go with their family
    families = tuple(p for p, level in (("avx512", "avx512"), ("amx", "amx")) if level in above)
    return frozenset(f for f in found if f not in dropped and not (families and f.startswith(families)))


def arch() -> str:
    """The machine architecture: "x86_64", "aarch64" (macOS's "arm64" included), or what the OS says."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def model_name() -> str:
    """The CPU's model name where the OS says it, else the architecture."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith(("model name", "Model")):
            return line.split(":", 1)[1].strip()
    brand = _sysctl("-n", "machdep.cpu.brand_string").strip() if platform.system() == "Darwin" else ""
    return brand or arch()


def cpu_class() -> str:
    """The CPU class that decides longdoc's paths: "amx", "avx512bf16", "avx512vnni", "avx512",
    "avx2-vnni", "avx2", "x86-64" (no AVX2), "arm64-dotprod", "arm64", or the architecture's name."""
    f = flags()
    if arch() == "x86_64":
        for name, flag in (
            ("amx", "amx_bf16"),
            ("avx512bf16", "avx512_bf16"),
            ("avx512vnni", "avx512_vnni"),
            ("avx512", "avx512f"),
        ):
            if flag in f:
                return name
        if "avx2" in f:
            return "avx2-vnni" if "avx_vnni" in f else "avx2"
        return "x86-64"
    if arch() == "aarch64":
        return "arm64-dotprod" if "asimddp" in f else "arm64"
    return arch()


@functools.cache
def onednn_packs(dtype: Any) -> bool:
    """Whether oneDNN will pack a CPU weight of this (torch) dtype. A bfloat16 pack raises on CPUs without
    AVX-512 (or with oneDNN capped below it, ``ONEDNN_MAX_CPU_ISA=AVX2``): probing one small weight
    lets those runs fall back to plain matmuls instead of crashing mid-load."""
    import torch  # here, not at the top: this module runs before torch is imported (``apply_torch_cap``)

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True
