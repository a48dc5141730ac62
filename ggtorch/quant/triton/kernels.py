"""The Triton kernels over the GPU layout (see layout.py), compiled per type from one template.

- ``_matvec``: decode, 1-8 activation rows. Each program owns BN output rows and walks K in BK
  steps: it dequantizes a [BN, BK] weight tile in registers and accumulates x·w in fp32 for every
  activation row at once, so the weights are read once per call whatever the row count (the role of
  llama.cpp's mul_mat_vec_q, ggml-cuda/mmvq.cu, which multiplies q8_1-quantized activations instead).
  ``_matvec_pairs`` is its form for the 4-bit layouts without high bits (wide byte loads). On CUDA
  their tiles are autotuned; prefill there multiplies fp16 weights written once with cuBLAS.
- ``_tiled``: prefill, more rows. A [BM, BN] output tile; per BK step the weight tile is dequantized
  to fp16 and multiplied with ``tl.dot`` (tensor cores on a GPU) into an fp32 accumulator (the role of
  ggml-cuda/mmq.cu). Activations are rounded to fp16 there; the matvec kernel keeps them fp32.

Imported only once Triton is wanted: ``ggtorch.quant.triton`` sets TRITON_INTERPRET=1 first when the
kernels are to run on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import Params


@triton.jit
def _scales(d_ptr, sc_ptr, m_ptr, mn_ptr, r, c, mask, K, SB: tl.constexpr, G: tl.constexpr,
            HAS_SC: tl.constexpr, HAS_M: tl.constexpr, HAS_MN: tl.constexpr):
    """(scale, min) of the weights at rows r, columns c (min 0 for types without one)."""
    scale = tl.load(d_ptr + r * (K // SB) + c // SB, mask=mask, other=0).to(tl.float32)
    if HAS_SC:  # K-quants: dl = d * sc, as ggml forms it before multiplying the value
        scale = scale * tl.load(sc_ptr + r * (K // G) + c // G, mask=mask, other=0).to(tl.float32)
    mn = scale * 0.0
    if HAS_M:
        mn = tl.load(m_ptr + r * (K // SB) + c // SB, mask=mask, other=0).to(tl.float32)
        if HAS_MN:
            mn = mn * tl.load(mn_ptr + r * (K // G) + c // G, mask=mask, other=0).to(tl.float32)
    return scale, mn


@triton.jit
def _weights(code, scale, mn, tab_ptr, mask, OFF: tl.constexpr, HAS_M: tl.constexpr, MIN_SUB: tl.constexpr,
             TABLE: tl.constexpr):
    """scale * value (+ or - min), in ggml's order of operations."""
    if TABLE:
        v = tl.load(tab_ptr + code, mask=mask, other=0.0)
    else:
        v = (code - OFF).to(tl.float32)
    w = scale * v
    if HAS_M:
        if MIN_SUB:
            w = w - mn
        else:
            w = w + mn
    return w


