/* A decode step's decoder layers in one call: for each layer, the input RMSNorm, the q/k/v projection,
   the rotation of the query (once per key region: DCA's intra, successive and inter regions, or the
   one region of plain attention) and of the key, the cache write, the attention over each region and
   the merge of their partial results, the output projection and residual, the post-attention norm, the
   gate/up projection, silu(gate) * up, the down projection and residual.

   Why: a decode step of a small model makes ~48 tensor operations and 5 kernel calls a layer, each a
   few microseconds of Python and torch dispatch on a 2-core CPU: a quarter of the step on the embedded
   model (benchmarks/RESULTS.md, "A decode step in one native call"). Here they are plain loops over a
   row, and the weight products and attention are the q8 and attn16 kernels' own entry points, handed
   in as function pointers (so their per-ISA loops, the ISA cap and their threads are theirs).

   The numbers are those of longdoc's torch path (models.decoder.Decoder.walk_row with
   LongModel.step_attend) in the run's dtype: in a bfloat16 run every value is rounded to bfloat16
   where torch rounds it (each product and sum of the rotation, each linear's output, the residual
   sums, silu and the gate product, the norm before and after its weight), in a float32 run nothing
   is. They differ from it only where the arithmetic order differs: the norm's sum of squares (taken
   in double here, as q8's in-kernel norm), exp and log (libm here), the merge's sums.

   The cache is float16 (float32 runs) or bfloat16 (bfloat16 runs), as attn16 reads it: (KV head,
   position, D) with the strides given, positions 0..pos-1 written, pos written here.

   A recycled decode step (engine.recycled) attends to each layer's recycled set instead: buffers of
   copied cache rows laid out alike, whose regions' rows may differ from one KV head to the next
   (step_keys); the step's key and value are then written to the set's next row as well as the cache. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "halves.h" /* 16-bit float conversions: shared by the kernels */
#include "step.h"   /* the kernels handed in, the structures, the entry points */

/* float -> float16 bits, rounded to nearest even (overflow to infinity, subnormals kept), as torch
   converts: F. Giesen's float_to_half_fast3_rtne. */
static inline uint16_t float_to_half(float f) {
    const uint32_t f32_infinity = 255u << 23, f16_max = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint16_t o;
    if (u >= f16_max) {
        o = u > f32_infinity ? 0x7e00 : 0x7c00; /* NaN stays NaN; too large: infinity */
    } else if (u < (113u << 23)) { /* a float16 subnormal or zero: the float addition rounds it */
        float x, magic;
        memcpy(&x, &u, 4);
        memcpy(&magic, &denorm_magic, 4);
        x += magic;
        uint32_t r;
        memcpy(&r, &x, 4);
        o = (uint16_t)(r - denorm_magic);
    } else {
        const uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        u += odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* x as the run stores it: rounded to bfloat16 in a bfloat16 run. */
static inline float stored(float x, int bf16) { return bf16 ? bf16_to_float(float_to_bf16(x)) : x; }

/* out = RMSNorm(x) with weight w: r = 1 / sqrt(mean(x^2) + eps) (the sum in double, as q8.c's in-kernel
   norm), out[j] = w[j] * (x[j] * r); in a bfloat16 run x * r is rounded before the weight and the product
   after (torch normalizes in float32, rounds, then multiplies by the bfloat16 weight). */
static void rms_norm(const float *x, int64_t k, const float *w, float eps, int bf16, float *out) {
    double sum = 0.0;
    for (int64_t j = 0; j < k; j++) sum += (double)x[j] * x[j];
    const float r = (float)(1.0 / sqrt((double)(float)(sum / (double)k) + (double)eps));
    for (int64_t j = 0; j < k; j++) {
        const float t = stored(x[j] * r, bf16);
        out[j] = stored(w[j] * t, bf16);
    }
}

/* heads rows of d values x rotated into out by cos and signed sin (d each): out[j] = x[j] cos[j] +
   x[(j + d/2) mod d] sin[j] (RopeTable.apply: x * cos + roll(x, d/2) * sin), each product and the sum
   rounded as the run stores them. */
static void rotate(const float *x, int64_t heads, int64_t d, const float *cos_row, const float *sin_row, int bf16,
                   float *out) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        const float *xh = x + h * d;
        float *oh = out + h * d;
        for (int64_t j = 0; j < d; j++) {
            const float a = stored(xh[j] * cos_row[j], bf16);
            const float b = stored(xh[(j + half) % d] * sin_row[j], bf16);
            oh[j] = stored(a + b, bf16);
        }
    }
}

