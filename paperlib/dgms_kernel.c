/* paperlib.dgms native CPU kernel: S(w) (docs/dgms.md, 'Soft assignment') and its backward, one pass per tile. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "native_math.h"

#define TILE 32
#define CHUNK_TILES 16
#define HALF_LOG_2PI 0.91893853320467274178
#define SIGMA_MIN 1e-8
#define TAU_MIN 1e-4

#define DEFINE_KERNELS(T, SFX)                                                                               \
/* One tile: L = log pi~ N, r = exp(L - M) / (sum exp(L - M) + exp(log EPS - M)) with M = max(L, log EPS),  \
   Z = r / tau (or L / tau), E = exp(Z - max Z); se = sum E, num = sum m E. */                              \
static void tile_##SFX(int K, const T *x, const T *m, const T *iv, const T *lp, T tau_, int faithful,       \
                       T log_eps, T *L, T *P, T *Z, T *E, T *inv, T *se, double *num) {                         \
    T M[TILE], zmax[TILE];                                                                                  \
    for (int b = 0; b < TILE; b++) M[b] = log_eps;                                                          \
    for (int k = 0; k < K; k++) {                                                                           \
        const T mk = m[k], ivk = iv[k], lpk = lp[k];                                                        \
        T *Lk = L + k * TILE;                                                                               \
        _Pragma("omp simd")                                                                                 \
        for (int b = 0; b < TILE; b++) {                                                                    \
            T d = x[b] - mk;                                                                                \
            T l = lpk - (T)0.5 * (d * d * ivk);                                                             \
            Lk[b] = l;                                                                                      \
            M[b] = l > M[b] ? l : M[b];                                                                     \
        }                                                                                                   \
    }                                                                                                       \
    _Pragma("omp simd")                                                                                     \
    for (int b = 0; b < TILE; b++) inv[b] = exp_##SFX(log_eps - M[b]);                                      \
    for (int k = 0; k < K; k++) {                                                                           \
        const T *Lk = L + k * TILE; T *Pk = P + k * TILE;                                                   \
        _Pragma("omp simd")                                                                                 \
        for (int b = 0; b < TILE; b++) { T p = exp_##SFX(Lk[b] - M[b]); Pk[b] = p; inv[b] += p; }          \
    }                                                                                                       \
    for (int b = 0; b < TILE; b++) { inv[b] = (T)1 / inv[b]; zmax[b] = -(T)1 / (T)0; }                      \
    for (int k = 0; k < K; k++) {                                                                           \
        const T *Lk = L + k * TILE; T *Pk = P + k * TILE, *Zk = Z + k * TILE;                               \
        _Pragma("omp simd")                                                                                 \
        for (int b = 0; b < TILE; b++) {                                                                    \
            T r = Pk[b] * inv[b];                                                                           \
            Pk[b] = r;                                                                                      \
            T z = (faithful ? r : Lk[b]) / tau_;                                                            \
            Zk[b] = z;                                                                                      \
            zmax[b] = z > zmax[b] ? z : zmax[b];                                                            \
        }                                                                                                   \
    }                                                                                                       \
    for (int b = 0; b < TILE; b++) { se[b] = 0; num[b] = 0; }                                                        \
    for (int k = 0; k < K; k++) {                                                                           \
        const T mk = m[k]; const T *Zk = Z + k * TILE; T *Ek = E + k * TILE;                                \
        _Pragma("omp simd")                                                                                 \
        for (int b = 0; b < TILE; b++) {                                                                    \
            T e = exp_##SFX(Zk[b] - zmax[b]);                                                               \
            Ek[b] = e; se[b] += e; num[b] += (double)mk * e;                                                         \
        }                                                                                                   \
    }                                                                                                       \
}                                                                                                           \
                                                                                                            \
static int params_##SFX(int K, const T *s, const T *pi, T **iv, T **lp) {                                  \
    *iv = (T *)malloc(sizeof(T) * 2 * (size_t)K);                                                           \
    if (!*iv) return 1;                                                                                     \
    *lp = *iv + K;                                                                                          \
    for (int k = 0; k < K; k++) {                                                                           \
        (*iv)[k] = (T)1 / (s[k] * s[k]);                                                                    \
        (*lp)[k] = (T)log(pi[k]) - (T)log(s[k]) - (T)HALF_LOG_2PI;                                          \
    }                                                                                                       \
    return 0;                                                                                               \
}                                                                                                           \
                                                                                                            \
