// ggtorch's JIT library, part six: the K layout's tiles with llama.cpp's integer sums.
//
// qdot.cpp's ktile() turns every group's integer dot product into float and adds it with its own scale
// (a convert, a multiply and two multiply-adds per group and activation row). llama.cpp's K-quant dot
// products (ggml_vec_dot_q2_K_q8_K, q3_K, q4_K, q6_K, iq4_xs in ggml-cpu/arch/x86/quants.c) instead sum
// sc * dot over a 256-value super-block in int32 (the sub-block scales are small integers) and
// convert once per super-block: sumf += d * y.d * sumi, and the mins the same way from the activations'
// integer group sums (bsums): sumf -= dmin * y.d * sum(mn * bsum). These tiles do that in the 16-row
// layout, which is exact and takes per group and activation row one instruction besides the dot
// product's vpdpbusd (vpdpwssd where the group's dot product fits int16, else vpmulld + vpaddd):
// - offsets zoff (Q6_K -32, Q3_K -4, IQ4_XS -128, the grid i-quants' level offsets): the dot product
//   starts at zoff * bsum instead of 0, so it sums (u + zoff) * q, the file's signed values;
// - mins (Q2_K, Q4_K, Q5_K): per super-block, mn of two groups as int16 pairs times the two groups'
//   bsums (vpdpwssd), one pair per instruction;
// - per super-block: acc += float(sumi) * (d * dx) (+ float(summ) * (-dmin * dx)), as llama.cpp.
// - IQ1_S's delta of +-1/8 per group: each group's sum is taken 8 times, 8 sum((u - 1) q) +- bsum, which
//   is llama.cpp's sumi + IQ1S_DELTA * sumi1 times 8 in one integer (exact: |8 sumi| < 2^24), and d / 8
//   scales the super-block. (IQ3_S, whose offset was -7.5, doubles its values through a table for the
//   integer offset -15.)
#include "tiles.h"

#if QDOT_VNNI
#include <stdlib.h>
#include <string.h>

struct KT {  // one tile's K layout (qdot.cpp's mm_ktile pointers)
    const uint8_t *qt;
    const int8_t *st, *nt;
    const uint16_t *dt, *mt;
    int flags, zi;
};

// the group's scale per weight row as int32 lanes (SC16: the low 16 bits only, for vpdpwssd)
template <bool SC16, bool SM4>
static inline __m512i scales(const int8_t *s) {
    const __m128i b = _mm_loadu_si128((const __m128i *)s);
    if (SM4) return _mm512_and_si512(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(15));
    const __m512i v = _mm512_cvtepi8_epi32(b);
    return SC16 ? _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF)) : v;
}

