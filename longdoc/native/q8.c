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
   AVX-512 VNNI, NEON with and without dot products) does these very operations in this order, so their outputs
   are bit for bit the same; the float64 reference in q8.py differs only by the float32 roundings.

   Packed layout: rows go in groups of 8 (n padded with zero rows whose scale is 0); a group's blocks
   follow each other in input order, each group's after the one before. A block of a group is 272
   bytes:
     scale[8]   float16, rows 0..7;
     q[256]     8 steps of 32 bytes; step s holds, for rows 0..7 in turn, the row's 4 weights
                4s..4s+3 of the block (byte 32s + 4r + j = weight 4s + j of row r).
   One 4-byte piece of the activations, broadcast, meets the same 4 input channels of 8 rows: AVX2's
   maddubs + madd (AVX-512 VNNI's vpdpbusd) give each int32 lane one row's sum, NEON's sdot by element likewise for 4 rows, so
   no horizontal sums are needed and one activation load serves 8 rows.

   The 5-bit layout (`bits` 5): the same format with every code in -16..15 (llama.cpp's Q5_0 grid:
   the embedded model's GGUF stores most linears so), packed in 176 bytes a block instead of 272:
     scale[8]   float16, rows 0..7, as above;
     nib[128]   4 pieces of 32 bytes; byte i of piece t holds (code + 16) & 15 of step t's byte i in its
                low nibble and of step t + 4's byte i in its high nibble;
     hi[32]     byte i, bit s: (code + 16) >> 4 of step s's byte i.
   Every path computes on the same codes as from the 8-bit layout, so its outputs have the same bits.
   The x86 loops multiply the unsigned codes + 16 (maddubs and vpdpbusd take them as they are) and take
   16 times the block's sum of activation codes off each block's int32 sum: exact, so no other rounding
   changes. It is the layout decode reads on x86 (35% fewer bytes a step); the NEON loops take only the 8-bit
   one, which the same codes pack to there.

   Work: the activations are quantized once per call; OpenMP threads share out runs of groups. With
   one activation row (decoding) a thread reads 4 groups side by side from 4 runs of its share, with
   two rows 2 (4 streams read memory faster than one), with more rows one group at a time, meeting up
   to 4 rows of activations while its weights are in cache.

   Paths (the `level` argument; 0 takes the best this CPU runs):
     1 scalar     any CPU;
     2 AVX2       x86 with AVX2, FMA and F16C (sign + maddubs + madd);
     5 AVX-512 VNNI  x86 with AVX-512 F, BW, VL and VNNI: the AVX2 loop (one source, q8_rows.h) with
                  vpdpbusd on 256-bit registers for maddubs + madd; prefill's gemm and the unpacking
                  are the AVX2 ones;
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
#define Q5_BLOCK_BYTES 176 /* in the 5-bit layout: 8 float16 scales, 128 bytes of nibbles, 32 of fifth bits */
#define MT 4            /* (groups read side by side) x (activation rows) per pass: accumulators */

enum { LEVEL_BEST = 0, LEVEL_SCALAR = 1, LEVEL_AVX2 = 2, LEVEL_NEON = 3, LEVEL_NEON_DOT = 4, LEVEL_VNNI = 5 };
#define LEVEL_TOP LEVEL_VNNI

/* Bytes of one group's block in the layout of `bits` (8 or 5). */
static inline int64_t block_bytes(int bits) { return bits == 5 ? Q5_BLOCK_BYTES : BLOCK_BYTES; }

/* The 256 codes of one group's block in the 8-bit layout's order (byte 32s + 4r + j: weight 4s + j of row
   r): the block's own for 8 bits, unpacked into `tmp` for 5. */
static const int8_t *block_codes(const uint8_t *blk, int bits, int8_t *tmp) {
    if (bits != 5) return (const int8_t *)(blk + 2 * GR);
    const uint8_t *nib = blk + 2 * GR, *hi = nib + 4 * 32;
    for (int s = 0; s < QK / 4; s++)
        for (int i = 0; i < 32; i++) {
            const int low = (nib[32 * (s & 3) + i] >> (s < 4 ? 0 : 4)) & 15, five = (hi[i] >> s) & 1;
            tmp[32 * s + i] = (int8_t)(low + 16 * five - 16);
        }
    return tmp;
}

/* The quantized activations: int8 codes and their magnitudes (m, k), float scales (m, k / 32), and for
   the 5-bit layout 16 times each block's sum of codes (m, k / 32); the weights' layout (`bits`). */
typedef struct {
    const int8_t *q;
    const uint8_t *mag;
    const float *scale;
    const int32_t *sum16;
    int64_t k, nb;
    int bits;
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
        const float amax = block_amax(xb);
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
    int8_t tmp[GR * QK];
    memset(acc, 0, sizeof(acc));
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = w + b * block_bytes(a->bits);
        const int8_t *q = block_codes(blk, a->bits, tmp);
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

/* Step s of a block in the 5-bit layout (blk; hi: its fifth bits, loaded): the 32 codes + 16, 0..31.
   `s` is a literal wherever it is inlined, so the shifts take immediates. */
AVX2_TARGET __attribute__((always_inline)) static inline __m256i q5_step_avx2(const uint8_t *blk, __m256i hi, int s) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    const __m256i nib = _mm256_loadu_si256((const __m256i *)(blk + 2 * GR + 32 * (s & 3)));
    const __m256i low = _mm256_and_si256(s < 4 ? nib : _mm256_srli_epi16(nib, 4), low4);
    /* bit s of each byte to bit 4: a 16-bit shift moves bits across the byte boundary, but the mask keeps
       only bit 4, which comes from the same byte */
    const __m256i five = s < 4 ? _mm256_slli_epi16(hi, 4 - s) : (s > 4 ? _mm256_srli_epi16(hi, s - 4) : hi);
    return _mm256_or_si256(low, _mm256_and_si256(five, bit4));
}

AVX2_TARGET static void quantize_row_avx2(const float *x, int64_t k, int8_t *q, uint8_t *mag, float *scale) {
    quantize_body(x, k, q, mag, scale);
}

/* the decode loop, its integer steps on AVX2 (q8_rows.h) */
#define ROWS_TARGET AVX2_TARGET
#define ROWS avx2_rows
#define GROUPS groups_avx2
#define DOT8(dot, xmag, wsigned) \
    _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(xmag, wsigned), _mm256_set1_epi16(1)))
