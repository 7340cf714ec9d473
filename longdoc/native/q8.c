/* Q8_0 weight x int8 activation matrix products for CPU decoding and short prefill steps, on any CPU.

   Built once per machine by longdoc/native/__init__.py (cc -O3 -shared, with -fopenmp where the
   compiler links it) and called through ctypes (longdoc/native/q8.py). Unlike int5.c it needs no
   instruction set to build or run: the scalar loop is plain C, and the SIMD loops sit in functions
   compiled for their instruction set (target attributes) and are picked at run time by a CPU probe.

   Format (llama.cpp's Q8_0): each weight row is cut into blocks of 32 input channels, each int8 in
   -127..127 with one float16 scale (max|w| / 127). The activations are quantized inside the kernel
   the same way, per block of 32, to int8 with a float32 scale (max|x| / 127, round half to even).
   A block's product is an exact int32 sum (32 * 127 * 127 fits), turned into float and added as
     acc = fma((float)dot, (float)w_scale * x_scale, acc)
   block after block, in input order, one float32 accumulator per output: every path (scalar, AVX2,
   NEON with and without dot products) does these very operations in this order, so their outputs
   are bit for bit the same; the float64 reference in q8.py differs only by the float32 roundings.

   Packed layout: rows go in groups of 8 (n padded with zero rows whose scale is 0); a group's blocks
   follow each other in input order, each group's after the one before. A block of a group is 272
   bytes:
     scale[8]   float16, rows 0..7;
     q[256]     8 steps of 32 bytes; step s holds, for rows 0..7 in turn, the row's 4 weights
                4s..4s+3 of the block (byte 32s + 4r + j = weight 4s + j of row r).
   One 4-byte piece of the activations, broadcast, meets the same 4 input channels of 8 rows: AVX2's
   maddubs + madd give each int32 lane one row's sum, NEON's sdot by element likewise for 4 rows, so
   no horizontal sums are needed and one activation load serves 8 rows.

   Work: the activations are quantized once per call; OpenMP threads share out runs of groups. With
   one activation row (decoding) a thread reads 4 groups side by side from 4 runs of its share, with
   two rows 2 (4 streams read memory faster than one), with more rows one group at a time, meeting up
   to 4 rows of activations while its weights are in cache.

   Paths (the `level` argument; 0 takes the best this CPU runs):
     1 scalar     any CPU;
     2 AVX2       x86 with AVX2, FMA and F16C (sign + maddubs + madd);
     3 NEON       aarch64, widening multiplies (vmull_s8 + vpadal);
     4 NEON dot   aarch64 with the dot-product extension (sdot by element). Built where the compiler
                  targets it (-march=...+dotprod) or, GCC, as a function of its own for it; clang
                  (14 at least) declares sdot only for builds that target it, so there it is absent. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "halves.h" /* 16-bit float conversions, the AVX2 probe: shared by the kernels */

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define Q8_X86 1
#endif

#if defined(__aarch64__)
#include <arm_neon.h>
#define Q8_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
#define Q8_DOT 1
#define DOT_TARGET
#elif defined(__GNUC__) && !defined(__clang__)
#define Q8_DOT 1
#define DOT_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#if defined(__linux__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#endif

/* the products of quantize_row are rounded before their sums, as the reference's are (GCC doesn't
   contract across statements under -std=c11; clang contracts only within one unless told to) */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define QK 32           /* input channels per block */
#define GR 8            /* rows per group */
#define BLOCK_BYTES 272 /* a group's block: 8 float16 scales, 8 x 32 weights */
#define MT 4            /* (groups read side by side) x (activation rows) per pass: accumulators */

enum { LEVEL_BEST = 0, LEVEL_SCALAR = 1, LEVEL_AVX2 = 2, LEVEL_NEON = 3, LEVEL_NEON_DOT = 4 };

/* The quantized activations: int8 codes and their magnitudes (m, k), float scales (m, k / 32). */
typedef struct {
    const int8_t *q;
    const uint8_t *mag;
    const float *scale;
    int64_t k, nb;
} acts;

/* The dot products of `ng` groups of 8 rows (w[g]: a group's nb blocks), read side by side, with `mt`
   activation rows from row i0 of `a` (ng * mt <= 4): out[(g * mt + i) * 8 + r] for group g, activation
   row i0 + i and weight row r. */
