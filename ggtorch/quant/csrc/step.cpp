// ggtorch's JIT library, part three: every layer of a decode step in one call.
//
// After attention and the activations moved into ops.cpp, what was left of a decode step outside the
// matrix products was Python: about 140 interpreter calls per layer to reach the next foreign call
// (3.4 ms of a 23 ms step at TinyLlama's size, 2.7 of SmolLM2's 6.6, measured). Here the layers run
// back to back in C, calling the same functions the per-operation path calls (qdot_rms_norm,
// qdot_linear, qdot_attend, qdot_glu) in the same order, so the result is the same to the bit. The
// architectures describe their layers once (model/fastpath.py's Step); anything else (a tracer, a
// weight without the JIT kernel, FFN biases, experts moe.cpp does not take) keeps the per-operation path.
// gpt-oss's Q/K/V and output biases and attention sinks are here (Layer's qkv_b, o_b, sinks).
// A MoE layer's FFN is qdot_moe, the same call the per-operation path makes for it.
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "qdot.h"

// One LoRA term on a layer's product (lowrank.cpp): y[:, lo .. lo + N) += scale * (x A^T) Bt, or with
// rows[m] for row m's scale (per-request adapter scales in a server batch: lora/apply.py's SlotScales)
struct Term {
    const float *a, *bt;  // A [r][K], B transposed [r][N]
    int64_t r, N, lo;
    float scale;
    const float *rows;  // per-row scales [T] for this call, or null (then scale)
    int32_t skip;       // no row of this call uses the term's adapter
};

// the products of a layer, in the order of Layer's lora/n_lora arrays
enum { W_QKV, W_Q, W_K, W_V, W_O, W_GATE_UP, W_GATE, W_UP, W_DOWN, N_W };

struct Layer {
    const float *attn_norm;
    const QWeight *qkv, *q, *k, *v;  // the fused [Q; K; V] product, or the three
    const float *q_norm, *k_norm;    // per-head norms (qwen3, gemma3) or null
    const QWeight *o;
    const float *post_attn_norm;  // gemma3's norm of the attention output, or null
    const float *ffn_norm;
    const QWeight *gate_up, *gate, *up;  // the fused [gate; up] product, or the two
    const QWeight *down;
    const float *post_ffw_norm;  // gemma3
    const MoE *moe;              // routed experts instead of gate/up/down (moe.cpp), or null
    const float *qkv_b, *o_b;    // gpt-oss: the [Q; K; V] biases [H*D + Hkv*D + Hkv*Dv] and the output's [E], or null
    const float *sinks;          // gpt-oss's attention sinks [H], or null
    int32_t rope;                // 0: no RoPE on this layer; 1: the global tables; 2: the local ones (gemma3)
    int32_t window;              // > 0: sliding-window attention over this many positions
    const Term *lora[N_W];       // LoRA terms per product (null: none), applied after it as qmatmul does
    int32_t n_lora[N_W];
};

struct Model {
    int32_t n_layer, E, H, Hkv, D, Dv, F, n_rot, neox, act, kv_type;
    float eps, scale;
    const Layer *layers;
};

// out [T][N] = x [T][K] W^T, then the product's LoRA terms (lora/apply.py's LowRank, the same calls in the
// same order: each term row by row, so a decode step with an adapter equals the per-layer path)
static void linear(const Layer *L, int which, const QWeight *w, const float *x, int64_t T, float *out) {
    qdot_linear(w, x, T, out);
    for (int i = 0; i < L->n_lora[which]; i++) {
        const Term &t = L->lora[which][i];
        if (!t.skip) qdot_lowrank(x, T, w->K, w->K, t.a, t.r, t.bt, t.N, t.rows, t.scale, out, w->N, t.lo);
    }
}