#define DOT5(part, wv, xv) _mm256_add_epi16(part, _mm256_maddubs_epi16(wv, xv))
#define FOLD5(dot, part) _mm256_add_epi32(dot, _mm256_madd_epi16(part, _mm256_set1_epi16(1)))
#include "q8_rows.h"

/* the same loop on AVX-512 VNNI: vpdpbusd on 256-bit registers (AVX-512 VL) */
#define VNNI_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define ROWS_TARGET VNNI_TARGET
#define ROWS vnni_rows
#define GROUPS groups_vnni
#define DOT8(dot, xmag, wsigned) _mm256_dpbusd_epi32(dot, xmag, wsigned)
#define DOT5(part, wv, xv) _mm256_dpbusd_epi32(part, wv, xv)
#define FOLD5(dot, part) _mm256_add_epi32(dot, part)
#include "q8_rows.h"

/* AVX-512 F, BW, VL and VNNI, with the OS saving the AVX-512 state (what the compiler's probe checks) */
static int have_avx512_vnni(void) {
    __builtin_cpu_init();
    return have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
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
    if (have_avx512_vnni()) paths |= 1 << LEVEL_VNNI;
#endif
#ifdef Q8_NEON
    paths |= 1 << LEVEL_NEON;
    if (have_dotprod()) paths |= 1 << LEVEL_NEON_DOT;
#endif
    return paths;
}

/* Bit `level` set for each path this build and CPU run (bit 1, scalar, always); probed once. */
int longdoc_q8_paths(void) {
    static int known = 0;
    return probed_once(&known, probe_paths);
}

/* Every CPU runs the scalar path. */
int longdoc_q8_supported(void) { return 1; }

/* The path `level` takes here: itself where it runs, the best that runs for 0, else -1. */
int longdoc_q8_level(int level) {
    const int paths = longdoc_q8_paths();
    if (level == LEVEL_BEST) {
        for (int l = LEVEL_TOP; l > LEVEL_SCALAR; l--)
            if (paths & (1 << l)) return l;
        return LEVEL_SCALAR;
    }
    return level > 0 && level <= LEVEL_TOP && (paths & (1 << level)) ? level : -1;
}

