"""Render benchmarks/RESULTS.md from the JSON in benchmarks/out/ (figures are never typed in by hand):
the headline tables (one per CPU class), then the detailed tables by topic, with the short hand-written
parts kept below in this file. Tables whose JSON is missing are skipped. The session-by-session notes
are hand-written in benchmarks/HISTORY.md.

    python -m benchmarks.report            # rewrite benchmarks/RESULTS.md
    python -m benchmarks.report --print    # print it instead
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "RESULTS.md"
GB = 1e9

# The machines the tables were measured on (RESULTS.md, "How to read these"); each detailed table's
# heading names one. The AVX2 machine's runs record their class in their JSON.
XEON_AMX = "Xeon, class amx"
EPYC_AVX512 = "AMD EPYC, class avx512bf16"
EPYC_AVX2 = "AMD EPYC, class avx2"


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
    """The fuzz, Ctrl-C and model-cache fault figures (tools/fuzz)."""
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
    eager against torch.compile, and the torch path against the native step (bench_step.py)."""
    rows = []
    for name in ("step_before", "step", "step_int4", "step_compile", "step_int5", "step_native", "step_native_avx2"):
        data = load(name)
        for r in (data or {}).get("rows", []):
            if "error" in r:
                continue
            split = r["profiled_ms"]
            compiled = r.get("compiled", False)
            capped = f" (capped at {data['isa_cap']})" if data.get("isa_cap") else ""
            rows.append(
                [
                    data.get("code", name) + capped,
                    f"{r['quantize']}, {r.get('dtype', 'bfloat16')}",
                    r.get("path", ""),
                    r["length"],
                    r["step_ms"],
                    f"{r['first_calls_s'][0]} s, {r['first_calls_s'][1]} s" if compiled else "",
                    "" if compiled else r["ops_per_step"],
                    "" if compiled else " / ".join(f"{split.get(k, 0)}" for k in STEP_PARTS),
                    f"{r['fraction_of_read']:.0%} of {r['read_gb_per_s']} GB/s" if "fraction_of_read" in r else "",
                ]
            )
    if not rows:
        return None
    head = [
        "code",
        "--quantize, dtype",
        "decode step",
        "context",
        "step ms (best of 4 x 24)",
        "first two calls (compiling)",
        "tensor ops per step",
        "profiled ms: " + " / ".join(STEP_PARTS),
        "step's read rate / plain read (interleaved)",
    ]
    return "### One decode step: time, operations, where it goes\n\n" + table(head, rows) + "\n\n" + STEP_NOTE


# the profiled parts of a decode step (bench_step.py), in the table's order
STEP_PARTS = ("linear", "attention", "layers (native)", "other")
STEP_NOTE = """A decode step in one native call (thirteenth session, issue 26): "native" runs every decoder layer of
the step in one call of `step.c` (norms, rotations, the cache write, attention and DCA's merge, residuals,
the gate; the q8 and attn16 kernels called from C), "torch" the same step through Python and torch
(`Decoder.walk_row`), as before. The native step's own time is under "layers (native)"; what is left
under "linear" is the LM head, under "other" the embedding, the final norm and the greedy choice. The
last column: the bytes a step reads (weights and KV cache) over its fastest block of 8 steps, against the
fastest plain read of as many bytes, six rounds of each alternating in the same process (a round whose
read caught a quiet minute lowers it: the machine's read rate moved between 28 and 58 GB/s)."""


def llamacpp_ppl() -> str | None:
    """Perplexity of llama.cpp's GGUF and of longdoc's weights on the same ids (bench_llamacpp_ppl.py)."""
    data = load("llamacpp_ppl")
    if not data:
        return None
    rows = [[r["model"], r["length"], r["ppl"]] for r in data["rows"] if "error" not in r]
    return f"### Perplexity: llama.cpp's model vs longdoc's (`{data['command']}`, {data['cpu']})\n\n" + table(
        ["model", "tokens", "ppl"], rows
    )


AVX2_QUALITY_SCHEMES = (
    "none_avx2",
    "q8_avx2",
    "q8_gemm_avx2",
    "q8_flash16_avx2",
    "q8_gemm_flash16_avx2",
    "q8_q5_avx2",
    "q8_gemm_q5_avx2",
)
AVX2_QUALITY_TITLE = "Quantization: quality of q8 against unquantized (float32, float16 KV cache)"
AVX512_QUALITY_SCHEMES = ("none_avx512", "none", "int5", "q8_avx512", "q8_prefill_avx512")
AVX512_QUALITY_TITLE = (
    "Quantization: quality of q8 against unquantized and int5 (bfloat16, `auto` since the twelfth session)"
)


