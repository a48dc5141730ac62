// ggtorch's JIT library: the tile layout's value tables and unpacking (qdot.cpp's layout comment), shared
// by qdot.cpp's tiles and kint.cpp's integer-sum tiles.
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define QDOT_VNNI 1
#else
#define QDOT_VNNI 0
#endif
// the grid layout's byte-permute lookups (vpermi2b, vpmultishiftqb; pext for IQ2_S's high bits)
#if QDOT_VNNI && defined(__AVX512VBMI__) && defined(__BMI2__)
#define QDOT_VBMI 1
#else
#define QDOT_VBMI 0
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
// block of high bits (bit s, or bits 2s..2s+1, of byte 4r + t: row r's value 4s + t); the grid layouts
// (codes 9..12, below) their index, high-bit and sign planes
static constexpr int64_t group_bytes(int bits, int G) {
    return bits == 8 ? 16 * G : bits == 4 ? 8 * G : bits == 2 ? 4 * G : bits == 3 ? 6 * G
         : bits == QDOT_G_IQ1S ? 3 * G : bits == QDOT_G_IQ2XXS ? 4 * G : bits == QDOT_G_IQ2XS ? 4 * G + G / 4
         : bits == QDOT_G_IQ3XXS ? 6 * G : bits == QDOT_G_IQ2S ? 4 * G + G / 2 : bits == QDOT_G_IQ1M ? 3 * G
         : bits == QDOT_G_IQ3S ? 6 * G + G / 2 : 8 * G + 64;
}

// The grid layout (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): the file's grid indices kept, 16 rows side by side.
// A tile's unit of 32 values (GRID_UNIT: one scale group, or two of 16) holds, per grid entry e of a row
// (4 values for IQ3_XXS, else 8) and row r (G below is the unit's 32):
// - the index's low byte at 16 e + r (ne = entries per row and group);
// - IQ2_XS, IQ3_S: its 9th bit as bit r of the u16 at 16 ne + 2 e; IQ2_S: its 2 high bits as bits 2r, 2r + 1 of
//   the u32 at 16 ne + 4 e; IQ1_S: its 3 high bits in the nibble r % 2 of byte 16 ne + 8 e + r / 2 (IQ1_M:
//   the same, with the entry's delta sign as the nibble's bit 3, which the unpacking ORs in as bit 2);
// - then (not IQ1_S, IQ1_M) per step s (values 4s..4s+3) a u64 of sign bits, bit 4r + t for row r's value 4s + t:
//   the step's register's byte mask.
// Unpacking looks each entry up in QDOT_GRID* (the level indices the 3- and 4-bit layouts store) and ORs
// in the sign bit (IQ3_XXS: bit 3, IQ2: bit 2; IQ3_S's (g + 15) / 2 flips to (15 - g) / 2), so the tables and the arithmetic after it are the other
// layouts' own: 3.31 bits a weight for IQ3_XXS (file 3.06; 4.31 with the indices decoded), 2.69 for IQ2_XS
// (2.31; 3.56), 2.81 for IQ2_S (2.56; 3.56), 2.31 for IQ2_XXS (2.06; 3.31), 1.81 for IQ1_S (1.56; 2.31),
// 2.06 for IQ1_M (1.75; 3.56), 3.56 for IQ3_S (3.44; 4.31).
static constexpr bool is_grid(int bits) { return bits >= QDOT_G_IQ1S && bits <= QDOT_G_IQ3S; }
// the grid layout's storage unit: 32 values of 16 rows (two scale groups for IQ2_XS, IQ2_S, IQ1_M, whose
// G is 16: their lookups then fill a whole register of 64 indices)
static constexpr int GRID_UNIT = 32;

static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

