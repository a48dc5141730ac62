// ggtorch's JIT library, part four: a layer's routed experts in one call (llama.cpp's
// llm_graph_context::build_moe_ffn with ggml_mul_mat_id for the expert products).
//
// The per-layer PyTorch path spent a MoE decode step in Python: routing in a dozen small tensor
// operations and, per routed expert, two products and an activation, each a foreign call with its own
// activation quantization and thread start. Here one call routes every token (router product, softmax
// or sigmoid, top-k, the chosen probabilities renormalized and scaled), sorts the (token, slot) rows by
// expert as mul_mat_id does, so that an expert's weights are read once per call whatever the number of
// tokens routed to it, and runs every routed expert's gate/up tiles, then every down tile, in one
// parallel loop each, with the matrix kernel's own tile code (qdot_mm_tiles): each output is computed
// exactly as qdot_linear would compute it for that expert alone. Expert biases (gpt-oss) are added to
// the gate/up and down products before the activation and the weighting, as ggml_add_id does. The weighted sum runs in slot order,
// as llama.cpp adds the experts' views one after the other.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "qdot.h"

// ggml_clamp(weights_sum, 6.103515625e-5, INF) in build_moe_ffn: the smallest normal float16
static const float MIN_SUM = 6.103515625e-5f;
static const int64_t TILES_PER_JOB = 8;  // 128 rows of one expert's weight: a unit of the parallel loops

// A float32 router row: 16 running sums over the positions, then a fixed tree (one arithmetic for every
// token, vectorizable without reassociation by the compiler).
static float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0.f};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[k + j] * b[k + j];
    for (int j = 0; k < n; k++, j++) acc[j] += a[k] * b[k];
    for (int w = 8; w; w >>= 1)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

// ggml_soft_max on one row, as ggml_compute_forward_soft_max_f32 computes it: exp(x - max) summed in
// double, then every value times the float of 1/sum.
static void softmax(float *v, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = v[i] > mx ? v[i] : mx;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        v[i] = expf(v[i] - mx);
        sum += (double)v[i];
    }
    const float s = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) v[i] *= s;
}

// One token's routing: probs from the logits (modified in place), the n_used experts of largest
// (biased) probability, largest first and the lower index first among equal ones (ggml_argsort_top_k
// leaves ties to std::sort; model/moe.py's route() uses the same rule), their weights.
static void route(const MoE *m, float *probs, int32_t *sel, float *w) {
    const int n = m->n_expert, k = m->n_used;
    if (m->router_b)
        for (int e = 0; e < n; e++) probs[e] += m->router_b[e];
    if (m->gating == 0) softmax(probs, n);
    else if (m->gating == 1)
        for (int e = 0; e < n; e++) probs[e] = 1.f / (1.f + expf(-probs[e]));
    for (int j = 0; j < k; j++) {
        int best = -1;
        float bv = 0.f;
        for (int e = 0; e < n; e++) {
            bool taken = false;
            for (int i = 0; i < j; i++) taken |= sel[i] == e;
            if (taken) continue;
            const float v = m->sel_b ? probs[e] + m->sel_b[e] : probs[e];
            if (best < 0 || v > bv) { best = e; bv = v; }
        }
        sel[j] = best;
        w[j] = probs[best];
    }
    if (m->gating == 2) softmax(w, k);
    if (m->norm_w) {
        double s = 0.0;  // ggml_sum_rows (ggml_vec_sum_f32: a double sum), then clamped, then ggml_div
        for (int j = 0; j < k; j++) s += (double)w[j];
        float sf = (float)s;
        sf = sf < MIN_SUM ? MIN_SUM : sf;
        for (int j = 0; j < k; j++) w[j] = w[j] / sf;
    }
    if (m->scale != 0.f && m->scale != 1.f)
        for (int j = 0; j < k; j++) w[j] *= m->scale;
}

struct Job {
    const QWeight *w;
    int64_t r0, M, t0, t1, col;  // rows r0..r0+M-1 of the sorted rows, tiles t0..t1-1, output column col
};

// Jobs for weight ws[e] of every expert with rows, TILES_PER_JOB tiles each.
static int64_t add_jobs(Job *jobs, int64_t n, const QWeight *const *ws, int n_expert, const int64_t *start,
                        const int64_t *cnt, int64_t col) {
    for (int e = 0; e < n_expert; e++) {
        if (!cnt[e]) continue;
        const int64_t nt = ws[e]->N / 16;
        for (int64_t t = 0; t < nt; t += TILES_PER_JOB)
            jobs[n++] = Job{ws[e], start[e], cnt[e], t, t + TILES_PER_JOB < nt ? t + TILES_PER_JOB : nt, col};
    }
    return n;
}