static groups_fn path_fn(int level) {
    switch (level) {
#ifdef Q8_X86
    case LEVEL_AVX2: return groups_avx2;
    case LEVEL_VNNI: return groups_vnni;
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
   (0: the best here). `bits` is W's layout: 8, or 5 (above; refused by the NEON paths). Returns 0,
   1 for an input it can't take or a path that doesn't run here, 2 when out of memory. Its scratch is
   its own: calls from several threads don't share state. */
int longdoc_q8_matmul(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                      const float *bias, void *out, int out_bf16, int threads, int level, const float *norm_w,
                      float eps, int bits) {
    if (k <= 0 || k % QK != 0 || m < 0 || n < 0 || (bits != 8 && bits != 5)) return 1;
    const int path = longdoc_q8_level(level);
    if (path < 0 || (bits == 5 && path != LEVEL_SCALAR && path != LEVEL_AVX2 && path != LEVEL_VNNI)) return 1;
    if (m == 0 || n == 0) return 0;
    const groups_fn fn = path_fn(path);
    void (*quantize)(const float *, int64_t, int8_t *, uint8_t *, float *) = quantize_row;
#ifdef Q8_X86
    if (path == LEVEL_AVX2 || path == LEVEL_VNNI) quantize = quantize_row_avx2; /* the same codes */
#endif
    const int64_t nb = k / QK, groups = (n + GR - 1) / GR, group_bytes = nb * block_bytes(bits);
    char *scratch = malloc((size_t)(2 * k) * sizeof(float) + (size_t)(m * nb) * (sizeof(float) + sizeof(int32_t)) +
                           (size_t)(m * k) * 2);
    if (!scratch) return 2;
#ifndef _OPENMP
    (void)threads;
#endif
    float *xf = (float *)scratch, *xn = xf + k, *scale = xn + k;
    int32_t *sum16 = (int32_t *)(scale + m * nb);
    int8_t *q = (int8_t *)(sum16 + m * nb);
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
        for (int64_t b = 0; bits == 5 && b < nb; b++) {
            int32_t sum = 0;
            for (int j = 0; j < QK; j++) sum += q[i * k + b * QK + j];
            sum16[i * nb + b] = 16 * sum;
        }
    }
    const acts a = {q, mag, scale, sum16, k, nb, bits};
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

/* Rows r0..r1-1 (0 <= r0 < r1 <= 8) of one group's nb blocks g, dequantized into out (row r0 first, k
   values a row, float32 or bfloat16): each block's codes are unpacked once for all its rows, scaled as
   a whole (one multiply per code, the scale pattern of a step: weight 4r + j of 32 belongs to row r),
   then each row's 8 pieces of 4 copied out. Written once, compiled once per instruction set
   (unpack_group, unpack_group_avx2): the products are exact, so the paths give the same values. */
__attribute__((always_inline)) static inline void unpack_group_body(const uint8_t *restrict g, int64_t nb, int bits,
                                                                    int r0, int r1, void *restrict out, int64_t k,
                                                                    int out_bf16) {
    int8_t tmp[GR * QK];
    float scaled[GR * QK], pattern[QK], ws[GR];
    uint16_t rounded[GR * QK];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = g + b * block_bytes(bits);
        const int8_t *q = block_codes(blk, bits, tmp);
        for (int r = 0; r < GR; r++) {
            uint16_t h;
            memcpy(&h, blk + 2 * r, 2);
            ws[r] = half_to_float(h);
        }
        for (int i = 0; i < QK; i++) pattern[i] = ws[i / 4];
        for (int s = 0; s < QK / 4; s++)
            for (int i = 0; i < QK; i++) scaled[QK * s + i] = (float)q[QK * s + i] * pattern[i];
        if (out_bf16)
            for (int i = 0; i < GR * QK; i++) rounded[i] = float_to_bf16(scaled[i]);
        for (int r = r0; r < r1; r++)
            for (int s = 0; s < QK / 4; s++) {
                const int64_t at = (int64_t)(r - r0) * k + b * QK + 4 * s;
                if (out_bf16)
                    memcpy((uint16_t *)out + at, rounded + QK * s + 4 * r, 4 * sizeof(uint16_t));
                else
                    memcpy((float *)out + at, scaled + QK * s + 4 * r, 4 * sizeof(float));
            }
    }
}

static void unpack_group(const uint8_t *g, int64_t nb, int bits, int r0, int r1, void *out, int64_t k, int out_bf16) {
    unpack_group_body(g, nb, bits, r0, r1, out, k, out_bf16);
}

#ifdef Q8_X86
AVX2_TARGET static void unpack_group_avx2(const uint8_t *g, int64_t nb, int bits, int r0, int r1, void *out, int64_t k,
                                          int out_bf16) {
    unpack_group_body(g, nb, bits, r0, r1, out, k, out_bf16);
}
#endif

/* out (m, k) = rows `ids` of W (n, k) in the packed layout, dequantized: code * scale, exact in float32
   (an int8 times a float16 has at most 19 significant bits); rounded to nearest even where out is
   bfloat16 (out_bf16 != 0). ids NULL takes rows 0..m-1, a group of 8 at a time; `bits`: W's layout, 8
   or 5; `level` the path (0: the best here; the same values on every path). Prefill runs its large
   matmuls on weights unpacked this way, one at a time, rather than holding a dense copy of the model
   beside the packed one (longdoc.quant.schemes); a tied embedding table looks up its rows here.
   Returns 0, or 1 for a row outside 0..n-1, a bad size or a path that doesn't run here. */
int longdoc_q8_rows(const uint8_t *w, int64_t k, int64_t n, const int64_t *ids, int64_t m, void *out,
                    int out_bf16, int threads, int bits, int level) {
    if (k <= 0 || k % QK != 0 || m < 0 || n < 0 || (bits != 8 && bits != 5)) return 1;
    for (int64_t i = 0; ids && i < m; i++)
        if (ids[i] < 0 || ids[i] >= n) return 1;
    if (!ids && m > n) return 1;
    const int path = longdoc_q8_level(level);
    if (path < 0) return 1;
    void (*unpack)(const uint8_t *, int64_t, int, int, int, void *, int64_t, int) = unpack_group;
#ifdef Q8_X86
    if (path == LEVEL_AVX2 || path == LEVEL_VNNI) unpack = unpack_group_avx2;
#endif
#ifndef _OPENMP
    (void)threads;
#endif
    const int64_t nb = k / QK, group_bytes = nb * block_bytes(bits), size = out_bf16 ? 2 : 4;
    /* all rows: one task a group; rows by id: one task a row */
    const int64_t tasks = ids ? m : (m + GR - 1) / GR;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t row = ids ? ids[t] : t * GR, first = ids ? t : t * GR;
        const int r0 = (int)(row % GR), r1 = ids ? r0 + 1 : (int)(m - first < GR ? m - first : GR);
        unpack(w + (row / GR) * group_bytes, nb, bits, r0, r1, (char *)out + first * k * size, k, out_bf16);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Many rows (prefill): int16 activations

   longdoc_q8_gemm computes what longdoc_q8_matmul does with the activations quantized to 16 bits
   instead of 8: per block of 32, scale = max|x| / 32767 and codes round(x * (32767 / max|x|)) half to
   even in -32767..32767; each block's dot with a weight row is an exact int32 sum (32 * 32767 * 127
   fits), and acc = fma((float)dot, (float)w_scale * x_scale, acc) block after block, in input order, as
   above. So the scalar and AVX2 paths give the same bits, and against the float weights the only loss is
   the activations' 16-bit rounding, about 2^-16 of each block's largest value: prefill runs the
   weight-only Q8_0 model, as it did when it unpacked the weights to float32 for a dense matmul.

   Why 16 bits on AVX2: madd multiplies 16 int16 pairs per instruction, twice what an FMA does in
   float32, and issues as often; with its add, a tile here ran mostly 1.2-1.7x torch's float32 matmul
   on the models' shapes (benchmarks/RESULTS.md, "Prefill on int16 activations"). maddubs (int8 times uint8)
   does no better on AVX2 (it needs madd after it) and would quantize the activations to 7 or 8 bits.

   AVX2 work: each thread takes runs of group pairs (16 weight rows); it unpacks a pair once into the
   pair layout, in a buffer of its own (1 KB a block): per block 16 steps, step p holding for group 0's
   8 rows then group 1's the int16 weights 2p and 2p+1 of the row. Then 4 activation rows at a time meet
   the pair: one broadcast (2 activations) and one madd per 8 rows, so each int32 lane is one output's
   block sum, no horizontal sums. The inner loop is written in assembly: compilers (GCC 12, clang 14)
   spilled one of its 8 accumulators to the stack, a store-to-load chain that halved its speed. */

/* One activation row (k floats) -> int16 codes and per-block scales (as quantize_body, 32767 for 127). */
__attribute__((always_inline)) static inline void quantize16_body(const float *restrict x, int64_t k,
                                                                  int16_t *restrict q, float *restrict scale) {
    const float magic = 12582912.f;
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        const float amax = block_amax(xb);
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        scale[b] = amax / 32767.f;
        for (int j = 0; j < QK; j++) {
            const float p = xb[j] * inv; /* |p| <= 32767 (1 + 2^-24)^2 < 32767.5: rounds in float32 */
            const float t = p + magic;
            int32_t v = (int32_t)(t - magic);
            v = v > 32767 ? 32767 : (v < -32767 ? -32767 : v);
            q[b * QK + j] = (int16_t)v;
        }
    }
}