// the grid layout's entry index of row r, entry e
static inline unsigned grid_index(int code, int G, const uint8_t *q, int r, int e) {
    const int ne = code == QDOT_G_IQ3XXS || code == QDOT_G_IQ3S ? G / 4 : G / 8;
    unsigned idx = q[16 * e + r];
    if (code == QDOT_G_IQ2XS || code == QDOT_G_IQ3S) idx |= ((unsigned)((q[16 * ne + 2 * e + r / 8] >> (r % 8)) & 1)) << 8;
    if (code == QDOT_G_IQ1S || code == QDOT_G_IQ1M) idx |= ((unsigned)(q[16 * ne + 8 * e + r / 2] >> (4 * (r % 2))) & 7) << 8;
    if (code == QDOT_G_IQ2S) idx |= ((unsigned)(q[16 * ne + 4 * e + r / 4] >> (2 * (r % 4))) & 3) << 8;
    return idx;
}

// where the sign plane starts in a group
static inline int grid_signs_at(int code, int G) {
    return code == QDOT_G_IQ3XXS ? 4 * G : code == QDOT_G_IQ3S ? 4 * G + G / 2 : code == QDOT_G_IQ2XS ? 2 * G + G / 4
         : code == QDOT_G_IQ2S ? 2 * G + G / 2 : 2 * G;
}

// portable: value k of row r (before the table), as the vectorized unpack makes it
static inline int grid_value(int code, int G, const uint8_t *q, int r, int k) {
    if (code == QDOT_G_IQ3XXS || code == QDOT_G_IQ3S) {
        const bool s3 = code == QDOT_G_IQ3S;
        const unsigned u = ((s3 ? QDOT_GRID3S : QDOT_GRID3)[grid_index(code, G, q, r, k / 4)] >> (8 * (k % 4))) & 255;
        const int p = 4 * r + k % 4;
        const unsigned neg = (q[grid_signs_at(code, G) + 8 * (k / 4) + p / 8] >> (p % 8)) & 1u;
        return (int)(s3 ? (neg ? u ^ 15 : u) : u | (neg << 3));
    }
    const unsigned idx = grid_index(code, G, q, r, k / 8);
    const uint64_t *tab = code == QDOT_G_IQ1S || code == QDOT_G_IQ1M ? QDOT_GRID1S : code == QDOT_G_IQ2XXS ? QDOT_GRID2XXS
                        : code == QDOT_G_IQ2S ? QDOT_GRID2S : QDOT_GRID2XS;
    unsigned u = (unsigned)(tab[idx] >> (8 * (k % 8))) & 255;
    if (code == QDOT_G_IQ1M) {  // the entry's delta sign: bit 3 of its nibble, as bit 2
        const int ne = G / 8, e = k / 8;
        u |= ((unsigned)(q[16 * ne + 8 * e + r / 2] >> (4 * (r % 2) + 3)) & 1u) << 2;
    } else if (code != QDOT_G_IQ1S) {
        const int p = 4 * r + k % 4;
        u |= ((q[grid_signs_at(code, G) + 8 * (k / 4) + p / 8] >> (p % 8)) & 1u) << 2;
    }
    return (int)u;
}

#if QDOT_VNNI
// row r's word of a step (lane 0) to word 2r: lo's words 0..7 for rows 0..7, hi's (32..39) for rows 8..15
alignas(64) static const uint16_t IQ3_SEL[32] = {0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0,
                                                 32, 0, 33, 0, 34, 0, 35, 0, 36, 0, 37, 0, 38, 0, 39, 0};

#if QDOT_VBMI
// 64 byte lookups into a table of NSUB x 128 bytes (vpermi2b per 128 bytes, then a tree of blends on the
// index bits above the 7th: hb[0] bit 7, hb[1] bit 8, ...)
template <int NSUB>
__attribute__((always_inline)) static inline __m512i lut_tree(const uint8_t *T, __m512i x, const __mmask64 *hb) {
    __m512i v[NSUB];
    for (int k = 0; k < NSUB; k++)
        v[k] = _mm512_permutex2var_epi8(_mm512_load_si512((const void *)(T + 128 * k)), x,
                                        _mm512_load_si512((const void *)(T + 128 * k + 64)));
    for (int l = 0, n = NSUB; n > 1; l++, n /= 2)
        for (int k = 0; k < n / 2; k++) v[k] = _mm512_mask_blend_epi8(hb[l], v[2 * k], v[2 * k + 1]);
    return v[0];
}

