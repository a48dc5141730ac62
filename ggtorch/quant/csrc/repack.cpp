// ggtorch's JIT library, part four: GGUF blocks into qdot.cpp's tile layout, in one pass.
//
// The same transformation as quant/kernels.py's _qdot_pack (which stays as the reference and the
// fallback), written as loops: PyTorch's version builds several full-size temporaries per matrix and
// took 3-7 s for a 1.1B model; this one reads each block once and writes each output byte once.
#include <stdlib.h>
#include <string.h>
#include "tiles.h"

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
       IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
       IQ1_M = 29, MXFP4 = 39 };

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p) { return (uint32_t)rd16(p) | ((uint32_t)rd16(p + 2) << 16); }

// ggml's ksigns_iq2xs[i]: the 7 sign bits i and an 8th that makes the number of minus signs even
static inline unsigned ksign(unsigned i) { return i | ((unsigned)__builtin_parity(i) << 7); }

// ggml's get_scale_min_k4: the j-th 6-bit scale and min of a Q4_K/Q5_K block's 12 bytes
static inline void scale_min(const uint8_t *s, int j, int8_t *sc, int8_t *mn) {
    if (j < 4) {
        *sc = (int8_t)(s[j] & 63);
        *mn = (int8_t)(s[j + 4] & 63);
    } else {
        *sc = (int8_t)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *mn = (int8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Q3_K's j-th sub-block scale minus 32: low 4 bits in bytes 0..7, high 2 in bytes 8..11 (dequantize_row_q3_K)
static inline int8_t q3k_scale(const uint8_t *s, int j) {
    const int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4, hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (int8_t)((lo | (hi << 4)) - 32);
}

// IQ4_XS's j-th scale minus 32: a nibble of scales_l, two bits of scales_h (dequantize_row_iq4_xs)
static inline int8_t iq4xs_scale(const uint8_t *b, int j) {
    const int lo = (b[4 + j / 2] >> (4 * (j % 2))) & 15, hi = (rd16(b + 2) >> (2 * j)) & 3;
    return (int8_t)((lo | (hi << 4)) - 32);
}

// IQ1_M's float16 d: the top nibbles of its four u16 scales (dequantize_row_iq1_m)
static inline uint16_t iq1m_d(const uint8_t *b) {
    const uint16_t s0 = rd16(b + 48), s1 = rd16(b + 50), s2 = rd16(b + 52), s3 = rd16(b + 54);
    return (uint16_t)((s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000));
}

// one block's unsigned values (the order ggml dequantizes them in)
static void block_values(int type, const uint8_t *b, uint8_t *u) {
    switch (type) {
    case Q4_0:
    case IQ4_NL:  // indices into kvalues_iq4nl, laid out as Q4_0's nibbles
    case MXFP4:   // indices into kvalues_mxfp4 after the e8m0 byte (dequantize_row_mxfp4)
    case Q4_1: {
        const uint8_t *qs = b + (type == Q4_1 ? 4 : type == MXFP4 ? 1 : 2);
        for (int i = 0; i < 16; i++) u[i] = qs[i] & 15, u[i + 16] = qs[i] >> 4;
        break;
    }
    case Q5_0:
    case Q5_1: {
        const uint8_t *h = b + (type == Q5_0 ? 2 : 4), *qs = h + 4;
        const uint32_t qh = (uint32_t)h[0] | ((uint32_t)h[1] << 8) | ((uint32_t)h[2] << 16) | ((uint32_t)h[3] << 24);
        for (int i = 0; i < 16; i++) {
            u[i] = (uint8_t)((qs[i] & 15) | (((qh >> i) & 1) << 4));
            u[i + 16] = (uint8_t)((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
        }
        break;
    }
    case Q8_0:
        for (int i = 0; i < 32; i++) u[i] = (uint8_t)((int8_t)b[2 + i] + 128);
        break;
    case Q4_K:
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) u[64 * j + l] = b[16 + 32 * j + l] & 15, u[64 * j + 32 + l] = b[16 + 32 * j + l] >> 4;
        break;
    case Q5_K: {
        const uint8_t *qh = b + 16, *qs = b + 48;
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                u[64 * j + l] = (uint8_t)((qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4));
                u[64 * j + 32 + l] = (uint8_t)((qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4));
            }
        break;
    }
    case IQ4_XS:  // 8 x 32 indices: 16 bytes each, low nibbles then high (dequantize_row_iq4_xs)
        for (int j = 0; j < 8; j++)
            for (int l = 0; l < 16; l++) u[32 * j + l] = b[8 + 16 * j + l] & 15, u[32 * j + 16 + l] = b[8 + 16 * j + l] >> 4;
        break;
    case Q2_K:  // value 128h + 32s + l: bits 2s of qs[32h + l] (dequantize_row_q2_K)
    case Q3_K: {  // the same 2-bit part at 32, plus bit j of hmask[l] for value 32j + l as bit 2 (u = q + 4)
        const uint8_t *qs = b + (type == Q2_K ? 16 : 32);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) u[128 * h + 32 * s + l] = (qs[32 * h + l] >> (2 * s)) & 3;
        if (type == Q3_K)
            for (int j = 0; j < 8; j++)
                for (int l = 0; l < 32; l++) u[32 * j + l] |= ((b[l] >> j) & 1) << 2;
        break;
    }
    case Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) {
                    const uint8_t lo = ql[64 * h + 32 * (s % 2) + l];
                    u[128 * h + 32 * s + l] =
                        (uint8_t)((s < 2 ? lo & 15 : lo >> 4) | (((qh[32 * h + l] >> (2 * s)) & 3) << 4));
                }
        break;
    }
    }
}

