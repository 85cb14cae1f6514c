/* CPU decoding kernels (AVX2 + FMA, OpenMP): a skinny fp32 GEMM, out = x @ w^T for a few rows
 * of x (with fused RMSNorm / SwiGLU prologues and a residual epilogue), and a one-call decode
 * attention (further down). The GEMM:
 *
 * Built and loaded by megatron_recycle/engines/cpu_gemm.py (gcc -O3 -mavx2 -mfma -fopenmp),
 * which also holds the reasons and the measurements. Layouts (all row-major, fp32):
 *   w   [N, K]  (row stride ldw >= K): a linear layer's weight, streamed once per call;
 *   x   [M, K]  read through any strides (sxm, sxk), M <= 64;
 *   out [M, N]  contiguous: out[m, n] = sum_k w[n, k] x[m, k].
 * x is first packed as xt [K, MP] (MP = M rounded up to a multiple of 8, zero padded) so that
 * one k step loads the whole column of x in MP/8 vectors and broadcasts one weight per output row: every weight is read from memory
 * exactly once per call, and the FMA units (not the memory bus, not the broadcasts) bound a tile.
 * Accumulation runs in k order in fp32, one accumulator per (n, m).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MP 64 /* the most rows one call takes (cpu_gemm.MAX_ROWS) */

/* 6 weight rows x 16 columns: 12 accumulators + 2 x vectors + 1 broadcast = 15 ymm registers. */
static void tile6x16(const float *w, int64_t ldw, int64_t K, const float *xt, int64_t ldx,
                     float *out, int64_t ldo) {
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw, *w4 = w + 4 * ldw,
                *w5 = w + 5 * ldw;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
           a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (int64_t k = 0; k < K; k++) {
        const float *xk = xt + k * ldx;
        __m256 x0 = _mm256_loadu_ps(xk), x1 = _mm256_loadu_ps(xk + 8), b;
        b = _mm256_broadcast_ss(w0 + k); a00 = _mm256_fmadd_ps(b, x0, a00); a01 = _mm256_fmadd_ps(b, x1, a01);
        b = _mm256_broadcast_ss(w1 + k); a10 = _mm256_fmadd_ps(b, x0, a10); a11 = _mm256_fmadd_ps(b, x1, a11);
        b = _mm256_broadcast_ss(w2 + k); a20 = _mm256_fmadd_ps(b, x0, a20); a21 = _mm256_fmadd_ps(b, x1, a21);
        b = _mm256_broadcast_ss(w3 + k); a30 = _mm256_fmadd_ps(b, x0, a30); a31 = _mm256_fmadd_ps(b, x1, a31);
        b = _mm256_broadcast_ss(w4 + k); a40 = _mm256_fmadd_ps(b, x0, a40); a41 = _mm256_fmadd_ps(b, x1, a41);
        b = _mm256_broadcast_ss(w5 + k); a50 = _mm256_fmadd_ps(b, x0, a50); a51 = _mm256_fmadd_ps(b, x1, a51);
    }
    _mm256_storeu_ps(out, a00);           _mm256_storeu_ps(out + 8, a01);
    _mm256_storeu_ps(out + ldo, a10);     _mm256_storeu_ps(out + ldo + 8, a11);
    _mm256_storeu_ps(out + 2 * ldo, a20); _mm256_storeu_ps(out + 2 * ldo + 8, a21);
    _mm256_storeu_ps(out + 3 * ldo, a30); _mm256_storeu_ps(out + 3 * ldo + 8, a31);
    _mm256_storeu_ps(out + 4 * ldo, a40); _mm256_storeu_ps(out + 4 * ldo + 8, a41);
    _mm256_storeu_ps(out + 5 * ldo, a50); _mm256_storeu_ps(out + 5 * ldo + 8, a51);
}

/* 6 weight rows x 8 columns (the last block when 8 or fewer columns remain). */
static void tile6x8(const float *w, int64_t ldw, int64_t K, const float *xt, int64_t ldx,
                    float *out, int64_t ldo) {
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw, *w4 = w + 4 * ldw,
                *w5 = w + 5 * ldw;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    for (int64_t k = 0; k < K; k++) {
        __m256 x0 = _mm256_loadu_ps(xt + k * ldx);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w0 + k), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w1 + k), x0, a1);
        a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(w2 + k), x0, a2);
        a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(w3 + k), x0, a3);
        a4 = _mm256_fmadd_ps(_mm256_broadcast_ss(w4 + k), x0, a4);
        a5 = _mm256_fmadd_ps(_mm256_broadcast_ss(w5 + k), x0, a5);
    }
    _mm256_storeu_ps(out, a0);           _mm256_storeu_ps(out + ldo, a1);
    _mm256_storeu_ps(out + 2 * ldo, a2); _mm256_storeu_ps(out + 3 * ldo, a3);
    _mm256_storeu_ps(out + 4 * ldo, a4); _mm256_storeu_ps(out + 5 * ldo, a5);
}