typedef void (*groups_fn)(const uint8_t *const *w, int ng, const acts *a, int64_t i0, int mt, float *out);

/* One activation row (k floats) -> codes, magnitudes and per-block scales. The rounding is half to
   even (x + 1.5 * 2^23 - 1.5 * 2^23 rounds any |x| < 2^22 so in float32), as torch.round: the float64
   reference in q8.py rounds the same products the same way. Written once, compiled once per
   instruction set (quantize_row, quantize_row_avx2): the same operations, so the same codes. */
__attribute__((always_inline)) static inline void quantize_body(const float *restrict x, int64_t k,
                                                                int8_t *restrict q, uint8_t *restrict mag,
                                                                float *restrict scale) {
    const float magic = 12582912.f;
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        /* the maximum of |x| on the bits (non-negative floats order as their bits do), which compilers
           vectorize, unlike a float maximum (NaN) */
        int32_t top = 0;
        for (int j = 0; j < QK; j++) {
            int32_t v;
            memcpy(&v, xb + j, 4);
            v &= 0x7fffffff;
            top = v > top ? v : top;
        }
        float amax;
        memcpy(&amax, &top, 4);
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        scale[b] = amax / 127.f;
        for (int j = 0; j < QK; j++) {
            const float p = xb[j] * inv; /* rounded to float32 before the addition (no contraction) */
            const float t = p + magic;
            /* |p| <= 127 (1 + 2^-24)^2 < 127.5, so the clamp is for safety only; on integers, so that
               the loop vectorizes */
            int32_t v = (int32_t)(t - magic);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[b * QK + j] = (int8_t)v;
            mag[b * QK + j] = (uint8_t)(v < 0 ? -v : v);
        }
    }
}

static void quantize_row(const float *x, int64_t k, int8_t *q, uint8_t *mag, float *scale) {
    quantize_body(x, k, q, mag, scale);
}

/* ---------------------------------------------------------------------------------------------- */
/* scalar: the reference every other path must equal, bit for bit */

static void group_scalar(const uint8_t *w, const acts *a, int64_t i0, int mt, float *out) {
    float acc[MT][GR];
    memset(acc, 0, sizeof(acc));
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = w + b * BLOCK_BYTES;
        const int8_t *q = (const int8_t *)(blk + 2 * GR);
        for (int r = 0; r < GR; r++) {
            uint16_t h;
            memcpy(&h, blk + 2 * r, 2);
            const float ws = half_to_float(h);
            for (int i = 0; i < mt; i++) {
                const int8_t *x = a->q + (i0 + i) * a->k + b * QK;
                int32_t dot = 0;
                for (int s = 0; s < QK / 4; s++)
                    for (int j = 0; j < 4; j++) dot += (int32_t)q[32 * s + 4 * r + j] * x[4 * s + j];
                const float sc = ws * a->scale[(i0 + i) * a->nb + b];
                acc[i][r] = fmaf((float)dot, sc, acc[i][r]);
            }
        }
    }
    for (int i = 0; i < mt; i++) memcpy(out + i * GR, acc[i], sizeof(acc[i]));
}

static void groups_scalar(const uint8_t *const *w, int ng, const acts *a, int64_t i0, int mt, float *out) {
    for (int g = 0; g < ng; g++) group_scalar(w[g], a, i0, mt, out + g * mt * GR);
}

/* ---------------------------------------------------------------------------------------------- */
/* AVX2 + FMA + F16C */

#ifdef Q8_X86
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

static inline int32_t load4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* `ng` and `mt` are literals at every call (groups_avx2), so each pair gets its own unrolled copy. One
   decode row reads 4 groups side by side: 4 streams from memory read faster than one (plain reads on
   one core of an AVX2 EPYC: 23-29 against 15 GB/s; this loop: 25 against 15), and one activation
   piece serves 32 rows. */
