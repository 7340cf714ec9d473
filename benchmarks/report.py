"""Render the tables of benchmarks/RESULTS.md from the JSON in benchmarks/out/ (figures are never typed
in by hand). Prints markdown; sections whose JSON is missing are skipped.

    python -m benchmarks.report > /tmp/tables.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
GB = 1e9


def load(name: str) -> Any:
    path = OUT / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not run yet, or still being written
        return None


def table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def engine(name: str, title: str) -> str | None:
    data = load(name)
    if not data:
        return None
    rows = []
    base: dict[int, float] = {}
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["config"], "-", "error: " + str(r["error"]), "", "", "", ""])
            continue
        if r["config"].startswith("hf:float32"):
            base[r["length"]] = r["prefill_tok_s"]
        ratio = r["prefill_tok_s"] / base[r["length"]] if r["length"] in base else None
        kv = r.get("kv_cache_bytes") or 0
        budget = (r["weight_bytes"] + kv) / GB + 1.5
        rows.append(
            [
                r["config"] + (f" (chunk {r['chunk_size']})" if r.get("chunk_size") else ""),
                r["length"],
                r["prefill_tok_s"],
                f"{ratio:.2f}x" if ratio else "",
                r.get("decode_tok_s"),
                f"{r['peak_rss_bytes'] / GB:.2f} GB",
                f"{r['weight_bytes'] / GB:.2f} + {kv / GB:.2f} + 1.5 = {budget:.2f} GB",
            ]
        )
    head = ["config", "tokens", "prefill tok/s", "vs hf fp32", "decode tok/s", "peak RSS", "weights + KV + 1.5 GB"]
    return f"### {title}\n\n" + table(head, rows)


def recycle(name: str = "recycle", title: str = "Decode: full vs recycled") -> str | None:
    data = load(name)
    if not data:
        return None
    rows, steps = [], []
    before = any("before" in r for r in data["rows"])
    for r in data["rows"]:
        row = [
            r["length"],
            "on" if r.get("dca") else "off",
            r["full_decode_tok_s"],
            r["recycled_decode_tok_s"],
            f"{r['speedup']:.2f}x",
            r["identical_prefix_tokens"],
            r["new"],
        ]
        if before:
            b = r.get("before", {})
            ratio = b.get("recycled_decode_tok_s", 0) / b["full_decode_tok_s"] if b.get("full_decode_tok_s") else 0
            row += [b.get("full_decode_tok_s", "-"), b.get("recycled_decode_tok_s", "-"), f"{ratio:.2f}x"]
        rows.append(row)
        for kind in ("full_step", "recycled_step"):
            if kind in r:
                s = r[kind]
                steps.append(
                    [
                        r["length"],
                        kind.replace("_step", ""),
                        s["step_ms"],
                        s["linear_ms"],
                        s["attention_ms"],
                        s["other_ms"],
                    ]
                )
    k, stride = data["rows"][0]["k"], data["rows"][0]["stride"]
    head = ["context", "DCA", "full tok/s", "recycled tok/s", "speedup", "same first tokens", "new tokens"]
    if before:
        rev = next(r["before"]["rev"] for r in data["rows"] if "before" in r)
        head += [f"before ({rev}): full", "before: recycled", "before: speedup"]
    text = f"### {title} (K={k}, stride {stride})\n\n" + table(head, rows)
    if steps:
        text += "\n\nWhere a decode step's time goes (ms per step, torch profiler, 16 steps):\n\n" + table(
            ["context", "step", "total", "linear (weights)", "attention (KV)", "other (overhead)"], steps
        )
    return text


def quote(name: str = "quote") -> str | None:
    data = load(name)
    if not data:
        return None
    configs = list(data["summary"])
    rows = []
    for spec in configs:
        agree = sum(r[spec]["found"] == r["full"]["found"] for r in data["rows"]) if "full" in configs else ""
        stats = [r[spec]["stats"] for r in data["rows"] if r[spec]["stats"]]
        full_steps = sum(s["full_steps"] for s in stats)
        refresh = sum(s.get("layer_refreshes", 0) for s in stats)
        rows.append(
            [
                spec,
                f"{data['summary'][spec]['found']}/{data['summary'][spec]['of']}",
                f"{agree}/{len(data['rows'])}" if agree != "" else "",
                data["summary"][spec]["mean_decode_tok_s"],
                f"{full_steps} / {refresh}" if stats else "",
            ]
        )
    lengths = sorted({r["tokens"] for r in data["rows"]})
    depths = sorted({r["depth"] for r in data["rows"]})
    return (
        f"### Summarize, then quote the pass key ({len(data['rows'])} documents, {lengths[0]:,}-{lengths[-1]:,} tokens,"
        f" key depths {', '.join(map(str, depths))})\n\n"
        + table(["decoding", "key stated", "same as full", "mean decode tok/s", "full steps / layer refreshes"], rows)
    )


def recall(name: str = "recall", label: str = "") -> str | None:
    data = load(name)
    if not data:
        return None
    rows = [
        [
            variant,
            f"{t['pages_recalled']}/{t['pages']}",
            f"{t['terms_recalled']}/{t['terms']}",
            t["filler"],
        ]
        for variant, t in data["totals"].items()
    ]
    docs = ", ".join(f"{r['doc']} p. {r['pages']} at {r['context']}" for r in data["rows"])
    return f"### Summary recall per page{label} (map-reduce, one page per map step; --max-context: {docs})\n\n" + table(
        ["prompts", "pages with a fact in the summary", "page facts in the summary", "filler openings"], rows
    )


def evals() -> str | None:
    parts = []
    for name, label in [
        ("passkey_dca2048", "DCA, chunk 2048"),
        ("passkey_window2048", "sliding window 2048"),
        ("passkey_36k_dca", "DCA (default chunk), 36K"),
        ("passkey_36k_plain", "plain RoPE, 36K"),
    ]:
        data = load(name)
        if data:
            by_len: dict[int, list[bool]] = {}
            for r in data["results"]:
                by_len.setdefault(r["length"], []).append(r["correct"])
            cells = ", ".join(f"{n}: {sum(v)}/{len(v)}" for n, v in sorted(by_len.items()))
            parts.append([f"passkey, {label}", f"{data['accuracy']:.2f}", cells])
    for name, label in [
        ("ppl_full", "full attention"),
        ("ppl_dca2048", "DCA, chunk 2048"),
        ("ppl_36k_plain", "plain RoPE"),
        ("ppl_36k_dca", "DCA (default chunk)"),
        ("ppl_36k_dca_temp", "DCA + attention temperature"),
    ]:
        data = load(name)
        if data:
            cells = ", ".join(f"{r['length']}: {r.get('ppl', r.get('error'))}" for r in data["results"])
            parts.append([f"perplexity, {label}", "", cells])
    data = load("needle")
    if data:
        for method, acc in data["accuracy"].items():
            rows = [r for r in data["results"] if r["method"] == method]
            by = {}
            for r in rows:
                by.setdefault((r["length"], r["keys"]), []).append(r["correct"])
            cells = ", ".join(
                f"{n // 1024}K/{k} key{'s' * (k > 1)}: {sum(v)}/{len(v)}" for (n, k), v in sorted(by.items())
            )
            parts.append([f"needle, {method} (budget {data['budget']})", f"{acc:.2f}", cells])
    if not parts:
        return None
    return "### Long-context accuracy\n\n" + table(["task", "accuracy", "detail"], parts)


def summarize() -> str | None:
    data = load("summarize")
    if not data:
        return None
    rows = []
    for name, r in data.items():
        if "error" in r:
            rows.append([name, "error", r["error"], "", "", ""])
            continue
        plan = r.get("plan") or {}
        rows.append(
            [
                name,
                r["wall_s"],
                r["prompt_tokens"],
                r["generated_tokens"],
                f"{r['peak_rss_bytes'] / GB:.2f} GB",
                f"{plan.get('mode', '')} {plan.get('pieces', '')} pieces",
            ]
        )
    return "### Summarizing the five corpus papers\n\n" + table(
        ["run", "wall s", "tokens prefilled", "generated", "peak RSS", "plan"], rows
    )


def fuzz() -> str | None:
    """The fuzz, Ctrl-C and model-cache fault figures (tests/fuzz)."""
    data = load("fuzz")
    if not data:
        return None
    rows = []
    halves = [v for k, v in sorted(data.items()) if k.startswith("ingest")]
    for run in halves:
        last = run["first_case"] + run["tried"] - 1
        slow = run["slowest"]
        rows.append(
            [
                f"ingestion, seed {run['seed']}, cases {run['first_case']:,}-{last:,}",
                f"{run['tried']:,}",
                f"{run['read']:,} read, {run['refused']:,} refused",
                run["crashes"],
                run["hangs"],
                f"case {slow['index']} `{slow['kind']}`: {slow['cpu_seconds']} s CPU ({slow['seconds']} s wall)",
            ]
        )
    if len(halves) > 1:
        rows.append(
            [
                "**ingestion, all**",
                f"**{sum(r['tried'] for r in halves):,}**",
                f"{sum(r['read'] for r in halves):,} read, {sum(r['refused'] for r in halves):,} refused",
                f"**{sum(r['crashes'] for r in halves)}**",
                f"**{sum(r['hangs'] for r in halves)}**",
                "",
            ]
        )
    for key, label in (("cli_local_model", "CLI, tiny local model"), ("cli", "CLI, embedded model")):
        run = data.get(key)
        if run:
            codes = ", ".join(f"exit {c}: {n}" for c, n in sorted(run["exit_codes"].items()))
            slow = run["slowest"]
            rows.append(
                [
                    f"{label}, seed {run['seed']}",
                    run["tried"],
                    codes,
                    run["crashes"],
                    run["hangs"],
                    f"case {slow['index']} `{slow['command']}` of `{slow['kind']}`: {slow['seconds']} s",
                ]
            )
    out = "### Fuzz\n\n" + table(["run", "tried", "outcome", "crashes", "hangs", "slowest case"], rows)
    sig = data.get("sigint")
    if sig:
        stages = ", ".join(f"{k} {v}" for k, v in sorted(sig.get("json_stages", {}).items()))
        out += "\n\n### Ctrl-C at random moments\n\n" + table(
            ["runs", "exit 130", "finished first", "problems", "hangs", "partial JSON by stage"],
            [
                [
                    sig["runs"],
                    sig["interrupted_exit_130"],
                    sig["finished_before_signal"],
                    sig["problems"],
                    sig["hangs"],
                    stages,
                ]
            ],
        )
    cache = data.get("cache")
    if cache:
        k, race, wait = cache["kill9"], cache["race"], cache["lock_timeout"]
        out += "\n\n### Model cache under faults\n\n" + table(
            ["fault", "result"],
            [
                [
                    f"kill -9 during conversion, {k['kills']} times",
                    f"next run exit {k['final_exit']}, verified model: {k['final_verified']}, "
                    f"temp dirs left: {len(k['leftover_temp_dirs'])}",
                ],
                [
                    f"{race['processes']} processes converting at once",
                    f"{race['conversions']} conversion, all answered: {race['all_answered']}",
                ],
                ["lock held past LONGDOC_LOCK_TIMEOUT", f"exit {wait['exit']} with: {wait['message'][:90]}..."],
            ],
        )
    return out


def cache() -> str | None:
    """Time to first token of a second question, cold vs the document cache (bench_cache)."""
    data = load("cache")
    if not data:
        return None
    rows = [
        [
            f"{r['tokens']:,}",
            r["cold"]["ttft_s"],
            r["warm"]["ttft_s"],
            f"{100 * r['ttft_ratio']:.2f}%",
            f"{r['entry_bytes'] / 1e6:,.0f} MB",
            r["entry_load_s"],
            r["save_s"],
            r["cold"]["dca"],
        ]
        for r in data["rows"]
    ]
    head = ["document tokens", "cold TTFT s", "warm TTFT s", "warm / cold", "entry size", "load s", "save s", "DCA"]
    return f"### Second question: cold vs document cache ({data['cpu']})\n\n" + table(head, rows)


def llamacpp(name: str = "llamacpp", title: str = "longdoc vs transformers vs llama.cpp") -> str | None:
    """longdoc (each --quantize) vs transformers bfloat16 vs llama.cpp, one run (bench_llamacpp.py)."""
    data = load(name)
    if not data:
        return None
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["config"], r.get("length", ""), "error: " + str(r["error"]), "", "", "", ""])
            continue
        flags = ", ".join(f for f in ("amx", "avx512_bf16") if r.get(f)) or "neither"
        extra = [k for k in ("dca", "recycle") if r.get(k)]
        label = r["config"] + (f" ({', '.join(extra)})" if extra else "")
        rows.append(
            [
                label,
                r["length"],
                r["prefill_tok_s"],
                r["decode_tok_s"],
                f"{r['peak_rss_bytes'] / GB:.2f} GB",
                f"{r['cpu']} ({flags}), {r['threads']} threads",
            ]
        )
    head = ["config", "prompt tokens", "prefill tok/s", "decode tok/s", "peak RSS", "CPU"]
    return f"### {title} ({data['new_tokens']} new tokens)\n\n" + table(head, rows)


def paths(name: str = "paths", title: str = "CPU paths: one row per choice, one run") -> str | None:
    """Each dtype / packing / quantize / kernel choice on the machine at hand, alternating rounds, with
    the revision before and llama.cpp in the same run (bench_paths.py): the best round of each (the
    cores are shared: a slow round is another process's), every round's decode beside it."""
    data = load(name)
    if not data:
        return None
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in data["rows"]:
        by_config.setdefault(r["config"], []).append(r)

    def best(rows: list[dict[str, Any]], key: str, pick: Any = max) -> Any:
        values = [r[key] for r in rows if r.get(key) is not None]
        return pick(values) if values else ""

    rows = []
    for config, runs in by_config.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append([config, "error: " + str(runs[0]["error"]), "", "", "", "", "", ""])
            continue
        first = ok[0]
        if config == "llamacpp":
            what = "llama.cpp (same GGUF)"
        elif config.startswith("rev:"):  # bench_llamacpp's child on that revision: as a user got it then
            what = f"revision {config[4:]}: {first.get('dtype', '')}, quantize {first.get('quantize', '')}"
        else:
            packed = "packed" if first.get("packed") else "unpacked"
            what = f"{first.get('dtype', '')}, {packed}, quantize {first.get('quantize', '')}, {first.get('attention')}"
        rows.append(
            [
                config,
                what,
                best(ok, "load_s", min),
                best(ok, "prefill_tok_s"),
                best(ok, "decode_tok_s"),
                ", ".join(str(r["decode_tok_s"]) for r in ok),
                f"{best(ok, 'peak_rss_bytes', min) / GB:.2f} GB",
                len(ok),
            ]
        )
    head = ["config", "what runs", "load s", "prefill tok/s", "decode tok/s", "decode, each round", "peak RSS", "runs"]
    length = data["rows"][0].get("length", "")
    where = f"{data['cpu']}, class {data.get('cpu_class', '?')}, {data['threads']} threads"
    return f"### {title} ({length}-token prompt; {where})\n\n`{data['command']}`\n\n" + table(head, rows)


def step() -> str | None:
    """A decode step's time, tensor operations and profiled split: before and after the leaner step,
    and eager against torch.compile (bench_step.py)."""
    rows = []
    for name in ("step_before", "step", "step_int4", "step_compile", "step_int5"):
        data = load(name)
        for r in (data or {}).get("rows", []):
            if "error" in r:
                continue
            split = r["profiled_ms"]
            compiled = r.get("compiled", False)
            rows.append(
                [
                    data.get("code", name),
                    r["quantize"],
                    r["length"],
                    r["step_ms"],
                    f"{r['first_calls_s'][0]} s, {r['first_calls_s'][1]} s" if compiled else "",
                    "" if compiled else r["ops_per_step"],
                    "" if compiled else f"{split['linear']} / {split['attention']} / {split['other']}",
                ]
            )
    if not rows:
        return None
    head = [
        "code",
        "--quantize",
        "context",
        "step ms (best of 4 x 24)",
        "first two calls (compiling)",
        "tensor ops per step",
        "profiled ms: linear / attention / other",
    ]
    return "### One decode step: time, operations, where it goes\n\n" + table(head, rows)


def llamacpp_ppl() -> str | None:
    """Perplexity of llama.cpp's GGUF and of longdoc's weights on the same ids (bench_llamacpp_ppl.py)."""
    data = load("llamacpp_ppl")
    if not data:
        return None
    rows = [[r["model"], r["length"], r["ppl"]] for r in data["rows"] if "error" not in r]
    return f"### Perplexity: llama.cpp's model vs longdoc's (`{data['command']}`, {data['cpu']})\n\n" + table(
        ["model", "tokens", "ppl"], rows
    )


def quantized() -> str | None:
    """Quality of --quantize against bfloat16: perplexity (every position through the quantized
    weights), passkey and needle (prompt prefilled unquantized, answer decoded quantized)."""
    rows = []
    labels = {
        "int5": "int5 (longdoc's kernel, int16 activations per group of 32; the default)",
        "int5_act8": "int5, int8 activations per group of 32 (tried, not kept)",
        "int5_mixed": "int5, LM head and down_proj in int8 through the int8 GEMM (tried, not kept)",
        "int8": "int8 (int8 GEMM, activations per block of 128 / per row)",
        "int4_mse": "int4, least-squares step per group (tried, not kept)",
    }
    for scheme in ("none", "int5", "int5_act8", "int5_mixed", "int8", "int4", "int4_mse"):
        cells = []
        ppl = load(f"quant_ppl_{scheme}")
        cells.append(", ".join(f"{r['length']}: {r.get('ppl', r.get('error'))}" for r in ppl["results"]) if ppl else "")
        passkey = load(f"quant_passkey_{scheme}")
        cells.append(f"{passkey['accuracy']:.2f}" if passkey else "")
        needle = load(f"quant_needle_{scheme}")
        cells.append(" ".join(f"{m}={a:.2f}" for m, a in needle["accuracy"].items()) if needle else "")
        if any(cells):
            rows.append([labels.get(scheme, scheme), *cells])
    if not rows:
        return None
    head = ["--quantize", "perplexity (no DCA)", "passkey 4K, 8K x 3 depths", "needle 8K, 16K, keys 1 and 4"]
    out = "### Quantization: quality against bfloat16\n\n" + table(head, rows)
    act = load("act_quant")
    if act:
        base = act["rows"][0]["ppl"]  # bfloat16
        act_rows = [[r["selection"], f"{r['ppl']} ({r['ppl'] / base - 1:+.2%})"] for r in act["rows"]]
        out += (
            f"\n\nint8 weights, activations quantized how: emulated perplexity at {act['length']} (`{act['command']}`, "
            f"{act['cpu']})\n\n" + table(["activations", f"ppl {act['length']}"], act_rows)
        )
    mix = load("quant_mix")
    if mix:
        base = mix["rows"][0]  # the "none" selection
        lengths = [k for k in base if k.isdigit()]
        mix_rows = [[r["selection"], *(f"{r[n]} ({r[n] / base[n] - 1:+.1%})" for n in lengths)] for r in mix["rows"]]
        out += (
            f"\n\nWhich linears can take int4: perplexity of mixed selections (`{mix['command']}`, "
            f"{mix['cpu']}, corpus PDFs only)\n\n" + table(["linears", *(f"ppl {n}" for n in lengths)], mix_rows)
        )
    return out


def attention_kernels(name: str = "attention") -> str | None:
    """longdoc's attention kernel against torch's on the model's shapes (bench_attention.py)."""
    data = load(name)
    if not data:
        return None
    rows = [
        [
            r["shape"],
            f"{r['queries']:,}",
            f"{r['keys']:,}",
            "yes" if r["causal"] else "no",
            f"{r['torch_ms']:.1f} ms, {r['torch_gflops']:.0f} ({r['torch_vs_ceiling']:.2f})",
            f"{r['longdoc_ms']:.1f} ms, {r['longdoc_gflops']:.0f} ({r['longdoc_vs_ceiling']:.2f})",
            r["longdoc_kernel"],
            f"{r['speedup']:.2f}x",
        ]
        for r in data["rows"]
    ]
    head = [
        "call",
        "queries",
        "keys",
        "causal",
        "torch: time, GFLOP/s (/ ceiling)",
        "longdoc",
        "longdoc runs",
        "speedup",
    ]
    return (
        f"### Exact attention kernels on the model's shapes (`{data['command']}`; {data['cpu']}, "
        f"{data['threads']} threads, matmul ceiling {data['matmul_ceiling_gflops']:.0f} GFLOP/s)\n\n"
        + table(head, rows)
    )


def prefill_breakdown(
    names: tuple[str, ...] = ("prefill", "prefill_64k", "prefill_32k_budgets", "prefill_24k_b8192"),
    title: str = "Where prefill time goes; exact vs sparse prefill",
) -> str | None:
    """Where prefill time goes, exact vs sparse, and the ETA check (bench_prefill.py). Rows name their
    attention kernel where the run compared kernels (runs before flash.c used torch's)."""
    rows, notes = [], []
    for name in names:
        data = load(name)
        if not data:
            continue
        notes.append(
            f"`{data['command']}`: {data['cpu']}, {data['threads']} threads, {data['dtype']}, "
            f"matmul ceiling {data['matmul_ceiling_gflops']:.0f} GFLOP/s"
        )
        exact = {
            (r["tokens"], r["layers"], r.get("kernel")): r["prefill_s"] for r in data["rows"] if r["mode"] == "exact"
        }
        hf = {(r["tokens"], r["layers"]): r["prefill_s"] for r in data["rows"] if r["mode"] == "transformers"}
        for r in data["rows"]:
            base = exact.get((r["tokens"], r["layers"], r.get("kernel")))
            total = r["prefill_s"]
            tokens = f"{r['tokens']:,}" + ("" if r["layers"] >= 24 else f" ({r['layers']} layers)")
            against = (hf.get((r["tokens"], r["layers"])) or 0) / total
            if r["mode"] == "transformers":
                rows.append([tokens, "transformers (SDPA)", "1.000", f"{total:.1f}", f"{r['tok_s']:,.0f}", *[""] * 7])
                continue
            mode = "exact" if r["mode"] == "exact" else f"sparse {r['budget']}"
            kernel = {"cpu": ", flash.c", "cpu-torch": ", torch's kernel"}.get(r.get("kernel", ""), "")
            rows.append(
                [
                    tokens,
                    mode + (" + DCA" if r["dca"] else "") + kernel,
                    f"{r['kept_fraction']:.3f}",
                    f"{total:.1f}",
                    f"{r['tok_s']:,.0f}",
                    f"{r['linear_s']:.1f} ({r['linear_s'] / total:.0%}) at {r['linear_gflops']:.0f}",
                    f"{r['attention_s']:.1f} ({r['attention_s'] / total:.0%}) at {r['attention_gflops']:.0f}",
                    f"{r['attention_vs_ceiling']:.2f}",
                    f"{r['other_s']:.1f}",
                    f"{base / total:.2f}x" if base else "",
                    f"{against:.2f}x" if against else "",
                    f"{r['eta_at_half_s']:.0f} / {r['actual_after_half_s']:.0f} ({r['eta_error']:+.0%})",
                ]
            )
    if not rows:
        return None
    head = [
        "tokens",
        "prefill",
        "kept pairs",
        "seconds",
        "tok/s",
        "linear s (share) at GFLOP/s",
        "attention s (share) at GFLOP/s",
        "attention / ceiling",
        "other s",
        "vs exact",
        "vs transformers",
        "ETA at half / actual",
    ]
    return f"### {title}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + table(head, rows)


def sparse_quality() -> str | None:
    """Quality gates of sparse prefill against exact (benchmarks/out/sparse/*.json: `longdoc eval` and
    `longdoc ask --json` outputs)."""

    def cell(name: str) -> str:
        data = load(f"sparse/{name}")
        if not data:
            return "not run"
        if data.get("task") == "ppl":
            return ", ".join(f"{r['length']:,}: {r.get('ppl', r.get('error'))}" for r in data["results"])
        if "answer" in data:  # a longdoc ask result
            t, m = data["timings"], data["memory"]
            return (
                f"{data['answer'][:60]!r}, {data['prompt_tokens']:,} tokens, prefill {t['prefill_s']:.0f} s, "
                f"peak RSS {m['peak_rss_bytes'] / GB:.2f} GB (KV {m['kv_cache_bytes'] / GB:.2f} GB)"
            )
        # the needle eval also decodes with baselines: its "full" rows are this prefill's answers
        rows = [r for r in data["results"] if r.get("method", "full") == "full"]
        return (
            f"{sum(bool(r['correct']) for r in rows)}/{len(rows)} (depths {', '.join(str(r['depth']) for r in rows)})"
        )

    checks = [
        ("perplexity, corpus, 32K", "ppl32k_exact", "ppl32k_sparse"),
        ("perplexity, corpus, 32K, budget 4096", "ppl32k_exact", "ppl32k_sparse_b4096"),
        ("perplexity, corpus, 32K, budget 8192 (the default below 64K)", "ppl32k_exact", "ppl32k_sparse_b8192"),
        ("passkey 32K, exact last 512 tokens", "passkey32k_exact", "passkey32k_sparse"),
        ("passkey 32K, before the exact tail", "passkey32k_exact", "passkey32k_sparse_notail"),
        ("passkey 32K, budget 8192 (the default below 64K)", "passkey32k_exact", "passkey32k_sparse_b8192"),
        ("passkey 64K", "passkey64k_exact", "passkey64k_sparse"),
        ("ask: pass key in ~32K tokens of corpus text", "ask32k_passkey_exact", "ask32k_passkey"),
        ("ask: five papers + code, ~100K tokens", "ask100k_exact", "ask100k"),
        (
            "ask: pass key in ~32K tokens of corpus text without pass-key passages, default (budget 8192)",
            "ask32k_clean_exact",
            "ask32k_clean",
        ),
        ("needle 16K, keys 1 and 4, 3 trials each", "needle16k_exact", "needle16k_sparse_b2048"),
        ("with flash.c: perplexity, corpus, 32K, budget 8192", "ppl32k_exact_flash", "ppl32k_sparse_b8192_flash"),
        ("with flash.c: passkey 32K, default (budget 8192)", "passkey32k_exact", "passkey32k_default_flash"),
        (
            "with flash.c: ask, five papers + code, ~100K tokens, default (budget 2048)",
            "ask100k_exact",
            "ask100k_flash",
        ),
        (
            "with flash.c: ask, pass key in ~32K tokens of corpus text (benchmarks/passkey_doc.py), default",
            "ask32k_passkey2_exact",
            "ask32k_passkey2",
        ),
    ]
    rows = [[label, cell(e), cell(sp)] for label, e, sp in checks]
    if all(r[1] == r[2] == "not run" for r in rows):
        return None
    title = "### Sparse prefill: quality against exact (budget 2048 unless the row says otherwise)\n\n"
    return title + table(["check", "exact", "sparse"], rows)


def serve() -> None | str:
    """summarize --each in process vs through longdoc serve (--endpoint), warm document cache (bench_serve)."""
    data = load("serve")
    if not data:
        return None
    rows = []
    for r in data["rows"]:
        hits = r.get("server_cache_hits", r.get("cache_hits"))
        overhead = r.get("overhead_s")
        rows.append(
            [
                r["variant"],
                r["wall_s"],
                round(sum(r["ttft_s"]) / len(r["ttft_s"]), 2),
                f"{r['overhead_mean_s']:.3f} (max {max(overhead):.3f})" if overhead else "-",
                "-" if hits is None else f"{hits}/{r['papers']}",
            ]
        )
    head = ["variant", "wall s", "mean TTFT s", "server overhead per request s", "prefixes from the cache"]
    pages = f"pages {data['pages']} of each" if data.get("pages") else "whole papers"
    note = (
        f"{len(data['papers'])} corpus papers ({pages}, {min(data['prompt_tokens']):,}-{max(data['prompt_tokens']):,}"
        f" prompt tokens), `--max-new-tokens {data['new_tokens']}`, document KV cache warmed first (the cold"
        f" in-process pass took {data['cold_wall_s']} s), `longdoc serve --concurrency {data['server_concurrency']}`;"
        f" one run each, wall = the whole `longdoc summarize --each --json` process; server overhead = the client's"
        f" time for a request minus the server's own prefill and decode time. Same summaries in every variant:"
        f" {data['same_summaries']}."
    )
    return f"### summarize --each: in process vs longdoc serve ({data['cpu']})\n\n{note}\n\n" + table(head, rows)


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{key}: {n}" for key, n in counts.items()) or "none"


def serve_faults() -> str | None:
    """longdoc serve under load and faults, on 127.0.0.1 (tests/fuzz/serve_faults.py)."""
    data = load("serve_faults")
    if not data:
        return None
    sc = data["scenarios"]
    p50, p99 = data["small_p50_while_10mb_refused_s"], data["small_p99_while_10mb_refused_s"]
    figures = table(
        ["figure", "value", "goal"],
        [
            ["requests tried", f"{data['requests_tried']:,}", ""],
            ["5xx answers", data["server_errors_5xx"], "0"],
            ["slots leaked", data["slots_leaked"], "0"],
            ["server restarts needed", data["restarts_needed"], "0"],
            ["small request while a 10 MB body is refused, p50 / p99", f"{p50} s / {p99} s", "< 1 s"],
        ],
    )
    rows = []
    if "streams" in sc:
        rows.append([f"{sc['streams']['streams']} concurrent streams", _counts(sc["streams"]["endings"])])
    if "queued_gone" in sc:
        q = sc["queued_gone"]
        rows.append(
            [
                f"{q['queued_and_left']} clients queue, then leave",
                f"still admitted after: {q['still_admitted_after_leaving']}; next client: {q['next_client']}",
            ]
        )
    if "oversized" in sc:
        o = sc["oversized"]
        rows.append([f"10 MB bodies x{o['rounds']}, 200 MB announced, chunked past the cap", _counts(o["refusals"])])
    if "slow" in sc:
        for phase, label in (("heads", "heads"), ("bodies", "bodies")):
            w = sc["slow"][phase]
            rows.append(
                [
                    f"{w['connections']} slow {label}",
                    f"left open: {w['left_open']}, all closed after {w['all_closed_after_s']} s,"
                    f" answers {_counts(w['answers'])}, small requests answered meanwhile"
                    f" {w['small_answered_meanwhile']}/{w['small_requests_meanwhile']}",
                ]
            )
    if "malformed" in sc:
        m = sc["malformed"]
        rows.append([f"{m['requests']} malformed requests", _counts(m["statuses"])])
    if "sigterm" in sc:
        t = sc["sigterm"]
        rows.append(
            [
                f"SIGTERM with {t['streams']} streams running or queued",
                f"exit {t['exit_code']} after {t['exit_s']} s; streams: {_counts(t['endings'])}",
            ]
        )
    opts = data["server"]
    note = (
        f"`python -m tests.fuzz.run serve --seed {data['seed']}`: one key-less server on {data['host']} (the tiny"
        f" random-weight model, `--concurrency {opts['concurrency']} --queue {opts['queue']}`, each decode step"
        f" slowed to {opts['token_s']} s, head/body deadlines {opts['headers_timeout_s']} / {opts['body_timeout_s']}"
        f" s), {data['total_s']} s in all."
    )
    return f"### Serve under load and faults\n\n{note}\n\n{figures}\n\n" + table(["scenario", "outcome"], rows)


def main() -> None:
    sections = [
        paths(),
        paths("paths_2k", "CPU paths: this revision, the one before and llama.cpp at 2K, one run"),
        engine("engine", "longdoc vs transformers `generate` (same model, 32 new tokens)"),
        engine("dca", "DCA vs plain attention prefill (longdoc, bfloat16)"),
        llamacpp(),
        llamacpp("llamacpp_2k_int5_repeat", "int5 and llama.cpp alternating at 2K, one run"),
        llamacpp("llamacpp_32k", "longdoc int5 vs llama.cpp at 32K, one run"),
        llamacpp_ppl(),
        step(),
        quantized(),
        attention_kernels(),
        prefill_breakdown(
            ("prefill_kernel", "prefill_64k_kernel"), "Where prefill time goes, longdoc's kernel against torch's"
        ),
        prefill_breakdown(title="Where prefill time goes; exact vs sparse prefill (before flash.c: torch's kernel)"),
        sparse_quality(),
        recycle(),
        recycle("recycle_32k", "Recycled decode at 32K with DCA, before and after issue 9"),
        recycle("recycle_32k_k4096", "Recycled decode at 32K with DCA, K=4096"),
        quote(),
        evals(),
        summarize(),
        recall("recall", ", first revision of the new prompts"),
        recall("recall_final", ", final prompts"),
        cache(),
        serve(),
        fuzz(),
        serve_faults(),
    ]
    print("\n\n".join(s for s in sections if s))


if __name__ == "__main__":
    main()