/* One weight row (the N % 6 tail), 8 columns at a time. */
static void row1(const float *w, int64_t K, const float *xt, int64_t MP, float *buf) {
    for (int64_t m0 = 0; m0 < MP; m0 += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++)
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + k), _mm256_loadu_ps(xt + k * MP + m0), a);
        _mm256_storeu_ps(buf + m0, a);
    }
}

/* rows weight rows starting at n0 (rows = 6, or 1 for the tail): compute into a small buffer
 * [rows, MP], then write the M real columns to out [M, N] (row-major, so the caller gets a
 * contiguous x @ w^T). */
static void rows_block(const float *w, int64_t ldw, int64_t K, const float *xt, int64_t M, int64_t MP,
                       int64_t N, int64_t n0, int rows, const float *res, float *out) {
    float buf[6 * MAX_MP];
    if (rows == 6) {
        int64_t m0 = 0;
        for (; m0 + 16 <= MP; m0 += 16) tile6x16(w, ldw, K, xt + m0, MP, buf + m0, MP);
        if (m0 < MP) tile6x8(w, ldw, K, xt + m0, MP, buf + m0, MP);
    } else {
        row1(w, K, xt, MP, buf);
    }
    if (res)
        for (int64_t m = 0; m < M; m++)
            for (int r = 0; r < rows; r++) out[m * N + n0 + r] = res[m * N + n0 + r] + buf[r * MP + m];
    else
        for (int64_t m = 0; m < M; m++)
            for (int r = 0; r < rows; r++) out[m * N + n0 + r] = buf[r * MP + m];
}

/* out [M, N] = res + prologue(x) @ w^T, where prologue is applied while x is packed:
 *   mode 0: x itself ([M, K]);
 *   mode 1: RMSNorm, x[m, k] * nw[k] / sqrt(mean_k x[m, k]^2 + eps) (sum of squares in double);
 *   mode 2: SwiGLU of a [M, 2K] input, silu(x[m, k]) * x[m, K + k] (gate first, then up).
 * x is read through its strides (sxm, sxk); res (may be NULL) is a contiguous [M, N] added to
 * the product. Returns 0 on success, 1 when M or mode is out of range, 2 when the packing buffer
 * cannot be allocated (nothing written in either case). */
int mr_skinny_gemm_ex(const float *w, int64_t N, int64_t K, int64_t ldw, const float *x, int64_t M,
                      int64_t sxm, int64_t sxk, int mode, const float *nw, float eps, const float *res,
                      float *out, int nthreads) {
    if (M < 1 || M > MAX_MP || mode < 0 || mode > 2) return 1;
    int64_t MP = (M + 7) / 8 * 8;
    float *xt = (float *)aligned_alloc(64, (size_t)((K * MP * 4 + 63) / 64 * 64));
    if (!xt) return 2;
    memset(xt, 0, (size_t)(K * MP) * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * sxm;
        if (mode == 1) {
            double ss = 0.0;
            for (int64_t k = 0; k < K; k++) ss += (double)xm[k * sxk] * (double)xm[k * sxk];
            float r = (float)(1.0 / sqrt(ss / (double)K + (double)eps));
            for (int64_t k = 0; k < K; k++) xt[k * MP + m] = (xm[k * sxk] * r) * nw[k];
        } else if (mode == 2) {
            for (int64_t k = 0; k < K; k++) {
                float g = xm[k * sxk];
                xt[k * MP + m] = (g / (1.0f + expf(-g))) * xm[(K + k) * sxk];
            }
        } else {
            for (int64_t k = 0; k < K; k++) xt[k * MP + m] = xm[k * sxk];
        }
    }
    int64_t tiles = N / 6;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) rows_block(w + t * 6 * ldw, ldw, K, xt, M, MP, N, t * 6, 6, res, out);
        #pragma omp for schedule(static)
        for (int64_t n = tiles * 6; n < N; n++) rows_block(w + n * ldw, ldw, K, xt, M, MP, N, n, 1, res, out);
    }
    free(xt);
    return 0;
}

