/* Test driver of longdoc/native/step.c (tests/test_native_step.py): a random two-layer model (hidden 64,
   4 query heads over 2 KV heads of 16, MLP 96) with random Q8_0 weights, run through 6 decode steps in
   a float32 run over a float16 cache and in a bfloat16 run over a bfloat16 cache, over one region and
   over two (a DCA-like split), and as a recycled step over two regions whose rows differ per KV head
   (longdoc_step_sets, the cache as the set's buffer), on the q8 and attn16 kernels' best paths here.
   Built with the three kernel sources into one program (natively, and cross-compiled for aarch64 and
   run under qemu-aarch64), it prints each run's final hidden state (which every layer's cache writes
   and attention feed), and for the two-region runs the last step's key log-probabilities
   (longdoc_step_layers' select), one value a line:
     h <run> <index> <value>
     s <run> <index> <value>
   The test compares the aarch64 build's values with the x86 build's within the arithmetic's tolerance
   (libm's exp and log, the kernels' own SIMD loops). */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_random.h"

int longdoc_q8_matmul(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                      const float *bias, void *out, int out_bf16, int threads, int level, const float *norm_w,
                      float eps, int bits);
int longdoc_attn16_scored(const float *q, int n_q_heads, int n_kv_heads, int d, const void *k, const void *v,
                          int kv_is_bf16, int64_t head_stride, int64_t row_stride, int64_t n_keys, float scale,
                          float *out, float *lse, int threads, int level, float *scores, int64_t scores_stride);

#include "../../longdoc/native/step.h" /* step.c's structures and entry points */

enum { HID = 64, HEADS = 4, KVH = 2, D = 16, INTER = 96, LAYERS = 2, CAP = 16, PROMPT = 6, STEPS = 6 };

/* A random packed Q8_0 weight of n rows (a multiple of 8) and k inputs: each block's 8 scales 2^-10, its
   codes random in -127..127. */
static uint8_t *random_weight(int64_t n, int64_t k) {
    const int64_t bytes = n / 8 * (k / 32) * 272;
    uint8_t *w = malloc((size_t)bytes);
    for (int64_t b = 0; b < bytes; b += 272) {
        for (int r = 0; r < 8; r++) {
            w[b + 2 * r] = 0x00;
            w[b + 2 * r + 1] = 0x14; /* float16 2^-10 */
        }
        for (int i = 16; i < 272; i++) { /* codes in -127..127, as Q8_0's (-128 is no code of it) */
            const uint8_t c = (uint8_t)(next() >> 24);
            w[b + i] = c == 0x80 ? 0x81 : c;
        }
    }
    return w;
}

static uint16_t to_bits(float f, int bf16) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (bf16) return (uint16_t)(u >> 16);
    /* float16 by truncation: any values will do for the prompt's cache rows */
    const uint32_t sign = (u >> 16) & 0x8000u, exp = (u >> 23) & 0xffu, man = (u >> 13) & 0x3ffu;
    return (uint16_t)(exp < 113 ? sign : sign | ((exp - 112) << 10) | man);
}

int main(void) {
    int rc = 0;
    for (int run = 0; run < 6; run++) {
        const int bf16 = run & 1, regions = run < 2 ? 1 : 2, sets = run >= 4;
        state = 0x9e3779b97f4a7c15ull; /* the same model and prompt in every run */
        step_layer layers[LAYERS];
        uint16_t *caches[2 * LAYERS];
        float norms[2 * LAYERS][HID];
        for (int i = 0; i < LAYERS; i++) {
            for (int j = 0; j < HID; j++) {
                norms[2 * i][j] = 0.5f + (uniform() + 1.f) / 2.f;
                norms[2 * i + 1][j] = 0.5f + (uniform() + 1.f) / 2.f;
            }
            for (int c = 0; c < 2; c++) {
                uint16_t *cache = calloc(KVH * CAP * D, 2);
                for (int t = 0; t < KVH * PROMPT * D; t++) {
                    const int h = t / (PROMPT * D), rest = t % (PROMPT * D);
                    cache[h * CAP * D + rest] = to_bits(uniform() * 2.f, bf16);
                }
                caches[2 * i + c] = cache;
            }
            const step_linear qkv = {random_weight((HEADS + 2 * KVH) * D, HID), NULL, (HEADS + 2 * KVH) * D, 8, 0};
            const step_linear o = {random_weight(HID, HEADS * D), NULL, HID, 8, 0};
            const step_linear gu = {random_weight(2 * INTER, HID), NULL, 2 * INTER, 8, 0};
            const step_linear down = {random_weight(HID, INTER), NULL, HID, 8, 0};
            layers[i] = (step_layer){norms[2 * i], norms[2 * i + 1], 1e-6f, 1e-6f, qkv, o, gu, down,
                                     caches[2 * i], caches[2 * i + 1]};
        }
        const step_model m = {HID, HEADS, KVH, D, INTER, bf16, CAP * D, D, 0.25f, 1, 0,
                              longdoc_q8_matmul, longdoc_attn16_scored};
        float h[HID];
        for (int j = 0; j < HID; j++) { /* bfloat16 values: a bfloat16 run's state */
            const uint32_t u = (uint32_t)to_bits(uniform(), 1) << 16;
            memcpy(&h[j], &u, 4);
        }
        for (int s = 0; s < STEPS; s++) {
            const int64_t pos = PROMPT + s;
            float key_rot[2 * D], query_rot[2 * 2 * D];
            for (int j = 0; j < D; j++) { /* rotations at angles of this position, signed sin */
                const double a = (double)pos / (double)(1 << (j % (D / 2))); /* exact angles */
                key_rot[j] = (float)cos(a);
                key_rot[D + j] = (float)(j < D / 2 ? -sin(a) : sin(a));
            }
            for (int r = 0; r < 2; r++)
                for (int j = 0; j < 2 * D; j++) query_rot[2 * D * r + j] = key_rot[j] * (r ? 0.5f : 1.f);
            const int64_t bounds[4] = {regions == 1 ? 0 : 3, pos + 1, 0, 3};
            /* the recycled runs: KV head 0 holds every key (the regions as bounds), head 1 all but key 0 */
            const int64_t ranges[8] = {3, pos + 1, 3, pos + 1, 0, 3, 1, 3};
            step_keys keys[LAYERS];
            for (int i = 0; i < LAYERS; i++) keys[i] = (step_keys){layers[i].k, layers[i].v, CAP * D, D, pos, ranges};
            float select[LAYERS * KVH * (PROMPT + STEPS)];
            const int last = s == STEPS - 1 && regions == 2 && !sets;
            const int got =
                sets ? longdoc_step_sets(&m, layers, LAYERS, h, pos, key_rot, regions, query_rot, keys)
                     : longdoc_step_layers(&m, layers, LAYERS, h, pos, key_rot, regions, query_rot, bounds,
                                           last ? select : NULL, NULL);
            if (last)
                for (int i = 0; i < LAYERS * KVH * (pos + 1); i++) printf("s %d %d %.9g\n", run, i, select[i]);
            if (got != 0) {
                fprintf(stderr, "run %d step %d: return code %d\n", run, s, got);
                rc = 1;
            }
        }
        for (int j = 0; j < HID; j++) printf("h %d %d %.9g\n", run, j, h[j]);
        for (int i = 0; i < LAYERS; i++) {
            free((void *)layers[i].qkv.w);
            free((void *)layers[i].o.w);
            free((void *)layers[i].gate_up.w);
            free((void *)layers[i].down.w);
        }
        for (int c = 0; c < 2 * LAYERS; c++) free(caches[c]);
    }
    return rc;
}