// the mins of groups g and g + 1 as int16 pairs per weight row (vpdpwssd with the bsums of g, g + 1)
template <bool SM4>
static inline __m512i min_pair(const int8_t *s) {
    __m512i lo, hi;
    if (SM4) {  // Q2_K: the high nibble of the file's byte
        lo = _mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s)), 4);
        hi = _mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 16))), 4);
    } else {
        lo = _mm512_and_si512(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)s)), _mm512_set1_epi32(0xFFFF));
        hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(s + 16)));
    }
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// MT activation rows m0.. against one tile: out = sum over super-blocks of the integer sums' floats.
template <int MT, int BITS, int G, bool SC16, bool MINS, bool SM4, bool IQ1 = false>
static void itile(const KT &k, int64_t K, const int8_t *xq, const float *dx, const int16_t *sq, int64_t m0, float *out,
                  int64_t ldo) {
    constexpr int64_t gb = group_bytes(BITS, G);
    constexpr int ns = 256 / G;
    const int64_t ng = K / G;
    const __m512 os = _mm512_set1_ps(oscale_of(k.flags));
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; sb++) {
        const int64_t g0 = sb * ns;
        __m512 dv = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k.dt + sb * 16))), os);
        if (IQ1) dv = _mm512_mul_ps(dv, _mm512_set1_ps(0.125f));  // the sums below are 8 times llama.cpp's (exact)
        if (MINS) {  // sum(mn * bsum) per row, two groups per vpdpwssd
            __m512i ms[MT];
            for (int i = 0; i < MT; i++) ms[i] = _mm512_setzero_si512();
            for (int j = 0; j < ns; j += 2) {
                const __m512i p = min_pair<SM4>((SM4 ? k.st : k.nt) + (g0 + j) * 16);
                for (int i = 0; i < MT; i++) {
                    int32_t s2;
                    memcpy(&s2, sq + (m0 + i) * ng + g0 + j, 4);
                    ms[i] = _mm512_dpwssd_epi32(ms[i], p, _mm512_set1_epi32(s2));
                }
            }
            const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k.mt + sb * 16)));
            for (int i = 0; i < MT; i++)
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ms[i]), _mm512_mul_ps(mv, _mm512_set1_ps(dx[(m0 + i) * ng + g0])),
                                         acc[i]);
        }
        __m512i is[MT];
        for (int i = 0; i < MT; i++) is[i] = _mm512_setzero_si512();
        // the grid layout stores 32 values a unit: a 16-value group's unit holds the next group too
        constexpr bool pair = is_grid(BITS) && G == 16;
        __m512i wp[pair ? 8 : G / 4];
        for (int64_t g = g0; g < g0 + ns; g++) {
            if (!pair) load_group(BITS, G, k.qt + g * gb, gb, wp, k.flags);
            else if (g % 2 == 0) load_group(BITS, 32, k.qt + g * gb, 2 * gb, wp, k.flags);
            const __m512i *w = pair && g % 2 ? wp + 4 : wp;
            __m512i sv;
            __mmask16 neg = 0;
            if (IQ1) {  // IQ1_S's sc byte ls | delta sign << 3: the scale 2 ls + 1, the delta -1/8 where the bit is set
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(k.st + g * 16)));
                const __m512i ls = _mm512_and_si512(b, _mm512_set1_epi32(7));
                sv = _mm512_add_epi32(_mm512_add_epi32(ls, ls), _mm512_set1_epi32(1));
                neg = _mm512_test_epi32_mask(b, _mm512_set1_epi32(8));
            } else {
                sv = scales<SC16, SM4>(k.st + g * 16);
            }
            for (int i = 0; i < MT; i++) {
                const int8_t *x = xq + (m0 + i) * K + g * G;
                __m512i d = k.zi ? _mm512_set1_epi32(k.zi * (int32_t)sq[(m0 + i) * ng + g]) : _mm512_setzero_si512();
                for (int s = 0; s < G / 4; s++) {
                    int32_t x4;
                    memcpy(&x4, x + 4 * s, 4);
                    d = _mm512_dpbusd_epi32(d, w[s], _mm512_set1_epi32(x4));
                }
                if (IQ1) {  // 8 sum (g q) +- bsum: llama.cpp's sumi and IQ1S_DELTA * sumi1 in one integer
                    const __m512i bs = _mm512_set1_epi32((int32_t)sq[(m0 + i) * ng + g]);
                    d = _mm512_add_epi32(_mm512_slli_epi32(d, 3), _mm512_mask_sub_epi32(bs, neg, _mm512_setzero_si512(), bs));
                }
                is[i] = SC16 ? _mm512_dpwssd_epi32(is[i], d, sv) : _mm512_add_epi32(is[i], _mm512_mullo_epi32(d, sv));
            }
        }
        for (int i = 0; i < MT; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[i]), _mm512_mul_ps(dv, _mm512_set1_ps(dx[(m0 + i) * ng + g0])),
                                     acc[i]);
    }
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(out + (m0 + i) * ldo, acc[i]);
}

// all M rows: 8 at a time, then 4, 2, 1 (each row block unpacks the tile once; 16 rows per block measured
// no faster at M = 128: the registers run out)
template <int BITS, int G, bool SC16, bool MINS, bool SM4, bool IQ1 = false>
static void rows(const KT &k, int64_t K, const int8_t *xq, const float *dx, const int16_t *sq, int64_t M, float *out,
                 int64_t ldo) {
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) itile<8, BITS, G, SC16, MINS, SM4, IQ1>(k, K, xq, dx, sq, m0, out, ldo);
    if (M - m0 >= 4) itile<4, BITS, G, SC16, MINS, SM4, IQ1>(k, K, xq, dx, sq, m0, out, ldo), m0 += 4;
    if (M - m0 >= 2) itile<2, BITS, G, SC16, MINS, SM4, IQ1>(k, K, xq, dx, sq, m0, out, ldo), m0 += 2;
    if (M - m0 >= 1) itile<1, BITS, G, SC16, MINS, SM4, IQ1>(k, K, xq, dx, sq, m0, out, ldo);
}

