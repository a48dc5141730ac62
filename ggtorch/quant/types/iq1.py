"""The 1-bit grid i-quants IQ1_S, IQ1_M: 256-value super-blocks whose values are grid entries of 8
values g in {-1, 0, 1} (iq1s_grid, 11-bit indices) plus a delta of +-1/8, times d * (2 ls + 1)
(dequantize_row_iq1_s, dequantize_row_iq1_m); activations Q8_K.

- IQ1_S: ls and the delta's sign per 32 values. Stored as the 2-bit u = g + 1, G = 32, with the file's
  3-bit ls and the delta's sign in one sc byte (ls | sign << 3, flag IQ1S): the kernel makes the group's
  scale d * (2 ls + 1) and its offset that times -1 -+ 1/8 (ggml_vec_dot_iq1_s_q8_K's sumi and
  IQ1S_DELTA * sumi1 in one). The values are kept as the file's 11-bit grid indices (the grid layout,
  csrc/tiles.h), which the kernel looks up into those u: 1.81 bits a weight (file: 1.56; 2.31 decoded).
- IQ1_M: ls per 16 values, the delta's sign per 8, d in the top nibbles of the four scale words. The
  sign changes inside a scale group, so it goes with each value: the 3-bit (g + 1) | sign << 2, which
  the kernel turns into 8 g +- 1 + 9 with a byte shuffle (LUT_IQ1M, zoff -9); sc = 2 ls + 1, G = 16, and
  the 1/8 applied to d (oshift(3)). Kept as the file's grid indices too, the delta sign beside each
  entry's high index bits: 2.06 bits a weight (file: 1.75; 3.56 decoded).
"""
from __future__ import annotations

import torch

from ..dequant import _f16, _shifts, _tab, _u16
from . import G_IQ1M, G_IQ1S, GRIDL, IQ1S, LUT_IQ1M, Q8_K, TypeSpec, oshift, register


def _read_iq1s(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb, n = b.shape[0], raw.shape[0]
    qh = _u16(b, 34, 8)  # per 32 values: 4 x 3 high index bits | ls << 12 | delta sign << 15
    hi = (qh.unsqueeze(-1) >> _shifts(0, 3, 6, 9, device=b.device)) & 7
    gi = b[:, 2:34].to(torch.int64) | (hi.reshape(nb, 32).to(torch.int64) << 8)
    g = _tab("IQ1_S", b)[gi]
    return {"u": (g + 1).to(torch.uint8).reshape(n, -1), "sc": (qh >> 12).to(torch.int8).reshape(n, -1), "mn": None,
            "d": _f16(b, 0).reshape(n, -1), "dm": None, "gi": gi.reshape(n, -1)}


def _read_iq1m(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb, n = b.shape[0], raw.shape[0]
    s = _u16(b, 48, 4)
    dbits = (s[:, 0] >> 12) | ((s[:, 1] >> 8) & 0xF0) | ((s[:, 2] >> 4) & 0xF00) | (s[:, 3] & 0xF000)
    d = dbits.to(torch.int16).view(torch.float16).float()
    ls = ((s.unsqueeze(-1) >> _shifts(0, 3, 6, 9, device=b.device)) & 7).reshape(nb, 16)
    qh = (b[:, 32:48].to(torch.int32).unsqueeze(-1) >> _shifts(0, 4, device=b.device)).reshape(nb, 32) & 15
    g = _tab("IQ1_S", b)[b[:, 0:32].to(torch.int64) | ((qh & 7).to(torch.int64) << 8)].to(torch.int32)  # [nb, 32, 8]
    u = (g + 1) | ((qh >> 3).unsqueeze(-1) << 2)
    gi = b[:, 0:32].to(torch.int64) | ((qh & 7).to(torch.int64) << 8)
    return {"u": u.to(torch.uint8).reshape(n, -1), "sc": (2 * ls + 1).to(torch.int8).reshape(n, -1), "mn": None,
            "d": d.reshape(n, -1), "dm": None, "gi": gi.reshape(n, -1), "dl": (qh >> 3).reshape(n, -1)}


register(TypeSpec("IQ1_S", "iq1", 2, 32, Q8_K, True, False, -1.0, _read_iq1s, IQ1S | GRIDL, grid="IQ1_S",
                  glayout=G_IQ1S))
register(TypeSpec("IQ1_M", "iq1", 3, 16, Q8_K, True, False, -9.0, _read_iq1m, LUT_IQ1M | oshift(3) | GRIDL, grid="IQ1_S",
                  glayout=G_IQ1M))