int dgms_forward_##SFX(int64_t n, int K, const T *w, const T *m, const T *sig, const T *pi, const T *tau,   \
                       int faithful, T log_eps, T *out, int nthreads) {                                     \
    const int64_t chunk = (int64_t)TILE * CHUNK_TILES, nchunks = (n + chunk - 1) / chunk;                   \
    const T tau0 = tau[0];                                                                                  \
    T *iv, *lp;                                                                                             \
    if (params_##SFX(K, sig, pi, &iv, &lp)) return 1;                                                       \
    int failed = 0;                                                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nchunks > 1) reduction(|:failed)")  \
    for (int64_t c = 0; c < nchunks; c++) {                                                                 \
        T *scratch = (T *)malloc(sizeof(T) * 4 * (size_t)K * TILE);                                         \
        if (!scratch) { failed = 1; continue; }                                                             \
        FTZ_ON                                                                                              \
        T *L = scratch, *P = L + K * TILE, *Z = P + K * TILE, *E = Z + K * TILE;                            \
        T x[TILE], inv[TILE], se[TILE]; double num[TILE];                                                            \
        const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;                                      \
        for (int64_t s = c * chunk; s < end; s += TILE) {                                                   \
            int nb = end - s < TILE ? (int)(end - s) : TILE;                                                \
            for (int b = 0; b < TILE; b++) x[b] = b < nb ? w[s + b] : (T)0;                                 \
            tile_##SFX(K, x, m, iv, lp, tau0, faithful  , log_eps, L, P, Z, E, inv, se, num);              \
            for (int b = 0; b < nb; b++) out[s + b] = (T)(num[b] / se[b]);                                           \
        }                                                                                                   \
        FTZ_OFF                                                                                             \
        free(scratch);                                                                                      \
    }                                                                                                       \
    free(iv);                                                                                               \
    return failed;                                                                                          \
}                                                                                                           \
                                                                                                            \
/* Per chunk, in float64: [sum g a_k | sum lam_k d_k / s_k^2 | sum lam_k (q_k - 1) | sum lam_k | sum zeta z]; \
   added over chunks in order (the same result for any thread count). gp (3K+1): dL/dm, dL/ds, dL/dpi~,     \
   dL/dtau. */                                                                                              \
int dgms_backward_##SFX(int64_t n, int K, const T *w, const T *g, const T *m, const T *sig, const T *pi,    \
                        const T *tau, int faithful, T log_eps, T *gw, T *gp, int nthreads) {                \
    const int64_t chunk = (int64_t)TILE * CHUNK_TILES, nchunks = (n + chunk - 1) / chunk;                   \
    const int na = 4 * K + 1;                                                                               \
    const T tau0 = tau[0];                                                                                  \
    T *iv, *lp;                                                                                             \
    if (params_##SFX(K, sig, pi, &iv, &lp)) return 1;                                                       \
    double *part = (double *)calloc((size_t)(nchunks + 1) * na, sizeof(double));                            \
    if (!part) { free(iv); return 1; }                                                                      \
    double *acc = part + nchunks * na;                                                                      \
    int failed = 0;                                                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nchunks > 1) reduction(|:failed)")  \
    for (int64_t c = 0; c < nchunks; c++) {                                                                 \
        T *scratch = (T *)malloc(sizeof(T) * 8 * (size_t)K * TILE);                                         \
        if (!scratch) { failed = 1; continue; }                                                             \
        FTZ_ON                                                                                              \
        T *L = scratch, *P = L + K * TILE, *Z = P + K * TILE, *E = Z + K * TILE;                            \
        T x[TILE], gg[TILE], inv[TILE], S[TILE], t[TILE], gx[TILE], gt[TILE], se[TILE]; double num[TILE];            \
        T *AG = E + K * TILE, *ALD = AG + K * TILE, *ALQ = ALD + K * TILE, *AL = ALQ + K * TILE;            \
        memset(AG, 0, sizeof(T) * 4 * (size_t)K * TILE);                                                    \
        double gt_acc = 0;                                                                                  \
        const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;                                      \
        for (int64_t s = c * chunk; s < end; s += TILE) {                                                   \
            int nb = end - s < TILE ? (int)(end - s) : TILE;                                                \
            for (int b = 0; b < TILE; b++) {                                                                \
                x[b] = b < nb ? w[s + b] : (T)0; gg[b] = b < nb ? g[s + b] : (T)0;                          \
            }                                                                                               \
            tile_##SFX(K, x, m, iv, lp, tau0, faithful  , log_eps, L, P, Z, E, inv, se, num);               \
            for (int b = 0; b < TILE; b++) {                                                                \
                S[b] = (T)(num[b] / se[b]); inv[b] = gg[b] / se[b]; t[b] = 0; gx[b] = 0; gt[b] = 0;             \
            }                                                                                               \
            for (int k = 0; k < K; k++) {                                                                   \
                const T mk = m[k]; const T *Pk = P + k * TILE, *Zk = Z + k * TILE; T *Ek = E + k * TILE;    \
                T *AGk = AG + k * TILE;                                                                     \
                _Pragma("omp simd")                                                                         \
                for (int b = 0; b < TILE; b++) {                                                            \
                    T ga = Ek[b] * inv[b];                                                                  \
                    T zeta = ga * (mk - S[b]);                                                              \
                    gt[b] += Ek[b] != 0 ? zeta * Zk[b] : (T)0;                                              \
                    AGk[b] += ga;                                                                           \
                    T rho = zeta / tau0;                                                                    \
                    Ek[b] = rho;                                                                            \
                    t[b] += rho * Pk[b];                                                                    \
                }                                                                                           \
            }                                                                                               \
            for (int k = 0; k < K; k++) {                                                                   \
                const T mk = m[k], ivk = iv[k]; const T *Pk = P + k * TILE, *Ek = E + k * TILE;             \
                T *ALDk = ALD + k * TILE, *ALQk = ALQ + k * TILE, *ALk = AL + k * TILE;                     \
                _Pragma("omp simd")                                                                         \
                for (int b = 0; b < TILE; b++) {                                                            \
                    T lam = faithful ? Pk[b] * (Ek[b] - t[b]) : Ek[b];                                      \
                    T d = x[b] - mk;                                                                        \
                    T lamd = lam * d * ivk;                                                                 \
                    gx[b] -= lamd;                                                                          \
                    ALDk[b] += lamd; ALQk[b] += lam * (d * d * ivk - (T)1); ALk[b] += lam;                  \
                }                                                                                           \
            }                                                                                               \
            for (int b = 0; b < nb; b++) gw[s + b] = gx[b];                                                 \
            for (int b = 0; b < TILE; b++) gt_acc += gt[b]; /* ill-conditioned sum: float64 per tile */     \
        }                                                                                                   \
        double *pa = part + c * na;                                                                         \
        for (int j = 0; j < 4 * K; j++) {                                                                   \
            double acc_j = 0;                                                                               \
            for (int b = 0; b < TILE; b++) acc_j += AG[j * TILE + b];                                       \
            pa[j] = acc_j;                                                                                  \
        }                                                                                                   \
        pa[4 * K] = gt_acc;                                                                                 \
        FTZ_OFF                                                                                             \
        free(scratch);                                                                                      \
    }                                                                                                       \
    for (int64_t c = 0; c < nchunks; c++)                                                                   \
        for (int j = 0; j < na; j++) acc[j] += part[c * na + j];                                            \
    for (int k = 0; k < K; k++) {                                                                           \
        gp[k] = (T)(acc[k] + acc[K + k]);                                                                   \
        gp[K + k] = (T)acc[2 * K + k] / sig[k];                                                             \
        gp[2 * K + k] = pi[k] > 0 ? (T)acc[3 * K + k] / pi[k] : (T)0;                                       \
    }                                                                                                       \
    gp[3 * K] = -(T)acc[4 * K] / tau[0];                                                                    \
    free(part);                                                                                             \
    free(iv);                                                                                               \
    return failed;                                                                                          \
}                                                                                                           \
/* A DGMSWeight layer from its raw parameters: m = [0, mu_rest], s = |sigma|, p = |pi| / sum |pi|, t = tau, with    \
   the guards of docs/dgms.md, 'Departures' (s >= SIGMA_MIN, t >= TAU_MIN; hits[0/1] += 1 when one fired) when      \
   guards != 0; the                                                                                                 \
   backward chains dL/d(m, s, p, t) through these maps exactly as autograd would (abs: sign, clamp: x >= min). */   \