static void quantize16_row(const float *x, int64_t k, int16_t *q, float *scale) { quantize16_body(x, k, q, scale); }

/* The activations of a gemm call: rows (m, k) int16 codes, (m, nb) scales. */
typedef struct {
    const int16_t *q;
    const float *scale;
    int64_t k, nb;
    int bits; /* the weights' layout */
} acts16;

/* Output row i, columns c0.. (cols of them) from res, bias added, in float32 or bfloat16. */
static void store_row(const float *res, int64_t cols, const float *bias, void *out, int out_bf16, int64_t n,
                      int64_t i, int64_t c0) {
    for (int64_t c = 0; c < cols; c++) {
        const float v = res[c] + (bias ? bias[c0 + c] : 0.f);
        if (out_bf16) ((uint16_t *)out)[i * n + c0 + c] = float_to_bf16(v);
        else ((float *)out)[i * n + c0 + c] = v;
    }
}

/* silu(v) = v / (1 + exp(-v)), exp by Cephes' expf polynomial: the argument rounded to a power of two
   n (by adding 1.5 * 2^23), the remainder r in two steps of ln 2, a degree-7 polynomial in r, times 2^n
   built in the exponent bits. Clamped to |t| <= 87 so that 2^n stays a normal float: exp(-87) adds
   nothing to 1, and exp(87) makes the quotient below 2^-120. Within 2 ulp of exp; silu_avx2 runs these
   very operations, so a glu's output has the same bits on both paths. */
#define EXP_CLAMP 87.f

