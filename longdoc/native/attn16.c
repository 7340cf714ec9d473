/* Decode-step attention over a 16-bit KV cache (float16 or bfloat16), on any CPU.

   Built once per machine by longdoc/native/__init__.py (cc -O3 -shared, with -fopenmp where the
   compiler links it) and called through ctypes (longdoc/native/attn16.py). Like q8.c it needs no
   instruction set to build or run: the scalar loop is plain C, and the SIMD loops sit in functions
   compiled for their instruction set (target attributes) and are picked at run time by a CPU probe.

   Format: one query row per query head, float32, (n_q_heads, d) contiguous. Keys and values are
   16-bit (float16, or bfloat16 with kv_is_bf16), element (kv head j, position t, channel i) at
   j * head_stride + t * row_stride + i of k (and of v: both have the same strides), positions
   0..n_keys-1. Query head h reads KV head h / (n_q_heads / n_kv_heads) (GQA). The outputs: out
   (n_q_heads, d) float32, softmax(scale * q.k) @ v, and lse (n_q_heads) float32, the natural-log
   log-sum-exp of the scaled scores (no keys: out 0, lse -inf), as kernels.attend_reference.

   Arithmetic, float32 throughout, every path the same operations but for their order:
     q' = q * scale, once per call (the one rounding the reference doesn't have);
     the keys are cut in segments (max(512, n_keys / 16) keys rounded up to 64: a function of n_keys
     only, so the result doesn't depend on the thread count) and each segment in chunks of C keys
     (64, 32 or 16 as d is up to 64, 128 or 256). Per chunk and query head:
       s_j = q'.k_j                      (the scalar path sums in channel order, SIMD ones per lane);
       m' = max(m, max_j s_j), and where it grew, l and acc are multiplied by exp(m - m');
       p_j = exp(s_j - m'), l += sum_j p_j, acc += p_j v_j  (key by key, per channel);
     a segment leaves (m, l, acc); the segments of a KV head are merged in order, with weights
     w = exp(m_seg - M), M their maximum: out = sum w acc / sum w l, lse = M + log(sum w l).
   exp is one function (exp_neg below: a Cephes polynomial, about 2 ulp, its argument <= 0, 0 below
   -87), written once per path with the same float operations and no fused ones, so every path
   rounds it the same way. So the paths differ only by the order of the float32 sums in the scores
   and in l, and by fused against separate multiply-adds. The tolerance tests/test_attn16.py holds
   every path to: as accurate as plain float32 attention, i.e. per query head an error against the
   float64 reference within 4 times that of torch's float32 attention on the same inputs plus 8 ulps
   (of max |v| for out, of max(1, |lse|) for lse); measured, 0.1 to 1.3 times. One path on 1, 2 or 3
   threads gives the same bits.

   Work: a KV head's query heads are done together, so each K and V row is read from memory once
   per call and then from L1 by every query head of the group (a chunk's K rows, and its V rows, are
   8 KiB at most).
   The scalar and NEON loops widen a chunk's rows to float32 once (into per-thread scratch, zero
   padded to a multiple of 8 channels); the AVX2 loops read the 16-bit rows where d % 8 == 0 and
   widen each vector where it is used (faster on Zen 3 than a pass through scratch: see load8_avx2),
   copying only the last keys of a segment when they don't fill a block of 8, and prefetch the next
   chunk's rows a line at a time while they work on this one (fetch_next). OpenMP threads share
   out the (KV head, segment) units; each writes its own partial (m, l, acc), merged afterwards
   (flash-decoding's split over keys).

   Paths (the `level` argument; 0 takes the best this CPU runs):
     1 scalar   any CPU;
     2 AVX2     x86 with AVX2, FMA and F16C (scores of 2 query heads x 4 keys per block, their lanes
                summed by one hadd tree; acc tiles of 4 heads x 16 channels in registers; F16C
                widens float16, a 16-bit shift bfloat16);
     3 NEON     aarch64 (scores of 4 keys per block summed by pairwise adds, acc tiles of 4 heads x 16
                channels; vcvt_f32_f16 widens float16, vshll bfloat16). Checked under qemu only
                (tests/data/attn16_driver.c): not timed on an ARM CPU. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "halves.h" /* 16-bit float conversions, the AVX2 probe: shared by the kernels */

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define A16_X86 1
#endif

#if defined(__aarch64__)
#include <arm_neon.h>
#define A16_NEON 1
#endif

/* exp_neg's products are rounded before their sums on every path (GCC doesn't contract across
   statements under -std=c11; clang contracts only within one unless told to) */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define MAX_D 256
#define SEG_MIN 512  /* keys per segment, at least */
#define SEG_COUNT 16 /* segments per KV head, at most, above SEG_MIN * SEG_COUNT keys */

enum { LEVEL_BEST = 0, LEVEL_SCALAR = 1, LEVEL_AVX2 = 2, LEVEL_NEON = 3 };

/* One call's constants. */
typedef struct {
    const float *q;    /* q * scale, (n_q_heads, dp), zero padded */
    const uint16_t *k; /* the caches */
    const uint16_t *v;
    int bf16;
    int g;                 /* query heads per KV head */
    int d, dp;             /* channels, and rounded up to 8 */
    int chunk;             /* keys per chunk (C) */
    int64_t head_stride;   /* elements */
    int64_t row_stride;
    int64_t n;             /* keys */
    float *scores;         /* where each key's scaled score goes (row h: query head h), or NULL */
    int64_t scores_stride; /* floats between query heads' rows of scores */
} job;

