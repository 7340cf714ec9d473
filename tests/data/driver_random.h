/* What the C test drivers (the files named *_driver.c beside it) share: a fixed random generator, so
   every build on every architecture draws the same inputs, and the hash their checksums are made with.
   Each driver includes it by a quoted #include, which finds it beside the driver. */

#ifndef LONGDOC_DRIVER_RANDOM_H
#define LONGDOC_DRIVER_RANDOM_H

#include <stddef.h>
#include <stdint.h>

static uint64_t state = 0x9e3779b97f4a7c15ull;

static uint32_t next(void) { /* xorshift64* */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return (uint32_t)((state * 0x2545f4914f6cdd1dull) >> 32);
}

static float uniform(void) { return (float)(next() >> 8) / 16777216.f * 2.f - 1.f; } /* [-1, 1) */

static uint64_t fnv(uint64_t h, const void *p, size_t size) { /* FNV-1a, 64 bits */
    const uint8_t *b = p;
    for (size_t i = 0; i < size; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

#endif