static inline float silu(float v) {
    float t = 0.f - v;
    t = t > -EXP_CLAMP ? t : -EXP_CLAMP; /* as maxps, then minps, take them (NaN included) */
    t = t < EXP_CLAMP ? t : EXP_CLAMP;
    const float y = t * EXP_LOG2E;
    const float n = (y + EXP_MAGIC) - EXP_MAGIC;
    float r = fmaf(n, -EXP_LN2_HI, t);
    r = fmaf(n, -EXP_LN2_LO, r);
    const float r2 = r * r;
    float p = fmaf(EXP_P0, r, EXP_P1);
    p = fmaf(p, r, EXP_P2);
    p = fmaf(p, r, EXP_P3);
    p = fmaf(p, r, EXP_P4);
    p = fmaf(p, r, EXP_P5);
    p = fmaf(p, r2, r);
    p = p + 1.f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return v / (1.f + p * two_n);
}

/* A glu's output row i, columns c0..c0+7, from the gate's 8 values (gate) and the up's (up), each with
   its bias (bias: 2f values, the gate's then the up's, or NULL): silu(gate) * up. */
static void store_glu(const float *gate, const float *up, const float *bias, int64_t f, void *out, int out_bf16,
                      int64_t i, int64_t c0) {
    for (int j = 0; j < GR; j++) {
        const float g = gate[j] + (bias ? bias[c0 + j] : 0.f), u = up[j] + (bias ? bias[f + c0 + j] : 0.f);
        const float v = silu(g) * u;
        if (out_bf16) ((uint16_t *)out)[i * f + c0 + j] = float_to_bf16(v);
        else ((float *)out)[i * f + c0 + j] = v;
    }
}

/* scalar: group g's 8 outputs for activation row i, the reference the AVX2 path equals bit for bit */
static void gemm_group_scalar(const uint8_t *g, const acts16 *a, int64_t i, float *res) {
    float acc[GR] = {0};
    int8_t tmp[GR * QK];
    const int16_t *x = a->q + i * a->k;
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = g + b * block_bytes(a->bits);
        const int8_t *q = block_codes(blk, a->bits, tmp);
        const float xs = a->scale[i * a->nb + b];
        for (int r = 0; r < GR; r++) {
            uint16_t h;
            memcpy(&h, blk + 2 * r, 2);
            int32_t dot = 0;
            for (int s = 0; s < QK / 4; s++)
                for (int j = 0; j < 4; j++) dot += (int32_t)q[32 * s + 4 * r + j] * x[b * QK + 4 * s + j];
            acc[r] = fmaf((float)dot, half_to_float(h) * xs, acc[r]);
        }
    }
    memcpy(res, acc, sizeof(acc));
}

#if defined(Q8_X86) && defined(__GNUC__)
#define Q8_GEMM_AVX2 1
#define PAIR_BLOCK 1024 /* bytes of one block of a group pair in the pair layout */
#define TILE_ROWS 4
#define PAIR_CACHE (256 << 10) /* bytes of packed pairs a thread keeps in cache (L2: 512 KB on Zen 3) */

AVX2_TARGET static void quantize16_row_avx2(const float *x, int64_t k, int16_t *q, float *scale) {
    quantize16_body(x, k, q, scale);
}

/* store_row for a float32 output of a whole pair's 16 columns: the same additions, 8 at a time. */
AVX2_TARGET static void store_pair_avx2(const float *res, const float *bias, float *out) {
    for (int h = 0; h < 2; h++) {
        __m256 v = _mm256_loadu_ps(res + 8 * h);
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * h));
        _mm256_storeu_ps(out + 8 * h, v);
    }
}

/* silu on 8 lanes: silu()'s operations, lane by lane. */
AVX2_TARGET static inline __m256 silu_avx2(__m256 v) {
    const __m256 magic = _mm256_set1_ps(EXP_MAGIC), one = _mm256_set1_ps(1.f);
    __m256 t = _mm256_sub_ps(_mm256_setzero_ps(), v);
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-EXP_CLAMP)), _mm256_set1_ps(EXP_CLAMP));
    const __m256 y = _mm256_mul_ps(t, _mm256_set1_ps(EXP_LOG2E));
    const __m256 n = _mm256_sub_ps(_mm256_add_ps(y, magic), magic);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_LN2_HI), t);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_LN2_LO), r);
    const __m256 r2 = _mm256_mul_ps(r, r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(EXP_P0), r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_fmadd_ps(p, r2, r);
    p = _mm256_add_ps(p, one);
    const __m256i biased = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
    const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
    return _mm256_div_ps(v, _mm256_add_ps(one, _mm256_mul_ps(p, two_n)));
}

/* store_glu for a float32 output: the same operations, 8 columns at once. */
AVX2_TARGET static void store_glu_avx2(const float *res, const float *bias, int64_t f, float *out, int64_t c0) {
    __m256 g = _mm256_loadu_ps(res), u = _mm256_loadu_ps(res + GR);
    if (bias) {
        g = _mm256_add_ps(g, _mm256_loadu_ps(bias + c0));
        u = _mm256_add_ps(u, _mm256_loadu_ps(bias + f + c0));
    }
    _mm256_storeu_ps(out + c0, _mm256_mul_ps(silu_avx2(g), u));
}