/* A segment's partial result: m[g], l[g], acc[g][dp] (floats, in this order). */
#define PART_FLOATS(jb) ((size_t)(jb)->g * (size_t)(2 + (jb)->dp))

/* keys [a, b) of KV head `head` -> its partial `part`; `scratch`: 2 C dp + g C floats */
typedef void (*segment_fn)(const job *jb, int64_t head, int64_t a, int64_t b, float *part, float *scratch);

/* ---------------------------------------------------------------------------------------------- */
/* shared scalar pieces */

/* exp(x) for x <= 0 (a larger x is taken as 0): 0 below EXP_LO (and for NaN), else Cephes' expf
   polynomial: n = round(x log2 e) (by the magic constant: round half to even), r = x - n ln 2 in two
   steps (n * EXP_LN2_HI is exact), y = 1 + r + r^2 P(r), y 2^n. Every path does these operations, each
   rounded to float32 (no fused multiply-add), so all of them give the same bits for the same x. */
#define EXP_LO -87.f /* above ln(2^-126): 2^n stays a normal float */

static inline float exp_neg(float x) {
    if (!(x >= EXP_LO)) return 0.f;
    x = x < 0.f ? x : 0.f;
    float t = x * EXP_LOG2E;
    t = t + EXP_MAGIC;
    const float n = t - EXP_MAGIC;
    float r = n * EXP_LN2_HI;
    r = x - r;
    float r2 = n * EXP_LN2_LO;
    r = r - r2;
    r2 = r * r;
    float p = EXP_P0 * r;
    p = p + EXP_P1;
    p = p * r;
    p = p + EXP_P2;
    p = p * r;
    p = p + EXP_P3;
    p = p * r;
    p = p + EXP_P4;
    p = p * r;
    p = p + EXP_P5;
    p = p * r2;
    p = p + r;
    p = p + 1.f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two;
    memcpy(&two, &bits, 4);
    return p * two;
}

/* Rows [a, a + cn) of one KV head's 16-bit cache -> float32 rows of dp (zero padded) in `dst`. */
static void widen_scalar(const job *jb, const uint16_t *src, int64_t a, int cn, float *dst) {
    for (int j = 0; j < cn; j++) {
        const uint16_t *row = src + (a + j) * jb->row_stride;
        float *out = dst + (size_t)j * jb->dp;
        if (jb->bf16)
            for (int i = 0; i < jb->d; i++) out[i] = bf16_to_float(row[i]);
        else
            for (int i = 0; i < jb->d; i++) out[i] = half_to_float(row[i]);
        for (int i = jb->d; i < jb->dp; i++) out[i] = 0.f;
    }
}

/* The running maximum of head h's scores sc[0..cn) grew to `top`: l and acc rescaled. */
static void rescale(const job *jb, float *part, int h, float top) {
    float *m = part, *l = part + jb->g, *acc = part + 2 * jb->g + (size_t)h * jb->dp;
    const float alpha = exp_neg(m[h] - top);
    l[h] *= alpha;
    for (int i = 0; i < jb->dp; i++) acc[i] *= alpha;
    m[h] = top;
}

/* The scaled scores of keys [c0, c0 + cn) of query head h (sh, before the softmax) kept where the
   caller asked for them (longdoc_attn16_scored). */
static inline void keep_scores(const job *jb, int64_t head, int h, int64_t c0, int cn, const float *sh) {
    if (jb->scores) memcpy(jb->scores + (head * jb->g + h) * jb->scores_stride + c0, sh, (size_t)cn * sizeof(float));
}

static void part_init(const job *jb, float *part) {
    for (int h = 0; h < jb->g; h++) part[h] = -INFINITY;
    memset(part + jb->g, 0, (size_t)jb->g * (size_t)(1 + jb->dp) * sizeof(float));
}

/* ---------------------------------------------------------------------------------------------- */
/* scalar */

