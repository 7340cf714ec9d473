/* Test driver of longdoc/native/q8.c (tests/test_q8.py): every path the kernel runs on this CPU against
   its scalar path, bit for bit, on random inputs over sizes that cover row tails, groups and blocking;
   then the 5-bit layout: random bytes of it (any bytes are a valid 5-bit weight), unpacked here by the
   layout's definition into the 8-bit one, through every path that takes it against the 8-bit scalar
   path, and refused by those that don't (the NEON ones). A mismatch or a wrong refusal exits 4.

   Built with the kernel into one program (natively, and cross-compiled for aarch64 and run under
   qemu-aarch64), it prints one line per path (the scalar one is the reference) and a checksum of the
   scalar outputs (argument "small": the sizes with K <= 96 only):
     path <level> <cases> <mismatches>
     best <level>
     checksum <hex>
   The inputs come from a fixed generator and every path's arithmetic is the same IEEE operations in
   the same order (q8.c), so the checksum is the same on every architecture: the x86 build's paths are
   checked against the float64 reference in Python, and the aarch64 build's against the x86 build's. */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_random.h"

int longdoc_q8_matmul(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                      const float *bias, void *out, int out_bf16, int threads, int level, const float *norm_w,
                      float eps, int bits);
int longdoc_q8_level(int level);

static uint16_t to_bf16(float f) { /* truncation: any bfloat16 will do as an input */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

/* Random Q8_0 weights (n, k) straight into the packed layout: codes in -127..127 (an extreme now and
   then), float16 scales 2^-12..2^-5 with random mantissas, every fifth row all zeros with scale 0. */
static uint8_t *random_weight(int64_t n, int64_t k) {
    const int64_t nb = k / 32, groups = (n + 7) / 8;
    uint8_t *w = calloc((size_t)(groups * nb * 272), 1);
    for (int64_t row = 0; row < n; row++) {
        const int zero = row % 5 == 4;
        uint8_t *g = w + (row / 8) * nb * 272;
        const int r = (int)(row % 8);
        for (int64_t b = 0; b < nb; b++) {
            const uint16_t half = zero ? 0 : (uint16_t)(((3 + next() % 8) << 10) | (next() & 0x3ff));
            memcpy(g + b * 272 + 2 * r, &half, 2);
            for (int j = 0; j < 32; j++) {
                int v = (int)(next() % 255) - 127;
                if (next() % 16 == 0) v = next() & 1 ? 127 : -127;
                g[b * 272 + 16 + 32 * (j / 4) + 4 * r + j % 4] = (uint8_t)(int8_t)(zero ? 0 : v);
            }
        }
    }
    return w;
}

/* The 8-bit layout of a 5-bit packed weight (groups * nb blocks of 176 bytes), by q8.c's definition:
   scales as they are; step s's byte i = ((nibble piece s % 4, byte i) >> 4 (s / 4)) & 15, plus 16 times
   bit s of fifth-bit byte i, minus 16. */
static uint8_t *eight_of_five(const uint8_t *w5, int64_t blocks) {
    uint8_t *w8 = malloc((size_t)(blocks * 272));
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *src = w5 + b * 176;
        uint8_t *dst = w8 + b * 272;
        memcpy(dst, src, 16);
        for (int s = 0; s < 8; s++)
            for (int i = 0; i < 32; i++) {
                const int low = (src[16 + 32 * (s % 4) + i] >> (4 * (s / 4))) & 15, five = (src[16 + 128 + i] >> s) & 1;
                dst[16 + 32 * s + i] = (uint8_t)(int8_t)(low + 16 * five - 16);
            }
    }
    return w8;
}

/* Random 5-bit weights through every path that takes them against the 8-bit scalar path on the same
   codes; returns the mismatches plus the wrong refusals, and adds the outputs to *sum. */
static int five_bits(const int *levels, int nlevels, uint64_t *sum, int *cases) {
    const int64_t ks[] = {32, 96, 896}, ns[] = {1, 5, 8, 13, 40}, ms[] = {1, 2, 3, 5};
    int bad = 0;
    for (size_t ki = 0; ki < 3; ki++)
        for (size_t ni = 0; ni < 5; ni++) {
            const int64_t k = ks[ki], n = ns[ni], blocks = (n + 7) / 8 * (k / 32);
            uint8_t *w5 = malloc((size_t)(blocks * 176));
            for (int64_t b = 0; b < blocks; b++) {
                for (int j = 16; j < 176; j++) w5[b * 176 + j] = (uint8_t)next();
                for (int r = 0; r < 8; r++) { /* float16 scales of either sign, 2^-12..2^-5 */
                    const uint16_t half = (uint16_t)((next() & 0x8000) | ((3 + next() % 8) << 10) | (next() & 0x3ff));
                    memcpy(w5 + b * 176 + 2 * r, &half, 2);
                }
            }
            uint8_t *w8 = eight_of_five(w5, blocks);
            for (size_t mi = 0; mi < 4; mi++) {
                const int64_t m = ms[mi];
                float *x = malloc((size_t)(m * k) * sizeof(float)), *want = malloc((size_t)(m * n) * sizeof(float)),
                      *got = malloc((size_t)(m * n) * sizeof(float));
                for (int64_t i = 0; i < m * k; i++) x[i] = uniform() * (next() % 64 == 0 ? 100.f : 1.f);
                if (longdoc_q8_matmul(x, 0, m, k, w8, n, NULL, want, 0, 1, 1, NULL, 0.f, 8) != 0) return 100;
                *sum = fnv(*sum, want, (size_t)(m * n) * sizeof(float));
                for (int l = 0; l < nlevels; l++) {
                    const int takes = levels[l] <= 2 || levels[l] == 5; /* scalar, AVX2, AVX-512 VNNI */
                    memset(got, 0xa5, (size_t)(m * n) * sizeof(float));
                    const int rc = longdoc_q8_matmul(x, 0, m, k, w5, n, NULL, got, 0, 2, levels[l], NULL, 0.f, 5);
                    (*cases)++;
                    if (takes ? rc != 0 || memcmp(want, got, (size_t)(m * n) * sizeof(float)) != 0 : rc != 1) {
                        bad++;
                        fprintf(stderr, "5 bits: level %d rc %d at m=%ld n=%ld k=%ld\n", levels[l], rc, (long)m,
                                (long)n, (long)k);
                    }
                }
                free(x), free(want), free(got);
            }
            free(w5), free(w8);
        }
    return bad;
}

