"""IQ3_S: 256-value super-blocks whose values are grid entries (4 odd magnitudes 1..15 per 9-bit index,
iq3s_grid) with a sign bit each, times d * (1 + 2 * sc) per 32 values (dequantize_row_iq3_s).

A signed odd magnitude s * g is one of 16 values -15, -13, ..., 15, so it is stored exactly as the 4-bit
v = (s * g + 15) / 2 with value = 2 * d * (1 + 2 * sc) * (v - 7.5): the plain 4-bit kernel in the K
layout (int8 sub-scale 2 * (1 + 2 * sc), float16 d per 256, zoff -7.5), with no table lookup in the
product. 4 bits a weight against the file's 3.44 (grid indices are decoded once, at repack);
activations Q8_K (ggml_vec_dot_iq3_s_q8_K).
"""
from __future__ import annotations

import torch

from ..dequant import _bits, _f16, _nibbles, _tab
from . import Q8_K, TypeSpec, register


def _read_iq3s(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb, n = b.shape[0], raw.shape[0]
    sc = _nibbles(b[:, 106:110]).transpose(1, 2).reshape(nb, 8)
    neg = _bits(b[:, 74:106], 8).reshape(nb, 256)
    qh = _bits(b[:, 66:74], 8).reshape(nb, 64).to(torch.int64)
    g = _tab("IQ3_S", b)[b[:, 2:66].to(torch.int64) | (qh << 8)].reshape(nb, 256).to(torch.int32)
    v = ((torch.where(neg == 1, -g, g) + 15) // 2).to(torch.uint8)
    return {"u": v.reshape(n, -1), "sc": (2 * (1 + 2 * sc)).to(torch.int8).reshape(n, -1), "mn": None,
            "d": _f16(b, 0).reshape(n, -1), "dm": None}


register(TypeSpec("IQ3_S", "iq3", 4, 32, Q8_K, True, False, -7.5, _read_iq3s, grid="IQ3_S"))
