"""K-quants (256-value super-blocks): the file's integer sub-block scales (and mins) kept as int8 per
group with float16 d (and -dmin) per 256 values; activations Q8_K (ggml_vec_dot_q*_K_q8_K).

- Q2_K: 2-bit values, groups of 16, value = d * (sc & 15) * u - dmin * (sc >> 4); the sc byte is the
  file's own (layout flag SM4), so the repacked form costs the file's 2.625 bits a weight.
- Q3_K: 3-bit values u = q + 4 (q in -4..3: two low bits, and hmask's bit set means no -4), groups of 16,
  value = d * (sc - 32) * (u - 4): 3.56 bits a weight (the file's 6-bit scales take a byte here).
- Q4_K, Q5_K: 4 and 5 bits, groups of 32, 6-bit scales and mins (get_scale_min_k4).
- Q6_K: 6 bits, groups of 16, int8 scales, value = d * sc * (u - 32).
"""
from __future__ import annotations

import torch

from ..blocks import _nibbles_u8, _q5k_values, _q6k_values
from ..dequant import _bits, _f16, _k_scale_min, _shifts
from . import Q8_K, SM4, TypeSpec, register


def _rows(raw, w, **parts) -> dict:
    n = raw.shape[0]
    return {k: None if v is None else v.reshape(n, -1) for k, v in parts.items()}


def _read_q45k(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    sc, mn = (v.to(torch.int8) for v in _k_scale_min(b[:, 4:16]))
    if w.type.name == "Q4_K":
        u = _nibbles_u8(b[:, 16:144].reshape(-1, 32)).reshape(-1, 256)
    else:
        u = _q5k_values(b).to(torch.uint8)
    return _rows(raw, w, u=u, sc=sc, mn=mn, d=_f16(b, 0), dm=-_f16(b, 2))


def _read_q6k(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    return _rows(raw, w, u=_q6k_values(b), sc=b[:, 192:208].contiguous().view(torch.int8), mn=None,
                 d=_f16(b, 208), dm=None)


def _two_bit(qs: torch.Tensor) -> torch.Tensor:
    """[n, 64] bytes -> [n, 256] uint8: value 128h + 32s + l is bits 2s of byte 32h + l (dequantize_row_q2_K)."""
    n = qs.shape[0]
    q = qs.to(torch.int32).reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=qs.device).reshape(1, 1, 4, 1)
    return (q & 3).to(torch.uint8).reshape(n, 256)


def _read_q2k(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    return _rows(raw, w, u=_two_bit(b[:, 16:80]), sc=b[:, 0:16].contiguous().view(torch.int8), mn=None,
                 d=_f16(b, 80), dm=-_f16(b, 82))


def _read_q3k(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    n = b.shape[0]
    hi = _bits(b[:, 0:32], 8).transpose(1, 2).reshape(n, 256)  # bit j of hmask[l] -> value 32j + l
    u = _two_bit(b[:, 32:96]) | (hi.to(torch.uint8) << 2)
    lo, h = b[:, 96:104].to(torch.int32), b[:, 104:108].to(torch.int32)
    lsc = torch.cat((lo & 15, lo >> 4), dim=1)
    hsc = ((h.unsqueeze(1) >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 4, 1)) & 3).reshape(n, 16)
    sc = ((lsc | (hsc << 4)) - 32).to(torch.int8)
    return _rows(raw, w, u=u, sc=sc, mn=None, d=_f16(b, 108), dm=None)


register(TypeSpec("Q2_K", "kquants", 2, 16, Q8_K, True, True, 0.0, _read_q2k, SM4))
register(TypeSpec("Q3_K", "kquants", 3, 16, Q8_K, True, False, -4.0, _read_q3k))
register(TypeSpec("Q4_K", "kquants", 4, 32, Q8_K, True, True, 0.0, _read_q45k))
register(TypeSpec("Q5_K", "kquants", 5, 32, Q8_K, True, True, 0.0, _read_q45k))
register(TypeSpec("Q6_K", "kquants", 6, 16, Q8_K, True, False, -32.0, _read_q6k))
