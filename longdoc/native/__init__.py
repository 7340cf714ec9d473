"""longdoc's C kernels, built once per machine with the system C compiler and loaded with ctypes.

* ``int5.c``: 5-bit weights times int16-quantized activations (AVX-512 VNNI) for decoding. torch has no
  CPU kernel for weights of fewer than 8 bits but 4, and 4 bits lose 4% perplexity on the embedded
  model (its GGUF is mostly 5-bit); this one reads the weights at memory speed.
* ``flash.c``: exact bfloat16 attention with its log-sum-exp (AVX-512 BF16) for prefill, about twice
  torch's fused CPU kernel on the model's shapes (``benchmarks/bench_attention.py``).
* ``q8.c``: llama.cpp's Q8_0 weights (int8, a float16 scale per 32) times int8-quantized activations,
  on any CPU: a scalar loop everywhere, AVX2, AVX-512 VNNI and NEON (with and without dot products)
  loops chosen at run time under the ISA cap (``native/q8.py``). Decode steps run it with ``--quantize
  q8`` (``longdoc.quant.schemes``), what ``auto`` picks wherever one of its SIMD loops runs.
* ``attn16.c``: a decode step's attention (one query row per head, GQA) over a float16 or bfloat16 KV
  cache as stored, each K/V row read once for its KV head's query heads, with its log-sum-exp; about
  twice torch's kernel on float32 K/V on the model's shapes (``benchmarks/bench_attn16.py``). On any
  CPU: a scalar loop everywhere, AVX2 and NEON loops chosen at run time under the ISA cap
  (``native/attn16.py``).
* ``step.c``: a decode step's decoder layers in one call (norms, rotations, cache writes, the merge of
  DCA's regions, residuals, the gate), calling the q8 and attn16 kernels for the products and the
  attention: a decode step's Python and torch dispatch gone (``native/step.py``).
* ``flash16.c``: prefill attention with its log-sum-exp, float32 in and out, on 16-bit integer
  products (vpmaddwd): the AVX2 counterpart of ``flash.c`` (``benchmarks/bench_flash16.py``). A scalar
  loop everywhere and an AVX2 loop chosen at run time under the ISA cap (``native/flash16.py``).

A library is compiled from the packaged source on first use into ``<cache>/native/<name>-<arch>-<digest>.so``,
where the digest covers the source, the compiler (its command and ``--version``) and the flags: a changed
source or compiler builds anew, and machines of two architectures can share a cache folder. ``CC`` may
carry arguments (``CC="ccache gcc"``). ``-fopenmp`` is used where the compiler links it (Apple's clang
and clang without libomp don't): else the kernel runs on one thread, which ``notes(name)`` says.

An already-built library is found without the lock (a read-only cache folder works); the lock is taken
only to build. The library is written to a temporary name and renamed (atomic), with its sha256 beside
it, checked on every load; a file that fails the check is rebuilt. A failed build leaves
``<name>-<arch>-<digest>.failed`` with the compiler's last error line, so later processes don't retry it
(delete it to retry; a changed compiler or source has another name, so it is tried anew). The source is
the kernel's file with the package's own headers pasted in place of their quoted ``#include`` lines
(``halves.h``: what the kernels share), so the digest covers them and the cached copy stands alone.

No compiler, a failed build, or a CPU without the instructions makes ``library(name)`` return None (a
CPU whose flags say so is known before anything is built), and the caller then takes torch's path; the
reason is in ``why_unavailable(name)``. ``LONGDOC_NATIVE=0`` turns the kernels off, and so does an ISA
cap (``cpu.isa_cap()``: ``LONGDOC_ISA``, ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``) below what a
kernel needs (running as another CPU would).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from longdoc import cpu, store

BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c11")


@dataclass(frozen=True)
class Source:
    """One kernel library: its C file, what it is (for messages), the instructions it needs (as named in
    messages, as ``cpu.flags()`` names them, and the lowest ``cpu.ISA_LEVELS`` cap that keeps them)."""

    file: str
    what: str
    needs: str
    cpu_flags: frozenset[str]
    level: str


_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"})
SOURCES = {
    "int5": Source("int5.c", "the int5 kernel", "AVX-512 VNNI", _AVX512 | {"avx512_vnni", "f16c"}, "avx512vnni"),
    "flash": Source("flash.c", "the attention kernel", "AVX-512 BF16", _AVX512 | {"avx512_bf16"}, "avx512bf16"),
    # any CPU (a scalar loop); its SIMD loops are chosen at run time, under the ISA cap (native/q8.py)
    "q8": Source("q8.c", "the Q8_0 kernel", "nothing", frozenset(), "none"),
    # any CPU, as q8 (native/attn16.py)
    "attn16": Source("attn16.c", "the 16-bit KV decode attention kernel", "nothing", frozenset(), "none"),
    # any CPU, as q8 (native/flash16.py)
    "flash16": Source("flash16.c", "the int16 prefill attention kernel", "nothing", frozenset(), "none"),
    # any CPU: its loops are q8's and attn16's, handed in (native/step.py)
    "step": Source("step.c", "the native decode step", "nothing", frozenset(), "none"),
}

_why: dict[str, list[str]] = {name: [] for name in SOURCES}
_notes: dict[str, list[str]] = {name: [] for name in SOURCES}


class BuildError(OSError):
    """The compiler refused a kernel (now or, remembered, in an earlier process)."""


def _compiler() -> list[str] | None:
    """The C compiler's command: ``CC`` split as a shell would (``ccache gcc``, ``clang -fsomething``),
    else the first of cc, gcc and clang on PATH; None where there is none."""
    setting = os.environ.get("CC", "").strip()
    if setting:
        try:
            command = shlex.split(setting)
        except ValueError:
            return None
        return command if command and shutil.which(command[0]) else None
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _cap_settings(level: str) -> str:
    """The settings that make the ISA cap ``level``: ``LONGDOC_ISA`` where it alone does (torch's two
    are then usually derived from it), else torch's variables that are set."""
    asked = os.environ.get("LONGDOC_ISA", "").strip()
    if asked.lower() == level:
        return f"LONGDOC_ISA={asked} caps"
    names = [f"{k}={os.environ[k].strip()}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ]
    return " and ".join(names) + (" cap" if len(names) > 1 else " caps")


def _switched_off(src: Source) -> str | None:
    """Why the kernel is off before anything is built (a setting, a cap, a CPU without the instructions,
    no compiler), or None. Settings come first: a wrong one is what the user can fix."""
    if os.environ.get("LONGDOC_NATIVE", "1") == "0":
        return "LONGDOC_NATIVE=0"
    try:
        cap = cpu.isa_cap()
    except cpu.IsaCapError as exc:
        return str(exc)
    if cap is not None and cpu.ISA_LEVELS.index(cap) < cpu.ISA_LEVELS.index(src.level):
        return f"{_cap_settings(cap)} the CPU below {src.needs}"
    cc = _compiler()
    if cc is None and os.environ.get("CC", "").strip():
        return f"could not build {src.what}: CC={os.environ['CC']} names no program here"
    # flags that can't be read (an unknown OS) leave it to the build and the kernel's own CPU probe
    if cpu.flags_known() and not src.cpu_flags <= cpu.flags():
        return f"this CPU lacks {src.needs}"
    return None if cc else "no C compiler (cc, gcc or clang) on PATH"


def _flags(openmp: bool) -> list[str]:
    """The compiler flags of a kernel library, with or without OpenMP (without it the kernels' pragmas
    are ignored: one thread)."""
    return [*BASE_FLAGS, "-fopenmp"] if openmp else list(BASE_FLAGS)


def _compile(cc: list[str], flags: list[str], source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """Run the compiler on one C file (whatever its suffix) to ``out``."""
    command = [*cc, *flags, "-x", "c", str(source), "-o", str(out), "-lm"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _last_error(cc: list[str], proc: subprocess.CompletedProcess[str]) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"{Path(cc[0]).name} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"


# a parallel loop, as the kernels have (no omp.h: they include none)
_OPENMP_PROBE = """int longdoc_probe(int n) {
    int s = 0;
#pragma omp parallel for reduction(+ : s)
    for (int i = 0; i < n; i++) s += i;
    return s;
}
"""


@functools.cache
def _openmp(cc: tuple[str, ...]) -> str | None:
    """None where ``cc`` compiles and links a shared library with ``-fopenmp``, else why not (Apple's
    clang rejects the flag; clang without libomp can't link it). Once per compiler and process."""
    with tempfile.TemporaryDirectory(prefix="longdoc-openmp-") as tmp:
        probe = Path(tmp) / "probe.c"
        probe.write_text(_OPENMP_PROBE)
        try:
            proc = _compile(list(cc), _flags(True), probe, Path(tmp) / "probe.so")
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
    return None if proc.returncode == 0 else _last_error(list(cc), proc)


# a quoted include at the start of a line (the kernels' own headers; system headers use <...>)
_LOCAL_INCLUDE = re.compile(rb'^#include "([A-Za-z0-9_]+\.h)"[^\n]*$', re.MULTILINE)


def packaged_source(file: str, folder: Path | None = None) -> bytes:
    """The kernel ``file`` (in ``folder``, the package's by default) as it is compiled: each ``#include
    "x.h"`` of a header beside it replaced by that header's text (headers include no headers of their own)."""
    here = folder or Path(__file__).parent

    def paste(match: re.Match[bytes]) -> bytes:
        name = match.group(1).decode()
        return f"/* {name}, pasted by longdoc.native */\n".encode() + (here / name).read_bytes()

    return _LOCAL_INCLUDE.sub(paste, (here / file).read_bytes())


def _target(name: str, cc: list[str], flags: list[str], source: bytes) -> Path:
    """Where library ``name`` built by ``cc`` with ``flags`` from ``source`` lives in the cache."""
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256(source)
    for part in (version, shlex.join(cc), shlex.join(flags)):
        h.update(b"\0" + part.encode())
    return store.cache_dir() / "native" / f"{name}-{cpu.arch()}-{h.hexdigest()[:16]}.so"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path) -> bool:
    """Whether ``target`` is built and matches its checksum."""
    check = target.with_suffix(".sha256")
    try:
        return check.read_text().strip() == _sha256(target)
    except OSError:
        return False


def _raise_if_failed(target: Path) -> None:
    """Raise the remembered reason where an earlier build of ``target`` failed."""
    marker = target.with_suffix(".failed")
    try:
        reason = marker.read_text().strip()
    except OSError:
        return
    raise BuildError(f"{reason}; remembered in {marker}: delete it to retry")


def _build(cc: list[str], flags: list[str], source: bytes, target: Path) -> None:
    """Compile ``source`` (the very bytes the target's name was hashed from: the packaged file may change
    meanwhile) to a temporary file beside ``target``, then rename it and its checksum into place. A
    compiler error is remembered beside ``target`` (``.failed``) before it is raised."""
    with store.atomic_file(target.with_suffix(".c")) as src, store.atomic_file(target) as tmp:
        src.write_bytes(source)
        proc = _compile(cc, flags, src, tmp)
        if proc.returncode != 0:
            reason = _last_error(cc, proc)
            with contextlib.suppress(OSError), store.atomic_file(target.with_suffix(".failed")) as marker:
                marker.write_text(reason + "\n")
            raise BuildError(reason)
    with store.atomic_file(target.with_suffix(".sha256")) as tmp:
        tmp.write_text(_sha256(target))


def _find_or_build(src: Source, cc: list[str], flags: list[str], source: bytes, target: Path) -> None:
    """Make sure ``target`` is built: found without the lock (so a read-only cache folder works), else
    built under it, unless an earlier build failed."""
    if _verified(target):
        return
    _raise_if_failed(target)
    with store.lock(target.with_suffix(".lock"), f"building {src.what}"):
        if not _verified(target):  # another process may have built it, or failed, while this one waited
            _raise_if_failed(target)
            _build(cc, flags, source, target)


def _configure(name: str, lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    supported = getattr(lib, f"longdoc_{name}_supported")
    supported.restype, supported.argtypes = c_int, []
    if name == "int5":
        lib.longdoc_int5_matmul.restype = c_int
        lib.longdoc_int5_matmul.argtypes = [p, c_int, i64, i64, p, i64, p, p, c_int, c_int]
    elif name == "q8":
        lib.longdoc_q8_matmul.restype = c_int
        f32 = ctypes.c_float
        lib.longdoc_q8_matmul.argtypes = [p, c_int, i64, i64, p, i64, p, p, c_int, c_int, c_int, p, f32, c_int]
        lib.longdoc_q8_paths.restype, lib.longdoc_q8_paths.argtypes = c_int, []
        lib.longdoc_q8_level.restype, lib.longdoc_q8_level.argtypes = c_int, [c_int]
        lib.longdoc_q8_rows.restype = c_int
        lib.longdoc_q8_rows.argtypes = [p, i64, i64, p, i64, p, c_int, c_int, c_int, c_int]
        lib.longdoc_q8_gemm.restype = c_int
        lib.longdoc_q8_gemm.argtypes = [p, c_int, i64, i64, p, i64, p, p, c_int, c_int, c_int, c_int]
        lib.longdoc_q8_gemm_fast.restype, lib.longdoc_q8_gemm_fast.argtypes = c_int, []
        lib.longdoc_q8_glu.restype = c_int
        lib.longdoc_q8_glu.argtypes = [p, c_int, i64, i64, p, i64, p, p, c_int, c_int, c_int, c_int]
    elif name == "attn16":
        lib.longdoc_attn16.restype = c_int
        # q, heads, kv heads, d, k, v, bf16, head stride, row stride, keys, scale, out, lse, threads, level
        lib.longdoc_attn16.argtypes = [p, c_int, c_int, c_int, p, p, c_int, i64, i64, i64, ctypes.c_float]
        lib.longdoc_attn16.argtypes += [p, p, c_int, c_int]
        # the same, and each key's scaled score: scores, scores' stride
        lib.longdoc_attn16_scored.restype = c_int
        lib.longdoc_attn16_scored.argtypes = [*lib.longdoc_attn16.argtypes, p, i64]
        lib.longdoc_attn16_paths.restype, lib.longdoc_attn16_paths.argtypes = c_int, []
        lib.longdoc_attn16_level.restype, lib.longdoc_attn16_level.argtypes = c_int, [c_int]
    elif name == "step":
        lib.longdoc_step_layers.restype = c_int
        # model, layers, layer count, hidden state, position, key rotation, regions, query rotations, bounds,
        # and where given: each layer's keys' log-probabilities (group max), each layer's query
        lib.longdoc_step_layers.argtypes = [p, p, c_int, p, i64, p, c_int, p, p, p, p]
        # the same, the bounds replaced by each layer's held keys (a recycled step)
        lib.longdoc_step_sets.restype = c_int
        lib.longdoc_step_sets.argtypes = [p, p, c_int, p, i64, p, c_int, p, p]
        lib.longdoc_step_halves.restype, lib.longdoc_step_halves.argtypes = None, [p, i64, p]
    elif name == "flash16":
        lib.longdoc_flash16.restype = c_int
        # q, strides, k, strides, v, strides, kv_half, out, lse, b, h, hkv, lq, lk, d, causal, scale, threads, level
        lib.longdoc_flash16.argtypes = [*[p] * 6, c_int, p, p, *[i64] * 6, c_int, ctypes.c_float, c_int, c_int]
        lib.longdoc_flash16_paths.restype, lib.longdoc_flash16_paths.argtypes = c_int, []
    else:
        lib.longdoc_flash_attention.restype = c_int
        # q, strides, k, strides, v, strides, block lists, counts, width, group, out, lse, sizes, causal, ...
        lib.longdoc_flash_attention.argtypes = [*[p] * 8, i64, i64, p, p, *[i64] * 6, c_int, ctypes.c_float, c_int]
    return lib


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded kernel library ``name`` (a key of ``SOURCES``), built if needed; None where it can't
    run here (``why_unavailable(name)`` says why; ``notes(name)`` says how a loaded one runs)."""
    src = SOURCES[name]
    why, notes = _why[name], _notes[name]
    why.clear()
    notes.clear()
    off = _switched_off(src)
    cc = _compiler()
    if off or cc is None:
        why.append(off or "no C compiler")
        return None
    no_openmp = _openmp(tuple(cc))
    flags = _flags(no_openmp is None)
    try:
        source = packaged_source(src.file)  # a header gone from the install: OSError, said as any build's
        target = _target(name, cc, flags, source)
        _find_or_build(src, cc, flags, source, target)
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
    if no_openmp:
        notes.append(f"{src.what} runs on one thread: {shlex.join(cc)} has no OpenMP here ({no_openmp})")
    return lib


def likely_available(name: str) -> bool:
    """Whether ``library(name)`` should succeed here, judged without building anything (no compile, no
    cache write): a compiler, no cap, and CPU flags, read from the OS, that include the kernel's. Flags
    that can't be read say no (a test's skip marker then skips)."""
    return _switched_off(SOURCES[name]) is None and cpu.flags_known()


def why_unavailable(name: str) -> str | None:
    """Why ``library(name)`` is None (after it was called), else None."""
    return _why[name][-1] if _why[name] else None


def notes(name: str) -> list[str]:
    """What to tell the user once about how ``library(name)`` runs (after it was called): the one
    thread of a compiler without OpenMP."""
    return list(_notes[name])


def runnable_paths(
    name: str, levels: Iterable[int], scalar: int, path_flags: Mapping[int, frozenset[str]]
) -> list[int]:
    """The loops of kernel ``name`` (a run-time dispatched one: q8, attn16) that run here, lowest first:
    those its own CPU probe (``longdoc_<name>_paths``, a bit per level) finds, less those whose flags
    (``path_flags``) the ISA cap drops from ``cpu.flags()``. Where the flags can't be read the probe
    decides, unless the cap is "none" (then only ``scalar``). Empty where the library isn't available."""
    lib = library(name)
    if lib is None:
        return []
    probe = int(getattr(lib, f"longdoc_{name}_paths")())
    found = [level for level in levels if probe >> level & 1]
    if cpu.flags_known():
        flags = cpu.flags()
        return [level for level in found if level == scalar or path_flags[level] <= flags]
    return [scalar] if cpu.isa_cap() == "none" else found