// The 8-value grids of 2-bit level indices (IQ2_XXS, IQ2_XS: 0..2 for 8/25/43; IQ1_S: g + 1): a group's
// entries (G/8 per row, 16 rows: up to 64 index bytes) looked up at once in two byte tables (AB: values
// 0..3 of each entry at bits 2j, then values 4..7; NSUB x 128 entries each), then spread to the steps'
// bytes with a word permute and a multishift; sign bits (so >= 0: the sign plane) ORed in as bit 2.
template <int NSUB>
__attribute__((always_inline)) static inline void unpack_lev2(const uint8_t *q, int G, const uint8_t *AB, bool delta, __m512i *w, int so) {
    const int ne = G / 8;
    const __mmask64 valid = ne == 4 ? ~0ull : (1ull << (16 * ne)) - 1;
    const __m512i x = _mm512_maskz_loadu_epi8(valid, q);
    __mmask64 hb[4] = {_mm512_movepi8_mask(x), 0, 0, 0}, dl = 0;
    if (NSUB == 4) {  // IQ2_XS: the 9th bits, a u16 per entry (bit r: row r) = bit 16 e + r of the mask
        uint64_t m = 0;
        memcpy(&m, q + 16 * ne, 2 * ne);
        hb[1] = m;
    } else if (NSUB == 8) {  // IQ2_S: the 2 high bits, a u32 per entry (bits 2r, 2r + 1: row r)
        for (int e = 0; e < ne; e++) {
            uint32_t v;
            memcpy(&v, q + 16 * ne + 4 * e, 4);
            hb[1] |= (uint64_t)_pext_u32(v, 0x55555555u) << (16 * e);
            hb[2] |= (uint64_t)_pext_u32(v, 0xAAAAAAAAu) << (16 * e);
        }
    } else if (NSUB == 16) {  // IQ1_S: 3 high bits per entry and row, nibbles (row r: nibble r % 2 of byte r / 2)
        const __m256i nb = _mm256_maskz_loadu_epi8((__mmask32)((1ull << (8 * ne)) - 1), q + 16 * ne);
        const __m512i wide = _mm512_cvtepu8_epi16(nb);
        const __m512i n = _mm512_and_si512(_mm512_or_si512(wide, _mm512_slli_epi16(_mm512_srli_epi16(wide, 4), 8)),
                                           _mm512_set1_epi8(15));
        for (int b = 0; b < 3; b++) hb[1 + b] = _mm512_test_epi8_mask(n, _mm512_set1_epi8((char)(1 << b)));
        if (delta) dl = _mm512_test_epi8_mask(n, _mm512_set1_epi8(8));  // IQ1_M: the entry's delta sign, bit 3
    }
    const __m512i a = lut_tree<NSUB>(AB, x, hb), b = lut_tree<NSUB>(AB + 128 * NSUB, x, hb);
    const __m512i lo = _mm512_unpacklo_epi8(a, b), hi = _mm512_unpackhi_epi8(a, b);
    const __m512i m3 = _mm512_set1_epi8(3), s4 = _mm512_set1_epi8(4);
    const __m512i sh0 = _mm512_set1_epi64(0x2624222006040200ll), sh1 = _mm512_set1_epi64(0x2E2C2A280E0C0A08ll);
    for (int e = 0; e < ne; e++) {
        const __m512i sel = _mm512_add_epi16(_mm512_load_si512((const void *)IQ3_SEL), _mm512_set1_epi16((short)(8 * e)));
        const __m512i d = _mm512_maskz_permutex2var_epi16(0x55555555u, lo, sel, hi);  // dword r: A | B << 8
        w[2 * e] = _mm512_and_si512(_mm512_multishift_epi64_epi8(sh0, d), m3);
        w[2 * e + 1] = _mm512_and_si512(_mm512_multishift_epi64_epi8(sh1, d), m3);
        if (so >= 0)
            for (int h = 0; h < 2; h++)
                w[2 * e + h] = _mm512_mask_blend_epi8(rd64(q + so + 8 * (2 * e + h)), w[2 * e + h],
                                                      _mm512_or_si512(w[2 * e + h], s4));
        if (delta) {  // bit 2 on all 4 bytes of row r in both steps: bit r of the entry's 16 -> bits 4r..4r+3
            const uint64_t m = _pdep_u64((dl >> (16 * e)) & 0xFFFF, 0x1111111111111111ull) * 15;
            for (int h = 0; h < 2; h++) w[2 * e + h] = _mm512_mask_blend_epi8(m, w[2 * e + h], _mm512_or_si512(w[2 * e + h], s4));
        }
    }
}
#endif