static void segment_scalar(const job *jb, int64_t head, int64_t a, int64_t b, float *part, float *scratch) {
    const int C = jb->chunk, dp = jb->dp, g = jb->g;
    const uint16_t *k = jb->k + head * jb->head_stride, *v = jb->v + head * jb->head_stride;
    const float *q = jb->q + (size_t)head * g * dp;
    float *kf = scratch, *vf = kf + (size_t)C * dp, *sc = vf + (size_t)C * dp;
    float *m = part, *l = part + g, *acc = part + 2 * g;
    part_init(jb, part);
    for (int64_t c0 = a; c0 < b; c0 += C) {
        const int cn = b - c0 < C ? (int)(b - c0) : C;
        widen_scalar(jb, k, c0, cn, kf);
        widen_scalar(jb, v, c0, cn, vf);
        for (int h = 0; h < g; h++) {
            const float *qh = q + (size_t)h * dp;
            float *sh = sc + (size_t)h * C, top = -INFINITY;
            for (int j = 0; j < cn; j++) {
                const float *kj = kf + (size_t)j * dp;
                float s = 0.f;
                for (int i = 0; i < jb->d; i++) s += qh[i] * kj[i];
                sh[j] = s;
                top = s > top ? s : top;
            }
            keep_scores(jb, head, h, c0, cn, sh);
            if (top > m[h]) rescale(jb, part, h, top);
            float sum = 0.f;
            for (int j = 0; j < cn; j++) {
                sh[j] = exp_neg(sh[j] - m[h]);
                sum += sh[j];
            }
            l[h] += sum;
            float *ah = acc + (size_t)h * dp;
            for (int j = 0; j < cn; j++) {
                const float p = sh[j], *vj = vf + (size_t)j * dp;
                for (int i = 0; i < jb->d; i++) ah[i] += p * vj[i];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* AVX2 + FMA + F16C */

#ifdef A16_X86
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET static inline __m256 exp_neg_avx2(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_GE_OQ);
    x = _mm256_min_ps(x, _mm256_setzero_ps());
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E));
    t = _mm256_add_ps(t, _mm256_set1_ps(EXP_MAGIC));
    const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(EXP_MAGIC));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(EXP_LN2_HI)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(EXP_LN2_LO)));
    const __m256 r2 = _mm256_mul_ps(r, r);
    __m256 p = _mm256_mul_ps(_mm256_set1_ps(EXP_P0), r);
    p = _mm256_mul_ps(_mm256_add_ps(p, _mm256_set1_ps(EXP_P1)), r);
    p = _mm256_mul_ps(_mm256_add_ps(p, _mm256_set1_ps(EXP_P2)), r);
    p = _mm256_mul_ps(_mm256_add_ps(p, _mm256_set1_ps(EXP_P3)), r);
    p = _mm256_mul_ps(_mm256_add_ps(p, _mm256_set1_ps(EXP_P4)), r);
    p = _mm256_mul_ps(_mm256_add_ps(p, _mm256_set1_ps(EXP_P5)), r2);
    p = _mm256_add_ps(_mm256_add_ps(p, r), _mm256_set1_ps(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
}

/* Rows of keys or values, as the AVX2 loops read them: float32 rows zero padded to dp channels (ROWS_F32:
   a chunk widened into scratch, where d % 8 != 0), or the cache's own float16 or bfloat16 rows (d % 8
   == 0), each vector widened where it is used. Measured on the AVX2 EPYC (Zen 3, 2K keys, one
   thread), widening in the loops took about 10% less time than a pass through scratch, for the keys
   and again for the values, though each key vector is widened once per pair of query heads and each
   value vector once per 4. */
enum { ROWS_F32 = 0, ROWS_F16 = 1, ROWS_BF16 = 2 };

/* The prefetches of the next chunk's K and V rows, one cache line of each at a time, spread over the
   work on this chunk (one per block of scores and one per key of each tile of values): the hardware
   prefetcher alone left the loops waiting for memory at each chunk (measured on Zen 3, one thread,
   K/V from DRAM: 200 us a call at 2K keys, 160 with these; the same prefetches all at once at the
   start of a chunk made it slower, as they fill the queue of misses). */
typedef struct {
    const char *k, *v;    /* the row being fetched */
    int64_t row_bytes;    /* between rows */
    int row_lines, left;  /* lines a row spans; lines still to fetch (of K, and as many of V) */
    int line;             /* the next line of the row (counters, not a division per call) */
} fetches;

AVX2_TARGET static inline void fetch_next(fetches *f) {
    if (f->left > 0) {
        _mm_prefetch(f->k + 64 * f->line, _MM_HINT_T0);
        _mm_prefetch(f->v + 64 * f->line, _MM_HINT_T0);
        f->left--;
        if (++f->line == f->row_lines) {
            f->line = 0;
            f->k += f->row_bytes, f->v += f->row_bytes;
        }
    }
}

/* the 8 channels at element `at` of rows of `kind` (a literal at every call: no branch) */
AVX2_TARGET static inline __m256 load8_avx2(const void *rows, int64_t at, int kind) {
    if (kind == ROWS_F32) return _mm256_loadu_ps((const float *)rows + at);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)rows + at));
    return kind == ROWS_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

/* Rows [a, a + cn) of one KV head's cache -> float32 rows of dp (zero padded) in `dst`. The last
   channels of a row (d % 8) go through a copy, so no row is read past its end. */
AVX2_TARGET static void widen_avx2(const job *jb, const uint16_t *src, int64_t a, int cn, float *dst) {
    const int d = jb->d, d8 = d & ~7, dp = jb->dp, kind = jb->bf16 ? ROWS_BF16 : ROWS_F16;
    const int64_t stride = jb->row_stride;
    for (int j = 0; j < cn; j++) {
        const uint16_t *row = src + (a + j) * stride;
        float *out = dst + (size_t)j * dp;
        if (kind == ROWS_BF16)
            for (int i = 0; i < d8; i += 8) _mm256_storeu_ps(out + i, load8_avx2(row, i, ROWS_BF16));
        else
            for (int i = 0; i < d8; i += 8) _mm256_storeu_ps(out + i, load8_avx2(row, i, ROWS_F16));
        if (d8 < d) {
            uint16_t tail[8] = {0};
            memcpy(tail, row + d8, (size_t)(d - d8) * 2);
            _mm256_storeu_ps(out + d8, load8_avx2(tail, 0, kind));
        }
    }
}