AVX2_TARGET __attribute__((always_inline)) static inline void avx2_rows(const uint8_t *const *w, int ng,
                                                                         const acts *a, int64_t i0, int mt,
                                                                         float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MT];
    for (int c = 0; c < ng * mt; c++) acc[c] = _mm256_setzero_ps();
    const int8_t *xq = a->q + i0 * a->k;
    const uint8_t *xm = a->mag + i0 * a->k;
    const float *xs = a->scale + i0 * a->nb;
    for (int64_t b = 0; b < a->nb; b++) {
        __m256 ws[MT];
        __m256i dot[MT];
        /* no software prefetch: with 4 streams it cost 15-20% (the hardware's does better) */
        for (int g = 0; g < ng; g++) ws[g] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w[g] + b * BLOCK_BYTES)));
        for (int c = 0; c < ng * mt; c++) dot[c] = _mm256_setzero_si256();
        for (int s = 0; s < QK / 4; s++) {
            for (int i = 0; i < mt; i++) {
                const int64_t at = i * a->k + b * QK + 4 * s;
                const __m256i xsign = _mm256_set1_epi32(load4(xq + at)), xmag = _mm256_set1_epi32(load4(xm + at));
                for (int g = 0; g < ng; g++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(w[g] + b * BLOCK_BYTES + 2 * GR + 32 * s));
                    /* w * sign(x) times |x|: maddubs takes one unsigned operand */
                    const __m256i p = _mm256_maddubs_epi16(xmag, _mm256_sign_epi8(wv, xsign));
                    dot[g * mt + i] = _mm256_add_epi32(dot[g * mt + i], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for (int g = 0; g < ng; g++) {
            for (int i = 0; i < mt; i++) {
                const __m256 sc = _mm256_mul_ps(ws[g], _mm256_set1_ps(xs[i * a->nb + b]));
                acc[g * mt + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[g * mt + i]), sc, acc[g * mt + i]);
            }
        }
    }
    for (int c = 0; c < ng * mt; c++) _mm256_storeu_ps(out + c * GR, acc[c]);
}

AVX2_TARGET static void quantize_row_avx2(const float *x, int64_t k, int8_t *q, uint8_t *mag, float *scale) {
    quantize_body(x, k, q, mag, scale);
}

AVX2_TARGET static void groups_avx2(const uint8_t *const *w, int ng, const acts *a, int64_t i0, int mt,
                                    float *out) {
    switch (ng * 8 + mt) {
    case 8 + 1: avx2_rows(w, 1, a, i0, 1, out); break;
    case 8 + 2: avx2_rows(w, 1, a, i0, 2, out); break;
    case 8 + 3: avx2_rows(w, 1, a, i0, 3, out); break;
    case 8 + 4: avx2_rows(w, 1, a, i0, 4, out); break;
    case 16 + 1: avx2_rows(w, 2, a, i0, 1, out); break;
    case 16 + 2: avx2_rows(w, 2, a, i0, 2, out); break;
    case 24 + 1: avx2_rows(w, 3, a, i0, 1, out); break;
    default: avx2_rows(w, 4, a, i0, 1, out); break;
    }
}

#endif

/* ---------------------------------------------------------------------------------------------- */
/* NEON (aarch64) */

#ifdef Q8_NEON
static inline float32x4_t halves_to_float(const uint8_t *p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p)));
}

/* Widening multiplies: 8 products in int16 (127 * 127 fits), pairs summed into int32 (vpadal), so a
   lane holds half of one row's 4 products; the halves are summed per block (vpaddq). */
static void group_neon(const uint8_t *w, const acts *a, int64_t i0, int mt, float *out) {
    float32x4_t acc[MT][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = w + b * BLOCK_BYTES;
        const float32x4_t ws0 = halves_to_float(blk), ws1 = halves_to_float(blk + 8);
        const int8_t *q = (const int8_t *)(blk + 2 * GR);
        for (int i = 0; i < mt; i++) {
            const int8_t *x = a->q + (i0 + i) * a->k + b * QK;
            int32x4_t p01 = vdupq_n_s32(0), p23 = p01, p45 = p01, p67 = p01;
            for (int s = 0; s < QK / 4; s++) {
                int32_t piece;
                memcpy(&piece, x + 4 * s, 4);
                const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(piece));
                const int8x16_t w0 = vld1q_s8(q + 32 * s), w1 = vld1q_s8(q + 32 * s + 16);
                p01 = vpadalq_s16(p01, vmull_s8(vget_low_s8(w0), vget_low_s8(xv)));
                p23 = vpadalq_s16(p23, vmull_high_s8(w0, xv));
                p45 = vpadalq_s16(p45, vmull_s8(vget_low_s8(w1), vget_low_s8(xv)));
                p67 = vpadalq_s16(p67, vmull_high_s8(w1, xv));
            }
            const float xs = a->scale[(i0 + i) * a->nb + b];
            acc[i][0] = vfmaq_f32(acc[i][0], vcvtq_f32_s32(vpaddq_s32(p01, p23)), vmulq_n_f32(ws0, xs));
            acc[i][1] = vfmaq_f32(acc[i][1], vcvtq_f32_s32(vpaddq_s32(p45, p67)), vmulq_n_f32(ws1, xs));
        }
    }
    for (int i = 0; i < mt; i++) {
        vst1q_f32(out + i * GR, acc[i][0]);
        vst1q_f32(out + i * GR + 4, acc[i][1]);
    }
}

