"""Q4_0 and Q4_1 (ggml-quants.c dequantize_row_q4_0/q4_1): 32 values a block, 4-bit codes, fp16 d
(and m for Q4_1)."""
from .layout import Params, f16, nibbles32, planes

LAYOUTS = {
    "Q4_0": Params(LO_BITS=4, OFF=8),                # d * (q - 8)
    "Q4_1": Params(LO_BITS=4, HAS_M=True),           # d * q + m
}


def pack(name: str, b, n_rows: int) -> dict:
    p = LAYOUTS[name]
    if name == "Q4_0":  # d, qs[16]
        return planes(p, n_rows, nibbles32(b[:, 2:18]), f16(b, 0))
    return planes(p, n_rows, nibbles32(b[:, 4:20]), f16(b, 0), m=f16(b, 2))  # d, m, qs[16]
