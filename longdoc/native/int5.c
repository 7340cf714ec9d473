/* int5 weight x int16 activation matrix-vector products for CPU decoding (``--quantize int5``).

   Built once per machine by longdoc/attention/native.py (cc -O3 -shared, with -fopenmp where the
   compiler links it: else the pragmas are ignored and it runs on one thread) and called through
   ctypes; it compiles on any architecture, where longdoc_int5_supported() says 0 off x86. A decode
   step reads every weight once, so its time is the bytes read: 6 bits per weight here against 8 for
   int8 (the embedded model's GGUF is mostly 5-bit: 4 bits lose 4% perplexity).

   Weights: each output row is cut into super-blocks of 128 input channels, four groups of 32 with
   their own step d and minimum m (w = d * p + m, p in 0..31). Rows go in quads (n padded to a
   multiple of 4), and a quad's super-blocks interleave: super-block 0 of its four rows, then 1, ...,
   so the kernel reads memory in order (short rows read side by side starve the prefetcher: 6-13
   GB/s against 25-29 in order, 2 threads of an EPYC). A super-block is 96 bytes:
     nib[64]   two pairs of groups (a, b), 32 bytes each: a's 16 bytes then b's; byte j of a group
               holds weight j in its low nibble and weight j + 16 in its high nibble;
     hi[2]     per pair, a 64-bit mask of the fifth bits in lane order (below);
     d[4], m[4] float16.
   Lane order of a pair (the order of one 512-bit register of unpacked weights): a's weights 0-15,
   b's 0-15, a's 16-31, b's 16-31. The activations are quantized into the same order, so the
   products pair up without shuffles.

   Activations: per group of 32, int16 with the scale max|x| / 32767; the minimum's term uses each
   group's exact float sum. (int8 activations, as llama.cpp's Q8 blocks, read no fewer weight bytes
   and cost 0.16% perplexity at 16K on the embedded model.) The products are 16 x 16-bit pairs summed
   in 32 bits (AVX-512 VNNI vpdpwssd): 31 * 32767 * 32 fits. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "halves.h" /* 16-bit float conversions, the AVX2 probe: shared by the kernels */

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LONGDOC_X86 1
#endif

#define SB 128          /* input channels per super-block */
#define SB_BYTES 96

/* Lane of weight j (0..31) of group g (0 or 1: a or b) within its pair's 64 lanes. */
static inline int lane_of(int g, int j) { return (j < 16 ? 0 : 32) + g * 16 + (j & 15); }

/* One row x (k floats) -> xq (k int16, pairs in lane order), per-group scales sx (k/32) and sums (k/32). */
static void quantize_row(const float *x, int64_t k, int16_t *xq, float *sx, float *sums) {
    for (int64_t pair = 0; pair < k / 64; pair++) {
        for (int g = 0; g < 2; g++) {
            const float *xg = x + pair * 64 + g * 32;
            float amax = 0.f, sum = 0.f;
            for (int j = 0; j < 32; j++) {
                float a = fabsf(xg[j]);
                amax = a > amax ? a : amax;
                sum += xg[j];
            }
            float scale = amax / 32767.f;
            float inv = amax > 0.f ? 32767.f / amax : 0.f;
            for (int j = 0; j < 32; j++) {
                int q = (int)lrintf(xg[j] * inv);
                xq[pair * 64 + lane_of(g, j)] = (int16_t)(q > 32767 ? 32767 : (q < -32767 ? -32767 : q));
            }
            sx[pair * 2 + g] = scale;
            sums[pair * 2 + g] = sum;
        }
    }
}

#ifdef LONGDOC_X86
#define KERNEL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))

