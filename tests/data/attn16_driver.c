/* Test driver of longdoc/native/attn16.c (tests/test_attn16.py): every path the kernel runs on this CPU
   against a double-precision reference written here, on random inputs over sizes that cover the tails
   of the SIMD widths (d), of the key blocks and chunks (n_keys), several segments and GQA groups.

   Built with the kernel into one program (natively, and cross-compiled for aarch64 and run under
   qemu-aarch64), it prints one line per path and a checksum of the scalar path's outputs (argument
   "small": the cases with n_keys <= 100 only):
     path <level> <cases> <mismatches>
     best <level>
     checksum <hex>
   A path's output must be as accurate as plain float32 arithmetic: within 4 times the error of a
   float32 reference (also written here: sums in order, expf) plus 8 float32 ulps of the largest |v|
   (out) or of max(1, |lse|) (lse). The scalar path rounds the same IEEE operations in the same order
   on every architecture (attn16.c: no fused multiply-adds, its own exp), so its checksum is the same
   on x86 and aarch64: the aarch64 build's scalar path is the x86 build's, which the Python tests hold
   to torch's float64 and float32 attention. Mismatches go to stderr. */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_random.h"

int longdoc_attn16(const float *q, int n_q_heads, int n_kv_heads, int d, const void *k, const void *v,
                   int kv_is_bf16, int64_t head_stride, int64_t row_stride, int64_t n_keys, float scale,
                   float *out, float *lse, int threads, int level);
int longdoc_attn16_scored(const float *q, int n_q_heads, int n_kv_heads, int d, const void *k, const void *v,
                          int kv_is_bf16, int64_t head_stride, int64_t row_stride, int64_t n_keys, float scale,
                          float *out, float *lse, int threads, int level, float *scores, int64_t scores_stride);
int longdoc_attn16_level(int level);

/* A random 16-bit value of magnitude below `top` (a power of 2 up to 2^15): float16 with a random
   exponent over 6 binades below it (some zeros and subnormals among float16 ones), or bfloat16 likewise. */
static uint16_t random16(int bf16, int top_exp) {
    const uint16_t sign = (uint16_t)((next() & 1) << 15);
    if (next() % 50 == 0) return sign; /* a zero */
    if (bf16) {
        const uint32_t e = (uint32_t)(127 + top_exp - 1 - (int)(next() % 6));
        return (uint16_t)(sign | (e << 7) | (next() & 0x7f));
    }
    if (next() % 40 == 0) return (uint16_t)(sign | (next() & 0x3ff)); /* subnormal */
    const uint32_t e = (uint32_t)(15 + top_exp - 1 - (int)(next() % 6));
    return (uint16_t)(sign | (e << 10) | (next() & 0x3ff));
}

/* written here apart from attn16.c's conversions: the value of a float16 or bfloat16 */
static double widen(uint16_t h, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    const int e = (h >> 10) & 0x1f, man = h & 0x3ff;
    const double mag = e ? ldexp(1024 + man, e - 25) : ldexp(man, -24);
    return h & 0x8000 ? -mag : mag;
}

/* Attention of head `h` in double (want) and in plain float32 (approx): out (d) and lse. */
static void reference(const float *q, int d, const uint16_t *k, const uint16_t *v, int bf16, int64_t row_stride,
                      int64_t n, float scale, double *want, double *want_lse, float *approx, float *approx_lse) {
    double *s = malloc((size_t)n * sizeof(double));
    float *sf = malloc((size_t)n * sizeof(float));
    double top = -INFINITY;
    float topf = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        double acc = 0;
        float accf = 0.f;
        for (int i = 0; i < d; i++) {
            const double x = widen(k[j * row_stride + i], bf16);
            acc += (double)q[i] * x;
            accf += q[i] * (float)x;
        }
        s[j] = acc * scale;
        sf[j] = accf * scale;
        top = s[j] > top ? s[j] : top;
        topf = sf[j] > topf ? sf[j] : topf;
    }
    double l = 0;
    float lf = 0.f;
    for (int i = 0; i < d; i++) want[i] = 0, approx[i] = 0.f;
    for (int64_t j = 0; j < n; j++) {
        const double p = exp(s[j] - top);
        const float pf = expf(sf[j] - topf);
        l += p;
        lf += pf;
        for (int i = 0; i < d; i++) {
            const double x = widen(v[j * row_stride + i], bf16);
            want[i] += p * x;
            approx[i] += pf * (float)x;
        }
    }
    for (int i = 0; i < d; i++) want[i] /= l, approx[i] /= lf;
    *want_lse = top + log(l);
    *approx_lse = topf + logf(lf);
    free(s), free(sf);
}

