/* Prefill attention with its log-sum-exp on 16-bit integer products (float32 in and out), on any CPU.

   Built once per machine by longdoc/native/__init__.py (cc -O3 -shared, with -fopenmp where the
   compiler links it) and called through ctypes (longdoc/native/flash16.py). Like q8.c it needs no
   instruction set to build or run: the scalar loop is plain C, the AVX2 loop sits in functions
   compiled for AVX2 (target attributes) and is picked at run time by a CPU probe.

   Why integers: on AVX2 CPUs a float32 multiply-add retires 8 products per instruction and
   vpmaddwd 16 (int16 pairs summed into int32): the instruction-rate ceiling is about 1.6x higher
   (benchmarks/HISTORY.md, ninth session), and torch's float32 flash kernel reaches about half of the
   FMA rate on the model's shapes (benchmarks/HISTORY.md, tenth session).
   flash.c is the AVX-512 BF16 counterpart; this file follows its tiling.

   Arithmetic (every path the same float operations, in the same order: the paths give the same bits):
     q and k first get per-channel factors (q's channel i times f_i, k's times 1 / f_i, per call and KV
     head: channel_factors), so q.k is unchanged and a channel large in every key (the model's key
     biases) does not coarsen the others' steps. Then q rows are quantized per row to int16 in
     [-QMAX, QMAX] (scale max|q| / QMAX, times `scale` log2 e), k rows per key to [-KMAX, KMAX]; a
     score, in log2 units, is the exact int32 dot product times the two scales: d * QMAX * KMAX < 2^31
     for d <= 256, so no sum overflows. 12 and 11 bits: per element an error of at most half a step of
     the row's largest magnitude.
     Softmax is online, per block of KB keys and query row, in float32: m' = max(m, block max); where
     it grew, the row's sums l and output o are multiplied by 2^(m - m'); e = 2^(t - m'), l += e
     (8 partial sums, lane = key % 8).
     v rows are quantized per key to [-VMAX, VMAX]; their scales are folded into the probabilities,
     p' = e * v scale, which are quantized per block and row to [0, PMAX] (scale max p' / PMAX), so
     o += p' scale * (the exact int32 sum of p'q * vq over the block): KB * PMAX * VMAX < 2^31.
     out = o / l, lse = m ln 2 + log(l); 2^t is a degree-5 polynomial (exp2_neg), 0 below 2^-127.
   The tolerance of tests/test_flash16.py follows from those steps.

   Layout: q (B, H, Lq, D) and k, v (B, Hkv, Lk, D) by strides (elements; the last dimension
   contiguous), k and v float32 or float16 (a 16-bit KV cache, read as stored); D even, up to 256.
   Per (batch, KV head) the keys are quantized and packed once per call in blocks of KB:
     K block: [D/2][KB] int16 pairs (k[key][2j], k[key][2j+1]): one register holds 8 keys' pair j;
     V block: [KB/2][D] int16 pairs (v[2i][c], v[2i+1][c]): one register holds 8 columns of 2 keys;
   with a float scale per key. Work items are (batch, KV head, tile of TQ queries), a tile holding its
   queries for all G query heads of the KV head, run by OpenMP threads, costliest (causal) first.

   Paths (the `level` argument; 0 takes the best this CPU runs): 1 scalar, any CPU; 2 AVX2, x86 with
   AVX2, FMA and F16C (score tiles of 4 rows x 16 keys, output tiles of 4 rows x 16 columns, int32
   accumulators in registers). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "halves.h" /* 16-bit float conversions, EXP_MAGIC, the AVX2 probe */

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define F16_X86 1
#endif

#define KB 64 /* keys per block */
#define TQ 16 /* queries per tile */
#define MR 4  /* rows per micro-kernel */
#define QMAX 4095
#define KMAX 2047
#define VMAX 4095
#define PMAX 8191
#define MAX_D 256
#define LOG2E 1.44269504088896341f

#define LEVEL_BEST 0
#define LEVEL_SCALAR 1
#define LEVEL_AVX2 2

