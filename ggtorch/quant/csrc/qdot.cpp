// ggtorch's JIT matmul: quantized weights x int8-quantized activations, per-group scales kept.
//
// Compiled on first use with the machine's C++ compiler (ggtorch/quant/jit.py), never at install time;
// without a compiler ggtorch uses PyTorch's kernels instead.
//
// The arithmetic is llama.cpp's for its quantized dot products (ggml_vec_dot_q4_0_q8_0 and kin):
// activations are quantized to int8 the way llama.cpp quantizes them for the weight's type, each
// group's integer dot product is exact, and the groups are summed in float. Weights are stored
// unsigned: value = dw[g] * u + mw[g], u in 0..15, 0..31, 0..63 (4, 5, 6 bits) or 0..255 (8-bit), so that one group of G
// values contributes dx[g] * dw[g] * dot(u, xq) + mw[g] * dx[g] * sum(xq). Every GGUF type of this
// shape maps onto it without changing its scales (Q4_0: dw = d, mw = -8d; Q8_0: u = q + 128,
// mw = -128d; Q4_K: dw = d*sc, mw = -dmin*m; Q6_K: G = 16, mw = -32 dw; ...).
//
// Layout (rows padded to a multiple of 16): 16 rows side by side, group by group. For each tile of
// 16 rows and each group of G values, the group's values go 4 at a time ("steps"): one step is 64
// bytes, byte 4r + t holding row r's value 4s + t. An 8-bit group is G/4 such steps; a 4-bit group
// is G/8 blocks of 64 bytes whose low nibbles are step 2p and high nibbles step 2p + 1.
// dw and mw are float16 [tiles][groups][16]; mw is absent when mw = zoff * dw (Q4_0, Q5_0, Q6_K,
// Q8_0), which saves its bytes.
//
// K-quants (Q4_K, Q5_K, Q6_K) keep the file's two-level scales instead ("K layout", sc non-null): per
// group an int8 sub-block scale sc (and for Q4_K/Q5_K an int8 min mn), per 256 values a float16 d (and
// -dmin) per row, value = d * sc * u - dmin * mn (Q6_K: d * sc * (u - 32)). The kernel forms d * sc
// (exact in float32) per group as it goes: 4.625 bits a weight for Q4_K (file: 4.5) and 6.56 for Q6_K
// (the file's own), where a float16 scale per group took 5 and 7. sc and mn are int8
// [tiles][groups][16], d and -dmin float16 [tiles][K/256][16].
//
// Two more value widths and two flags serve the low-bit types (Q2_K, Q3_K, IQ4_NL, IQ4_XS):
// - 2-bit values (Q2_K, G = 16; IQ1_S, G = 32): one 64-byte block per 4 steps, step 4p + s at bits
//   2s..2s+1 of byte 4r + t;
// - 3-bit values (Q3_K, G = 16; the IQ2 types, G = 16 or 32): the 2-bit blocks of the low bits, then per
//   4-step block 32 bytes of high bits: bit s (step 4p + s) of the low nibble of byte p for position
//   p = 4r + t < 32, of the high nibble of byte p - 32 otherwise; Q3_K: value = d * sc * (u - 4);
// - QDOT_LUT_IQ4: the 4-bit values are indices into kvalues_iq4nl (IQ4_NL, IQ4_XS); the kernel turns
//   them into kvalues_iq4nl + 128 (unsigned) with one byte shuffle per step, the table lookup llama.cpp's
//   ggml_vec_dot_iq4_nl_q8_0 does, and the offset -128 * scale (zoff) takes the 128 back out;
// - QDOT_LUT_MXFP4 with QDOT_E8M0 (MXFP4): the same lookup into kvalues_mxfp4 + 12 (zoff = -12), and dw
//   holds the file's e8m0 exponent byte per group (uint8 [tiles][groups][16]) instead of a float16 scale:
//   2^(e - 128) spans 2^-128..2^127, beyond float16, and the kernel builds the float32 scale from the
//   byte's bits as ggml_e8m0_to_fp32_half does (ggml_vec_dot_mxfp4_q8_0), exact for every byte;
// - QDOT_SM4 (Q2_K): sc holds the file's byte per group, scale in the low nibble and min in the high one
//   (value = d * (sc & 15) * u - dmin * (sc >> 4)), so the scales cost what they cost in the file.
//
// The grid i-quants (IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M; quant/types/iq3.py, iq2.py, iq1.py)
// multiply small indices of signed values (nothing requantized), which IQ2_S and IQ1_M have decoded once,
// at repack, and IQ3_XXS, IQ2_XXS, IQ2_XS, IQ1_S look up from the file's grid indices as they go (the
// grid layout: tiles.h, codes 9..12 in bits): a table flag (QDOT_LUT_IQ3XXS, QDOT_LUT_IQ2, QDOT_LUT_IQ1M) turns each index into its
// value plus an offset (zoff = -offset) with the same byte shuffle as IQ4, in the K layout with
// sc = 2 * ls + 1. 3-bit values may have G = 32 (two 4-step blocks, each with its 32 bytes of high
// bits after all the 2-bit blocks). Bits 8..10 of flags give n in d * 2^-n: llama.cpp multiplies its
// sums by 1/4 (IQ3_XXS) or 1/8 (IQ2, IQ1_M) once at the end; here d is multiplied by it (exact).
// QDOT_IQ1S (IQ1_S): 2-bit u = g + 1 (g in -1..1), and sc holds ls | delta sign << 3: the group's scale
// is d * (2 ls + 1) and its offset that times -1 -+ 1/8 (IQ1S_DELTA), so value = scale * (g +- 1/8).
//
// With that layout one vpdpbusd multiplies 4 values of 16 rows with the same 4 activations (a
// broadcast), the int32 lanes sum a whole group without any shuffle, and each group costs 16 rows
// one convert and two multiply-adds: llama.cpp's interleaved ("repacked") GEMM idea. Any CPU without
// AVX-512 VNNI gets the portable loops (qdot_mm_ref, also what the tests compare with).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "tiles.h"

