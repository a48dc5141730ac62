// ggtorch's JIT matmul: quantized weights x int8-quantized activations, per-group scales kept.
//
// Compiled on first use with the machine's C++ compiler (ggtorch/quant/jit.py), never at install time;
// without a compiler ggtorch uses PyTorch's kernels instead.
//
// The arithmetic is llama.cpp's for its quantized dot products (ggml_vec_dot_q4_0_q8_0 and kin):
// activations are quantized to int8 per group of G values (scale amax/127, round to nearest), each
// group's integer dot product is exact, and the groups are summed in float. Weights are stored
// unsigned: value = dw[g] * u + mw[g], u in 0..15 (4-bit, two per byte) or 0..255 (8-bit), so that
// one group contributes dx[g] * dw[g] * dot(u, xq) + mw[g] * dx[g] * sum(xq). Every GGUF type of this
// shape maps onto it without rounding its scales (Q4_0: dw = d, mw = -8d; Q8_0: u = q + 128,
// mw = -128d; Q4_K: dw = d*sc, mw = -dmin*m; Q6_K: G = 16, mw = -32 dw; ...).
//
// Layout: rows in tiles of 4 (N a multiple of 4), K a multiple of 64, in 64-value chunks. A tile is
// stored chunk by chunk, the 4 rows' pieces of a chunk side by side, so that a thread reads one
// sequential stream: qw [N/4][K/64][4][32 bytes (4-bit: byte j holds value j in its low nibble, value
// 32 + j in its high one) or 64 bytes (8-bit)]; dw and mw float16 [N/4][K/64][4][64/G], mw
// absent when mw = zoff * dw (Q4_0, Q5_0, Q6_K, Q8_0), which saves its bytes.
//
// The AVX-512 VNNI path unpacks a chunk of a tile once and multiplies it with up to 4 activation
// rows at a time (vpdpbusd: unsigned weights x signed activations); any other CPU gets the portable
// loops (qdot_mm_ref, also what the tests compare with).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define QDOT_VNNI 1
#ifndef QDOT_MT
#define QDOT_MT 4
#endif
#else
#define QDOT_VNNI 0
#endif

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT int qdot_has_vnni(void) { return QDOT_VNNI; }

static inline float round_f16(float x) { return (float)(_Float16)x; }  // ggml's FP32_TO_FP16 and back

// Activation quantization, as llama.cpp does it for the weight type's vec_dot_type:
//   mode 0, Q8_0 (for Q4_0, Q5_0, Q8_0): per 32 values d = amax/127, q = round_even(x * 127/amax), and the
//     scale used is d rounded to float16 (quantize_row_q8_0);
//   mode 1, Q8_1 (Q4_1, Q5_1): the same, plus s = float16(d * sum(q)) for the offsets (quantize_row_q8_1);
//   mode 2, Q8_K (Q4_K, Q5_K, Q6_K): per 256 values iscale = -127/max with max the value of largest
//     magnitude, q = min(127, round_even(iscale * x)), d = 1/iscale in float32 (quantize_row_q8_K_ref).
// Outputs, for weight groups of G: xq [M, K] int8; dxe, the activation scale of each of a 64-value
// chunk's 16 int32 lanes ([M, K/4]); sxe, the offsets' factor (scale * sum(q) over the weight group)
// placed where the chunk's tile scales sit: lane j * (64/G) + k of chunk c holds group c * (64/G) + k
// for each of the 4 rows j of a tile ([M, K/64, 16], unused lanes 0).
EXPORT void qdot_quantize(const float *x, int64_t M, int64_t K, int G, int mode, int8_t *xq, float *dxe, float *sxe) {
    const int64_t AB = mode == 2 ? 256 : 32;  // activation block
    const int lanes = G / 4, gpc = 64 / G;
#pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        int8_t *qr = xq + m * K;
        float *se = sxe + m * (K / 4), *de = dxe + m * (K / 4);
        memset(se, 0, sizeof(float) * (K / 4));
        for (int64_t b = 0; b < K / AB; b++) {
            const float *v = xr + b * AB;
            int8_t *q = qr + b * AB;
            float amax = 0.f, vmax = 0.f, d;
            for (int i = 0; i < AB; i++) {
                const float a = fabsf(v[i]);
                if (a > amax) { amax = a; vmax = v[i]; }
            }
            if (mode == 2) {
                if (amax == 0.f) { d = 0.f; memset(q, 0, AB); }
                else {
                    const float iscale = -127.f / vmax;
                    for (int i = 0; i < AB; i++) {
                        const int r = (int)nearbyintf(iscale * v[i]);
                        q[i] = (int8_t)(r < 127 ? r : 127);
                    }
                    d = 1.f / iscale;
                }
            } else {
                const float id = amax != 0.f ? 127.f / amax : 0.f;
                for (int i = 0; i < AB; i++) q[i] = (int8_t)(int)nearbyintf(v[i] * id);
                d = amax / 127.f;
            }
            const float dq = mode == 2 ? d : round_f16(d);
            for (int64_t g = b * AB / G; g < (b + 1) * AB / G; g++) {
                int s = 0;
                for (int i = 0; i < G; i++) s += qr[g * G + i];
                const float sx = mode == 1 ? round_f16(d * (float)s) : dq * (float)s;
                const int64_t c = g / gpc, k = g % gpc;
                for (int j = 0; j < 4; j++) se[c * 16 + j * gpc + k] = sx;
                for (int i = 0; i < lanes; i++) de[g * lanes + i] = dq;
            }
        }
    }
}