typedef struct {
    const float *q;
    const void *k, *v; /* float32, or float16 with kv_half */
    int kv_half;
    int64_t qs[3], ks[3], vs[3]; /* strides of batch, head, position (elements) */
    float *out, *lse;
    int64_t b, h, hkv, lq, lk, d;
    int causal;
    float scale;
} Problem;

/* Per-thread scratch of one tile: rows = G * TQ query rows. */
typedef struct {
    int16_t *qt; /* rows x d quantized queries */
    float *qsc;  /* rows: query scale times the softmax scale */
    float *s;    /* rows x KB scores (log2 units) */
    int16_t *p;  /* rows x KB quantized probabilities */
    float *psc;  /* rows: their scales */
    float *o;    /* rows x d output sums */
    float *m;    /* rows: running maxima */
    float *l;    /* rows x 8: partial sums of the probabilities */
    int *valid;  /* rows: the real keys of the block in hand */
} Scratch;

/* 2^t for t <= 0: 2^n * 2^f with n = round(t) (adding and taking away EXP_MAGIC rounds to an integer),
   f in [-1/2, 1/2], 2^f by its Taylor series to degree 5 (relative error below 3e-6: the probabilities
   then take 13-bit codes); t is clamped to -127, where the factor 2^n is 0. */
#define EXP2_FLOOR -127.f
#define EXP2_C5 1.3333558146428443e-3f /* ln2^5 / 5! */
#define EXP2_C4 9.6181291076284772e-3f
#define EXP2_C3 5.5504108664821580e-2f
#define EXP2_C2 2.4022650695910071e-1f
#define EXP2_C1 6.9314718055994531e-1f
#define LN2 0.69314718055994531f
static inline float exp2_neg(float t) {
    t = t > EXP2_FLOOR ? t : EXP2_FLOOR;
    const float n = (t + EXP_MAGIC) - EXP_MAGIC, f = t - n;
    float y = fmaf(EXP2_C5, f, EXP2_C4);
    y = fmaf(y, f, EXP2_C3);
    y = fmaf(y, f, EXP2_C2);
    y = fmaf(y, f, EXP2_C1);
    y = fmaf(y, f, 1.f);
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two;
    memcpy(&two, &bits, 4);
    return y * two;
}