/* 8 vectors -> one vector of their 8 sums */
AVX2_TARGET static inline __m256 sum8_avx2(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

AVX2_TARGET static inline float hsum_avx2(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_TARGET static inline float hmax_avx2(__m256 x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The scores of the g query heads (q rows dp apart) with `nk` keys (a multiple of 8; rows `stride`
   elements apart, of `kind`) -> sc (rows C apart): pairs of heads with 4 keys at a time (8
   accumulators; each key vector loaded once for 2 products), a last odd head with 8 at a time; each
   accumulator's 8 lanes summed by sum8_avx2 (one hadd tree for 8 scores). */
AVX2_TARGET __attribute__((always_inline)) static inline void scores_body_avx2(const float *q, int g, int dp,
                                                                                const void *rows, int64_t stride,
                                                                                int kind, int nk, float *sc, int C,
                                                                                fetches *f) {
    int h = 0;
    for (; h + 1 < g; h += 2) {
        const float *qa = q + (size_t)h * dp, *qb = qa + dp;
        for (int j0 = 0; j0 < nk; j0 += 4) {
            __m256 s[8];
            for (int t = 0; t < 8; t++) s[t] = _mm256_setzero_ps();
            for (int i = 0; i < dp; i += 8) {
                const __m256 x = _mm256_loadu_ps(qa + i), y = _mm256_loadu_ps(qb + i);
                for (int t = 0; t < 4; t++) {
                    const __m256 kv = load8_avx2(rows, (j0 + t) * stride + i, kind);
                    s[t] = _mm256_fmadd_ps(x, kv, s[t]);
                    s[4 + t] = _mm256_fmadd_ps(y, kv, s[4 + t]);
                }
            }
            const __m256 r = sum8_avx2(s);
            fetch_next(f);
            _mm_storeu_ps(sc + (size_t)h * C + j0, _mm256_castps256_ps128(r));
            _mm_storeu_ps(sc + (size_t)(h + 1) * C + j0, _mm256_extractf128_ps(r, 1));
        }
    }
    if (h < g) {
        const float *qa = q + (size_t)h * dp;
        for (int j0 = 0; j0 < nk; j0 += 8) {
            __m256 s[8];
            for (int t = 0; t < 8; t++) s[t] = _mm256_setzero_ps();
            for (int i = 0; i < dp; i += 8) {
                const __m256 x = _mm256_loadu_ps(qa + i);
                for (int t = 0; t < 8; t++) s[t] = _mm256_fmadd_ps(x, load8_avx2(rows, (j0 + t) * stride + i, kind), s[t]);
            }
            _mm256_storeu_ps(sc + (size_t)h * C + j0, sum8_avx2(s));
            fetch_next(f);
        }
    }
}

AVX2_TARGET static void scores_avx2(const float *q, int g, int dp, const void *rows, int64_t stride, int kind, int nk,
                                    float *sc, int C, fetches *f) {
    switch (kind) {
    case ROWS_F32: scores_body_avx2(q, g, dp, rows, stride, ROWS_F32, nk, sc, C, f); break;
    case ROWS_F16: scores_body_avx2(q, g, dp, rows, stride, ROWS_F16, nk, sc, C, f); break;
    default: scores_body_avx2(q, g, dp, rows, stride, ROWS_BF16, nk, sc, C, f); break;
    }
}

/* acc[t][0 .. 8 nv) += sum_j p[t][j] v_j for heads t < nh (acc rows dp apart, p rows C apart; value
   rows `stride` elements apart, of `kind`): nh * nv accumulators in registers. nh, nv and kind are
   literals at each call (pv_tile_avx2), so each gets its own copy without the branches; named
   variables, not an array, which GCC (12) kept on the stack in some copies, storing it in the loop. */
#define PV_LOAD(t, u) (nh > (t) && nv > (u) ? _mm256_loadu_ps(acc + (size_t)(t) * dp + 8 * (u)) : _mm256_setzero_ps())
#define PV_STORE(r, t, u) \
    if (nh > (t) && nv > (u)) _mm256_storeu_ps(acc + (size_t)(t) * dp + 8 * (u), r)
#define PV_STEP(t, r0, r1)                                               \
    if (nh > (t)) {                                                      \
        const __m256 p = _mm256_broadcast_ss(sc + (size_t)(t) * C + j); \
        r0 = _mm256_fmadd_ps(p, x0, r0);                                 \
        if (nv > 1) r1 = _mm256_fmadd_ps(p, x1, r1);                     \
    }

AVX2_TARGET __attribute__((always_inline)) static inline void pv_body_avx2(const float *sc, int C, const void *rows,
                                                                            int64_t stride, int kind, int cn,
                                                                            float *acc, int dp, int nh, int nv,
                                                                            fetches *f) {
    __m256 r00 = PV_LOAD(0, 0), r01 = PV_LOAD(0, 1), r10 = PV_LOAD(1, 0), r11 = PV_LOAD(1, 1);
    __m256 r20 = PV_LOAD(2, 0), r21 = PV_LOAD(2, 1), r30 = PV_LOAD(3, 0), r31 = PV_LOAD(3, 1);
    for (int j = 0; j < cn; j++) {
        const __m256 x0 = load8_avx2(rows, j * stride, kind);
        const __m256 x1 = nv > 1 ? load8_avx2(rows, j * stride + 8, kind) : x0;
        PV_STEP(0, r00, r01)
        PV_STEP(1, r10, r11)
        PV_STEP(2, r20, r21)
        PV_STEP(3, r30, r31)
        fetch_next(f);
    }
    PV_STORE(r00, 0, 0);
    PV_STORE(r01, 0, 1);
    PV_STORE(r10, 1, 0);
    PV_STORE(r11, 1, 1);
    PV_STORE(r20, 2, 0);
    PV_STORE(r21, 2, 1);
    PV_STORE(r30, 3, 0);
    PV_STORE(r31, 3, 1);
}

#define PV_CASES(kind)                                                                     \
    switch (nh * 2 + nv - 1) {                                                             \
    case 2: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 1, 1, f); break;                   \
    case 3: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 1, 2, f); break;                   \
    case 4: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 2, 1, f); break;                   \
    case 5: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 2, 2, f); break;                   \
    case 6: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 3, 1, f); break;                   \
    case 7: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 3, 2, f); break;                   \
    case 8: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 4, 1, f); break;                   \
    default: pv_body_avx2(s, C, r, stride, kind, cn, a, dp, 4, 2, f); break;                  \
    }

