// ggtorch's JIT library: the tile layout's value tables and unpacking (qdot.cpp's layout comment), shared
// by qdot.cpp's tiles and kint.cpp's integer-sum tiles.
#pragma once
#include <stdint.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define QDOT_VNNI 1
#else
#define QDOT_VNNI 0
#endif

#include "qdot.h"

// kvalues_iq4nl + 128: the IQ4 values as unsigned bytes
static const uint8_t IQ4_U8[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};
// IQ3_XXS: index k | sign << 3 -> (sign ? -1 : 1) * level_k + 62, levels 4, 12, ..., 52, 62 (iq3xxs_grid's)
static const uint8_t IQ3XXS_U8[16] = {66, 74, 82, 90, 98, 106, 114, 124, 58, 50, 42, 34, 26, 18, 10, 0};
// IQ2_*: index k | sign << 2 -> (sign ? -1 : 1) * level_k + 43, levels 8, 25, 43 (the iq2 grids')
static const uint8_t IQ2_U8[16] = {51, 68, 86, 43, 35, 18, 0, 43, 43, 43, 43, 43, 43, 43, 43, 43};
// IQ1_M: (g + 1) | delta sign << 2 -> 8 g +- 1 + 9 (value = d * ls * (g +- 1/8), the 8 in the output scale)
static const uint8_t IQ1M_U8[16] = {2, 10, 18, 9, 0, 8, 16, 9, 9, 9, 9, 9, 9, 9, 9, 9};
// MXFP4: kvalues_mxfp4 (0, 1, 2, 3, 4, 6, 8, 12 and their negatives) + 12
static const uint8_t MXFP4_U8[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

// IQ3_S: v -> 2 v, so that s * g = 2 v - 15 has the integer offset -15 (the integer tiles)
static const uint8_t IQ3S_U8[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};

static inline const uint8_t *lut_of(int flags) {
    return flags & QDOT_LUT_IQ4 ? IQ4_U8 : flags & QDOT_LUT_IQ3XXS ? IQ3XXS_U8 : flags & QDOT_LUT_IQ2 ? IQ2_U8
         : flags & QDOT_LUT_IQ1M ? IQ1M_U8 : flags & QDOT_LUT_MXFP4 ? MXFP4_U8
         : flags & QDOT_LUT_IQ3S ? IQ3S_U8 : nullptr;
}

// the output scale of the i-quants' sums (QDOT_OSHIFT), a power of two: exact on any float
static inline float oscale_of(int flags) { return ldexpf(1.f, -QDOT_OSHIFT(flags)); }

// bytes of one tile's group: 16 rows x G values; 5- and 6-bit values are a 4-bit part plus a 64-byte
// block of high bits (bit s, or bits 2s..2s+1, of byte 4r + t: row r's value 4s + t)
static inline int64_t group_bytes(int bits, int G) {
    return bits == 8 ? 16 * G : bits == 4 ? 8 * G : bits == 2 ? 4 * G : bits == 3 ? 6 * G : 8 * G + 64;
}

#if QDOT_VNNI
// one tile's group of G values into G/4 registers of unsigned bytes (step s: 4 values of 16 rows)
static inline void unpack(int bits, int G, const uint8_t *q, __m512i *w, int flags) {
    const int steps = G / 4;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    if (bits == 8) {
        for (int s = 0; s < steps; s++) w[s] = _mm512_loadu_si512((const void *)(q + 64 * s));
        return;
    }
    if (bits <= 3) {
        const __m512i m2 = _mm512_set1_epi8(3);
        for (int p = 0; p < steps / 4; p++) {
            const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * p));
            w[4 * p] = _mm512_and_si512(v, m2);
            w[4 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 2), m2);
            w[4 * p + 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m2);
            w[4 * p + 3] = _mm512_and_si512(_mm512_srli_epi16(v, 6), m2);
        }
        // the high bits of each 4-step block: 64 positions as 32 bytes of nibbles, moved to bit 2
        for (int p = 0; bits == 3 && p < steps / 4; p++) {
            const __m256i h = _mm256_loadu_si256((const __m256i *)(q + 4 * G + 32 * p)), n4 = _mm256_set1_epi8(0x0F);
            const __m512i hz = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(h, n4)),
                                                  _mm256_and_si256(_mm256_srli_epi16(h, 4), n4), 1);
            const __m512i b2 = _mm512_set1_epi8(4);
            __m512i *v = w + 4 * p;
            v[0] = _mm512_or_si512(v[0], _mm512_and_si512(_mm512_slli_epi16(hz, 2), b2));
            v[1] = _mm512_or_si512(v[1], _mm512_and_si512(_mm512_slli_epi16(hz, 1), b2));
            v[2] = _mm512_or_si512(v[2], _mm512_and_si512(hz, b2));
            v[3] = _mm512_or_si512(v[3], _mm512_and_si512(_mm512_srli_epi16(hz, 1), b2));
        }
    } else {
        for (int p = 0; p < steps / 2; p++) {
            const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * p));
            w[2 * p] = _mm512_and_si512(v, m4);
            w[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
    }
    if (bits > 4) {  // the high bits, moved to bit 4 (and 5) of each byte
        const __m512i h = _mm512_loadu_si512((const void *)(q + 8 * G));
        const int hb = bits - 4;
        const __m512i mask = _mm512_set1_epi8((char)(((1 << hb) - 1) << 4));
        for (int st = 0; st < steps; st++) {
            const int sh = 4 - hb * st;  // where step st's bits are, relative to bit 4
            const __m512i t = sh >= 0 ? _mm512_sll_epi16(h, _mm_cvtsi32_si128(sh))
                                      : _mm512_srl_epi16(h, _mm_cvtsi32_si128(-sh));
            w[st] = _mm512_or_si512(w[st], _mm512_and_si512(t, mask));
        }
    }
    if (flags & QDOT_LUTS) {  // indices -> table values (kvalues_iq4nl + 128, ...), 16 entries per 128-bit lane
        const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)lut_of(flags)));
        for (int s = 0; s < steps; s++) w[s] = _mm512_shuffle_epi8(lut, w[s]);
    }
}

// 16 e8m0 bytes -> their float32 scales 2^(e - 128), as e8m0_half (the subnormals for e < 2)
static inline __m512 e8m0_16(const uint8_t *p) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    const __m512i sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2)), normal, sub));
}

// a tile's group: prefetch the one two groups ahead (the next row block of the stream), then unpack
static inline void load_group(int bits, int G, const uint8_t *q, int64_t gb, __m512i *w, int flags) {
    for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(q + 2 * gb + 64 * c), _MM_HINT_T0);
    unpack(bits, G, q, w, flags);
}
#endif  // QDOT_VNNI