static int prep_##SFX(int K, const T *mu_rest, const T *sigma, const T *pi, const T *tau, int guards, T *m, T *s,   \
                      T *p, T *t, T *asum) {                                                                        \
    T a = 0;                                                                                                        \
    int hit = 0;                                                                                                    \
    m[0] = 0;                                                                                                       \
    for (int k = 0; k < K; k++) {                                                                                   \
        if (k) m[k] = mu_rest[k - 1];                                                                               \
        T sk = sigma[k] < 0 ? -sigma[k] : sigma[k];                                                                 \
        if (guards && sk < (T)SIGMA_MIN) { sk = (T)SIGMA_MIN; hit = 1; }                                            \
        s[k] = sk;                                                                                                  \
        p[k] = pi[k] < 0 ? -pi[k] : pi[k];                                                                          \
        a += p[k];                                                                                                  \
    }                                                                                                               \
    for (int k = 0; k < K; k++) p[k] = p[k] / a;                                                                    \
    *asum = a;                                                                                                      \
    t[0] = guards && tau[0] < (T)TAU_MIN ? (T)TAU_MIN : tau[0];                                                     \
    return hit | (guards && tau[0] < (T)TAU_MIN ? 2 : 0);                                                           \
}                                                                                                                   \
\
int dgms_layer_forward_##SFX(int64_t n, int K, const T *w, const T *mu_rest, const T *sigma, const T *pi,           \
                             const T *tau, int faithful, int guards, T log_eps, T *out, int64_t *hits,              \
                             int nthreads) {                                                                        \
    T *buf = (T *)malloc(sizeof(T) * 3 * (size_t)K);                                                                \
    if (!buf) return 1;                                                                                             \
    T t, asum, *m = buf, *s = buf + K, *p = buf + 2 * K;                                                            \
    int hit = prep_##SFX(K, mu_rest, sigma, pi, tau, guards, m, s, p, &t, &asum);                                   \
    if (hits) { hits[0] += hit & 1; hits[1] += (hit >> 1) & 1; }                                                    \
    int err = dgms_forward_##SFX(n, K, w, m, s, p, &t, faithful, log_eps, out, nthreads);                           \
    free(buf);                                                                                                      \
    return err;                                                                                                     \
}                                                                                                                   \
\
int dgms_layer_backward_##SFX(int64_t n, int K, const T *w, const T *g, const T *mu_rest, const T *sigma,           \
                              const T *pi, const T *tau, int faithful, int guards, T log_eps, T *gw, T *gmu_rest,   \
                              T *gsigma, T *gpi, T *gtau, int nthreads) {                                           \
    T *buf = (T *)malloc(sizeof(T) * (6 * (size_t)K + 1));                                                          \
    if (!buf) return 1;                                                                                             \
    T t, asum, *m = buf, *s = buf + K, *p = buf + 2 * K, *gp = buf + 3 * K;                                         \
    prep_##SFX(K, mu_rest, sigma, pi, tau, guards, m, s, p, &t, &asum);                                             \
    int err = dgms_backward_##SFX(n, K, w, g, m, s, p, &t, faithful, log_eps, gw, gp, nthreads);                    \
    if (!err) {                                                                                                     \
        T dot = 0;                                                                                                  \
        for (int k = 0; k < K; k++) dot += gp[2 * K + k] * p[k];                                                    \
        for (int k = 0; k < K; k++) {                                                                               \
            if (k) gmu_rest[k - 1] = gp[k];                                                                         \
            T ga = sigma[k] > 0 ? (T)1 : sigma[k] < 0 ? (T)-1 : (T)0;                                               \
            T as = ga * sigma[k];                                                                                   \
            gsigma[k] = (guards && as < (T)SIGMA_MIN) ? (T)0 : gp[K + k] * ga;                                      \
            T gpk = (gp[2 * K + k] - dot) / asum;                                                                   \
            gpi[k] = gpk * (pi[k] > 0 ? (T)1 : pi[k] < 0 ? (T)-1 : (T)0);                                           \
        }                                                                                                           \
        gtau[0] = (guards && tau[0] < (T)TAU_MIN) ? (T)0 : gp[3 * K];                                               \
    }                                                                                                               \
    free(buf);                                                                                                      \
    return err;                                                                                                     \
}


DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
