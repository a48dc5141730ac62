"""One dequantizer per ggml type, all with one signature: uint8 blocks [n, type_size] -> float32 [n, block_size].

Pure PyTorch, vectorized, on whatever device the blocks live. The float operations are done in the
same order as ggml's dequantize_row_* (ggml-quants.c), so results are bit-for-bit equal to ggml and
to gguf-py's reference dequantizers, subnormal and extreme scales included.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from ..errors import QuantError
from ..gguf.types import GGMLType, ggml_type

Dequantizer = Callable[[torch.Tensor], torch.Tensor]
DEQUANTIZERS: dict[str, Dequantizer] = {}


def register(name: str):
    def deco(fn: Dequantizer) -> Dequantizer:
        DEQUANTIZERS[name] = fn
        return fn
    return deco


# ---- byte helpers --------------------------------------------------------------------------
def _f16(b: torch.Tensor, at: int, count: int = 1) -> torch.Tensor:
    """``count`` little-endian fp16 values at byte ``at`` of each block, as float32 [n, count]."""
    return b[:, at:at + 2 * count].contiguous().view(torch.float16).float()


def _u16(b: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """``count`` little-endian uint16 values as int32 [n, count]."""
    x = b[:, at:at + 2 * count].to(torch.int32)
    return x[:, 0::2] | (x[:, 1::2] << 8)


def _u32(b: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """``count`` little-endian uint32 values as int64 [n, count]."""
    x = b[:, at:at + 4 * count].to(torch.int64)
    return x[:, 0::4] | (x[:, 1::4] << 8) | (x[:, 2::4] << 16) | (x[:, 3::4] << 24)


def _shifts(*s: int, device) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.int32, device=device)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2, k]: low nibbles first, then high nibbles (ggml's q4 ordering)."""
    q = q.to(torch.int32)
    return torch.stack((q & 0xF, q >> 4), dim=1)


def _bits(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """[..., k] integers -> [..., k, nbits] bits, least significant first."""
    return (x.to(torch.int32).unsqueeze(-1) >> torch.arange(nbits, dtype=torch.int32, device=x.device)) & 1


def _signs(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits == 0, 1.0, -1.0)


@lru_cache(maxsize=None)
def _table(name: str, device: str) -> torch.Tensor:
    if name == "ksigns":
        # ggml's ksigns_iq2xs: 7 sign bits plus an 8th that makes the count of negatives even
        i = torch.arange(128, dtype=torch.int32)
        par = torch.zeros_like(i)
        for k in range(7):
            par ^= (i >> k) & 1
        return (i | (par << 7)).to(device)
    if name == "iq4nl":  # kvalues_iq4nl
        return torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                            dtype=torch.float32, device=device)
    if name == "mxfp4":  # kvalues_mxfp4: e2m1 values, doubled
        return torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32,
                            device=device)
    grids = np.load(os.path.join(os.path.dirname(__file__), "iq_grids.npz"))
    return torch.from_numpy(grids[name].astype(np.float32)).to(device)


def _tab(name: str, ref: torch.Tensor) -> torch.Tensor:
    return _table(name, str(ref.device))


# ---- plain types -----------------------------------------------------------------------------
def _view(b: torch.Tensor, dtype) -> torch.Tensor:
    return b.contiguous().view(dtype)


@register("F32")
def deq_f32(b):
    return _view(b, torch.float32).clone()


@register("F16")
def deq_f16(b):
    return _view(b, torch.float16).float()


@register("BF16")
def deq_bf16(b):
    return _view(b, torch.bfloat16).float()


@register("F64")
def deq_f64(b):
    return _view(b, torch.float64).float()


for _n, _dt in (("I8", torch.int8), ("I16", torch.int16), ("I32", torch.int32), ("I64", torch.int64)):
    register(_n)(lambda b, _dt=_dt: _view(b, _dt).float())