/* acc[t] += sum_j p[t][j] v_j, t < g: tiles of 4 heads x 16 channels (a last one of fewer) */
AVX2_TARGET static void pv_avx2(const float *sc, int C, const void *rows, int64_t stride, int kind, int cn, float *acc,
                                int dp, int g, fetches *f) {
    for (int h0 = 0; h0 < g; h0 += 4) {
        const int nh = g - h0 < 4 ? g - h0 : 4;
        for (int c = 0; c < dp; c += 16) {
            const int nv = dp - c < 16 ? 1 : 2;
            const float *s = sc + (size_t)h0 * C;
            float *a = acc + (size_t)h0 * dp + c;
            if (kind == ROWS_F32) {
                const float *r = (const float *)rows + c;
                PV_CASES(ROWS_F32)
            } else {
                const uint16_t *r = (const uint16_t *)rows + c;
                if (kind == ROWS_F16) PV_CASES(ROWS_F16)
                else PV_CASES(ROWS_BF16)
            }
        }
    }
}

AVX2_TARGET static void segment_avx2(const job *jb, int64_t head, int64_t a, int64_t b, float *part,
                                     float *scratch) {
    const int C = jb->chunk, dp = jb->dp, g = jb->g;
    const uint16_t *k = jb->k + head * jb->head_stride, *v = jb->v + head * jb->head_stride;
    const float *q = jb->q + (size_t)head * g * dp;
    float *kf = scratch, *vf = kf + (size_t)C * dp, *sc = vf + (size_t)C * dp;
    float *m = part, *l = part + g, *acc = part + 2 * g;
    /* the cache's rows as they are where d is a multiple of 8, else widened per chunk */
    const int kind = jb->d % 8 ? ROWS_F32 : (jb->bf16 ? ROWS_BF16 : ROWS_F16);
    const int64_t stride = jb->row_stride;
    part_init(jb, part);
    for (int64_t c0 = a; c0 < b; c0 += C) {
        const int cn = b - c0 < C ? (int)(b - c0) : C, full = cn & ~7, cn8 = (cn + 7) & ~7;
        /* the next chunk's rows (segments are whole chunks: after the last chunk of a segment come the
           first rows of the next, often this thread's next unit) */
        const int64_t after = c0 + C, ahead = jb->n - after < C ? jb->n - after : C;
        const int row_lines = (jb->d * 2 + 63) / 64;
        fetches f = {(const char *)k, (const char *)v, stride * 2, row_lines, 0, 0};
        if (ahead > 0) {
            f.k = (const char *)(k + after * stride), f.v = (const char *)(v + after * stride);
            f.left = (int)ahead * row_lines;
        }
        const void *vrows;
        if (kind == ROWS_F32) {
            widen_avx2(jb, k, c0, cn, kf);
            widen_avx2(jb, v, c0, cn, vf);
            memset(kf + (size_t)cn * dp, 0, (size_t)(cn8 - cn) * dp * sizeof(float));
            vrows = vf;
            scores_avx2(q, g, dp, kf, dp, ROWS_F32, cn8, sc, C, &f);
        } else {
            vrows = v + c0 * stride;
            scores_avx2(q, g, dp, k + c0 * stride, stride, kind, full, sc, C, &f);
            if (full < cn) { /* the last keys, copied with zero rows after them: no row read past the keys */
                uint16_t *tail = (uint16_t *)kf;
                memset(tail, 0, (size_t)8 * dp * 2);
                for (int j = full; j < cn; j++) memcpy(tail + (size_t)(j - full) * dp, k + (c0 + j) * stride, (size_t)dp * 2);
                scores_avx2(q, g, dp, tail, dp, kind, 8, sc + full, C, &f);
            }
        }
        for (int h = 0; h < g; h++) {
            float *sh = sc + (size_t)h * C;
            keep_scores(jb, head, h, c0, cn, sh);
            for (int j = cn; j < cn8; j++) sh[j] = -INFINITY; /* past the keys */
            __m256 top8 = _mm256_loadu_ps(sh);
            for (int j0 = 8; j0 < cn8; j0 += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(sh + j0));
            const float top = hmax_avx2(top8);
            if (top > m[h]) rescale(jb, part, h, top);
            const __m256 mh = _mm256_set1_ps(m[h]);
            __m256 sum = _mm256_setzero_ps();
            for (int j0 = 0; j0 < cn8; j0 += 8) {
                const __m256 p = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(sh + j0), mh));
                _mm256_storeu_ps(sh + j0, p);
                sum = _mm256_add_ps(sum, p);
            }
            l[h] += hsum_avx2(sum);
        }
        pv_avx2(sc, C, vrows, kind == ROWS_F32 ? dp : stride, kind, cn, acc, dp, g, &f);
    }
}

