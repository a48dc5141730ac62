"""Q8_0 (dequantize_row_q8_0): 32 int8 values and an fp16 d; the values are used as they are."""
import torch

from .layout import Params, f16, planes

LAYOUTS = {"Q8_0": Params(LO_BITS=8)}


def pack(name: str, b, n_rows: int) -> dict:
    return planes(LAYOUTS[name], n_rows, b[:, 2:34].contiguous().view(torch.int8), f16(b, 0))