// row r of tile group q (G values v, bits wide): every byte of the row's share written once
template <int bits, int G>
static inline void put_group(uint8_t *q, int64_t r, const uint8_t *v) {
    if (bits == 8) {
        for (int s = 0; s < G / 4; s++) memcpy(q + 64 * s + 4 * r, v + 4 * s, 4);
        return;
    }
    if (bits <= 3) {  // 4 steps per 64 bytes at bits 2s; 3-bit: high bits as nibbles (rows r and r + 8 share a byte)
        // byte j of the row's 4 holds the 2-bit parts of values 16p + 4s + j at bits 2s: word s of the 16
        // values (bytes j = 0..3, little-endian) masked and shifted puts all four bytes' parts at once
        for (int p = 0; p < G / 16; p++) {
            uint32_t w[4];
            memcpy(w, v + 16 * p, 16);
            const uint32_t lo = (w[0] & 0x03030303u) | ((w[1] & 0x03030303u) << 2) | ((w[2] & 0x03030303u) << 4) |
                                ((w[3] & 0x03030303u) << 6);
            memcpy(q + 64 * p + 4 * r, &lo, 4);
            if (bits == 3) {  // bit 2 of value 16p + 4s + j as bit s of a nibble, 32 bytes after all the 2-bit blocks
                const uint32_t h = ((w[0] >> 2) & 0x01010101u) | (((w[1] >> 2) & 0x01010101u) << 1) |
                                   (((w[2] >> 2) & 0x01010101u) << 2) | (((w[3] >> 2) & 0x01010101u) << 3);
                // rows 0..7 the low nibbles, 8..15 the high ones of the same 32 bytes. The rows come in order,
                // so rows 0..7 store whole bytes (high nibbles 0) and only rows 8..15 read them back: a read
                // of a fresh page first maps the zero page and the write then faults again, which made
                // IQ2_XS's cold load 0.87 s against 0.59 s with the pages written first (measured)
                uint8_t *at = q + 4 * G + 32 * p + (4 * r) % 32;
                uint32_t both = h;
                if (r >= 8) {
                    memcpy(&both, at, 4);
                    both = (both & 0x0F0F0F0Fu) | (h << 4);
                }
                memcpy(at, &both, 4);
            }
        }
        return;
    }
    for (int p = 0; p < G / 8; p++)
        for (int j = 0; j < 4; j++) q[64 * p + 4 * r + j] = (uint8_t)((v[8 * p + j] & 15) | ((v[8 * p + 4 + j] & 15) << 4));
    if (bits > 4)
        for (int j = 0; j < 4; j++) {
            unsigned h = 0;
            for (int s = 0; s < G / 4; s++) h |= (unsigned)(v[4 * s + j] >> 4) << ((bits - 4) * s);
            q[8 * G + 4 * r + j] = (uint8_t)h;
        }
}

