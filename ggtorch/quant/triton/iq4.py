"""IQ4_NL and IQ4_XS (dequantize_row_iq4_nl/iq4_xs): 4-bit indices into kvalues_iq4nl; IQ4_NL has an
fp16 d per 32 values, IQ4_XS an fp16 d per 256 and a 6-bit scale (minus 32) per 32."""
import torch

from .layout import Params, f16, nibbles32, planes

LAYOUTS = {
    "IQ4_NL": Params(LO_BITS=4, TABLE=True),
    "IQ4_XS": Params(LO_BITS=4, TABLE=True, SB=256, G=32, HAS_SC=True),
}
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


def pack(name: str, b, n_rows: int) -> dict:
    p = LAYOUTS[name]
    if name == "IQ4_NL":  # d, qs[16]
        return planes(p, n_rows, nibbles32(b[:, 2:18]), f16(b, 0))
    # d, scales_h (u16: 2 high bits per sub-block), scales_l[4] (4 low bits per sub-block), qs[128]
    n = b.shape[0]
    sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    sl = b[:, 4:8].to(torch.int32)
    low = torch.stack((sl & 0xF, sl >> 4), dim=2).reshape(n, 8)  # sub-block j: byte j//2, nibble j%2
    high = (sh[:, None] >> (2 * torch.arange(8, dtype=torch.int32, device=b.device))) & 3
    sc = ((low | (high << 4)) - 32).to(torch.int8)
    return planes(p, n_rows, nibbles32(b[:, 8:136]), f16(b, 0), sc=sc)
