/* What longdoc's C kernels share (q8.c, attn16.c, int5.c, flash16.c): 16-bit floats to and from float32
   in scalar code, exactly, Cephes' expf constants, a block's largest magnitude, a probe of the paths kept
   after its first call, and on x86 the probe of the AVX2 paths.

   Each kernel includes it by a quoted #include; longdoc.native pastes it in place of that line before
   hashing and compiling a kernel, so a built library's name covers it and its cached copy of the
   source stands alone. Test drivers that compile a kernel by its path find it beside the kernel. */

#ifndef LONGDOC_HALVES_H
#define LONGDOC_HALVES_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* float16 bits -> float, exactly (subnormals, infinities and NaN included). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1fu) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400u)) {
            man <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Cephes' expf, shared by attn16's softmax and q8's silu: exp(t) = 2^n exp(r) with n = round(t log2 e)
   (adding and taking away EXP_MAGIC rounds to an integer), r = t - n ln 2 in two steps (n * EXP_LN2_HI is
   exact), exp(r) = 1 + r + r^2 P(r), P's coefficients EXP_P0..EXP_P5 from the highest degree down. */
#define EXP_MAGIC 12582912.f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

/* The largest |x| of a block of 32 floats, on their bits (non-negative floats order as their bits do),
   which compilers vectorize, unlike a float maximum (NaN). */
static inline float block_amax(const float *x) {
    int32_t top = 0;
    for (int j = 0; j < 32; j++) {
        int32_t v;
        memcpy(&v, x + j, 4);
        v &= 0x7fffffff;
        top = v > top ? v : top;
    }
    float amax;
    memcpy(&amax, &top, 4);
    return amax;
}

/* `probe()`'s answer (a bit per path, never 0), kept in `*known` after the first call: CPUID traps to the
   hypervisor in a virtual machine (9 us a call measured on a KVM guest). Threads that race to the first
   probe all store the same value. */
static inline int probed_once(int *known, int (*probe)(void)) {
    int paths = __atomic_load_n(known, __ATOMIC_RELAXED);
    if (!paths) {
        paths = probe();
        __atomic_store_n(known, paths, __ATOMIC_RELAXED);
    }
    return paths;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

/* AVX2, FMA and F16C: what the AVX2 paths use. */
static inline int have_avx2(void) {
    unsigned eax, ebx, ecx, edx;
    /* F16C (CPUID 1, ECX bit 29) by hand: clang (14 at least) refuses __builtin_cpu_supports("f16c") */
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 29))) return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

#endif
