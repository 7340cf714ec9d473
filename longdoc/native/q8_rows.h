/* q8.c's decode loop over 256-bit registers, written once and included once per instruction set that
   runs it (AVX2; AVX-512 VNNI), each inclusion defining:
     ROWS_TARGET   the target attribute of its functions
     ROWS, GROUPS  the names of its loop and of its groups_fn (the path's entry in path_fn)
     DOT8(dot, xmag, wsigned)  dot plus, in each 32-bit lane, the sum of 4 products |x| * (w * sign x)
     DOT5(part, wv, xv)        part accumulating the products of 5-bit codes (0..31) and activation codes
     FOLD5(dot, part)          dot plus part's sums, a 32-bit lane each
   AVX2 takes two instructions (maddubs into int16 pairs, then madd by ones into 32 bits); AVX-512 VNNI
   one (vpdpbusd, straight into 32 bits). The integer sums are exact either way (no int16 sum saturates:
   2 * 127 * 127 for 8 bits, 4 steps of 2 * 31 * 127 for 5), so every path gives the same numbers. */

/* `ng`, `mt` and `bits` are literals at every call (GROUPS), so each triple gets its own unrolled
   copy. One decode row reads 4 groups side by side: 4 streams from memory read faster than one (plain
   reads on one core of an AVX2 EPYC: 23-29 against 15 GB/s; this loop: 25 against 15), and one
   activation piece serves 32 rows. */
ROWS_TARGET __attribute__((always_inline)) static inline void ROWS(const uint8_t *const *w, int ng,
                                                                         const acts *a, int64_t i0, int mt,
                                                                         int bits, float *out) {
    const int64_t bb = block_bytes(bits);
    __m256 acc[MT];
    for (int c = 0; c < ng * mt; c++) acc[c] = _mm256_setzero_ps();
    const int8_t *xq = a->q + i0 * a->k;
    const uint8_t *xm = a->mag + i0 * a->k;
    const float *xs = a->scale + i0 * a->nb;
    for (int64_t b = 0; b < a->nb; b++) {
        __m256 ws[MT];
        __m256i dot[MT], hi[MT];
        /* no software prefetch: with 4 streams it cost 15-20% (the hardware's does better) */
        for (int g = 0; g < ng; g++) {
            ws[g] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w[g] + b * bb)));
            if (bits == 5) hi[g] = _mm256_loadu_si256((const __m256i *)(w[g] + b * bb + 2 * GR + 4 * 32));
        }
        for (int c = 0; c < ng * mt; c++) dot[c] = _mm256_setzero_si256();
        if (bits == 5) {
            /* the products of 4 steps summed in `part` (AVX2: int16, 4 * 2 * 31 * 127 = 31496 fits), then
               folded into dot */
            for (int half = 0; half < 2; half++) {
                __m256i part[MT];
                for (int c = 0; c < ng * mt; c++) part[c] = _mm256_setzero_si256();
#pragma GCC unroll 4
                for (int t = 0; t < 4; t++) {
                    const int s = 4 * half + t;
                    __m256i wv[MT];
                    for (int g = 0; g < ng; g++) wv[g] = q5_step_avx2(w[g] + b * bb, hi[g], s);
                    for (int i = 0; i < mt; i++) {
                        const __m256i xv = _mm256_set1_epi32(load4(xq + i * a->k + b * QK + 4 * s));
                        for (int g = 0; g < ng; g++) part[g * mt + i] = DOT5(part[g * mt + i], wv[g], xv);
                    }
                }
                for (int c = 0; c < ng * mt; c++) dot[c] = FOLD5(dot[c], part[c]);
            }
        } else {
            for (int s = 0; s < QK / 4; s++) {
                for (int i = 0; i < mt; i++) {
                    const int64_t at = i * a->k + b * QK + 4 * s;
                    const __m256i xsign = _mm256_set1_epi32(load4(xq + at)), xmag = _mm256_set1_epi32(load4(xm + at));
                    for (int g = 0; g < ng; g++) {
                        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w[g] + b * bb + 2 * GR + 32 * s));
                        /* w * sign(x) times |x|: both instructions take one unsigned operand */
                        dot[g * mt + i] = DOT8(dot[g * mt + i], xmag, _mm256_sign_epi8(wv, xsign));
                    }
                }
            }
        }
        for (int g = 0; g < ng; g++) {
            for (int i = 0; i < mt; i++) {
                __m256i d = dot[g * mt + i];
                if (bits == 5) d = _mm256_sub_epi32(d, _mm256_set1_epi32(a->sum16[(i0 + i) * a->nb + b]));
                const __m256 sc = _mm256_mul_ps(ws[g], _mm256_set1_ps(xs[i * a->nb + b]));
                acc[g * mt + i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, acc[g * mt + i]);
            }
        }
    }
    for (int c = 0; c < ng * mt; c++) _mm256_storeu_ps(out + c * GR, acc[c]);
}


ROWS_TARGET static void GROUPS(const uint8_t *const *w, int ng, const acts *a, int64_t i0, int mt,
                                    float *out) {
    switch ((a->bits == 5 ? 64 : 0) + ng * 8 + mt) {
    case 8 + 1: ROWS(w, 1, a, i0, 1, 8, out); break;
    case 8 + 2: ROWS(w, 1, a, i0, 2, 8, out); break;
    case 8 + 3: ROWS(w, 1, a, i0, 3, 8, out); break;
    case 8 + 4: ROWS(w, 1, a, i0, 4, 8, out); break;
    case 16 + 1: ROWS(w, 2, a, i0, 1, 8, out); break;
    case 16 + 2: ROWS(w, 2, a, i0, 2, 8, out); break;
    case 24 + 1: ROWS(w, 3, a, i0, 1, 8, out); break;
    case 32 + 1: ROWS(w, 4, a, i0, 1, 8, out); break;
    case 64 + 8 + 1: ROWS(w, 1, a, i0, 1, 5, out); break;
    case 64 + 8 + 2: ROWS(w, 1, a, i0, 2, 5, out); break;
    case 64 + 8 + 3: ROWS(w, 1, a, i0, 3, 5, out); break;
    case 64 + 8 + 4: ROWS(w, 1, a, i0, 4, 5, out); break;
    case 64 + 16 + 1: ROWS(w, 2, a, i0, 1, 5, out); break;
    case 64 + 16 + 2: ROWS(w, 2, a, i0, 2, 5, out); break;
    case 64 + 24 + 1: ROWS(w, 3, a, i0, 1, 5, out); break;
    case 64 + 32 + 1: ROWS(w, 4, a, i0, 1, 5, out); break;
    default: groups_scalar(w, ng, a, i0, mt, out); break; /* no pass of the driver's has another shape */
    }
}

#undef ROWS_TARGET
#undef ROWS
#undef GROUPS
#undef DOT8
#undef DOT5
#undef FOLD5