static inline float h2f(uint16_t h) {
    // IEEE half -> float (normal, subnormal, inf/nan), for the portable path
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    uint32_t bits;
    if (e == 0) {
        if (m == 0) bits = sign;
        else {
            float f = (float)m * (1.0f / 16777216.0f);  // m * 2^-24
            memcpy(&bits, &f, 4);
            bits |= sign;
        }
    } else if (e == 31) bits = sign | 0x7F800000u | (m << 13);
    else bits = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if QDOT_VNNI
static inline __m512i load_chunk(const uint8_t *p, int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)p);
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

template <int MT>
static void tile(int bits, int G, const uint8_t *qt, const uint16_t *dt, const uint16_t *mt, float zoff, int64_t K,
                 int64_t n0, const int8_t *xq, const float *dxe, const float *sxe, int64_t m0, float *out, int64_t ldo) {
    const int64_t nc = K / 64, cb = bits == 8 ? 64 : 32;
    const int gpc = 64 / G;  // groups per chunk: 2 or 4
    // lane l of row j's chunk belongs to group l / (16 / gpc); its scale sits at j * gpc + that group
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i grp = gpc == 2 ? _mm512_srli_epi32(lane, 3) : _mm512_srli_epi32(lane, 2);
    __m512i idx[4];
    for (int j = 0; j < 4; j++) idx[j] = _mm512_add_epi32(grp, _mm512_set1_epi32(j * gpc));
    __m512 acc[MT][4], off[MT];
    for (int i = 0; i < MT; i++) {
        off[i] = _mm512_setzero_ps();
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < nc; c++) {
        const uint8_t *q = qt + c * 4 * cb;
        _mm_prefetch((const char *)(q + 4 * 4 * cb), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + 4 * 4 * cb + 64), _MM_HINT_T0);
        // the tile's 4 x gpc scales (and offsets) of this chunk: 8 or 16 halves
        __m512 s, o;
        if (gpc == 2) {
            s = _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dt + c * 8))));
            o = mt ? _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mt + c * 8)))) : s;
        } else {
            s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dt + c * 16)));
            o = mt ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mt + c * 16))) : s;
        }
        __m512i wv[4];
        __m512 sv[4];
        for (int j = 0; j < 4; j++) {
            wv[j] = load_chunk(q + j * cb, bits);
            sv[j] = _mm512_permutexvar_ps(idx[j], s);
        }
        for (int i = 0; i < MT; i++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq + (m0 + i) * K + c * 64));
            const __m512 dx = _mm512_loadu_ps(dxe + (m0 + i) * (K / 4) + c * 16);
            off[i] = _mm512_fmadd_ps(o, _mm512_loadu_ps(sxe + (m0 + i) * (K / 4) + c * 16), off[i]);
            for (int j = 0; j < 4; j++) {
                const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv[j], dx), acc[i][j]);
            }
        }
    }
    // the groups' offsets: sum_g mw[g] * dx[g] * sum(xq[g]) sits in lanes j * gpc .. j * gpc + gpc - 1
    const float f = mt ? 1.f : zoff;
    for (int i = 0; i < MT; i++) {
        float o[16];
        _mm512_storeu_ps(o, off[i]);
        for (int j = 0; j < 4; j++) {
            float t = 0.f;
            for (int k = 0; k < gpc; k++) t += o[j * gpc + k];
            out[(m0 + i) * ldo + n0 + j] = _mm512_reduce_add_ps(acc[i][j]) + f * t;
        }
    }
}