// put_group<4, 32> of a Q4_0-style block (qs[i] holds values i and i + 16 in its low and high nibble) read
// from its 16 bytes directly: tile byte 64p + j of the row (p < 2) pairs values 8p + j and 8p + 4 + j,
// which are low nibbles; bytes 64(p + 2) + j pair the high nibbles of the same two bytes
static inline void put_nibbles(uint8_t *q, const uint8_t *qs) {
    for (int p = 0; p < 2; p++)
        for (int j = 0; j < 4; j++) {
            const uint8_t a = qs[8 * p + j], c = qs[8 * p + 4 + j];
            q[64 * p + j] = (uint8_t)((a & 15) | (c << 4));
            q[64 * (p + 2) + j] = (uint8_t)((a >> 4) | (c & 0xF0));
        }
}

template <int type, int bits, int G>
static void repack(const uint8_t *src, int64_t rows, int64_t K, int64_t block_bytes, uint8_t *qw, uint16_t *dw,
                   uint16_t *mw, int8_t *sc, int8_t *mn) {
    constexpr int kq = type == Q4_K || type == Q5_K || type == Q6_K || type == Q2_K || type == Q3_K || type == IQ4_XS;
    constexpr int64_t bv = kq ? 256 : 32, gpb = bv / G,
                      gb = bits == 8 ? 16 * G : bits == 4 ? 8 * G : bits == 2 ? 4 * G : bits == 3 ? 6 * G : 8 * G + 64;
    constexpr bool nibbles = type == Q4_0 || type == IQ4_NL || type == MXFP4 || type == Q4_1;  // 32 values, G 32
    constexpr int d_at = type == Q6_K ? 208 : type == Q2_K ? 80 : type == Q3_K ? 108 : 0;
    const int64_t nb = K / bv, ng = K / G, ntiles = (rows + 15) / 16;
    const uint8_t zero[256] = {0};
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < ntiles; t++) {
        uint8_t u[256];
        for (int64_t r = 0; r < 16; r++) {
            const bool pad = t * 16 + r >= rows;  // padding rows: zero values and scales
            const uint8_t *row = src + (t * 16 + r) * nb * block_bytes;
            for (int64_t bi = 0; bi < nb; bi++) {
                const uint8_t *b = row + bi * block_bytes;
                if (nibbles && !pad) {  // the file's 16 nibble bytes straight into the row's 16 tile bytes
                    put_nibbles(qw + (t * ng + bi) * gb + 4 * r, b + (type == Q4_1 ? 4 : type == MXFP4 ? 1 : 2));
                } else if (type == Q8_0 && !pad) {  // u = q + 128: the sign bit flipped, 4 bytes per step
                    uint8_t *q = qw + (t * ng + bi) * gb + 4 * r;
                    for (int s = 0; s < 8; s++)
                        for (int j = 0; j < 4; j++) q[64 * s + j] = (uint8_t)(b[2 + 4 * s + j] ^ 0x80);
                } else if (!pad) {
                    block_values(type, b, u);
                }
                for (int64_t gi = 0; gi < gpb; gi++) {
                    const int64_t g = bi * gpb + gi, at = (t * ng + g) * 16 + r;
                    if (pad || !(nibbles || type == Q8_0)) put_group<bits, G>(qw + (t * ng + g) * gb, r, pad ? zero : u + gi * G);
                    if (kq) {
                        if (pad) sc[at] = 0, mn ? (void)(mn[at] = 0) : (void)0;
                        else if (type == Q6_K) sc[at] = (int8_t)b[192 + gi];
                        else if (type == Q2_K) sc[at] = (int8_t)b[gi];  // scale | min << 4, as in the file
                        else if (type == Q3_K) sc[at] = q3k_scale(b + 96, (int)gi);
                        else if (type == IQ4_XS) sc[at] = iq4xs_scale(b, (int)gi);
                        else scale_min(b + 4, (int)gi, &sc[at], &mn[at]);
                    } else if (type == MXFP4) {
                        ((uint8_t *)dw)[at] = pad ? 0 : b[0];  // the e8m0 exponent byte itself (QDOT_E8M0)
                    } else {
                        dw[at] = pad ? 0 : rd16(b);
                        if (mw) mw[at] = pad ? 0 : rd16(b + 2);  // Q4_1, Q5_1: m
                    }
                }
                if (kq) {
                    const int64_t at = (t * nb + bi) * 16 + r;
                    dw[at] = pad ? 0 : rd16(b + d_at);
                    if (mw) mw[at] = pad ? 0 : (uint16_t)(rd16(b + d_at + 2) ^ 0x8000);  // -dmin: the sign bit
                }
            }
        }
    }
}