static inline float kv_at(const Problem *pr, const void *base, int64_t i) {
    return pr->kv_half ? half_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline float value_at(const Problem *pr, const void *base, int is_kv, int64_t i) {
    return is_kv ? kv_at(pr, base, i) : ((const float *)base)[i];
}

/* The d values at `first` of q (is_kv 0) or of k or v, each times its channel's factor `mul` (NULL: 1)
   -> codes in [-top, top] written `step` int16 apart from `dst`; returns the scale. */
static float quantize(const Problem *pr, const void *base, int64_t first, int is_kv, const float *mul, int64_t d,
                      int top, int16_t *dst, int64_t step) {
    float x[MAX_D], amax = 0.f;
    for (int64_t i = 0; i < d; i++) {
        x[i] = value_at(pr, base, is_kv, first + i) * (mul ? mul[i] : 1.f);
        const float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.f ? (float)top / amax : 0.f;
    for (int64_t i = 0; i < d; i++) {
        long c = lrintf(x[i] * inv);
        c = c > top ? top : (c < -top ? -top : c);
        dst[i * step] = (int16_t)c;
    }
    return amax / (float)top;
}

/* The channel factors of one (batch, KV head), f_i = sqrt(max|k_i| / max|q_i|) over the call's keys and
   the queries of the KV head's query heads (1 where either is 0): qf = f, kf = 1 / f (d each). */
static void channel_factors(const Problem *pr, int64_t bi, int64_t kh, float *qf, float *kf) {
    const int64_t d = pr->d, g = pr->h / pr->hkv;
    float qa[MAX_D], ka[MAX_D];
    for (int64_t i = 0; i < d; i++) qa[i] = ka[i] = 0.f;
    for (int64_t gi = 0; gi < g; gi++)
        for (int64_t t = 0; t < pr->lq; t++) {
            const float *row = pr->q + bi * pr->qs[0] + (kh * g + gi) * pr->qs[1] + t * pr->qs[2];
            for (int64_t i = 0; i < d; i++) qa[i] = fabsf(row[i]) > qa[i] ? fabsf(row[i]) : qa[i];
        }
    for (int64_t t = 0; t < pr->lk; t++) {
        const int64_t first = bi * pr->ks[0] + kh * pr->ks[1] + t * pr->ks[2];
        for (int64_t i = 0; i < d; i++) {
            const float a = fabsf(kv_at(pr, pr->k, first + i));
            ka[i] = a > ka[i] ? a : ka[i];
        }
    }
    for (int64_t i = 0; i < d; i++) {
        const float f = qa[i] > 0.f && ka[i] > 0.f ? sqrtf(ka[i] / qa[i]) : 1.f;
        qf[i] = isfinite(f) && f > 0.f ? f : 1.f;
        kf[i] = 1.f / qf[i];
    }
}

/* Keys k0 .. k0 + n - 1 of one (batch, KV head) -> one packed K block and V block (zero past n) and
   their scales (0 past n). */
static void pack_block(const Problem *pr, int64_t bi, int64_t kh, int64_t k0, int64_t n, const float *kf,
                       int16_t *kp, int16_t *vp, float *ksc, float *vsc) {
    const int64_t d = pr->d;
    memset(kp, 0, (size_t)(KB * d) * sizeof(int16_t));
    memset(vp, 0, (size_t)(KB * d) * sizeof(int16_t));
    for (int64_t c = 0; c < KB; c++) ksc[c] = vsc[c] = 0.f;
    for (int64_t c = 0; c < n; c++) {
        const int64_t key = k0 + c;
        /* K: element 2j + e of key c at word j * KB + c, half e */
        int16_t row[MAX_D];
        ksc[c] = quantize(pr, pr->k, bi * pr->ks[0] + kh * pr->ks[1] + key * pr->ks[2], 1, kf, d, KMAX, row, 1);
        for (int64_t j = 0; j < d / 2; j++) {
            kp[(j * KB + c) * 2] = row[2 * j];
            kp[(j * KB + c) * 2 + 1] = row[2 * j + 1];
        }
        /* V: element i of key c at word (c / 2) * d + i, half c % 2 */
        vsc[c] = quantize(pr, pr->v, bi * pr->vs[0] + kh * pr->vs[1] + key * pr->vs[2], 1, NULL, d, VMAX,
                          vp + (c / 2) * d * 2 + (c % 2), 2);
    }
}

/* ---- scalar path ---- */

/* The exact int32 sum over n pairs: a's pair i (a[2i], a[2i+1]) times b's word i (`stride` words apart). */
static inline int32_t pair_dot(const int16_t *a, const int16_t *b, int64_t stride, int64_t n) {
    int32_t acc = 0;
    for (int64_t i = 0; i < n; i++)
        acc += (int32_t)a[2 * i] * b[i * stride * 2] + (int32_t)a[2 * i + 1] * b[i * stride * 2 + 1];
    return acc;
}

/* s (MR x KB) = the rows q (MR x d codes) against the packed key block: exact dots times the scales. */
static void scores_scalar(const int16_t *q, const float *qsc, int64_t d, const int16_t *kp, const float *ksc,
                          float *s) {
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < KB; c++)
            s[r * KB + c] = (float)pair_dot(q + r * d, kp + 2 * c, KB, d / 2) * (ksc[c] * qsc[r]);
}

/* Columns [c0, d) of o (MR x d) += each row's probability scale times the exact sums of its codes p
   (MR x KB) against the packed value block. */
static void value_columns(const int16_t *p, const float *psc, int64_t d, const int16_t *vp, float *o, int64_t c0) {
    for (int r = 0; r < MR; r++)
        for (int64_t c = c0; c < d; c++)
            o[r * d + c] = fmaf(psc[r], (float)pair_dot(p + r * KB, vp + 2 * c, d, KB / 2), o[r * d + c]);
}

static void values_scalar(const int16_t *p, const float *psc, int64_t d, const int16_t *vp, float *o) {
    value_columns(p, psc, d, vp, o, 0);
}

/* The block's largest score among its first `valid`, and where it exceeds the row's maximum m, the
   rescaling of the row's sums l (8) and output o (d) by exp(m - m'): shared by the paths (scalar
   code, a few operations per row and block). Returns the new maximum. */
static float raise_max(float block_max, float m, float *l, float *o, int64_t d) {
    if (!(block_max > m)) return m;
    const float alpha = m == -INFINITY ? 0.f : exp2_neg(m - block_max);
    for (int i = 0; i < 8; i++) l[i] *= alpha;
    for (int64_t c = 0; c < d; c++) o[c] *= alpha;
    return block_max;
}

/* One row's softmax step over a block of scores s (its first `valid` keys real): the maximum, l's
   partial sums, the quantized probabilities p (zero past `valid`) and their scale. */
static inline void softmax_row_scalar(const float *s, int valid, const float *vsc, float *m, float *l, float *o,
                                      int64_t d,
                           int16_t *p, float *psc) {
    if (valid <= 0) {
        memset(p, 0, KB * sizeof(int16_t));
        *psc = 0.f;
        return;
    }
    float top = -INFINITY;
    for (int c = 0; c < valid; c++) top = s[c] > top ? s[c] : top;
    *m = raise_max(top, *m, l, o, d);
    float e[KB], pmax = 0.f;
    for (int c = 0; c < KB; c++) {
        e[c] = c < valid ? exp2_neg(s[c] - *m) : 0.f;
        l[c % 8] += e[c];
        e[c] *= vsc[c];
        pmax = e[c] > pmax ? e[c] : pmax;
    }
    const float inv = pmax > 0.f ? (float)PMAX / pmax : 0.f;
    for (int c = 0; c < KB; c++) p[c] = (int16_t)lrintf(e[c] * inv);
    *psc = pmax / (float)PMAX;
}

/* The softmax step of `rows` rows over one block: row r's scores s + r * KB, its first valid[r] keys real. */
#define SOFTMAX_BLOCK(name, row_fn, attr)                                                                        \
    attr static void name(const float *s, int64_t rows, const int *valid, const float *vsc, float *m, float *l,  \
                          float *o, int64_t d, int16_t *p, float *psc) {                                         \
        for (int64_t r = 0; r < rows; r++)                                                                       \
            row_fn(s + r * KB, valid[r], vsc, m + r, l + r * 8, o + r * d, d, p + r * KB, psc + r);              \
    }
SOFTMAX_BLOCK(softmax_scalar, softmax_row_scalar, )

/* ---- AVX2 path ---- */
#ifdef F16_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* d[2r + h] += the int32 pair sums of row r of a (4 rows of int16 pairs, `arow` bytes apart) against
   8 columns h of b (`bstep` bytes per pair), over `steps` pairs: d (8 registers) = a (4 x steps) . b
   (steps x 16). Assembly: GCC and clang copy every accumulator once per step in C (one extra
   instruction per product). */
AVX2 static inline void dot4x16_avx2(const int32_t *a, int64_t arow, const int32_t *b, int64_t bstep, int64_t steps,
                                     __m256i d[8]) {
    __m256i d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3], d4 = d[4], d5 = d[5], d6 = d[6], d7 = d[7];
    __m256i w0, w1, bc, p; /* one product register: renaming gives each product its own */
    const int64_t s3 = 3 * arow;
    __asm__("1:\n\t"
            "vmovdqu (%[bp]), %[w0]\n\t"
            "vmovdqu 32(%[bp]), %[w1]\n\t"
            "vpbroadcastd (%[ap]), %[bc]\n\t"
            "vpmaddwd %[bc], %[w0], %[p]\n\t"
            "vpaddd %[p], %[d0], %[d0]\n\t"
            "vpmaddwd %[bc], %[w1], %[p]\n\t"
            "vpaddd %[p], %[d1], %[d1]\n\t"
            "vpbroadcastd (%[ap],%[s1]), %[bc]\n\t"
            "vpmaddwd %[bc], %[w0], %[p]\n\t"
            "vpaddd %[p], %[d2], %[d2]\n\t"
            "vpmaddwd %[bc], %[w1], %[p]\n\t"
            "vpaddd %[p], %[d3], %[d3]\n\t"
            "vpbroadcastd (%[ap],%[s1],2), %[bc]\n\t"
            "vpmaddwd %[bc], %[w0], %[p]\n\t"
            "vpaddd %[p], %[d4], %[d4]\n\t"
            "vpmaddwd %[bc], %[w1], %[p]\n\t"
            "vpaddd %[p], %[d5], %[d5]\n\t"
            "vpbroadcastd (%[ap],%[s3]), %[bc]\n\t"
            "vpmaddwd %[bc], %[w0], %[p]\n\t"
            "vpaddd %[p], %[d6], %[d6]\n\t"
            "vpmaddwd %[bc], %[w1], %[p]\n\t"
            "vpaddd %[p], %[d7], %[d7]\n\t"
            "add %[bstep], %[bp]\n\t"
            "add $4, %[ap]\n\t"
            "dec %[steps]\n\t"
            "jnz 1b\n\t"
            : [d0] "+x"(d0), [d1] "+x"(d1), [d2] "+x"(d2), [d3] "+x"(d3), [d4] "+x"(d4), [d5] "+x"(d5), [d6] "+x"(d6),
              [d7] "+x"(d7), [w0] "=&x"(w0), [w1] "=&x"(w1), [bc] "=&x"(bc), [p] "=&x"(p), [bp] "+r"(b),
              [ap] "+r"(a), [steps] "+r"(steps)
            : [s1] "r"(arow), [s3] "r"(s3), [bstep] "r"(bstep)
            : "memory", "cc");
    d[0] = d0, d[1] = d1, d[2] = d2, d[3] = d3, d[4] = d4, d[5] = d5, d[6] = d6, d[7] = d7;
}