EXPORT int qdot_has_vnni(void) { return QDOT_VNNI; }

// ggml_e8m0_to_fp32_half: 2^(e - 128) from its bits (subnormal for e < 2), exact
static inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float round_f16(float x) { return (float)(_Float16)x; }  // ggml's FP32_TO_FP16 and back

static inline float h2f(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

// entry `at` of a per-group scale array: float16, or an e8m0 byte (QDOT_E8M0)
static inline float scale_at(const uint16_t *dw, int64_t at, int flags) {
    return flags & QDOT_E8M0 ? e8m0_half(((const uint8_t *)dw)[at]) : h2f(dw[at]);
}

// where tile t's per-group scales start (float16, or one byte each with QDOT_E8M0)
static inline const uint16_t *scales_of(const uint16_t *dw, int64_t t, int64_t ng, int flags) {
    return flags & QDOT_E8M0 ? (const uint16_t *)((const uint8_t *)dw + t * ng * 16) : dw + t * ng * 16;
}

// Activation quantization, as llama.cpp does it for the weight type's vec_dot_type:
//   mode 0, Q8_0 (for Q4_0, Q5_0, Q8_0): per 32 values d = amax/127, q = round_even(x * 127/amax), and the
//     scale used is d rounded to float16 (quantize_row_q8_0);
//   mode 1, Q8_1 (Q4_1, Q5_1): the same, plus s = float16(d * sum(q)) for the offsets (quantize_row_q8_1);
//   mode 2, Q8_K (Q4_K, Q5_K, Q6_K): per 256 values iscale = -127/max with max the value of largest
//     magnitude, q = min(127, round_even(iscale * x)), d = 1/iscale in float32 (quantize_row_q8_K_ref).
// Outputs, per weight group g of G values: xq [M, K] int8; dx [M, K/G], the activation scale of the
// block holding g; sx [M, K/G], the offsets' factor (scale * sum(q) over the group); sq [M, K/G] (or null),
// sum(q) over the group as an integer (llama.cpp's block_q8_K bsums, what kint.cpp's tiles take).
EXPORT void qdot_quantize(const float *x, int64_t M, int64_t K, int G, int mode, int8_t *xq, float *dx, float *sx,
                          int16_t *sq) {
    const int64_t AB = mode == 2 ? 256 : 32;  // activation block
    const int64_t ng = K / G;
#pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        int8_t *qr = xq + m * K;
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
                dx[m * ng + g] = dq;
                if (sq) sq[m * ng + g] = (int16_t)s;  // |s| <= 127 G: the integer tiles' offsets (kint.cpp)
                sx[m * ng + g] = mode == 1 ? round_f16(d * (float)s) : dq * (float)s;
            }
        }
    }
}