#endif

/* ---------------------------------------------------------------------------------------------- */
/* NEON (aarch64) */

#ifdef A16_NEON
static inline float32x4_t exp_neg_neon(float32x4_t x) {
    const uint32x4_t keep = vcgeq_f32(x, vdupq_n_f32(EXP_LO));
    x = vminq_f32(x, vdupq_n_f32(0.f));
    float32x4_t t = vmulq_f32(x, vdupq_n_f32(EXP_LOG2E));
    t = vaddq_f32(t, vdupq_n_f32(EXP_MAGIC));
    const float32x4_t n = vsubq_f32(t, vdupq_n_f32(EXP_MAGIC));
    float32x4_t r = vsubq_f32(x, vmulq_f32(n, vdupq_n_f32(EXP_LN2_HI)));
    r = vsubq_f32(r, vmulq_f32(n, vdupq_n_f32(EXP_LN2_LO)));
    const float32x4_t r2 = vmulq_f32(r, r);
    float32x4_t p = vmulq_f32(vdupq_n_f32(EXP_P0), r);
    p = vmulq_f32(vaddq_f32(p, vdupq_n_f32(EXP_P1)), r);
    p = vmulq_f32(vaddq_f32(p, vdupq_n_f32(EXP_P2)), r);
    p = vmulq_f32(vaddq_f32(p, vdupq_n_f32(EXP_P3)), r);
    p = vmulq_f32(vaddq_f32(p, vdupq_n_f32(EXP_P4)), r);
    p = vmulq_f32(vaddq_f32(p, vdupq_n_f32(EXP_P5)), r2);
    p = vaddq_f32(vaddq_f32(p, r), vdupq_n_f32(1.f));
    const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    const uint32x4_t y = vreinterpretq_u32_f32(vmulq_f32(p, vreinterpretq_f32_s32(bits)));
    return vreinterpretq_f32_u32(vandq_u32(y, keep));
}

static inline float32x4_t widen4_neon(const uint16_t *p, int bf16) {
    const uint16x4_t h = vld1_u16(p);
    return bf16 ? vreinterpretq_f32_u32(vshll_n_u16(h, 16)) : vcvt_f32_f16(vreinterpret_f16_u16(h));
}

static void widen_neon(const job *jb, const uint16_t *src, int64_t a, int cn, float *dst) {
    const int d4 = jb->d & ~3;
    for (int j = 0; j < cn; j++) {
        const uint16_t *row = src + (a + j) * jb->row_stride;
        float *out = dst + (size_t)j * jb->dp;
        for (int i = 0; i < d4; i += 4) vst1q_f32(out + i, widen4_neon(row + i, jb->bf16));
        if (d4 < jb->d) {
            uint16_t tail[4] = {0};
            memcpy(tail, row + d4, (size_t)(jb->d - d4) * 2);
            vst1q_f32(out + d4, widen4_neon(tail, jb->bf16));
        }
        for (int i = (jb->d + 3) & ~3; i < jb->dp; i += 4) vst1q_f32(out + i, vdupq_n_f32(0.f));
    }
}

/* 4 vectors -> one vector of their 4 sums */
static inline float32x4_t sum4_neon(const float32x4_t *a) {
    return vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]));
}

__attribute__((always_inline)) static inline void pv_neon(const float *sc, int C, const float *vf, int dp, int cn,
                                                           float *acc, int nh, int nv) {
    float32x4_t r[4][4];
    for (int t = 0; t < nh; t++)
        for (int u = 0; u < nv; u++) r[t][u] = vld1q_f32(acc + (size_t)t * dp + 4 * u);
    for (int j = 0; j < cn; j++) {
        float32x4_t x[4];
        for (int u = 0; u < nv; u++) x[u] = vld1q_f32(vf + (size_t)j * dp + 4 * u);
        for (int t = 0; t < nh; t++) {
            const float p = sc[(size_t)t * C + j];
            for (int u = 0; u < nv; u++) r[t][u] = vfmaq_n_f32(r[t][u], x[u], p);
        }
    }
    for (int t = 0; t < nh; t++)
        for (int u = 0; u < nv; u++) vst1q_f32(acc + (size_t)t * dp + 4 * u, r[t][u]);
}

static void pv_tile_neon(const float *sc, int C, const float *vf, int dp, int cn, float *acc, int nh, int nv) {
    switch (nh * 2 + nv / 2 - 1) { /* nv: 2 or 4 */
    case 2: pv_neon(sc, C, vf, dp, cn, acc, 1, 2); break;
    case 3: pv_neon(sc, C, vf, dp, cn, acc, 1, 4); break;
    case 4: pv_neon(sc, C, vf, dp, cn, acc, 2, 2); break;
    case 5: pv_neon(sc, C, vf, dp, cn, acc, 2, 4); break;
    case 6: pv_neon(sc, C, vf, dp, cn, acc, 3, 2); break;
    case 7: pv_neon(sc, C, vf, dp, cn, acc, 3, 4); break;
    case 8: pv_neon(sc, C, vf, dp, cn, acc, 4, 2); break;
    default: pv_neon(sc, C, vf, dp, cn, acc, 4, 4); break;
    }
}

