/* Exact bfloat16 attention with its log-sum-exp, for CPU prefill (AVX-512 BF16).

   Built once per machine by longdoc/attention/native.py and called through ctypes (with -fopenmp where
   the compiler links it: else the pragmas are ignored and it runs on one thread); it compiles on any
   architecture, where longdoc_flash_supported() says 0 off x86. torch's fused CPU flash kernel runs
   at about a third of the bfloat16 matmul ceiling on the model's shapes (head size 64); this one
   multiplies with vdpbf16ps (bfloat16 pairs summed into float32, as the matmuls do) and reads each key
   block once for all the query heads that share its KV head (GQA).

   Arithmetic, the same as torch's flash kernel for bfloat16: scores q.k in float32 from bfloat16
   products, an online softmax in float32 (running max and sum per query), the probabilities rounded
   to bfloat16 for the product with V, the output accumulated in float32 and rounded once.

   Layout: a call handles (B, H, Lq, D) queries against (B, Hkv, Lk, D) keys and values given by
   strides (the last dimension contiguous, D a multiple of 32 up to 256). Per (batch, KV head), K and
   V are first repacked in blocks of 64 keys so the products need no shuffles:
     K block: [D/2][64] pairs (k[key][2j], k[key][2j+1]): one register holds 16 keys' pair j;
     V block: [32][D] pairs (v[2i][d], v[2i+1][d]): one register holds 16 columns of keys 2i, 2i+1.
   Work items are (batch, KV head, tile of 16 queries), a tile holding the tile's queries for all G
   query heads of the KV head (rows g*16 + t), run by OpenMP threads, costliest (causal) first. A tile
   visits every key block up to its causal limit, or, for sparse prefill, only the blocks listed for
   its group of queries (the keys are packed once per call, for all groups). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LONGDOC_X86 1
#endif

#define KB 64  /* keys per block */
#define TQ 16  /* queries per tile */
#define MR 4   /* rows per micro-kernel */