# ---- 32-element blocks -------------------------------------------------------------------------
@register("Q4_0")
def deq_q4_0(b):  # d, qs[16]; x = d * (q - 8)
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).reshape(-1, 32) - 8
    return d * q.float()


@register("Q4_1")
def deq_q4_1(b):  # d, m, qs[16]; x = d * q + m
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20]).reshape(-1, 32)
    return d * q.float() + m


def _q5(b, qh_at, qs_at):
    qh = _bits(_u32(b, qh_at, 1), 32).reshape(-1, 32)
    ql = _nibbles(b[:, qs_at:qs_at + 16]).reshape(-1, 32)
    return ql | (qh << 4)


@register("Q5_0")
def deq_q5_0(b):  # d, qh (u32), qs[16]; x = d * (q - 16)
    return _f16(b, 0) * (_q5(b, 2, 6) - 16).float()


@register("Q5_1")
def deq_q5_1(b):  # d, m, qh, qs[16]; x = d * q + m
    return _f16(b, 0) * _q5(b, 4, 8).float() + _f16(b, 2)


@register("Q8_0")
def deq_q8_0(b):  # d, qs[32] int8
    return b[:, 2:34].view(torch.int8).float() * _f16(b, 0)


@register("Q8_1")
def deq_q8_1(b):  # d, s (= d * sum q, unused here), qs[32] int8
    return b[:, 4:36].contiguous().view(torch.int8).float() * _f16(b, 0)


@register("IQ4_NL")
def deq_iq4_nl(b):  # d, qs[16] indices into a non-linear 16-value table
    q = _nibbles(b[:, 2:18]).reshape(-1, 32)
    return _f16(b, 0) * _tab("iq4nl", b)[q]


@register("MXFP4")
def deq_mxfp4(b):  # e8m0 exponent, qs[16] e2m1 indices; see ggml_e8m0_to_fp32_half
    e = b[:, 0:1].to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    q = _nibbles(b[:, 1:17]).reshape(-1, 32)
    return d * _tab("mxfp4", b)[q]


