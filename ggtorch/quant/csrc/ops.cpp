// ggtorch's JIT library, part two: the small per-token operations of a decode step.
//
// One new token costs a transformer about twenty small PyTorch operations per layer around its matrix
// products (split, per-head norms, RoPE, the KV-cache write and its type conversions, attention, the
// gated activation); at SmolLM2's size their dispatch cost was half of a decode step. These loops do
// the same arithmetic in one foreign call each. They are built with qdot.cpp into one library
// (quant/jit.py), and the model uses them only for a single sequence's one-token step without a
// tracer (model/fastpath.py); everything else takes the PyTorch path.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_max_threads(void) { return 1; }
#endif

#include "qdot.h"

// the cache's element types (the KV cache's dtype): 0 float32, 1 float16, 2 bfloat16
static inline float load_kv(const void *p, int type, int64_t i) {
    if (type == 1) return (float)((const _Float16 *)p)[i];
    if (type == 2) {
        const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

static inline void store_kv(void *p, int type, int64_t i, float x) {
    if (type == 1) ((_Float16 *)p)[i] = (_Float16)x;
    else if (type == 2) {  // round to nearest even, as PyTorch's float -> bfloat16 conversion
        uint32_t u;
        memcpy(&u, &x, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
        else ((uint16_t *)p)[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else ((float *)p)[i] = x;
}

// ggml_compute_forward_rms_norm_f32 on one head (squares summed in double), times the norm weight
static void head_norm(float *x, const float *w, float eps, int D) {
    double sum = 0.0;
    for (int d = 0; d < D; d++) sum += (double)(x[d] * x[d]);
    const float scale = 1.0f / sqrtf((float)(sum / (double)D) + eps);
    for (int d = 0; d < D; d++) x[d] = (x[d] * scale) * w[d];
}

// ggml_rope_ext on one head at one position: cos/sin hold the n_rot/2 angles' values (with any
// YaRN magnitude already in them); neox pairs d with d + n_rot/2, otherwise adjacent pairs (2i, 2i+1)
static void head_rope(float *x, const float *cs, const float *sn, int n_rot, int neox) {
    const int half = n_rot / 2;
    for (int i = 0; i < half; i++) {
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = x[a], x1 = x[b];
        x[a] = x0 * cs[i] - x1 * sn[i];
        x[b] = x0 * sn[i] + x1 * cs[i];
    }
}

// ---- attention ------------------------------------------------------------------------------------
// A token's attention output must not depend on what else is computed with it (the other tokens of a
// prompt chunk or of a batch, the other heads) nor on how the work is split, so that a prompt gets the
// same answer alone, in a batch, in any chunking and after a cached prefix. The arithmetic is therefore
// fixed per query: each score is one multiply-add chain over d (q[0] k[0] first), which is exactly what
// one SIMD lane computes with the keys side by side in lanes (a transposed tile of K), so the lane or
// tile a key lands in changes nothing; the softmax sums its terms in TW partial sums counted from the
// query's own first key, then a fixed tree; each output element is one multiply-add chain over the keys
// in order. Tiles, query blocks and threads only decide what is computed together. (llama.cpp's CPU
// flash attention, ggml_compute_forward_flash_attn_ext_f16, gives each query row its own loop too; its
// scheduling, the KV split of its decode path and the server's batching are what vary there.)

#if defined(__AVX512F__)
#define AW 16  // lanes of the vector type
typedef __m512 vf;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset(float x) { return _mm512_set1_ps(x); }
static inline vf vld(const float *p) { return _mm512_loadu_ps(p); }
static inline void vst(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf vfirst(vf a, int64_t n) { return _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1), a); }  // 0 <= n < AW
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2(vf n) {  // 2^n for integral n in -127..127
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
template <int KT> static inline vf vkv(const void *p, int64_t i) {  // AW cache values from element i
    if (KT == 0) return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (KT == 1) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define AW 8
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset(float x) { return _mm256_set1_ps(x); }
static inline vf vld(const float *p) { return _mm256_loadu_ps(p); }
static inline void vst(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float vhmax(vf a) {
    float l[8];
    _mm256_storeu_ps(l, a);
    float m = l[0];
    for (int i = 1; i < 8; i++) m = l[i] > m ? l[i] : m;
    return m;
}
static inline vf vfirst(vf a, int64_t n) {
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_ps(a, _mm256_castsi256_ps(keep));
}
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2(vf n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#else
#define AW 1
typedef float vf;
static inline vf vzero() { return 0.f; }
static inline vf vset(float x) { return x; }
static inline vf vld(const float *p) { return *p; }
static inline void vst(float *p, vf v) { *p = v; }
static inline vf vfma(vf a, vf b, vf c) { return fmaf(a, b, c); }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline float vhmax(vf a) { return a; }
static inline vf vfirst(vf, int64_t) { return 0.f; }
static inline vf vround(vf a) { return nearbyintf(a); }
static inline vf vpow2(vf n) {
    const int32_t e = ((int32_t)n + 127) << 23;
    float f;
    memcpy(&f, &e, 4);
    return f;
}
#endif
#if AW >= 8  // 8 cache values as float32 (both vector builds transpose K in 8 x 8 blocks)
template <int KT> static inline __m256 kv8(const void *p, int64_t i) {
    if (KT == 0) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (KT == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#if AW == 8
template <int KT> static inline vf vkv(const void *p, int64_t i) { return kv8<KT>(p, i); }
#endif

// r[i] (row i, 8 columns) -> r[c] (column c, 8 rows)
static inline void transpose8(__m256 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#else
template <int KT> static inline vf vkv(const void *p, int64_t i) { return load_kv(p, KT, i); }
#endif

#define TW 16           // keys per tile
#define NV (TW / AW)    // vectors per tile row
#define QG (NV >= 8 ? 1 : 8 / NV)  // queries scored together (8 accumulators)

// e^x per lane (x <= 0 here), the same steps as exp_v below: x = n ln2 + r, degree-6 Taylor polynomial of e^r
static inline vf vexp(vf x) {
    x = vmax(x, vset(-87.0f));
    const vf n = vround(vmul(x, vset(1.44269504088896341f)));
    vf r = vfma(n, vset(-0.693145751953125f), x);
    r = vfma(n, vset(-1.428606765330187e-06f), r);
    vf p = vset(1.f / 720);
    p = vfma(p, r, vset(1.f / 120));
    p = vfma(p, r, vset(1.f / 24));
    p = vfma(p, r, vset(1.f / 6));
    p = vfma(p, r, vset(0.5f));
    p = vfma(p, r, vset(1.f));
    p = vfma(p, r, vset(1.f));
    return vmul(p, vpow2(n));
}

// K rows row0 .. row0+nr-1 (nr <= TW) of one cache head as float32, transposed: kt[d][r], zeros past nr
template <int KT> static void k_tile(const void *K, int64_t row0, int nr, int D, float *kt) {
    int d = 0;
#if AW >= 8
    for (; d + 8 <= D; d += 8)
        for (int r0 = 0; r0 < TW; r0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = r0 + i < nr ? kv8<KT>(K, (row0 + r0 + i) * D + d) : _mm256_setzero_ps();
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (int64_t)(d + i) * TW + r0, r[i]);
        }
#endif
    for (; d < D; d++)
        for (int r = 0; r < TW; r++) kt[(int64_t)d * TW + r] = r < nr ? load_kv(K, KT, (row0 + r) * D + d) : 0.f;
}

// s[g][r] = scale * (q[g][0] kt[0][r] + q[g][1] kt[1][r] + ...), one multiply-add chain per (query, key)
template <int G> static inline void qk_tile(const float *const *q, const float *kt, int D, float scale, float *const *s) {
    vf acc[G][NV];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) acc[g][v] = vzero();
    for (int d = 0; d < D; d++) {
        vf k[NV];
        for (int v = 0; v < NV; v++) k[v] = vld(kt + (int64_t)d * TW + v * AW);
        for (int g = 0; g < G; g++) {
            const vf b = vset(q[g][d]);
            for (int v = 0; v < NV; v++) acc[g][v] = vfma(b, k[v], acc[g][v]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) vst(s[g] + v * AW, vmul(acc[g][v], vset(scale)));
}

// one query's scores s[0..n) -> e^(s - max) in place (zeros up to the next multiple of TW); returns 1 / sum.
// sink (or null): gpt-oss's attention sink, one more logit in the normalizer that has no value row
// (ggml_compute_forward_soft_max_f32 with sinks: max over the scores and the sink, e^(sink - max) added)
static float softmax_row(float *s, int64_t n, const float *sink) {
    vf mv = vset(-INFINITY);
    int64_t j = 0;
    for (; j + AW <= n; j += AW) mv = vmax(mv, vld(s + j));
    float m = vhmax(mv);
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    if (sink) m = *sink > m ? *sink : m;
    const vf vm = vset(m);
    vf part[NV];
    for (int v = 0; v < NV; v++) part[v] = vzero();
    for (j = 0; j < n; j += TW)
        for (int v = 0; v < NV; v++) {
            const int64_t k = j + v * AW;
            vf e = vexp(vsub(vld(s + k), vm));
            if (n - k < AW) e = n - k > 0 ? vfirst(e, n - k) : vzero();
            vst(s + k, e);
            part[v] = vadd(part[v], e);
        }
    float l[TW];
    for (int v = 0; v < NV; v++) vst(l + v * AW, part[v]);
    for (int w = TW / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) l[i] += l[i + w];
    if (sink) l[0] += expf(*sink - m);
    return 1.0f / l[0];
}

// o[g][d] = inv[g] * (p[g][0] v[0][d] + p[g][1] v[1][d] + ...) for G heads reading the same value rows
// row0 .. row0+n-1, one multiply-add chain per output element
template <int KT, int G> static void pv_heads(const void *V, int64_t row0, int64_t n, int Dv, const float *const *p,
                                              const float *inv, float *const *o) {
    int d = 0;
    for (; d + 2 * AW <= Dv; d += 2 * AW) {
        vf acc[G][2];
        for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = vzero();
        for (int64_t j = 0; j < n; j++) {
            const int64_t at = (row0 + j) * Dv + d;
            const vf v0 = vkv<KT>(V, at), v1 = vkv<KT>(V, at + AW);
            for (int g = 0; g < G; g++) {
                const vf b = vset(p[g][j]);
                acc[g][0] = vfma(b, v0, acc[g][0]);
                acc[g][1] = vfma(b, v1, acc[g][1]);
            }
        }
        for (int g = 0; g < G; g++) {
            vst(o[g] + d, vmul(acc[g][0], vset(inv[g])));
            vst(o[g] + d + AW, vmul(acc[g][1], vset(inv[g])));
        }
    }
    for (; d + AW <= Dv; d += AW)
        for (int g = 0; g < G; g++) {
            vf acc = vzero();
            for (int64_t j = 0; j < n; j++) acc = vfma(vset(p[g][j]), vkv<KT>(V, (row0 + j) * Dv + d), acc);
            vst(o[g] + d, vmul(acc, vset(inv[g])));
        }
    for (; d < Dv; d++)
        for (int g = 0; g < G; g++) {
            float acc = 0.f;
            for (int64_t j = 0; j < n; j++) acc = fmaf(p[g][j], load_kv(V, KT, (row0 + j) * Dv + d), acc);
            o[g][d] = acc * inv[g];
        }
}

// A unit of work: tokens t0 .. t0+nt-1 (consecutive positions of one slot) and query heads h0 .. h0+nh-1,
// all reading KV head g.
struct Item {
    int64_t t0, cost;
    int32_t nt, g, h0, nh;
};

struct Attn {  // what every item reads
    const float *qr;
    int H, Hkv, D, Dv;
    const void *Kc, *Vc;
    int64_t cap, window;
    const int64_t *slot, *pos;
    float scale;
    float *out;
    const float *sinks;  // [H] or null
    int64_t first(int64_t t) const { return window > 0 && pos[t] - window + 1 > 0 ? pos[t] - window + 1 : 0; }
};

template <int KT> static void attend_item(const Attn &A, const Item &it, float *S, float *kt) {
    const int rep = A.H / A.Hkv, D = A.D;
    const int64_t J0 = A.first(it.t0), J1 = A.pos[it.t0 + it.nt - 1] + 1, nk = J1 - J0;
    const int64_t ntile = (nk + TW - 1) / TW, ldS = ntile * TW + TW;
    const int64_t head = (A.slot[it.t0] * A.Hkv + it.g) * A.cap;  // row 0 of this slot's KV head g
    const int nq = it.nt * it.nh;
    const float *qp[256];  // (nt <= 16, nh <= 16)
    float *sp[256];
    for (int64_t k = 0; k < ntile; k++) {
        k_tile<KT>(A.Kc, head + J0 + k * TW, (int)(nk - k * TW < TW ? nk - k * TW : TW), D, kt);
        int n = 0;  // the queries whose keys meet this tile
        for (int i = 0; i < nq; i++) {
            const int64_t t = it.t0 + i / it.nh;
            if (A.first(t) - J0 >= (k + 1) * TW || A.pos[t] + 1 - J0 <= k * TW) continue;
            qp[n] = A.qr + ((size_t)t * A.H + (size_t)it.g * rep + it.h0 + i % it.nh) * D;
            sp[n++] = S + i * ldS + k * TW;
        }
        int i = 0;
        for (; i + QG <= n; i += QG) qk_tile<QG>(qp + i, kt, D, A.scale, sp + i);
        for (; i < n; i++) qk_tile<1>(qp + i, kt, D, A.scale, sp + i);
    }
    for (int i = 0; i < it.nt; i++) {
        const int64_t t = it.t0 + i, a = A.first(t) - J0, n = A.pos[t] + 1 - J0 - a;
        float inv[4];
        float *o[4];
        const float *p[4];
        for (int h = 0; h < it.nh; h += 4) {
            const int G = it.nh - h < 4 ? it.nh - h : 4;
            for (int g = 0; g < G; g++) {
                p[g] = S + (i * it.nh + h + g) * ldS + a;
                inv[g] = softmax_row((float *)p[g], n,
                                     A.sinks ? A.sinks + (size_t)it.g * rep + it.h0 + h + g : nullptr);
                o[g] = A.out + ((size_t)t * A.H + (size_t)it.g * rep + it.h0 + h + g) * A.Dv;
            }
            const int64_t row0 = head + J0 + a;
            if (G == 4) pv_heads<KT, 4>(A.Vc, row0, n, A.Dv, p, inv, o);
            else if (G == 3) pv_heads<KT, 3>(A.Vc, row0, n, A.Dv, p, inv, o);
            else if (G == 2) pv_heads<KT, 2>(A.Vc, row0, n, A.Dv, p, inv, o);
            else pv_heads<KT, 1>(A.Vc, row0, n, A.Dv, p, inv, o);
        }
    }
}

static int by_cost(const void *a, const void *b) {
    const int64_t x = ((const Item *)a)->cost, y = ((const Item *)b)->cost;
    return x < y ? 1 : x > y ? -1 : 0;
}

// Attention for T tokens, each of them one new token of its own sequence's cache (a decode step of one
// sequence or of a batch, a prompt or a prompt chunk: a sequence may have several consecutive tokens),
// as llm_graph_context::build_attn computes it for those queries:
//   qkv [T][ld]: each token's Q [H*D], K [Hkv*D], V [Hkv*Dv] side by side (any biases added);
//   qn, kn [D] or null: per-head RMS norms (qwen3, gemma3), applied before RoPE;
//   cs, sn [T][n_rot/2]: RoPE at each token's position (n_rot 0: no RoPE on this layer);
//   Kc, Vc: the cache pool, [slot][Hkv][cap][D] and [slot][Hkv][cap][Dv] in kv_type; token t is stored
//   at row pos[t] of slot[t] and then attends to that slot's rows j0..pos[t], j0 = pos[t] - window + 1
//   with a sliding window (is_masked_swa), else 0;
//   out [T][H*Dv] = softmax(scale * q.K^T) V per head, head h reading KV head h / (H / Hkv);
//   sinks [H] or null: gpt-oss's attention sinks (see softmax_row).
// Each (token, head)'s result is a function of its own query, keys and values only (see above).
EXPORT void qdot_attend(const float *qkv, int64_t T, int64_t ld, int H, int Hkv, int D, int Dv, const float *qn,
                        const float *kn, float eps, const float *cs, const float *sn, int n_rot, int neox, void *Kc,
                        void *Vc, int kv_type, int64_t cap, const int64_t *slot, const int64_t *pos, int64_t window,
                        float scale, float *out, const float *sinks) {
    float *qr = (float *)malloc(sizeof(float) * (size_t)T * (size_t)(H + 1) * D);
    const int half = n_rot / 2;
#pragma omp parallel for schedule(static) if (T * (H + 2 * Hkv) * D >= 65536)
    for (int64_t t = 0; t < T; t++) {  // each token's Q, K (norms, RoPE) and V; K and V into the cache
        const float *row = qkv + t * ld;
        float *qt = qr + (size_t)t * H * D, *kr = qr + (size_t)T * H * D + (size_t)t * D;
        memcpy(qt, row, sizeof(float) * (size_t)H * D);
        for (int h = 0; h < H; h++) {
            if (qn) head_norm(qt + (size_t)h * D, qn, eps, D);
            if (n_rot) head_rope(qt + (size_t)h * D, cs + t * half, sn + t * half, n_rot, neox);
        }
        const int64_t base = slot[t] * Hkv * cap + pos[t];  // row pos[t] of KV head 0 of the slot
        for (int g = 0; g < Hkv; g++) {
            memcpy(kr, row + (size_t)H * D + (size_t)g * D, sizeof(float) * D);
            if (kn) head_norm(kr, kn, eps, D);
            if (n_rot) head_rope(kr, cs + t * half, sn + t * half, n_rot, neox);
            const float *v = row + (size_t)(H + Hkv) * D + (size_t)g * Dv;
            for (int d = 0; d < D; d++) store_kv(Kc, kv_type, (base + g * cap) * D + d, kr[d]);
            for (int d = 0; d < Dv; d++) store_kv(Vc, kv_type, (base + g * cap) * Dv + d, v[d]);
        }
    }
    const Attn A = {qr, H, Hkv, D, Dv, Kc, Vc, cap, window, slot, pos, scale, out, sinks};
    const int rep = H / Hkv, nthr = omp_get_max_threads();
    // blocks: runs of one slot's consecutive positions, cut into up to 16 tokens (fewer for long contexts,
    // so that a block's scores stay near 512 KiB)
    Item *blocks = (Item *)malloc(sizeof(Item) * (size_t)T);
    int64_t n_blocks = 0, work = 0;
    for (int64_t t = 0; t < T;) {
        int64_t e = t + 1;
        while (e < T && slot[e] == slot[t] && pos[e] == pos[e - 1] + 1) e++;
        int64_t span = pos[e - 1] + 1 - A.first(t);
        if (window > 0 && span > window + 16) span = window + 16;
        int64_t bt = 131072 / ((int64_t)rep * (span + 2 * TW));
        bt = bt < 1 ? 1 : bt > 16 ? 16 : bt;
        for (int64_t b = t; b < e; b += bt) {
            const int32_t nt = (int32_t)(e - b < bt ? e - b : bt);
            const int64_t nk = pos[b + nt - 1] + 1 - A.first(b);
            blocks[n_blocks++] = Item{b, nk, nt, 0, 0, rep};
            work += nk * nt * H * (D + Dv);
        }
        t = e;
    }
    // items: a block's query heads reading one KV head, in chunks of hc heads; few blocks (a decode
    // step) split the heads further, so that every thread has work
    const int par = work >= 131072 && nthr > 1;
    int64_t split = par ? (2 * nthr + n_blocks * Hkv - 1) / (n_blocks * Hkv) : 1;
    split = split > rep ? rep : split;
    int hc = (int)((rep + split - 1) / split);
    hc = hc > 16 ? 16 : hc;  // (at most 16 tokens x 16 heads scored together)
    const int n_chunks = (rep + hc - 1) / hc;
    Item *items = (Item *)malloc(sizeof(Item) * (size_t)n_blocks * Hkv * n_chunks);
    int64_t n_items = 0, max_s = 0;
    for (int64_t b = 0; b < n_blocks; b++) {
        const Item &k = blocks[b];
        const int64_t ld_s = ((k.cost + TW - 1) / TW + 1) * TW;  // attend_item's row stride of the scores
        max_s = max_s > ld_s * k.nt * hc ? max_s : ld_s * k.nt * hc;
        for (int g = 0; g < Hkv; g++)
            for (int h = 0; h < rep; h += hc) {
                const int32_t nh = rep - h < hc ? rep - h : hc;
                items[n_items++] = Item{k.t0, k.cost * k.nt * nh, k.nt, g, h, nh};
            }
    }
    free(blocks);
    if (par) qsort(items, (size_t)n_items, sizeof(Item), by_cost);  // the longest first
#pragma omp parallel if (par)
    {
        float *S = (float *)malloc(sizeof(float) * (size_t)(max_s + (int64_t)D * TW));
        float *kt = S + max_s;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_items; i++) {
            if (kv_type == 1) attend_item<1>(A, items[i], S, kt);
            else if (kv_type == 2) attend_item<2>(A, items[i], S, kt);
            else attend_item<0>(A, items[i], S, kt);
        }
        free(S);
    }
    free(items);
    free(qr);
}

// e^x for the activations, in a form the compiler vectorizes (no calls, no branches): x = n ln2 + r with
// |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7, about float's own
// rounding), 2^n put in the exponent bits. ggml's CPU backend also uses its own vector exp for SiLU.
static inline float exp_v(float x) {
    x = x < -87.0f ? -87.0f : x;  // (comparisons, not fminf/fmaxf, whose NaN rules keep the compiler scalar)
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
    float r = fmaf(n, -0.693145751953125f, x);  // ln2 in two parts: n * hi is exact
    r = fmaf(n, -1.428606765330187e-06f, r);
    float p = 1.f / 720;
    p = fmaf(p, r, 1.f / 120);
    p = fmaf(p, r, 1.f / 24);
    p = fmaf(p, r, 1.f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.f);
    p = fmaf(p, r, 1.f);
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

// The gated FFN's activation: out = act(gate) * up, act = SiLU (kind 0, LLM_FFN_SILU: x / (1 + e^-x)) or
// GELU's tanh form (kind 1, ggml_gelu: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2/pi)(x + 0.044715 x^3)),
// or gpt-oss's clamped SwiGLU (kind 2, ggml_compute_forward_swiglu_oai_f32 with build_moe_ffn's alpha 1.702 and
// limit 7: x = min(gate, 7), y = clamp(up, -7, 7), out = x / (1 + e^(-1.702 x)) * (y + 1)).
// gate and up may be column ranges of one fused product (row strides ldg, ldu); out is [M, F].
static const float OAI_ALPHA = 1.702f, OAI_LIMIT = 7.0f;  // build_moe_ffn's LLM_FFN_SWIGLU_OAI_MOE constants

EXPORT void qdot_glu(const float *gate, const float *up, int64_t M, int64_t F, int64_t ldg, int64_t ldu, int kind,
                     float *out) {
    const float c2 = 2.0f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
#pragma omp parallel for schedule(static) if (M * F >= 262144)
    for (int64_t m = 0; m < M; m++) {
        const float *g = gate + m * ldg, *u = up + m * ldu;
        float *o = out + m * F;
        if (kind == 0)
            for (int64_t i = 0; i < F; i++) o[i] = g[i] / (1.0f + exp_v(-g[i])) * u[i];
        else if (kind == 2)
            for (int64_t i = 0; i < F; i++) {
                const float x = g[i] < OAI_LIMIT ? g[i] : OAI_LIMIT;  // (comparisons: NaN-free, vectorizable)
                float y = u[i] < OAI_LIMIT ? u[i] : OAI_LIMIT;
                y = y > -OAI_LIMIT ? y : -OAI_LIMIT;
                o[i] = x / (1.0f + exp_v(OAI_ALPHA * -x)) * (y + 1.0f);
            }
        else
            for (int64_t i = 0; i < F; i++) {
                const float x = g[i];
                o[i] = x / (1.0f + exp_v(-c2 * (x + 0.044715f * x * x * x))) * u[i];
            }
    }
}
