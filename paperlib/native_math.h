/* Math shared by paperlib's native kernels: flush-to-zero guards and a branch-free exp that vectorizes. */
#ifndef PAPERLIB_NATIVE_MATH_H
#define PAPERLIB_NATIVE_MATH_H
#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* Flush denormals to zero while a chunk runs (denormal products are ~100x slower on x86); the caller's MXCSR
   is restored afterwards. */
#define FTZ_ON unsigned int csr_saved = _mm_getcsr(); _mm_setcsr(csr_saved | 0x8040);
#define FTZ_OFF _mm_setcsr(csr_saved);
#else
#define FTZ_ON
#define FTZ_OFF
#endif

/* exp on [-87, 0] (float) / [-708, 0] (double) with Cody-Waite reduction and a Taylor polynomial (error
   < 2 ulp); below the range 0, NaN propagates. Branch-free so that the tile loops vectorize. */
static inline float exp_f32(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = n * -0.693359375f + xc;
    r = n * 2.12194440e-4f + r;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } u;
    u.i = ((int32_t)n + 127) << 23;
    float y = p * u.f;
    y = x < -87.0f ? 0.0f : y;
    return x != x ? x : y;
}

static inline double exp_f64(double x) {
    double xc = x < -708.0 ? -708.0 : x;
    xc = xc > 709.0 ? 709.0 : xc;
    double n = (xc * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
    double r = n * -6.93147180369123816490e-01 + xc;
    r = n * -1.90821492927058770002e-10 + r;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    union { int64_t i; double f; } u;
    u.i = ((int64_t)n + 1023) << 52;
    double y = p * u.f;
    y = x < -708.0 ? 0.0 : y;
    return x != x ? x : y;
}

#endif
