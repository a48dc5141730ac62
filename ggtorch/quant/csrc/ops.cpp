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
#if defined(__AVX512F__)
#include <immintrin.h>
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

// sum of a[i] * b[i], 16 partial sums (the compiler turns the inner loop into one vector FMA)
static inline float dot_f32(const float *a, const float *b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int t = 0; t < 16; t++) acc[t] += a[i + t] * b[i + t];
    float s = 0.f;
    for (int t = 0; t < 16; t++) s += acc[t];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline float dot_f16(const float *a, const _Float16 *b, int n) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i))), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += a[i] * (float)b[i];
    return s;
}

// o[i] += p * b[i]
static inline void axpy_f16(float *o, float p, const _Float16 *b, int n) {
    int i = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i))),
                                                _mm512_loadu_ps(o + i)));
#endif
    for (; i < n; i++) o[i] += p * (float)b[i];
}

// Attention for T tokens, each of them one new token of its own sequence's cache (a decode step of one
// sequence, or of a batch; a sequence may have several consecutive tokens here, a prompt chunk),
// as llm_graph_context::build_attn computes it for those queries:
//   qkv [T][ld]: each token's Q [H*D], K [Hkv*D], V [Hkv*Dv] side by side (any biases added);
//   qn, kn [D] or null: per-head RMS norms (qwen3, gemma3), applied before RoPE;
//   cs, sn [T][n_rot/2]: RoPE at each token's position (n_rot 0: no RoPE on this layer);
//   Kc, Vc: the cache pool, [slot][Hkv][cap][D] and [slot][Hkv][cap][Dv] in kv_type; token t is stored
//   at row pos[t] of slot[t] and then attends to that slot's rows j0..pos[t], j0 = pos[t] - window + 1
//   with a sliding window (is_masked_swa), else 0;
//   out [T][H*Dv] = softmax(scale * q.K^T) V per head, head h reading KV head h / (H / Hkv).
// Every (token, head) is computed by the same loop whatever T is, so a token's output does not depend
// on what else is in the batch.
EXPORT void qdot_attend(const float *qkv, int64_t T, int64_t ld, int H, int Hkv, int D, int Dv, const float *qn,
                        const float *kn, float eps, const float *cs, const float *sn, int n_rot, int neox, void *Kc,
                        void *Vc, int kv_type, int64_t cap, const int64_t *slot, const int64_t *pos, int64_t window,
                        float scale, float *out) {
    float *qr = (float *)malloc(sizeof(float) * ((size_t)T * H * D + (size_t)D));
    float *kr = qr + (size_t)T * H * D;
    const int half = n_rot / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *row = qkv + t * ld;
        float *qt = qr + (size_t)t * H * D;
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
    const int rep = H / Hkv;
    int64_t work = 0;
    for (int64_t t = 0; t < T; t++) work += (pos[t] + 1) * H * (D + Dv);
#pragma omp parallel for schedule(dynamic, 1) if (work >= 131072)
    for (int64_t th = 0; th < T * H; th++) {
        const int64_t t = th / H;
        const int h = (int)(th % H), g = h / rep;
        const int64_t j0 = window > 0 && pos[t] - window + 1 > 0 ? pos[t] - window + 1 : 0, n = pos[t] + 1 - j0;
        const int64_t first = (slot[t] * Hkv + g) * cap + j0;  // the first row attended to
        const float *qh = qr + (size_t)th * D;
        float *s = (float *)malloc(sizeof(float) * (size_t)n);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = first + j;
            float d;
            if (kv_type == 1) d = dot_f16(qh, (const _Float16 *)Kc + row * D, D);
            else if (kv_type == 0) d = dot_f32(qh, (const float *)Kc + row * D, D);
            else {
                d = 0.f;
                for (int i = 0; i < D; i++) d += qh[i] * load_kv(Kc, kv_type, row * D + i);
            }
            s[j] = d * scale;
            if (s[j] > mx) mx = s[j];
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        const float inv = 1.0f / sum;
        float *o = out + (size_t)th * Dv;
        for (int d = 0; d < Dv; d++) o[d] = 0.f;
        for (int64_t j = 0; j < n; j++) {
            const float p = s[j] * inv;
            const int64_t row = (first + j) * Dv;
            if (kv_type == 1) axpy_f16(o, p, (const _Float16 *)Vc + row, Dv);
            else if (kv_type == 0) {
                const float *vr = (const float *)Vc + row;
                for (int d = 0; d < Dv; d++) o[d] += p * vr[d];
            } else {
                for (int d = 0; d < Dv; d++) o[d] += p * load_kv(Vc, kv_type, row + d);
            }
        }
        free(s);
    }
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
// GELU's tanh form (kind 1, ggml_gelu: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2/pi)(x + 0.044715 x^3)).
// gate and up may be column ranges of one fused product (row strides ldg, ldu); out is [M, F].
EXPORT void qdot_glu(const float *gate, const float *up, int64_t M, int64_t F, int64_t ldg, int64_t ldu, int kind,
                     float *out) {
    const float c2 = 2.0f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
#pragma omp parallel for schedule(static) if (M * F >= 262144)
    for (int64_t m = 0; m < M; m++) {
        const float *g = gate + m * ldg, *u = up + m * ldu;
        float *o = out + m * F;
        if (kind == 0)
            for (int64_t i = 0; i < F; i++) o[i] = g[i] / (1.0f + exp_v(-g[i])) * u[i];
        else
            for (int64_t i = 0; i < F; i++) {
                const float x = g[i];
                o[i] = x / (1.0f + exp_v(-c2 * (x + 0.044715f * x * x * x))) * u[i];
            }
    }
}
