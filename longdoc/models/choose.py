"""Which known model ``--model auto`` (the default) runs here: the larger one where the machine is fast
enough for it, else the embedded one.

The rule (benchmarks/RESULTS.md, "Which model auto runs", from the quality and speed table of both):
``qwen2.5-coder-1.5b`` when its extra is installed and this machine multiplies at least ``FAST_GFLOPS``
in the run's device and dtype, else the embedded 0.5B. At that rate the 1.5B's linears take about a
minute for a 20K-token paper (``LARGER_FLOPS_PER_TOKEN``). The 2-core machines measured so far reach
130-140 GFLOP/s in float32 (AVX2) and about 440 in bfloat16 (AVX-512 BF16): the 1.5B's answer to a
paper takes several minutes there. A CPU run in a 16-bit dtype without native matmuls for it is not
measured: it is slow.

The rate is measured once per machine and settings, by a prefill-shaped matmul of the 1.5B's MLP width
(``PROBE``, best of three), and kept in the cache folder (``speed.json``), written atomically and
checked when read: a missing, damaged or foreign entry is measured again. Nothing is measured when the
larger model is not installed: there is nothing to choose then.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from longdoc import cpu
from longdoc.models.resolve import DEFAULT_MODEL, KNOWN_MODELS, cpu_has_fast_bf16, packages_installed
from longdoc.store import cache_dir, write_json_atomic

#: the spec (and the default when --model is not given) that this rule resolves
AUTO_MODEL = "auto"
LARGER_MODEL = "qwen2.5-coder-1.5b"
#: multiply-adds x 2 per prompt token in the 1.5B's linears: 28 layers of q/o (1536 x 1536 each),
#: k/v (256 x 1536 each) and the MLP (3 x 8960 x 1536); attention and the LM head not counted
LARGER_FLOPS_PER_TOKEN = 2 * 28 * (2 * 1536 * 1536 + 2 * 256 * 1536 + 3 * 8960 * 1536)
#: the rate from which auto runs the 1.5B: its linears at >= ~380 prompt tokens a second
FAST_GFLOPS = 1000.0
#: rows, inputs, outputs of the probe: the 1.5B's MLP up-projection on a slice of prefill rows
PROBE = (256, 1536, 8960)
#: a probe call ten times slower than at FAST_GFLOPS settles it: no more calls
PROBE_GIVE_UP_S = 10 * 2 * PROBE[0] * PROBE[1] * PROBE[2] / (FAST_GFLOPS * 1e9)
SPEED_FILE = "speed.json"
SPEED_VERSION = 1


@dataclass(frozen=True)
class ModelChoice:
    """What ``auto`` runs and why; ``note`` is the one line to tell the user when the larger model is
    installed but not chosen (and how to get it anyway), else None."""

    alias: str
    why: str
    note: str | None = None


def speed_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured rate depends on: the CPU (or GPU), the ISA cap, threads, torch, device, dtype."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu.model_name()
    return "|".join(
        [
            where,
            cpu.cpu_class() if device.type == "cpu" else "cuda",
            cpu.isa_cap() or "-",
            f"threads={torch.get_num_threads()}",
            f"torch={torch.__version__}",
            str(device),
            str(dtype).removeprefix("torch."),
        ]
    )


def measure_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """The best of three ``PROBE`` matmuls, in GFLOP/s, after an untimed one on a few rows that pays the
    one-time costs (a GPU library's start, thread pools); a call slower than ``PROBE_GIVE_UP_S`` ends it."""
    rows, k, n = PROBE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)

    def timed(rows: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.nn.functional.linear(rows, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed(x[:8])
    best = float("inf")
    for _ in range(3):
        best = min(best, timed(x))
        if best > PROBE_GIVE_UP_S:
            break
    return 2 * rows * k * n / best / 1e9


def _read_speeds() -> dict[str, Any]:
    path = cache_dir() / SPEED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != SPEED_VERSION or not isinstance(data.get("gflops"), dict):
        return {}
    rates = data["gflops"].items()
    return {k: v for k, v in rates if isinstance(v, float | int) and not isinstance(v, bool) and 0 < v < 1e7}


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """This machine's matmul rate in ``dtype`` on ``device``: from the cache when it holds a sound
    entry for these settings, else measured now and recorded (best effort: a read-only cache folder
    just means measuring again next time)."""
    key = speed_key(device, dtype)
    speeds = _read_speeds()
    if key in speeds:
        return float(speeds[key])
    rate = round(measure_gflops(device, dtype), 1)
    speeds[key] = rate
    with contextlib.suppress(OSError):
        write_json_atomic(cache_dir() / SPEED_FILE, {"version": SPEED_VERSION, "gflops": speeds})
    return rate


def fast_cpu_dtype(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` at full speed, as longdoc counts it: float32 always, bfloat16
    with AMX or AVX-512 BF16 (``cpu_has_fast_bf16``), float16 never (no CPU path of longdoc's uses it)."""
    if dtype == torch.bfloat16:
        return cpu_has_fast_bf16()
    return dtype != torch.float16


def choose_model(device: torch.device, dtype: torch.dtype) -> ModelChoice:
    """The rule of this module's docstring, for a run on ``device`` in ``dtype``."""
    larger = KNOWN_MODELS[LARGER_MODEL]
    if not packages_installed(larger):
        return ModelChoice(DEFAULT_MODEL, f"the embedded model ({LARGER_MODEL} is not installed)")
    if device.type == "cpu" and not fast_cpu_dtype(dtype):
        name = str(dtype).removeprefix("torch.")
        return ModelChoice(DEFAULT_MODEL, f"{LARGER_MODEL} is installed, but this CPU has no native {name} matmuls")
    rate = matmul_gflops(device, dtype)
    tok_s = rate * 1e9 / LARGER_FLOPS_PER_TOKEN
    if rate >= FAST_GFLOPS:
        return ModelChoice(
            LARGER_MODEL, f"installed, and this machine multiplies at {rate:.0f} GFLOP/s (>= {FAST_GFLOPS:.0f})"
        )
    why = f"{LARGER_MODEL} is installed, but this machine multiplies at {rate:.0f} GFLOP/s (< {FAST_GFLOPS:.0f})"
    note = (
        f"--model auto runs {DEFAULT_MODEL}: this machine would prefill {LARGER_MODEL} at about {tok_s:.0f}"
        f" tokens/s ({rate:.0f} GFLOP/s); pass --model {LARGER_MODEL} for its better answers anyway"
    )
    return ModelChoice(DEFAULT_MODEL, why, note)