@triton.jit
def _dequant(lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr, rows, cols, mask, K,
             LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFF: tl.constexpr, SB: tl.constexpr, G: tl.constexpr,
             HAS_SC: tl.constexpr, HAS_M: tl.constexpr, HAS_MN: tl.constexpr, MIN_SUB: tl.constexpr,
             TABLE: tl.constexpr):
    """fp32 weights [len(rows), len(cols)], as ggml's dequantize_row_* computes them."""
    r = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    if LO_BITS == 8:
        code = tl.load(lo_ptr + r * K + c, mask=mask, other=0).to(tl.int32)
    else:
        PER: tl.constexpr = 8 // LO_BITS
        byte = tl.load(lo_ptr + r * (K // PER) + c // PER, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((c % PER) * LO_BITS)) & ((1 << LO_BITS) - 1)
    if HI_BITS > 0:
        PH: tl.constexpr = 8 // HI_BITS
        hb = tl.load(hi_ptr + r * (K // PH) + c // PH, mask=mask, other=0).to(tl.int32)
        code = code | (((hb >> ((c % PH) * HI_BITS)) & ((1 << HI_BITS) - 1)) << LO_BITS)
    scale, mn = _scales(d_ptr, sc_ptr, m_ptr, mn_ptr, r, c, mask, K, SB, G, HAS_SC, HAS_M, HAS_MN)
    return _weights(code, scale, mn, tab_ptr, mask, OFF, HAS_M, MIN_SUB, TABLE)


@triton.jit
def _matvec_pairs(x_ptr, y_ptr, M, N, K, lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFF: tl.constexpr, SB: tl.constexpr,
                  G: tl.constexpr, HAS_SC: tl.constexpr, HAS_M: tl.constexpr, HAS_MN: tl.constexpr,
                  MIN_SUB: tl.constexpr, TABLE: tl.constexpr):
    """Decode for the 4-bit layouts without high bits (Q4_0, Q4_1, Q4_K, IQ4_NL, IQ4_XS) on CUDA: each
    step loads BK/2 consecutive bytes of a row (wide loads) and takes both nibbles of each, the even
    and the odd column, which share their block's scales (loaded once); sums as _matvec."""
    BH: tl.constexpr = BK // 2
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ms = tl.arange(0, BM)
    rmask = rows < N
    mmask = ms < M
    r = rows.to(tl.int64)[:, None]
    j = tl.arange(0, BH)
    acc = tl.zeros((BM, BN, BH), dtype=tl.float32)
    for k0 in range(0, K, BK):
        jb = k0 // 2 + j
        jmask = jb < K // 2
        mask = rmask[:, None] & jmask[None, :]
        byte = tl.load(lo_ptr + r * (K // 2) + jb[None, :], mask=mask, other=0).to(tl.int32)
        ce = k0 + 2 * j  # the even column of each byte; the odd one is ce + 1, in the same block
        scale, mn = _scales(d_ptr, sc_ptr, m_ptr, mn_ptr, r, ce[None, :], mask, K, SB, G, HAS_SC, HAS_M, HAS_MN)
        we = _weights(byte & 15, scale, mn, tab_ptr, mask, OFF, HAS_M, MIN_SUB, TABLE)
        wo = _weights(byte >> 4, scale, mn, tab_ptr, mask, OFF, HAS_M, MIN_SUB, TABLE)
        xm = mmask[:, None] & jmask[None, :]
        xe = tl.load(x_ptr + ms[:, None] * K + ce[None, :], mask=xm, other=0.0)
        xo = tl.load(x_ptr + ms[:, None] * K + ce[None, :] + 1, mask=xm, other=0.0)
        acc += we[None, :, :] * xe[:, None, :] + wo[None, :, :] * xo[:, None, :]
    tl.store(y_ptr + ms[:, None] * N + rows[None, :], tl.sum(acc, axis=2), mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _matvec(x_ptr, y_ptr, M, N, K, lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFF: tl.constexpr, SB: tl.constexpr, G: tl.constexpr,
            HAS_SC: tl.constexpr, HAS_M: tl.constexpr, HAS_MN: tl.constexpr, MIN_SUB: tl.constexpr,
            TABLE: tl.constexpr):
    """Decode (1-8 activation rows): products accumulate element-wise in a [BM, BN, BK] tile and
    are summed once at the end (no reduction per K step); few weight rows per program and long K
    steps, so a matrix of a few thousand rows still gives every multiprocessor several programs
    (llama.cpp's mul_mat_vec_q likewise gives each row a block of threads along K)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ms = tl.arange(0, BM)
    rmask = rows < N
    mmask = ms < M
    acc = tl.zeros((BM, BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        w = _dequant(lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr, rows, cols,
                     rmask[:, None] & cmask[None, :], K, LO_BITS, HI_BITS, OFF, SB, G, HAS_SC, HAS_M, HAS_MN,
                     MIN_SUB, TABLE)
        x = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=mmask[:, None] & cmask[None, :], other=0.0)
        acc += w[None, :, :] * x[:, None, :]
    tl.store(y_ptr + ms[:, None] * N + rows[None, :], tl.sum(acc, axis=2), mask=mmask[:, None] & rmask[None, :])


# On CUDA the decode kernel picks its tile by measuring on first use (per row block, type and matrix
# shape): the best tile depends on the chip and the shape (gpu_check.py showed fixed tiles, with a
# reduction per K step, at 4-9% of the copy bandwidth on an H200).
_KEY = ["N", "K", "BM", "LO_BITS", "HI_BITS", "HAS_SC", "HAS_M", "TABLE"]
_CONFIGS_1 = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
              for bn, bk, w in ((1, 1024, 4), (2, 1024, 4), (2, 512, 4), (4, 512, 4), (4, 256, 4),
                                (8, 256, 4), (1, 2048, 8), (2, 2048, 8), (4, 1024, 8))]
_CONFIGS_N = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
              for bn, bk, w in ((1, 512, 4), (2, 256, 4), (4, 128, 4), (1, 256, 4), (2, 128, 4), (8, 64, 4),
                                (1, 1024, 8), (2, 512, 8))]
_matvec_1 = triton.autotune(configs=_CONFIGS_1, key=_KEY)(_matvec)
_matvec_n = triton.autotune(configs=_CONFIGS_N, key=_KEY)(_matvec)
_pairs_1 = triton.autotune(configs=_CONFIGS_1, key=_KEY)(_matvec_pairs)
_pairs_n = triton.autotune(configs=_CONFIGS_N, key=_KEY)(_matvec_pairs)
# "pairs": the 4-bit layouts without high bits take _matvec_pairs ("0": _matvec for them too)
PAIRS = os.environ.get("GGTORCH_TRITON_PAIRS", "1") != "0"


@triton.jit
def _tiled(x_ptr, y_ptr, M, N, K, lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
           LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFF: tl.constexpr, SB: tl.constexpr, G: tl.constexpr,
           HAS_SC: tl.constexpr, HAS_M: tl.constexpr, HAS_MN: tl.constexpr, MIN_SUB: tl.constexpr,
           TABLE: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + cols[None, :], mask=mmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float16)
        w = _dequant(lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr, rn, cols,
                     nmask[:, None] & cmask[None, :], K, LO_BITS, HI_BITS, OFF, SB, G, HAS_SC, HAS_M, HAS_MN,
                     MIN_SUB, TABLE).to(tl.float16)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


MAX_MATVEC_ROWS = 8
# (BN, BK) of the matvec kernel by activation-row block, and (BM, BN, BK) of the tiled one: the
# defaults; gpu_check.py measures alternatives.
MATVEC_TILES = {1: (8, 512), 2: (8, 256), 4: (8, 128), 8: (8, 128)}  # small BN: many programs for few rows
TILED_TILES = (64, 64, 64)
# Under the interpreter (CPU tensors) a program's tile is one numpy operation: big tiles, few programs
# (Triton caps a tensor at 2**20 elements: the matvec's [BM, BN, BK] product too).
CPU_TILED_TILES = (64, 1024, 1024)
# Prefill (more than DEQUANT_ROWS activation rows) on CUDA: "dequant" writes the weights once as fp16
# and multiplies with cuBLAS (tensor cores, its own tiling; the fp16 copy is transient), "tiled" runs
# the _tiled kernel above. gpu_check.py measures both.
PREFILL = os.environ.get("GGTORCH_TRITON_PREFILL", "dequant")
# decode on CUDA: the autotuned _matvec ("0": the fixed tiles of _matvec)
MATVEC_TUNED = os.environ.get("GGTORCH_TRITON_MATVEC_TUNED", "1") != "0"
DEQUANT_ROWS = 64


def _cpu_matvec_tiles(bm: int) -> tuple[int, int]:
    bk = 1024 if bm == 1 else 512
    return (1 << 20) // (bm * bk), bk
_TABLES: dict = {}


def _table(device) -> torch.Tensor:
    from .iq4 import KVALUES

    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(KVALUES, dtype=torch.float32, device=device)
    return _TABLES[key]


def linear(x: torch.Tensor, state: dict, p: Params, n_out: int, tiles=None) -> torch.Tensor:
    """x [M, K] float32 contiguous @ W.T -> float32 [M, n_out], W in the layout ``state``/``p``."""
    M, K = x.shape
    y = torch.empty(M, n_out, dtype=torch.float32, device=x.device)
    if M == 0:
        return y
    lo = state["lo"]
    args = [lo, state.get("hi", lo), state["d"], state.get("sc", lo), state.get("m", lo), state.get("mn", lo),
            _table(x.device) if p.TABLE else state["d"]]
    consts = dict(LO_BITS=p.LO_BITS, HI_BITS=p.HI_BITS, OFF=p.OFF, SB=p.SB, G=p.G, HAS_SC=p.HAS_SC, HAS_M=p.HAS_M,
                  HAS_MN=p.HAS_MN, MIN_SUB=p.MIN_SUB, TABLE=p.TABLE)
    if M <= MAX_MATVEC_ROWS and x.device.type == "cuda" and tiles is None and MATVEC_TUNED:
        if PAIRS and p.LO_BITS == 4 and p.HI_BITS == 0:
            kern = _pairs_1 if M == 1 else _pairs_n
        else:
            kern = _matvec_1 if M == 1 else _matvec_n
        kern[lambda meta: (triton.cdiv(n_out, meta["BN"]),)](x, y, M, n_out, K, *args, BM=triton.next_power_of_2(M),
                                                             **consts)
    elif M <= MAX_MATVEC_ROWS:
        bm = triton.next_power_of_2(M)
        bn, bk = tiles or (_cpu_matvec_tiles(bm) if x.device.type == "cpu" else MATVEC_TILES[bm])
        _matvec[(triton.cdiv(n_out, bn),)](x, y, M, n_out, K, *args, BM=bm, BN=bn, BK=bk, **consts)
    elif PREFILL == "dequant" and M > DEQUANT_ROWS and x.device.type == "cuda" and tiles is None:
        w16 = dequantize(state, p, n_out, x.device, torch.float16)
        y.copy_(x.to(torch.float16) @ w16.T)
    else:
        bm, bn, bk = tiles or (CPU_TILED_TILES if x.device.type == "cpu" else TILED_TILES)
        _tiled[(triton.cdiv(M, bm), triton.cdiv(n_out, bn))](x, y, M, n_out, K, *args, BM=bm, BN=bn, BK=bk, **consts)
    return y


@triton.jit
def _dequant_rows(y_ptr, N, K, lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr,
                  BN: tl.constexpr, BK: tl.constexpr,
                  LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFF: tl.constexpr, SB: tl.constexpr, G: tl.constexpr,
                  HAS_SC: tl.constexpr, HAS_M: tl.constexpr, HAS_MN: tl.constexpr, MIN_SUB: tl.constexpr,
                  TABLE: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    w = _dequant(lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr, rows, cols, mask, K, LO_BITS, HI_BITS, OFF,
                 SB, G, HAS_SC, HAS_M, HAS_MN, MIN_SUB, TABLE)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], w.to(y_ptr.dtype.element_ty), mask=mask)


def dequantize(state: dict, p: Params, n_rows: int, device, dtype=torch.float32) -> torch.Tensor:
    """[n_rows, K] weights from the layout in ``dtype`` (float32: the weights the kernels multiply,
    which tests compare with ggtorch.quant.dequant bit for bit; float16 for the prefill's GEMM)."""
    K = state["d"].shape[1] * p.SB
    y = torch.empty(n_rows, K, dtype=dtype, device=device)
    lo = state["lo"]
    args = [lo, state.get("hi", lo), state["d"], state.get("sc", lo), state.get("m", lo), state.get("mn", lo),
            _table(device) if p.TABLE else state["d"]]
    _dequant_rows[(triton.cdiv(n_rows, 16), triton.cdiv(K, 64))](
        y, n_rows, K, *args, BN=16, BK=64, LO_BITS=p.LO_BITS, HI_BITS=p.HI_BITS, OFF=p.OFF, SB=p.SB, G=p.G,
        HAS_SC=p.HAS_SC, HAS_M=p.HAS_M, HAS_MN=p.HAS_MN, MIN_SUB=p.MIN_SUB, TABLE=p.TABLE)
    return y