#ifdef Q8_DOT
/* sdot by element: lane r of the result gains row r's 4 products with activation piece `lane`. */
#define DOT_STEP(s, xv, lane)                                                      \
    do {                                                                           \
        d0 = vdotq_laneq_s32(d0, vld1q_s8(q + 32 * (s)), xv, lane);                \
        d1 = vdotq_laneq_s32(d1, vld1q_s8(q + 32 * (s) + 16), xv, lane);           \
    } while (0)

DOT_TARGET static void group_neon_dot(const uint8_t *w, const acts *a, int64_t i0, int mt, float *out) {
    float32x4_t acc[MT][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = w + b * BLOCK_BYTES;
        const float32x4_t ws0 = halves_to_float(blk), ws1 = halves_to_float(blk + 8);
        const int8_t *q = (const int8_t *)(blk + 2 * GR);
        for (int i = 0; i < mt; i++) {
            const int8_t *x = a->q + (i0 + i) * a->k + b * QK;
            const int8x16_t xl = vld1q_s8(x), xh = vld1q_s8(x + 16);
            int32x4_t d0 = vdupq_n_s32(0), d1 = d0;
            DOT_STEP(0, xl, 0);
            DOT_STEP(1, xl, 1);
            DOT_STEP(2, xl, 2);
            DOT_STEP(3, xl, 3);
            DOT_STEP(4, xh, 0);
            DOT_STEP(5, xh, 1);
            DOT_STEP(6, xh, 2);
            DOT_STEP(7, xh, 3);
            const float xs = a->scale[(i0 + i) * a->nb + b];
            acc[i][0] = vfmaq_f32(acc[i][0], vcvtq_f32_s32(d0), vmulq_n_f32(ws0, xs));
            acc[i][1] = vfmaq_f32(acc[i][1], vcvtq_f32_s32(d1), vmulq_n_f32(ws1, xs));
        }
    }
    for (int i = 0; i < mt; i++) {
        vst1q_f32(out + i * GR, acc[i][0]);
        vst1q_f32(out + i * GR + 4, acc[i][1]);
    }
}
#endif

static void groups_neon(const uint8_t *const *w, int ng, const acts *a, int64_t i0, int mt, float *out) {
    for (int g = 0; g < ng; g++) group_neon(w[g], a, i0, mt, out + g * mt * GR);
}

#ifdef Q8_DOT
DOT_TARGET static void groups_neon_dot(const uint8_t *const *w, int ng, const acts *a, int64_t i0, int mt,
                                       float *out) {
    for (int g = 0; g < ng; g++) group_neon_dot(w[g], a, i0, mt, out + g * mt * GR);
}
#endif

static int have_dotprod(void) {
#if !defined(Q8_DOT)
    return 0;
#elif defined(__ARM_FEATURE_DOTPROD)
    return 1; /* the whole build targets it */
#elif defined(__linux__)
    return (getauxval(AT_HWCAP) & (1ul << 20)) != 0; /* HWCAP_ASIMDDP */
#elif defined(__APPLE__)
    int on = 0;
    size_t size = sizeof(on);
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &on, &size, NULL, 0) == 0 && on;
#else
    return 0;
#endif
}
#endif

/* ---------------------------------------------------------------------------------------------- */
/* the shared driver */

