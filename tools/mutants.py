"""Deliberate breaks that the fast tests must catch (issues 8 and 24). Each mutant edits one line of
the package, runs ``pytest -m "not slow"`` and restores the file. A baseline run comes first: a
mutant counts as caught only by tests that pass unbroken (a test failing already, say on a CPU
without some instruction set, would otherwise catch every mutant). A mutant caught by none is a gap.

    python tools/mutants.py                      # every mutant, every fast test
    python tools/mutants.py merge tests/test_fidelity.py
    python tools/mutants.py --list
    python tools/mutants.py --check              # every mutant still applies (tests/test_mutants.py runs it)
    python tools/mutants.py --targeted           # each mutant against the test files of its room (minutes)

A mutant is (name, file relative to the repository, the original text, its replacement); the original
must occur exactly once in the file, so a refactor that moves or rewrites it shows in ``--check``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MUTANTS = [
    (
        "packing holds every original layer until the end",
        "longdoc/quant/packing.py",
        "    for parent, name in slots:\n        setattr(parent, name, PackedLinear(getattr(parent, name), dtype))",
        "    keep = [getattr(*slot) for slot in slots]\n    for parent, name in slots:\n"
        "        setattr(parent, name, PackedLinear(getattr(parent, name), dtype))",
    ),
    (
        "ISA cap ignored",
        "longdoc/cpu.py",
        "    cap = isa_cap()\n    if cap is None:\n        return found",
        "    cap = None\n    if cap is None:\n        return found",
    ),
    (
        "embedding rows not widened",
        "longdoc/models/weights.py",
        "        return super().forward(ids).to(self.out_dtype)",
        "        return super().forward(ids)",
    ),
    (
        "weights file: offsets not checked against the file",
        "longdoc/models/weights.py",
        "if not 0 <= a <= b or b - a != need or start + b > size:",
        "if not 0 <= a <= b:",
    ),
    (
        "read chunks: a tensor read one element late",
        "longdoc/models/weights.py",
        '        self._file.seek(self.start + entry["data_offsets"][0])',
        '        self._file.seek(self.start + entry["data_offsets"][0] + size)',
    ),
    (
        "least-attended keys",
        "longdoc/engine/recycled.py",
        "pooled.topk(k, dim=-1)",
        "pooled.topk(k, dim=-1, largest=False)",
    ),
    (
        "drop tokens since full step",
        "longdoc/engine/recycled.py",
        "            recycled.append(kv, layer, start)\n            return recycled.attend(model, q, rot)",
        "            return recycled.attend(model, q, rot)",
    ),
    (
        "fixed schedule: phase off by one",
        "longdoc/engine/recycled.py",
        "return [step % self.cfg.stride == 0] * self.n_layers",
        "return [(step + 1) % self.cfg.stride == 0] * self.n_layers",
    ),
    (
        # issue 24's "similarity not reset at a refresh": the state since the last refresh left stale
        # (the similarity itself is no longer kept: the check and its refresh are one step)
        "dynamic schedule: reference query not renewed at its own refreshes",
        "longdoc/engine/recycled.py",
        "None if probs is None else probs.amax(dim=2), q.flatten().float(), extra)",
        "None if probs is None else probs.amax(dim=2), q.flatten().float() if full[layer] else"
        " self.full_queries[layer], extra)",
    ),
    (
        "merge in bfloat16",
        "longdoc/attention/kernels.py",
        "acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32",
        "acc = torch.float64 if outs[0].dtype == torch.float64 else torch.bfloat16",
    ),
    (
        "merge without max-subtraction",
        "longdoc/attention/kernels.py",
        "total = torch.logsumexp(lse_all, dim=0)",
        "total = torch.exp(lse_all).sum(dim=0).log()",
    ),
    (
        "merge: a row with every part empty not guarded",
        "longdoc/attention/kernels.py",
        'shift = torch.where(total == float("-inf"), 0.0, total)',
        "shift = total",
    ),
    (
        "sparse: every region scored at the own-chunk rotation",
        "longdoc/attention/sparse.py",
        "block_scores(qr[0], k_cache[0, :, lo : lo + n * block]",
        "block_scores(q_own[0], k_cache[0, :, lo : lo + n * block]",
    ),
    (
        "sparse: a region's block count the minimum over heads",
        "longdoc/attention/sparse.py",
        ".sum(-1).amax(0).tolist()",
        ".sum(-1).amin(0).tolist()",
    ),
    (
        "DCA temperature from prompt + answer budget",
        "longdoc/runtime/plan.py",
        "math.log(prompt_tokens / window)",
        "math.log((prompt_tokens + cfg.generation.max_new_tokens) / window)",
    ),
    (
        "current query as dynamic reference",
        "longdoc/engine/recycled.py",
        "ref = self.full_queries[layer]",
        "ref = q.flatten().float()",
    ),
    (
        "streaming without sinks",
        "longdoc/engine/baselines.py",
        "def __init__(self, budget: int, sinks: int = 4):",
        "def __init__(self, budget: int, sinks: int = 0):",
    ),
    (
        "streaming with half the budget",
        "longdoc/engine/baselines.py",
        "list(range(n - (budget - sinks), n))",
        "list(range(n - (budget // 2 - sinks), n))",
    ),
    (
        "inter-chunk query at s-1",
        "longdoc/attention/dca.py",
        "inter = torch.full_like(positions, min(2 * c - 1, s))",
        "inter = torch.full_like(positions, min(2 * c - 1, s) - 1)",
    ),
    (
        "inter-chunk query at s when the local window is at least the chunk length",
        "longdoc/attention/dca.py",
        "inter = torch.full_like(positions, min(2 * c - 1, s))",
        "inter = torch.full_like(positions, s)",
    ),
    (
        "successive query unclamped",
        "longdoc/attention/dca.py",
        "succ = torch.clamp(intra + c, max=s)",
        "succ = intra + c",
    ),
    (
        "int8 GEMM: siblings take stale outputs",
        "longdoc/quant/schemes.py",
        "if last is None or last[0] is not x:",
        "if last is None:",
    ),
    (
        "int8 GEMM: block maxima dropped",
        "longdoc/quant/schemes.py",
        "amax = amax.view(1, -1)",
        "amax = torch.ones_like(amax).view(1, -1)",
    ),
    (
        "int8 GEMM: one activation scale per row",
        "longdoc/quant/schemes.py",
        "self.act_block = act_block if act_block and self.in_features % act_block == 0 else self.in_features",
        "self.act_block = self.in_features",
    ),
    (
        "RoPE: sines not signed",
        "longdoc/models/rope.py",
        "        sin[:, : self.inv_freq.shape[0]].neg_()",
        "        sin[:, : self.inv_freq.shape[0]].abs_()",
    ),
    (
        "RMSNorm: no rounding before the weight",
        "longdoc/models/decoder.py",
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
        "longdoc/native/int5.c",
        "_mm512_permutexvar_ps(p ? pick_b : pick_a, ds)",
        "_mm512_permutexvar_ps(pick_a, ds)",
    ),
    (
        "int5: fifth bits dropped",
        "longdoc/native/int5.c",
        "                qh = _mm512_mask_add_epi16(qh, (__mmask32)(h[p] >> 32), qh, five);\n",
        "",
    ),
    (
        "int5: minima's term dropped",
        "longdoc/native/int5.c",
        "            accm[r] = _mm_fmadd_ps(m4, sum4, accm[r]);\n",
        "",
    ),
    (
        "halves.h: bfloat16 output truncated (int5's and q8's)",
        "longdoc/native/halves.h",
        "    u += 0x7fffu + ((u >> 16) & 1u);",
        "",
    ),
    (
        "int5: fifth bits in group order",
        "longdoc/quant/schemes.py",
        "[q[..., 0, :16], q[..., 1, :16], q[..., 0, 16:], q[..., 1, 16:]]",
        "[q[..., 0, :16], q[..., 0, 16:], q[..., 1, :16], q[..., 1, 16:]]",
    ),
    (
        "no bf16 packing fallback",
        "longdoc/cpu.py",
        "    except RuntimeError:\n        return False\n    return True",
        "    except ZeroDivisionError:\n        return False\n    return True",
    ),
    (
        "q8: the x86 loop pairs weight step s with activation piece s ^ 1",
        "longdoc/native/q8_rows.h",
        "const int64_t at = i * a->k + b * QK + 4 * s;",
        "const int64_t at = i * a->k + b * QK + 4 * (s ^ 1);",
    ),
    (
        "flash: causal mask one key late",
        "longdoc/native/flash.c",
        "if (pr->causal && q0 + t - k0 + 1 < valid) valid = q0 + t - k0 + 1;",
        "if (pr->causal && q0 + t - k0 + 2 < valid) valid = q0 + t - k0 + 2;",
    ),
    (
        "flash: output not rescaled when the maximum moves",
        "longdoc/native/flash.c",
        "for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), a));",
        "(void)a;",
    ),
    (
        "flash: query heads read the wrong KV head",
        "longdoc/native/flash.c",
        "const int64_t head = kh * g + gi, row",
        "const int64_t head = gi * pr->hkv + kh, row",
    ),
    (
        "flash: padded keys of the last block attended",
        "longdoc/native/flash.c",
        "            int64_t valid = pr->lk - k0;",
        "            int64_t valid = KB;",
    ),
    (
        "flash: log-sum-exp without the scale",
        "longdoc/native/flash.c",
        "m[r] * pr->scale + logf(total)",
        "m[r] + logf(total)",
    ),
    (
        "flash: listed blocks ignored (the first ones read instead)",
        "longdoc/native/flash.c",
        "const int64_t blk = list ? list[i] : i;",
        "const int64_t blk = i;",
    ),
    (
        "flash: a group's blocks from the next group's list",
        "longdoc/native/flash.c",
        "list = pr->blocks + (kh * groups + grp) * pr->width;",
        "list = pr->blocks + (kh * groups + (grp + 1) % groups) * pr->width;",
    ),
    (
        "sparse: blocks chosen for the first group serve all",
        "longdoc/attention/kernels.py",
        "return flash.flash_attention(q, k, v, False, scale, blocks=(blocks, counts, group))",
        "return flash.flash_attention(q, k, v, False, scale, blocks=(blocks[:, :1].expand_as(blocks), counts, group))",
    ),
    (
        "flash: second value column pass skipped",
        "longdoc/native/flash.c",
        "    if (c0 < d) values_2(",
        "    if (0) values_2(",
    ),
    (
        "one copy: prefill's unpacked matmul drops the biases",
        "longdoc/quant/schemes.py",
        "        bias = None if self.q8.bias is None else self.q8.bias.to(self.dtype)",
        "        bias = None",
    ),
    (
        "one copy: a prefill step's shared outputs kept after use (GBs over the layers)",
        "longdoc/quant/schemes.py",
        "        if last[2] == (1 << len(self.sizes)) - 1:\n            self._last = None",
        "        if last[2] == (1 << len(self.sizes + [0])) - 1:\n            self._last = None",
    ),
    (
        "q8: the kernel's norm leaves out the norm's weight",
        "longdoc/native/q8.c",
        "        out[j] = w[j] * t;",
        "        out[j] = t;",
    ),
    (
        "q8: unpacked rows read the next row's weights",
        "longdoc/native/q8.c",
        "const int r0 = (int)(row % GR), r1",
        "const int r0 = (int)((row + 1) % GR), r1",
    ),
    (
        "q8 gemm: the AVX2 tile's fourth row reads the third's activations",
        "longdoc/native/q8.c",
        '"vpbroadcastd (%[xp],%[s3]), %[bc]\\n\\t"',
        '"vpbroadcastd (%[xp],%[s2]), %[bc]\\n\\t"',
    ),
    (
        "q8 gemm: the pair layout swaps a step's two weights",
        "longdoc/native/q8.c",
        "const __m256i gather = _mm256_setr_epi8(0, 1, 4, 5,",
        "const __m256i gather = _mm256_setr_epi8(1, 0, 4, 5,",
    ),
    (
        "q8 gemm: activations rounded to 15 bits",
        "longdoc/native/q8.c",
        "        const float inv = amax > 0.f ? 32767.f / amax : 0.f;\n        scale[b] = amax / 32767.f;",
        "        const float inv = amax > 0.f ? 16383.f / amax : 0.f;\n        scale[b] = amax / 32767.f;",
    ),
    (
        "q8 glu: exp's polynomial drops its last term",
        "longdoc/native/q8.c",
        "    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));",
        "    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.f));",
    ),
    (
        "q8 glu: the up's bias taken from the gate's",
        "longdoc/native/q8.c",
        "        u = _mm256_add_ps(u, _mm256_loadu_ps(bias + f + c0));",
        "        u = _mm256_add_ps(u, _mm256_loadu_ps(bias + c0));",
    ),
    (
        "q5: the AVX2 loop takes step s's fifth bit from the step after",
        "longdoc/native/q8.c",
        "    const __m256i five = s < 4 ? _mm256_slli_epi16(hi, 4 - s) : (s > 4 ? _mm256_srli_epi16(hi, s - 4) : hi);",
        "    const __m256i five = s < 4 ? _mm256_slli_epi16(hi, 3 - s) : (s > 4 ? _mm256_srli_epi16(hi, s - 4) : hi);",
    ),
    (
        "q5: the AVX2 loop's high nibbles read unshifted",
        "longdoc/native/q8.c",
        "    const __m256i low = _mm256_and_si256(s < 4 ? nib : _mm256_srli_epi16(nib, 4), low4);",
        "    const __m256i low = _mm256_and_si256(nib, low4);",
    ),
    (
        "q5: the offset of 16 taken off with 15 times the activations' sum",
        "longdoc/native/q8.c",
        "            sum16[i * nb + b] = 16 * sum;",
        "            sum16[i * nb + b] = 15 * sum;",
    ),
    (
        "q5: the scalar unpacking reads the fifth bit of the next step",
        "longdoc/native/q8.c",
        "five = (hi[i] >> s) & 1;",
        "five = (hi[i] >> ((s + 1) & 7)) & 1;",
    ),
    (
        "q5: the gemm's pair layout keeps the codes + 16",
        "longdoc/native/q8.c",
        "_mm256_sub_epi8(q5_step_avx2(blk, hi, s), _mm256_set1_epi8(16))",
        "_mm256_sub_epi8(q5_step_avx2(blk, hi, s), _mm256_set1_epi8(0))",
    ),
    (
        "q5: packing shifts each step's fifth bit one too far",
        "longdoc/native/q8.py",
        "fifth = ((u >> 4) << torch.arange(BLOCK // 4, dtype=torch.int16).view(1, 1, -1, 1)).sum(2)",
        "fifth = ((u >> 4) << (1 + torch.arange(BLOCK // 4, dtype=torch.int16)).view(1, 1, -1, 1)).sum(2)",
    ),
    (
        "q5: quantize_q5 scales to the largest weight over 15",
        "longdoc/native/q8.py",
        "        return w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1) / -16",
        "        return w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1) / -15",
    ),
    (
        "q5: codes of 16 counted as fitting 5 bits",
        "longdoc/native/q8.py",
        "int(qs.max()) <= 15))",
        "int(qs.max()) <= 16))",
    ),
    (
        "q5: every weight stored in 5 bits, on a grid or not",
        "longdoc/native/q8.py",
        "    if head or relative_error(weight, qs, scales) < ON_GRID:",
        "    if head or relative_error(weight, qs, scales) < 1:",
    ),
    (
        "q5: a model's linears pack to 8 bits where the 5-bit loop runs",
        "longdoc/quant/schemes.py",
        "            bits = 5 if five and all(q8.fits_five(q) for q in qweights) else 8",
        "            bits = 8",
    ),
    (
        "q5: the LM head stored in 8 bits",
        "longdoc/quant/cache.py",
        "qweight, scales = schemes.quantize(scheme, weight, head=name == head)",
        "qweight, scales = schemes.quantize(scheme, weight, head=False)",
    ),
    (
        "load: the LM head quantized beside every other layer",
        "longdoc/quant/schemes.py",
        "    if head is not None and head_parent in by_parent:",
        "    if head is None and head_parent in by_parent:",
    ),
    (
        "q8 glu: prefill's MLP never fused",
        "longdoc/models/decoder.py",
        '            fused = gate.glu_with(up, x) if silu and hasattr(gate, "glu_with") else None',
        "            fused = None",
    ),
    (
        "q8 gemm: prefill's many rows through the 8-bit decode matmul",
        "longdoc/quant/schemes.py",
        "            return self.q8.gemm(rows.reshape(-1, self.in_features), self.dtype)",
        "            return self.q8(rows.reshape(-1, self.in_features), self.dtype)",
    ),
    (
        "q8: packing a list drops the last group's padding rows' scales",
        "longdoc/native/q8.py",
        "            s = torch.cat([s, s.new_zeros(pad, nb)])",
        "            s = torch.cat([s, s.new_ones(pad, nb)])",
    ),
    (
        "attn16: the running maximum moves without rescaling the sums",
        "longdoc/native/attn16.c",
        "    l[h] *= alpha;\n    for (int i = 0; i < jb->dp; i++) acc[i] *= alpha;",
        "    (void)alpha;",
    ),
    (
        "flash16: the K block's pairs packed one key off",
        "longdoc/native/flash16.c",
        "            kp[(j * KB + c) * 2 + 1] = row[2 * j + 1];",
        "            kp[(j * KB + c) * 2 + 1] = row[(2 * j + 3) % d];",
    ),
    (
        "flash16: the keys' channel factors not inverted",
        "longdoc/native/flash16.c",
        "        kf[i] = 1.f / qf[i];",
        "        kf[i] = qf[i];",
    ),
    (
        "flash16: a causal query sees the next key",
        "longdoc/native/flash16.c",
        "            if (pr->causal && q0 + t - k0 + 1 < valid) valid = q0 + t - k0 + 1;",
        "            if (pr->causal && q0 + t - k0 + 2 < valid) valid = q0 + t - k0 + 2;",
    ),
    (
        "flash16: the output not rescaled when the maximum grows",
        "longdoc/native/flash16.c",
        "    for (int64_t c = 0; c < d; c++) o[c] *= alpha;",
        "    (void)o;",
    ),
    (
        "flash16: the AVX2 softmax sums the probabilities after their value scales",
        "longdoc/native/flash16.c",
        "        sum = _mm256_add_ps(sum, e);\n        x[c] = _mm256_mul_ps(e, _mm256_loadu_ps(vsc + 8 * c));",
        "        x[c] = _mm256_mul_ps(e, _mm256_loadu_ps(vsc + 8 * c));\n        sum = _mm256_add_ps(sum, x[c]);",
    ),
    (
        "flash16: the assembly's third row reads the second's queries",
        "longdoc/native/flash16.c",
        '"vpbroadcastd (%[ap],%[s1],2), %[bc]\\n\\t"',
        '"vpbroadcastd (%[ap],%[s1]), %[bc]\\n\\t"',
    ),
    (
        "flash16: codes truncated instead of rounded",
        "longdoc/native/flash16.c",
        "        long c = lrintf(x[i] * inv);",
        "        long c = (long)(x[i] * inv);",
    ),
    (
        "flash16: the AVX2 exp2 polynomial loses its linear term",
        "longdoc/native/flash16.c",
        "    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(EXP2_C1));\n",
        "",
    ),
    (
        "flash16: attend_cpu keeps torch's kernel for float32 prefill",
        "longdoc/attention/kernels.py",
        "    if flash16.takes(q, k, v) and flash16.fast():",
        "    if flash16.takes(q, k, v) and not flash16.fast():",
    ),
    (
        "attn16: the AVX2 loop reads the next KV head's keys",
        "longdoc/native/attn16.c",
        "AVX2_TARGET static void segment_avx2(const job *jb, int64_t head, int64_t a, int64_t b, float *part,\n"
        "                                     float *scratch) {\n"
        "    const int C = jb->chunk, dp = jb->dp, g = jb->g;\n"
        "    const uint16_t *k = jb->k + head * jb->head_stride,",
        "AVX2_TARGET static void segment_avx2(const job *jb, int64_t head, int64_t a, int64_t b, float *part,\n"
        "                                     float *scratch) {\n"
        "    const int C = jb->chunk, dp = jb->dp, g = jb->g;\n"
        "    const uint16_t *k = jb->k + (head ^ 1) * jb->head_stride,",
    ),
    (
        "auto: the larger model only above the threshold, not at it",
        "longdoc/models/choose.py",
        "    if rate >= FAST_GFLOPS:",
        "    if rate > FAST_GFLOPS:",
    ),
    (
        "auto: the speed record is never read",
        "longdoc/models/choose.py",
        "    if key in speeds:\n        return float(speeds[key])",
        "    if key in speeds and False:\n        return float(speeds[key])",
    ),
    (
        "auto: a record of another version is trusted",
        "longdoc/models/choose.py",
        'data.get("version") != SPEED_VERSION or',
        'data.get("version") is None or',
    ),
    (
        "native: the shared header not pasted into the compiled source",
        "longdoc/native/__init__.py",
        "    return _LOCAL_INCLUDE.sub(paste, (here / file).read_bytes())",
        "    return (here / file).read_bytes()",
    ),
    (
        "layers: the engine imports the runtime (an upward import)",
        "longdoc/engine/decode.py",
        "from longdoc.engine.sampling import sample\n",
        "from longdoc.engine.sampling import sample\nfrom longdoc.runtime import machine  # noqa: F401\n",
    ),
    (
        "q8 rows: a step's scales taken in the wrong row order",
        "longdoc/native/q8.c",
        "        for (int i = 0; i < QK; i++) pattern[i] = ws[i / 4];",
        "        for (int i = 0; i < QK; i++) pattern[i] = ws[i % 8];",
    ),
    (
        "q8 rows: a row looked up by id copies row 0 of its group",
        "longdoc/native/q8.c",
        "                    memcpy((uint16_t *)out + at, rounded + QK * s + 4 * r, 4 * sizeof(uint16_t));",
        "                    memcpy((uint16_t *)out + at, rounded + QK * s + 4 * (r - r0), 4 * sizeof(uint16_t));",
    ),
    (
        "bfloat16 prefill on the int16 gemm where bfloat16 matmuls are native",
        "longdoc/quant/schemes.py",
        "    return gemm_fast and not (dtype == torch.bfloat16 and cpu_has_fast_bf16())",
        "    return gemm_fast",
    ),
    (
        "an MLP's unpacked weights unpacked again for each slice of rows",
        "longdoc/quant/schemes.py",
        "        if self._holders:\n            self._held = weight\n",
        "",
    ),
    (
        "an MLP's unpacked weights kept after its step",
        "longdoc/quant/schemes.py",
        "            if not self._holders:\n                self._held = None\n",
        "            pass\n",
    ),
    (
        "a bfloat16 run's direct decode attention skips the query rotation",
        "longdoc/engine/longmodel.py",
        "                rotated = apply(q, *rots[r])\n",
        "                rotated = q\n",
    ),
    (
        "a bfloat16 run's decode attention never calls attn16 directly",
        "longdoc/engine/longmodel.py",
        "cache = {torch.float32: torch.float16, torch.bfloat16: torch.bfloat16}.get(self.dtype)",
        "cache = {torch.float32: torch.float16}.get(self.dtype)",
    ),
    (
        "a bfloat16 q8 run holds the embedding table in memory",
        "longdoc/models/weights.py",
        '    in_file = skip_linears and device.type == "cpu"',
        "    in_file = skip_linears and keep_embedding",
    ),
    (
        "native step: the rotation's partner element one off",
        "longdoc/native/step.c",
        "xh[(j + half) % d] * sin_row[j]",
        "xh[(j + half + 1) % d] * sin_row[j]",
    ),
    (
        "native step: a bfloat16 run's rotation products not rounded",
        "longdoc/native/step.c",
        "const float a = stored(xh[j] * cos_row[j], bf16);",
        "const float a = xh[j] * cos_row[j];",
    ),
    (
        "native step: the key cached unrotated",
        "longdoc/native/step.c",
        "write_rows(krot, m, layer->k, m->head_stride, m->row_stride, pos);",
        "write_rows(k, m, layer->k, m->head_stride, m->row_stride, pos);",
    ),
    (
        "native step: every region weighted by the first's log-sum-exp",
        "longdoc/native/step.c",
        "const float w = expf(lse[r * heads + h] - shift);",
        "const float w = expf(lse[h] - shift);",
    ),
    (
        "native step: the norm's weight dropped",
        "longdoc/native/step.c",
        "out[j] = stored(w[j] * t, bf16);",
        "out[j] = stored(t, bf16);",
    ),
    (
        "native step: silu(gate) not rounded before the product",
        "longdoc/native/step.c",
        "stored(stored(g / (1.f + expf(-g)), m->bf16) * gu[inter + j], m->bf16)",
        "stored(g / (1.f + expf(-g)) * gu[inter + j], m->bf16)",
    ),
    (
        "native step: float16 ties rounded away from even",
        "longdoc/native/step.c",
        "        u += odd;\n",
        "",
    ),
    (
        "native step: the regions' bounds handed over in reverse",
        "longdoc/engine/longmodel.py",
        "bounds = torch.tensor([[a, b] for _, a, b in self.step_regions(pos)], dtype=torch.int64)",
        "bounds = torch.tensor([[a, b] for _, a, b in reversed(self.step_regions(pos))], dtype=torch.int64)",
    ),
    (
        "native step: kept over a grown cache",
        "longdoc/engine/longmodel.py",
        "if step is not None and step.reads(kv.k, kv.v):",
        "if step is not None:",
    ),
    (
        "native recycled step: every KV head reads the first head's rows",
        "longdoc/native/step.c",
        "offset = h * keys->head_stride + a * keys->row_stride;",
        "offset = a * keys->row_stride;",
    ),
    (
        "native recycled step: the step's key not written to the recycled set",
        "longdoc/native/step.c",
        "            write_rows(krot, m, held->k, held->head_stride, held->row_stride, held->row);\n",
        "",
    ),
    (
        "native recycled step: the dynamic schedule's check steps handed to it",
        "longdoc/engine/recycled.py",
        "        if any(full) or check:",
        "        if any(full):",
    ),
    (
        "native recycled step: without DCA, the step's own key left out of its range",
        "longdoc/engine/recycled.py",
        "            return [[(0, n)] * len(self.splits)]",
        "            return [[(0, n - 1)] * len(self.splits)]",
    ),
    (
        "attn16: the scores handed back at the segment's first key, not the chunk's",
        "longdoc/native/attn16.c",
        "memcpy(jb->scores + (head * jb->g + h) * jb->scores_stride + c0, sh,",
        "memcpy(jb->scores + (head * jb->g + h) * jb->scores_stride, sh,",
    ),
    (
        "native full step: keys ranked by their scores, not normalized per query head",
        "longdoc/native/step.c",
        "row[t] = fmaxf(row[t], su[t] - lse);",
        "row[t] = fmaxf(row[t], su[t]);",
    ),
    (
        "native full step: the rotated query handed back",
        "longdoc/native/step.c",
        "if (queries_out) memcpy(queries_out + i * q_len, q, (size_t)q_len * sizeof(float));",
        "if (queries_out) memcpy(queries_out + i * q_len, queries, (size_t)q_len * sizeof(float));",
    ),
    (
        "native full step: the step's own key ranked among those it selects from",
        "longdoc/engine/recycled.py",
        "self.policy.refresh(self.kv, layer, pos, select[layer : layer + 1, :, :pos], queries[layer], self.extra)",
        "self.policy.refresh(self.kv, layer, pos, select[layer : layer + 1], queries[layer], self.extra)",
    ),
    (
        "recycled: the selection's query rotated in float32, not as the kernel gets it",
        "longdoc/engine/recycled.py",
        "qr = rotated(q, rot, r).float().view(1, hkv, -1, d)",
        "qr = rotated(q.float(), rot, r).view(1, hkv, -1, d)",
    ),
    (
        "q8: the AVX-512 VNNI loop's 8-bit step takes the AVX2 operand order (signed first)",
        "longdoc/native/q8.c",
        "#define DOT8(dot, xmag, wsigned) _mm256_dpbusd_epi32(dot, xmag, wsigned)",
        "#define DOT8(dot, xmag, wsigned) _mm256_dpbusd_epi32(dot, wsigned, xmag)",
    ),
    (
        "q8: the AVX-512 VNNI loop's 5-bit sums folded twice",
        "longdoc/native/q8.c",
        "#define FOLD5(dot, part) _mm256_add_epi32(dot, part)",
        "#define FOLD5(dot, part) _mm256_add_epi32(dot, _mm256_add_epi32(part, part))",
    ),
    (
        "q8: 5-bit weights packed only where the AVX2 loop is the best",
        "longdoc/quant/schemes.py",
        "            five = q8.best_path() in q8.FIVE_BIT_PATHS - {q8.SCALAR}",
        "            five = q8.best_path() == q8.AVX2",
    ),
    (
        "plan: recycling from 8,192 tokens even where decode steps run natively",
        "longdoc/runtime/plan.py",
        "    auto_min = cfg.recycle.auto_min_context_native if decodes_natively(info) else"
        " cfg.recycle.auto_min_context",
        "    auto_min = cfg.recycle.auto_min_context",
    ),
]


# The test files that exercise each room, for --targeted (a file not listed: every fast test).
TARGETS: dict[str, tuple[str, ...]] = {
    "longdoc/attention/": (
        "tests/test_attention.py",
        "tests/test_fidelity.py",
        "tests/test_sparse.py",
        "tests/test_flash16.py",
    ),
    "longdoc/engine/": ("tests/test_recycled.py", "tests/test_fidelity.py", "tests/test_engine.py"),
    "longdoc/engine/decode.py": ("tests/test_layers.py", "tests/test_engine.py"),
    "longdoc/models/": ("tests/test_models.py", "tests/test_cpu_paths.py", "tests/test_engine.py"),
    "longdoc/models/choose.py": ("tests/test_second_model.py",),
    "longdoc/models/decoder.py": ("tests/test_engine.py", "tests/test_decode_glue.py", "tests/test_q8_gemm.py"),
    "longdoc/models/rope.py": ("tests/test_attention.py", "tests/test_engine.py"),
    "longdoc/quant/": (
        "tests/test_quant.py",
        "tests/test_q8_gemm.py",
        "tests/test_rss.py",
        "tests/test_cpu_paths.py",
        "tests/test_int5.py",
        "tests/test_q5.py",
    ),
    "longdoc/native/int5.c": ("tests/test_int5.py",),
    "longdoc/native/flash.c": ("tests/test_flash.py",),
    "longdoc/native/q8.c": ("tests/test_q8.py", "tests/test_q8_gemm.py", "tests/test_q5.py"),
    "longdoc/native/q8_rows.h": ("tests/test_q8.py", "tests/test_q5.py"),
    "longdoc/native/attn16.c": ("tests/test_attn16.py",),
    "longdoc/native/flash16.c": ("tests/test_flash16.py",),
    "longdoc/native/step.c": ("tests/test_native_step.py",),
    "longdoc/engine/longmodel.py": ("tests/test_native_step.py", "tests/test_decode_glue.py", "tests/test_engine.py"),
    "longdoc/native/halves.h": ("tests/test_q8.py", "tests/test_int5.py", "tests/test_attn16.py"),
    "longdoc/native/__init__.py": ("tests/test_native.py", "tests/test_q8.py"),
    "longdoc/native/q8.py": ("tests/test_q8.py", "tests/test_q8_gemm.py", "tests/test_quant.py", "tests/test_q5.py"),
    "longdoc/runtime/": ("tests/test_pipeline.py", "tests/test_fidelity.py"),
    "longdoc/cpu.py": ("tests/test_cpu_paths.py", "tests/test_models.py"),
    "longdoc/config.py": ("tests/test_sparse.py", "tests/test_fidelity.py", "tests/test_pipeline.py"),
}


def targets(path: str) -> list[str]:
    """The test files of the most specific room (or file) in ``TARGETS`` that holds ``path``."""
    rooms = [room for room in TARGETS if path.startswith(room)]
    return list(TARGETS[max(rooms, key=len)]) if rooms else ["tests/"]


def broken(mutants: list[tuple[str, str, str, str]]) -> list[str]:
    """Why each of ``mutants`` no longer applies: its file is missing, its original text is not there
    exactly once, or the mutated file would equal the original. Empty when all apply."""
    problems = []
    for name, path, old, new in mutants:
        file = REPO / path
        if not file.is_file():
            problems.append(f"{name!r}: no file {path}")
            continue
        src = file.read_text()
        count = src.count(old)
        if count != 1:
            problems.append(f"{name!r}: its original text occurs {count} times in {path}, not once")
        elif src.replace(old, new) == src:
            problems.append(f"{name!r}: the mutated {path} equals the original")
    return problems


def failing_tests(tests: list[str]) -> set[str]:
    """Node ids of the fast tests among ``tests`` that fail or error (pytest's short summary)."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "not slow", "-p", "no:cacheprovider", *tests],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return {line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))}


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/mutants.py",
        description="Apply each deliberate break in turn, run the fast tests, restore the file, and report "
        "which tests caught it (only tests that pass unbroken count). Exit status 1 if a mutant is caught by none.",
    )
    parser.add_argument("name", nargs="?", default="", help="only the mutants whose name contains this")
    parser.add_argument("tests", nargs="*", default=["tests/"], help="test paths to run (default: tests/)")
    parser.add_argument("--list", action="store_true", help="list the mutants' names and exit")
    parser.add_argument(
        "--targeted",
        action="store_true",
        help="run each mutant against the test files of its room (TARGETS) instead of the given tests",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check that every chosen mutant still applies (its original text once in its file) and exit; "
        "exit status 1 listing those that do not",
    )
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.name in m[0]]
    if not chosen:
        parser.error(f"no mutant's name contains {args.name!r}; --list shows them")
    if args.list:
        print("\n".join(name for name, *_ in chosen))
        return 0
    problems = broken(chosen)  # every mutant applies before anything runs
    if args.check:
        print("\n".join(problems) or f"all {len(chosen)} mutants apply")
        return 1 if problems else 0
    if problems:
        parser.error("mutants that no longer apply:\n" + "\n".join(problems))

    plans = [(m, targets(m[1]) if args.targeted else args.tests) for m in chosen]
    baselines: dict[tuple[str, ...], set[str]] = {}
    for tests in {tuple(tests) for _, tests in plans}:
        baselines[tests] = failing_tests(list(tests))
        if baselines[tests]:
            print(
                f"baseline: {len(baselines[tests])} tests fail unbroken and catch nothing: {sorted(baselines[tests])}"
            )
    gaps = []
    for (name, path, old, new), tests in plans:
        file = REPO / path
        src = file.read_text()
        file.write_text(src.replace(old, new))
        try:
            caught = sorted(failing_tests(tests) - baselines[tuple(tests)])
        finally:
            file.write_text(src)
        print(f"{name}: {len(caught)} caught{': ' + str(caught[:6]) if caught else ' -- GAP'}", flush=True)
        if not caught:
            gaps.append(name)
    if gaps:
        print(f"{len(gaps)} of {len(chosen)} mutants caught by no test: {gaps}")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
