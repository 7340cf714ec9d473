"""Summarize-then-quote: does recycled decoding keep a fact that a long answer needs at its end?

Each task is a 16-32K-token window of real paper text (the shared corpus) with a pass key planted at
a chosen depth, and the request "Summarize the text in about 150 words, and at the end state the
secret pass key." The answer first summarizes (the recycled set fills with whatever a summary
attends to), then must turn to one sentence elsewhere in the text. Every decoding configuration
runs on the same prefilled cache, back to back, so accuracy and decode speed compare side by side.

    python -m benchmarks.bench_quote --docs 10 --configs full,fixed:2048:16,dynamic:2048:4:0.9

A configuration is ``full`` or ``SCHEDULE:K:STRIDE[:THRESHOLD]``. Prefilled caches are kept under
``--kv-dir`` (safetensors, keyed by the prompt's token ids), so further configurations cost only
their decoding.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import corpus_text, prefilled, save
from longdoc.config import GenerationConfig, RecycleConfig, RunConfig
from longdoc.engine.decode import generate
from longdoc.engine.recycled import RecycledPolicy
from longdoc.ingest import Document
from longdoc.prompt import ask_prompt
from longdoc.render import Reporter
from longdoc.runtime.local import LocalBackend

REQUEST = "Summarize the text in about 150 words, and at the end state the secret pass key."
LENGTHS = (16384, 20480, 24576, 28672, 32000)
DEPTHS = (0.15, 0.35, 0.5, 0.65, 0.85)


def tasks(session: LocalBackend, n: int, seed: int, lengths: tuple[int, ...] = LENGTHS) -> list[dict]:
    """n prompts: windows of the corpus at staggered offsets, each with a planted key at a depth."""
    ids = session.encode(corpus_text())
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        depth = DEPTHS[(i * 3) % len(DEPTHS)]
        start = (i * 4099) % max(1, len(ids) - length)
        text = session.tokenizer.decode(ids[start : start + length - 400])
        cut = text.find(". ", int(len(text) * depth)) + 2
        key = str(rng.randrange(10_000, 100_000))
        planted = f"{text[:cut]}The secret pass key is {key}. Remember it: the pass key is {key}. {text[cut:]}"
        prompt = ask_prompt(
            session.tokenizer, [Document(source="paper.txt", kind="text", segments=[("", planted)])], REQUEST
        )
        out.append({"key": key, "depth": depth, "prompt": prompt})
    return out


def policy_for(spec: str, n_layers: int) -> RecycledPolicy | None:
    if spec == "full":
        return None
    schedule, k, stride, *rest = spec.split(":")
    threshold = float(rest[0]) if rest else 0.9
    return RecycledPolicy(RecycleConfig(k=int(k), stride=int(stride), schedule=schedule, threshold=threshold), n_layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--configs", default="full,fixed:2048:16")
    ap.add_argument("--new", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths, cycled over the docs")
    ap.add_argument("--kv-dir", default="/tmp/longdoc-bench-kv")
    ap.add_argument("--name", default="quote")
    a = ap.parse_args()
    cfg = RunConfig(generation=GenerationConfig(max_new_tokens=a.new))
    session = LocalBackend(cfg, Reporter(quiet=True))
    configs = a.configs.split(",")
    rows = []
    for i, task in enumerate(tasks(session, a.docs, a.seed, tuple(int(x) for x in a.lengths.split(",")))):
        ids = session.encode(task["prompt"])
        model, kv, logits, prefill_s = prefilled(session, cfg, ids, a.new, Path(a.kv_dir))
        row: dict = {"doc": i, "tokens": len(ids), "depth": task["depth"], "key": task["key"], "prefill_s": prefill_s}
        for spec in configs:
            policy = policy_for(spec, session.info.n_layers)
            t0 = time.perf_counter()
            out = list(generate(model, logits, len(ids), kv, cfg.generation, session.info.stop_ids, policy))
            dt = time.perf_counter() - t0
            text = session.tokenizer.decode(out, skip_special_tokens=True)
            row[spec] = {
                "found": task["key"] in text,
                "decode_tok_s": round((len(out) - 1) / dt, 2) if len(out) > 1 else 0.0,
                "generated": len(out),
                "stats": policy.stats if policy else None,
                "tail": text[-160:],
            }
        rows.append(row)
        print(
            json.dumps(
                {
                    k: (v if not isinstance(v, dict) else {x: v[x] for x in ("found", "decode_tok_s")})
                    for k, v in row.items()
                }
            ),
            file=sys.stderr,
            flush=True,
        )
    summary = {
        spec: {
            "found": sum(r[spec]["found"] for r in rows),
            "of": len(rows),
            "mean_decode_tok_s": round(sum(r[spec]["decode_tok_s"] for r in rows) / len(rows), 2),
        }
        for spec in configs
    }
    print(json.dumps(summary), file=sys.stderr)
    print(save(a.name, {"torch": torch.__version__, "request": REQUEST, "summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