#if QDOT_VNNI
// group g of one tile against MT activation rows: the integer dot products of 16 rows at once, then
// acc += dot * (sw * dx) + mw * sx per row (sw, mw: the group's scale and offset per weight row)
template <int MT>
static inline void group_rows(const __m512i *w, int G, __m512 sw, __m512 mw, int64_t K, const int8_t *xq,
                              const float *dx, const float *sx, int64_t m0, int64_t g, __m512 *acc) {
    const int64_t ng = K / G;
    for (int i = 0; i < MT; i++) {
        const int8_t *x = xq + (m0 + i) * K + g * G;
        __m512i d = _mm512_setzero_si512();
        for (int s = 0; s < G / 4; s++) {
            int32_t x4;
            memcpy(&x4, x + 4 * s, 4);
            d = _mm512_dpbusd_epi32(d, w[s], _mm512_set1_epi32(x4));
        }
        const float *dxi = dx + (m0 + i) * ng, *sxi = sx + (m0 + i) * ng;
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, _mm512_set1_ps(dxi[g])), acc[i]);
        acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sxi[g]), acc[i]);
    }
}

template <int MT>
static void tile(int bits, int G, const uint8_t *qt, const uint16_t *dt, const uint16_t *mt, float zoff, int64_t K,
                 const int8_t *xq, const float *dx, const float *sx, int64_t m0, float *out, int64_t ldo, int flags) {
    const int64_t ng = K / G, gb = group_bytes(bits, G);
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i w[8];
        load_group(bits, G, qt + g * gb, gb, w, flags);
        const __m512 sw = flags & QDOT_E8M0 ? e8m0_16((const uint8_t *)dt + g * 16)
                                            : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dt + g * 16)));
        const __m512 mw = mt ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mt + g * 16)))
                             : _mm512_mul_ps(sw, _mm512_set1_ps(zoff));
        group_rows<MT>(w, G, sw, mw, K, xq, dx, sx, m0, g, acc);
    }
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(out + (m0 + i) * ldo, acc[i]);
}

// The K layout: the same arithmetic as tile() with each group's scale made on the fly, d * sc (and
// -dmin * mn), exact in float32 from the stored int8 and float16.
template <int MT>
static void ktile(int bits, int G, const uint8_t *qt, const int8_t *st, const int8_t *nt, const uint16_t *dt,
                  const uint16_t *mt, float zoff, int64_t K, const int8_t *xq, const float *dx, const float *sx,
                  int64_t m0, float *out, int64_t ldo, int flags) {
    const int64_t gb = group_bytes(bits, G), ns = 256 / G;
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    const __m512 os = _mm512_set1_ps(oscale_of(flags));
    for (int64_t sb = 0; sb < K / 256; sb++) {
        const __m512 dv = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dt + sb * 16))), os);
        const __m512 mv = mt ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mt + sb * 16))) : dv;
        const bool pair = is_grid(bits) && G == 16;  // a grid unit of 32 values holds two 16-value groups
        __m512i wp[8];
        for (int64_t g = sb * ns; g < (sb + 1) * ns; g++) {
            if (!pair) load_group(bits, G, qt + g * gb, gb, wp, flags);
            else if (g % 2 == 0) load_group(bits, 32, qt + g * gb, 2 * gb, wp, flags);
            const __m512i *w = pair && g % 2 ? wp + 4 : wp;
            __m512 sw, mw;
            if (flags & QDOT_SM4) {  // Q2_K: the file's scale | min << 4 byte
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(st + g * 16)));
                sw = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))));
                mw = _mm512_mul_ps(mv, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)));
            } else if (flags & QDOT_IQ1S) {  // IQ1_S: ls | delta sign << 3
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(st + g * 16)));
                const __m512i ls = _mm512_and_si512(b, _mm512_set1_epi32(7));
                sw = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(ls, ls), _mm512_set1_epi32(1))));
                const __mmask16 neg = _mm512_test_epi32_mask(b, _mm512_set1_epi32(8));
                mw = _mm512_mul_ps(sw, _mm512_mask_blend_ps(neg, _mm512_set1_ps(-0.875f), _mm512_set1_ps(-1.125f)));
            } else {
                sw = _mm512_mul_ps(
                    dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(st + g * 16)))));
                mw = nt ? _mm512_mul_ps(mv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                _mm_loadu_si128((const __m128i *)(nt + g * 16)))))
                        : _mm512_mul_ps(sw, _mm512_set1_ps(zoff));
            }
            group_rows<MT>(w, G, sw, mw, K, xq, dx, sx, m0, g, acc);
        }
    }
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(out + (m0 + i) * ldo, acc[i]);
}
#endif