def quantized(
    schemes: tuple[str, ...] = ("none", "int5", "int5_act8", "int5_mixed", "int8", "int4", "int4_mse"),
    title: str = "Quantization: quality against bfloat16",
) -> str | None:
    """Quality of --quantize against unquantized: perplexity (every position through the quantized
    weights), passkey and needle (the prompt prefilled by the run's prefill path, the answer decoded
    quantized)."""
    rows = []
    labels = {
        "int5": "int5 (longdoc's kernel, int16 activations per group of 32; the default)",
        "int5_act8": "int5, int8 activations per group of 32 (tried, not kept)",
        "int5_mixed": "int5, LM head and down_proj in int8 through the int8 GEMM (tried, not kept)",
        "int8": "int8 (int8 GEMM, activations per block of 128 / per row)",
        "int4_mse": "int4, least-squares step per group (tried, not kept)",
        "none_avx2": "none (float32)",
        "q8_avx2": "q8 (Q8_0 kernel, int8 activations per block of 32; prefill on the Q8_0 weights unpacked)",
        "q8_gemm_avx2": "q8, its prefill model since the ninth session (int16 gemm, fused glu; passkey end to end)",
        "q8_flash16_avx2": "q8, and prefill attention on int16 products (flash16.c, the tenth session)",
        "q8_gemm_flash16_avx2": "q8's prefill model with flash16.c (int16 gemm and attention; passkey end to end)",
        "q8_q5_avx2": "q8 with 5-bit codes for the weights on a Q5_0 grid and the LM head (the eleventh session)",
        "q8_gemm_q5_avx2": "q8's prefill model with those 5-bit codes (passkey end to end)",
        "none_avx512": "none (bfloat16, the twelfth session)",
        "q8_avx512": "q8 in bfloat16 (decode model: int8 activations per block of 32; passkey end to end)",
        "q8_prefill_avx512": "q8's bfloat16 prefill model (the Q8_0 weights unpacked to bfloat16 per matmul)",
    }
    for scheme in schemes:
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
    out = f"### {title}\n\n" + table(head, rows)
    if schemes == AVX512_QUALITY_SCHEMES:
        return out + (
            "\n\n`longdoc eval ppl ../shared/corpus --lengths 4096,16384 --no-dca --quantize q8 --json`, the"
            " prefill model's row from `python -m benchmarks.bench_q8_prefill_ppl` with the same arguments,"
            " `longdoc eval passkey --lengths 4096,8192 --depths 0.1,0.5,0.9 --quantize q8 --json`"
            " (`benchmarks/run_all.sh avx512`). The first row is unquantized bfloat16 measured beside them"
            " (`--quantize none`); the next two are the earlier sessions' none and int5 rows, on an EPYC of"
            " the same class."
        )
    if schemes == AVX2_QUALITY_SCHEMES:
        return out + (
            "\n\n`longdoc eval ppl ../shared/corpus --lengths 4096,16384 --no-dca --quantize q8|none --json`,"
            " `longdoc eval passkey --lengths 4096,8192 --depths 0.1,0.5,0.9 --quantize q8 --json`. `eval ppl"
            " --quantize q8` runs every position through the decode matmul (int8 activations: the model each"
            " decoded token comes from); the prefill model's row runs them through the path prefill takes"
            " (`python -m benchmarks.bench_q8_prefill_ppl ../shared/corpus --lengths 4096,16384 --no-dca --json`)."
            " The flash16.c rows (the tenth session) run prefill attention on int16 products, the rows above"
            " them torch's float32 kernel. The 5-bit rows (the eleventh session) store the weights the GGUF"
            " holds in Q5_0 with their own codes (lossless up to the bfloat16 rounding) and the LM head in 5"
            " bits: what the last two rows lose against the flash16.c rows is the head's."
        )
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


def attn16_kernel(name: str = "attn16") -> str | None:
    """A decode step's attention over the 16-bit KV cache (attn16.c) against torch's float32 kernel."""
    data = load(name)
    if not data:
        return None
    shape = data["shape"]
    rows = []
    for r in data["rows"]:
        for what, us in r["us_per_call"].items():
            rows.append(
                [f"{r['keys']:,}", what, us, r["gb_per_s"].get(what, ""), r["speedup_vs_torch_2t"].get(what, "")]
            )
    read = data.get("plain_read_gb_per_s", {})
    return (
        f"### Decode attention over a 16-bit KV cache ({data['cpu']}, class {data.get('cpu_class')})\n\n"
        f"`{data['command']}`: one query row of {shape['heads']} heads over {shape['kv_heads']} KV heads of size"
        f" {shape['head_dim']}; GB/s counts the K/V bytes each reads (16-bit for attn16, float32 for torch);"
        f" a plain read runs at {read.get('2t', '?')} GB/s on 2 threads here. Float32 runs keep their KV cache"
        " in float16 since issue 26 (half the memory and the document cache): a decode step's attention reads"
        " it through attn16.c, prefill's widens it for torch's kernel.\n\n"
        + table(["keys", "kernel", "us per call", "GB/s", "speed-up over torch, 2 threads"], rows)
    )


def flash16_kernel(name: str = "flash16") -> str | None:
    """Prefill attention on int16 products (flash16.c) against torch's float32 kernel, per model shape,
    length and thread count, with both kernels' errors against float64."""
    data = load(name)
    if not data:
        return None
    rows = []
    for r in data["rows"]:
        sh = r["shape"]
        err = r["max_error_vs_float64_512"]
        for t in ("1t", "2t"):
            rows.append(
                [
                    f"{r['model']} ({sh['heads']}/{sh['kv_heads']} heads, d {sh['head_dim']})",
                    f"{r['tokens']:,}",
                    t,
                    r["ms_per_layer"][f"torch {t}"],
                    r["ms_per_layer"][f"flash16 {t}"],
                    r["gflop_per_s"][f"flash16 {t}"],
                    f"{r['speedup_vs_torch'][t]:.2f}x",
                    f"{err['flash16']['out']:.1e} / {err['flash16']['lse']:.1e}",
                    f"{err['torch']['out']:.1e} / {err['torch']['lse']:.1e}",
                ]
            )
    return (
        f"### Prefill attention on int16 products ({data['cpu']}, class {data.get('cpu_class')})\n\n"
        f"`{data['command']}` (`benchmarks/out/{name}.json`): one layer's causal attention, flash16.c (q and k"
        " quantized per row to 12 and 11 bits after per-channel factors, v to 12, the probabilities per block"
        " to 13, products summed exactly in int32 by vpmaddwd) against torch's float32 flash kernel. Errors:"
        " the largest |out| and |lse| differences from float64 on 512 tokens of N(0, 1) inputs; the model's"
        ' perplexity with it: "Quantization: quality of q8 against unquantized".\n\n'
        + table(
            [
                "shape",
                "tokens",
                "threads",
                "torch ms",
                "flash16 ms",
                "flash16 GFLOP/s",
                "speed-up",
                "flash16 error out / lse",
                "torch error out / lse",
            ],
            rows,
        )
    )