// The grid layout (tiles.h): one activation row (a decode step) unpacks each group as it goes; more rows
// unpack the tile's groups once into the 8-bit layout's bytes (their table already applied: 16 K bytes,
// from L2), which the 8-row blocks then read as Q8_0's are read, so the grid lookups are not repeated per
// row block. Sums as the decoded layouts' tiles make them (the same values, the same order): bit-equal.
template <int BITS, int G, bool IQ1>
static void grid_rows_of(const KT &k, int64_t K, const int8_t *xq, const float *dx, const int16_t *sq, int64_t M,
                         float *out, int64_t ldo) {
    if (M == 1) {
        rows<BITS, G, false, false, false, IQ1>(k, K, xq, dx, sq, M, out, ldo);
        return;
    }
    static thread_local uint8_t *scratch = nullptr;
    static thread_local int64_t have = 0;
    const int64_t ub = group_bytes(BITS, GRID_UNIT), need = 8 * K;
    if (need > have) {
        free(scratch);
        scratch = (uint8_t *)aligned_alloc(64, (size_t)((need + 63) / 64 * 64));
        have = scratch ? need : 0;
        if (!scratch) {  // no memory for it: unpack per row block instead
            rows<BITS, G, false, false, false, IQ1>(k, K, xq, dx, sq, M, out, ldo);
            return;
        }
    }
    // the 4-bit layout: steps 2p and 2p + 1 in the nibbles of 64 bytes, a unit's 32 values (one group of 32
    // or two of 16) at 256 bytes a unit
    for (int64_t u = 0; u < K / GRID_UNIT; u++) {
        __m512i w[GRID_UNIT / 4];
        load_group(BITS, GRID_UNIT, k.qt + u * ub, ub, w, k.flags & ~QDOT_LUTS);
        for (int p = 0; p < GRID_UNIT / 8; p++)
            _mm512_store_si512((void *)(scratch + u * 8 * GRID_UNIT + 64 * p),
                               _mm512_or_si512(w[2 * p], _mm512_slli_epi16(w[2 * p + 1], 4)));
    }
    KT k4 = k;
    k4.qt = scratch;
    rows<4, G, false, false, false, IQ1>(k4, K, xq, dx, sq, M, out, ldo);
}

static void grid_rows(int code, const KT &k, int64_t K, const int8_t *xq, const float *dx, const int16_t *sq, int64_t M,
                      float *out, int64_t ldo) {
    switch (code) {
    case QDOT_G_IQ3XXS: grid_rows_of<QDOT_G_IQ3XXS, 32, false>(k, K, xq, dx, sq, M, out, ldo); break;
    case QDOT_G_IQ3S: grid_rows_of<QDOT_G_IQ3S, 32, false>(k, K, xq, dx, sq, M, out, ldo); break;
    case QDOT_G_IQ2XXS: grid_rows_of<QDOT_G_IQ2XXS, 32, false>(k, K, xq, dx, sq, M, out, ldo); break;
    case QDOT_G_IQ2XS: grid_rows_of<QDOT_G_IQ2XS, 16, false>(k, K, xq, dx, sq, M, out, ldo); break;
    case QDOT_G_IQ2S: grid_rows_of<QDOT_G_IQ2S, 16, false>(k, K, xq, dx, sq, M, out, ldo); break;
    case QDOT_G_IQ1M: grid_rows_of<QDOT_G_IQ1M, 16, false>(k, K, xq, dx, sq, M, out, ldo); break;
    default: grid_rows_of<QDOT_G_IQ1S, 32, true>(k, K, xq, dx, sq, M, out, ldo); break;
    }
}