#if QDOT_VBMI
// The 4-value grids (IQ3_XXS: level indices 0..7, 256 entries; IQ3_S: (g + 15) / 2, 512 entries), 4 steps
// at a time: 64 indices looked up in two byte tables of nibbles (AB: values 0 | 1 << 4, then 2 | 3 << 4;
// NSUB x 128 entries each), spread to the steps' bytes with a word permute and a multishift; the sign
// bits ORed in as bit 3 (IQ3_XXS) or flipping the 4-bit value (IQ3_S: (15 - g) / 2 = 15 - (g + 15) / 2).
template <int NSUB>
__attribute__((always_inline)) static inline void unpack_quads(const uint8_t *q, int G, const uint8_t *AB, __m512i *w) {
    constexpr bool s3 = NSUB == 4;  // IQ3_S: the 9th index bits (a u16 per entry) and its sign flip
    const int ne = G / 4, so = s3 ? 4 * G + G / 2 : 4 * G;
    // multishift: the 4 nibbles of each dword's low 16 bits into its 4 bytes
    const __m512i nib = _mm512_set1_epi64(0x2C2824200C080400ll), m4 = _mm512_set1_epi8(15);
    const __m512i flip = _mm512_set1_epi8(s3 ? 15 : 8);
    for (int c = 0; c < G / 16; c++) {
        const __m512i x = _mm512_loadu_si512((const void *)(q + 64 * c));  // steps 4c..4c+3, 16 rows each
        __mmask64 hb[2] = {_mm512_movepi8_mask(x), 0};  // index bit 7 (and 8): the table's upper halves
        if (s3) hb[1] = rd64(q + 16 * ne + 8 * c);
        const __m512i a = lut_tree<NSUB>(AB, x, hb), b = lut_tree<NSUB>(AB + 128 * NSUB, x, hb);
        // per 128-bit lane (a step): rows 0..7 as words a | b << 8 in lo, rows 8..15 in hi
        const __m512i lo = _mm512_unpacklo_epi8(a, b), hi = _mm512_unpackhi_epi8(a, b);
        for (int l = 0; l < 4; l++) {
            // row r's word to word 2r (dword r), from lo's lane l (r < 8) or hi's (r >= 8)
            const __m512i sel = _mm512_add_epi16(_mm512_load_si512((const void *)IQ3_SEL), _mm512_set1_epi16((short)(8 * l)));
            const __m512i d = _mm512_maskz_permutex2var_epi16(0x55555555u, lo, sel, hi);
            const __m512i v = _mm512_and_si512(_mm512_multishift_epi64_epi8(nib, d), m4);
            const int st = 4 * c + l;
            w[st] = _mm512_mask_blend_epi8(rd64(q + so + 8 * st), v, s3 ? _mm512_xor_si512(v, flip) : _mm512_or_si512(v, flip));
        }
    }
}
#endif