def q8_gemm(names: tuple[str, ...] = ("q8_gemm", "q8_gemm_1.5b")) -> str | None:
    """Prefill's linears: the q8 gemm (16-bit activations) against the weight unpacked and torch's float32
    matmul, per model shape, rows and threads."""
    parts = []
    for name in names:
        data = load(name)
        if not data:
            continue
        rows = [
            [
                r["shape"],
                f"{r['in']} -> {r['out']}",
                f"{r['rows']:,}",
                r["threads"],
                r["gemm_gflops"],
                r["unpacked_gflops"],
                f"{r['speedup']:.2f}x",
            ]
            for r in data["rows"]
        ]
        parts.append(
            f"`{data['command']}` ({data['model']}; `benchmarks/out/{name}.json`)\n\n"
            + table(
                [
                    "linear",
                    "in -> out",
                    "rows",
                    "threads",
                    "gemm GFLOP/s",
                    "unpacked + F.linear GFLOP/s",
                    "gemm / unpacked",
                ],
                rows,
            )
        )
    if not parts:
        return None
    first = load(names[0]) or {}
    return (
        f"### Prefill on int16 activations: the q8 gemm against unpacking ({first.get('cpu')}, class"
        f" {first.get('cpu_class')})\n\n"
        "Since the ninth session a q8 run's prefill multiplies on AVX2 through `q8.c`'s gemm: the activations"
        " quantized per block of 32 to int16, the Q8_0 weights widened to int16 in a per-call pair layout, and"
        " `madd` (16 products per instruction, twice an FMA's 8) summing each output's block exactly in int32;"
        " the gate and up products meet in one tile, so silu(gate) * up leaves the kernel without either"
        " product being stored. Before, prefill unpacked each weight to float32 and ran `F.linear`. Each cell"
        " is the best of alternating rounds in one process.\n\n" + "\n\n".join(parts)
    )


ONE_COPY_NOTE = """### One copy of the weights (q8, AVX2)

Before issue 26, q8 held three copies of each linear: the bfloat16 read, the packed float32 for prefill and
the Q8_0 for decode (`paths_2k_q8` in the AVX2 headline). Now a q8 run never reads the dense linears: each
is its Q8_0 weight alone; prefill's many-row matmuls unpack that weight to float32 for the call (`q8.c`
`longdoc_q8_rows`, a memory-speed pass that costs a small fraction of the matmul it feeds) and run a dense
float32 matmul, so prefill is the weight-only Q8_0 model (activations not quantized); the embedding table
stays in the model cache's file, mapped, and only the rows looked up are read; a prefill step's MLP runs
1024 rows at a time. Unpacking per call was chosen over a memory map of the dense weights (the float32
weights are twice the file's bfloat16 bytes and would be widened every step anyway) and over an int8 GEMM on
quantized activations (on AVX2 maddubs needs a sign step and a float scale per block of 32, no faster than
float32 FMA, and it quantizes the prompt's activations too). The ninth session found the int16 form of that
GEMM faster than float32 (`madd`: 16 products per instruction): where its AVX2 loop runs, prefill now
multiplies the Q8_0 weights directly (next table), and unpacking remains for the other CPUs. Peak RSS and
speed against llama.cpp: the AVX2 headline; quality: "Quantization: quality of q8 against unquantized".

On AVX-512 BF16 (the twelfth session) q8 became `auto` too, in bfloat16: there a dense bfloat16 matmul on
the weight unpacked for the call beats the int16 gemm (about 1.7-1.8x on the model's shapes), so bfloat16
runs with native bfloat16 matmuls unpack (a group of 8 rows at a time; a step's MLP keeps its two unpacked
weights for its slices of rows), and int5, which kept a bfloat16 copy beside its own, is no longer picked.
Figures: the AVX-512 headline and benchmarks/HISTORY.md, "One copy of the weights on AVX-512"."""


def qa(names: tuple[str, ...] = ("qa_0.5b", "qa_1.5b")) -> str | None:
    """Issue 28's question-answering set: each model's accuracy, per paper and in all (bench_qa.py)."""
    runs = [(name, data) for name in names if (data := load(name))]
    if not runs:
        return None
    papers = sorted({r["paper"] for _, data in runs for r in data["rows"]})
    rows, commands = [], []
    for name, data in runs:
        acc = data["accuracy"][0]
        per = []
        for paper in papers:
            mine = [r for r in data["rows"] if r["paper"] == paper]
            per.append(f"{sum(r['correct'] for r in mine)}/{len(mine)}" if mine else "")
        rows.append([acc["model"], acc["quantize"], *per, f"{acc['correct']}/{acc['asked']}"])
        commands.append(f"- `{data['command']}` (`benchmarks/out/{name}.json`)")
    scoring = runs[0][1].get("scoring", "")
    return (
        "### Questions over the five corpus papers, each at full length\n\n"
        + table(["model", "--quantize", *papers, "all"], rows)
        + f"\n\nScored as: {scoring}\n\n"
        + "\n".join(commands)
    )


# Issue 28: each model's runs on the AVX2 machine, by kind (JSON names in benchmarks/out/). The 0.5B's
# 8K passkey and its perplexity are issue 26's quality runs with the same settings (passkey: q8, what
# `auto` is here; perplexity: the prefill model, unquantized float32, `eval ppl`'s default).
MODEL_RUNS: dict[str, dict[str, Any]] = {
    "qwen2.5-coder-0.5b": {
        "qa": "qa_0.5b",
        "ppl": "quant_ppl_none_avx2",
        "passkey": ("quant_passkey_q8_avx2", "models_0.5b_passkey_32k", "models_0.5b_passkey_64k"),
        "needle": ("models_0.5b_needle_8k", "models_0.5b_needle_32k"),
        "speed": "llamacpp_avx2_q5",
    },
    "qwen2.5-coder-1.5b": {
        "qa": "qa_1.5b",
        "ppl": "models_1.5b_ppl",
        "passkey": ("models_1.5b_passkey_8k", "models_1.5b_passkey_32k", "models_1.5b_passkey_64k"),
        "needle": ("models_1.5b_needle_8k", "models_1.5b_needle_32k"),
        "speed": "models_speed_1.5b_flash16",
    },
}
MODEL_LENGTHS = (8192, 32768, 65536)
NEEDLE_METHODS = {"full": "full", "recycled": "rec", "streaming": "stream"}
MODEL_EVAL_COMMANDS = """Each eval is one command per model and length (`M` the model's alias, `auto` quantization, q8
here), its JSON saved as `benchmarks/out/models_<model>_<kind>_<length>.json` (a shell loop; `/usr/bin/time -v`
gave each process's peak RSS):

- `longdoc eval passkey --lengths L --depths 0.5 --model M --json` (the 0.5B at 8K: issue 26's run,
  depths 0.1, 0.5, 0.9)
- `longdoc eval needle --lengths L --depths 0.5 --keys 4 --model M --json` (four codes hidden, one asked
  for; full attention, Recycled Attention and a StreamingLLM window of 2,048 keys decode from one prefill)
- `longdoc eval ppl ../shared/corpus --lengths 4096,16384 --no-dca --model M --json` (the prefill model,
  unquantized: `eval ppl`'s default)
- `python -m benchmarks.bench_qa --model M --name qa_<model>`
- `python -m benchmarks.bench_llamacpp --model M --lengths 2048,8192 --configs longdoc:auto,llamacpp --name
  models_speed_<model>` (the speed columns: `llamacpp_avx2_q5` for the 0.5B, the eleventh session's run
  with the 5-bit layout; `models_speed_1.5b_flash16` for the 1.5B, the tenth session's)"""