// portable: value k of row r in a tile's group q
static inline int value_at(int bits, int G, const uint8_t *q, int64_t r, int k, int flags) {
    const int step = k / 4, j = k % 4;
    if (bits == 8) return q[64 * step + 4 * r + j];
    const uint8_t *lut = lut_of(flags);
    if (is_grid(bits)) {
        const int u = grid_value(bits, G, q, (int)r, k);
        return lut ? lut[u] : u;
    }
    if (bits <= 3) {
        int u = (q[64 * (step / 4) + 4 * r + j] >> (2 * (step % 4))) & 3;
        if (bits == 3) {
            const int p = (int)(4 * r + j), h = q[4 * G + 32 * (step / 4) + p % 32] >> (p < 32 ? 0 : 4);
            u |= ((h >> (step % 4)) & 1) << 2;
        }
        return lut ? lut[u] : u;
    }
    const uint8_t b = q[64 * (step / 2) + 4 * r + j];
    int u = step % 2 ? (b >> 4) : (b & 15);
    if (bits != 4) {
        const int hb = bits - 4;
        u |= ((q[8 * G + 4 * r + j] >> (hb * step)) & ((1 << hb) - 1)) << 4;
    }
    return lut ? lut[u] : u;
}

// portable: weight row n (of the padded rows) against activation row m
static float dot_row(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff,
                     int64_t K, int64_t n, const int8_t *xr, const float *dxr, const float *sxr, int flags) {
    const int64_t ng = K / G, gb = group_bytes(bits, G), t = n / 16, r = n % 16;
    float acc = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *q = qw + (t * ng + g) * gb;
        int32_t s = 0;
        for (int k = 0; k < G; k++) s += value_at(bits, G, q, r, k, flags) * (int32_t)xr[g * G + k];
        const int64_t at = (t * ng + g) * 16 + r;
        const float d = scale_at(dw, at, flags);
        const float m = mw ? h2f(mw[at]) : zoff * d;
        acc += (float)s * (d * dxr[g]) + m * sxr[g];
    }
    return acc;
}

// portable, the K layout
static float dot_row_k(int bits, int G, const uint8_t *qw, const int8_t *sc, const int8_t *mn, const uint16_t *dw,
                       const uint16_t *mw, float zoff, int64_t K, int64_t n, const int8_t *xr, const float *dxr,
                       const float *sxr, int flags) {
    const int64_t ng = K / G, gb = group_bytes(bits, G), t = n / 16, r = n % 16, ns = 256 / G, nsb = K / 256;
    const float os = oscale_of(flags);
    float acc = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *q = qw + (t * ng + g) * gb;
        int32_t s = 0;
        if (is_grid(bits) && G == 16) {  // the group's half of its 32-value grid unit
            q = qw + (t * ng + (g & ~1ll)) * gb;
            for (int k = 0; k < G; k++) s += value_at(bits, 32, q, r, 16 * (int)(g & 1) + k, flags) * (int32_t)xr[g * G + k];
        } else {
            for (int k = 0; k < G; k++) s += value_at(bits, G, q, r, k, flags) * (int32_t)xr[g * G + k];
        }
        const int64_t at = (t * ng + g) * 16 + r, sat = (t * nsb + g / ns) * 16 + r;
        float d, m;
        if (flags & QDOT_SM4) {
            const uint8_t b = (uint8_t)sc[at];
            d = h2f(dw[sat]) * (float)(b & 15);
            m = h2f(mw[sat]) * (float)(b >> 4);
        } else if (flags & QDOT_IQ1S) {
            const uint8_t b = (uint8_t)sc[at];
            d = h2f(dw[sat]) * os * (float)(2 * (b & 7) + 1);
            m = d * (b & 8 ? -1.125f : -0.875f);
        } else {
            d = h2f(dw[sat]) * os * (float)sc[at];
            m = mn ? h2f(mw[sat]) * (float)mn[at] : zoff * d;
        }
        acc += (float)s * (d * dxr[g]) + m * sxr[g];
    }
    return acc;
}