// The plain layout (one float16 scale per group, no mins: Q4_0, Q5_0, Q8_0, IQ4_NL): the dot product
// starts at zoff * bsum, so it sums the file's signed values (llama.cpp's sumi), and each group costs one
// convert and one multiply-add per row instead of qdot.cpp's tile() two (its offset term mw * sx).
template <int MT, int BITS, int G>
static void ptile(const uint8_t *qt, const void *dt, int flags, int zi, int64_t K, const int8_t *xq,
                  const float *dx, const int16_t *sq, int64_t m0, float *out, int64_t ldo) {
    constexpr int64_t gb = group_bytes(BITS, G);
    const int64_t ng = K / G;
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i w[G / 4];
        load_group(BITS, G, qt + g * gb, gb, w, flags);
        const __m512 sw = flags & QDOT_E8M0 ? e8m0_16((const uint8_t *)dt + g * 16)  // MXFP4's exponent bytes
                                            : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)dt + g * 16)));
        for (int i = 0; i < MT; i++) {
            const int8_t *x = xq + (m0 + i) * K + g * G;
            __m512i d = _mm512_set1_epi32(zi * (int32_t)sq[(m0 + i) * ng + g]);
            for (int s = 0; s < G / 4; s++) {
                int32_t x4;
                memcpy(&x4, x + 4 * s, 4);
                d = _mm512_dpbusd_epi32(d, w[s], _mm512_set1_epi32(x4));
            }
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, _mm512_set1_ps(dx[(m0 + i) * ng + g])), acc[i]);
        }
    }
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(out + (m0 + i) * ldo, acc[i]);
}

template <int BITS, int G>
static void prows(const uint8_t *qt, const void *dt, int flags, int zi, int64_t K, const int8_t *xq,
                  const float *dx, const int16_t *sq, int64_t M, float *out, int64_t ldo) {
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) ptile<8, BITS, G>(qt, dt, flags, zi, K, xq, dx, sq, m0, out, ldo);
    if (M - m0 >= 4) ptile<4, BITS, G>(qt, dt, flags, zi, K, xq, dx, sq, m0, out, ldo), m0 += 4;
    if (M - m0 >= 2) ptile<2, BITS, G>(qt, dt, flags, zi, K, xq, dx, sq, m0, out, ldo), m0 += 2;
    if (M - m0 >= 1) ptile<1, BITS, G>(qt, dt, flags, zi, K, xq, dx, sq, m0, out, ldo);
}

// the largest |u + zoff| the type's stored values give (through its table, if any)
static int max_value(int bits, int flags, int zi) {
    const uint8_t *lut = lut_of(flags);
    int v = 0;
    for (int u = 0; u < (lut ? 16 : 1 << bits); u++) {
        const int a = abs((lut ? lut[u] : u) + zi);
        v = a > v ? a : v;
    }
    return v;
}
#endif

