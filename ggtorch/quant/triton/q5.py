"""Q5_0 and Q5_1 (dequantize_row_q5_0/q5_1): 4-bit low parts and a 32-bit word of fifth bits (bit j
belongs to value j), fp16 d (and m for Q5_1)."""
import torch

from .layout import Params, f16, nibbles32, planes

LAYOUTS = {
    "Q5_0": Params(LO_BITS=4, HI_BITS=1, OFF=16),   # d * (q - 16)
    "Q5_1": Params(LO_BITS=4, HI_BITS=1, HAS_M=True),  # d * q + m
}


def _codes(b, qh_at: int, qs_at: int) -> torch.Tensor:
    qh = b[:, qh_at:qh_at + 4].to(torch.int32)
    word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    high = (word[:, None] >> torch.arange(32, device=b.device, dtype=torch.int32)) & 1
    return nibbles32(b[:, qs_at:qs_at + 16]) | (high.to(torch.uint8) << 4)


def pack(name: str, b, n_rows: int) -> dict:
    p = LAYOUTS[name]
    if name == "Q5_0":  # d, qh, qs[16]
        return planes(p, n_rows, _codes(b, 2, 6), f16(b, 0))
    return planes(p, n_rows, _codes(b, 4, 8), f16(b, 0), m=f16(b, 2))  # d, m, qh, qs[16]