// Quantized activation rows for the weights of one config (G, mode), gathered into the sorted order.
struct QRows {
    int8_t *q;
    float *d, *s;  // d: 2 ng floats per row (d, then s), then ng int16 per row (sq)
    int16_t *sq;
    int64_t K, ng;
};

static inline void run_job(const Job &j, const QRows &a, float *out, int64_t ldo) {
    qdot_mm_tiles(j.w, a.q + j.r0 * a.K, a.d + j.r0 * a.ng, a.s + j.r0 * a.ng, a.sq + j.r0 * a.ng, j.M, out + j.r0 * ldo + j.col, ldo, j.t0,
                  j.t1);
}

// One token: contiguous ranges of jobs per thread (each streams its share of the weights). Several: jobs
// of unequal row counts, taken as threads free up. Each output is written by one job either way, so the
// schedule does not change the result.
// Work below MIN_PARALLEL multiply-adds stays on the calling thread: a tiny model's experts cost less
// than waking the other threads (and far less than waiting for a preempted one on a loaded machine).
static const int64_t MIN_PARALLEL = 1 << 18;

static void run_jobs(const Job *jobs, int64_t n, const QRows &a, float *out, int64_t ldo, bool many) {
    int64_t work = 0;
    for (int64_t i = 0; i < n; i++) work += jobs[i].M * 16 * (jobs[i].t1 - jobs[i].t0) * a.K;
    const bool par = work >= MIN_PARALLEL;
    if (many) {
#pragma omp parallel for schedule(dynamic, 1) if (par)
        for (int64_t i = 0; i < n; i++) run_job(jobs[i], a, out, ldo);
    } else {
#pragma omp parallel for schedule(static) if (par)
        for (int64_t i = 0; i < n; i++) run_job(jobs[i], a, out, ldo);
    }
}

// x [T][K] quantized for weight w's (G, mode), rows gathered in sorted order (tok[r]: row r's token).
static QRows quantize_rows(const QWeight *w, const float *x, int64_t T, int64_t K, const int64_t *tok, int64_t R) {
    const int64_t ng = K / w->G;
    int8_t *xq = (int8_t *)malloc((size_t)(T * K) + 64);
    float *dx = (float *)malloc(sizeof(float) * (size_t)(T * ng) * 3 + 64), *sx = dx + T * ng;
    int16_t *sq = (int16_t *)(sx + T * ng);
    qdot_quantize(x, T, K, w->G, w->mode, xq, dx, sx, sq);
    QRows r{(int8_t *)malloc((size_t)(R * K) + 64), nullptr, nullptr, nullptr, K, ng};
    r.d = (float *)malloc(sizeof(float) * (size_t)(R * ng) * 3 + 64);
    r.s = r.d + R * ng;
    r.sq = (int16_t *)(r.s + R * ng);
    for (int64_t i = 0; i < R; i++) {
        memcpy(r.q + i * K, xq + tok[i] * K, (size_t)K);
        memcpy(r.d + i * ng, dx + tok[i] * ng, sizeof(float) * (size_t)ng);
        memcpy(r.s + i * ng, sx + tok[i] * ng, sizeof(float) * (size_t)ng);
        memcpy(r.sq + i * ng, sq + tok[i] * ng, sizeof(int16_t) * (size_t)ng);
    }
    free(xq);
    free(dx);
    return r;
}

static void free_rows(QRows &r) {
    free(r.q);
    free(r.d);
}

static void products(const QWeight *const *ws, int n_expert, const int64_t *start, const int64_t *cnt, const QRows &a,
                     float *out, int64_t ldo, int64_t col, bool many) {
    int64_t nj = 0;
    for (int e = 0; e < n_expert; e++)
        if (cnt[e]) nj += (ws[e]->N / 16 + TILES_PER_JOB - 1) / TILES_PER_JOB;
    Job *jobs = (Job *)malloc(sizeof(Job) * (size_t)(nj + 1));
    nj = add_jobs(jobs, 0, ws, n_expert, start, cnt, col);
    run_jobs(jobs, nj, a, out, ldo, many);
    free(jobs);
}

// ggml_add_id: expert e's bias row added to each of its (sorted) rows of a product [R][ld]: b1 [n][F] at
// column 0 and b2 [n][F] at column F (either may be null)
static void add_biases(float *y, int64_t ld, const float *b1, const float *b2, int64_t F, int n_expert,
                       const int64_t *start, const int64_t *cnt) {
    if (!b1 && !b2) return;
    for (int e = 0; e < n_expert; e++)
        for (int64_t r = start[e]; r < start[e] + cnt[e]; r++) {
            float *row = y + r * ld;
            if (b1)
                for (int64_t i = 0; i < F; i++) row[i] = row[i] + b1[e * F + i];
            if (b2)
                for (int64_t i = 0; i < F; i++) row[F + i] = row[F + i] + b2[e * F + i];
        }
}