int longdoc_flash_supported(void) {
#ifdef LONGDOC_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

#ifdef LONGDOC_X86

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

/* 2^t for finite t <= 0: 2^n * 2^f with n = round(t), |f| <= 1/2, and 2^f = e^(f ln 2) by its Taylor
   series to degree 6 (relative error below 2e-7); scalef flushes what is below float's range to 0. */
TARGET static inline __m512 exp2_ps(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f); /* ln2^6 / 6! */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Keys k0 .. k0 + n - 1 of one head (rows `kstride` and `vstride` elements apart from the head's first
   row k and v) -> one packed K block and V block, zero past n. */
TARGET static void pack_block(const uint16_t *k, int64_t kstride, const uint16_t *v, int64_t vstride, int64_t k0,
                              int64_t n, int64_t d, uint32_t *kp, uint32_t *vp) {
    const int64_t pairs = d / 2;
    /* K: word j of 16 keys at a time (a gather of 32-bit pairs, key rows apart) */
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)(kstride / 2)));
    for (int64_t c = 0; c < KB / 16; c++) {
        const int64_t left = n - c * 16;
        const __mmask16 keep = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        const int *base = (const int *)(k + (k0 + (left > 0 ? c * 16 : 0)) * kstride);
        for (int64_t j = 0; j < pairs; j++)
            _mm512_storeu_si512(kp + j * KB + c * 16,
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), keep, rows, base + j, 4));
    }
    /* V: rows 2i and 2i + 1 interleaved, 32 columns at a time */
    const __m512i lo = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005,
                                         0x00260006, 0x00270007, 0x00280008, 0x00290009, 0x002a000a, 0x002b000b,
                                         0x002c000c, 0x002d000d, 0x002e000e, 0x002f000f);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t i = 0; i < KB / 2; i++) {
        const __m512i zero = _mm512_setzero_si512();
        const uint16_t *ra = v + (k0 + 2 * i) * vstride, *rb = ra + vstride;
        for (int64_t c = 0; c < d; c += 32) {
            __m512i a = 2 * i < n ? _mm512_loadu_si512(ra + c) : zero;
            __m512i b = 2 * i + 1 < n ? _mm512_loadu_si512(rb + c) : zero;
            _mm512_storeu_si512(vp + i * d + c, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vp + i * d + c + 16, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* s (MR x KB floats) = rows q (MR x d bfloat16, contiguous) . the packed key block kp. */
TARGET static void scores_mr(const uint16_t *q, int64_t d, const uint32_t *kp, float *s) {
    __m512 acc[MR][4];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    const uint32_t *q32 = (const uint32_t *)q;
    const int64_t pairs = d / 2;
    for (int64_t j = 0; j < pairs; j++) {
        __m512bh kv[4];
        for (int c = 0; c < 4; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kp + j * KB + c * 16);
        for (int r = 0; r < MR; r++) {
            __m512bh qb = (__m512bh)_mm512_set1_epi32((int)q32[r * pairs + j]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * KB + c * 16, acc[r][c]);
}

/* o (MR x NC*16 floats, rows d apart) += p (MR x KB bfloat16 probabilities) . columns [0, NC*16) of the
   packed value block vp (rows d apart). NC is a constant so the accumulators stay in registers. */
#define VALUES(NC)                                                                                        \
    TARGET static inline void values_##NC(const uint32_t *p32, int64_t d, const uint32_t *vp, float *o) { \
        __m512 acc[MR][NC];                                                                               \
        for (int r = 0; r < MR; r++)                                                                      \
            for (int c = 0; c < NC; c++) acc[r][c] = _mm512_loadu_ps(o + r * d + c * 16);                 \
        for (int64_t i = 0; i < KB / 2; i++) {                                                            \
            __m512bh vv[NC];                                                                              \
            for (int c = 0; c < NC; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + i * d + c * 16);       \
            for (int r = 0; r < MR; r++) {                                                                \
                __m512bh pb = (__m512bh)_mm512_set1_epi32((int)p32[r * (KB / 2) + i]);                    \
                for (int c = 0; c < NC; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);          \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < MR; r++)                                                                      \
            for (int c = 0; c < NC; c++) _mm512_storeu_ps(o + r * d + c * 16, acc[r][c]);                \
    }
VALUES(4)
VALUES(2)

/* o (MR x d floats) += p (MR x KB bfloat16 probabilities) . the packed value block vp. */
TARGET static void values_mr(const uint16_t *p, int64_t d, const uint32_t *vp, float *o) {
    const uint32_t *p32 = (const uint32_t *)p;
    int64_t c0 = 0;
    for (; c0 + 64 <= d; c0 += 64) values_4(p32, d, vp + c0, o + c0);
    if (c0 < d) values_2(p32, d, vp + c0, o + c0); /* d is a multiple of 32 */
}

/* One row's online-softmax step over a block of scores s (KB floats, the first `valid` real):
   updates the running max m and the row's 16 partial sums l, rescales the row's output o (d floats)
   when m grows, and writes the probabilities, rounded to bfloat16, to p (zero past `valid`). */
TARGET static void softmax_row(const float *s, int valid, float scale, float *m, float *l, float *o, int64_t d,
                               uint16_t *p) {
    if (valid <= 0) {
        memset(p, 0, KB * sizeof(uint16_t));
        return;
    }
    const __m512 neg = _mm512_set1_ps(-INFINITY);
    __m512 x[4];
    __mmask16 keep[4];
    for (int c = 0; c < 4; c++) {
        const int left = valid - c * 16;
        keep[c] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        x[c] = _mm512_mask_loadu_ps(neg, keep[c], s + c * 16);
    }
    const float block_max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3])));
    __m512 sum = _mm512_loadu_ps(l);
    if (block_max > *m) {
        const float alpha = *m == -INFINITY ? 0.0f : expf((*m - block_max) * scale);
        const __m512 a = _mm512_set1_ps(alpha);
        sum = _mm512_mul_ps(sum, a);
        for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), a));
        *m = block_max;
    }
    /* exp(scale * (x - m)) as 2^(x * scale log2 e - m * scale log2 e): one fused multiply-add */
    const float sl = scale * 1.44269504088896341f;
    const __m512 sc = _mm512_set1_ps(sl), shift = _mm512_set1_ps(-*m * sl);
    for (int c = 0; c < 4; c += 2) {
        /* masked lanes hold -inf, whose exp2_ps is NaN: zeroed by the mask */
        const __m512 e0 = _mm512_maskz_mov_ps(keep[c], exp2_ps(_mm512_fmadd_ps(x[c], sc, shift)));
        const __m512 e1 = _mm512_maskz_mov_ps(keep[c + 1], exp2_ps(_mm512_fmadd_ps(x[c + 1], sc, shift)));
        _mm512_storeu_si512(p + c * 16, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        /* the sum is of the unrounded probabilities, as torch's kernel sums them: summing the rounded
           ones put 20x more error into the log-sum-exp (against float64, random inputs) */
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
    }
    _mm512_storeu_ps(l, sum);
}

