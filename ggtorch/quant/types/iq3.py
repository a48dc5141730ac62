"""The 3-bit grid i-quants: 256-value super-blocks whose values are grid entries (4 magnitudes per
index) with a sign bit each.

- IQ3_S: odd magnitudes 1..15 per 9-bit index (iq3s_grid), times d * (1 + 2 * sc) per 32 values
  (dequantize_row_iq3_s). A signed odd magnitude s * g is one of 16 values -15, -13, ..., 15, so it is
  stored exactly as the 4-bit v = (s * g + 15) / 2, which the kernel's byte shuffle doubles (LUT_IQ3S):
  value = d * (1 + 2 * sc) * (2 v - 15), the 4-bit kernel in the K layout (int8 sub-scale 1 + 2 * sc,
  float16 d per 256, zoff -15: an integer offset, so the integer super-block sums of kint.cpp apply;
  with v itself the offset was -7.5 and the float tile loop ran). Stored in the grid layout (csrc/tiles.h):
  the file's 9-bit grid indices and a sign bit per value, which the kernel looks up into (g + 15) / 2 and
  flips to (15 - g) / 2 where the sign is set: 3.56 bits a weight against the file's 3.44 (4.31 decoded);
  activations Q8_K (ggml_vec_dot_iq3_s_q8_K).
- IQ3_XXS: magnitudes 4, 12, ..., 52, 62 per 8-bit index (iq3xxs_grid), signs from a 7-bit index
  (ksigns_iq2xs), value = d * (1 + 2 * ls) / 4 * g per 32 values (dequantize_row_iq3_xxs). 62 breaks
  the even spacing, so each value is stored as a 4-bit index k | sign << 3 that the kernel turns into
  sign * level_k + 62 with a byte shuffle (LUT_IQ3XXS, zoff -62), sc = 1 + 2 * ls, and the 1/4 that
  llama.cpp applies once at the end of ggml_vec_dot_iq3_xxs_q8_K applied to d (oshift(2), exact).
  Stored in the grid layout (csrc/tiles.h): the file's 8-bit grid indices and a sign bit per value,
  which the kernel looks up into those 4-bit indices: 3.31 bits a weight against the file's 3.06 (4.31
  with the indices decoded at repack, which decoded 2-3x faster but took 1.26x llama.cpp's memory);
  activations Q8_K.
"""
from __future__ import annotations

import torch

from ..dequant import _bits, _f16, _nibbles, _tab, _u32
from . import G_IQ3S, G_IQ3XXS, GRIDL, LUT_IQ3S, LUT_IQ3XXS, Q8_K, TypeSpec, oshift, register


def _read_iq3s(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb, n = b.shape[0], raw.shape[0]
    sc = _nibbles(b[:, 106:110]).transpose(1, 2).reshape(nb, 8)
    neg = _bits(b[:, 74:106], 8).reshape(nb, 256)
    qh = _bits(b[:, 66:74], 8).reshape(nb, 64).to(torch.int64)
    g = _tab("IQ3_S", b)[b[:, 2:66].to(torch.int64) | (qh << 8)].reshape(nb, 256).to(torch.int32)
    v = ((torch.where(neg == 1, -g, g) + 15) // 2).to(torch.uint8)
    return {"u": v.reshape(n, -1), "sc": (1 + 2 * sc).to(torch.int8).reshape(n, -1), "mn": None,
            "d": _f16(b, 0).reshape(n, -1), "dm": None,
            "gi": (b[:, 2:66].to(torch.int64) | (qh << 8)).reshape(n, -1), "neg": neg.to(torch.uint8).reshape(n, -1)}


def ksign_bits(idx: torch.Tensor) -> torch.Tensor:
    """7-bit sign indices [...] -> [..., 8] sign bits (1: minus) through ggml's ksigns_iq2xs."""
    return _bits(_tab("ksigns", idx)[idx], 8)


def _read_iq3xxs(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb, n = b.shape[0], raw.shape[0]
    aux = _u32(b, 66, 8)  # per 32 values: 4 x 7 sign bits | ls << 28
    neg = ksign_bits((aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=b.device)) & 127)  # [nb, 8, 4, 8]
    g = _tab("IQ3_XXS", b)[b[:, 2:66].long()].reshape(nb, 8, 4, 8).to(torch.int32)
    u = ((g - 4) >> 3) | (neg << 3)  # level index (62 -> 7) | sign << 3
    return {"u": u.to(torch.uint8).reshape(n, -1), "sc": (2 * (aux >> 28) + 1).to(torch.int8).reshape(n, -1),
            "mn": None, "d": _f16(b, 0).reshape(n, -1), "dm": None,
            "gi": b[:, 2:66].long().reshape(n, -1), "neg": neg.to(torch.uint8).reshape(n, -1)}


register(TypeSpec("IQ3_S", "iq3", 4, 32, Q8_K, True, False, -15.0, _read_iq3s, LUT_IQ3S | GRIDL, grid="IQ3_S",
                  glayout=G_IQ3S))
register(TypeSpec("IQ3_XXS", "iq3", 4, 32, Q8_K, True, False, -62.0, _read_iq3xxs, LUT_IQ3XXS | oshift(2) | GRIDL,
                  grid="IQ3_XXS", glayout=G_IQ3XXS))
