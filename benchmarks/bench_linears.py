"""Time of a decode step's linears per kernel, on the embedded model's shapes (issue 13).

One row through every linear of a 24-layer Qwen2.5-0.5B-shaped decoder (q/k/v, o, gate/up, down) and
through the LM head, with random weights, each layer its own (so, as in a real step, the weights come
from memory, not cache). Kernels: packed bfloat16 (``PackedLinear``), torch's int8 weight-only kernel,
the int8 GEMM as ``--quantize int8`` runs it (q/k/v and gate/up stacked, activations per block of 128
on the normalized inputs), and int4. Also the int8 GEMM's time for one row against the seven rows of a
block-diagonal input (memory-bound: about the same).

    python -m benchmarks.bench_linears
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import cpu_info, save

HIDDEN, INTER, KV, VOCAB, LAYERS = 896, 4864, 128, 151936, 24


def timed(fn: Callable[[], object], reps: int = 20) -> float:
    """Milliseconds per call, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def linear(n: int, k: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    nn.init.normal_(layer.weight, std=0.02)
    return layer


def decoder_layer() -> nn.Module:
    """One decoder layer's linears, named as transformers names them."""
    attn = nn.Module()
    attn.q_proj, attn.k_proj = linear(HIDDEN, HIDDEN, True), linear(KV, HIDDEN, True)
    attn.v_proj = linear(KV, HIDDEN, True)
    attn.o_proj = linear(HIDDEN, HIDDEN)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = linear(INTER, HIDDEN), linear(INTER, HIDDEN), linear(HIDDEN, INTER)
    layer = nn.Module()
    layer.self_attn, layer.mlp = attn, mlp
    return layer


def build(kind: str) -> tuple[list[nn.Module], nn.Module]:
    """The decoder layers and the LM head, run as ``kind`` runs them."""
    from longdoc.quant import schemes
    from longdoc.quant.packing import pack_linears

    model = nn.Module()
    model.layers = nn.ModuleList([decoder_layer() for _ in range(LAYERS)])
    model.lm_head = linear(VOCAB, HIDDEN)
    if kind != "bfloat16":
        scheme = "int4" if kind == "int4" else "int8"
        tensors = {}
        for name in schemes.quantized_names(model):
            q, s = schemes.quantize(scheme, model.get_submodule(name).weight)
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q, s
        schemes.quantize_linears(model, scheme, tensors)
    else:
        pack_linears(model)
    return list(model.layers), model.lm_head


def step(layers: list[nn.Module]) -> None:
    """One row through every linear, each input a fresh tensor as in a real step."""
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = torch.randn(1, 1, HIDDEN, dtype=torch.bfloat16)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        attn.o_proj(q)
        y = torch.randn(1, 1, HIDDEN, dtype=torch.bfloat16)
        h = mlp.gate_proj(y) * mlp.up_proj(y)
        mlp.down_proj(h)
        del k, v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="linears")
    ap.add_argument("--kinds", default="bfloat16,int8 weight-only,int8 GEMM,int4")
    a = ap.parse_args()
    from longdoc.quant import schemes

    kinds = a.kinds.split(",")
    rows = []
    for kind in kinds:
        if kind == "int8 GEMM" and not schemes.int8_gemm_available():
            rows.append({"kind": kind, "error": "no int8 GEMM here"})
            continue
        saved = schemes.int8_gemm_available
        if kind == "int8 weight-only":
            schemes.int8_gemm_available = lambda: False  # type: ignore[assignment]
        try:
            layers, head = build(kind)
        finally:
            schemes.int8_gemm_available = saved
        decoder = timed(lambda layers=layers: step(layers))
        # a fresh input each call: the int8 GEMM hands a repeated input its last outputs
        lm_head = timed(lambda head=head: head(torch.randn(1, HIDDEN, dtype=torch.bfloat16)))
        row = {"kind": kind, "decoder_ms": round(decoder, 2), "lm_head_ms": round(lm_head, 2)}
        print(row, flush=True)
        rows.append(row)
        del layers, head
    extra = {}
    if schemes.int8_gemm_available():
        # 24 layers' gate/up GEMMs: one row, and a block-diagonal input of 7 rows (blocks of 128 of 896)
        weights = [torch.randint(-127, 128, (2 * INTER, HIDDEN), dtype=torch.int8) for _ in range(LAYERS)]
        packs = [schemes.QuantGemm("int8", [w], [torch.rand(2 * INTER)], [None], torch.bfloat16) for w in weights]
        for rows_in in (1, 7):
            x = torch.randn(rows_in, HIDDEN)
            ms = timed(lambda x=x: [torch.ops.quantized.linear_dynamic(x, g.packed, False) for g in packs])
            extra[f"gate_up_24_layers_{rows_in}_rows_ms"] = round(ms, 2)
        print(extra, flush=True)
    payload = {"command": "python -m benchmarks.bench_linears", "torch": torch.__version__, **cpu_info()}
    print(save(a.name, {**payload, "rows": rows, **extra}))


if __name__ == "__main__":
    main()
