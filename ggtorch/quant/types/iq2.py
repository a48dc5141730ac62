"""The 2-bit grid i-quants IQ2_XXS, IQ2_XS, IQ2_S: 256-value super-blocks whose values are grid entries
of 8 magnitudes in {8, 25, 43} (iq2xxs_grid, iq2xs_grid, iq2s_grid) with a sign bit each, times
d * (0.5 + ls) / 4 per 32 values (IQ2_XXS) or per 16 (IQ2_XS, IQ2_S) (dequantize_row_iq2_*).

A signed value is one of 6, so it is stored as the 3-bit index k | sign << 2 (k: 8 -> 0, 25 -> 1,
43 -> 2) that the kernel turns into sign * level_k + 43 with a byte shuffle (LUT_IQ2, zoff -43), in the
K layout with sc = 1 + 2 * ls and the 1/8 that llama.cpp applies once at the end of
ggml_vec_dot_iq2_*_q8_K applied to d (oshift(3), exact). The tiles keep the file's grid indices (the
grid layout, csrc/tiles.h: the kernel looks the entries up): 2.31, 2.69 and 2.81 bits a weight for
IQ2_XXS, IQ2_XS, IQ2_S (file: 2.06, 2.31, 2.56; 3.3-3.56 with the indices decoded at repack).
Activations Q8_K.
"""
from __future__ import annotations

import torch

from ..dequant import _bits, _f16, _nibbles, _shifts, _tab, _u16, _u32
from . import G_IQ2S, G_IQ2XS, G_IQ2XXS, GRIDL, LUT_IQ2, Q8_K, TypeSpec, oshift, register
from .iq3 import ksign_bits


def _parts(b, n, g: torch.Tensor, neg: torch.Tensor, ls: torch.Tensor, gi: torch.Tensor | None = None) -> dict:
    """grid values g and sign bits neg [nb, ..., 8], 4-bit scales ls (and the grid indices gi, for the grid
    layout) -> the K layout's parts."""
    u = (g > 8).to(torch.int32) + (g > 25).to(torch.int32) | (neg << 2)
    p = {"u": u.to(torch.uint8).reshape(n, -1), "sc": (2 * ls + 1).to(torch.int8).reshape(n, -1), "mn": None,
         "d": _f16(b, 0).reshape(n, -1), "dm": None}
    if gi is not None:
        p.update(gi=gi.long().reshape(n, -1), neg=neg.to(torch.uint8).reshape(n, -1))
    return p


def _read_iq2xxs(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb = b.shape[0]
    aux = _u32(b, 2, 16).reshape(nb, 8, 2)  # per 32 values: 4 grid indices, 4 x 7 sign bits | ls << 28
    neg = ksign_bits((aux[..., 1].unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=b.device)) & 127)
    gi = b[:, 2:66].reshape(nb, 8, 2, 4)[:, :, 0, :].long()
    g = _tab("IQ2_XXS", b)[gi]  # [nb, 8, 4, 8]
    return _parts(b, raw.shape[0], g, neg, aux[..., 1] >> 28, gi)


def _read_iq2xs(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb = b.shape[0]
    qs = _u16(b, 2, 32)  # 9-bit grid index | 7-bit sign index << 9
    g = _tab("IQ2_XS", b)[(qs & 511).long()]
    ls = _nibbles(b[:, 66:74]).transpose(1, 2).reshape(nb, 16)
    return _parts(b, raw.shape[0], g, ksign_bits(qs >> 9), ls, qs & 511)


def _read_iq2s(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb = b.shape[0]
    qh = b[:, 66:74].to(torch.int32).unsqueeze(-1) >> _shifts(0, 2, 4, 6, device=b.device)
    g = _tab("IQ2_S", b)[b[:, 2:34].to(torch.int64) | ((qh & 3).reshape(nb, 32).to(torch.int64) << 8)]
    ls = _nibbles(b[:, 74:82]).transpose(1, 2).reshape(nb, 16)
    gi = b[:, 2:34].to(torch.int64) | ((qh & 3).reshape(nb, 32).to(torch.int64) << 8)
    return _parts(b, raw.shape[0], g, _bits(b[:, 34:66], 8), ls, gi)


register(TypeSpec("IQ2_XXS", "iq2", 3, 32, Q8_K, True, False, -43.0, _read_iq2xxs, LUT_IQ2 | oshift(3) | GRIDL,
                  grid="IQ2_XXS", glayout=G_IQ2XXS))
register(TypeSpec("IQ2_XS", "iq2", 3, 16, Q8_K, True, False, -43.0, _read_iq2xs, LUT_IQ2 | oshift(3) | GRIDL,
                  grid="IQ2_XS", glayout=G_IQ2XS))
register(TypeSpec("IQ2_S", "iq2", 3, 16, Q8_K, True, False, -43.0, _read_iq2s, LUT_IQ2 | oshift(3) | GRIDL,
                  grid="IQ2_S", glayout=G_IQ2S))