# ---- K-quants (256-element super-blocks) ------------------------------------------------------------
@register("Q2_K")
def deq_q2_k(b):  # scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin — d last
    n = b.shape[0]
    sc = b[:, 0:16].to(torch.int32)
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (sc & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (sc >> 4).float()).unsqueeze(-1)
    qs = b[:, 16:80].to(torch.int32).reshape(n, 2, 1, 32)
    q = ((qs >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    return (dl * q.float() - ml).reshape(n, 256)


@register("Q3_K")
def deq_q3_k(b):  # hmask[32], qs[64], scales[12] (16 six-bit values), d — d last
    n = b.shape[0]
    d = _f16(b, 108)
    lo = b[:, 96:104].to(torch.int32)
    hi = b[:, 104:108].to(torch.int32)
    lsc = torch.cat((lo & 0xF, lo >> 4), dim=1)  # scale j's low 4 bits
    hsc = ((hi.unsqueeze(1) >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 4, 1)) & 3).reshape(n, 16)
    scales = ((lsc | (hsc << 4)) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    qs = b[:, 32:96].to(torch.int32).reshape(n, 2, 1, 32)
    ql = ((qs >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    qh = _bits(b[:, 0:32], 8).transpose(1, 2).reshape(n, 16, 16)  # bit j of hmask[l] -> group j
    q = ql - ((qh ^ 1) << 2)  # a cleared hmask bit subtracts 4
    return (dl * q.float()).reshape(n, 256)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (ggml get_scale_min_k4)."""
    s = s.to(torch.int32)
    a, m, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 63, (c & 0xF) | ((a >> 6) << 4)), dim=1)
    mn = torch.cat((m & 63, (c >> 4) | ((m >> 6) << 4)), dim=1)
    return sc, mn


@register("Q4_K")
def deq_q4_k(b):  # d, dmin, scales[12], qs[128] — d first
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * mn.float()).unsqueeze(-1)
    q = _nibbles(b[:, 16:144].reshape(n * 4, 32)).reshape(n, 8, 32)
    return (dl * q.float() - ml).reshape(n, 256)


@register("Q5_K")
def deq_q5_k(b):  # d, dmin, scales[12], qh[32], qs[128]
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * mn.float()).unsqueeze(-1)
    ql = _nibbles(b[:, 48:176].reshape(n * 4, 32)).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 8).transpose(1, 2)  # bit j of qh[l] -> group j
    q = ql | (qh << 4)
    return (dl * q.float() - ml).reshape(n, 256)


@register("Q6_K")
def deq_q6_k(b):  # ql[128], qh[64], scales[16] int8, d — d last; outputs l, l+32, l+64, l+96 interleave
    n = b.shape[0]
    ql = b[:, 0:128].to(torch.int32).reshape(n, 2, 1, 64)
    ql = torch.cat((ql & 0xF, ql >> 4), dim=2).reshape(n, 8, 32)
    qh = b[:, 128:192].to(torch.int32).reshape(n, 2, 1, 32)
    qh = ((qh >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)) - 32).reshape(n, 16, 16)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    dl = (_f16(b, 208) * sc).unsqueeze(-1)
    return (dl * q.float()).reshape(n, 256)


@register("Q8_K")
def deq_q8_k(b):  # d (f32), qs[256] int8, bsums[16] (unused)
    d = b[:, 0:4].contiguous().view(torch.float32)
    return b[:, 4:260].contiguous().view(torch.int8).float() * d


# ---- ternary ---------------------------------------------------------------------------------
@register("TQ1_0")
def deq_tq1_0(b):  # qs[48] (5 trits per byte), qh[4] (4 trits per byte), d
    n = b.shape[0]
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=b.device)
    q0 = (b[:, 0:32].to(torch.int32).unsqueeze(1) * pow3.reshape(1, 5, 1)).reshape(n, 160)
    q1 = (b[:, 32:48].to(torch.int32).unsqueeze(1) * pow3.reshape(1, 5, 1)).reshape(n, 80)
    qh = (b[:, 48:52].to(torch.int32).unsqueeze(1) * pow3[:4].reshape(1, 4, 1)).reshape(n, 16)
    q = torch.cat((q0, q1, qh), dim=1) & 0xFF  # the byte product wraps, as in uint8 arithmetic
    q = ((q * 3) >> 8) - 1
    return _f16(b, 52) * q.float()


@register("TQ2_0")
def deq_tq2_0(b):  # qs[64] (4 two-bit values per byte), d
    n = b.shape[0]
    qs = b[:, 0:64].to(torch.int32).reshape(n, 2, 1, 32)
    q = ((qs >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3).reshape(n, 256) - 1
    return _f16(b, 64) * q.float()


@register("NVFP4")
def deq_nvfp4(b):  # 4 ue4m3 scales (one per 16 values), qs[32] e2m1 indices
    n = b.shape[0]
    x = b[:, 0:4].to(torch.int32)
    exp, man = (x >> 3) & 0xF, (x & 7).float()
    raw = torch.where(exp == 0, man * 2.0 ** -9, (1.0 + man / 8.0) * torch.pow(2.0, (exp - 7).float()))
    d = torch.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5).reshape(n, 4, 1)
    qs = b[:, 4:36].to(torch.int32).reshape(n, 4, 8)
    q = torch.cat((qs & 0xF, qs >> 4), dim=2)
    return (d * _tab("mxfp4", b)[q]).reshape(n, 64)


# ---- i-quants ----------------------------------------------------------------------------------
def _ksign_bits(idx: torch.Tensor) -> torch.Tensor:
    """7-bit sign indices -> [..., 8] of +-1 through ggml's ksigns table."""
    return _signs(_bits(_tab("ksigns", idx)[idx], 8))


@register("IQ2_XXS")
def deq_iq2_xxs(b):  # d, then 8 x (u32 grid indices, u32 signs|scale)
    n = b.shape[0]
    d = _f16(b, 0)
    aux = _u32(b, 2, 16).reshape(n, 8, 2)
    db = (d * (0.5 + (aux[..., 1] >> 28).float()) * 0.25).reshape(n, 8, 1, 1)
    sidx = (aux[..., 1].unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=b.device)) & 127
    signs = _ksign_bits(sidx)  # [n, 8, 4, 8]
    gidx = b[:, 2:66].reshape(n, 8, 2, 4)[:, :, 0, :].to(torch.int64)
    grid = _tab("IQ2_XXS", b)[gidx]  # [n, 8, 4, 8]
    return (db * grid * signs).reshape(n, 256)


@register("IQ2_XS")
def deq_iq2_xs(b):  # d, qs[32] u16 (9-bit grid index | 7-bit sign index), scales[8]
    n = b.shape[0]
    d = _f16(b, 0)
    qs = _u16(b, 2, 32)
    sc = _nibbles(b[:, 66:74]).transpose(1, 2).reshape(n, 16)
    db = (d * (0.5 + sc.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _ksign_bits(qs >> 9).reshape(n, 16, 2, 8)
    grid = _tab("IQ2_XS", b)[(qs & 511).long()].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, 256)


@register("IQ2_S")
def deq_iq2_s(b):  # d, qs[32], signs[32], qh[8], scales[8]
    n = b.shape[0]
    d = _f16(b, 0)
    sc = _nibbles(b[:, 74:82]).transpose(1, 2).reshape(n, 16)
    db = (d * (0.5 + sc.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs(_bits(b[:, 34:66], 8)).reshape(n, 16, 2, 8)
    qh = b[:, 66:74].to(torch.int32).unsqueeze(-1) >> _shifts(0, 2, 4, 6, device=b.device)
    idx = b[:, 2:34].to(torch.int64) | ((qh & 3).reshape(n, 32).to(torch.int64) << 8)
    grid = _tab("IQ2_S", b)[idx].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, 256)


@register("IQ3_XXS")
def deq_iq3_xxs(b):  # d, qs[64] grid indices, 8 x u32 (4 x 7-bit sign index | 4-bit scale)
    n = b.shape[0]
    d = _f16(b, 0)
    aux = _u32(b, 66, 8)
    db = (d * (0.5 + (aux >> 28).float()) * 0.5).reshape(n, 8, 1, 1)
    sidx = (aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=b.device)) & 127
    signs = _ksign_bits(sidx)  # [n, 8, 4, 8]
    grid = _tab("IQ3_XXS", b)[b[:, 2:66].long()].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, 256)


@register("IQ3_S")
def deq_iq3_s(b):  # d, qs[64], qh[8], signs[32], scales[4]
    n = b.shape[0]
    d = _f16(b, 0)
    sc = _nibbles(b[:, 106:110]).transpose(1, 2).reshape(n, 8)
    db = (d * (1 + 2 * sc).float()).reshape(n, 8, 1, 1)
    signs = _signs(_bits(b[:, 74:106], 8)).reshape(n, 8, 4, 8)
    qh = _bits(b[:, 66:74], 8).reshape(n, 64).to(torch.int64)
    idx = b[:, 2:66].to(torch.int64) | (qh << 8)
    grid = _tab("IQ3_S", b)[idx].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, 256)


@register("IQ1_S")
def deq_iq1_s(b):  # d, qs[32], qh[8] u16 (4 x 3-bit index high bits | 3-bit scale | delta sign)
    n = b.shape[0]
    d = _f16(b, 0)
    qh = _u16(b, 34, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, 0.125, -0.125).reshape(n, 8, 1, 1)
    hi = (qh.unsqueeze(-1) >> _shifts(0, 3, 6, 9, device=b.device)) & 7
    idx = b[:, 2:34].to(torch.int64) | (hi.reshape(n, 32).to(torch.int64) << 8)
    grid = _tab("IQ1_S", b)[idx].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, 256)


@register("IQ1_M")
def deq_iq1_m(b):  # qs[32], qh[16], scales[8] (4 x u16; their top nibbles make the fp16 d)
    n = b.shape[0]
    s = _u16(b, 48, 4)
    dbits = ((s[:, 0] >> 12) | ((s[:, 1] >> 8) & 0xF0) | ((s[:, 2] >> 4) & 0xF00) | (s[:, 3] & 0xF000))
    d = dbits.to(torch.int16).view(torch.float16).float().reshape(n, 1)
    sc = ((s.unsqueeze(-1) >> _shifts(0, 3, 6, 9, device=b.device)) & 7).reshape(n, 16)
    dl = (d * (2 * sc + 1).float()).reshape(n, 8, 2, 1, 1)
    qh = b[:, 32:48].to(torch.int32).unsqueeze(-1) >> _shifts(0, 4, device=b.device)  # [n, 16, 2]
    idx = b[:, 0:32].to(torch.int64) | ((qh & 7).reshape(n, 32).to(torch.int64) << 8)
    delta = torch.where((qh & 8) == 0, 0.125, -0.125).reshape(n, 8, 2, 2, 1)
    grid = _tab("IQ1_S", b)[idx].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, 256)


