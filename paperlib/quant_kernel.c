/* paperlib.quant native CPU kernels: the per-tensor standardising weight quantizers of ClimbQ (Gaussian
   CDF levels) and LifeQuant ("standardize"), many tensors per call, and ClimbQ's activation quantizer.

   Weights arrive as arrays of data pointers and sizes (one entry per layer): nothing is concatenated. Work is cut
   into chunks of at most CHUNK elements of one tensor; chunks run on OpenMP threads and their float64 partial
   sums are added in chunk order, so every result is independent of the thread count.

   Levels are exact: round(n Phi(a)) is the number of thresholds t_i = Phi^-1((i + 1/2)/n), i < n, at or below a,
   with t_i given by the caller already rounded up to the float type (then a >= t_i in floats is exactly a >= the
   real threshold). Counted linearly for n < 32, by binary search above. NaN stays NaN. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "native_math.h"

#define CHUNK 4096
#define TILE 64
#define INV_SQRT_2PI 0.39894228040143267794

typedef struct { int64_t seg, start, len; } chunk_t;

/* Chunks of all segments in order; *out must be freed. Returns the count, -1 when out of memory. */
static int64_t make_chunks(int64_t nseg, const int64_t *sizes, chunk_t **out) {
    int64_t total = 0;
    for (int64_t s = 0; s < nseg; s++) total += (sizes[s] + CHUNK - 1) / CHUNK;
    chunk_t *c = (chunk_t *)malloc(sizeof(chunk_t) * (size_t)(total > 0 ? total : 1));
    if (!c) return -1;
    int64_t k = 0;
    for (int64_t s = 0; s < nseg; s++)
        for (int64_t o = 0; o < sizes[s]; o += CHUNK) {
            c[k].seg = s; c[k].start = o; c[k].len = sizes[s] - o < CHUNK ? sizes[s] - o : CHUNK; k++;
        }
    *out = c;
    return total;
}

/* The chunks of a call plus per-chunk float64 partial sums (nsums per chunk) and their per-tensor totals. */
typedef struct { chunk_t *ch; int64_t nc; int nsums; double *part, *acc; } plan_t;

static int plan_init(plan_t *p, int64_t nseg, const int64_t *sizes, int nsums) {
    p->nsums = nsums; p->part = NULL; p->acc = NULL;
    p->nc = make_chunks(nseg, sizes, &p->ch);
    if (p->nc < 0) return 1;
    p->part = (double *)malloc(sizeof(double) * (size_t)nsums * (size_t)(p->nc > 0 ? p->nc : 1));
    p->acc = (double *)malloc(sizeof(double) * (size_t)nsums * (size_t)(nseg > 0 ? nseg : 1));
    if (!p->part || !p->acc) { free(p->part); free(p->acc); free(p->ch); return 1; }
    return 0;
}

/* acc = the chunks' partial sums added per tensor in chunk order (the same for any thread count). */
static void plan_reduce(plan_t *p, int64_t nseg) {
    for (int64_t i = 0; i < nseg * p->nsums; i++) p->acc[i] = 0;
    for (int64_t c = 0; c < p->nc; c++)
        for (int j = 0; j < p->nsums; j++) p->acc[p->ch[c].seg * p->nsums + j] += p->part[c * p->nsums + j];
}

static void plan_free(plan_t *p) { free(p->part); free(p->acc); free(p->ch); }

#define DEFINE_KERNELS(T, SFX)                                                                               \
static inline int64_t level_##SFX(T a, const T *thr, int n) {                                               \
    int64_t idx = 0;                                                                                        \
    if (n < 32) {                                                                                           \
        for (int i = 0; i < n; i++) idx += a >= thr[i];                                                     \
    } else {                                                                                                \
        for (int step = (n + 1) >> 1; step >= 1; step >>= 1) idx += (a >= thr[idx + step - 1]) ? step : 0; \
    }                                                                                                       \
    return idx;                                                                                             \
}                                                                                                           \
                                                                                                            \
/* q[b] = (level(a[b]) / div - sub) * mul for a tile of nb <= TILE values (NaN stays NaN); the linear count \
   runs threshold by threshold over the tile so that it vectorizes. */                                      \
