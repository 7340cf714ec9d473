"""Deliberate breaks that the fast tests must catch (issue 8). Each mutant edits one line of the
package, runs ``pytest -m "not slow"`` and restores the file; a mutant with 0 failures is a gap.

    python tests/mutants.py
"""

import subprocess
import sys
from pathlib import Path

MUTANTS = [
    (
        "least-attended keys",
        "longdoc/engine/recycled.py",
        "pooled.topk(k, dim=-1)",
        "pooled.topk(k, dim=-1, largest=False)",
    ),
    (
        "drop tokens since full step",
        "longdoc/engine/recycled.py",
        "            recycled.append(kv, layer, start)\n            if check:",
        "            if check:",
    ),
    (
        "current query as dynamic reference",
        "longdoc/engine/recycled.py",
        "ref = self.full_queries[layer]",
        "ref = q.flatten().float()",
    ),
    (
        "streaming without sinks",
        "longdoc/engine/recycled.py",
        "def __init__(self, budget: int, sinks: int = 4):",
        "def __init__(self, budget: int, sinks: int = 0):",
    ),
    (
        "streaming with half the budget",
        "longdoc/engine/recycled.py",
        "list(range(n - (budget - sinks), n))",
        "list(range(n - (budget // 2 - sinks), n))",
    ),
    (
        "inter-chunk query at s-1",
        "longdoc/attention/dca.py",
        "inter = torch.full_like(positions, s)",
        "inter = torch.full_like(positions, s - 1)",
    ),
    (
        "successive query unclamped",
        "longdoc/attention/dca.py",
        "succ = torch.clamp(intra + c, max=s)",
        "succ = intra + c",
    ),
    (
        "int8 GEMM: siblings take stale outputs",
        "longdoc/attention/quant.py",
        "if last is not None and last[0] is x:",
        "if last is not None:",
    ),
    (
        "int8 GEMM: block maxima dropped",
        "longdoc/attention/quant.py",
        "amax = amax.view(1, -1)",
        "amax = torch.ones_like(amax).view(1, -1)",
    ),
    (
        "int8 GEMM: one activation scale per row",
        "longdoc/attention/quant.py",
        "self.act_block = act_block if act_block and self.in_features % act_block == 0 else self.in_features",
        "self.act_block = self.in_features",
    ),
    (
        "RoPE: sines not signed",
        "longdoc/attention/rope.py",
        "        sin[:, : self.inv_freq.shape[0]].neg_()",
        "        sin[:, : self.inv_freq.shape[0]].abs_()",
    ),
    (
        "RMSNorm: no rounding before the weight",
        "longdoc/attention/patch.py",
        "None, eps).to(x.dtype)",
        "None, eps)",
    ),
    (
        "sparse budget: the long one everywhere",
        "longdoc/config.py",
        "return self.budget_long if prompt_tokens >= self.long_min_tokens else self.budget_default",
        "return self.budget_long",
    ),
    (
        "int5: pair a's scales for pair b",
        "longdoc/attention/int5.c",
        "_mm512_permutexvar_ps(p ? pick_b : pick_a, ds)",
        "_mm512_permutexvar_ps(pick_a, ds)",
    ),
    (
        "int5: fifth bits dropped",
        "longdoc/attention/int5.c",
        "                qh = _mm512_mask_add_epi16(qh, (__mmask32)(h[p] >> 32), qh, five);\n",
        "",
    ),
    (
        "int5: minima's term dropped",
        "longdoc/attention/int5.c",
        "            accm[r] = _mm_fmadd_ps(m4, sum4, accm[r]);\n",
        "",
    ),
    (
        "int5: bfloat16 output truncated",
        "longdoc/attention/int5.c",
        "    u += 0x7fffu + ((u >> 16) & 1u);",
        "",
    ),
    (
        "int5: fifth bits in group order",
        "longdoc/attention/quant.py",
        "[q[..., 0, :16], q[..., 1, :16], q[..., 0, 16:], q[..., 1, 16:]]",
        "[q[..., 0, :16], q[..., 0, 16:], q[..., 1, :16], q[..., 1, 16:]]",
    ),
    (
        "no bf16 packing fallback",
        "longdoc/attention/patch.py",
        "    except RuntimeError:\n        return False\n    return True",
        "    except ZeroDivisionError:\n        return False\n    return True",
    ),
    (
        "flash: causal mask one key late",
        "longdoc/attention/flash.c",
        "if (pr->causal && q0 + t - k0 + 1 < valid) valid = q0 + t - k0 + 1;",
        "if (pr->causal && q0 + t - k0 + 2 < valid) valid = q0 + t - k0 + 2;",
    ),
    (
        "flash: output not rescaled when the maximum moves",
        "longdoc/attention/flash.c",
        "for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), a));",
        "(void)a;",
    ),
    (
        "flash: query heads read the wrong KV head",
        "longdoc/attention/flash.c",
        "const int64_t head = kh * g + gi, row",
        "const int64_t head = gi * pr->hkv + kh, row",
    ),
    (
        "flash: padded keys of the last block attended",
        "longdoc/attention/flash.c",
        "            int64_t valid = pr->lk - k0;",
        "            int64_t valid = KB;",
    ),
    (
        "flash: log-sum-exp without the scale",
        "longdoc/attention/flash.c",
        "m[r] * pr->scale + logf(total)",
        "m[r] + logf(total)",
    ),
    (
        "flash: listed blocks ignored (the first ones read instead)",
        "longdoc/attention/flash.c",
        "const int64_t blk = list ? list[i] : i;",
        "const int64_t blk = i;",
    ),
    (
        "flash: a group's blocks from the next group's list",
        "longdoc/attention/flash.c",
        "list = pr->blocks + (kh * groups + grp) * pr->width;",
        "list = pr->blocks + (kh * groups + (grp + 1) % groups) * pr->width;",
    ),
    (
        "sparse: blocks chosen for the first group serve all",
        "longdoc/attention/kernels.py",
        "return native.flash_attention(q, k, v, False, scale, blocks=(blocks, counts, group))",
        "return native.flash_attention(q, k, v, False, scale, blocks=(blocks[:, :1].expand_as(blocks), counts, group))",
    ),
    (
        "flash: second value column pass skipped",
        "longdoc/attention/flash.c",
        "    if (c0 < d) values_2(",
        "    if (0) values_2(",
    ),
]


def main() -> None:
    """``python tests/mutants.py [NAME-PART [TEST-PATH ...]]``: only the mutants whose name contains
    NAME-PART, against only those tests (default: all mutants, all fast tests)."""
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    tests = sys.argv[2:] or ["tests/"]
    for name, path, old, new in MUTANTS:
        if only not in name:
            continue
        file = Path(path)
        src = file.read_text()
        assert src.count(old) == 1, (name, src.count(old))
        file.write_text(src.replace(old, new))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests],
                capture_output=True,
                text=True,
            )
            failed = [line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith("FAILED")]
            print(f"{name}: {len(failed)} failed: {failed[:6]}", flush=True)
        finally:
            file.write_text(src)


if __name__ == "__main__":
    main()