int main(int argc, char **argv) {
    /* "small": K up to 96 only (a check of the dispatch, where the large sizes ran already) */
    const size_t nk = argc > 1 && strcmp(argv[1], "small") == 0 ? 2 : 4;
    const int64_t ks[] = {32, 96, 896, 4864}, ns[] = {1, 3, 4, 5, 8, 13, 896, 151}, ms[] = {1, 2, 3, 5, 16};
    int levels[8], nlevels = 0;
    for (int level = 1; level <= 5; level++)
        if (longdoc_q8_level(level) == level) levels[nlevels++] = level;
    int cases[8] = {0}, wrong[8] = {0};
    uint64_t sum = 0xcbf29ce484222325ull;
    for (size_t ki = 0; ki < nk; ki++) {
        for (size_t ni = 0; ni < sizeof ns / sizeof *ns; ni++) {
            const int64_t k = ks[ki], n = ns[ni];
            uint8_t *w = random_weight(n, k);
            float *bias = malloc((size_t)n * sizeof(float));
            for (int64_t r = 0; r < n; r++) bias[r] = uniform() * 4.f;
            for (size_t mi = 0; mi < sizeof ms / sizeof *ms; mi++) {
                const int64_t m = ms[mi];
                const int variant = (int)(ki * 40 + ni * 5 + mi); /* cycles through the 8 dtype/bias cases */
                const int x_bf16 = variant & 1, out_bf16 = (variant >> 1) & 1, with_bias = (variant >> 2) & 1;
                float *x = malloc((size_t)(m * k) * sizeof(float));
                uint16_t *xh = malloc((size_t)(m * k) * 2);
                for (int64_t i = 0; i < m * k; i++) {
                    x[i] = uniform() * (next() % 64 == 0 ? 100.f : 1.f); /* outliers */
                    if (next() % 97 == 0) x[i] = 0.f;
                    xh[i] = to_bf16(x[i]);
                }
                for (int64_t i = 0; i < m; i++) /* a row with one all-zero block */
                    if (i % 3 == 2) memset(x + i * k, 0, 32 * sizeof(float)), memset(xh + i * k, 0, 64);
                const size_t size = (size_t)(m * n) * (out_bf16 ? 2 : 4);
                uint8_t *want = malloc(size), *got = malloc(size);
                const void *xin = x_bf16 ? (const void *)xh : (const void *)x;
                const float *b = with_bias ? bias : NULL;
                if (longdoc_q8_matmul(xin, x_bf16, m, k, w, n, b, want, out_bf16, 1, 1, NULL, 0.f, 8) != 0) return 2;
                sum = fnv(sum, want, size);
                for (int l = 0; l < nlevels; l++) {
                    cases[l]++;
                    if (levels[l] == 1) continue; /* the reference itself */
                    memset(got, 0xa5, size);
                    if (longdoc_q8_matmul(xin, x_bf16, m, k, w, n, b, got, out_bf16, 1, levels[l], NULL, 0.f, 8) != 0) return 2;
                    if (memcmp(want, got, size) != 0) {
                        wrong[l]++;
                        fprintf(stderr, "level %d differs at m=%ld n=%ld k=%ld x_bf16=%d out_bf16=%d bias=%d\n",
                                levels[l], (long)m, (long)n, (long)k, x_bf16, out_bf16, with_bias);
                    }
                }
                free(x), free(xh), free(want), free(got);
            }
            free(w), free(bias);
        }
    }
    int five_cases = 0;
    const int five_bad = five_bits(levels, nlevels, &sum, &five_cases);
    for (int l = 0; l < nlevels; l++) printf("path %d %d %d\n", levels[l], cases[l], wrong[l]);
    printf("five %d %d\n", five_cases, five_bad);
    printf("best %d\nchecksum %016llx\n", longdoc_q8_level(0), (unsigned long long)sum);
    /* a path that doesn't run here is refused, not run */
    uint8_t w1[272] = {0};
    float x1[32] = {0}, o1[1];
    for (int level = 1; level <= 5; level++)
        if (longdoc_q8_level(level) != level && longdoc_q8_matmul(x1, 0, 1, 32, w1, 1, NULL, o1, 0, 1, level, NULL, 0.f, 8) != 1)
            return 3;
    return five_bad ? 4 : 0;
}