@register("IQ4_XS")
def deq_iq4_xs(b):  # d, scales_h (u16), scales_l[4], qs[128]
    n = b.shape[0]
    d = _f16(b, 0)
    sh = _u16(b, 2, 1)
    sl = _nibbles(b[:, 4:8]).transpose(1, 2).reshape(n, 8)
    shi = (sh >> (2 * torch.arange(8, dtype=torch.int32, device=b.device))) & 3
    dl = (d * ((sl | (shi << 4)) - 32).float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 8:136].reshape(n * 8, 16)).reshape(n, 8, 32)
    return (dl * _tab("iq4nl", b)[q]).reshape(n, 256)


# ---- the one entry point ----------------------------------------------------------------------
@lru_cache(maxsize=None)
def _fn_of(t: GGMLType) -> tuple[Dequantizer, int]:
    fn = DEQUANTIZERS.get(t.name)
    if fn is None:
        raise QuantError(f"no dequantizer for ggml type {t.name}")
    return fn, t.type_size


def dequantize_blocks(b: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """A few rows of whole blocks (uint8 tensor) -> float32 [n blocks, block_size]: dequantize() without
    its conversions and chunking, for an embedding lookup's one row a decode step."""
    fn, size = _fn_of(t)
    if b.numel() % size:
        raise QuantError(f"{t.name}: {b.numel()} bytes is not a whole number of {size}-byte blocks")
    return fn(b.view(-1, size))


def dequantize(raw, type: "str | int | GGMLType", shape=None, chunk_blocks: int = 1 << 16) -> torch.Tensor:
    """Raw GGUF bytes of one tensor -> float32 tensor.

    ``raw``: uint8 numpy array or torch tensor (any device). ``shape``: GGUF order (ne[0] first); the
    result has numpy order (reversed). Works in chunks so that temporaries stay small.
    """
    t = ggml_type(type)
    fn = DEQUANTIZERS.get(t.name)
    if fn is None:
        raise QuantError(f"no dequantizer for ggml type {t.name}")
    b = torch.from_numpy(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw
    b = b.reshape(-1)
    if b.numel() % t.type_size:
        raise QuantError(f"{t.name}: {b.numel()} bytes is not a whole number of {t.type_size}-byte blocks")
    b = b.view(-1, t.type_size)
    n = b.shape[0]
    if n <= chunk_blocks:
        out = fn(b).reshape(-1)
    else:
        out = torch.empty(n * t.block_size, dtype=torch.float32, device=b.device)
        for i in range(0, n, chunk_blocks):
            j = min(n, i + chunk_blocks)
            out[i * t.block_size:j * t.block_size] = fn(b[i:j]).reshape(-1)
    if shape is not None:
        out = out.reshape(tuple(reversed(tuple(shape))))
    return out
