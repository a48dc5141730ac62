"""MoE experts through one grouped kernel per projection (the role of llama.cpp's ggml_mul_mat_id):
the (token, slot) rows are sorted by expert, each expert's group padded to whole blocks of BM rows,
and one launch multiplies every block by its own expert's rows of the stacked expert matrix
[n_expert * n_out, n_in] (the experts' GPU layouts concatenated, see layout.py). Everything stays on
the device: the block -> expert map is computed with tensor ops, and the grid is sized for the worst
case (rows + n_expert * (BM - 1)), so nothing waits on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import _dequant, _table
from .layout import Params


@triton.jit
def _grouped(x_ptr, y_ptr, src_ptr, dst_ptr, bexp_ptr, N, K, lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, OFF: tl.constexpr, SB: tl.constexpr, G: tl.constexpr,
             HAS_SC: tl.constexpr, HAS_M: tl.constexpr, HAS_MN: tl.constexpr, MIN_SUB: tl.constexpr,
             TABLE: tl.constexpr):
    b = tl.program_id(0)
    e = tl.load(bexp_ptr + b)
    if e >= 0:
        slots = b * BM + tl.arange(0, BM)
        src = tl.load(src_ptr + slots)  # the input row of each slot, -1 for padding
        dst = tl.load(dst_ptr + slots)
        ok = src >= 0
        cols_n = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = cols_n < N
        rows = e * N + cols_n  # this expert's rows of the stacked matrix
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K
            x = tl.load(x_ptr + src.to(tl.int64)[:, None] * K + cols[None, :], mask=ok[:, None] & cmask[None, :],
                        other=0.0)
            w = _dequant(lo_ptr, hi_ptr, d_ptr, sc_ptr, m_ptr, mn_ptr, tab_ptr, rows, cols,
                         nmask[:, None] & cmask[None, :], K, LO_BITS, HI_BITS, OFF, SB, G, HAS_SC, HAS_M, HAS_MN,
                         MIN_SUB, TABLE)
            if BM >= 16:  # prefill: tensor cores
                acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
            else:
                acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
        tl.store(y_ptr + dst.to(tl.int64)[:, None] * N + cols_n[None, :], acc, mask=ok[:, None] & nmask[None, :])


def plan(experts: torch.Tensor, n_expert: int, bm: int):
    """Rows of ``experts`` [T, k] sorted by expert and padded per expert to whole BM blocks:
    (slot -> flat (t, j) index or -1 [n_blocks * BM], block -> expert or -1 [n_blocks])."""
    flat = experts.reshape(-1)
    R = flat.numel()
    dev = flat.device
    n_blocks = triton.cdiv(R, bm) + n_expert  # the worst case: every expert's group ends in a part block
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_expert, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    # (not bincount: on CUDA it reads the maximum back to the host, which a CUDA graph cannot hold)
    padded = (counts + bm - 1) // bm * bm
    start = torch.cumsum(padded, 0) - padded  # each expert's first slot
    first = torch.cumsum(counts, 0) - counts  # each expert's first position in `order`
    se = flat[order]
    slot = start[se] + (torch.arange(R, device=dev) - first[se])
    slots = torch.full((n_blocks * bm,), -1, dtype=torch.int64, device=dev)
    slots[slot] = order
    ends = torch.cumsum(padded, 0)
    bstart = torch.arange(n_blocks, device=dev) * bm
    bexp = torch.searchsorted(ends, bstart, right=True)
    bexp = torch.where((bexp < n_expert) & (slots.view(n_blocks, bm)[:, 0] >= 0), bexp, -1).to(torch.int32)
    return slots, bexp


def grouped_linear(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, bexp: torch.Tensor, n_rows_out: int,
                   state: dict, p: Params, n_out: int, bm: int, tiles=None) -> torch.Tensor:
    """y [n_rows_out, n_out]: for every slot s with src[s] >= 0, y[dst[s]] = x[src[s]] @ W_e.T where e is
    the expert of the slot's block (W_e: rows e*n_out.. of the stacked layout)."""
    K = x.shape[1]
    y = torch.zeros(n_rows_out, n_out, dtype=torch.float32, device=x.device)
    lo = state["lo"]
    args = [lo, state.get("hi", lo), state["d"], state.get("sc", lo), state.get("m", lo), state.get("mn", lo),
            _table(x.device) if p.TABLE else state["d"]]
    if tiles:
        bn, bk = tiles
    elif x.device.type == "cpu":
        bn, bk = (256, 256) if bm > 1 else (1024, 1024)
    else:
        bn, bk = (64, 64) if bm > 1 else (32, 256)
    _grouped[(bexp.numel(), triton.cdiv(n_out, bn))](
        x, y, src, dst, bexp, n_out, K, *args, BM=bm, BN=bn, BK=bk, LO_BITS=p.LO_BITS, HI_BITS=p.HI_BITS,
        OFF=p.OFF, SB=p.SB, G=p.G, HAS_SC=p.HAS_SC, HAS_M=p.HAS_M, HAS_MN=p.HAS_MN, MIN_SUB=p.MIN_SUB,
        TABLE=p.TABLE)
    return y


def stack(ws) -> tuple[dict, Params] | None:
    """The experts' layouts as one stacked layout, or None when they differ (types, shapes)."""
    if any(getattr(w, "tparams", None) is None or not w.state for w in ws):
        return None
    if len({w.tparams for w in ws}) != 1 or len({(w.in_features, w.out_features) for w in ws}) != 1:
        return None
    return {k: torch.cat([w.state[k] for w in ws]) for k in ws[0].state}, ws[0].tparams


def moe_ffn(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, up, gate, down, act) -> torch.Tensor:
    """model.moe.moe_ffn through the grouped kernel: up (and gate) for every (token, slot) row, the
    activation, down, then the slots weighted and summed per token."""
    T, k = experts.shape
    E = len(up)
    bm = 1 if T * k <= 16 else 16
    slots, bexp = plan(experts, E, bm)
    tok = torch.where(slots >= 0, slots // k, -1)
    x = x.reshape(T, -1).float().contiguous()
    us, up_p = up.grouped
    u = grouped_linear(x, tok, slots, bexp, T * k, us, up_p, up.n_out, bm)
    if gate:
        gs, gate_p = gate.grouped
        g = grouped_linear(x, tok, slots, bexp, T * k, gs, gate_p, gate.n_out, bm)
        h = act(g, u)
    else:
        h = act(u, torch.ones_like(u))
    ds, down_p = down.grouped
    y = grouped_linear(h.contiguous(), slots, slots, bexp, T * k, ds, down_p, down.n_out, bm)
    return (y.view(T, k, -1) * weights.reshape(T, k, 1)).sum(1)