static void add_rows(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

// b [n] added to each of T rows of x (row stride ld): a product's bias (ggml_add)
static void add_bias(float *x, int64_t T, int64_t ld, const float *b, int64_t n) {
    if (b)
        for (int64_t t = 0; t < T; t++) add_rows(x + t * ld, b, n);
}

// x [T][E]: the tokens' embeddings in, the last layer's output out. Token t belongs to cache slot
// slot[t] at position pos[t]; K[il], V[il] are layer il's cache pools ([slot][Hkv][cap][D]); cs/sn
// [T][n_rot/2] the RoPE tables (cs_l/sn_l: the sliding-window layers', or null). Every output row count
// is a multiple of 16 (the caller checks), so the padded products need no trimming.
EXPORT void qdot_step(const Model *m, float *x, int64_t T, void *const *K, void *const *V, int64_t cap,
                      const int64_t *slot, const int64_t *pos, const float *cs, const float *sn, const float *cs_l,
                      const float *sn_l) {
    const int64_t E = m->E, F = m->F, nq = (int64_t)m->H * m->D, nk = (int64_t)m->Hkv * m->D,
                  nv = (int64_t)m->Hkv * m->Dv, W = nq + nk + nv;
    float *y = (float *)malloc(sizeof(float) * (size_t)T * (size_t)(E + W + nq + 2 * E + 3 * F));
    float *qkv = y + T * E, *att = qkv + T * W, *o = att + T * nq, *gu = o + T * E, *act = gu + T * 2 * F;
    float *tmp = (float *)malloc(sizeof(float) * (size_t)T * (size_t)(W > 2 * F ? W : 2 * F));
    for (int il = 0; il < m->n_layer; il++) {
        const Layer *L = &m->layers[il];
        qdot_rms_norm(x, L->attn_norm, m->eps, T, E, y);
        if (L->qkv) linear(L, W_QKV, L->qkv, y, T, qkv);
        else {  // three products, then side by side per token
            const QWeight *p[3] = {L->q, L->k, L->v};
            const int64_t off[3] = {0, nq, nq + nk}, n[3] = {nq, nk, nv};
            for (int i = 0; i < 3; i++) {
                linear(L, W_Q + i, p[i], y, T, tmp);
                for (int64_t t = 0; t < T; t++) memcpy(qkv + t * W + off[i], tmp + t * n[i], sizeof(float) * n[i]);
            }
        }
        add_bias(qkv, T, W, L->qkv_b, W);
        const int local = L->rope == 2;
        qdot_attend(qkv, T, W, m->H, m->Hkv, m->D, m->Dv, L->q_norm, L->k_norm, m->eps, local ? cs_l : cs,
                    local ? sn_l : sn, L->rope ? m->n_rot : 0, m->neox, K[il], V[il], m->kv_type, cap, slot, pos,
                    L->window, m->scale, att, L->sinks);
        linear(L, W_O, L->o, att, T, o);
        add_bias(o, T, E, L->o_b, E);
        if (L->post_attn_norm) qdot_rms_norm(o, L->post_attn_norm, m->eps, T, E, o);
        add_rows(x, o, T * E);
        qdot_rms_norm(x, L->ffn_norm, m->eps, T, E, y);
        if (L->moe) qdot_moe(L->moe, y, T, E, o, nullptr);
        else if (L->gate_up) {
            linear(L, W_GATE_UP, L->gate_up, y, T, gu);
            qdot_glu(gu, gu + F, T, F, 2 * F, 2 * F, m->act, act);
        } else {
            linear(L, W_GATE, L->gate, y, T, gu);
            linear(L, W_UP, L->up, y, T, tmp);
            qdot_glu(gu, tmp, T, F, F, F, m->act, act);
        }
        if (!L->moe) linear(L, W_DOWN, L->down, act, T, o);
        if (L->post_ffw_norm) qdot_rms_norm(o, L->post_ffw_norm, m->eps, T, E, o);
        add_rows(x, o, T * E);
    }
    free(tmp);
    free(y);
}

// One token of one sequence, embedding row to logits, in one call (model/decode.py's OneToken): at a
// tiny model's size the Python around qdot_step (the embedding lookup, the RoPE rows, the output norm
// and head, the tensors for slot and position) cost three times the C step itself (measured: 115 of
// 153 us). The same functions in the same order as the per-operation path, so the logits are equal.
struct Decode {
    const Model *m;
    int32_t embd_type;     // ggml type of token_embd's rows (rows.cpp), or -1: x already holds the row
    int32_t fd;            // read row `id` with pread at embd_off + id * row_bytes, or -1: from embd in memory
    const uint8_t *embd;   // rows in memory (fd < 0)
    int64_t embd_off, row_bytes, n_vocab;
    float embd_scale;      // 1, or the architecture's scale (gemma: sqrt(n_embd))
    const float *out_norm; // output_norm
    const QWeight *out;    // the output matrix in the JIT layout, or null: x is left normed for the caller
};

// x [E]: the hidden state (the embedding row in, when embd_type < 0); row: row_bytes of scratch for pread
// (both the caller's, per call: two threads may decode with one model). -> 0, or -1: the row could not
// be read or its type is not in rows.cpp (then nothing was computed)
EXPORT int qdot_decode(const Decode *d, int64_t id, float *x, uint8_t *row, void *const *K, void *const *V,
                       int64_t cap, int64_t slot, int64_t pos, const float *cs, const float *sn, const float *cs_l,
                       const float *sn_l, float *logits) {
    const int64_t E = d->m->E;
    if (d->embd_type >= 0) {
        if (id < 0 || id >= d->n_vocab) return -1;
        const uint8_t *src = d->embd + id * d->row_bytes;
        if (d->fd >= 0) {
            int64_t got = 0;
            while (got < d->row_bytes) {
                const ssize_t r = pread(d->fd, row + got, (size_t)(d->row_bytes - got),
                                        (off_t)(d->embd_off + id * d->row_bytes + got));
                if (r <= 0) return -1;
                got += r;
            }
            src = row;
        }
        if (qdot_dequant_row(d->embd_type, src, E, x)) return -1;
        if (d->embd_scale != 1.0f)
            for (int64_t i = 0; i < E; i++) x[i] = x[i] * d->embd_scale;
    }
    qdot_step(d->m, x, 1, K, V, cap, &slot, &pos, cs, sn, cs_l, sn_l);
    qdot_rms_norm(x, d->out_norm, d->m->eps, 1, E, x);
    if (d->out) qdot_linear(d->out, x, 1, logits);
    return 0;
}