/* kv_heads rows of d values into a cache or set laid out (KV head, row, D) with the strides given, at
   row pos, as float16 or bfloat16. */
static void write_rows(const float *x, const step_model *m, void *cache, int64_t head_stride, int64_t row_stride,
                       int64_t pos) {
    for (int64_t h = 0; h < m->kv_heads; h++) {
        uint16_t *row = (uint16_t *)cache + h * head_stride + pos * row_stride;
        const float *xh = x + h * m->head_dim;
        for (int64_t j = 0; j < m->head_dim; j++) row[j] = m->bf16 ? float_to_bf16(xh[j]) : float_to_half(xh[j]);
    }
}

/* out (n) = linear(x (k)), rounded as the run stores it. */
static int project(const step_model *m, const step_linear *lin, const float *x, int64_t k, float *out) {
    const int rc = m->q8(x, 0, 1, k, lin->w, lin->n, lin->bias, out, 0, m->threads, lin->level, NULL, 0.f, lin->bits);
    if (rc != 0) return rc;
    if (m->bf16)
        for (int64_t j = 0; j < lin->n; j++) out[j] = stored(out[j], 1);
    return 0;
}

/* The attention of the rotated queries (R, heads, d) over the R key regions of keys (each region's rows
   per KV head) -> out (heads, d): the outputs of the regions that hold keys (each rounded as the run
   stores it) weighted by exp(lse_r - logsumexp_r lse_r) and summed in float32, as
   attention.kernels.merge_partials; a head without keys anywhere gives 0. A region whose heads take the
   same rows is one kernel call, else one per KV head (a head without rows in it: weight 0), as
   engine.recycled.RecycledSet.attend calls it; a region empty for every head is left out, as there.
   total (heads): each head's log-sum-exp over all regions. Where scores isn't NULL, each key's scaled
   score goes to row h (query head h) of it, at the key's row (rows `stride` floats apart).
   parts: R * heads * (d + 1) floats of scratch. */
static int attend(const step_model *m, const step_keys *keys, int regions, const float *queries, float *parts,
                  float *out, float *total, float *scores, int64_t stride) {
    const int64_t heads = m->heads, kvh = m->kv_heads, d = m->head_dim, span = heads * d, g = heads / kvh;
    float *lse = parts + regions * span;
    int used = 0; /* the regions that hold keys, their outputs stored in order */
    for (int r = 0; r < regions; r++) {
        const int64_t *ranges = keys->ranges + 2 * r * kvh;
        int same = 1, empty = 1;
        for (int64_t h = 0; h < kvh; h++) {
            same &= ranges[2 * h] == ranges[0] && ranges[2 * h + 1] == ranges[1];
            empty &= ranges[2 * h + 1] <= ranges[2 * h];
        }
        if (empty) continue;
        float *part = parts + used * span, *part_lse = lse + used * heads;
        const float *q = queries + r * span;
        for (int64_t h = 0; h < (same ? 1 : kvh); h++) {
            const int64_t a = ranges[2 * h], n = ranges[2 * h + 1] - a, offset = h * keys->head_stride + a * keys->row_stride;
            const int64_t q_heads = same ? heads : g;
            const int rc = m->attn(q + h * g * d, (int)q_heads, (int)(same ? kvh : 1), (int)d,
                                   (const uint16_t *)keys->k + offset, (const uint16_t *)keys->v + offset, m->bf16,
                                   keys->head_stride, keys->row_stride, n > 0 ? n : 0, m->scale,
                                   part + h * g * d, part_lse + h * g, m->threads, m->attn_level,
                                   scores ? scores + h * g * stride + a : NULL, stride);
            if (rc != 0) return rc;
        }
        for (int64_t j = 0; j < span; j++) part[j] = stored(part[j], m->bf16);
        used++;
    }
    if (used <= 1) {
        if (used == 1) memcpy(out, parts, (size_t)span * sizeof(float));
        else memset(out, 0, (size_t)span * sizeof(float));
        for (int64_t h = 0; h < heads; h++) total[h] = used == 1 ? lse[h] : -INFINITY;
        return 0;
    }
    for (int64_t h = 0; h < heads; h++) {
        float top = -INFINITY;
        for (int r = 0; r < used; r++) top = fmaxf(top, lse[r * heads + h]);
        total[h] = top;
        if (isfinite(top)) {
            float sum = 0.f;
            for (int r = 0; r < used; r++) sum += expf(lse[r * heads + h] - top);
            total[h] = logf(sum) + top;
        }
        const float shift = total[h] == -INFINITY ? 0.f : total[h];
        float *oh = out + h * d;
        for (int64_t j = 0; j < d; j++) oh[j] = 0.f;
        for (int r = 0; r < used; r++) {
            const float w = expf(lse[r * heads + h] - shift);
            const float *ph = parts + r * span + h * d;
            for (int64_t j = 0; j < d; j++) oh[j] += ph[j] * w;
        }
    }
    for (int64_t j = 0; j < span; j++) out[j] = stored(out[j], m->bf16);
    return 0;
}