// Each grid entry as the grid layout's unpacking makes it before the sign (qdot.h's QDOT_GRID* tables):
// IQ2_* (8 levels 8/25/43 -> 0/1/2, a byte each), IQ1_S/IQ1_M (8 values -1..1 -> 0..2), IQ3_XXS (4 levels
// 4..62 -> (g - 4) / 8), IQ3_S (4 odd magnitudes g -> (g + 15) / 2). Entry counts as ggml's grids; null
// for a type without a grid.
static uint8_t *grid_tables(int type, const uint8_t *grid) {
    const int n = type == IQ2_XXS ? 256 : type == IQ2_XS ? 512 : type == IQ2_S ? 1024 : type == IQ1_S || type == IQ1_M ? 2048
                : type == IQ3_XXS ? 256 : type == IQ3_S ? 512 : 0;
    if (!n) return nullptr;
    uint8_t *t = (uint8_t *)malloc((size_t)n * 8);
    if (!t) return nullptr;
    for (int e = 0; e < n; e++) {
        if (type == IQ3_XXS) {
            for (int k = 0; k < 4; k++) t[4 * e + k] = (uint8_t)((grid[4 * e + k] - 4) >> 3);
        } else if (type == IQ3_S) {
            for (int k = 0; k < 4; k++) t[4 * e + k] = (uint8_t)((grid[4 * e + k] + 15) >> 1);
        } else if (type == IQ1_S || type == IQ1_M) {
            for (int k = 0; k < 8; k++) t[8 * e + k] = (uint8_t)((int8_t)grid[8 * e + k] + 1);
        } else {
            for (int k = 0; k < 8; k++) t[8 * e + k] = (uint8_t)((grid[8 * e + k] > 8) + (grid[8 * e + k] > 25));
        }
    }
    return t;
}