#if QDOT_VNNI
// Tile t (16 rows) of a weight against M activation rows, 8 rows at a time (out: the tile's first column).
static void mm_tile(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff, int64_t K,
                    const int8_t *xq, const float *dx, const float *sx, const int16_t *sq, int64_t M, int64_t t,
                    float *out, int64_t ldo, int flags) {
    if (kint_ptile(bits, G, qw, dw, mw, zoff, K, xq, dx, sq, M, t, out, ldo, flags)) return;  // kint.cpp
    const int64_t ng = K / G, gb = group_bytes(bits, G);
    const uint8_t *qt = qw + t * ng * gb;
    const uint16_t *dt = scales_of(dw, t, ng, flags), *mt = mw ? mw + t * ng * 16 : nullptr;
    float *o = out + t * 16;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        switch (M - m0 < 8 ? M - m0 : 8) {
        case 8: tile<8>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 7: tile<7>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 6: tile<6>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 5: tile<5>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 4: tile<4>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 3: tile<3>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 2: tile<2>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        default: tile<1>(bits, G, qt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        }
    }
}

// the same for the K layout
static void mm_ktile(int bits, int G, const uint8_t *qw, const int8_t *sc, const int8_t *mn, const uint16_t *dw,
                     const uint16_t *mw, float zoff, int64_t K, const int8_t *xq, const float *dx, const float *sx,
                     const int16_t *sq, int64_t M, int64_t t, float *out, int64_t ldo, int flags) {
    if (kint_tile(bits, G, qw, sc, mn, dw, mw, zoff, K, xq, dx, sq, M, t, out, ldo, flags)) return;  // kint.cpp
    const int64_t ng = K / G, gb = group_bytes(bits, G), nsb = K / 256;
    const uint8_t *qt = qw + t * ng * gb;
    const int8_t *st = sc + t * ng * 16, *nt = mn ? mn + t * ng * 16 : nullptr;
    const uint16_t *dt = dw + t * nsb * 16, *mt = mw ? mw + t * nsb * 16 : nullptr;
    float *o = out + t * 16;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        switch (M - m0 < 8 ? M - m0 : 8) {
        case 8: ktile<8>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 7: ktile<7>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 6: ktile<6>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 5: ktile<5>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 4: ktile<4>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 3: ktile<3>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        case 2: ktile<2>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        default: ktile<1>(bits, G, qt, st, nt, dt, mt, zoff, K, xq, dx, sx, m0, o, ldo, flags); break;
        }
    }
}
#endif

// out[m, n] (row stride ldo >= N) = sum_k x[m, k] * W[n, k] for the activations qdot_quantize() made;
// N is the padded row count (a multiple of 16).
EXPORT void qdot_mm(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff,
                    int64_t N, int64_t K, const int8_t *xq, const float *dx, const float *sx, int64_t M, float *out,
                    int64_t ldo, int flags, const int16_t *sq) {
    const int64_t ng = K / G;
#if QDOT_VNNI
    (void)ng;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N / 16; t++) mm_tile(bits, G, qw, dw, mw, zoff, K, xq, dx, sx, sq, M, t, out, ldo, flags);
#else
    (void)sq;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] = dot_row(bits, G, qw, dw, mw, zoff, K, n, xq + m * K, dx + m * ng, sx + m * ng, flags);
#endif
}

// the portable loop, always compiled: tests compare the two paths
EXPORT void qdot_mm_ref(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff,
                        int64_t N, int64_t K, const int8_t *xq, const float *dx, const float *sx, int64_t M,
                        float *out, int64_t ldo, int flags) {
    const int64_t ng = K / G;
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] = dot_row(bits, G, qw, dw, mw, zoff, K, n, xq + m * K, dx + m * ng, sx + m * ng, flags);
}