/* Groups g0 and g1 (g1 NULL: zero rows) of the packed layout -> the pair layout (pw: nb * 512 int16) and
   their scales in float (ps: nb * 16, group 0's 8 then group 1's). A step of 32 bytes holds rows 0..7's
   weights 4s..4s+3 (4 bytes a row): its even 2-byte pieces (weights 4s, 4s+1) are pair step 2s, its odd
   ones 2s+1. One byte shuffle gathers each 128-bit lane's even pieces then its odd ones, a qword permute
   puts all even pieces in the low half, and sign extension widens each half to int16. */
AVX2_TARGET static void pair_pack_avx2(const uint8_t *g0, const uint8_t *g1, int64_t nb, int bits, int16_t *pw,
                                       float *ps) {
    const __m256i gather = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9,
                                            12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    for (int64_t b = 0; b < nb; b++) {
        int16_t *o = pw + b * (PAIR_BLOCK / 2);
        for (int h = 0; h < 2; h++) {
            const uint8_t *g = h ? g1 : g0;
            if (!g) {
                _mm256_storeu_ps(ps + b * 16 + 8 * h, _mm256_setzero_ps());
                for (int p = 0; p < QK / 2; p++) _mm256_storeu_si256((__m256i *)(o + 32 * p + 16 * h), _mm256_setzero_si256());
                continue;
            }
            const uint8_t *blk = g + b * block_bytes(bits);
            _mm256_storeu_ps(ps + b * 16 + 8 * h, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)));
            const __m256i hi = bits == 5 ? _mm256_loadu_si256((const __m256i *)(blk + 2 * GR + 4 * 32)) : _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int s = 0; s < QK / 4; s++) {
                const __m256i v = bits == 5 ? _mm256_sub_epi8(q5_step_avx2(blk, hi, s), _mm256_set1_epi8(16))
                                            : _mm256_loadu_si256((const __m256i *)(blk + 2 * GR + 32 * s));
                const __m256i sorted = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, gather), 0xd8); /* qwords 0 2 1 3 */
                _mm256_storeu_si256((__m256i *)(o + 32 * (2 * s) + 16 * h), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(sorted)));
                _mm256_storeu_si256((__m256i *)(o + 32 * (2 * s + 1) + 16 * h),
                                    _mm256_cvtepi8_epi16(_mm256_extracti128_si256(sorted, 1)));
            }
        }
    }
}

/* 4 activation rows (x[i]: row i's codes, xs[i]: its scales) times a group pair in the pair layout ->
   res[16 * i + c], column c of the pair (group 0's rows, then group 1's). */
AVX2_TARGET static void gemm_tile_avx2(const int16_t *pw, const float *ps, int64_t nb, const int16_t *const *x,
                                       const float *const *xs, float *res) {
    __m256 acc[2 * TILE_ROWS];
    for (int c = 0; c < 2 * TILE_ROWS; c++) acc[c] = _mm256_setzero_ps();
    /* byte offsets of rows 1..3 from row 0: the loop reads all four through one moving pointer */
    const int64_t s1 = (x[1] - x[0]) * 2, s2 = (x[2] - x[0]) * 2, s3 = (x[3] - x[0]) * 2;
    for (int64_t b = 0; b < nb; b++) {
        __m256i d0 = _mm256_setzero_si256(), d1 = d0, d2 = d0, d3 = d0, d4 = d0, d5 = d0, d6 = d0, d7 = d0;
        __m256i w0, w1, bc, p, q;
        const int16_t *wp = pw + b * (PAIR_BLOCK / 2), *xp = x[0] + b * QK;
        int64_t steps;
        /* 16 steps: weights 2p, 2p+1 of the pair's 16 rows (w0, w1) times the same two activations of
           each row (bc), summed pairwise by madd into each row's int32 lanes (d0..d7: row i, group h
           in d(2i + h)) */
        __asm__("mov $16, %[steps]\n\t"
                "1:\n\t"
                "vmovdqu (%[wp]), %[w0]\n\t"
                "vmovdqu 32(%[wp]), %[w1]\n\t"
                "vpbroadcastd (%[xp]), %[bc]\n\t"
                "vpmaddwd %[bc], %[w0], %[p]\n\t"
                "vpaddd %[p], %[d0], %[d0]\n\t"
                "vpmaddwd %[bc], %[w1], %[q]\n\t"
                "vpaddd %[q], %[d1], %[d1]\n\t"
                "vpbroadcastd (%[xp],%[s1]), %[bc]\n\t"
                "vpmaddwd %[bc], %[w0], %[p]\n\t"
                "vpaddd %[p], %[d2], %[d2]\n\t"
                "vpmaddwd %[bc], %[w1], %[q]\n\t"
                "vpaddd %[q], %[d3], %[d3]\n\t"
                "vpbroadcastd (%[xp],%[s2]), %[bc]\n\t"
                "vpmaddwd %[bc], %[w0], %[p]\n\t"
                "vpaddd %[p], %[d4], %[d4]\n\t"
                "vpmaddwd %[bc], %[w1], %[q]\n\t"
                "vpaddd %[q], %[d5], %[d5]\n\t"
                "vpbroadcastd (%[xp],%[s3]), %[bc]\n\t"
                "vpmaddwd %[bc], %[w0], %[p]\n\t"
                "vpaddd %[p], %[d6], %[d6]\n\t"
                "vpmaddwd %[bc], %[w1], %[q]\n\t"
                "vpaddd %[q], %[d7], %[d7]\n\t"
                "add $64, %[wp]\n\t"
                "add $4, %[xp]\n\t"
                "dec %[steps]\n\t"
                "jnz 1b\n\t"
                : [d0] "+x"(d0), [d1] "+x"(d1), [d2] "+x"(d2), [d3] "+x"(d3), [d4] "+x"(d4), [d5] "+x"(d5),
                  [d6] "+x"(d6), [d7] "+x"(d7), [w0] "=&x"(w0), [w1] "=&x"(w1), [bc] "=&x"(bc), [p] "=&x"(p),
                  [q] "=&x"(q), [wp] "+r"(wp), [xp] "+r"(xp), [steps] "=&r"(steps)
                : [s1] "r"(s1), [s2] "r"(s2), [s3] "r"(s3)
                : "memory", "cc");
        const __m256i dots[2 * TILE_ROWS] = {d0, d1, d2, d3, d4, d5, d6, d7};
        const __m256 ws[2] = {_mm256_loadu_ps(ps + b * 16), _mm256_loadu_ps(ps + b * 16 + 8)};
        for (int c = 0; c < 2 * TILE_ROWS; c++) {
            const __m256 sc = _mm256_mul_ps(ws[c % 2], _mm256_set1_ps(xs[c / 2][b]));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[c]), sc, acc[c]);
        }
    }
    for (int c = 0; c < 2 * TILE_ROWS; c++) _mm256_storeu_ps(res + 8 * c, acc[c]);
}
#endif

