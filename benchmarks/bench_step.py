"""What one decode step costs, and where it goes (issue 13's "leaner decode step").

For each quantization, in its own process: a prompt of ``--length`` corpus tokens is prefilled, then
greedy steps are timed (four blocks of 24 steps; the fastest block counts, the machine being noisy),
and 8 further steps run under torch's profiler, which counts the tensor operations a step issues (a
number the code controls, unlike the time) and splits the step's CPU time into the quantized or
packed linear kernels, the attention kernel, and everything else.

``--compile`` runs the step through ``torch.compile`` (inductor, dynamic shapes) instead, and reports
the first two calls' times: the first compiles for the prompt's position, the second recompiles with
the position symbolic; later steps reuse that. (int4 only: the int8 GEMM's packed weights are a
TorchScript object that dynamo cannot trace, and bfloat16's oneDNN-packed weights are opaque tensors.)

    python -m benchmarks.bench_step --length 2048 --quantize none,int8,int4
    python -m benchmarks.bench_step --length 2048 --quantize int4 --compile --name step_compile
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import child_rows, corpus_text, save_rows
from longdoc.native import int5

LINEAR_OPS = (
    "quantized::linear_dynamic",
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "mkldnn::_linear_pointwise",
    "longdoc::int5_matmul",  # a ctypes call: named for the profiler by ``_profiled_int5``
)
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",)


def _profiled_int5() -> None:
    """Make the int5 kernel's calls show in the profiler (they are ctypes calls, not torch ops)."""

    call = int5.Int5Matmul.__call__

    def named(self: int5.Int5Matmul, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        with torch.profiler.record_function("longdoc::int5_matmul"):
            return call(self, rows, dtype)

    int5.Int5Matmul.__call__ = named  # type: ignore[method-assign]


def child(quantize: str, length: int, compiled: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from longdoc.config import GenerationConfig, RunConfig
    from longdoc.engine.prefill import prefill
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend
    from longdoc.runtime.plan import make_plan

    cfg = RunConfig(dtype="bfloat16", quantize=quantize, generation=GenerationConfig(max_new_tokens=128))
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
    n = 8
    _profiled_int5()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(n)
    top = [e for e in prof.events() if e.cpu_parent is None]
    split = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for e in top:
        name = e.name
        part = "other"
        if name in LINEAR_OPS:
            part = "linear"
        elif name in ATTENTION_OPS:
            part = "attention"
        split[part] += e.cpu_time_total / 1e3 / n
    return {
        "quantize": quantize,
        "compiled": compiled,
        "first_calls_s": first_calls,
        "length": length,
        "step_ms": round(min(blocks), 2),
        "step_ms_blocks": [round(b, 2) for b in blocks],
        "ops_per_step": len(top) // n,
        "profiled_ms": {k: round(v, 2) for k, v in split.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--quantize", default="none,int8,int4")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--name", default="step")
    p.add_argument("--child", action="store_true")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.quantize, a.length, a.compile)))
        return
    flags = ["--compile"] if a.compile else []
    schemes = a.quantize.split(",")
    rows = child_rows("bench_step.py", [["--quantize", s, "--length", str(a.length), *flags] for s in schemes])
    command = f"python -m benchmarks.bench_step --length {a.length} --quantize {a.quantize}" + (
        " --compile" if a.compile else ""
    )
    save_rows(a.name, command, rows)


if __name__ == "__main__":
    main()