AVX2 static void scores_avx2(const int16_t *q, const float *qsc, int64_t d, const int16_t *kp, const float *ksc,
                             float *s) {
    const int32_t *k32 = (const int32_t *)kp;
    for (int c0 = 0; c0 < KB; c0 += 16) {
        __m256i acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_si256();
        dot4x16_avx2((const int32_t *)q, d * 2, k32 + c0, KB * 4, d / 2, acc);
        for (int r = 0; r < MR; r++) {
            const __m256 qs = _mm256_set1_ps(qsc[r]);
            for (int h = 0; h < 2; h++) {
                const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(ksc + c0 + 8 * h), qs);
                _mm256_storeu_ps(s + r * KB + c0 + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[2 * r + h]), sc));
            }
        }
    }
}

AVX2 static void values_avx2(const int16_t *p, const float *psc, int64_t d, const int16_t *vp, float *o) {
    const int32_t *v32 = (const int32_t *)vp;
    int64_t c0 = 0;
    for (; c0 + 16 <= d; c0 += 16) {
        __m256i acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_si256();
        dot4x16_avx2((const int32_t *)p, KB * 2, v32 + c0, d * 4, KB / 2, acc);
        for (int r = 0; r < MR; r++) {
            const __m256 ps = _mm256_set1_ps(psc[r]);
            for (int h = 0; h < 2; h++) {
                float *dst = o + r * d + c0 + 8 * h;
                _mm256_storeu_ps(dst, _mm256_fmadd_ps(ps, _mm256_cvtepi32_ps(acc[2 * r + h]), _mm256_loadu_ps(dst)));
            }
        }
    }
    /* the last columns when d is not a multiple of 16: the scalar sums (exact, so the same bits) */
    value_columns(p, psc, d, vp, o, c0);
}

