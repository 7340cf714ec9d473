"""What one decode step costs, and where it goes (issue 13's "leaner decode step").

For each quantization, in its own process: a prompt of ``--length`` corpus tokens is prefilled, then
greedy steps are timed (four blocks of 24 steps; the fastest block counts, the machine being noisy);
then six rounds alternate a plain read of the bytes a step reads (its weights and KV cache) with 8
steps, giving the step's read rate as a fraction of the machine's; and 8 further steps run under
torch's profiler, which counts the tensor operations a step issues (a number the code controls, unlike
the time) and splits the step's CPU time into the quantized or packed linear kernels, the attention
kernel, and everything else.

``--paths native,torch`` also runs the decode steps through longdoc's torch path (``Decoder.walk_row``)
where they would run in the native decode step (``native.step``, one C call for all the layers: q8 runs
over a 16-bit KV cache), the step before the thirteenth session; the native step's own time shows as
"layers (native)" (the q8 and attn16 kernel calls inside it are not seen by the profiler). ``--dtype``:
the run's (bfloat16 by default, as the rows before; ``auto`` is float32 on AVX2).

``--compile`` runs the step through ``torch.compile`` (inductor, dynamic shapes) instead, and reports
the first two calls' times: the first compiles for the prompt's position, the second recompiles with
the position symbolic; later steps reuse that. (int4 only: the int8 GEMM's packed weights are a
TorchScript object that dynamo cannot trace, and bfloat16's oneDNN-packed weights are opaque tensors.)

    python -m benchmarks.bench_step --length 2048 --quantize none,int8,int4
    python -m benchmarks.bench_step --length 2048 --quantize int4 --compile --name step_compile
    python -m benchmarks.bench_step --length 2048 --quantize q8 --paths torch,native --name step_native
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks.common import child_rows, corpus_text, save_rows
from longdoc.native import attn16, int5, q8, step

# longdoc's kernels are ctypes calls, not torch ops: ``_profiled`` names them for the profiler
LINEAR_OPS = (
    "quantized::linear_dynamic",
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "mkldnn::_linear_pointwise",
    "longdoc::int5_matmul",
    "longdoc::q8_matmul",
)
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "longdoc::attn16")
NATIVE_OPS = ("longdoc::step_layers",)


def _profiled() -> None:
    """Make longdoc's kernel calls show in the profiler, each under a name of its own."""
    for cls, label in (
        (int5.Int5Matmul, "longdoc::int5_matmul"),
        (q8.Q8Matmul, "longdoc::q8_matmul"),
        (attn16.CacheAttention, "longdoc::attn16"),
        (step.StepLayers, "longdoc::step_layers"),
    ):
        call = cls.__call__

        def named(self: Any, *args: Any, call: Any = call, label: str = label, **kwargs: Any) -> Any:
            with torch.profiler.record_function(label):
                return call(self, *args, **kwargs)

        cls.__call__ = named  # type: ignore[method-assign]


def child(quantize: str, length: int, compiled: bool, path: str = "native", dtype: str = "bfloat16") -> dict:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_llamacpp import step_bytes
    from benchmarks.bench_q8 import plain_reads
    from longdoc.config import GenerationConfig, RunConfig
    from longdoc.engine.longmodel import LongModel
    from longdoc.engine.prefill import prefill
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend
    from longdoc.runtime.plan import make_plan

    if path == "torch":  # the torch path wherever the native step would run
        LongModel.native_step = lambda self, kv: None  # type: ignore[method-assign]
    cfg = RunConfig(dtype=dtype, quantize=quantize, generation=GenerationConfig(max_new_tokens=128))
    session = LocalBackend(cfg, Reporter(quiet=True))
    ids = session.encode(corpus_text())[:length]
    model = session.long_model(make_plan(cfg, session.info, len(ids)))
    kv = model.new_cache(len(ids) + 160)
    logits = prefill(model, torch.tensor([ids]), kv, cfg.prefill_step)
    state = {"pos": len(ids), "token": int(logits.argmax())}
    forward = model.forward
    if compiled:
        # compiled without inference_mode (dynamo cannot write the KV cache's inference tensors)
        inner = torch.compile(type(model).forward.__wrapped__, dynamic=True)

        def forward(ids: torch.Tensor, pos: int, store: object) -> torch.Tensor:
            with torch.no_grad():
                return inner(model, ids, pos, store)

    def steps(n: int) -> None:
        for _ in range(n):
            out = forward(torch.tensor([[state["token"]]]), state["pos"], kv)
            state["token"], state["pos"] = int(out.argmax()), state["pos"] + 1

    first_calls = []
    for _ in range(2):
        t0 = time.perf_counter()
        steps(1)
        first_calls.append(round(time.perf_counter() - t0, 2))
    steps(2)
    blocks = []
    for _ in range(4):
        t0 = time.perf_counter()
        steps(24)
        blocks.append((time.perf_counter() - t0) / 24 * 1e3)
    # the step against the machine's read rate, interleaved (the rate moves by half from one minute to
    # the next on shared cores): 6 rounds of a plain read of the bytes a step reads, then 8 steps
    nbytes = step_bytes(session, length)
    reads, short = [], []
    for _ in range(6):
        reads.append(max(plain_reads(nbytes, 2, torch.get_num_threads()).values()))
        t0 = time.perf_counter()
        steps(8)
        short.append((time.perf_counter() - t0) / 8)
    n = 8
    _profiled()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(n)
    top = [e for e in prof.events() if e.cpu_parent is None]
    split = {"linear": 0.0, "attention": 0.0, "layers (native)": 0.0, "other": 0.0}
    for e in top:
        name = e.name
        part = "other"
        if name in LINEAR_OPS:
            part = "linear"
        elif name in ATTENTION_OPS:
            part = "attention"
        elif name in NATIVE_OPS:
            part = "layers (native)"
        split[part] += e.cpu_time_total / 1e3 / n
    return {
        "quantize": quantize,
        "dtype": session.info.dtype_name,
        "path": "native" if model.native_step(kv) is not None else "torch",
        "compiled": compiled,
        "first_calls_s": first_calls,
        "length": length,
        "step_ms": round(min(blocks), 2),
        "step_ms_blocks": [round(b, 2) for b in blocks],
        "ops_per_step": len(top) // n,
        "step_bytes": nbytes,
        "read_gb_per_s": max(reads),
        # the fastest block of 8 steps against the fastest read, both from the interleaved rounds
        "fraction_of_read": round(nbytes / min(short) / 1e9 / max(reads), 3),
        "profiled_ms": {k: round(v, 2) for k, v in split.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--quantize", default="none,int8,int4")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--paths", default="native", help="the decode step's: native, torch, or both (comma-separated)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--name", default="step")
    p.add_argument("--child", action="store_true")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.quantize, a.length, a.compile, a.paths, a.dtype)))
        return
    flags = ["--compile"] if a.compile else []
    flags += ["--dtype", a.dtype]
    schemes = a.quantize.split(",")
    ways = a.paths.split(",")
    rows = child_rows(
        "bench_step.py",
        [["--quantize", s, "--length", str(a.length), "--paths", w, *flags] for w in ways for s in schemes],
    )
    command = f"python -m benchmarks.bench_step --length {a.length} --quantize {a.quantize} --dtype {a.dtype}" + (
        " --compile" if a.compile else ""
    )
    command += f" --paths {a.paths}" if a.paths != "native" else ""
    save_rows(a.name, command, rows)


if __name__ == "__main__":
    main()
