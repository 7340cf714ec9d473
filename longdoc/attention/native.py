"""longdoc's C kernels, built once per machine with the system C compiler and loaded with ctypes.

* ``int5.c``: 5-bit weights times int16-quantized activations (AVX-512 VNNI) for decoding. torch has no
  CPU kernel for weights of fewer than 8 bits but 4, and 4 bits lose 4% perplexity on the embedded
  model (its GGUF is mostly 5-bit); this one reads the weights at memory speed.
* ``flash.c``: exact bfloat16 attention with its log-sum-exp (AVX-512 BF16) for prefill, about twice
  torch's fused CPU kernel on the model's shapes (``benchmarks/bench_attention.py``).

A library is compiled from the packaged source on first use into ``<cache>/native/<name>-<digest>.so``,
where the digest covers the source, the compiler's version and the flags: a changed source or compiler
builds anew. It is written to a temporary name and renamed (atomic), with its sha256 beside it, checked
on every load; a file that fails the check is rebuilt. No compiler, a failed build, or a CPU without the
instructions makes ``library(name)`` return None, and the caller then takes torch's path; the reason is
in ``why_unavailable(name)``. ``LONGDOC_NATIVE=0`` turns the kernels off, and so do
``ATEN_CPU_CAPABILITY`` or ``ONEDNN_MAX_CPU_ISA`` capping torch below what a kernel needs (running as
another CPU would).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from longdoc import store

FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11")
# int5 super-blocks: input channels, and bytes per output channel of each
BLOCK, BLOCK_BYTES = 128, 96


@dataclass(frozen=True)
class Source:
    """One kernel library: its C file, what it is (for messages), the instructions it needs (as named in
    messages and in /proc/cpuinfo), and the ``ONEDNN_MAX_CPU_ISA`` values below it besides pre-AVX-512."""

    file: str
    what: str
    needs: str
    cpu_flags: frozenset[str]
    onednn_below: tuple[str, ...]


_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"})
SOURCES = {
    "int5": Source("int5.c", "the int5 kernel", "AVX-512 VNNI", _AVX512 | {"avx512_vnni", "f16c"}, ("AVX512_CORE",)),
    "flash": Source(
        "flash.c",
        "the attention kernel",
        "AVX-512 BF16",
        _AVX512 | {"avx512_bf16"},
        ("AVX512_CORE", "AVX512_CORE_VNNI"),
    ),
}

_why: dict[str, list[str]] = {name: [] for name in SOURCES}


def _isa_cap(src: Source) -> str | None:
    """The setting that caps torch's kernels below what ``src`` needs (to run as on an older CPU), if
    one does: the kernel then stays off too, so such a run sees what that CPU would."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if aten in ("default", "avx2", "zvector", "vsx"):
        return f"ATEN_CPU_CAPABILITY={aten}"
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn.startswith(("SSE", "AVX2")) or onednn == "AVX" or onednn in src.onednn_below:
        return f"ONEDNN_MAX_CPU_ISA={onednn}"
    return None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _switched_off(src: Source) -> str | None:
    """Why the kernel is off before anything is built (a setting, a cap, no compiler), or None."""
    if os.environ.get("LONGDOC_NATIVE", "1") == "0":
        return "LONGDOC_NATIVE=0"
    capped = _isa_cap(src)
    if capped:
        return f"{capped} caps the CPU below {src.needs}"
    return None if _compiler() else "no C compiler (cc, gcc or clang) on PATH"