def _score(rows: list[dict[str, Any]]) -> str:
    return f"{sum(bool(r['correct']) for r in rows)}/{len(rows)}" if rows else "not run"


def _speed_cell(data: dict[str, Any] | None, length: int, key: str, scale: float = 1.0, digits: int = 1) -> str:
    """longdoc's figure at ``length`` and llama.cpp's in the same run, on the same GGUF."""
    if not data:
        return "not run"
    got = {r.get("config"): r for r in data["rows"] if r.get("length") == length}
    mine, theirs = got.get("longdoc:auto", {}).get(key), got.get("llamacpp", {}).get(key)
    if mine is None:
        return "not run"
    text = f"{mine / scale:.{digits}f}"
    return text + (f" ({theirs / scale:.{digits}f})" if theirs is not None else "")


def second_model() -> str | None:
    """Issue 28: the 0.5B against the 1.5B on one machine, every kind of figure in one table."""
    if not any(load(runs["qa"]) for runs in MODEL_RUNS.values()):
        return None
    head = ["model", "QA over 5 papers", *(f"passkey {n // 1024}K" for n in MODEL_LENGTHS)]
    head += [f"needle, 4 keys, {n // 1024}K" for n in MODEL_LENGTHS[:2]] + ["ppl 4K", "ppl 16K"]
    head += ["prefill tok/s 8K", "decode tok/s 8K", "peak RSS 8K, GB"]
    rows = []
    for alias, runs in MODEL_RUNS.items():
        qa_data = load(runs["qa"])
        passkey = [r for name in runs["passkey"] if (d := load(name)) for r in d["results"]]
        needle = [r for name in runs["needle"] if (d := load(name)) for r in d["results"]]
        ppl = {r["length"]: r.get("ppl") for r in (load(runs["ppl"]) or {}).get("results", [])}
        speed = load(runs["speed"])
        row = [f"`{alias}`", _score(qa_data["rows"]) if qa_data else "not run"]
        row += [_score([r for r in passkey if r["length"] == n]) for n in MODEL_LENGTHS]
        for n in MODEL_LENGTHS[:2]:
            mine = [r for r in needle if r["length"] == n]
            cells = [f"{short} {_score([r for r in mine if r['method'] == m])}" for m, short in NEEDLE_METHODS.items()]
            row.append(" · ".join(cells) if mine else "not run")
        row += [ppl.get(4096) or "not run", ppl.get(16384) or "not run"]
        row += [_speed_cell(speed, 8192, "prefill_tok_s"), _speed_cell(speed, 8192, "decode_tok_s", digits=2)]
        row.append(_speed_cell(speed, 8192, "peak_rss_bytes", GB, 2))
        rows.append(row)
    probes = [
        (d["matmul_gflops"], d.get("matmul_dtype", "float32")) for r in MODEL_RUNS.values() if (d := load(r["speed"]))
    ]
    rate = ""
    if probes:
        rate = " The probe matmul `auto` decides by ran at " + " and ".join(f"{g:.0f}" for g, _ in probes)
        rate += f" GFLOP/s in {probes[0][1]} in the two speed runs."
    return (
        "### Which model auto runs: the embedded 0.5B against the 1.5B\n\n"
        + table(head, rows)
        + "\n\nQA: correct answers of 25 (the rule below the QA table). Passkey and needle: correct of the depths run"
        " (depth 0.5; the 0.5B's 8K passkey at three depths). Needle cells: full attention, Recycled Attention and"
        " StreamingLLM decoding from one prefill. Speed and RSS: longdoc `auto`, llama.cpp on the same GGUF in"
        " brackets, same run, 2 threads, other jobs paused (the quality runs shared the cores with each other, so"
        " their times are not speeds)." + rate + "\n\n" + AUTO_RULE + _why_here() + "\n\n" + MODEL_EVAL_COMMANDS
    )


def _why_here() -> str:
    """The rule's reason on this machine, from the runs: each model's QA score and 8K prefill rate, and
    what that rate makes of a 20K-token paper's prefill (the QA papers are 15-23K tokens)."""
    facts = []
    for alias, runs in MODEL_RUNS.items():
        qa_data, speed = load(runs["qa"]), load(runs["speed"])
        rate = next(
            (
                r["prefill_tok_s"]
                for r in (speed or {}).get("rows", [])
                if r.get("config") == "longdoc:auto" and r.get("length") == 8192
            ),
            None,
        )
        if not (qa_data and rate):
            return ""
        acc = qa_data["accuracy"][0]
        facts.append(
            f"`{alias}` {acc['correct']}/{acc['asked']} right, a 20K-token paper's prefill in about"
            f" {20480 / rate / 60:.0f} min at its 8K rate"
        )
    return (
        "\n\n**Why the 0.5B here:** " + "; ".join(facts) + ". The larger model answers far better, at a cost this"
        " machine's users would wait on for every paper; where the rate reaches the threshold the same paper"
        " prefills in about a minute, and `auto` takes the better answers."
    )


AUTO_RULE = """**The rule** (`longdoc/models/choose.py`): `--model auto`, the default, runs `qwen2.5-coder-1.5b`
where its extra is installed and the machine multiplies at 1 TFLOP/s or more in the run's dtype (a
256x1536x8960 matmul, best of three, measured once per machine and settings), else the embedded 0.5B. At
1 TFLOP/s the 1.5B's linears prefill about 380 tokens a second, a 20K-token paper in about a minute."""


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
    """longdoc serve under load and faults, on 127.0.0.1 (tools/fuzz/serve_faults.py)."""
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
        f"`python -m tools.fuzz.run serve --seed {data['seed']}`: one key-less server on {data['host']} (the tiny"
        f" random-weight model, `--concurrency {opts['concurrency']} --queue {opts['queue']}`, each decode step"
        f" slowed to {opts['token_s']} s, head/body deadlines {opts['headers_timeout_s']} / {opts['body_timeout_s']}"
        f" s), {data['total_s']} s in all."
    )
    return f"### Serve under load and faults\n\n{note}\n\n{figures}\n\n" + table(["scenario", "outcome"], rows)


