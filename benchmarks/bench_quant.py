"""Perplexity of mixed weight-only quantizations: which linears can take int4 (issue 13).

Each selection assigns every linear of the model a kind (bfloat16, int8 or int4, quantized as
``--quantize`` does) in memory, and runs ``eval ppl``'s measurement (every position through the
quantized weights) on the shared corpus. It answers whether keeping a few sensitive linears at
higher precision brings int4 within the 1% perplexity a default may lose; none of these selections
is a ``--quantize`` scheme.

    python -m benchmarks.bench_quant --lengths 4096
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import corpus_text, save_rows

# The layers whose attn_v / ffn_down the embedded Q4_K_M GGUF keeps at Q8_0 / Q6_K (the rest: Q5_0 /
# Q4_K). llama.cpp picks them by position in its tensor order, which sorts layer numbers as strings.
GGUF_MORE_BITS = {0, 1, 3, 6, 7, 8, 9, 10, 13, 16, 19, 21}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


# selection -> (linear name -> "none" | "int8" | "int4")
SELECTIONS: dict[str, Callable[[str], str]] = {
    "none": lambda n: "none",
    "int8": lambda n: "int8",
    "int4": lambda n: "int4",
    "int4, LM head bf16": lambda n: "none" if n == "lm_head" else "int4",
    "int4, LM head int8": lambda n: "int8" if n == "lm_head" else "int4",
    "int4, attention int8": lambda n: "int8" if ".self_attn." in n else "int4",
    "int4, MLP int8": lambda n: "int8" if ".mlp." in n else "int4",
    "int4, GGUF's 6-8-bit attn_v/ffn_down int8": lambda n: (
        "int8" if _layer(n) in GGUF_MORE_BITS and n.endswith(("v_proj", "down_proj")) else "int4"
    ),
    "int8, LM head int4": lambda n: "int4" if n == "lm_head" else "int8",
}


def load_selection(session: Any, select: Callable[[str], str]) -> None:
    """Load the session's model afresh with each linear quantized as ``select`` says."""
    from longdoc import models
    from longdoc.quant import schemes
    from longdoc.quant.packing import pack_linears

    info = session.info
    source = models.ModelSource(kind="folder", name=info.name, path=info.folder)
    loaded = models.load_model(source, info.device, info.dtype, tokenizer=session.tokenizer)
    model = loaded.model
    for name in schemes.quantized_names(model):
        kind = select(name)
        if kind == "none":
            continue
        dense = model.get_submodule(name)
        qweight, scales = schemes.quantize(kind, dense.weight)
        parent, _, child = name.rpartition(".")
        layer = schemes.QuantLinear(dense, kind, qweight, scales, dtype=info.dtype)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    pack_linears(model)
    session._loaded = loaded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--selections", default=",".join(SELECTIONS), help="comma-separated names of SELECTIONS")
    ap.add_argument("--name", default="quant_mix")
    a = ap.parse_args()

    from longdoc.config import DCAConfig, RunConfig
    from longdoc.evals.ppl import nll_sum
    from longdoc.render import Reporter
    from longdoc.runtime.local import LocalBackend

    session = LocalBackend(RunConfig(dca=DCAConfig(enabled=False), doc_cache=False), Reporter(quiet=True))
    ids = session.encode(corpus_text())
    lengths = [int(x) for x in a.lengths.split(",")]
    rows = []
    for label in a.selections.split(","):
        t0 = time.perf_counter()
        load_selection(session, SELECTIONS[label])
        row: dict[str, Any] = {"selection": label}
        for length in lengths:
            total, count = nll_sum(session, ids[:length])
            row[str(length)] = round(math.exp(total / count), 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    cmd = f"python -m benchmarks.bench_quant --lengths {a.lengths}"
    save_rows(a.name, cmd, rows)


if __name__ == "__main__":
    main()
