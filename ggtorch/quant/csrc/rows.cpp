// ggtorch's JIT library: one embedding row of a GGUF matrix dequantized in C, for the one-token decode
// step (step.cpp's qdot_decode). A row through quant/dequant.py costs about 20 us of small PyTorch
// operations, as much as a tiny model's whole C step. Each type here repeats its dequant.py function's
// float arithmetic in the same order (one rounding per operation: the library is built without
// floating-point contraction), so the row equals dequant.py's to the bit (tests/test_decode_one.py);
// a type not listed returns -1 and the caller dequantizes with dequant.py.
#include <string.h>
#include <unistd.h>
#include "qdot.h"

static inline float f16(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

static inline uint32_t u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// get_scale_min_k4: the j-th 6-bit scale and min of a Q4_K/Q5_K block's 12 scale bytes
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// n values (a whole number of blocks) of ggml type `type` at src -> out. Returns 0, or -1 for a type
// this file does not decode.
EXPORT int qdot_dequant_row(int type, const uint8_t *src, int64_t n, float *out) {
    switch (type) {
    case 0:  // F32
        memcpy(out, src, sizeof(float) * (size_t)n);
        return 0;
    case 1:  // F16
        for (int64_t i = 0; i < n; i++) out[i] = f16(src + 2 * i);
        return 0;
    case 30:  // BF16: the upper half of a float32
        for (int64_t i = 0; i < n; i++) {
            const uint32_t b = ((uint32_t)src[2 * i] | ((uint32_t)src[2 * i + 1] << 8)) << 16;
            memcpy(out + i, &b, 4);
        }
        return 0;
    case 2:  // Q4_0: d, qs[16]; value i < 16 the low nibble of qs[i], i >= 16 the high nibble of qs[i - 16]
        for (int64_t b = 0; b < n / 32; b++, src += 18, out += 32) {
            const float d = f16(src);
            for (int i = 0; i < 16; i++) {
                out[i] = d * (float)((src[2 + i] & 0xF) - 8);
                out[i + 16] = d * (float)((src[2 + i] >> 4) - 8);
            }
        }
        return 0;
    case 3:  // Q4_1: d, m, qs[16]; d * q + m
        for (int64_t b = 0; b < n / 32; b++, src += 20, out += 32) {
            const float d = f16(src), m = f16(src + 2);
            for (int i = 0; i < 16; i++) {
                out[i] = d * (float)(src[4 + i] & 0xF) + m;
                out[i + 16] = d * (float)(src[4 + i] >> 4) + m;
            }
        }
        return 0;
    case 6:  // Q5_0: d, qh (bit i: value i's fifth bit), qs[16]; d * (q - 16)
        for (int64_t b = 0; b < n / 32; b++, src += 22, out += 32) {
            const float d = f16(src);
            const uint32_t qh = u32(src + 2);
            for (int i = 0; i < 16; i++) {
                out[i] = d * (float)((int)((src[6 + i] & 0xF) | (((qh >> i) & 1) << 4)) - 16);
                out[i + 16] = d * (float)((int)((src[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
            }
        }
        return 0;
    case 7:  // Q5_1: d, m, qh, qs[16]; d * q + m
        for (int64_t b = 0; b < n / 32; b++, src += 24, out += 32) {
            const float d = f16(src), m = f16(src + 2);
            const uint32_t qh = u32(src + 4);
            for (int i = 0; i < 16; i++) {
                out[i] = d * (float)((src[8 + i] & 0xF) | (((qh >> i) & 1) << 4)) + m;
                out[i + 16] = d * (float)((src[8 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) + m;
            }
        }
        return 0;
    case 8:  // Q8_0: d, qs[32] int8; q * d
        for (int64_t b = 0; b < n / 32; b++, src += 34, out += 32) {
            const float d = f16(src);
            for (int i = 0; i < 32; i++) out[i] = (float)(int8_t)src[2 + i] * d;
        }
        return 0;
    case 12:  // Q4_K: d, dmin, scales[12], qs[128]; group j of 32: nibble j & 1 of qs[32 (j / 2) + l]
    case 13:  // Q5_K: d, dmin, scales[12], qh[32] (bit j of qh[l]: group j's fifth bit), qs[128]
        for (int64_t b = 0; b < n / 256; b++, out += 256) {
            const float d = f16(src), dmin = f16(src + 2);
            const uint8_t *qs = src + (type == 12 ? 16 : 48), *qh = src + 16;
            for (int j = 0; j < 8; j++) {
                int sc, mn;
                k_scale_min(src + 4, j, &sc, &mn);
                const float dl = d * (float)sc, ml = dmin * (float)mn;
                for (int l = 0; l < 32; l++) {
                    int q = (qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 0xF;
                    if (type == 13) q |= ((qh[l] >> j) & 1) << 4;
                    out[32 * j + l] = dl * (float)q - ml;
                }
            }
            src += type == 12 ? 144 : 176;
        }
        return 0;
    case 14:  // Q6_K: ql[128], qh[64], scales[16] int8, d; value 128 h + 32 s + l (dequantize_row_q6_K)
        for (int64_t b = 0; b < n / 256; b++, src += 210, out += 256) {
            const float d = f16(src + 208);
            for (int h = 0; h < 2; h++)
                for (int s = 0; s < 4; s++)
                    for (int l = 0; l < 32; l++) {
                        const int v = 128 * h + 32 * s + l;
                        const int lo = (src[64 * h + 32 * (s & 1) + l] >> (4 * (s >> 1))) & 0xF;
                        const int hi = (src[128 + 32 * h + l] >> (2 * s)) & 3;
                        const float dl = d * (float)(int8_t)src[192 + v / 16];
                        out[v] = dl * (float)((lo | (hi << 4)) - 32);
                    }
        }
        return 0;
    default:
        return -1;
    }
}

// Rows ids[0..n) of a matrix stored in a file (row r at byte off + r * row_bytes of fd), dequantized into
// out [n][E]: a prompt's embedding lookup in one call (a pread and a dequant.py call per row cost ~2 us
// and ~10 us in Python). buf: row_bytes of scratch. Returns 0, -1 (a short read, or a type not here) or -2
// (an id outside 0..n_rows-1).
EXPORT int qdot_embed_rows(int type, int fd, int64_t off, int64_t row_bytes, int64_t n_rows, const int64_t *ids,
                           int64_t n, int64_t E, uint8_t *buf, float *out) {
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= n_rows) return -2;
        int64_t got = 0;
        while (got < row_bytes) {
            const ssize_t r = pread(fd, buf + got, (size_t)(row_bytes - got), (off_t)(off + ids[i] * row_bytes + got));
            if (r <= 0) return -1;
            got += r;
        }
        if (qdot_dequant_row(type, buf, E, out + i * E)) return -1;
    }
    return 0;
}