# Commands of runs whose JSON predates bench_llamacpp's "command" field (as given in run_all.sh).
COMMANDS = {
    "llamacpp": "python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 64 --name llamacpp",
    "llamacpp_2k_int5_repeat": "python -m benchmarks.bench_llamacpp --lengths 2048 --new 64 --configs "
    "longdoc:int5,llamacpp,longdoc:int5,llamacpp,longdoc:int5,llamacpp --name llamacpp_2k_int5_repeat",
    "llamacpp_32k": "python -m benchmarks.bench_llamacpp --lengths 32768 --new 32 --configs longdoc:int5,llamacpp "
    "--name llamacpp_32k",
    "llamacpp_avx2_q8": "python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32 --configs "
    "longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_q8",
}


def _cpu_class(data: dict[str, Any]) -> str:
    """The CPU class of a run: recorded since bench_paths; before, from the flags the run recorded."""
    if data.get("cpu_class"):
        return str(data["cpu_class"])
    return "amx" if data.get("amx") else "avx512bf16" if data.get("avx512_bf16") else "unknown"


def _fraction(r: dict[str, Any]) -> float:
    """A row's decode as a fraction of the plain read just before it, where the run recorded one (since
    the tenth session), else of the better of the reads before and after the run."""
    if r.get("read_gb_per_s_before") and r.get("decode_gb_per_s"):
        return float(r["decode_gb_per_s"]) / float(r["read_gb_per_s_before"])
    return float(r.get("fraction_of_bandwidth") or 0)