/* Dot products of one quad of rows (w: its nsb * 4 super-blocks) with the quantized input row. */
KERNEL_TARGET static void rows4(const uint8_t *w, int64_t nsb, const int16_t *xq, const float *sx,
                                const float *sums, float *out) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m512i five = _mm512_set1_epi16(16);
    /* int32 lanes of a pair's product: 0-7 group a, 8-15 group b */
    const __m512i pick_a = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i pick_b = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    __m512 acc[4];
    __m128 accm[4];
    for (int r = 0; r < 4; r++) {
        acc[r] = _mm512_setzero_ps();
        accm[r] = _mm_setzero_ps();
    }
    for (int64_t s = 0; s < nsb; s++) {
        const int16_t *xs = xq + s * SB;
        const __m512i x0l = _mm512_loadu_si512((const void *)(xs));
        const __m512i x0h = _mm512_loadu_si512((const void *)(xs + 32));
        const __m512i x1l = _mm512_loadu_si512((const void *)(xs + 64));
        const __m512i x1h = _mm512_loadu_si512((const void *)(xs + 96));
        const __m128 sx4 = _mm_loadu_ps(sx + s * 4);
        const __m128 sum4 = _mm_loadu_ps(sums + s * 4);
        for (int r = 0; r < 4; r++) {
            const uint8_t *b = w + (s * 4 + r) * SB_BYTES;
            _mm_prefetch((const char *)(b + 16 * SB_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + 16 * SB_BYTES + 64), _MM_HINT_T0);
            uint64_t h[2];
            memcpy(h, b + 64, 16);
            const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(b + 80)));
            const __m128 m4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(b + 88)));
            const __m512 ds = _mm512_castps128_ps512(_mm_mul_ps(d4, sx4));
            for (int p = 0; p < 2; p++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 32 * p));
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                __m512i ql = _mm512_cvtepu8_epi16(lo), qh = _mm512_cvtepu8_epi16(hi);
                ql = _mm512_mask_add_epi16(ql, (__mmask32)h[p], ql, five);
                qh = _mm512_mask_add_epi16(qh, (__mmask32)(h[p] >> 32), qh, five);
                __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), ql, p ? x1l : x0l);
                dot = _mm512_dpwssd_epi32(dot, qh, p ? x1h : x0h);
                const __m512 scale = _mm512_permutexvar_ps(p ? pick_b : pick_a, ds);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            }
            accm[r] = _mm_fmadd_ps(m4, sum4, accm[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        __m128 m = accm[r];
        m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
        out[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(m);
    }
}
#endif

/* Whether this CPU runs the kernel (AVX-512 F/BW/VL/DQ with VNNI, FMA, F16C). F16C is not asked: every
   AVX-512 CPU has it, and clang (14 at least) refuses __builtin_cpu_supports("f16c"). */
int longdoc_int5_supported(void) {
#ifdef LONGDOC_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* out (m, n) = x (m, k) @ W^T + bias, W (n, k) in the int5 layout above (ceil(n / 4) * 4 * k / 128 * 96
   bytes).
   x is bfloat16 (x_bf16 != 0) or float32; out likewise; bias is float32 or NULL. k % 128 == 0.
   Rows of W are split over `threads` OpenMP threads. Returns 0, or 1 for an input it can't take, 2
   when out of memory. Its scratch is its own: calls from several threads don't share state. */
int longdoc_int5_matmul(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                        const float *bias, void *out, int out_bf16, int threads) {
#ifdef LONGDOC_X86
    if (k % SB != 0 || !longdoc_int5_supported()) return 1;
    const int64_t nsb = k / SB, row_bytes = nsb * SB_BYTES;
    float *xbuf = malloc((size_t)k * sizeof(float) + (size_t)(k / 32) * 2 * sizeof(float) + (size_t)k * 2 + 64);
    if (!xbuf) return 2;
    float *sx = xbuf + k, *sums = sx + k / 32;
    int16_t *xq = (int16_t *)(sums + k / 32);
    for (int64_t i = 0; i < m; i++) {
        const float *xr;
        if (x_bf16) {
            const uint16_t *xh = (const uint16_t *)x + i * k;
            for (int64_t j = 0; j < k; j++) xbuf[j] = bf16_to_float(xh[j]);
            xr = xbuf;
        } else {
            xr = (const float *)x + i * k;
        }
        quantize_row(xr, k, xq, sx, sums);
        float *of = out_bf16 ? NULL : (float *)out + i * n;
        uint16_t *oh = out_bf16 ? (uint16_t *)out + i * n : NULL;
        const int64_t quads = (n + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t blk = 0; blk < quads; blk++) {
            const int64_t r0 = blk * 4;
            float res[4];
            rows4(w + blk * 4 * row_bytes, nsb, xq, sx, sums, res);
            for (int64_t r = r0; r < r0 + 4 && r < n; r++) {
                float v = res[r - r0] + (bias ? bias[r] : 0.f);
                if (oh) oh[r] = float_to_bf16(v);
                else of[r] = v;
            }
        }
    }
    free(xbuf);
    return 0;
#else
    (void)x; (void)x_bf16; (void)m; (void)k; (void)w; (void)n; (void)bias; (void)out; (void)out_bf16;
    (void)threads;
    return 1;
#endif
}