static int probe_paths(void) {
    int paths = 1 << LEVEL_SCALAR;
#ifdef Q8_X86
    if (have_avx2()) paths |= 1 << LEVEL_AVX2;
#endif
#ifdef Q8_NEON
    paths |= 1 << LEVEL_NEON;
    if (have_dotprod()) paths |= 1 << LEVEL_NEON_DOT;
#endif
    return paths;
}

/* Bit `level` set for each path this build and CPU run (bit 1, scalar, always). Probed once: CPUID
   traps to the hypervisor in a virtual machine (9 us a call measured on a KVM guest). Threads that
   race to the first probe all store the same value. */
int longdoc_q8_paths(void) {
    static int known = 0;
    int paths = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (!paths) {
        paths = probe_paths();
        __atomic_store_n(&known, paths, __ATOMIC_RELAXED);
    }
    return paths;
}

/* Every CPU runs the scalar path. */
int longdoc_q8_supported(void) { return 1; }

/* The path `level` takes here: itself where it runs, the best that runs for 0, else -1. */
int longdoc_q8_level(int level) {
    const int paths = longdoc_q8_paths();
    if (level == LEVEL_BEST) {
        for (int l = LEVEL_NEON_DOT; l > LEVEL_SCALAR; l--)
            if (paths & (1 << l)) return l;
        return LEVEL_SCALAR;
    }
    return level > 0 && level <= LEVEL_NEON_DOT && (paths & (1 << level)) ? level : -1;
}

static groups_fn path_fn(int level) {
    switch (level) {
#ifdef Q8_X86
    case LEVEL_AVX2: return groups_avx2;
#endif
#ifdef Q8_NEON
    case LEVEL_NEON: return groups_neon;
#ifdef Q8_DOT
    case LEVEL_NEON_DOT: return groups_neon_dot;
#endif
#endif
    default: return groups_scalar;
    }
}

/* Row x (k floats) RMS-normalized into out: out[j] = w[j] * (x[j] * r), r = 1 / sqrt(mean(x^2) + eps),
   the sum of squares in double; as the models' RMSNorm in float32, up to the rounding of r and of the sum
   (which it takes in float32, in another order). */
static void rms_normalize(const float *x, int64_t k, const float *w, float eps, float *out) {
    double sum = 0.0;
    for (int64_t j = 0; j < k; j++) sum += (double)x[j] * x[j];
    const float r = (float)(1.0 / sqrt((double)(float)(sum / (double)k) + (double)eps));
    for (int64_t j = 0; j < k; j++) {
        const float t = x[j] * r;
        out[j] = w[j] * t;
    }
}

/* out (m, n) = x (m, k) @ W^T + bias, W (n, k) in the packed layout above (ceil(n / 8) * k / 32 * 272
   bytes). x is bfloat16 (x_bf16 != 0) or float32; out likewise; bias is float32 or NULL. k % 32 == 0.
   With norm_w (k floats, else NULL) each row of x is first RMS-normalized with that weight and eps
   (rms_normalize): a decode step's norm and the matmul it feeds in one call.
   Groups of 8 rows are shared out over `threads` OpenMP threads (Work, above). `level` picks the path
   (0: the best here). Returns 0,
   1 for an input it can't take or a path that doesn't run here, 2 when out of memory. Its scratch is
   its own: calls from several threads don't share state. */