typedef struct {
    const uint16_t *q, *k, *v;
    int64_t qs[3], ks[3], vs[3]; /* strides of batch, head, position (elements) */
    /* block-sparse (batch 1, not causal): NULL, or per KV head and group of `group` queries the numbers
       of the KB-key blocks it attends, `width` apart, the first count[group] of them used */
    const int64_t *blocks, *count;
    int64_t width, group;
    uint16_t *out;
    float *lse;
    int64_t b, h, hkv, lq, lk, d;
    int causal;
    float scale;
} Problem;

/* One work item: queries [q0, q0 + TQ) of every query head reading KV head `kh` of batch `bi`. */
TARGET static void tile(const Problem *pr, int64_t bi, int64_t kh, int64_t q0, const uint32_t *kpack,
                        const uint32_t *vpack, uint16_t *qt, float *s, uint16_t *p, float *o, float *m, float *l) {
    const int64_t *list = NULL; /* the blocks to visit, else all up to the causal limit */
    int64_t nvisit;
    const int64_t g = pr->h / pr->hkv, d = pr->d;
    const int64_t rows = g * TQ; /* TQ is a multiple of MR, so rows is too */
    const int64_t nq = pr->lq - q0 < TQ ? pr->lq - q0 : TQ;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t gi = r / TQ, t = r % TQ;
        if (t < nq)
            memcpy(qt + r * d, pr->q + bi * pr->qs[0] + (kh * g + gi) * pr->qs[1] + (q0 + t) * pr->qs[2],
                   d * sizeof(uint16_t));
        else
            memset(qt + r * d, 0, d * sizeof(uint16_t));
        m[r] = -INFINITY;
    }
    memset(o, 0, rows * d * sizeof(float));
    memset(l, 0, rows * 16 * sizeof(float));
    int64_t kend = pr->lk;
    if (pr->causal) kend = q0 + nq < kend ? q0 + nq : kend; /* keys past the tile's last query are masked */
    nvisit = (kend + KB - 1) / KB;
    if (pr->blocks) {
        const int64_t grp = q0 / pr->group, groups = (pr->lq + pr->group - 1) / pr->group;
        list = pr->blocks + (kh * groups + grp) * pr->width;
        nvisit = pr->count[grp];
    }
    for (int64_t i = 0; i < nvisit; i++) {
        const int64_t blk = list ? list[i] : i;
        const uint32_t *kp = kpack + blk * (d / 2) * KB, *vp = vpack + blk * (KB / 2) * d;
        const int64_t k0 = blk * KB;
        for (int64_t r = 0; r < rows; r += MR) scores_mr(qt + r * d, d, kp, s + r * KB);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t t = r % TQ;
            int64_t valid = pr->lk - k0;
            if (pr->causal && q0 + t - k0 + 1 < valid) valid = q0 + t - k0 + 1;
            if (t >= nq) valid = 0;
            if (valid > KB) valid = KB;
            softmax_row(s + r * KB, (int)valid, pr->scale, m + r, l + r * 16, o + r * d, d, p + r * KB);
        }
        for (int64_t r = 0; r < rows; r += MR) values_mr(p + r * KB, d, vp, o + r * d);
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t gi = r / TQ, t = r % TQ;
        if (t >= nq) continue;
        const int64_t head = kh * g + gi, row = (bi * pr->h + head) * pr->lq + q0 + t;
        const float total = _mm512_reduce_add_ps(_mm512_loadu_ps(l + r * 16));
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        uint16_t *dst = pr->out + row * d;
        for (int64_t c = 0; c < d; c += 32) {
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + c), _mm512_set1_ps(inv));
            __m512 b2 = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + c + 16), _mm512_set1_ps(inv));
            _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(b2, a));
        }
        pr->lse[row] = total > 0.0f ? m[r] * pr->scale + logf(total) : -INFINITY;
    }
}