/* exp2_neg on 8 lanes: the same operations. */
AVX2 static inline __m256 exp2_neg_avx2(__m256 t) {
    t = _mm256_max_ps(t, _mm256_set1_ps(EXP2_FLOOR));
    const __m256 magic = _mm256_set1_ps(EXP_MAGIC);
    const __m256 n = _mm256_sub_ps(_mm256_add_ps(t, magic), magic), f = _mm256_sub_ps(t, n);
    __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(EXP2_C5), f, _mm256_set1_ps(EXP2_C4));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(EXP2_C3));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(EXP2_C2));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(EXP2_C1));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

AVX2 static inline float hmax_avx2(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

AVX2 static inline void softmax_row_avx2(const float *s, int valid, const float *vsc, float *m, float *l, float *o,
                                         int64_t d,
                              int16_t *p, float *psc) {
    if (valid <= 0) {
        memset(p, 0, KB * sizeof(int16_t));
        *psc = 0.f;
        return;
    }
    const __m256 neg = _mm256_set1_ps(-INFINITY);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), left = _mm256_set1_epi32(valid);
    __m256 x[KB / 8];
    __m256 top = neg;
    for (int c = 0; c < KB / 8; c++) {
        x[c] = _mm256_loadu_ps(s + 8 * c);
        if (valid < KB) { /* a block's last keys, or a causal tile's diagonal */
            const __m256i keep = _mm256_cmpgt_epi32(left, _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * c)));
            x[c] = _mm256_blendv_ps(neg, x[c], _mm256_castsi256_ps(keep));
        }
        top = _mm256_max_ps(top, x[c]);
    }
    *m = raise_max(hmax_avx2(top), *m, l, o, d);
    const __m256 mv = _mm256_set1_ps(*m);
    __m256 sum = _mm256_loadu_ps(l), pmax = _mm256_setzero_ps();
    for (int c = 0; c < KB / 8; c++) {
        /* masked lanes: 2^-inf clamps to 2^-127, whose factor 2^n is 0 */
        const __m256 e = exp2_neg_avx2(_mm256_sub_ps(x[c], mv));
        sum = _mm256_add_ps(sum, e);
        x[c] = _mm256_mul_ps(e, _mm256_loadu_ps(vsc + 8 * c));
        pmax = _mm256_max_ps(pmax, x[c]);
    }
    _mm256_storeu_ps(l, sum);
    const float most = hmax_avx2(pmax);
    const __m256 inv = _mm256_set1_ps(most > 0.f ? (float)PMAX / most : 0.f);
    for (int c = 0; c < KB / 8; c += 2) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(x[c], inv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(x[c + 1], inv));
        _mm256_storeu_si256((__m256i *)(p + 8 * c), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
    *psc = most / (float)PMAX;
}