static inline void levels_tile_##SFX(const T *a, int nb, const T *thr, int n, T div, T sub, T mul, T *q) {   \
    T cnt[TILE];                                                                                            \
    if (n < 64) {                                                                                           \
        for (int b = 0; b < TILE; b++) cnt[b] = 0;                                                          \
        for (int k = 0; k < n; k++) {                                                                       \
            const T t = thr[k];                                                                             \
            _Pragma("omp simd")                                                                             \
            for (int b = 0; b < TILE; b++) cnt[b] += a[b] >= t ? (T)1 : (T)0;                               \
        }                                                                                                   \
    } else {                                                                                                \
        for (int b = 0; b < nb; b++) cnt[b] = (T)level_##SFX(a[b], thr, n);                                 \
    }                                                                                                       \
    for (int b = 0; b < nb; b++) { T v = (cnt[b] / div - sub) * mul; q[b] = a[b] != a[b] ? a[b] : v; }      \
}                                                                                                           \
                                                                                                            \
/* Per tensor: mean and unbiased std, two passes in float64 (rounded to T at the end). */                   \
int segment_mean_std_##SFX(int64_t nseg, const int64_t *ptrs, const int64_t *sizes, T *mean, T *std_,       \
                           int nthreads) {                                                                  \
    plan_t P;                                                                                               \
    if (plan_init(&P, nseg, sizes, 1)) return 1;                                                            \
    const chunk_t *ch = P.ch;                                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(P.nc > 1)")                         \
    for (int64_t c = 0; c < P.nc; c++) {                                                                    \
        const T *w = (const T *)(intptr_t)ptrs[ch[c].seg] + ch[c].start;                                    \
        double acc = 0;                                                                                     \
        _Pragma("omp simd reduction(+:acc)")                                                                \
        for (int64_t i = 0; i < ch[c].len; i++) acc += w[i];                                                \
        P.part[c] = acc;                                                                                    \
    }                                                                                                       \
    plan_reduce(&P, nseg);                                                                                  \
    double *m = (double *)malloc(sizeof(double) * (size_t)(nseg > 0 ? nseg : 1));                           \
    if (!m) { plan_free(&P); return 1; }                                                                    \
    for (int64_t s = 0; s < nseg; s++) { m[s] = P.acc[s] / (double)sizes[s]; mean[s] = (T)m[s]; }            \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(P.nc > 1)")                         \
    for (int64_t c = 0; c < P.nc; c++) {                                                                    \
        const T *w = (const T *)(intptr_t)ptrs[ch[c].seg] + ch[c].start;                                    \
        const double mu = m[ch[c].seg];                                                                     \
        double acc = 0;                                                                                     \
        _Pragma("omp simd reduction(+:acc)")                                                                \
        for (int64_t i = 0; i < ch[c].len; i++) { double d = (double)w[i] - mu; acc += d * d; }             \
        P.part[c] = acc;                                                                                    \
    }                                                                                                       \
    plan_reduce(&P, nseg);                                                                                  \
    for (int64_t s = 0; s < nseg; s++) std_[s] = (T)sqrt(P.acc[s] / (double)(sizes[s] - 1));                \
    free(m); plan_free(&P);                                                                                 \
    return 0;                                                                                               \
}                                                                                                           \
                                                                                                            \
