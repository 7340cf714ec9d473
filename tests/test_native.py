"""Building longdoc's C kernels (longdoc/native/__init__.py): the compilers they must build with (the
default cc, clang with and without OpenMP, the aarch64 cross compiler) and the rules of the cache."""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
import types
from pathlib import Path

import pytest

from longdoc import cpu, native, store

from .helpers import program

KERNELS = Path(native.__file__).parent
# every flag either kernel asks of the CPU
ALL_FLAGS = frozenset().union(*(src.cpu_flags for src in native.SOURCES.values()))


def compiler(name: str, needed_in_ci: bool = False) -> str:
    """The path of compiler ``name`` (``helpers.program``)."""
    return program(name, needed_in_ci)


def script(path: Path, body: str) -> str:
    """An executable shell script at ``path`` (a stand-in or a wrapper for the compiler)."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache under tmp_path, no CC, switch or ISA cap from the environment, and ``library``
    forgotten before and after. Yields the folder the libraries go to."""
    monkeypatch.setenv("LONGDOC_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("CC", "LONGDOC_NATIVE", "LONGDOC_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    native.library.cache_clear()
    yield tmp_path / "cache" / "native"
    native.library.cache_clear()


@pytest.fixture
def runs_here(monkeypatch):
    """A CPU that, by its flags and by the kernels' own probe, runs both kernels: ``library`` then goes
    all the way (find or build, load with ctypes) and returns what it loaded, on any machine."""
    monkeypatch.setattr(cpu, "_raw_flags", lambda: (ALL_FLAGS, True))

    def configure(name: str, lib: object) -> object:
        return types.SimpleNamespace(loaded=lib, **{f"longdoc_{name}_supported": lambda: 1})

    monkeypatch.setattr(native, "_configure", configure)


# --------------------------------------------------------------------------------------------------
# compilers


@pytest.mark.parametrize(
    "program, openmp",
    [("cc", None), ("clang", True), ("clang", False), ("aarch64-linux-gnu-gcc", None)],
    ids=["cc", "clang-openmp", "clang-no-openmp", "aarch64-gcc"],
)
def test_both_kernels_compile(tmp_path, program, openmp):
    """Both kernels compile with the flags native.py gives this compiler (openmp None: as its OpenMP
    probe decides, as a user's build would), and a native build's own CPU probe agrees with the flags
    the OS lists."""
    cc = [compiler(program, needed_in_ci=program.startswith("aarch64"))]
    links = native._openmp(tuple(cc))
    if openmp and links is not None:
        pytest.skip(f"{program} can't link OpenMP here ({links}); the no-OpenMP case builds without")
    flags = native._flags(links is None if openmp is None else openmp)
    for name, src in native.SOURCES.items():
        out = tmp_path / f"{name}.so"
        proc = native._compile(cc, flags, KERNELS / src.file, out)
        assert proc.returncode == 0, proc.stderr
        if not program.startswith("aarch64") and cpu.arch() == "x86_64" and cpu.flags_known():
            supported = getattr(ctypes.CDLL(str(out)), f"longdoc_{name}_supported")()
            assert bool(supported) == (src.cpu_flags <= cpu._raw_flags()[0])


DRIVER = r"""#include <stdio.h>
int longdoc_int5_supported(void);
int longdoc_flash_supported(void);
int main(void) {
    printf("%d %d\n", longdoc_int5_supported(), longdoc_flash_supported());
    return 0;
}
"""


def test_on_aarch64_the_kernels_say_unsupported(tmp_path):
    """Both kernels linked into a static aarch64 program, run under qemu: their CPU probes say 0 (the
    caller then takes torch's path) instead of crashing."""
    cc = compiler("aarch64-linux-gnu-gcc", needed_in_ci=True)
    qemu = compiler("qemu-aarch64", needed_in_ci=True)
    driver, program = tmp_path / "driver.c", tmp_path / "driver"
    driver.write_text(DRIVER)
    flags = [f for f in native._flags(False) if f not in ("-shared", "-fPIC")]
    sources = [str(KERNELS / src.file) for src in native.SOURCES.values()]
    build = subprocess.run(
        [cc, *flags, "-static", str(driver), *sources, "-o", str(program), "-lm"], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run(
        [qemu, "-L", "/usr/aarch64-linux-gnu", str(program)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "0"]


# --------------------------------------------------------------------------------------------------
# the rules of native.py


def test_the_shared_header_is_pasted_into_each_kernel_as_compiled(cache, tmp_path):
    """What is hashed and compiled holds ``halves.h`` in place of its #include line (a cached copy of the
    source builds on its own), and a change to a header changes the source, so the library's name."""
    header = (KERNELS / "halves.h").read_bytes()
    for src in native.SOURCES.values():
        text = native.packaged_source(src.file)
        assert b'#include "' not in text, src.file
        if b'#include "halves.h"' in (KERNELS / src.file).read_bytes():
            assert header in text and text.count(b"#define LONGDOC_HALVES_H") == 1
    (tmp_path / "k.c").write_bytes(b'int a;\n#include "h.h" /* why */\nint b;\n')
    (tmp_path / "h.h").write_bytes(b"int h1;\n")
    first = native.packaged_source("k.c", tmp_path)
    assert first == b"int a;\n/* h.h, pasted by longdoc.native */\nint h1;\n\nint b;\n"
    (tmp_path / "h.h").write_bytes(b"int h2;\n")
    second = native.packaged_source("k.c", tmp_path)
    cc, flags = ["cc"], native._flags(False)
    assert native._target("q8", cc, flags, first) != native._target("q8", cc, flags, second)
    # and the build compiles it in the cache folder, away from the header
    compiler("cc")
    lib = native.library("q8")
    assert lib is not None and lib.longdoc_q8_supported() == 1, native.why_unavailable("q8")
    built = list(cache.glob(f"q8-{cpu.arch()}-*.c"))
    assert len(built) == 1 and built[0].read_bytes() == native.packaged_source("q8.c")


def test_cc_may_carry_arguments(cache, runs_here, tmp_path, monkeypatch):
    """``CC`` is split as a shell would: a launcher before the compiler (as ``ccache gcc``) and flags
    after it."""
    cc = compiler("cc")
    log = tmp_path / "launched"
    launcher = script(tmp_path / "launch", f'printf "%s\\n" "$@" >> {log}\nexec "$@"\n')
    monkeypatch.setenv("CC", f"{launcher} {cc} -DLONGDOC_FROM_CC=1")
    assert native.library("flash") is not None, native.why_unavailable("flash")
    assert "-DLONGDOC_FROM_CC=1" in log.read_text().splitlines()
    assert len(list(cache.glob(f"flash-{cpu.arch()}-*.so"))) == 1


def test_the_cache_name_has_the_architecture_compiler_flags_and_source(cache, monkeypatch):
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    flags = native._flags(False)
    here = native._target("int5", cc, flags, b"source")
    assert here.parent == cache and here.name.startswith(f"int5-{cpu.arch()}-") and here.suffix == ".so"
    assert native._target("int5", cc, [*flags, "-fopenmp"], b"source") != here
    assert native._target("int5", cc, flags, b"another source") != here
    assert native._target("int5", ["env", *cc], flags, b"source") != here
    monkeypatch.setattr(cpu, "arch", lambda: "riscv64")
    assert native._target("int5", cc, flags, b"source").name.startswith("int5-riscv64-")


def test_a_built_library_is_found_without_the_lock(cache, runs_here, monkeypatch):
    """The lock is taken only to build: an already-built library loads where the lock can't be taken
    (a read-only cache folder)."""
    compiler("cc")
    assert native.library("flash") is not None, native.why_unavailable("flash")

    def no_lock(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only cache folder")

    monkeypatch.setattr(store, "lock", no_lock)
    native.library.cache_clear()
    assert native.library("flash") is not None, native.why_unavailable("flash")


def test_a_failed_build_is_remembered_until_the_compiler_changes(cache, runs_here, tmp_path, monkeypatch):
    log, version = tmp_path / "calls", tmp_path / "version"
    version.write_text("1.0")
    fake = script(
        tmp_path / "fakecc",
        f'echo "$*" >> {log}\n'
        f'case "$*" in *--version*) read -r v < {version}; echo "fakecc $v"; exit 0;; esac\n'
        'echo "int5.c:1:1: error: boom" >&2\nexit 1\n',
    )
    monkeypatch.setenv("CC", fake)

    def builds() -> int:
        return sum("int5-" in line for line in log.read_text().splitlines())

    assert native.library("int5") is None
    assert native.why_unavailable("int5") == "could not build the int5 kernel (fakecc failed: int5.c:1:1: error: boom)"
    [marker] = cache.glob(f"int5-{cpu.arch()}-*.failed")
    assert builds() == 1
    # later processes: not tried again, the reason said, no lock needed to know it
    with monkeypatch.context() as m:
        m.setattr(store, "lock", lambda *args, **kwargs: pytest.fail("took the lock"))
        native.library.cache_clear()
        assert native.library("int5") is None and builds() == 1
        why = native.why_unavailable("int5") or ""
        assert "error: boom" in why and f"remembered in {marker}" in why
    # another compiler version has another name: tried anew
    version.write_text("2.0")
    native.library.cache_clear()
    assert native.library("int5") is None and builds() == 2
    assert len(list(cache.glob("int5-*.failed"))) == 2


@pytest.mark.parametrize("other", ["built", "failed"])
def test_what_another_process_did_while_this_one_waited_for_the_lock_counts(
    cache, runs_here, tmp_path, monkeypatch, other
):
    """Under the lock the library and the failure marker are looked for again: another process may
    have built the library, or failed to, meanwhile. Either way this one doesn't build."""
    cc, log = compiler("cc"), tmp_path / "calls"
    monkeypatch.setenv("CC", script(tmp_path / "cc", f'echo "$*" >> {log}\nexec {cc} "$@"\n'))
    lock = store.lock

    @contextlib.contextmanager
    def waited(path: Path, *args: object, **kwargs: object):
        with lock(path, *args, **kwargs):
            target = path.with_suffix(".so")
            if other == "built":
                native._build([cc], native._flags(False), (KERNELS / "flash.c").read_bytes(), target)
            else:
                target.with_suffix(".failed").write_text("cc failed: error: elsewhere\n")
            yield

    monkeypatch.setattr(store, "lock", waited)
    lib = native.library("flash")
    assert not [line for line in log.read_text().splitlines() if "flash-" in line]
    if other == "built":
        assert lib is not None, native.why_unavailable("flash")
    else:
        assert lib is None and "error: elsewhere; remembered" in (native.why_unavailable("flash") or "")


def test_without_openmp_the_kernel_builds_for_one_thread_and_says_so(cache, runs_here, tmp_path, monkeypatch):
    """A compiler that refuses -fopenmp (Apple's clang; clang without libomp can't link it) still
    builds the kernel, without it."""
    cc, log = compiler("cc"), tmp_path / "calls"
    wrapper = script(
        tmp_path / "no-openmp-cc",
        f'echo "$*" >> {log}\n'
        'for arg in "$@"; do\n'
        '  [ "$arg" = -fopenmp ] && { echo "clang: error: unsupported option \'-fopenmp\'" >&2; exit 1; }\n'
        "done\n"
        f'exec {cc} "$@"\n',
    )
    monkeypatch.setenv("CC", wrapper)
    assert native.library("flash") is not None, native.why_unavailable("flash")
    [build] = [line for line in log.read_text().splitlines() if "flash-" in line]
    assert "-fopenmp" not in build.split()
    assert native.notes("flash") == [
        f"the attention kernel runs on one thread: {wrapper} has no OpenMP here "
        "(no-openmp-cc failed: clang: error: unsupported option '-fopenmp')"
    ]


def test_a_cpu_without_the_instructions_builds_nothing(cache, tmp_path, monkeypatch):
    log = tmp_path / "calls"
    monkeypatch.setenv("CC", script(tmp_path / "cc", f'echo "$*" >> {log}\nexit 1\n'))
    monkeypatch.setattr(cpu, "_raw_flags", lambda: (frozenset({"avx", "avx2", "fma", "f16c"}), True))
    for name, src in native.SOURCES.items():
        if not src.cpu_flags:  # q8: any CPU runs its scalar loop
            assert native._switched_off(src) is None
            continue
        assert native.library(name) is None and native.why_unavailable(name) == f"this CPU lacks {src.needs}"
        assert not native.likely_available(name)
    assert not log.exists() and not cache.exists()


def test_an_isa_cap_below_a_kernel_turns_it_off_and_is_named(cache, monkeypatch):
    compiler("cc")
    monkeypatch.setattr(cpu, "_raw_flags", lambda: (ALL_FLAGS, True))
    monkeypatch.setenv("LONGDOC_ISA", "avx512vnni")
    assert native.library("flash") is None and not native.likely_available("flash")
    assert native.why_unavailable("flash") == "LONGDOC_ISA=avx512vnni caps the CPU below AVX-512 BF16"
    assert native._switched_off(native.SOURCES["int5"]) is None  # the cap keeps VNNI
    monkeypatch.setenv("LONGDOC_ISA", "avx512bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # torch's own cap, lower
    assert native._switched_off(native.SOURCES["int5"]) == "ONEDNN_MAX_CPU_ISA=AVX2 caps the CPU below AVX-512 VNNI"


def test_likely_available_says_no_where_the_flags_cant_be_read(cache, runs_here, monkeypatch):
    """Unknown flags (macOS without sysctl, another OS): the kernel tests' skip markers skip, while
    ``library`` still tries, and the kernel's own probe decides."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    assert all(native.likely_available(name) for name in native.SOURCES)
    monkeypatch.setattr(cpu, "_raw_flags", lambda: (frozenset(), False))
    assert not any(native.likely_available(name) for name in native.SOURCES)
    assert native.library("int5") is not None, native.why_unavailable("int5")