// out [T][E] = the routed experts' weighted sum for the tokens x [T][E] (build_moe_ffn after the
// router, with the experts' biases where the layer has them); sel_out (or null) [T][n_used]: the chosen experts.
// Expert products have N a multiple of 16 (F and E, the caller checks).
EXPORT void qdot_moe(const MoE *m, const float *x, int64_t T, int64_t E, float *out, int32_t *sel_out) {
    const int n = m->n_expert, k = m->n_used;
    const int64_t F = m->F, R = T * k;
    const int64_t ldl = m->router_q ? m->router_q->N : n;
    float *logits = (float *)malloc(sizeof(float) * (size_t)(T * ldl + R));
    float *wts = logits + T * ldl;
    int32_t *sel = (int32_t *)malloc(sizeof(int32_t) * (size_t)R);
    if (m->router_q) qdot_linear(m->router_q, x, T, logits);
    else {
#pragma omp parallel for schedule(static) if (T * n * E >= 1048576)
        for (int64_t i = 0; i < T * n; i++) logits[(i / n) * ldl + i % n] = dot_f32(x + (i / n) * E, m->router + (i % n) * E, E);
    }
    for (int64_t t = 0; t < T; t++) route(m, logits + t * ldl, sel + t * k, wts + t * k);
    if (sel_out) memcpy(sel_out, sel, sizeof(int32_t) * (size_t)R);

    // (token, slot) rows sorted by expert, tokens in order within an expert (mul_mat_id's grouping)
    int64_t *cnt = (int64_t *)calloc((size_t)(2 * n), sizeof(int64_t)), *start = cnt + n;
    int64_t *tok = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * R)), *row = tok + R;  // row[t*k+j]: its sorted row
    for (int64_t i = 0; i < R; i++) cnt[sel[i]]++;
    for (int e = 1; e < n; e++) start[e] = start[e - 1] + cnt[e - 1];
    {
        int64_t *fill = (int64_t *)calloc((size_t)n, sizeof(int64_t));
        for (int64_t i = 0; i < R; i++) {
            const int64_t r = start[sel[i]] + fill[sel[i]]++;
            tok[r] = i / k;
            row[i] = r;
        }
        free(fill);
    }
    const bool many = T > 1;
    float *gu = (float *)malloc(sizeof(float) * (size_t)(R * (2 * F + F + E)));
    float *act = gu + R * 2 * F, *dn = act + R * F;
    if (m->gate_up) {
        QRows a = quantize_rows(m->gate_up[sel[0]], x, T, E, tok, R);
        products(m->gate_up, n, start, cnt, a, gu, 2 * F, 0, many);
        free_rows(a);
    } else {
        QRows a = quantize_rows(m->gate[sel[0]], x, T, E, tok, R);
        products(m->gate, n, start, cnt, a, gu, 2 * F, 0, many);
        const QWeight *u = m->up[sel[0]], *g = m->gate[sel[0]];
        if (u->G != g->G || u->mode != g->mode) {
            free_rows(a);
            a = quantize_rows(u, x, T, E, tok, R);
        }
        products(m->up, n, start, cnt, a, gu, 2 * F, F, many);
        free_rows(a);
    }
    add_biases(gu, 2 * F, m->gate_b, m->up_b, F, n, start, cnt);  // ggml_add_id on gate and up
    qdot_glu(gu, gu + F, R, F, 2 * F, 2 * F, m->act, act);
    {
        const QWeight *d = m->down[sel[0]];
        QRows a{(int8_t *)malloc((size_t)(R * F) + 64), nullptr, nullptr, nullptr, F, F / d->G};
        a.d = (float *)malloc(sizeof(float) * (size_t)(R * a.ng) * 3 + 64);
        a.s = a.d + R * a.ng;
        a.sq = (int16_t *)(a.s + R * a.ng);
        qdot_quantize(act, R, F, d->G, d->mode, a.q, a.d, a.s, a.sq);
        products(m->down, n, start, cnt, a, dn, E, 0, many);
        free_rows(a);
    }
    add_biases(dn, E, m->down_b, nullptr, E, n, start, cnt);
    for (int64_t t = 0; t < T; t++) {  // experts[0] * w0 + experts[1] * w1 + ..., in slot order
        float *o = out + t * E;
        for (int j = 0; j < k; j++) {
            const float *d = dn + row[t * k + j] * E, w = wts[t * k + j];
            if (j == 0)
                for (int64_t i = 0; i < E; i++) o[i] = d[i] * w;
            else
                for (int64_t i = 0; i < E; i++) o[i] = o[i] + d[i] * w;
        }
    }
    free(gu);
    free(tok);
    free(cnt);
    free(sel);
    free(logits);
}