def _best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best round of one configuration (the cores are shared: a slow round is another process's)."""
    return {
        "prefill": max(r["prefill_tok_s"] for r in runs),
        "decode": max(r["decode_tok_s"] for r in runs),
        "rss": min(r["peak_rss_bytes"] for r in runs),
        "bandwidth": max((_fraction(r) for r in runs), default=0),
        "rounds": len(runs),
        "first": runs[0],
    }


def _what_runs(r: dict[str, Any]) -> str:
    if r["config"] == "llamacpp":
        return f"llama.cpp {r.get('llama_cpp', '')}, {r.get('dtype', '')}".replace(" ,", ",")
    if r.get("mode") == "hf":
        return f"transformers, {r.get('dtype', '')}"
    what = f"{r.get('dtype', '')}"
    if "packed" in r:
        what += ", packed" if r["packed"] else ", unpacked"
    what += f", quantize {r.get('quantize', '')}"
    if r.get("attention"):
        what += f", attention {r['attention']}"
    return what + "".join(f", {k}" for k in ("dca", "recycle") if r.get(k))


def headline(cpu_title: str, runs: list[tuple[str, str, str]]) -> str | None:
    """One CPU class: longdoc as a user gets it against llama.cpp on the same GGUF, each pair from one
    run. runs: (JSON name, longdoc's config in it, how to call that config)."""
    rows, commands, where = [], [], ""
    for name, config, label in runs:
        data = load(name)
        if not data:
            continue
        capped = f", capped at {data['isa_cap']} (LONGDOC_ISA)" if data.get("isa_cap") else ""
        where = where or f"{data['cpu']}, class {_cpu_class(data)}{capped}, {data['threads']} threads"
        read = data.get("bandwidth_gb_per_s")
        measured = f"; plain read {max(read['before'], read['after'])} GB/s, same run" if read else ""
        rows_read = [r["read_gb_per_s_before"] for r in data["rows"] if r.get("read_gb_per_s_before")]
        if rows_read:
            measured += f", {min(rows_read)}-{max(rows_read)} GB/s just before each row"
        commands.append(f"- `{data.get('command') or COMMANDS[name]}` (`benchmarks/out/{name}.json`{measured})")
        groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for r in data["rows"]:
            if "error" not in r and r["config"] in (config, "llamacpp"):
                groups.setdefault((r["length"], r["config"]), []).append(r)
        for length in sorted({n for n, _ in groups}):
            theirs = groups.get((length, "llamacpp"))
            ref = _best_of(theirs) if theirs else None
            for cfg, who in ((config, label), ("llamacpp", "llama.cpp")):
                if (length, cfg) not in groups:
                    continue
                b = _best_of(groups[(length, cfg)])
                versus = ""
                if cfg != "llamacpp" and ref:
                    versus = f"{b['prefill'] / ref['prefill']:.2f}x, {b['decode'] / ref['decode']:.2f}x"
                rows.append(
                    [
                        f"{length:,}",
                        who,
                        _what_runs(b["first"]),
                        b["prefill"],
                        b["decode"],
                        f"{b['rss'] / GB:.2f} GB",
                        versus,
                        f"{b['bandwidth']:.0%}" if b["bandwidth"] else "",
                        b["rounds"],
                    ]
                )
    if not rows:
        return None
    head = [
        "prompt tokens",
        "engine",
        "what runs",
        "prefill tok/s",
        "decode tok/s",
        "peak RSS",
        "longdoc / llama.cpp: prefill, decode",
        "decode / read bandwidth",
        "rounds",
    ]
    return (
        f"### {cpu_title} ({where})\n\n"
        + table(head, rows)
        + "\n\nEach longdoc row and the llama.cpp row below it come from one run (best round where it ran"
        " more than one):\n\n" + "\n".join(commands)
    )


def memory(names: tuple[str, ...], title: str) -> str | None:
    """Peak RSS of each configuration of the CPU-path and llama.cpp runs (lowest round), by prompt length."""
    rows = []
    for name in names:
        data = load(name)
        if not data:
            continue
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in data["rows"]:
            if "error" not in r:
                groups.setdefault((r["config"], r["length"]), []).append(r)
        for (config, length), runs in groups.items():
            b = _best_of(runs)
            rows.append([config, _what_runs(b["first"]), f"{length:,}", f"{b['rss'] / GB:.2f} GB", f"`{name}`"])
    if not rows:
        return None
    return f"### {title}\n\n" + table(["config", "what runs", "prompt tokens", "peak RSS", "run"], rows)


def tag(section: str | None, machine: str) -> str | None:
    """Name the machine in every table heading of a section."""
    if not section:
        return None
    return "\n".join(f"{line} — {machine}" if line.startswith("### ") else line for line in section.split("\n"))


INTRO = """# Benchmark results

What longdoc measured, on which CPU, against what. Every table is rendered by `python -m benchmarks.report`
from the JSON in `benchmarks/out/`: no figure here is typed in by hand. First one headline table per CPU
class, then the detailed tables by topic (speed, memory, quality, robustness), each heading naming its
machine; "How to read these" at the end says what each benchmark measures and how to rerun it. The notes
written as the measurements were made, session by session, are in [HISTORY.md](HISTORY.md)."""

HEADLINE_NOTE = """## Headline: one table per CPU class

longdoc as a user gets it on that class (`--dtype auto`, `--quantize auto`) against llama.cpp on the same
GGUF of the embedded model, in the same run. No GPU has been measured yet; a GPU table joins these once
`benchmarks/out/` holds a GPU run."""

HOW_TO_READ = """## How to read these

**Machines.** Each had 2 CPU cores shared with other jobs and no GPU; torch 2.13.0+cpu, transformers
5.23, the embedded model `qwen2.5-coder-0.5b` (Qwen2.5-Coder-0.5B-Instruct, trained window W = 32,768),
prompt text cut from the five shared corpus papers (`../shared/corpus`) unless a table says otherwise.

- **Xeon, class amx** (AMX and AVX-512 BF16; issues 2-5): bfloat16 (`--dtype auto` there).
- **AMD EPYC, class avx512bf16** (AVX-512 BF16 and AVX-512 VNNI, no AMX; issues 8-14 and 27): bfloat16;
  its bfloat16 matmuls run at about half the Xeon's speed, so compare rows of one machine only.
- **AMD EPYC, class avx2** (AVX2 and FMA, no AVX-512; issue 23): float32, as `--dtype auto` picks there.

Single runs on noisy shared cores: read ratios within one table, not absolute numbers across tables.
Where a run alternates rounds, the best round counts.

**What each benchmark measures.** `bench_paths`: each dtype / packing / quantize / kernel choice on the
CPU at hand, the revision before and llama.cpp, in alternating rounds. `bench_llamacpp`: longdoc (each
`--quantize`), transformers and llama.cpp on one prompt. `bench_engine`: longdoc against transformers
`generate`. `bench_step`: one decode step's time and where it goes. `bench_attention`, `bench_prefill`:
attention kernels and where prefill time goes, exact and sparse. `bench_recycle`, `bench_quote`: recycled
decoding's speed and what it changes in answers. `bench_cache`: a second question from the document KV
cache. `bench_serve`: `summarize --each` in process and through `longdoc serve`. `longdoc eval
passkey|needle|ppl`: long-context quality. `bench_summarize`, `bench_recall`: summaries. The fuzz and
fault harness (`tools/fuzz/`, formerly `tests/fuzz/`): hostile inputs, Ctrl-C, model cache and server
faults.

**Rerun.** `benchmarks/run_all.sh` runs every benchmark back to back on an otherwise idle machine, or one
step (`benchmarks/run_all.sh paths`); the JSON lands in `benchmarks/out/`, and `python -m
benchmarks.report` rewrites this file from it. Each configuration runs in its own process, so its peak
RSS is its own. The commands behind each table:

{commands}

**Notes cited from the code**, now in [HISTORY.md](HISTORY.md): "Reading the figures" (issues 2-13), among
them "Weight-only quantization and llama.cpp", "int5: longdoc's own 5-bit kernel", "A leaner decode step",
"Hostile inputs, interruptions and the model cache", "Document KV cache" and "Prefill: where the time
goes, and sparse prefill"; then "Remote engine: longdoc serve and --endpoint", "Serve under load and
faults (issue 27)" and "Reading the CPU paths (fifth session, issue 23)"."""


# The command behind each detailed table (RESULTS.md, "How to read these").
COMMANDS_BY_TABLE = [
    (
        "Decode on 5-bit codes (issue 26, the eleventh session)",
        "`benchmarks/run_all.sh q5`: `python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32 --configs"
        " longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_q5` (and `_q5_2`); at 32K: `--lengths"
        " 32768 --new 32 --configs longdoc:auto,llamacpp --name llamacpp_avx2_q5_32k`",
    ),
    (
        "Prefill attention on int16 products (issue 26)",
        "`python -m benchmarks.bench_flash16`; against llama.cpp: `python -m benchmarks.bench_llamacpp --lengths"
        " 2048,8192 --new 32 --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_flash16`;"
        " at 32K: `--lengths 32768 --new 32 --configs longdoc:auto,llamacpp --name llamacpp_avx2_flash16_32k`",
    ),
    (
        "Prefill on int16 activations (issue 26)",
        "`python -m benchmarks.bench_q8_gemm`; the 1.5B's shapes: `--model qwen2.5-coder-1.5b --name q8_gemm_1.5b"
        " --rows 1024`; against llama.cpp: `python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 32"
        " --configs longdoc:auto,llamacpp,longdoc:auto,llamacpp --name llamacpp_avx2_gemm`",
    ),
    (
        "CPU paths (issue 23)",
        "`python -m benchmarks.bench_paths --length 512 --new 48 --repeat 3 --configs "
        "auto,float32:plain,rev:34b3aea,llamacpp,float32:pack:int8,float32:pack:int4,bfloat16 --name paths`; at 2K: "
        "`--length 2048 --new 64 --repeat 3 --configs auto,rev:34b3aea,llamacpp --name paths_2k` "
        "(`benchmarks/run_all.sh "
        "paths`)",
    ),
    (
        "longdoc vs transformers vs llama.cpp",
        "`python -m benchmarks.bench_llamacpp --lengths 2048,8192 --new 64 --name llamacpp` (`benchmarks/run_all.sh "
        "llamacpp`); int5 and llama.cpp alternating at 2K: `--lengths 2048 --new 64 --configs "
        "longdoc:int5,llamacpp,longdoc:int5,llamacpp,longdoc:int5,llamacpp --name llamacpp_2k_int5_repeat`; at 32K: "
        "`--lengths 32768 --new 32 --configs longdoc:int5,llamacpp --name llamacpp_32k`",
    ),
    (
        "longdoc vs transformers",
        "`python -m benchmarks.bench_engine --lengths 2048,8192,16384 --new 32 --configs "
        "hf:float32,hf:bfloat16,longdoc:auto --name engine`",
    ),
    (
        "DCA vs plain prefill",
        "`python -m benchmarks.bench_engine --lengths 4096,8192,16384 --new 8 --configs "
        "longdoc:auto:off,longdoc:auto:on,longdoc:auto:on:2048 --name dca`",
    ),
    (
        "one decode step: time, ops, split",
        '`python -m benchmarks.bench_step --length 2048 --quantize none,int8,int4` (the "before" rows: the same '
        "command in a worktree of 95b1de5); with the int5 kernel: `--quantize int5,int8,int4 --name step_int5`; "
        "compiled: `--quantize int4,int4 --compile --name step_compile`, then `--quantize int4,int4 --name step_int4`",
    ),
    (
        "exact attention kernels",
        "`python -m benchmarks.bench_attention`",
    ),
    (
        "where prefill time goes",
        "`python -m benchmarks.bench_prefill --lengths 8192,16384,32768 --modes exact,sparse,transformers --budgets "
        "4096,8192 --kernels cpu,cpu-torch --layers 4 --name prefill_kernel`; 64K: `--lengths 65536 --modes "
        "exact,sparse,transformers --budgets 2048 --kernels cpu,cpu-torch --layers 2 --name prefill_64k_kernel` "
        "(`benchmarks/run_all.sh prefill`); the commands of the earlier runs head their table",
    ),
    (
        "sparse prefill, quality",
        "`benchmarks/run_all.sh sparse`",
    ),
    (
        "recycled decode",
        "`python -m benchmarks.bench_recycle --lengths 8192,16384,32768 --new 256 --name recycle`; at 32K, before and "
        "after issue 9: `--lengths 32768 --new 128 --k 2048 --stride 16 --before 1236822 --no-breakdown --name "
        "recycle_32k`; K=4096: `--k 4096 --name recycle_32k_k4096` (same saved prefill)",
    ),
    (
        "second question, cold vs document cache",
        "`python -m benchmarks.bench_cache --lengths 16384,32768`",
    ),
    (
        "summarize --each, in process vs longdoc serve",
        "`python -m benchmarks.bench_serve --new 64 --pages 1-5`",
    ),
    (
        "summarizing the corpus papers",
        "`python -m benchmarks.bench_summarize --papers 2 --map-context 8192 --new 200` (five papers: `--papers 5`)",
    ),
    (
        "llama.cpp's model vs longdoc's, perplexity",
        "`python -m benchmarks.bench_llamacpp_ppl --length 4096 --configs "
        "llamacpp,longdoc:none,longdoc:int5,longdoc:int4`",
    ),
    (
        "quantization, quality",
        "`longdoc eval ppl ../shared/corpus --lengths 4096,16384 --no-dca --quantize "
        "none\\|int5\\|int8\\|int4 --json`, "
        "`longdoc eval passkey --lengths 4096,8192 --depths 0.1,0.5,0.9 --quantize ...`, `longdoc eval "
        "needle --lengths "
        "8192,16384 --depths 0.5 --keys 1,4 --quantize ...`; activation choices for int8: `python -m "
        "benchmarks.bench_act_quant --length 4096` (`benchmarks/run_all.sh quant`)",
    ),
    (
        "passkey",
        "`longdoc eval passkey --lengths 8192,16384 --depths 0.1,0.5,0.9 --dca --chunk-size 2048 --json` and the same "
        "with `--no-dca --window 2048`; beyond the window `--lengths 36864 --depths 0.02` (the key ~36K "
        "tokens before the "
        "question, past the 32K window) with `--dca` and with `--no-dca --max-context 70000`",
    ),
    (
        "perplexity",
        "`longdoc eval ppl ../shared/corpus --lengths 4096,8192,16384` with `--no-dca` and with `--dca --chunk-size "
        "2048`; `--lengths 36864` with `--dca`, `--dca --dca-temperature`, `--no-dca --max-context 70000`",
    ),
    (
        "needle",
        "`longdoc eval needle --lengths 8192,16384 --depths 0.5 --keys 1,4 --json`",
    ),
    (
        "summarize, then quote",
        "`python -m benchmarks.bench_quote --docs 10 --lengths 16384,20480,16384 --new 100 --configs "
        "full,fixed:2048:16,fixed:4096:16,dynamic:2048:8:0.9 --name quote`",
    ),
    (
        "summary recall per page",
        "`python -m benchmarks.bench_recall --before 1236822` (`--only report.pdf` for the final-prompts row)",
    ),
    (
        "fuzz, Ctrl-C, model cache faults",
        '`python -m tools.fuzz.run ingest\\|cli\\|sigint` and the cache faults (HISTORY.md, "Hostile inputs, '
        'interruptions and the model cache")',
    ),
    (
        "serve under load and faults",
        "`python -m tools.fuzz.run serve --seed 0`",
    ),
]


FLASH16_LABEL = "longdoc (auto, and prefill attention on int16 products)"
Q5_LABEL = "longdoc (auto, and decode reading 5-bit codes: Q5_0-grid weights and the LM head)"
AVX512_Q8_LABEL = "longdoc (auto: q8, one copy; prefill on the weights unpacked to bfloat16)"
NATIVE_8K_LABEL = "longdoc (auto since the thirteenth session: full attention at 8K, in the native step)"
RECYCLED_NATIVE_LABEL = "longdoc (auto since the fourteenth session: recycled decoding in the native step)"


def document() -> str:
    """RESULTS.md: the headline tables, the detailed tables by topic, how to read them."""
    headlines = [
        headline(
            "AVX2: longdoc `auto` against llama.cpp",
            [
                ("llamacpp_avx2_q5", "longdoc:auto", Q5_LABEL),
                ("llamacpp_avx2_q5_2", "longdoc:auto", "longdoc (the same, a second run)"),
                ("llamacpp_avx2_q5_32k", "longdoc:auto", Q5_LABEL),
                ("llamacpp_avx2_flash16", "longdoc:auto", FLASH16_LABEL),
                ("llamacpp_avx2_flash16_2", "longdoc:auto", "longdoc (the same, a second run)"),
                ("llamacpp_avx2_flash16_32k", "longdoc:auto", FLASH16_LABEL),
                ("llamacpp_avx2_gemm", "longdoc:auto", "longdoc (auto: q8, prefill on the int16 gemm, leaner decode)"),
                ("llamacpp_avx2_gemm_2", "longdoc:auto", "longdoc (the same, a second run)"),
                ("llamacpp_avx2_q8", "longdoc:auto", "longdoc (auto: q8, one copy, 16-bit KV)"),
                ("llamacpp_avx2_q8_2", "longdoc:auto", "longdoc (auto, and the norm in the q8 kernel)"),
                ("llamacpp_avx2_q8_32k", "longdoc:auto", "longdoc (auto, and the norm in the q8 kernel)"),
                ("paths_2k_q8", "auto", "longdoc (auto: q8 decode)"),
                ("paths", "auto", "longdoc (auto before q8: float32)"),
                ("paths_2k", "auto", "longdoc (auto before q8: float32)"),
            ],
        ),
        headline(
            "AVX2 under the ISA cap on the AVX-512 EPYC: longdoc `auto` against llama.cpp built for AVX2 only",
            [
                ("llamacpp_avx2cap_q8", "longdoc:auto", "longdoc (auto: q8, float32, AVX2 paths)"),
                ("llamacpp_avx2cap_q8_8k", "longdoc:auto", NATIVE_8K_LABEL),
                ("llamacpp_avx2cap_q8_32k", "longdoc:auto", RECYCLED_NATIVE_LABEL),
            ],
        ),
        headline(
            "AVX-512 BF16 and VNNI: longdoc `auto` (q8 since the twelfth session, int5 before) against llama.cpp",
            [
                ("llamacpp_avx512_q8", "longdoc:auto", AVX512_Q8_LABEL),
                ("llamacpp_avx512_q8_8k", "longdoc:auto", NATIVE_8K_LABEL),
                ("llamacpp_avx512_q8", "longdoc:int5", "longdoc (int5, two copies: `auto` before, same run)"),
                ("llamacpp_avx512_q8_32k", "longdoc:auto", AVX512_Q8_LABEL),
                ("llamacpp_avx512_q8_32k_native", "longdoc:auto", RECYCLED_NATIVE_LABEL),
                ("llamacpp", "longdoc:int5", "longdoc (int5)"),
                ("llamacpp_32k", "longdoc:int5", "longdoc (int5)"),
            ],
        ),
    ]
    speed = [
        ONE_COPY_NOTE,
        q8_gemm(),
        flash16_kernel(),
        attn16_kernel(),
        paths(),
        paths("paths_2k", "CPU paths: this revision, the one before and llama.cpp at 2K, one run"),
        paths("paths_2k_q8", "CPU paths: q8 decode (auto since issue 26) against unquantized and llama.cpp at 2K"),
        tag(llamacpp(), EPYC_AVX512),
        tag(llamacpp("llamacpp_2k_int5_repeat", "int5 and llama.cpp alternating at 2K, one run"), EPYC_AVX512),
        tag(llamacpp("llamacpp_32k", "longdoc int5 vs llama.cpp at 32K, one run"), EPYC_AVX512),
        tag(engine("engine", "longdoc vs transformers `generate` (same model, 32 new tokens)"), XEON_AMX),
        tag(engine("dca", "DCA vs plain attention prefill (longdoc, bfloat16)"), XEON_AMX),
        tag(step(), EPYC_AVX512),
        tag(attention_kernels(), EPYC_AVX512),
        tag(
            prefill_breakdown(
                ("prefill_kernel", "prefill_64k_kernel"), "Where prefill time goes, longdoc's kernel against torch's"
            ),
            EPYC_AVX512,
        ),
        tag(
            prefill_breakdown(
                title="Where prefill time goes; exact vs sparse prefill (before flash.c: torch's kernel)"
            ),
            EPYC_AVX512,
        ),
        tag(recycle(), XEON_AMX),
        tag(recycle("recycle_32k", "Recycled decode at 32K with DCA, before and after issue 9"), EPYC_AVX512),
        tag(recycle("recycle_32k_k4096", "Recycled decode at 32K with DCA, K=4096"), EPYC_AVX512),
        tag(
            recycle("recycle_native", "Decode: full vs recycled, both in the native step (q8)"),
            EPYC_AVX512,
        ),
        tag(cache(), EPYC_AVX512),
        tag(serve(), EPYC_AVX512),
        tag(summarize(), XEON_AMX),
    ]
    mem = [
        tag(memory(("paths", "paths_2k", "paths_2k_q8"), "Peak memory of each CPU path"), EPYC_AVX2),
        tag(
            memory(("llamacpp", "llamacpp_32k"), "Peak memory of each --quantize, transformers and llama.cpp"),
            EPYC_AVX512,
        ),
    ]
    quality = [
        tag(second_model(), EPYC_AVX2),
        tag(qa(), EPYC_AVX2),
        tag(llamacpp_ppl(), EPYC_AVX512),
        tag(quantized(), EPYC_AVX512),
        tag(quantized(AVX512_QUALITY_SCHEMES, AVX512_QUALITY_TITLE), EPYC_AVX512),
        tag(quantized(AVX2_QUALITY_SCHEMES, AVX2_QUALITY_TITLE), EPYC_AVX2),
        tag(sparse_quality(), EPYC_AVX512),
        tag(evals(), XEON_AMX),
        tag(quote(), EPYC_AVX512),
        tag(recall("recall", ", first revision of the new prompts"), EPYC_AVX512),
        tag(recall("recall_final", ", final prompts"), EPYC_AVX512),
    ]
    robustness = [
        tag(fuzz(), EPYC_AVX512),
        tag(serve_faults(), "2 shared cores, the tiny random-weight model"),
    ]
    parts = [INTRO, HEADLINE_NOTE, *headlines]
    for title, sections in (
        ("Speed", speed),
        ("Memory", mem),
        ("Quality", quality),
        ("Robustness", robustness),
    ):
        present = [s for s in sections if s]
        if present:
            parts += [f"## {title}", *present]
    commands = table(["table", "command"], [[t, c] for t, c in COMMANDS_BY_TABLE])
    parts.append(HOW_TO_READ.replace("{commands}", commands))
    return "\n\n".join(p for p in parts if p) + "\n"


def main() -> None:
    text = document()
    if "--print" in sys.argv[1:]:
        sys.stdout.write(text)
    else:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