// Tile t of a K-layout weight (qdot.cpp's mm_ktile arguments) through the integer tiles; false when
// the type is not one of theirs (then ktile() takes it). sq: qdot_quantize's integer group sums.
bool kint_tile(int bits, int G, const uint8_t *qw, const int8_t *sc, const int8_t *mn, const uint16_t *dw,
               const uint16_t *mw, float zoff, int64_t K, const int8_t *xq, const float *dx, const int16_t *sq,
               int64_t M, int64_t t, float *out, int64_t ldo, int flags) {
#if QDOT_VNNI
    const int zi = (int)zoff;
    if (!sq || (float)zi != zoff || ((mn || (flags & QDOT_SM4)) && zi)) return false;
    if ((flags & QDOT_IQ1S) && ((bits != 2 && bits != QDOT_G_IQ1S) || G != 32 || mn || zi != -1)) return false;
    const int64_t ng = K / G, gb = group_bytes(bits, G), nsb = K / 256;
    const KT k{qw + t * ng * gb, sc + t * ng * 16, mn ? mn + t * ng * 16 : nullptr, dw + t * nsb * 16,
               mw ? mw + t * nsb * 16 : nullptr, flags, zi};
    // vpdpwssd reads the dot product's low 16 bits: only where |sum (u + zoff) q| < 2^15 with |q| <= 128
    const bool sc16 = max_value(bits, flags, zi) * 128 * G < 32768;
    float *o = out + t * 16;
    const bool sm4 = flags & QDOT_SM4, mins = mn != nullptr;
    if (is_grid(bits)) {
        if (mins || sm4 || G != (bits == QDOT_G_IQ2XS || bits == QDOT_G_IQ2S || bits == QDOT_G_IQ1M ? 16 : 32)) return false;
        grid_rows(bits, k, K, xq, dx, sq, M, o, ldo);
        return true;
    }
    if (flags & QDOT_IQ1S) rows<2, 32, false, false, false, true>(k, K, xq, dx, sq, M, o, ldo);  // IQ1_S
    else if (bits == 2 && G == 16 && sm4 && sc16) rows<2, 16, true, true, true>(k, K, xq, dx, sq, M, o, ldo);      // Q2_K
    else if (bits == 3 && G == 16 && !mins && !sm4 && sc16) rows<3, 16, true, false, false>(k, K, xq, dx, sq, M, o, ldo);  // Q3_K, IQ1_M
    else if (bits == 3 && G == 16 && !mins && !sm4) rows<3, 16, false, false, false>(k, K, xq, dx, sq, M, o, ldo);  // IQ2_XS, IQ2_S
    else if (bits == 3 && G == 32 && !mins && !sm4) rows<3, 32, false, false, false>(k, K, xq, dx, sq, M, o, ldo);  // IQ2_XXS
    else if (bits == 4 && G == 32 && mins && !sm4) rows<4, 32, false, true, false>(k, K, xq, dx, sq, M, o, ldo);  // Q4_K
    else if (bits == 4 && G == 32 && !mins && !sm4) rows<4, 32, false, false, false>(k, K, xq, dx, sq, M, o, ldo);  // IQ4_XS, IQ3_XXS
    else if (bits == 5 && G == 32 && mins && !sm4) rows<5, 32, false, true, false>(k, K, xq, dx, sq, M, o, ldo);  // Q5_K
    else if (bits == 6 && G == 16 && !mins && !sm4) rows<6, 16, false, false, false>(k, K, xq, dx, sq, M, o, ldo);  // Q6_K
    else return false;
    return true;
#else
    (void)bits, (void)G, (void)qw, (void)sc, (void)mn, (void)dw, (void)mw, (void)zoff, (void)K, (void)xq, (void)dx;
    (void)sq, (void)M, (void)t, (void)out, (void)ldo, (void)flags;
    return false;
#endif
}

// Tile t of a plain-layout weight (qdot.cpp's mm_tile arguments) through ptile(); false when it has mins
// (Q4_1, Q5_1: their float16 s = d * sum(q) is llama.cpp's own offset term, which tile() keeps) or a
// shape ptile() is not made for.
bool kint_ptile(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff, int64_t K,
                const int8_t *xq, const float *dx, const int16_t *sq, int64_t M, int64_t t, float *out, int64_t ldo,
                int flags) {
#if QDOT_VNNI
    const int zi = (int)zoff;
    if (!sq || mw || (float)zi != zoff || G != 32) return false;
    const int64_t ng = K / G, gb = group_bytes(bits, G);
    const uint8_t *qt = qw + t * ng * gb;
    // E8M0 (MXFP4): a byte per group and row, not a float16
    const void *dt = flags & QDOT_E8M0 ? (const void *)((const uint8_t *)dw + t * ng * 16) : (const void *)(dw + t * ng * 16);
    float *o = out + t * 16;
    if (bits == 4) prows<4, 32>(qt, dt, flags, zi, K, xq, dx, sq, M, o, ldo);  // Q4_0, IQ4_NL, MXFP4
    else if (bits == 5) prows<5, 32>(qt, dt, flags, zi, K, xq, dx, sq, M, o, ldo);  // Q5_0
    else if (bits == 8) prows<8, 32>(qt, dt, flags, zi, K, xq, dx, sq, M, o, ldo);  // Q8_0
    else return false;
    return true;
#else
    (void)bits, (void)G, (void)qw, (void)dw, (void)mw, (void)zoff, (void)K, (void)xq, (void)dx, (void)sq, (void)M;
    (void)t, (void)out, (void)ldo, (void)flags;
    return false;
#endif
}