/* 1 where longdoc_q8_gemm has its AVX2 loop here (built with it, and the CPU runs the AVX2 path), else 0:
   then only its scalar loop runs, far slower than a float32 matmul on the weights unpacked. */
int longdoc_q8_gemm_fast(void) {
#ifdef Q8_GEMM_AVX2
    return longdoc_q8_level(LEVEL_AVX2) == LEVEL_AVX2;
#else
    return 0;
#endif
}

/* longdoc_q8_gemm (glu 0) and longdoc_q8_glu (glu 1): below. */
static int gemm_run(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n, const float *bias,
                    void *out, int out_bf16, int threads, int level, int bits, int glu) {
    if (k <= 0 || k % QK != 0 || m < 0 || n < 0 || (glu && n % (2 * GR) != 0) || (bits != 8 && bits != 5)) return 1;
    const int path = level == LEVEL_BEST ? (longdoc_q8_gemm_fast() ? LEVEL_AVX2 : LEVEL_SCALAR) : level;
    if (path != LEVEL_SCALAR && !(path == LEVEL_AVX2 && longdoc_q8_gemm_fast())) return 1;
    if (m == 0 || n == 0) return 0;
#ifndef _OPENMP
    (void)threads;
#endif
    /* a glu's output width f; its up rows start `half` groups after its gate rows */
    const int64_t nb = k / QK, groups = (n + GR - 1) / GR, group_bytes = nb * block_bytes(bits), f = n / 2, half = f / GR;
    int16_t *q = malloc((size_t)(m * k) * sizeof(int16_t));
    float *scale = malloc((size_t)(m * nb) * sizeof(float));
    int failed = !q || !scale;
    const int team = threads > 0 ? threads : 1;
    if (!failed) {
        void (*quantize)(const float *, int64_t, int16_t *, float *) = quantize16_row;
#ifdef Q8_GEMM_AVX2
        if (path == LEVEL_AVX2) quantize = quantize16_row_avx2;
#endif
#pragma omp parallel num_threads(team)
        {
            float *row = x_bf16 ? malloc((size_t)k * sizeof(float)) : NULL;
            if (x_bf16 && !row) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) {
                if (x_bf16 && !row) continue;
                const float *xr = (const float *)x + i * k;
                if (x_bf16) {
                    const uint16_t *xh = (const uint16_t *)x + i * k;
                    for (int64_t j = 0; j < k; j++) row[j] = bf16_to_float(xh[j]);
                    xr = row;
                }
                quantize(xr, k, q + i * k, scale + i * nb);
            }
            free(row);
        }
    }
    const acts16 a = {q, scale, k, nb, bits};
    if (!failed && path == LEVEL_SCALAR) {
#pragma omp parallel for num_threads(team) schedule(static)
        for (int64_t g = 0; g < (glu ? half : groups); g++) {
            float res[2 * GR];
            const int64_t c0 = g * GR, cols = n - c0 < GR ? n - c0 : GR;
            for (int64_t i = 0; i < m; i++) {
                gemm_group_scalar(w + g * group_bytes, &a, i, res);
                if (glu) {
                    gemm_group_scalar(w + (g + half) * group_bytes, &a, i, res + GR);
                    store_glu(res, res + GR, bias, f, out, out_bf16, i, c0);
                } else {
                    store_row(res, cols, bias, out, out_bf16, n, i, c0);
                }
            }
        }
    }
