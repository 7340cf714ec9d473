"""Where prefill time goes, and exact vs sparse prefill, in one run.

For each length L the first L tokens of the shared corpus are prefilled with each mode (exact, and
sparse at each budget), with the attention calls and the decoder's linears timed (the rest is
"other": norms, rotations, cache writes, activations). FLOPs: linears 2 per weight per token;
attention 4 * head_dim per (query, key) pair and query head. Each is reported as achieved GFLOP/s
against the bfloat16 matmul ceiling measured in the same run (a packed MLP-shaped matmul of one
prefill step). The prefill clock's ETA at the halfway mark is compared with the time it really took.
``--kernels cpu,cpu-torch`` runs each mode with longdoc's attention kernel (flash.c, where it runs) and
with torch's fused CPU kernel. Mode ``transformers`` is plain transformers (bfloat16, SDPA, one forward
over the prompt), timed whole.
``--layers N`` runs only the first N decoder layers (same shapes per layer, 24/N times cheaper): for
the 64K rows, where one exact prefill of all 24 layers takes over 20 minutes on 2 cores.

    python -m benchmarks.bench_prefill --lengths 8192,16384,32768 --modes exact,sparse
    python -m benchmarks.bench_prefill --lengths 65536 --modes exact,sparse --layers 4 --name prefill_64k
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import torch

from benchmarks.common import corpus_text, cpu_info, save


def matmul_ceiling(dtype: torch.dtype, rows: int = 2048, k: int = 896, n: int = 4864) -> float:
    """GFLOP/s of the packed (oneDNN) linear the model's MLP runs, best of 5 after a warm-up."""
    from longdoc.quant.packing import PackedLinear, can_pack

    linear = torch.nn.Linear(k, n, bias=False).to(dtype)
    layer: torch.nn.Module = PackedLinear(linear) if can_pack(linear) else linear
    x = torch.randn(rows, k, dtype=dtype)
    with torch.inference_mode():
        layer(x)
        best = min(_timed(lambda: layer(x)) for _ in range(5))
    return 2 * rows * k * n / best / 1e9


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Timers:
    """Seconds spent in attention calls and in the decoder's linears, via wrappers and hooks."""

    def __init__(self, model: Any):
        self.attention = 0.0
        self.linear = 0.0
        self._t = 0.0
        self.hooks = [
            hook
            for layer in model.layers
            for module in layer.modules()
            if hasattr(module, "in_features") and not hasattr(module, "dense")  # a QuantLinear's inner layer counts
            for hook in (module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post))
        ]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _pre(self, *_: Any) -> None:
        self._t = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.linear += time.perf_counter() - self._t

    def wrap(self, attend: Any) -> Any:
        def timed(layer: int, q: torch.Tensor, start: int) -> torch.Tensor:
            t0 = time.perf_counter()
            out = attend(layer, q, start)
            self.attention += time.perf_counter() - t0
            return out

        return timed


