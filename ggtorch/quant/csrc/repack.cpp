// ggtorch's JIT library, part four: GGUF blocks into qdot.cpp's tile layout, in one pass.
//
// The same transformation as quant/kernels.py's _qdot_pack (which stays as the reference and the
// fallback), written as loops: PyTorch's version builds several full-size temporaries per matrix and
// took 3-7 s for a 1.1B model; this one reads each block once and writes each output byte once.
#include <string.h>
#include "qdot.h"

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

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

// one block's unsigned values (the order ggml dequantizes them in)
static void block_values(int type, const uint8_t *b, uint8_t *u) {
    switch (type) {
    case Q4_0:
    case Q4_1: {
        const uint8_t *qs = b + (type == Q4_0 ? 2 : 4);
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
    for (int p = 0; p < G / 8; p++)
        for (int j = 0; j < 4; j++) q[64 * p + 4 * r + j] = (uint8_t)((v[8 * p + j] & 15) | ((v[8 * p + 4 + j] & 15) << 4));
    if (bits > 4)
        for (int j = 0; j < 4; j++) {
            unsigned h = 0;
            for (int s = 0; s < G / 4; s++) h |= (unsigned)(v[4 * s + j] >> 4) << ((bits - 4) * s);
            q[8 * G + 4 * r + j] = (uint8_t)h;
        }
}

template <int type, int bits, int G>
static void repack(const uint8_t *src, int64_t rows, int64_t K, int64_t block_bytes, uint8_t *qw, uint16_t *dw,
                   uint16_t *mw, int8_t *sc, int8_t *mn) {
    constexpr int kq = type == Q4_K || type == Q5_K || type == Q6_K;
    constexpr int64_t bv = kq ? 256 : 32, gpb = bv / G, gb = bits == 8 ? 16 * G : bits == 4 ? 8 * G : 8 * G + 64;
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
                if (!pad) block_values(type, b, u);
                for (int64_t gi = 0; gi < gpb; gi++) {
                    const int64_t g = bi * gpb + gi, at = (t * ng + g) * 16 + r;
                    put_group<bits, G>(qw + (t * ng + g) * gb, r, pad ? zero : u + gi * G);
                    if (kq) {
                        if (pad) sc[at] = 0, mn ? (void)(mn[at] = 0) : (void)0;
                        else if (type == Q6_K) sc[at] = (int8_t)b[192 + gi];
                        else scale_min(b + 4, (int)gi, &sc[at], &mn[at]);
                    } else {
                        dw[at] = pad ? 0 : rd16(b);
                        if (mw) mw[at] = pad ? 0 : rd16(b + 2);  // Q4_1, Q5_1: m
                    }
                }
                if (kq) {
                    const int64_t at = (t * nb + bi) * 16 + r;
                    dw[at] = pad ? 0 : rd16(b + (type == Q6_K ? 208 : 0));
                    if (mw) mw[at] = pad ? 0 : (uint16_t)(rd16(b + 2) ^ 0x8000);  // -dmin: the sign bit
                }
            }
        }
    }
}

// type: the ggml type id; src: rows x (K / block values) blocks; the outputs as kernels.py allocates
// them (every byte is written): qw [tiles][groups][group bytes], per-group types dw/mw
// [tiles][groups][16] (mw null where the offset is zoff * dw), K-quants dw/mw [tiles][K/256][16] and
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
    }
    return -1;
}