// a grid layout's group into G/4 registers of level indices with their sign bits (before the table)
__attribute__((always_inline)) static inline void unpack_grid(int code, int G, const uint8_t *q, __m512i *w) {
    alignas(64) uint64_t b8[16];
#if QDOT_VBMI
    if (code == QDOT_G_IQ3XXS) {
        unpack_quads<2>(q, G, QDOT_GRID3_AB, w);
        return;
    }
    if (code == QDOT_G_IQ3S) {
        unpack_quads<4>(q, G, QDOT_GRID3S_AB, w);
        return;
    }
#endif
#if !QDOT_VBMI
    if (code == QDOT_G_IQ3XXS || code == QDOT_G_IQ3S) {
        const bool s3 = code == QDOT_G_IQ3S;
        for (int s = 0; s < G / 4; s++) {
            alignas(64) uint32_t b4[16];
            for (int r = 0; r < 16; r++) b4[r] = (s3 ? QDOT_GRID3S : QDOT_GRID3)[grid_index(code, G, q, r, s)];
            const __m512i v = _mm512_load_si512((const void *)b4);
            w[s] = _mm512_mask_blend_epi8(rd64(q + grid_signs_at(code, G) + 8 * s), v,
                                          s3 ? _mm512_xor_si512(v, _mm512_set1_epi8(15)) : _mm512_or_si512(v, _mm512_set1_epi8(8)));
        }
        return;
    }
#else
    if (code == QDOT_G_IQ2XXS) {
        unpack_lev2<2>(q, G, QDOT_GRID2XXS_AB, false, w, grid_signs_at(code, G));
        return;
    }
    if (code == QDOT_G_IQ2XS) {
        unpack_lev2<4>(q, G, QDOT_GRID2XS_AB, false, w, grid_signs_at(code, G));
        return;
    }
    if (code == QDOT_G_IQ2S) {
        unpack_lev2<8>(q, G, QDOT_GRID2S_AB, false, w, grid_signs_at(code, G));
        return;
    }
    if (code == QDOT_G_IQ1S || code == QDOT_G_IQ1M) {
        unpack_lev2<16>(q, G, QDOT_GRID1S_AB, code == QDOT_G_IQ1M, w, -1);
        return;
    }
#endif
    const uint64_t *tab = code == QDOT_G_IQ1S || code == QDOT_G_IQ1M ? QDOT_GRID1S : code == QDOT_G_IQ2XXS ? QDOT_GRID2XXS
                        : code == QDOT_G_IQ2S ? QDOT_GRID2S : QDOT_GRID2XS;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const int so = grid_signs_at(code, G);
    for (int e = 0; e < G / 8; e++) {
        for (int r = 0; r < 16; r++) {
            b8[r] = tab[grid_index(code, G, q, r, e)];
            if (code == QDOT_G_IQ1M && ((q[2 * G + 8 * e + r / 2] >> (4 * (r % 2) + 3)) & 1)) b8[r] |= 0x0404040404040404ull;
        }
        const __m512i lo = _mm512_load_si512((const void *)b8), hi = _mm512_load_si512((const void *)(b8 + 8));
        // row r's entry is qword r of (lo, hi): its dwords 2r (values 0..3) and 2r + 1 (4..7) are the two steps' lanes
        w[2 * e] = _mm512_permutex2var_epi32(lo, even, hi);
        w[2 * e + 1] = _mm512_permutex2var_epi32(lo, odd, hi);
        if (code != QDOT_G_IQ1S && code != QDOT_G_IQ1M)
            for (int h = 0; h < 2; h++)
                w[2 * e + h] = _mm512_mask_blend_epi8(rd64(q + so + 8 * (2 * e + h)), w[2 * e + h],
                                                      _mm512_or_si512(w[2 * e + h], _mm512_set1_epi8(4)));
    }
}

// one tile's group of G values into G/4 registers of unsigned bytes (step s: 4 values of 16 rows)
__attribute__((always_inline)) static inline void unpack(int bits, int G, const uint8_t *q, __m512i *w, int flags) {
    const int steps = G / 4;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    if (is_grid(bits)) {
        unpack_grid(bits, G, q, w);
    } else if (bits == 8) {
        for (int s = 0; s < steps; s++) w[s] = _mm512_loadu_si512((const void *)(q + 64 * s));
        return;
    } else if (bits <= 3) {
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
    if (bits > 4 && !is_grid(bits)) {  // the high bits, moved to bit 4 (and 5) of each byte
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
__attribute__((always_inline)) static inline void load_group(int bits, int G, const uint8_t *q, int64_t gb, __m512i *w, int flags) {
    for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(q + 2 * gb + 64 * c), _MM_HINT_T0);
    unpack(bits, G, q, w, flags);
}
#endif  // QDOT_VNNI