def _digest(cc: str, source: bytes) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256(source)
    h.update(version.encode())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(cc: str, source: bytes, target: Path) -> None:
    """Compile ``source`` (the very bytes the target's name was hashed from: the packaged file may change
    meanwhile) to a temporary file beside ``target``, then rename it and its checksum into place."""
    with store.atomic_file(target.with_suffix(".c")) as src, store.atomic_file(target) as tmp:
        src.write_bytes(source)
        proc = subprocess.run(
            [cc, *FLAGS, "-x", "c", str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise OSError(f"{Path(cc).name} failed: {err}")
    with store.atomic_file(target.with_suffix(".sha256")) as tmp:
        tmp.write_text(_sha256(target))


def _configure(name: str, lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    supported = getattr(lib, f"longdoc_{name}_supported")
    supported.restype, supported.argtypes = c_int, []
    if name == "int5":
        lib.longdoc_int5_matmul.restype = c_int
        lib.longdoc_int5_matmul.argtypes = [p, c_int, i64, i64, p, i64, p, p, c_int, c_int]
    else:
        lib.longdoc_flash_attention.restype = c_int
        # q, strides, k, strides, v, strides, block lists, counts, width, group, out, lse, sizes, causal, ...
        lib.longdoc_flash_attention.argtypes = [*[p] * 8, i64, i64, p, p, *[i64] * 6, c_int, ctypes.c_float, c_int]
    return lib


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded kernel library ``name`` (a key of ``SOURCES``), built if needed; None where it can't
    run here."""
    src = SOURCES[name]
    why = _why[name]
    off = _switched_off(src)
    cc = _compiler()
    if off or cc is None:
        why.append(off or "no C compiler")
        return None
    source = Path(__file__).with_name(src.file).read_bytes()
    target = store.cache_dir() / "native" / f"{name}-{_digest(cc, source)}.so"
    try:
        with store.lock(target.with_suffix(".lock"), f"building {src.what}"):
            check = target.with_suffix(".sha256")
            if not (target.exists() and check.exists() and check.read_text().strip() == _sha256(target)):
                _build(cc, source, target)
        lib = _configure(name, ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as exc:
        why.append(f"could not build {src.what} ({exc})")
        return None
    except Exception as exc:  # a lock timeout (ModelError) or a broken file: the kernel is then just unavailable
        why.append(f"could not load {src.what} ({exc})")
        return None
    if not getattr(lib, f"longdoc_{name}_supported")():
        why.append(f"this CPU lacks {src.needs}")
        return None
    return lib


def likely_available(name: str) -> bool:
    """Whether ``library(name)`` should succeed here, judged without building anything (no compile, no
    cache write): a compiler, no cap, and on Linux the CPU flags the kernel needs."""
    src = SOURCES[name]
    if _switched_off(src):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True  # no cpuinfo to read: the build and the kernel's own probe decide
    return src.cpu_flags <= flags


def why_unavailable(name: str) -> str | None:
    """Why ``library(name)`` is None (after it was called), else None."""
    return _why[name][-1] if _why[name] else None


def layout(bits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A quantized int5 weight as stored, nibbles and fifth bits (N, K/128 * 80) uint8 and each group's
    step and minimum (N, K/32, 2), -> the kernel's layout, (ceil(N/4), K/128 * 4 * 96) uint8: quads of
    rows, their super-blocks interleaved (int5.c)."""
    n = bits.shape[0]
    sb = bits.shape[1] // 80
    half = scales.to(torch.float16).view(n, sb, 4, 2).transpose(-1, -2).contiguous()  # (n, sb, step/min, 4)
    blocks = torch.cat([bits.view(n, sb, 80), half.view(torch.uint8).view(n, sb, 16)], dim=-1)
    pad = -n % 4
    if pad:
        blocks = torch.cat([blocks, blocks.new_zeros(pad, sb, BLOCK_BYTES)])
    return blocks.view(-1, 4, sb, BLOCK_BYTES).transpose(1, 2).reshape(-1, 4 * sb * BLOCK_BYTES).contiguous()


class Int5Matmul:
    """Calls of the kernel for one packed weight (N, K), bias added."""

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None):
        lib = library("int5")
        if lib is None:
            raise RuntimeError(f"the int5 kernel is not available: {why_unavailable('int5')}")
        self.lib, self.packed, self.k = lib, packed.contiguous(), in_features
        self.n = out_features
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """rows (M, K) bfloat16 or float32 -> (M, N) in ``dtype`` (bfloat16 or float32)."""
        if rows.dtype not in (torch.bfloat16, torch.float32) or dtype not in (torch.bfloat16, torch.float32):
            raise RuntimeError("the int5 kernel takes bfloat16 or float32")
        rows = rows.contiguous()
        out = torch.empty(rows.shape[0], self.n, dtype=dtype)
        rc = self.lib.longdoc_int5_matmul(
            rows.data_ptr(),
            int(rows.dtype == torch.bfloat16),
            rows.shape[0],
            self.k,
            self.packed.data_ptr(),
            self.n,
            None if self.bias is None else self.bias.data_ptr(),
            out.data_ptr(),
            int(dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError("the int5 kernel refused its input" if rc == 1 else "the int5 kernel ran out of memory")
        return out


# flash.c's tile of queries and block of keys. Fewer queries than a tile would leave most of its rows
# empty: decode steps stay on torch's kernel.
FLASH_TILE, FLASH_BLOCK = 16, 64


def flash_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``flash_attention`` runs on these inputs here: bfloat16 on the CPU, head size a multiple of
    32 up to 256, the last dimension contiguous with even strides, and at least a tile of queries."""
    return (
        q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.device.type == k.device.type == v.device.type == "cpu"
        and q.shape[-1] % 32 == 0
        and 32 <= q.shape[-1] <= 256
        and q.shape[2] >= FLASH_TILE
        and k.shape[2] >= 1
        and all(t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:3]) for t in (k, v))
        and all(t.data_ptr() % 4 == 0 for t in (k, v))
        and library("flash") is not None
    )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    blocks: tuple[torch.Tensor, list[int], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash.c on inputs ``flash_takes``: q (B, H, Lq, D), k and v (B, Hkv, Lk, D) -> out (B, H, Lq, D)
    bfloat16 and lse (B, H, Lq) float32 (the kernel contract of ``kernels.py``).

    ``blocks`` = (numbers (Hkv, S, C) int64, counts (S), group), batch 1 and not causal: block-sparse
    attention, where the queries of group s (``group`` queries each, a multiple of ``FLASH_TILE``) attend
    only to the first ``counts[s]`` of their KV head's listed ``FLASH_BLOCK``-key blocks of k and v; a
    group with none gets out 0 and lse -inf."""
    lib = library("flash")
    if lib is None:
        raise RuntimeError(f"the attention kernel is not available: {why_unavailable('flash')}")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(b, h, lq, d, dtype=torch.bfloat16)
    lse = torch.empty(b, h, lq, dtype=torch.float32)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    numbers = counts = None
    width = group = 0
    if blocks is not None:
        numbers = blocks[0].to(torch.int64).contiguous()
        counts = torch.tensor(blocks[1], dtype=torch.int64)
        width, group = numbers.shape[-1], blocks[2]
        if numbers.shape[:2] != (hkv, len(counts)) or len(counts) != -(-lq // group):
            raise ValueError("block lists need (Hkv, groups, n) numbers and a count per group")
    rc = lib.longdoc_flash_attention(
        q.data_ptr(),
        strides[0],
        k.data_ptr(),
        strides[1],
        v.data_ptr(),
        strides[2],
        None if numbers is None else numbers.data_ptr(),
        None if counts is None else counts.data_ptr(),
        width,
        group,
        out.data_ptr(),
        lse.data_ptr(),
        b,
        h,
        hkv,
        lq,
        lk,
        d,
        int(causal),
        scale,
        torch.get_num_threads(),
    )
    if rc != 0:
        why = "refused its input" if rc == 1 else "ran out of memory"
        raise RuntimeError(f"the attention kernel {why}")
    return out, lse