/* out[i] = x[i] as float16 bits, as the cache write rounds it (for tests: torch's conversion). */
void longdoc_step_halves(const float *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = float_to_half(x[i]);
}

/* Every CPU runs it (its loops are the q8 and attn16 kernels'). */
int longdoc_step_supported(void) { return 1; }

/* The layers' loop of longdoc_step_layers and longdoc_step_sets: keys[i] (or, where keys is NULL, the
   cache's positions per region of bounds) are what layer i attends to. Where select isn't NULL, each
   layer's (KV head, key) log-probabilities of keys 0..pos go to it (longdoc_step_layers); where
   queries isn't NULL, each layer's query before its rotation. */
static int run_layers(const step_model *m, const step_layer *layers, int n_layers, float *h, int64_t pos,
                      const float *key_rot, int regions, const float *query_rot, const int64_t *bounds,
                      const step_keys *keys, float *select, float *queries_out) {
    const int64_t hid = m->hidden, heads = m->heads, kvh = m->kv_heads, d = m->head_dim, inter = m->inter;
    if (n_layers < 0 || regions < 1 || regions > 3 || hid < 1 || heads < 1 || kvh < 1 || heads % kvh != 0 || d < 2 ||
        d % 2 != 0 || inter < 1 || pos < 0)
        return 1;
    const int64_t q_len = heads * d, kv_len = kvh * d, qkv_len = q_len + 2 * kv_len;
    /* scratch: normed row, q/k/v, rotated queries per region, the regions' outputs and lse, the attention
       output, a projection's output, gate/up, the rotated key, the cache's region rows per head */
    const int64_t keys_n = pos + 1, g = heads / kvh;
    const int64_t floats = hid + qkv_len + regions * q_len + regions * (q_len + heads) + q_len + hid + 2 * inter +
                           kv_len + heads + (select ? heads * keys_n : 0);
    float *scratch = malloc((size_t)floats * sizeof(float) + (size_t)(regions * kvh * 2) * sizeof(int64_t));
    if (!scratch) return 2;
    float *xn = scratch, *qkv = xn + hid, *queries = qkv + qkv_len, *parts = queries + regions * q_len;
    float *att = parts + regions * (q_len + heads), *proj = att + q_len, *gu = proj + hid, *krot = gu + 2 * inter;
    float *total = krot + kv_len, *scores = select ? total + heads : NULL;
    int64_t *cache_ranges = (int64_t *)(scratch + floats);
    if (bounds)
        for (int r = 0; r < regions; r++)
            for (int64_t j = 0; j < kvh; j++) {
                cache_ranges[2 * (r * kvh + j)] = bounds[2 * r];
                cache_ranges[2 * (r * kvh + j) + 1] = bounds[2 * r + 1];
            }
    int rc = 0;
    for (int i = 0; i < n_layers && rc == 0; i++) {
        const step_layer *layer = layers + i;
        if (layer->qkv.n != qkv_len || layer->o.n != hid || layer->gate_up.n != 2 * inter || layer->down.n != hid) {
            rc = 1;
            break;
        }
        const step_keys cache = {layer->k, layer->v, m->head_stride, m->row_stride, pos, cache_ranges};
        const step_keys *held = keys ? keys + i : &cache;
        rms_norm(h, hid, layer->norm1, layer->eps1, m->bf16, xn);
        if ((rc = project(m, &layer->qkv, xn, hid, qkv)) != 0) break;
        const float *q = qkv, *k = qkv + q_len, *v = k + kv_len;
        rotate(k, kvh, d, key_rot, key_rot + d, m->bf16, krot);
        write_rows(krot, m, layer->k, m->head_stride, m->row_stride, pos);
        write_rows(v, m, layer->v, m->head_stride, m->row_stride, pos);
        if (keys) {
            write_rows(krot, m, held->k, held->head_stride, held->row_stride, held->row);
            write_rows(v, m, held->v, held->head_stride, held->row_stride, held->row);
        }
        for (int r = 0; r < regions; r++)
            rotate(q, heads, d, query_rot + 2 * r * d, query_rot + (2 * r + 1) * d, m->bf16, queries + r * q_len);
        if (queries_out) memcpy(queries_out + i * q_len, q, (size_t)q_len * sizeof(float));
        if (scores)
            for (int64_t j = 0; j < heads * keys_n; j++) scores[j] = -INFINITY; /* a key in no region: never attended */
        if ((rc = attend(m, held, regions, queries, parts, att, total, scores, keys_n)) != 0) break;
        if (select) /* log p = score - log-sum-exp, the max over each KV head's query heads */
            for (int64_t j = 0; j < kvh; j++) {
                float *row = select + (i * kvh + j) * keys_n;
                for (int64_t t = 0; t < keys_n; t++) row[t] = -INFINITY;
                for (int64_t u = j * g; u < (j + 1) * g; u++) {
                    const float *su = scores + u * keys_n, lse = total[u];
                    for (int64_t t = 0; t < keys_n; t++) row[t] = fmaxf(row[t], su[t] - lse);
                }
            }
        if ((rc = project(m, &layer->o, att, q_len, proj)) != 0) break;
        for (int64_t j = 0; j < hid; j++) h[j] = stored(h[j] + proj[j], m->bf16);
        rms_norm(h, hid, layer->norm2, layer->eps2, m->bf16, xn);
        if ((rc = project(m, &layer->gate_up, xn, hid, gu)) != 0) break;
        for (int64_t j = 0; j < inter; j++) {
            const float g = gu[j];
            gu[j] = stored(stored(g / (1.f + expf(-g)), m->bf16) * gu[inter + j], m->bf16);
        }
        if ((rc = project(m, &layer->down, gu, inter, proj)) != 0) break;
        for (int64_t j = 0; j < hid; j++) h[j] = stored(h[j] + proj[j], m->bf16);
    }
    free(scratch);
    return rc;
}