static void segment_neon(const job *jb, int64_t head, int64_t a, int64_t b, float *part, float *scratch) {
    const int C = jb->chunk, dp = jb->dp, g = jb->g;
    const uint16_t *k = jb->k + head * jb->head_stride, *v = jb->v + head * jb->head_stride;
    const float *q = jb->q + (size_t)head * g * dp;
    float *kf = scratch, *vf = kf + (size_t)C * dp, *sc = vf + (size_t)C * dp;
    float *m = part, *l = part + g, *acc = part + 2 * g;
    part_init(jb, part);
    for (int64_t c0 = a; c0 < b; c0 += C) {
        const int cn = b - c0 < C ? (int)(b - c0) : C, cn4 = (cn + 3) & ~3;
        widen_neon(jb, k, c0, cn, kf);
        memset(kf + (size_t)cn * dp, 0, (size_t)(cn4 - cn) * dp * sizeof(float));
        widen_neon(jb, v, c0, cn, vf);
        for (int h = 0; h < g; h++) {
            const float *qh = q + (size_t)h * dp;
            float *sh = sc + (size_t)h * C;
            float32x4_t top4 = vdupq_n_f32(-INFINITY);
            for (int j0 = 0; j0 < cn4; j0 += 4) {
                float32x4_t s[4];
                for (int t = 0; t < 4; t++) s[t] = vdupq_n_f32(0.f);
                for (int i = 0; i < dp; i += 4) {
                    const float32x4_t qv = vld1q_f32(qh + i);
                    for (int t = 0; t < 4; t++) s[t] = vfmaq_f32(s[t], qv, vld1q_f32(kf + (size_t)(j0 + t) * dp + i));
                }
                float32x4_t block = sum4_neon(s);
                if (j0 + 4 > cn) {
                    const int32_t lanes[4] = {0, 1, 2, 3};
                    const uint32x4_t past = vcgtq_s32(vld1q_s32(lanes), vdupq_n_s32(cn - j0 - 1));
                    block = vbslq_f32(past, vdupq_n_f32(-INFINITY), block);
                }
                vst1q_f32(sh + j0, block);
                top4 = vmaxq_f32(top4, block);
            }
            const float top = vmaxvq_f32(top4);
            keep_scores(jb, head, h, c0, cn, sh);
            if (top > m[h]) rescale(jb, part, h, top);
            const float32x4_t mh = vdupq_n_f32(m[h]);
            float32x4_t sum = vdupq_n_f32(0.f);
            for (int j0 = 0; j0 < cn4; j0 += 4) {
                const float32x4_t p = exp_neg_neon(vsubq_f32(vld1q_f32(sh + j0), mh));
                vst1q_f32(sh + j0, p);
                sum = vaddq_f32(sum, p);
            }
            l[h] += vaddvq_f32(sum);
        }
        for (int h0 = 0; h0 < g; h0 += 4) {
            const int nh = g - h0 < 4 ? g - h0 : 4;
            for (int i = 0; i < dp; i += 16) {
                const int nv = dp - i < 16 ? 2 : 4;
                pv_tile_neon(sc + (size_t)h0 * C, C, vf + i, dp, cn, acc + (size_t)h0 * dp + i, nh, nv);
            }
        }
    }
}
#endif

/* ---------------------------------------------------------------------------------------------- */
/* the shared driver */

static int probe_paths(void) {
    int paths = 1 << LEVEL_SCALAR;
#ifdef A16_X86
    if (have_avx2()) paths |= 1 << LEVEL_AVX2;
#endif
#ifdef A16_NEON
    paths |= 1 << LEVEL_NEON;
#endif
    return paths;
}

/* Bit `level` set for each path this build and CPU run (bit 1, scalar, always); probed once. */
int longdoc_attn16_paths(void) {
    static int known = 0;
    return probed_once(&known, probe_paths);
}

/* Every CPU runs the scalar path. */
int longdoc_attn16_supported(void) { return 1; }

/* The path `level` takes here: itself where it runs, the best that runs for 0, else -1. */
int longdoc_attn16_level(int level) {
    const int paths = longdoc_attn16_paths();
    if (level == LEVEL_BEST) {
        for (int l = LEVEL_NEON; l > LEVEL_SCALAR; l--)
            if (paths & (1 << l)) return l;
        return LEVEL_SCALAR;
    }
    return level > 0 && level <= LEVEL_NEON && (paths & (1 << level)) ? level : -1;
}

static segment_fn path_fn(int level) {
    switch (level) {
#ifdef A16_X86
    case LEVEL_AVX2: return segment_avx2;
#endif
#ifdef A16_NEON
    case LEVEL_NEON: return segment_neon;
#endif
    default: return segment_scalar;
    }
}