/* ------------------------------------------------------------------ decode attention (one token)
 * For each row m (one new token at position pos[m]) and query group g, from the fused q/k/v row
 * qkv[m] = [group 0: q heads (per of them), k, v][group 1: ...] (head_dim hd each):
 *   optional RMSNorm of each q head and of k (qn, kn: [hd] weights; Qwen3's QK-norm), RoPE
 *   (rotate-half, cos/sin tables [positions, hd]) of q and k at pos[m], then k and v are written
 *   to the cache at pos[m], and each q head attends over cache positions 0..pos[m] (softmax in
 *   fp32, scores scaled by scale). out [M, G * per * hd]: head (g * per + j) at columns
 *   (g * per + j) * hd. The caches are indexed kc[m * s_row + g * s_grp + t * s_pos + d].
 * Returns 0, or 2 when a scratch buffer cannot be allocated (the cache may then hold the new
 * keys/values of some rows; the caller raises). */
static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    float r = _mm_cvtss_f32(lo);
    for (; d < n; d++) r += a[d] * b[d];
    return r;
}

static void rms_inplace(float *v, int64_t n, const float *w, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)v[i] * (double)v[i];
    float r = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    for (int64_t i = 0; i < n; i++) v[i] = (v[i] * r) * w[i];
}

static void rope(const float *src, float *dst, int64_t hd, const float *c, const float *s) {
    int64_t half = hd / 2;
    for (int64_t d = 0; d < hd; d++) {
        float rot = d < half ? -src[d + half] : src[d - half];
        dst[d] = src[d] * c[d] + rot * s[d];
    }
}

int mr_decode_attention(const float *qkv, int64_t M, int64_t G, int64_t per, int64_t hd, float *kc, float *vc,
                        int64_t s_row, int64_t s_grp, int64_t s_pos, const int64_t *pos, const float *cos_t,
                        const float *sin_t, const float *qn, const float *kn, float eps, float scale, float *out,
                        int nthreads) {
    int64_t maxpos = 0;
    for (int64_t m = 0; m < M; m++) maxpos = pos[m] > maxpos ? pos[m] : maxpos;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc((size_t)(maxpos + 1 + 3 * hd) * sizeof(float));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static) collapse(2)
        for (int64_t m = 0; m < M; m++) {
            for (int64_t g = 0; g < G; g++) {
                if (!buf) continue;
                float *scores = buf, *tmp = buf + maxpos + 1, *qr = tmp + hd, *kr = qr + hd;
                const float *blk = qkv + (m * G + g) * (per + 2) * hd;
                const float *c = cos_t + pos[m] * hd, *s = sin_t + pos[m] * hd;
                float *kbase = kc + m * s_row + g * s_grp, *vbase = vc + m * s_row + g * s_grp;
                memcpy(tmp, blk + per * hd, (size_t)hd * sizeof(float));
                if (kn) rms_inplace(tmp, hd, kn, eps);
                rope(tmp, kr, hd, c, s);
                memcpy(kbase + pos[m] * s_pos, kr, (size_t)hd * sizeof(float));
                memcpy(vbase + pos[m] * s_pos, blk + (per + 1) * hd, (size_t)hd * sizeof(float));
                int64_t span = pos[m] + 1;
                for (int64_t j = 0; j < per; j++) {
                    memcpy(tmp, blk + j * hd, (size_t)hd * sizeof(float));
                    if (qn) rms_inplace(tmp, hd, qn, eps);
                    rope(tmp, qr, hd, c, s);
                    float mx = -INFINITY;
                    for (int64_t t = 0; t < span; t++) {
                        scores[t] = dot(qr, kbase + t * s_pos, hd) * scale;
                        mx = scores[t] > mx ? scores[t] : mx;
                    }
                    float sum = 0.0f;
                    for (int64_t t = 0; t < span; t++) { scores[t] = expf(scores[t] - mx); sum += scores[t]; }
                    float inv = 1.0f / sum;
                    float *o = out + m * (G * per * hd) + (g * per + j) * hd;
                    for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
                    for (int64_t t = 0; t < span; t++) {
                        const float *vt = vbase + t * s_pos;
                        float p = scores[t] * inv;
                        for (int64_t d = 0; d < hd; d++) o[d] += p * vt[d];
                    }
                }
            }
        }
        free(buf);
    }
    return failed ? 2 : 0;
}
