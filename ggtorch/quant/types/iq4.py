"""The non-linear 4-bit types: each value is a 4-bit index into kvalues_iq4nl (16 int8 levels).

The stored values are the file's indices (4 bits, nothing requantized); the kernel turns them into
kvalues_iq4nl + 128 with one byte shuffle per 64 bytes (layout flag LUT_IQ4, llama.cpp's
ggml_vec_dot_iq4_nl_q8_0 does the same lookup), and the offset zoff = -128 takes the 128 back out.
- IQ4_NL: blocks of 32, float16 d; value = d * kvalues[i]; activations Q8_0.
- IQ4_XS: 256-value super-blocks, float16 d and a 6-bit scale per 32 (stored as int8 ls - 32, the K
  layout); value = d * (ls - 32) * kvalues[i]; activations Q8_K (ggml_vec_dot_iq4_xs_q8_K).
"""
from __future__ import annotations

import torch

from ..blocks import _nibbles_u8
from ..dequant import _f16, _nibbles, _u16
from . import LUT_IQ4, Q8_0, Q8_K, TypeSpec, register


def _read_iq4nl(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    n = raw.shape[0]
    d = _f16(b, 0)
    return {"u": _nibbles_u8(b[:, 2:18]).reshape(n, -1), "dw": d.reshape(n, -1), "mw": (-128 * d).reshape(n, -1)}


def _read_iq4xs(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    nb, n = b.shape[0], raw.shape[0]
    sh = _u16(b, 2, 1)
    sl = _nibbles(b[:, 4:8]).transpose(1, 2).reshape(nb, 8)
    shi = (sh >> (2 * torch.arange(8, dtype=torch.int32, device=b.device))) & 3
    sc = ((sl | (shi << 4)) - 32).to(torch.int8)
    u = _nibbles_u8(b[:, 8:136].reshape(nb * 8, 16)).reshape(nb, 256)
    return {"u": u.reshape(n, -1), "sc": sc.reshape(n, -1), "mn": None, "d": _f16(b, 0).reshape(n, -1), "dm": None}


register(TypeSpec("IQ4_NL", "iq4", 4, 32, Q8_0, False, False, -128.0, _read_iq4nl, LUT_IQ4))
register(TypeSpec("IQ4_XS", "iq4", 4, 32, Q8_K, True, False, -128.0, _read_iq4xs, LUT_IQ4))
