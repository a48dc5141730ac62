// ggtorch's JIT library: a LoRA adapter's low-rank term, y[m, lo + n] += s_m * sum_j B[n, j] (sum_k A[j, k] x[m, k])
// (llama.cpp's build_lora_mm adds scale * B (A x) to the base product the same way).
//
// Why not PyTorch's matmul: its BLAS picks a different blocking, and so a different summation order, for
// one row than for eight, so a sequence's numbers depended on what else shared its batch. A flipped last
// bit before the next layer's int8 activation rounding grows into visible logit differences (0.03 on the
// tiny model), and a served request's answer would depend on the load. Here every output is one fixed
// loop over its row alone: the same bits whatever M is, whichever thread computes it.
#include <stdint.h>

#include "qdot.h"

// sum_k p[k] q[k] in 16 fixed lanes (vectorizes without -ffast-math; the order never depends on the caller)
static inline float dot16(const float *p, const float *q, int64_t n) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) acc[l] += p[k + l] * q[k + l];
    for (int l = 0; k < n; k++, l++) acc[l] += p[k] * q[k];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

// x [M, K] (row stride ldx), A [r, K], Bt = B transposed [r, N], all float32 and contiguous; s: a scale per
// row, or null for the one scale `scale`; y [M, *] with row stride ldy, columns lo .. lo + N - 1 updated in
// place. The second product runs along n (j outermost, in order) so that it vectorizes without reductions.
EXPORT void qdot_lowrank(const float *x, int64_t M, int64_t K, int64_t ldx, const float *A, int64_t r,
                         const float *Bt, int64_t N, const float *s, float scale, float *y, int64_t ldy,
                         int64_t lo) {
#pragma omp parallel for schedule(static) if (M * (r * K + N * r) >= 1048576)
    for (int64_t m = 0; m < M; m++) {
        float t[512], acc[256];
        const float sc = s ? s[m] : scale;
        const float *xr = x + m * ldx;
        for (int64_t j = 0; j < r; j++) t[j] = dot16(A + j * K, xr, K);
        float *yr = y + m * ldy + lo;
        for (int64_t n0 = 0; n0 < N; n0 += 256) {
            const int64_t w = N - n0 < 256 ? N - n0 : 256;
            for (int64_t n = 0; n < w; n++) acc[n] = 0.0f;
            for (int64_t j = 0; j < r; j++) {
                const float tj = t[j], *bj = Bt + j * N + n0;
                for (int64_t n = 0; n < w; n++) acc[n] += tj * bj[n];
            }
            for (int64_t n = 0; n < w; n++) yr[n0 + n] += acc[n] * sc;
        }
    }
}