/* Attention of one query row per query head over keys 0..n_keys-1 of the 16-bit caches k and v
   (the format above), on `threads` OpenMP threads, on path `level` (0: the best here). Returns 0,
   1 for an input it can't take (d outside 1..256, heads that don't divide, a negative count or
   stride, a missing pointer, a non-finite scale) or a path that doesn't run here, 2 when out of
   memory. Its scratch is its own: calls from several threads don't share state. */
int longdoc_attn16_scored(const float *q, int n_q_heads, int n_kv_heads, int d, const void *k, const void *v,
                          int kv_is_bf16, int64_t head_stride, int64_t row_stride, int64_t n_keys, float scale,
                          float *out, float *lse, int threads, int level, float *scores, int64_t scores_stride);

int longdoc_attn16(const float *q, int n_q_heads, int n_kv_heads, int d, const void *k, const void *v,
                   int kv_is_bf16, int64_t head_stride, int64_t row_stride, int64_t n_keys, float scale,
                   float *out, float *lse, int threads, int level) {
    return longdoc_attn16_scored(q, n_q_heads, n_kv_heads, d, k, v, kv_is_bf16, head_stride, row_stride, n_keys,
                                 scale, out, lse, threads, level, NULL, 0);
}

/* longdoc_attn16, and where scores isn't NULL each key's scaled score q'.k_j as the path computed it
   (the s_j above): query head h's at scores[h * scores_stride + j], j < n_keys (with lse, the
   softmax's log-probabilities: recycled decoding ranks the keys by them). */
int longdoc_attn16_scored(const float *q, int n_q_heads, int n_kv_heads, int d, const void *k, const void *v,
                          int kv_is_bf16, int64_t head_stride, int64_t row_stride, int64_t n_keys, float scale,
                          float *out, float *lse, int threads, int level, float *scores, int64_t scores_stride) {
    if (d < 1 || d > MAX_D || n_kv_heads < 1 || n_q_heads < n_kv_heads || n_q_heads % n_kv_heads != 0) return 1;
    if (n_keys < 0 || row_stride < d || head_stride < 0 || !isfinite(scale)) return 1;
    if (scores && scores_stride < n_keys) return 1;
    if (!q || !out || !lse || (n_keys > 0 && (!k || !v))) return 1;
    const int path = longdoc_attn16_level(level);
    if (path < 0) return 1;
    const int g = n_q_heads / n_kv_heads;
    if (n_keys == 0) {
        memset(out, 0, (size_t)n_q_heads * (size_t)d * sizeof(float));
        for (int h = 0; h < n_q_heads; h++) lse[h] = -INFINITY;
        return 0;
    }
    const int dp = (d + 7) & ~7;
    const int chunk = dp <= 64 ? 64 : (dp <= 128 ? 32 : 16);
    int64_t seg = (n_keys + SEG_COUNT - 1) / SEG_COUNT;
    seg = seg < SEG_MIN ? SEG_MIN : (seg + 63) & ~(int64_t)63;
    const int64_t nseg = (n_keys + seg - 1) / seg, units = n_kv_heads * nseg;
    job jb = {NULL, k, v, kv_is_bf16 != 0, g, d, dp, chunk, head_stride, row_stride, n_keys, scores, scores_stride};
    const size_t part_floats = PART_FLOATS(&jb);
    float *qs = malloc(((size_t)n_q_heads * dp + (size_t)units * part_floats) * sizeof(float));
    if (!qs) return 2;
    float *parts = qs + (size_t)n_q_heads * dp;
    for (int h = 0; h < n_q_heads; h++)
        for (int i = 0; i < dp; i++) qs[(size_t)h * dp + i] = i < d ? q[(size_t)h * d + i] * scale : 0.f;
    jb.q = qs;
    const segment_fn fn = path_fn(path);
    const size_t scratch_floats = (size_t)chunk * (2 * (size_t)dp + (size_t)g);
    int nt = threads > 0 ? threads : 1;
    nt = nt < units ? nt : (int)units;
#ifndef _OPENMP
    (void)nt;
#endif
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        float *scratch = malloc(scratch_floats * sizeof(float));
        if (!scratch) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            if (!scratch) continue;
            const int64_t head = u / nseg, s = u % nseg, a = s * seg, b = a + seg < n_keys ? a + seg : n_keys;
            fn(&jb, head, a, b, parts + (size_t)u * part_floats, scratch);
        }
        free(scratch);
    }
    if (failed) {
        free(qs);
        return 2;
    }
    /* the segments of each KV head, merged in order */
    for (int j = 0; j < n_kv_heads; j++) {
        const float *first = parts + (size_t)j * nseg * part_floats;
        for (int t = 0; t < g; t++) {
            const int h = j * g + t;
            float top = -INFINITY;
            for (int64_t s = 0; s < nseg; s++) {
                const float ms = first[s * part_floats + t];
                top = ms > top ? ms : top;
            }
            float total = 0.f, *o = out + (size_t)h * d;
            memset(o, 0, (size_t)d * sizeof(float));
            for (int64_t s = 0; s < nseg; s++) {
                const float *p = first + s * part_floats;
                const float w = exp_neg(p[t] - top), *acc = p + 2 * g + (size_t)t * dp;
                total += w * p[g + t];
                for (int i = 0; i < d; i++) o[i] += w * acc[i];
            }
            for (int i = 0; i < d; i++) o[i] = o[i] / total;
            lse[h] = top + logf(total);
        }
    }
    free(qs);
    return 0;
}