int longdoc_q8_matmul(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                      const float *bias, void *out, int out_bf16, int threads, int level, const float *norm_w,
                      float eps) {
    if (k <= 0 || k % QK != 0 || m < 0 || n < 0) return 1;
    const int path = longdoc_q8_level(level);
    if (path < 0) return 1;
    if (m == 0 || n == 0) return 0;
    const groups_fn fn = path_fn(path);
    void (*quantize)(const float *, int64_t, int8_t *, uint8_t *, float *) = quantize_row;
#ifdef Q8_X86
    if (path == LEVEL_AVX2) quantize = quantize_row_avx2;
#endif
    const int64_t nb = k / QK, groups = (n + GR - 1) / GR, group_bytes = nb * BLOCK_BYTES;
    char *scratch = malloc((size_t)(2 * k) * sizeof(float) + (size_t)(m * nb) * sizeof(float) + (size_t)(m * k) * 2);
    if (!scratch) return 2;
#ifndef _OPENMP
    (void)threads;
#endif
    float *xf = (float *)scratch, *xn = xf + k, *scale = xn + k;
    int8_t *q = (int8_t *)(scale + m * nb);
    uint8_t *mag = (uint8_t *)(q + m * k);
    for (int64_t i = 0; i < m; i++) {
        const float *xr;
        if (x_bf16) {
            const uint16_t *xh = (const uint16_t *)x + i * k;
            for (int64_t j = 0; j < k; j++) xf[j] = bf16_to_float(xh[j]);
            xr = xf;
        } else {
            xr = (const float *)x + i * k;
        }
        if (norm_w) {
            rms_normalize(xr, k, norm_w, eps, xn);
            xr = xn;
        }
        quantize(xr, k, q + i * k, mag + i * k, scale + i * nb);
    }
    const acts a = {q, mag, scale, k, nb};
    /* one or two activation rows: 4 or 2 groups read side by side (streams), each thread's from 4 or 2
       runs of consecutive groups */
    const int streams = m == 1 ? 4 : (m == 2 ? 2 : 1), pass = MT / streams;
    const int64_t runs = (groups + streams - 1) / streams;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t t = 0; t < runs; t++) {
        float res[MT * GR];
        const uint8_t *ws[MT];
        int64_t first[MT];
        int ng = 0;
        for (int s = 0; s < streams; s++) {
            const int64_t g = t + s * runs;
            if (g < groups) {
                first[ng] = g * GR;
                ws[ng++] = w + g * group_bytes;
            }
        }
        for (int64_t i0 = 0; i0 < m; i0 += pass) {
            const int mt = m - i0 < pass ? (int)(m - i0) : pass;
            fn(ws, ng, &a, i0, mt, res);
            for (int g = 0; g < ng; g++) {
                const int64_t r0 = first[g], rows = n - r0 < GR ? n - r0 : GR;
                for (int i = 0; i < mt; i++) {
                    for (int64_t r = 0; r < rows; r++) {
                        const float v = res[(g * mt + i) * GR + r] + (bias ? bias[r0 + r] : 0.f);
                        if (out_bf16) ((uint16_t *)out)[(i0 + i) * n + r0 + r] = float_to_bf16(v);
                        else ((float *)out)[(i0 + i) * n + r0 + r] = v;
                    }
                }
            }
        }
    }
    free(scratch);
    return 0;
}

/* out (m, k) = rows `ids` of W (n, k) in the packed layout, dequantized: code * scale, exact in float32
   (an int8 times a float16 has at most 19 significant bits); rounded to nearest even where out is
   bfloat16 (out_bf16 != 0). ids NULL takes rows 0..m-1. Prefill runs its large matmuls on weights
   unpacked this way, a few at a time, rather than holding a dense copy of the model beside the packed
   one (longdoc.quant.schemes); a tied embedding table looks up its rows here. Returns 0, or 1 for a row
   outside 0..n-1 or a bad size. */
int longdoc_q8_rows(const uint8_t *w, int64_t k, int64_t n, const int64_t *ids, int64_t m, void *out,
                    int out_bf16, int threads) {
    if (k <= 0 || k % QK != 0 || m < 0 || n < 0) return 1;
    for (int64_t i = 0; ids && i < m; i++)
        if (ids[i] < 0 || ids[i] >= n) return 1;
    if (!ids && m > n) return 1;
#ifndef _OPENMP
    (void)threads;
#endif
    const int64_t nb = k / QK, group_bytes = nb * BLOCK_BYTES;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const int64_t row = ids ? ids[i] : i, r = row % GR;
        const uint8_t *g = w + (row / GR) * group_bytes;
        float line[QK];
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = g + b * BLOCK_BYTES;
            const int8_t *q = (const int8_t *)(blk + 2 * GR);
            uint16_t h;
            memcpy(&h, blk + 2 * r, 2);
            const float ws = half_to_float(h);
            for (int s = 0; s < QK / 4; s++)
                for (int j = 0; j < 4; j++) line[4 * s + j] = (float)q[32 * s + 4 * r + j] * ws;
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + i * k + b * QK;
                for (int j = 0; j < QK; j++) o[j] = float_to_bf16(line[j]);
            } else {
                memcpy((float *)out + i * k + b * QK, line, sizeof(line));
            }
        }
    }
    return 0;
}