SOFTMAX_BLOCK(softmax_avx2, softmax_row_avx2, AVX2)
#endif

typedef void (*scores_fn)(const int16_t *, const float *, int64_t, const int16_t *, const float *, float *);
typedef void (*values_fn)(const int16_t *, const float *, int64_t, const int16_t *, float *);
typedef void (*softmax_fn)(const float *, int64_t, const int *, const float *, float *, float *, float *, int64_t,
                           int16_t *, float *);

typedef struct {
    scores_fn scores;
    values_fn values;
    softmax_fn softmax;
} Path;

/* One work item: queries [q0, q0 + TQ) of every query head reading KV head `kh` of batch `bi`. */
static void tile(const Problem *pr, const Path *path, int64_t bi, int64_t kh, int64_t q0, const int16_t *kpack,
                 const int16_t *vpack, const float *kscale, const float *vscale, const float *qf, Scratch *w) {
    const int64_t g = pr->h / pr->hkv, d = pr->d, rows = g * TQ;
    const int64_t nq = pr->lq - q0 < TQ ? pr->lq - q0 : TQ;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t gi = r / TQ, t = r % TQ;
        if (t < nq)
            w->qsc[r] = quantize(pr, pr->q, bi * pr->qs[0] + (kh * g + gi) * pr->qs[1] + (q0 + t) * pr->qs[2], 0, qf,
                                 d, QMAX, w->qt + r * d, 1) *
                        (pr->scale * LOG2E);
        else {
            memset(w->qt + r * d, 0, (size_t)d * sizeof(int16_t));
            w->qsc[r] = 0.f;
        }
        w->m[r] = -INFINITY;
    }
    memset(w->o, 0, (size_t)(rows * d) * sizeof(float));
    memset(w->l, 0, (size_t)(rows * 8) * sizeof(float));
    int64_t kend = pr->lk;
    if (pr->causal) kend = q0 + nq < kend ? q0 + nq : kend; /* keys past the tile's last query are masked */
    const int64_t nvisit = (kend + KB - 1) / KB;
    for (int64_t blk = 0; blk < nvisit; blk++) {
        const int16_t *kp = kpack + blk * KB * d, *vp = vpack + blk * KB * d;
        const float *ksc = kscale + blk * KB, *vsc = vscale + blk * KB;
        const int64_t k0 = blk * KB;
        for (int64_t r = 0; r < rows; r += MR) path->scores(w->qt + r * d, w->qsc + r, d, kp, ksc, w->s + r * KB);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t t = r % TQ;
            int64_t valid = pr->lk - k0;
            if (pr->causal && q0 + t - k0 + 1 < valid) valid = q0 + t - k0 + 1;
            if (t >= nq) valid = 0;
            w->valid[r] = (int)(valid > KB ? KB : valid);
        }
        path->softmax(w->s, rows, w->valid, vsc, w->m, w->l, w->o, d, w->p, w->psc);
        for (int64_t r = 0; r < rows; r += MR) path->values(w->p + r * KB, w->psc + r, d, vp, w->o + r * d);
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t gi = r / TQ, t = r % TQ;
        if (t >= nq) continue;
        const int64_t row = (bi * pr->h + kh * g + gi) * pr->lq + q0 + t;
        const float *l = w->l + r * 8;
        const float total = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t c = 0; c < d; c++) pr->out[row * d + c] = w->o[r * d + c] * inv;
        pr->lse[row] = total > 0.f ? w->m[r] * LN2 + logf(total) : -INFINITY;
    }
}

