/* step.c's interface: the kernels it is handed, its structures and its entry points (step.c has their
   descriptions). Included by step.c, pasted in by longdoc.native like halves.h, and by the test driver
   tests/data/step_driver.c; native/step.py mirrors the structures in ctypes. */

#ifndef LONGDOC_STEP_H
#define LONGDOC_STEP_H

#include <stdint.h>

typedef int (*q8_matmul_fn)(const void *x, int x_bf16, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                            const float *bias, void *out, int out_bf16, int threads, int level, const float *norm_w,
                            float eps, int bits);
typedef int (*attn16_fn)(const float *q, int n_q_heads, int n_kv_heads, int d, const void *k, const void *v,
                         int kv_is_bf16, int64_t head_stride, int64_t row_stride, int64_t n_keys, float scale,
                         float *out, float *lse, int threads, int level, float *scores, int64_t scores_stride);

/* One packed Q8_0 weight (q8.c's layout) with n output channels, its float32 bias or NULL, its layout's
   bits (8 or 5) and the q8 path it runs on. */
typedef struct {
    const uint8_t *w;
    const float *bias;
    int64_t n;
    int32_t bits, level;
} step_linear;

/* One decoder layer: its two RMSNorm weights (float32 copies of the model's) and epsilons, its four
   weights (q/k/v stacked, the output projection, gate/up stacked, down), and where its cache starts. */
typedef struct {
    const float *norm1, *norm2;
    float eps1, eps2;
    step_linear qkv, o, gate_up, down;
    void *k, *v;
} step_layer;

/* The model's shapes, the run's dtype and cache, and the kernels. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    int32_t bf16; /* the run and its cache are bfloat16 (values rounded as torch rounds them), else the
                     run is float32 over a float16 cache */
    int64_t head_stride, row_stride; /* cache strides, in elements */
    float scale;                     /* the softmax scale */
    int32_t threads, attn_level;
    q8_matmul_fn q8;
    attn16_fn attn;
} step_model;

/* The keys one layer's step attends to where they are not its cache's positions 0..pos (a recycled
   set): buffers k, v of the cache's dtype, (KV head, row, D) with the strides given; ranges (regions,
   kv_heads, 2): each region's first and end row per KV head (a region may be empty for some heads or
   all); row: where this step's key and value go in the buffers (besides the cache). */
typedef struct {
    void *k, *v;
    int64_t head_stride, row_stride, row;
    const int64_t *ranges;
} step_keys;

int longdoc_step_layers(const step_model *m, const step_layer *layers, int n_layers, float *h, int64_t pos,
                        const float *key_rot, int regions, const float *query_rot, const int64_t *bounds,
                        float *select, float *queries);
int longdoc_step_sets(const step_model *m, const step_layer *layers, int n_layers, float *h, int64_t pos,
                      const float *key_rot, int regions, const float *query_rot, const step_keys *keys);

#endif