TARGET static int run(const Problem *pr, int threads) {
    const int64_t d = pr->d, g = pr->h / pr->hkv;
    const int64_t nblocks = (pr->lk + KB - 1) / KB, heads = pr->b * pr->hkv;
    const int64_t block_words = (d / 2) * KB; /* K and V blocks are the same size */
    uint32_t *kpack = malloc((size_t)(heads * nblocks * block_words) * sizeof(uint32_t) + 64);
    uint32_t *vpack = malloc((size_t)(heads * nblocks * block_words) * sizeof(uint32_t) + 64);
    if (!kpack || !vpack) {
        free(kpack);
        free(vpack);
        return 2;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < heads * nblocks; item++) {
        const int64_t hd = item / nblocks, blk = item % nblocks, bi = hd / pr->hkv, kh = hd % pr->hkv;
        const int64_t k0 = blk * KB, n = pr->lk - k0 < KB ? pr->lk - k0 : KB;
        pack_block(pr->k + bi * pr->ks[0] + kh * pr->ks[1], pr->ks[2], pr->v + bi * pr->vs[0] + kh * pr->vs[1],
                   pr->vs[2], k0, n, d, kpack + item * block_words, vpack + item * block_words);
    }
    const int64_t tiles = (pr->lq + TQ - 1) / TQ, rows = g * TQ;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *qt = malloc((size_t)(rows * d) * sizeof(uint16_t));
        float *s = malloc((size_t)(rows * KB) * sizeof(float));
        uint16_t *p = malloc((size_t)(rows * KB) * sizeof(uint16_t));
        float *o = malloc((size_t)(rows * d) * sizeof(float));
        float *m = malloc((size_t)rows * sizeof(float));
        float *l = malloc((size_t)(rows * 16) * sizeof(float)); /* per row, 16 partial sums */
        if (!qt || !s || !p || !o || !m || !l) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < heads * tiles; item++) {
            /* the last tiles of a causal call see the most keys: hand them out first */
            const int64_t tl = tiles - 1 - item % tiles, hd = item / tiles;
            int bad;
#pragma omp atomic read
            bad = failed;
            if (bad) continue;
            tile(pr, hd / pr->hkv, hd % pr->hkv, tl * TQ, kpack + hd * nblocks * block_words,
                 vpack + hd * nblocks * block_words, qt, s, p, o, m, l);
        }
        free(qt);
        free(s);
        free(p);
        free(o);
        free(m);
        free(l);
    }
    free(kpack);
    free(vpack);
    return failed ? 2 : 0;
}

#endif

/* out (B, H, Lq, D) bfloat16 and lse (B, H, Lq) float32, both contiguous. With `blocks` (Hkv, groups,
   width) int64 and `count` (groups), batch 1 and not causal: the queries of each group of `group` (a
   multiple of 16) attend only to the first count[g] listed 64-key blocks of k and v (sparse prefill's
   selection: the keys are packed once for all groups); a group with none gets out 0 and lse -inf.
   Returns 0, 1 for arguments the kernel does not take (or a CPU without AVX-512 BF16), 2 when out of
   memory. */
int longdoc_flash_attention(const uint16_t *q, const int64_t *qs, const uint16_t *k, const int64_t *ks,
                            const uint16_t *v, const int64_t *vs, const int64_t *blocks, const int64_t *count,
                            int64_t width, int64_t group, uint16_t *out, float *lse, int64_t b, int64_t h,
                            int64_t hkv, int64_t lq, int64_t lk, int64_t d, int causal, float scale, int threads) {
#ifdef LONGDOC_X86
    if (blocks) { /* every listed block must exist: a bad number would read past the packed keys */
        if (b != 1 || causal || !count || group < TQ || group % TQ || width < 0) return 1;
        const int64_t groups = (lq + group - 1) / group, nblocks = (lk + KB - 1) / KB;
        for (int64_t gi = 0; gi < groups; gi++)
            if (count[gi] < 0 || count[gi] > width) return 1;
        for (int64_t i = 0; i < hkv * groups * width; i++)
            if (blocks[i] < 0 || blocks[i] >= nblocks) return 1;
    }
    if (!longdoc_flash_supported() || b < 1 || hkv < 1 || h % hkv || lq < 1 || lk < 1 || d < 32 || d > 256 ||
        d % 32 || (causal && lq != lk) || threads < 1)
        return 1;
    Problem pr = {q,     k,     v,     {qs[0], qs[1], qs[2]}, {ks[0], ks[1], ks[2]}, {vs[0], vs[1], vs[2]},
                  blocks, count, width, group, out, lse, b, h, hkv, lq, lk, d, causal, scale};
    return run(&pr, threads);
#else
    (void)q; (void)qs; (void)k; (void)ks; (void)v; (void)vs; (void)blocks; (void)count; (void)width; (void)group;
    (void)out; (void)lse; (void)b; (void)h;
    (void)hkv; (void)lq; (void)lk; (void)d; (void)causal; (void)scale; (void)threads;
    return 1;
#endif
}