static int run(const Problem *pr, const Path *path, int threads) {
    const int64_t d = pr->d, g = pr->h / pr->hkv;
    const int64_t nblocks = (pr->lk + KB - 1) / KB, heads = pr->b * pr->hkv;
    const size_t codes = (size_t)(heads * nblocks * KB * d), keys = (size_t)(heads * nblocks * KB);
    int16_t *kpack = malloc(codes * sizeof(int16_t)), *vpack = malloc(codes * sizeof(int16_t));
    float *kscale = malloc(keys * sizeof(float)), *vscale = malloc(keys * sizeof(float));
    float *factors = malloc((size_t)(heads * 2 * d) * sizeof(float)); /* per head: q's d, then k's d */
    if (!kpack || !vpack || !kscale || !vscale || !factors) {
        free(kpack);
        free(vpack);
        free(kscale);
        free(vscale);
        free(factors);
        return 2;
    }
#ifndef _OPENMP
    (void)threads;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t hd = 0; hd < heads; hd++)
        channel_factors(pr, hd / pr->hkv, hd % pr->hkv, factors + hd * 2 * d, factors + hd * 2 * d + d);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < heads * nblocks; item++) {
        const int64_t hd = item / nblocks, blk = item % nblocks;
        const int64_t k0 = blk * KB, n = pr->lk - k0 < KB ? pr->lk - k0 : KB;
        pack_block(pr, hd / pr->hkv, hd % pr->hkv, k0, n, factors + hd * 2 * d + d, kpack + item * KB * d,
                   vpack + item * KB * d, kscale + item * KB, vscale + item * KB);
    }
    const int64_t tiles = (pr->lq + TQ - 1) / TQ, rows = g * TQ;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        Scratch w = {malloc((size_t)(rows * d) * sizeof(int16_t)), malloc((size_t)rows * sizeof(float)),
                     malloc((size_t)(rows * KB) * sizeof(float)),  malloc((size_t)(rows * KB) * sizeof(int16_t)),
                     malloc((size_t)rows * sizeof(float)),         malloc((size_t)(rows * d) * sizeof(float)),
                     malloc((size_t)rows * sizeof(float)),         malloc((size_t)(rows * 8) * sizeof(float)),
                     malloc((size_t)rows * sizeof(int))};
        if (!w.qt || !w.qsc || !w.s || !w.p || !w.psc || !w.o || !w.m || !w.l || !w.valid) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < heads * tiles; item++) {
            /* the last tiles of a causal call see the most keys: hand them out first */
            const int64_t tl = tiles - 1 - item % tiles, hd = item / tiles;
            if (__atomic_load_n(&failed, __ATOMIC_RELAXED)) continue;
            tile(pr, path, hd / pr->hkv, hd % pr->hkv, tl * TQ, kpack + hd * nblocks * KB * d,
                 vpack + hd * nblocks * KB * d, kscale + hd * nblocks * KB, vscale + hd * nblocks * KB,
                 factors + hd * 2 * d, &w);
        }
        free(w.qt);
        free(w.qsc);
        free(w.s);
        free(w.p);
        free(w.psc);
        free(w.o);
        free(w.m);
        free(w.l);
        free(w.valid);
    }
    free(kpack);
    free(vpack);
    free(kscale);
    free(vscale);
    free(factors);
    return failed ? 2 : 0;
}