// tiles.h's grid layout: per 256-value super-block of the tile's 16 rows, each row's entry indices, sign
// bytes (8 values each, ksigns_iq2xs applied), sub-block scales and d, then each group's planes written
// whole (no byte read back: see put_group on fresh pages). Entries: IQ3_XXS 64 of 4 values (signs per 8),
// the others 32 of 8.
template <int type, int code, int G>
static void repack_gl(const uint8_t *src, int64_t rows, int64_t K, int64_t block_bytes, uint8_t *qw, uint16_t *dw,
                      int8_t *sc) {
    constexpr int gpb = 256 / G, per = code == QDOT_G_IQ3XXS || code == QDOT_G_IQ3S ? 4 : 8, U = GRID_UNIT, upb = 256 / U, ne = U / per;
    constexpr int64_t ub = group_bytes(code, U);  // a 32-value unit (tiles.h): one group, or two of 16
    const int64_t nb = K / 256, ng = K / G, nu = K / U, ntiles = (rows + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < ntiles; t++) {
        for (int64_t bi = 0; bi < nb; bi++) {
            uint16_t idx[16][64];
            uint8_t neg[16][32];
            for (int r = 0; r < 16; r++) {
                const int64_t at = (t * nb + bi) * 16 + r;
                if (t * 16 + r >= rows) {  // padding rows: zero indices, signs and scales
                    memset(idx[r], 0, sizeof idx[r]), memset(neg[r], 0, sizeof neg[r]);
                    for (int gi = 0; gi < gpb; gi++) sc[(t * ng + bi * gpb + gi) * 16 + r] = 0;
                    dw[at] = 0;
                    continue;
                }
                const uint8_t *b = src + ((t * 16 + r) * nb + bi) * block_bytes;
                dw[at] = type == IQ1_M ? iq1m_d(b) : rd16(b);
                for (int c = 0; c < 32; c++) {
                    if (type == IQ3_S) {  // qs[64] low index bits, qh[8] the 9th, signs[32] a bit per value
                        for (int h = 0; h < 2; h++) {
                            const int i = 2 * c + h;
                            idx[r][i] = (uint16_t)(b[2 + i] | (((b[66 + i / 8] >> (i % 8)) & 1) << 8));
                        }
                        neg[r][c] = b[74 + c];
                    } else if (type == IQ3_XXS) {  // qs[64] indices; per 32 values a u32 of 4 x 7 sign bits | ls << 28
                        idx[r][2 * c] = b[2 + 2 * c], idx[r][2 * c + 1] = b[3 + 2 * c];
                        neg[r][c] = (uint8_t)ksign((rd32(b + 66 + 4 * (c / 4)) >> (7 * (c % 4))) & 127);
                    } else if (type == IQ2_XXS) {  // per 32 values: u32 of 4 indices, u32 of 4 x 7 sign bits | ls << 28
                        idx[r][c] = b[2 + 8 * (c / 4) + c % 4];
                        neg[r][c] = (uint8_t)ksign((rd32(b + 6 + 8 * (c / 4)) >> (7 * (c % 4))) & 127);
                    } else if (type == IQ2_XS) {  // u16: 9-bit index | 7-bit sign index << 9
                        const unsigned q = rd16(b + 2 + 2 * c);
                        idx[r][c] = (uint16_t)(q & 511), neg[r][c] = (uint8_t)ksign(q >> 9);
                    } else if (type == IQ2_S) {  // qs[32] low index bits, signs[32], qh[8] two high bits per entry
                        idx[r][c] = (uint16_t)(b[2 + c] | ((b[66 + c / 4] << (8 - 2 * (c % 4))) & 0x300));
                        neg[r][c] = b[34 + c];
                    } else if (type == IQ1_M) {  // qs[32], qh[16]: per entry a nibble of 3 high index bits | delta sign << 3
                        const unsigned h = (b[32 + c / 2] >> (4 * (c % 2))) & 15;
                        idx[r][c] = (uint16_t)(b[c] | ((h & 7) << 8)), neg[r][c] = (uint8_t)(h >> 3);
                    } else {  // IQ1_S: qs[32] low index bits, qh[8] u16: 4 x 3 high bits | ls << 12 | delta << 15
                        idx[r][c] = (uint16_t)(b[2 + c] | (((rd16(b + 34 + 2 * (c / 4)) >> (3 * (c % 4))) & 7) << 8));
                        neg[r][c] = 0;
                    }
                }
                for (int gi = 0; gi < gpb; gi++) {
                    int8_t &v = sc[(t * ng + bi * gpb + gi) * 16 + r];
                    if (type == IQ3_XXS) v = (int8_t)(2 * (rd32(b + 66 + 4 * gi) >> 28) + 1);
                    else if (type == IQ3_S) v = (int8_t)(1 + 2 * ((b[106 + gi / 2] >> (4 * (gi % 2))) & 15));
                    else if (type == IQ2_XXS) v = (int8_t)(2 * (rd32(b + 6 + 8 * gi) >> 28) + 1);
                    else if (type == IQ2_XS || type == IQ2_S)  // a nibble per 16 values
                        v = (int8_t)(2 * ((b[(type == IQ2_XS ? 66 : 74) + gi / 2] >> (4 * (gi % 2))) & 15) + 1);
                    else if (type == IQ1_M) v = (int8_t)(2 * ((rd16(b + 48 + 2 * (gi / 4)) >> (3 * (gi % 4))) & 7) + 1);
                    else v = (int8_t)(rd16(b + 34 + 2 * gi) >> 12);  // IQ1_S: ls | delta sign << 3
                }
            }
            for (int ui = 0; ui < upb; ui++) {
                uint8_t q[ub];
                const int e0 = ui * ne;
                for (int e = 0; e < ne; e++) {
                    for (int r = 0; r < 16; r++) q[16 * e + r] = (uint8_t)idx[r][e0 + e];
                    if (code == QDOT_G_IQ2XS || code == QDOT_G_IQ3S) {
                        unsigned h = 0;
                        for (int r = 0; r < 16; r++) h |= ((idx[r][e0 + e] >> 8) & 1u) << r;
                        q[16 * ne + 2 * e] = (uint8_t)h, q[16 * ne + 2 * e + 1] = (uint8_t)(h >> 8);
                    }
                    if (code == QDOT_G_IQ2S) {
                        uint32_t h = 0;
                        for (int r = 0; r < 16; r++) h |= ((idx[r][e0 + e] >> 8) & 3u) << (2 * r);
                        memcpy(q + 16 * ne + 4 * e, &h, 4);
                    }
                    if (code == QDOT_G_IQ1S || code == QDOT_G_IQ1M)  // IQ1_M: the delta sign as the nibble's bit 3
                        for (int r = 0; r < 16; r += 2)
                            q[16 * ne + 8 * e + r / 2] = (uint8_t)(((idx[r][e0 + e] >> 8) | (neg[r][e0 + e] << 3)) |
                                                                   (((idx[r + 1][e0 + e] >> 8) | (neg[r + 1][e0 + e] << 3)) << 4));
                }
                if (code != QDOT_G_IQ1S && code != QDOT_G_IQ1M) {
                    const int so = grid_signs_at(code, U);
                    for (int st = 0; st < U / 4; st++) {  // values v..v+3 of the super-block: half of sign byte v / 8
                        const int v = ui * U + 4 * st;
                        uint64_t m = 0;
                        for (int r = 0; r < 16; r++) m |= (uint64_t)((neg[r][v / 8] >> (v % 8)) & 15) << (4 * r);
                        memcpy(q + so + 8 * st, &m, 8);
                    }
                }
                memcpy(qw + (t * nu + bi * upb + ui) * ub, q, ub);
            }
        }
    }
}