/* a NaN wins (an error that is NaN must fail). Not fmax: aarch64 GCC 12 crashes vectorizing its
   reductions here (internal compiler error in vect_transform_reduction). */
static double larger(double a, double b) { return a > b || a != a ? a : b; }

typedef struct {
    int h, hkv, d;
    int64_t n;
    int big; /* scores up to about +-80, growing along the keys */
} size;

int main(int argc, char **argv) {
    const int small = argc > 1 && strcmp(argv[1], "small") == 0;
    const size sizes[] = {
        {3, 3, 64, 1, 0},    {4, 2, 64, 7, 0},    {14, 2, 64, 33, 1},  {14, 2, 40, 100, 0}, {4, 2, 72, 65, 1},
        {3, 3, 128, 9, 0},   {4, 2, 1, 7, 0},     {14, 2, 64, 1000, 0}, {4, 2, 72, 1000, 1}, {7, 1, 128, 1100, 0},
        {1, 1, 40, 9000, 1}, {2, 1, 256, 300, 0},
    };
    int levels[4], nlevels = 0;
    for (int level = 1; level <= 3; level++)
        if (longdoc_attn16_level(level) == level) levels[nlevels++] = level;
    int cases[4] = {0}, wrong[4] = {0};
    uint64_t sum = 0xcbf29ce484222325ull;
    const float ulp = 1.f / 16777216.f;
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        const size z = sizes[si];
        if (small && z.n > 100) continue;
        for (int bf16 = 0; bf16 < 2; bf16++) {
            /* the cache: capacity n + 11, the keys at positions 5 .. 5 + n (a view at an offset) */
            const int64_t cap = z.n + 11, offset = 5, head_stride = cap * z.d;
            uint16_t *k = malloc((size_t)(z.hkv * head_stride) * 2), *v = malloc((size_t)(z.hkv * head_stride) * 2);
            for (int64_t i = 0; i < z.hkv * head_stride; i++) {
                k[i] = random16(bf16, z.big ? 3 : 1);
                v[i] = random16(bf16, 1 + (int)(next() % 3));
            }
            if (z.big) /* keys that grow along the positions: the running maximum moves often */
                for (int j = 0; j < z.hkv; j++)
                    for (int64_t t = 0; t < cap; t++)
                        for (int i = 0; i < z.d; i++) {
                            uint16_t *x = k + j * head_stride + t * z.d + i;
                            const int shift = t * 3 > cap * 2 ? 2 : (t * 3 > cap ? 1 : 0); /* x1, x2, x4 */
                            *x = (uint16_t)(*x + (bf16 ? shift << 7 : shift << 10) * ((*x & 0x7fff) != 0));
                        }
            float *q = malloc((size_t)(z.h * z.d) * sizeof(float));
            for (int i = 0; i < z.h * z.d; i++) q[i] = uniform() * (z.big ? 4.f : 1.f);
            const float scale = 1.f / sqrtf((float)z.d);
            const size_t nout = (size_t)(z.h * z.d);
            float *out = malloc(nout * sizeof(float)), lse[16], *approx = malloc((size_t)z.d * sizeof(float));
            double *want = malloc((size_t)z.d * sizeof(double));
            for (int li = 0; li < nlevels; li++) {
                const int level = levels[li], threads = 1 + (int)(si % 2);
                cases[li]++;
                memset(out, 0xa5, nout * sizeof(float));
                /* every other case also hands back the scores (rows z.n + 3 apart): the numbers don't change */
                const int scored = (int)(si + bf16) % 2;
                const int64_t sstride = z.n + 3;
                float *scores = scored ? malloc((size_t)(z.h * sstride) * sizeof(float)) : NULL;
                if (longdoc_attn16_scored(q, z.h, z.hkv, z.d, k + offset * z.d, v + offset * z.d, bf16, head_stride, z.d,
                                          z.n, scale, out, lse, threads, level, scores, sstride) != 0)
                    return 2;
                if (level == 1) sum = fnv(fnv(sum, out, nout * sizeof(float)), lse, (size_t)z.h * sizeof(float));
                int bad = 0;
                for (int h = 0; h < z.h; h++) {
                    const int j = h / (z.h / z.hkv);
                    const uint16_t *kh = k + j * head_stride + offset * z.d, *vh = v + j * head_stride + offset * z.d;
                    double want_lse, vmax = 0, err = 0, err32 = 0;
                    float approx_lse;
                    reference(q + h * z.d, z.d, kh, vh, bf16, z.d, z.n, scale, want, &want_lse, approx, &approx_lse);
                    for (int64_t t = 0; t < z.n; t++)
                        for (int i = 0; i < z.d; i++) vmax = larger(vmax, fabs(widen(vh[t * z.d + i], bf16)));
                    for (int i = 0; i < z.d; i++) {
                        err = larger(err, fabs(out[h * z.d + i] - want[i]));
                        err32 = larger(err32, fabs(approx[i] - want[i]));
                    }
                    const double lse_err = fabs(lse[h] - want_lse), lse_err32 = fabs(approx_lse - want_lse);
                    /* each key's score q'.k (q' = q * scale rounded, as the kernel scales it) within float32's
                       error bound of a sum of d products */
                    int score_bad = 0;
                    for (int64_t t = 0; scores && t < z.n; t++) {
                        double s_want = 0, s_abs = 0;
                        for (int i = 0; i < z.d; i++) {
                            const double term = (double)(float)(q[h * z.d + i] * scale) * widen(kh[t * z.d + i], bf16);
                            s_want += term, s_abs += fabs(term);
                        }
                        score_bad |= !(fabs(scores[h * sstride + t] - s_want) <= 2 * z.d * ulp * s_abs + 1e-30);
                    }
                    if (score_bad || !(err <= 4 * (err32 + 8 * ulp * vmax)) ||
                        !(lse_err <= 4 * (lse_err32 + 8 * ulp * fmax(1, fabs(want_lse))))) {
                        bad = 1;
                        fprintf(stderr, "level %d h=%d hkv=%d d=%d n=%ld bf16=%d head %d: out err %g (float32 %g), lse err %g (float32 %g)\n",
                                level, z.h, z.hkv, z.d, (long)z.n, bf16, h, err, err32, lse_err, lse_err32);
                    }
                }
                wrong[li] += bad;
                free(scores);
            }
            free(k), free(v), free(q), free(out), free(approx), free(want);
        }
    }
    for (int l = 0; l < nlevels; l++) printf("path %d %d %d\n", levels[l], cases[l], wrong[l]);
    printf("best %d\nchecksum %016llx\n", longdoc_attn16_level(0), (unsigned long long)sum);
    /* no keys: out 0, lse -inf; a path that doesn't run here, or a bad size, is refused */
    float q1[8] = {1}, o1[8], l1[1];
    uint16_t kv[8] = {0};
    for (int l = 0; l < nlevels; l++) {
        memset(o1, 0xa5, sizeof o1);
        if (longdoc_attn16(q1, 1, 1, 8, kv, kv, 0, 8, 8, 0, 1.f, o1, l1, 1, levels[l]) != 0) return 3;
        for (int i = 0; i < 8; i++)
            if (o1[i] != 0.f) return 3;
        if (!(isinf(l1[0]) && l1[0] < 0)) return 3;
    }
    for (int level = 1; level <= 4; level++)
        if (longdoc_attn16_level(level) != level && longdoc_attn16(q1, 1, 1, 8, kv, kv, 0, 8, 8, 1, 1.f, o1, l1, 1, level) != 1)
            return 4;
    if (longdoc_attn16(q1, 1, 1, 0, kv, kv, 0, 8, 8, 1, 1.f, o1, l1, 1, 1) != 1 ||
        longdoc_attn16(q1, 3, 2, 8, kv, kv, 0, 8, 8, 1, 1.f, o1, l1, 1, 1) != 1)
        return 4;
    return 0;
}