/* ClimbQ weights: a = (w - mean) rec, out = idx / (n/2) - 1 (the torch path's ops on the level index). */  \
int climbq_weights_forward_##SFX(int64_t nseg, const int64_t *ptrs, const int64_t *sizes, const int64_t *outs,\
                                 const T *mean, const T *rec, const T *thr, int n, int nthreads) {          \
    chunk_t *ch; int64_t nc = make_chunks(nseg, sizes, &ch);                                                \
    if (nc < 0) return 1;                                                                                   \
    const T half_n = (T)n / (T)2;                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nc > 1)")                           \
    for (int64_t c = 0; c < nc; c++) {                                                                      \
        const int64_t s = ch[c].seg;                                                                        \
        const T *w = (const T *)(intptr_t)ptrs[s] + ch[c].start;                                            \
        T *o = (T *)(intptr_t)outs[s] + ch[c].start;                                                        \
        const T mu = mean[s], r = rec[s];                                                                   \
        T a[TILE];                                                                                          \
        for (int64_t i = 0; i < ch[c].len; i += TILE) {                                                     \
            const int nb = ch[c].len - i < TILE ? (int)(ch[c].len - i) : TILE;                              \
            for (int b = 0; b < TILE; b++) a[b] = b < nb ? (w[i + b] - mu) * r : (T)0;                      \
            levels_tile_##SFX(a, nb, thr, n, half_n, (T)1, (T)1, o + i);                                    \
        }                                                                                                   \
    }                                                                                                       \
    free(ch);                                                                                               \
    return 0;                                                                                               \
}                                                                                                           \
                                                                                                            \
/* LifeQuant "standardize" weights: z = (w - mean) / s, out = rint(z scale) / n with scale = std n when std is \
   a power of two (else rint((z std) n) / n), the torch path's ops. */                                      \
int lifequant_weights_forward_##SFX(int64_t nseg, const int64_t *ptrs, const int64_t *sizes, const int64_t *outs,\
                                    const T *mean, const T *sd, T std_, int merged, int n, int nthreads) {  \
    chunk_t *ch; int64_t nc = make_chunks(nseg, sizes, &ch);                                                \
    if (nc < 0) return 1;                                                                                   \
    const T tn = (T)n, sn = std_ * tn;                                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nc > 1)")                           \
    for (int64_t c = 0; c < nc; c++) {                                                                      \
        const int64_t s = ch[c].seg;                                                                        \
        const T *w = (const T *)(intptr_t)ptrs[s] + ch[c].start;                                            \
        T *o = (T *)(intptr_t)outs[s] + ch[c].start;                                                        \
        const T mu = mean[s], d = sd[s];                                                                    \
        if (merged) {                                                                                       \
            _Pragma("omp simd")                                                                             \
            for (int64_t i = 0; i < ch[c].len; i++) o[i] = rint(((w[i] - mu) / d) * sn) / tn;               \
        } else {                                                                                            \
            _Pragma("omp simd")                                                                             \
            for (int64_t i = 0; i < ch[c].len; i++) o[i] = rint((((w[i] - mu) / d) * std_) * tn) / tn;      \
        }                                                                                                   \
    }                                                                                                       \
    free(ch);                                                                                               \
    return 0;                                                                                               \
}                                                                                                           \
                                                                                                            \
/* Backward of both weight quantizers through a = (w - mean w) / std w (straight-through rounding), with     \
   h = sqrt(2 pi) phi(a) g for ClimbQ's 2 U(Phi(a)) - 1 (cdf = 1, second = 1/std) and h = g for LifeQuant's   \
   Q(std_ a) (cdf = 0, second = std): gw = (h - mean h - a <h, a> / (N - 1)) scale, scale = 2 rec / sqrt(2 pi) \
   or std_ / std. Phase 1 keeps h in gw and sums per chunk; phase 2 finishes gw in place. */                \
int standardized_weights_backward_##SFX(int64_t nseg, const int64_t *ptrs, const int64_t *gptrs,            \
                                        const int64_t *sizes, const int64_t *gouts, const T *mean,          \
                                        const T *second, int cdf, T std_, int nthreads) {                   \
    plan_t P;                                                                                               \
    if (plan_init(&P, nseg, sizes, 2)) return 1;                                                            \
    const chunk_t *ch = P.ch;                                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(P.nc > 1)")                         \
    for (int64_t c = 0; c < P.nc; c++) {                                                                    \
        const int64_t s = ch[c].seg, len = ch[c].len;                                                       \
        const T *w = (const T *)(intptr_t)ptrs[s] + ch[c].start;                                            \
        const T *g = (const T *)(intptr_t)gptrs[s] + ch[c].start;                                           \
        T *gw = (T *)(intptr_t)gouts[s] + ch[c].start;                                                      \
        const T mu = mean[s], v = second[s];                                                                \
        double s1 = 0, s2 = 0;                                                                              \
        FTZ_ON                                                                                              \
        if (cdf) {                                                                                          \
            _Pragma("omp simd reduction(+:s1, s2)")                                                         \
            for (int64_t i = 0; i < len; i++) {                                                             \
                T a = (w[i] - mu) * v, h = exp_##SFX((T)-0.5 * a * a) * g[i];                               \
                gw[i] = h; s1 += h; s2 += (double)h * a;                                                    \
            }                                                                                               \
        } else {                                                                                            \
            _Pragma("omp simd reduction(+:s1, s2)")                                                         \
            for (int64_t i = 0; i < len; i++) { T a = (w[i] - mu) / v; gw[i] = g[i]; s1 += g[i]; s2 += (double)g[i] * a; }\
        }                                                                                                   \
        FTZ_OFF                                                                                             \
        P.part[2 * c] = s1; P.part[2 * c + 1] = s2;                                                         \
    }                                                                                                       \
    plan_reduce(&P, nseg);                                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(P.nc > 1)")                         \
    for (int64_t c = 0; c < P.nc; c++) {                                                                    \
        const int64_t s = ch[c].seg, len = ch[c].len;                                                       \
        const T *w = (const T *)(intptr_t)ptrs[s] + ch[c].start;                                            \
        T *gw = (T *)(intptr_t)gouts[s] + ch[c].start;                                                      \
        const T mu = mean[s], v = second[s];                                                                \
        const T c0 = (T)(P.acc[2 * s] / (double)sizes[s]), c1 = (T)(P.acc[2 * s + 1] / (double)(sizes[s] - 1));\
        if (cdf) {                                                                                          \
            const T sc = v * (T)(2 * INV_SQRT_2PI);                                                         \
            _Pragma("omp simd")                                                                             \
            for (int64_t i = 0; i < len; i++) { T a = (w[i] - mu) * v; gw[i] = (gw[i] - c0 - a * c1) * sc; }\
        } else {                                                                                            \
            const T sc = std_ / v;                                                                          \
            _Pragma("omp simd")                                                                             \
            for (int64_t i = 0; i < len; i++) { T a = (w[i] - mu) / v; gw[i] = (gw[i] - c0 - a * c1) * sc; }\
        }                                                                                                   \
    }                                                                                                       \
    plan_free(&P);                                                                                          \
    return 0;                                                                                               \
}                                                                                                           \
                                                                                                            \