def run_one(session: Any, ids: list[int], mode: str, budget: int, layers: int, kernel: str) -> dict[str, Any]:
    from longdoc.attention.kernels import get_kernel
    from longdoc.config import PrefillConfig
    from longdoc.engine.prefill import prefill
    from longdoc.runtime.plan import make_plan

    cfg = replace(session.cfg, prefill=PrefillConfig(mode=mode, budget=budget), kernel=kernel)
    plan = make_plan(cfg, session.info, len(ids))
    session.cfg = cfg  # the session picks the attention kernel from its own settings
    model = session.long_model(plan)
    assert model.settings.kernel is get_kernel(kernel, session.info.device)
    model.layers = model.layers[:layers]
    kv = model.new_cache(len(ids))
    timers = Timers(model)
    trace: list[tuple[int, float, float | None]] = []
    t0 = time.perf_counter()

    def progress(done: int, total: int, left: float | None) -> None:
        trace.append((done, time.perf_counter() - t0, left))

    prefill(
        model,
        torch.tensor([ids]),
        kv,
        cfg.prefill_step,
        progress=progress,
        attend=timers.wrap(model.default_attend(kv)),
    )
    total_s = time.perf_counter() - t0
    timers.close()
    half = next(i for i, (done, _, _) in enumerate(trace) if done >= len(ids) / 2)
    _, at, left = trace[half]
    c = model.config
    hd, h = model.head_dim, model.n_heads
    weights = c.hidden_size * (hd * (2 * h + 2 * model.n_kv_heads) + 3 * c.intermediate_size) * layers
    stats = model.settings.sparse_stats
    pairs = stats.kept / max(1, layers) if plan.sparse else len(ids) * (len(ids) + 1) / 2
    linear_flop, attn_flop = 2 * weights * len(ids), 4 * hd * h * pairs * layers
    return {
        "mode": mode,
        "kernel": kernel,
        "budget": budget if plan.sparse else None,
        "dca": plan.layout is not None,
        "kept_fraction": round(stats.kept_fraction, 4) if plan.sparse else 1.0,
        "prefill_s": round(total_s, 2),
        "tok_s": round(len(ids) / total_s, 1),
        "attention_s": round(timers.attention, 2),
        "linear_s": round(timers.linear, 2),
        "other_s": round(total_s - timers.attention - timers.linear, 2),
        "attention_gflops": round(attn_flop / timers.attention / 1e9, 1),
        "linear_gflops": round(linear_flop / timers.linear / 1e9, 1),
        "eta_at_half_s": round(left or 0.0, 1),
        "actual_after_half_s": round(total_s - at, 1),
        "eta_error": round((left or 0.0) / max(1e-9, total_s - at) - 1, 3),
    }


def run_hf(session: Any, ids: list[int], layers: int) -> dict[str, Any]:
    """Plain transformers (bfloat16, SDPA): the whole prompt in one forward, as ``generate`` does, with
    the same first ``layers`` decoder layers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(session.info.folder), dtype=session.info.dtype, attn_implementation="sdpa"
    )
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    x = torch.tensor([ids])
    with torch.inference_mode():
        model(x[:, :16], use_cache=False, logits_to_keep=1)  # first-call costs, as longdoc's path gets
        t0 = time.perf_counter()
        model(x, use_cache=False, logits_to_keep=1)
        total_s = time.perf_counter() - t0
    del model
    return {
        "mode": "transformers",
        "budget": None,
        "dca": False,
        "kept_fraction": 1.0,
        "prefill_s": round(total_s, 2),
        "tok_s": round(len(ids) / total_s, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--modes", default="exact,sparse", help="exact, sparse, transformers")
    parser.add_argument("--budgets", default="2048", help="sparse budgets to run")
    parser.add_argument("--layers", type=int, default=0, help="run only the first N decoder layers (0 = all)")
    parser.add_argument(
        "--kernels", default="cpu", help="attention back ends to run each mode with: cpu (longdoc's), cpu-torch"
    )
    parser.add_argument("--name", default="prefill")
    args = parser.parse_args(argv)

    from longdoc.config import RunConfig
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

    session = LocalBackend(RunConfig(doc_cache=False), Reporter(quiet=True))
    session.loaded()
    layers = args.layers or session.info.n_layers
    ids = session.encode(corpus_text())
    ceiling = matmul_ceiling(session.info.dtype)
    print(f"bfloat16 matmul ceiling: {ceiling:.0f} GFLOP/s", flush=True)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        if length > len(ids):
            raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than {length}")
        for mode in args.modes.split(","):
            if mode == "transformers":
                rows.append({"tokens": length, "layers": layers, **run_hf(session, ids[:length], layers)})
                print(rows[-1], flush=True)
                continue
            for kernel in args.kernels.split(","):
                for budget in [int(b) for b in args.budgets.split(",")] if mode == "sparse" else [0]:
                    row = {
                        "tokens": length,
                        "layers": layers,
                        **run_one(session, ids[:length], mode, budget, layers, kernel),
                    }
                    row["attention_vs_ceiling"] = round(row["attention_gflops"] / ceiling, 3)
                    print(row, flush=True)
                    rows.append(row)
    save(
        args.name,
        {
            "command": "python -m benchmarks.bench_prefill " + " ".join(argv or __import__("sys").argv[1:]),
            **cpu_info(),
            "dtype": session.info.dtype_name,
            "matmul_ceiling_gflops": round(ceiling, 1),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