// The K layout's product (sc, mn, dw, mw as the layout comment says; zoff: Q6_K's -32, else 0).
EXPORT void qdot_mm_k(int bits, int G, const uint8_t *qw, const int8_t *sc, const int8_t *mn, const uint16_t *dw,
                      const uint16_t *mw, float zoff, int64_t N, int64_t K, const int8_t *xq, const float *dx,
                      const float *sx, int64_t M, float *out, int64_t ldo, int flags, const int16_t *sq) {
    const int64_t ng = K / G;
#if QDOT_VNNI
    (void)ng;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N / 16; t++)
        mm_ktile(bits, G, qw, sc, mn, dw, mw, zoff, K, xq, dx, sx, sq, M, t, out, ldo, flags);
#else
    (void)sq;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] = dot_row_k(bits, G, qw, sc, mn, dw, mw, zoff, K, n, xq + m * K, dx + m * ng, sx + m * ng, flags);
#endif
}

// Tiles t0..t1-1 of w (rows 16 t0 .. 16 t1 - 1) against M activation rows that qdot_quantize() made for
// w's (G, mode), on the calling thread: for callers that share the tiles of several weights among their
// own threads (moe.cpp). Each output is computed exactly as qdot_linear computes it.
EXPORT void qdot_mm_tiles(const QWeight *w, const int8_t *xq, const float *dx, const float *sx, const int16_t *sq, int64_t M, float *out,
                          int64_t ldo, int64_t t0, int64_t t1) {
    const int64_t K = w->K;
#if QDOT_VNNI
    for (int64_t t = t0; t < t1; t++) {
        if (w->sc) mm_ktile(w->bits, w->G, w->qw, w->sc, w->mn, w->dw, w->mw, w->zoff, K, xq, dx, sx, sq, M, t, out, ldo, w->flags);
        else mm_tile(w->bits, w->G, w->qw, w->dw, w->mw, w->zoff, K, xq, dx, sx, sq, M, t, out, ldo, w->flags);
    }
#else
    (void)sq;
    const int64_t ng = K / w->G;
    for (int64_t n = 16 * t0; n < 16 * t1; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] = w->sc ? dot_row_k(w->bits, w->G, w->qw, w->sc, w->mn, w->dw, w->mw, w->zoff, K, n, xq + m * K,
                                                 dx + m * ng, sx + m * ng, w->flags)
                                     : dot_row(w->bits, w->G, w->qw, w->dw, w->mw, w->zoff, K, n, xq + m * K, dx + m * ng,
                                               sx + m * ng, w->flags);
#endif
}

EXPORT void qdot_mm_k_ref(int bits, int G, const uint8_t *qw, const int8_t *sc, const int8_t *mn, const uint16_t *dw,
                          const uint16_t *mw, float zoff, int64_t N, int64_t K, const int8_t *xq, const float *dx,
                          const float *sx, int64_t M, float *out, int64_t ldo, int flags) {
    const int64_t ng = K / G;
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] = dot_row_k(bits, G, qw, sc, mn, dw, mw, zoff, K, n, xq + m * K, dx + m * ng, sx + m * ng, flags);
}

// One call for a linear layer: quantize x [M, K] float32 (contiguous) and multiply; out [M, N (padded)].
EXPORT void qdot_linear(const QWeight *w, const float *x, int64_t M, float *out) {
    const int64_t K = w->K, ng = K / w->G;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K) + 64);
    float *dx = (float *)malloc(sizeof(float) * (size_t)(M * ng) * 3 + 64);
    float *sx = dx + M * ng;
    int16_t *sq = (int16_t *)(sx + M * ng);
    qdot_quantize(x, M, K, w->G, w->mode, xq, dx, sx, sq);
    if (w->sc)
        qdot_mm_k(w->bits, w->G, w->qw, w->sc, w->mn, w->dw, w->mw, w->zoff, w->N, K, xq, dx, sx, M, out, w->N, w->flags, sq);
    else
        qdot_mm(w->bits, w->G, w->qw, w->dw, w->mw, w->zoff, w->N, K, xq, dx, sx, M, out, w->N, w->flags, sq);
    free(xq);
    free(dx);
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
