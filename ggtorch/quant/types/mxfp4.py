"""MXFP4 (gpt-oss's experts): blocks of 32 values, one e8m0 exponent byte and 16 bytes of 4-bit indices
into kvalues_mxfp4 (the e2m1 values doubled: 0, 1, 2, 3, 4, 6, 8, 12 and their negatives).

value = 2^(e - 128) * kvalues_mxfp4[i] (ggml's GGML_E8M0_TO_FP32_HALF: the half undoes the doubling);
activations Q8_0 (ggml_vec_dot_mxfp4_q8_0: a table lookup by byte shuffle, then an integer dot per block).

In the kernel's layout the indices stay 4 bits and the table flag LUT_MXFP4 turns them into
kvalues_mxfp4 + 12 (0..24, unsigned for vpdpbusd; zoff = -12 takes the 12 back out), like IQ4_NL. The
scale 2^(e - 128) spans 2^-128..2^127, which float16 cannot hold (2^-24..2^15), so the layout keeps the
file's exponent byte itself (flag E8M0: dw is uint8 [tiles][groups][16], 1 byte per 32 values as in the
file) and the kernel builds the float32 scale from its bits as ggml_e8m0_to_fp32_half does, exactly
(subnormal 2^-128 and 2^-127 included).
"""
from __future__ import annotations

import torch

from ..blocks import _nibbles_u8
from . import E8M0, LUT_MXFP4, MXFP4_VALUES, Q8_0, TypeSpec, register  # noqa: F401 (MXFP4_VALUES: kvalues_mxfp4)

MXFP4_OFFSET = 12  # added by the kernel's table so that the values are unsigned


def e8m0_scale(e: torch.Tensor) -> torch.Tensor:
    """uint8 exponents -> their float32 scale 2^(e - 128), bit for bit as ggml_e8m0_to_fp32_half builds it
    (e < 2: the subnormals 0x00200000 << e; otherwise (e - 1) << 23)."""
    e = e.to(torch.int32)
    return torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)


def e8m0_byte(s: torch.Tensor) -> torch.Tensor:
    """The exponent byte of scales 2^(e - 128) (e8m0_scale's inverse; anything else is an error)."""
    m, x = torch.frexp(s.float())  # s = m * 2^x with m = 0.5 for a power of two
    if not bool((m == 0.5).all()):
        raise ValueError("e8m0 scales must be powers of two")
    e = x.to(torch.int32) + 127
    if not bool(((e >= 0) & (e <= 255)).all()):
        raise ValueError("e8m0 scale out of range")
    return e.to(torch.uint8)


def _read_mxfp4(w, raw) -> dict:
    b = raw.reshape(-1, w.type.type_size)
    n = raw.shape[0]
    d = e8m0_scale(b[:, 0:1])
    return {"u": _nibbles_u8(b[:, 1:17]).reshape(n, -1), "dw": d.reshape(n, -1),
            "mw": (-MXFP4_OFFSET * d).reshape(n, -1)}


register(TypeSpec("MXFP4", "mxfp4", 4, 32, Q8_0, False, False, -float(MXFP4_OFFSET), _read_mxfp4, LUT_MXFP4 | E8M0))