static int probe_paths(void) {
    int paths = 1 << LEVEL_SCALAR;
#ifdef F16_X86
    if (have_avx2()) paths |= 1 << LEVEL_AVX2;
#endif
    return paths;
}

/* Bit `level` set for each path this build and CPU run (bit 1, scalar, always); probed once. */
int longdoc_flash16_paths(void) {
    static int known = 0;
    return probed_once(&known, probe_paths);
}

/* Every CPU runs the scalar path. */
int longdoc_flash16_supported(void) { return 1; }

/* out (B, H, Lq, D) and lse (B, H, Lq) float32, both contiguous, from q, k, v by strides (the format
   above; kv_half: k and v are float16), on `threads` OpenMP threads and path `level` (0: the best
   here). Returns 0, 1 for arguments it does not take (or a path that doesn't run here), 2 when out of
   memory. */
int longdoc_flash16(const float *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                    const int64_t *vs, int kv_half, float *out, float *lse, int64_t b, int64_t h, int64_t hkv,
                    int64_t lq, int64_t lk, int64_t d, int causal, float scale, int threads, int level) {
    if (!q || !k || !v || !out || !lse || !qs || !ks || !vs || b < 1 || hkv < 1 || h < hkv || h % hkv || lq < 1 ||
        lk < 1 || d < 2 || d > MAX_D || d % 2 || (causal && lq != lk) || threads < 1 || !isfinite(scale))
        return 1;
    const int paths = longdoc_flash16_paths();
    if (level == LEVEL_BEST) level = paths & (1 << LEVEL_AVX2) ? LEVEL_AVX2 : LEVEL_SCALAR;
    if (level < LEVEL_SCALAR || level > LEVEL_AVX2 || !(paths & (1 << level))) return 1;
    Path path = {scores_scalar, values_scalar, softmax_scalar};
#ifdef F16_X86
    if (level == LEVEL_AVX2) path = (Path){scores_avx2, values_avx2, softmax_avx2};
#endif
    Problem pr = {q,     k, v, kv_half != 0, {qs[0], qs[1], qs[2]}, {ks[0], ks[1], ks[2]}, {vs[0], vs[1], vs[2]},
                  out, lse, b, h,            hkv,                    lq,                     lk,
                  d,     causal, scale};
    return run(&pr, &path, threads);
}
