// ggtorch's JIT library: what its three files share (quant/jit.py builds them into one library).
#pragma once
#include <stdint.h>

#define EXPORT extern "C" __attribute__((visibility("default")))

// One weight in qdot.cpp's layout and the activation quantization its type takes; quant/jit.py's QW
// mirrors it field by field.
struct QWeight {
    int32_t bits, G, mode;
    const uint8_t *qw;
    const uint16_t *dw, *mw;  // float16 scales (QDOT_E8M0: dw is uint8 exponents)
    float zoff;
    int64_t N, K;  // N: rows padded to a multiple of 16
    const int8_t *sc, *mn;  // the K-quant layout (non-null sc): integer sub-block scales and mins, dw/mw per 256
    int32_t flags;          // QDOT_LUT_*, QDOT_SM4, QDOT_IQ1S, and an output scale (qdot.cpp's layout comment)
};

// layout flags (quant/types/__init__.py mirrors them): at most one table (LUT) per type; bits 8..10 hold
// n for a factor 2^-n on d (the 1/4 or 1/8 that llama.cpp applies once at the end of the i-quants' dot)
// QDOT_E8M0 (MXFP4): dw holds one e8m0 exponent byte per group and row (uint8, not float16), scale 2^(e - 128)
enum { QDOT_LUT_IQ4 = 1, QDOT_SM4 = 2, QDOT_LUT_IQ3XXS = 4, QDOT_LUT_IQ2 = 8, QDOT_LUT_IQ1M = 16, QDOT_IQ1S = 32,
       QDOT_LUT_MXFP4 = 64, QDOT_E8M0 = 128, QDOT_LUT_IQ3S = 2048 };
// The grid i-quants that keep their grid indices (quant/types' glayout; tiles.h's grid layout): layout
// codes in QWeight.bits, above the value widths 2..8, and QDOT_GRIDL in flags for the Python side
enum { QDOT_G_IQ1S = 9, QDOT_G_IQ2XXS = 10, QDOT_G_IQ2XS = 11, QDOT_G_IQ3XXS = 12, QDOT_G_IQ2S = 13, QDOT_G_IQ1M = 14, QDOT_G_IQ3S = 15, QDOT_GRIDL = 4096 };
// their entries as the values the tiles multiply before the table (repack.cpp fills them once: qdot_grid_init)
extern uint32_t QDOT_GRID3[256], QDOT_GRID3S[512];  // IQ3_XXS: 4 level indices 0..7; IQ3_S: 4 x (g + 15) / 2
// the same as two byte tables of nibbles (values 0 | 1 << 4 of each entry, then 2 | 3 << 4)
extern uint8_t QDOT_GRID3_AB[512], QDOT_GRID3S_AB[1024];
extern uint64_t QDOT_GRID2XXS[256], QDOT_GRID2XS[512], QDOT_GRID2S[1024], QDOT_GRID1S[2048];  // 8 level indices 0..2 / g + 1
// the same as two byte tables of 2-bit fields (values 0..3 of each entry, then 4..7), for byte permutes
extern uint8_t QDOT_GRID2XXS_AB[512], QDOT_GRID2XS_AB[1024], QDOT_GRID2S_AB[2048], QDOT_GRID1S_AB[4096];
EXPORT int qdot_grid_init(int type, const uint8_t *grid);
#define QDOT_LUTS (QDOT_LUT_IQ4 | QDOT_LUT_IQ3XXS | QDOT_LUT_IQ2 | QDOT_LUT_IQ1M | QDOT_LUT_MXFP4 | QDOT_LUT_IQ3S)
#define QDOT_OSHIFT(flags) (((flags) >> 8) & 7)

EXPORT void qdot_linear(const QWeight *w, const float *x, int64_t M, float *out);
EXPORT void qdot_quantize(const float *x, int64_t M, int64_t K, int G, int mode, int8_t *xq, float *dx, float *sx,
                          int16_t *sq);
EXPORT void qdot_mm_tiles(const QWeight *w, const int8_t *xq, const float *dx, const float *sx, const int16_t *sq, int64_t M, float *out,
                          int64_t ldo, int64_t t0, int64_t t1);
// kint.cpp: tile t of a K-layout weight with llama.cpp's integer super-block sums, or false (then qdot.cpp's ktile)
bool kint_tile(int bits, int G, const uint8_t *qw, const int8_t *sc, const int8_t *mn, const uint16_t *dw,
               const uint16_t *mw, float zoff, int64_t K, const int8_t *xq, const float *dx, const int16_t *sq,
               int64_t M, int64_t t, float *out, int64_t ldo, int flags);
// the same for the plain layout without mins (Q4_0, Q5_0, Q8_0, IQ4_NL), or false (then qdot.cpp's tile)
bool kint_ptile(int bits, int G, const uint8_t *qw, const uint16_t *dw, const uint16_t *mw, float zoff, int64_t K,
                const int8_t *xq, const float *dx, const int16_t *sq, int64_t M, int64_t t, float *out, int64_t ldo,
                int flags);
EXPORT void qdot_rms_norm(const float *x, const float *w, float eps, int64_t M, int64_t K, float *y);
EXPORT void qdot_attend(const float *qkv, int64_t T, int64_t ld, int H, int Hkv, int D, int Dv, const float *qn,
                        const float *kn, float eps, const float *cs, const float *sn, int n_rot, int neox, void *Kc,
                        void *Vc, int kv_type, int64_t cap, const int64_t *slot, const int64_t *pos, int64_t window,
                        float scale, float *out, const float *sinks);
EXPORT void qdot_glu(const float *gate, const float *up, int64_t M, int64_t F, int64_t ldg, int64_t ldu, int kind,
                     float *out);

// One layer's routed experts (moe.cpp); fastpath.py's _MoE mirrors it field by field.
struct MoE {
    const float *router;               // ffn_gate_inp as float32 [n_expert][E], or null with router_q
    const QWeight *router_q;           // ffn_gate_inp in the JIT layout, or null
    const float *router_b;             // ffn_gate_inp.bias [n_expert] or null
    const float *sel_b;                // exp_probs_b [n_expert]: added for the choice only, or null
    const QWeight *const *gate_up;     // per expert: [gate; up] fused (2F rows), or null (then gate and up)
    const QWeight *const *gate, *const *up, *const *down;
    const float *gate_b, *up_b, *down_b;  // ffn_{gate,up,down}_exps.bias [n_expert][F or E] (ggml_add_id), or null
    int32_t n_expert, n_used, F, gating, norm_w, act;  // gating: 0 softmax, 1 sigmoid, 2 softmax_weight; act: qdot_glu's kind
    float scale;                       // w_scale (0 or 1: none)
};

EXPORT void qdot_moe(const MoE *m, const float *x, int64_t T, int64_t E, float *out, int32_t *sel_out);

// rows.cpp: n values of a GGUF row of ggml type `type` -> float32, as quant/dequant.py gives them; -1: type not there
EXPORT int qdot_dequant_row(int type, const uint8_t *src, int64_t n, float *out);

// lowrank.cpp: y[m, lo + n] += s_m * (B (A x_m))[n] for the M rows of x, each row alone (s null: `scale`)
EXPORT void qdot_lowrank(const float *x, int64_t M, int64_t K, int64_t ldx, const float *A, int64_t r,
                         const float *Bt, int64_t N, const float *s, float scale, float *y, int64_t ldy,
                         int64_t lo);