/* ClimbQ activations: a = x rec_b (rec per sample b = i / inner, or one value when inner == 0), out =      \
   (idx / div - sub) mul, the torch path's ops on the level index. */                                      \
int climbq_act_forward_##SFX(int64_t numel, int64_t inner, const T *x, const T *rec, T *out, const T *thr,   \
                             int n, T div, T sub, T mul, int nthreads) {                                    \
    const int64_t nc = (numel + CHUNK - 1) / CHUNK;                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nc > 1)")                           \
    for (int64_t c = 0; c < nc; c++) {                                                                      \
        const int64_t end = (c + 1) * CHUNK < numel ? (c + 1) * CHUNK : numel;                              \
        int64_t i = c * CHUNK;                                                                              \
        while (i < end) {                                                                                   \
            const int64_t b = inner ? i / inner : 0;                                                        \
            const int64_t stop = inner && (b + 1) * inner < end ? (b + 1) * inner : end;                    \
            const T r = rec[b];                                                                             \
            T a[TILE];                                                                                      \
            for (int64_t j = i; j < stop; j += TILE) {                                                      \
                const int nb = stop - j < TILE ? (int)(stop - j) : TILE;                                    \
                for (int t = 0; t < TILE; t++) a[t] = t < nb ? x[j + t] * r : (T)0;                         \
                levels_tile_##SFX(a, nb, thr, n, div, sub, mul, out + j);                                   \
            }                                                                                               \
            i = stop;                                                                                       \
        }                                                                                                   \
    }                                                                                                       \
    return 0;                                                                                               \
}                                                                                                           \
                                                                                                            \
/* gx = exp(-(x rec)^2 / 2) g coef_b, coef = 2 R rec / sqrt(2 pi). */                                       \
int climbq_act_backward_##SFX(int64_t numel, int64_t inner, const T *x, const T *g, const T *rec, T act_range,\
                              T *gx, int nthreads) {                                                        \
    const int64_t nc = (numel + CHUNK - 1) / CHUNK;                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nc > 1)")                           \
    for (int64_t c = 0; c < nc; c++) {                                                                      \
        const int64_t end = (c + 1) * CHUNK < numel ? (c + 1) * CHUNK : numel;                              \
        FTZ_ON                                                                                              \
        if (inner) {                                                                                        \
            int64_t i = c * CHUNK;                                                                          \
            while (i < end) {                                                                               \
                const int64_t b = i / inner, stop = (b + 1) * inner < end ? (b + 1) * inner : end;          \
                const T r = rec[b], coef = (T)(2 * INV_SQRT_2PI) * act_range * r;                          \
                _Pragma("omp simd")                                                                         \
                for (int64_t j = i; j < stop; j++) { T a = x[j] * r; gx[j] = exp_##SFX((T)-0.5 * a * a) * g[j] * coef; }\
                i = stop;                                                                                   \
            }                                                                                               \
        } else {                                                                                            \
            const T r = rec[0], coef = (T)(2 * INV_SQRT_2PI) * act_range * r;                               \
            _Pragma("omp simd")                                                                             \
            for (int64_t j = c * CHUNK; j < end; j++) { T a = x[j] * r; gx[j] = exp_##SFX((T)-0.5 * a * a) * g[j] * coef; }\
        }                                                                                                   \
        FTZ_OFF                                                                                             \
    }                                                                                                       \
    return 0;                                                                                               \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