#ifdef Q8_GEMM_AVX2
    if (!failed && path == LEVEL_AVX2) {
        /* a pair is groups 2p and 2p + 1, or for a glu gate group p and its up group p + half. Runs of
           `run` pairs, whose packed weights (1 KB a block each) fit in about 256 KB of cache: 4 activation
           rows, read once per run, meet every pair of the run while in cache */
        const int64_t pairs = glu ? half : (groups + 1) / 2;
        const int64_t fit = PAIR_CACHE / (nb * PAIR_BLOCK) > 1 ? PAIR_CACHE / (nb * PAIR_BLOCK) : 1;
        const int64_t share = (pairs + team - 1) / team, run = fit < share ? fit : share;
        const int64_t runs = (pairs + run - 1) / run;
#pragma omp parallel num_threads(team)
        {
            int16_t *pw = malloc((size_t)(run * nb) * PAIR_BLOCK);
            float *ps = malloc((size_t)(run * nb) * 16 * sizeof(float));
            if (!pw || !ps) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < runs; t++) {
                if (!pw || !ps) continue;
                /* runs split the pairs evenly (sizes differ by at most one) */
                const int64_t p0 = t * pairs / runs, p1 = (t + 1) * pairs / runs;
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t g0 = glu ? p : 2 * p, g1 = glu ? p + half : 2 * p + 1;
                    pair_pack_avx2(w + g0 * group_bytes, g1 < groups ? w + g1 * group_bytes : NULL, nb, bits,
                                   pw + (p - p0) * nb * (PAIR_BLOCK / 2), ps + (p - p0) * nb * 16);
                }
                for (int64_t i0 = 0; i0 < m; i0 += TILE_ROWS) {
                    /* past the last row, the tile repeats it and its outputs are dropped */
                    const int16_t *xr[TILE_ROWS];
                    const float *xs[TILE_ROWS];
                    for (int i = 0; i < TILE_ROWS; i++) {
                        const int64_t r = i0 + i < m ? i0 + i : m - 1;
                        xr[i] = q + r * k;
                        xs[i] = scale + r * nb;
                    }
                    for (int64_t p = p0; p < p1; p++) {
                        float res[2 * GR * TILE_ROWS];
                        gemm_tile_avx2(pw + (p - p0) * nb * (PAIR_BLOCK / 2), ps + (p - p0) * nb * 16, nb, xr, xs, res);
                        const int64_t c0 = (glu ? p : 2 * p) * GR, cols = n - c0 < 2 * GR ? n - c0 : 2 * GR;
                        for (int i = 0; i < TILE_ROWS && i0 + i < m; i++) {
                            const float *ri = res + 2 * GR * i;
                            if (glu && !out_bf16)
                                store_glu_avx2(ri, bias, f, (float *)out + (i0 + i) * f, c0);
                            else if (glu)
                                store_glu(ri, ri + GR, bias, f, out, out_bf16, i0 + i, c0);
                            else if (!out_bf16 && cols == 2 * GR)
                                store_pair_avx2(ri, bias ? bias + c0 : NULL, (float *)out + (i0 + i) * n + c0);
                            else
                                store_row(ri, cols, bias, out, out_bf16, n, i0 + i, c0);
                        }
                    }
                }
            }
            free(pw);
            free(ps);
        }
    }
#endif
    free(q);
    free(scale);
    return failed ? 2 : 0;
}

/* out (m, n) = x (m, k) @ W^T + bias on 16-bit activations (above), W (n, k) in the packed layout. The
   arguments are longdoc_q8_matmul's without the norm (`bits` W's layout, 8 or 5); `level` 0 (the best here), 1 (scalar) or 2
   (AVX2, where longdoc_q8_gemm_fast); the NEON levels have no loop of their own here and are refused (1),
   as is a path that doesn't run here. Returns 0, 1 for an input it can't take, 2 when out of memory. */
int longdoc_q8_gemm(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n, const float *bias,
                    void *out, int out_bf16, int threads, int level, int bits) {
    return gemm_run(x, x_bf16, m, k, w, n, bias, out, out_bf16, threads, level, bits, 0);
}

/* A gated MLP's first half in one call: W (2n, k) is the gate's n rows then the up's (n a multiple of 8),
   bias their 2n biases or NULL, and out (m, n) = silu(x @ Wg^T + bg) * (x @ Wu^T + bu), each product as
   longdoc_q8_gemm computes it and silu as silu() does. A gate group and its up group make one pair of the
   AVX2 loop, so both halves of an output are in hand at once: the two (m, n) products are never stored.
   The arguments and returns are longdoc_q8_gemm's (n not a multiple of 8: 1). */
int longdoc_q8_glu(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n, const float *bias,
                   void *out, int out_bf16, int threads, int level, int bits) {
    if (n < 0 || n > INT64_MAX / 2) return 1;
    return gemm_run(x, x_bf16, m, k, w, 2 * n, bias, out, out_bf16, threads, level, bits, 1);
}