// The entry tables of the grid layout's unpacking (qdot.h), from the file's grids; 0 on success
uint32_t QDOT_GRID3[256], QDOT_GRID3S[512];
alignas(64) uint8_t QDOT_GRID3_AB[512], QDOT_GRID3S_AB[1024];
uint64_t QDOT_GRID2XXS[256], QDOT_GRID2XS[512], QDOT_GRID2S[1024], QDOT_GRID1S[2048];
alignas(64) uint8_t QDOT_GRID2XXS_AB[512], QDOT_GRID2XS_AB[1024], QDOT_GRID2S_AB[2048], QDOT_GRID1S_AB[4096];

// a 4-value table's entries as two bytes of nibbles: values 0 | 1 << 4 in AB[e], 2 | 3 << 4 in AB[n + e]
static void split_nibbles(const uint8_t *tab, int n, uint8_t *ab) {
    for (int e = 0; e < n; e++)
        ab[e] = (uint8_t)(tab[4 * e] | tab[4 * e + 1] << 4), ab[n + e] = (uint8_t)(tab[4 * e + 2] | tab[4 * e + 3] << 4);
}

// an 8-value table's entries as two bytes of 2-bit fields: values 0..3 in AB[e], 4..7 in AB[n + e]
static void split_ab(const uint8_t *tab, int n, uint8_t *ab) {
    for (int e = 0; e < n; e++) {
        unsigned a = 0, b = 0;
        for (int j = 0; j < 4; j++) a |= (unsigned)(tab[8 * e + j] & 3) << (2 * j), b |= (unsigned)(tab[8 * e + 4 + j] & 3) << (2 * j);
        ab[e] = (uint8_t)a, ab[n + e] = (uint8_t)b;
    }
}
static uint8_t *grid_tables(int type, const uint8_t *grid);
EXPORT int qdot_grid_init(int type, const uint8_t *grid) {
    uint8_t *tab = grid_tables(type, grid);
    if (!tab) return -1;
    if (type == IQ3_XXS) memcpy(QDOT_GRID3, tab, sizeof QDOT_GRID3), split_nibbles(tab, 256, QDOT_GRID3_AB);
    else if (type == IQ3_S) memcpy(QDOT_GRID3S, tab, sizeof QDOT_GRID3S), split_nibbles(tab, 512, QDOT_GRID3S_AB);
    else if (type == IQ2_XXS) memcpy(QDOT_GRID2XXS, tab, sizeof QDOT_GRID2XXS), split_ab(tab, 256, QDOT_GRID2XXS_AB);
    else if (type == IQ2_XS) memcpy(QDOT_GRID2XS, tab, sizeof QDOT_GRID2XS), split_ab(tab, 512, QDOT_GRID2XS_AB);
    else if (type == IQ2_S) memcpy(QDOT_GRID2S, tab, sizeof QDOT_GRID2S), split_ab(tab, 1024, QDOT_GRID2S_AB);
    else if (type == IQ1_S || type == IQ1_M) memcpy(QDOT_GRID1S, tab, sizeof QDOT_GRID1S), split_ab(tab, 2048, QDOT_GRID1S_AB);
    free(tab);
    return type == IQ3_XXS || type == IQ3_S || type == IQ2_XXS || type == IQ2_XS || type == IQ2_S || type == IQ1_S ||
                   type == IQ1_M ? 0 : -1;
}

