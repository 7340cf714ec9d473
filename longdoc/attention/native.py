"""The int5 CPU kernel (``int5.c``): built once per machine with the system C compiler, loaded with ctypes.

torch has no CPU kernel for weights of fewer than 8 bits but 4, and 4 bits lose 4% perplexity on the
embedded model (its GGUF is mostly 5-bit); ``int5.c`` multiplies 5-bit weights (6 bits per weight with
their scales) by int16-quantized activations with AVX-512 VNNI, reading the weights at memory speed.

The shared library is compiled from the packaged source on first use into
``<cache>/native/int5-<digest>.so``, where the digest covers the source, the compiler's version and the
flags: a changed source or compiler builds anew. It is written to a temporary name and renamed
(atomic), with its sha256 beside it, checked on every load; a file that fails the check is rebuilt.
No compiler, a failed build, or a CPU without AVX-512 VNNI makes ``library()`` return None, and
int5 is then not available (``quant.kernel_available``); the reason is in ``why_unavailable()``.
``LONGDOC_NATIVE=0`` turns the kernel off, and so do ``ATEN_CPU_CAPABILITY`` or ``ONEDNN_MAX_CPU_ISA``
capping torch below AVX-512 VNNI (running as another CPU would).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from longdoc import store

SOURCE = Path(__file__).with_name("int5.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11")
# int5 super-blocks: input channels, and bytes per output channel of each
BLOCK, BLOCK_BYTES = 128, 96

_why: list[str] = []


def _isa_cap() -> str | None:
    """The setting that caps torch's kernels below AVX-512 (to run as on an older CPU), if one does:
    the int5 kernel then stays off too, so such a run sees what that CPU would."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if aten in ("default", "avx2", "zvector", "vsx"):
        return f"ATEN_CPU_CAPABILITY={aten}"
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn.startswith(("SSE", "AVX2")) or onednn in ("AVX", "AVX512_CORE"):
        return f"ONEDNN_MAX_CPU_ISA={onednn}"
    return None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _switched_off() -> str | None:
    """Why the kernel is off before anything is built (a setting, a cap, no compiler), or None."""
    if os.environ.get("LONGDOC_NATIVE", "1") == "0":
        return "LONGDOC_NATIVE=0"
    capped = _isa_cap()
    if capped:
        return f"{capped} caps the CPU below AVX-512"
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


def _configure(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.longdoc_int5_supported.restype = c_int
    lib.longdoc_int5_supported.argtypes = []
    lib.longdoc_int5_matmul.restype = c_int
    lib.longdoc_int5_matmul.argtypes = [p, c_int, i64, i64, p, i64, p, p, c_int, c_int]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded int5 kernel library, built if needed; None where it can't run here."""
    off = _switched_off()
    cc = _compiler()
    if off or cc is None:
        _why.append(off or "no C compiler")
        return None
    source = SOURCE.read_bytes()
    target = store.cache_dir() / "native" / f"int5-{_digest(cc, source)}.so"
    try:
        with store.lock(target.with_suffix(".lock"), "building the int5 kernel"):
            check = target.with_suffix(".sha256")
            if not (target.exists() and check.exists() and check.read_text().strip() == _sha256(target)):
                _build(cc, source, target)
        lib = _configure(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as exc:
        _why.append(f"could not build the int5 kernel ({exc})")
        return None
    except Exception as exc:  # a lock timeout (ModelError) or a broken file: int5 is then just unavailable
        _why.append(f"could not load the int5 kernel ({exc})")
        return None
    if not lib.longdoc_int5_supported():
        _why.append("this CPU lacks AVX-512 VNNI")
        return None
    return lib


def likely_available() -> bool:
    """Whether ``library()`` should succeed here, judged without building anything (no compile, no
    cache write): a compiler, no cap, and on Linux the CPU flags the kernel needs."""
    if _switched_off():
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True  # no cpuinfo to read: the build and the kernel's own probe decide
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"} <= flags


def why_unavailable() -> str | None:
    """Why ``library()`` is None (after it was called), else None."""
    return _why[-1] if _why else None


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
        lib = library()
        if lib is None:
            raise RuntimeError(f"the int5 kernel is not available: {why_unavailable()}")
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