/* Runs the token whose hidden state is h (hidden floats, bfloat16 values in a bfloat16 run) at position
   pos through layers[0..n_layers-1], in place: h becomes the hidden state after the last layer (before
   the final norm). key_rot: the key rotation at pos (cos then signed sin, head_dim each); query_rot
   (regions, 2, head_dim): each key region's query rotation; bounds (regions, 2): each region's first
   and end position (1 to 3 regions; the last end is pos + 1). Where select isn't NULL, (n_layers,
   kv_heads, pos + 1): each layer's log-probabilities of keys 0..pos in this step's attention, the max
   over each KV head's query heads (recycled decoding's full steps rank keys by them); where queries
   isn't NULL, (n_layers, heads * head_dim): each layer's query before its rotation, as the run stores
   it. Returns 0; 1 for an input it can't take; 2 out of memory; else the code a kernel returned. */
int longdoc_step_layers(const step_model *m, const step_layer *layers, int n_layers, float *h, int64_t pos,
                        const float *key_rot, int regions, const float *query_rot, const int64_t *bounds,
                        float *select, float *queries) {
    if (!m || !layers || !h || !key_rot || !query_rot || !bounds || !m->q8 || !m->attn) return 1;
    if (regions < 1 || regions > 3) return 1;
    for (int r = 0; r < regions; r++)
        if (bounds[2 * r] < 0 || bounds[2 * r] >= bounds[2 * r + 1] || bounds[2 * r + 1] > pos + 1) return 1;
    return run_layers(m, layers, n_layers, h, pos, key_rot, regions, query_rot, bounds, NULL, select, queries);
}

/* longdoc_step_layers for a recycled step: layer i attends to keys[i] (its rows per region and KV head),
   and the step's key and value are written to keys[i]'s row as well as the cache at pos. A region's
   rows lie within 0..row (row included) of every head. */
int longdoc_step_sets(const step_model *m, const step_layer *layers, int n_layers, float *h, int64_t pos,
                      const float *key_rot, int regions, const float *query_rot, const step_keys *keys) {
    if (!m || !layers || !h || !key_rot || !query_rot || !keys || !m->q8 || !m->attn) return 1;
    if (regions < 1 || regions > 3 || n_layers < 0) return 1;
    for (int i = 0; i < n_layers; i++) {
        const step_keys *held = keys + i;
        if (!held->k || !held->v || !held->ranges || held->row < 0 || held->head_stride < 0 ||
            held->row_stride < m->head_dim)
            return 1;
        for (int64_t j = 0; j < regions * m->kv_heads; j++)
            if (held->ranges[2 * j] < 0 || held->ranges[2 * j] > held->ranges[2 * j + 1] ||
                held->ranges[2 * j + 1] > held->row + 1)
                return 1;
    }
    return run_layers(m, layers, n_layers, h, pos, key_rot, regions, query_rot, NULL, keys, NULL, NULL);
}