// 4-bit weights in groups of 32 (Q4_0, Q4_1, Q4_K): two rows' chunks are one 64-byte load; the low
// nibbles are both rows' values 0..31, the high ones values 32..63, multiplied with the activations'
// halves repeated twice. Fewer instructions per weight byte than unpacking row by row, which is what
// one-token decoding is bound by.
template <int MT>
static void tile4(const uint8_t *qt, const uint16_t *dt, const uint16_t *mt, float zoff, int64_t K, int64_t n0,
                  const int8_t *xq, const float *dxe, const float *sxe, int64_t m0, float *out, int64_t ldo) {
    const int64_t nc = K / 64;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    // the tile's chunk scales are [r0g0 r0g1 r1g0 r1g1 r2g0 r2g1 r3g0 r3g1]: pick (g0 or g1) of a row pair
    const __m512i iA01 = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i iB01 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i iA23 = _mm512_add_epi32(iA01, _mm512_set1_epi32(4)), iB23 = _mm512_add_epi32(iB01, _mm512_set1_epi32(4));
    __m512 acc[MT][2], off[MT];
    for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = off[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; c++) {
        const uint8_t *q = qt + c * 128;
        _mm_prefetch((const char *)(q + 512), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + 576), _MM_HINT_T0);
        const __m512i v01 = _mm512_loadu_si512((const void *)q), v23 = _mm512_loadu_si512((const void *)(q + 64));
        const __m512i lo01 = _mm512_and_si512(v01, m4), hi01 = _mm512_and_si512(_mm512_srli_epi16(v01, 4), m4);
        const __m512i lo23 = _mm512_and_si512(v23, m4), hi23 = _mm512_and_si512(_mm512_srli_epi16(v23, 4), m4);
        const __m512 s = _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dt + c * 8))));
        const __m512 o = mt ? _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mt + c * 8)))) : s;
        const __m512 sA01 = _mm512_permutexvar_ps(iA01, s), sB01 = _mm512_permutexvar_ps(iB01, s);
        const __m512 sA23 = _mm512_permutexvar_ps(iA23, s), sB23 = _mm512_permutexvar_ps(iB23, s);
        for (int i = 0; i < MT; i++) {
            const int8_t *x = xq + (m0 + i) * K + c * 64;
            const __m512i xlo = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x));
            const __m512i xhi = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + 32)));
            const float *de = dxe + (m0 + i) * (K / 4) + c * 16;
            const __m512 dA = _mm512_set1_ps(de[0]), dB = _mm512_set1_ps(de[8]);
            off[i] = _mm512_fmadd_ps(o, _mm512_loadu_ps(sxe + (m0 + i) * (K / 4) + c * 16), off[i]);
            const __m512i z = _mm512_setzero_si512();
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, lo01, xlo)), _mm512_mul_ps(sA01, dA), acc[i][0]);
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, hi01, xhi)), _mm512_mul_ps(sB01, dB), acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, lo23, xlo)), _mm512_mul_ps(sA23, dA), acc[i][1]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, hi23, xhi)), _mm512_mul_ps(sB23, dB), acc[i][1]);
        }
    }
    const float f = mt ? 1.f : zoff;
    for (int i = 0; i < MT; i++) {
        float o[16];
        _mm512_storeu_ps(o, off[i]);
        float *y = out + (m0 + i) * ldo + n0;
        y[0] = _mm512_mask_reduce_add_ps(0x00FF, acc[i][0]) + f * (o[0] + o[1]);
        y[1] = _mm512_mask_reduce_add_ps(0xFF00, acc[i][0]) + f * (o[2] + o[3]);
        y[2] = _mm512_mask_reduce_add_ps(0x00FF, acc[i][1]) + f * (o[4] + o[5]);
        y[3] = _mm512_mask_reduce_add_ps(0xFF00, acc[i][1]) + f * (o[6] + o[7]);
    }
}
#endif