// type: the ggml type id; src: rows x (K / block values) blocks; the outputs as kernels.py allocates
// them (every byte is written): qw [tiles][groups][group bytes], per-group types dw/mw
// [tiles][groups][16] (mw null where the offset is zoff * dw; MXFP4's dw: uint8 exponents), K-quants dw/mw [tiles][K/256][16] and
// sc/mn [tiles][groups][16]. Returns 0, or -1 for a type it does not know.
EXPORT int qdot_repack(int type, const uint8_t *src, int64_t rows, int64_t K, int64_t block_bytes, uint8_t *qw,
                       uint16_t *dw, uint16_t *mw, int8_t *sc, int8_t *mn) {
    switch (type) {
    case Q4_0: repack<Q4_0, 4, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q4_1: repack<Q4_1, 4, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q5_0: repack<Q5_0, 5, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q5_1: repack<Q5_1, 5, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q8_0: repack<Q8_0, 8, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q4_K: repack<Q4_K, 4, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q5_K: repack<Q5_K, 5, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q6_K: repack<Q6_K, 6, 16>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q2_K: repack<Q2_K, 2, 16>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case Q3_K: repack<Q3_K, 3, 16>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case IQ4_NL: repack<IQ4_NL, 4, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case IQ4_XS: repack<IQ4_XS, 4, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    case MXFP4: repack<MXFP4, 4, 32>(src, rows, K, block_bytes, qw, dw, mw, sc, mn); return 0;
    }
    switch (type) {  // the grid types that keep their indices (tiles.h's grid layout)
    case IQ3_XXS: repack_gl<IQ3_XXS, QDOT_G_IQ3XXS, 32>(src, rows, K, block_bytes, qw, dw, sc); return 0;
    case IQ3_S: repack_gl<IQ3_S, QDOT_G_IQ3S, 32>(src, rows, K, block_bytes, qw, dw, sc); return 0;
    case IQ2_XXS: repack_gl<IQ2_XXS, QDOT_G_IQ2XXS, 32>(src, rows, K, block_bytes, qw, dw, sc); return 0;
    case IQ2_XS: repack_gl<IQ2_XS, QDOT_G_IQ2XS, 16>(src, rows, K, block_bytes, qw, dw, sc); return 0;
    case IQ2_S: repack_gl<IQ2_S, QDOT_G_IQ2S, 16>(src, rows, K, block_bytes, qw, dw, sc); return 0;
    case IQ1_S: repack_gl<IQ1_S, QDOT_G_IQ1S, 32>(src, rows, K, block_bytes, qw, dw, sc); return 0;
    case IQ1_M: repack_gl<IQ1_M, QDOT_G_IQ1M, 16>(src, rows, K, block_bytes, qw, dw, sc); return 0;
    }
    return -1;
}