// portable: weight row n against activation row m, reading the tiled layout
static float dot_row(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff,
                     int64_t K, int64_t n, const int8_t *xr, const float *dxr, const float *ser) {
    const int64_t nc = K / 64, cb = bits == 8 ? 64 : 32, gpc = 64 / G, t = n / 4, j = n % 4;
    const uint8_t *qt = qw + t * nc * 4 * cb;
    float acc = 0.f;
    for (int64_t c = 0; c < nc; c++) {
        const uint8_t *q = qt + (c * 4 + j) * cb;
        for (int64_t k = 0; k < gpc; k++) {
            const int64_t g = c * gpc + k, at = (t * nc + c) * 4 * gpc + j * gpc + k;
            int32_t s = 0;
            for (int i = 0; i < G; i++) {
                const int64_t v = k * G + i;  // value within the chunk
                const int u = bits == 8 ? q[v] : (v < 32 ? (q[v] & 15) : (q[v - 32] >> 4));
                s += u * (int32_t)xr[c * 64 + v];
            }
            const float d = h2f(dw[at]);
            const float m = mw ? h2f(mw[at]) : zoff * d;
            acc += (float)s * d * dxr[g * (G / 4)] + m * ser[c * 16 + k];
        }
    }
    return acc;
}

// out[m, n] (row stride ldo) = sum_k x[m, k] * W[n, k] for the activations qdot_quantize() made.
EXPORT void qdot_mm(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff,
                    int64_t N, int64_t K, const int8_t *xq, const float *dxe, const float *sxe, int64_t M, float *out,
                    int64_t ldo) {
#if QDOT_VNNI
    const int64_t ntiles = N / 4, nc = K / 64, cb = bits == 8 ? 64 : 32, gpc = 64 / G;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < ntiles; t++) {
        const uint8_t *qt = qw + t * nc * 4 * cb;
        const uint16_t *dt = dw + t * nc * 4 * gpc, *mt = mw ? mw + t * nc * 4 * gpc : nullptr;
        if (bits == 4 && G == 32) {
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                switch (M - m0 < 4 ? M - m0 : 4) {
                case 4: tile4<4>(qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
                case 3: tile4<3>(qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
                case 2: tile4<2>(qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
                default: tile4<1>(qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
                }
            }
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += QDOT_MT) {
            switch (M - m0 < QDOT_MT ? M - m0 : QDOT_MT) {
            case 4: tile<4>(bits, G, qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
            case 3: tile<3>(bits, G, qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
            case 2: tile<2>(bits, G, qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
            default: tile<1>(bits, G, qt, dt, mt, zoff, K, t * 4, xq, dxe, sxe, m0, out, ldo); break;
            }
        }
    }
#else
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] = dot_row(bits, G, qw, dw, mw, zoff, K, n, xq + m * K, dxe + m * (K / 4), sxe + m * (K / 4));
#endif
}

// the portable loop, always compiled: tests compare the two paths
EXPORT void qdot_mm_ref(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff,
                        int64_t N, int64_t K, const int8_t *xq, const float *dxe, const float *sxe, int64_t M,
                        float *out, int64_t ldo) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] = dot_row(bits, G, qw, dw, mw, zoff, K, n, xq + m * K, dxe + m * (K / 4), sxe + m * (K / 4));
}

// One call for a linear layer: quantize x [M, K] float32 (contiguous) and multiply; out [M, N].
struct QWeight {
    int32_t bits, G, mode;
    const uint8_t *qw;
    const uint16_t *dw, *mw;
    float zoff;
    int64_t N, K;
};

EXPORT void qdot_linear(const QWeight *w, const float *x, int64_t M, float *out) {
    const int64_t K = w->K;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K) + 64);
    float *dxe = (float *)malloc(sizeof(float) * (size_t)(M * K / 4) * 2 + 64);
    float *sxe = dxe + M * K / 4;
    qdot_quantize(x, M, K, w->G, w->mode, xq, dxe, sxe);
    qdot_mm(w->bits, w->G, w->qw, w->dw, w->mw, w->zoff, w->N, K, xq, dxe, sxe, M, out, w->N);
    free(xq);
    free(dxe);
}

// y = x / sqrt(mean(x^2) + eps) * w per row of x [M, K], as ggml_compute_forward_rms_norm_f32 computes
// it (squares summed in double, the scale in float) followed by ggml_mul with the weight (w may be null).
EXPORT void qdot_rms_norm(const float *x, const float *w, float eps, int64_t M, int64_t K, float *y) {
#pragma omp parallel for schedule(static) if (M * K > 262144)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float *yr = y + m * K;
        double sum = 0.0;
        for (int64_t k = 0; k < K; k++) sum += (double)(xr[k] * xr[k]);
        const float mean = (float)(sum / (double)K);
        const float scale = 1.0f / sqrtf(mean + eps);
        if (w)
            for (int64_t k = 0; k < K; k++) yr[k] = (xr[k] * scale) * w[k];
        else
            for (int64_t k = 0; k < K; k++) yr[k] = xr[k] * scale;
    }
}
