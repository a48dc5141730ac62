"""The K-quants, 256 values a super-block (dequantize_row_q2_K ... q6_K): fp16 d (and dmin) per 256,
small integer scales (and mins) per sub-block of 16 or 32, which stay integers in the GPU layout."""
import torch

from ..dequant import _k_scale_min
from .layout import Params, f16, nibbles32, planes

LAYOUTS = {
    "Q2_K": Params(LO_BITS=2, SB=256, G=16, HAS_SC=True, HAS_M=True, HAS_MN=True, MIN_SUB=True),
    "Q3_K": Params(LO_BITS=2, HI_BITS=1, OFF=4, SB=256, G=16, HAS_SC=True),
    "Q4_K": Params(LO_BITS=4, SB=256, G=32, HAS_SC=True, HAS_M=True, HAS_MN=True, MIN_SUB=True),
    "Q5_K": Params(LO_BITS=4, HI_BITS=1, SB=256, G=32, HAS_SC=True, HAS_M=True, HAS_MN=True, MIN_SUB=True),
    "Q6_K": Params(LO_BITS=4, HI_BITS=2, OFF=32, SB=256, G=16, HAS_SC=True),
}


def _crumbs(q: torch.Tensor) -> torch.Tensor:
    """[n, 32·h] bytes -> [n, 128·h]: per 32 bytes, bits 0-1 of each, then bits 2-3, 4-5, 6-7 (ggml's
    order for 2-bit fields: Q2_K/Q3_K values, Q6_K high bits)."""
    n = q.shape[0]
    q = q.reshape(n, -1, 1, 32)
    return ((q >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device).reshape(1, 1, 4, 1)) & 3).reshape(n, -1)


def _bitplanes(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] bytes -> [n, 256]: value 32·j + l takes bit j of byte l (hmask of Q3_K, qh of Q5_K)."""
    bits = (q[:, :, None] >> torch.arange(8, dtype=torch.uint8, device=q.device)) & 1  # [n, l, j]
    return bits.transpose(1, 2).reshape(q.shape[0], 256)


def pack(name: str, b, n_rows: int) -> dict:
    p = LAYOUTS[name]
    if name == "Q2_K":  # scales[16] (scale | min << 4), qs[64], d, dmin
        sc = b[:, 0:16]
        return planes(p, n_rows, _crumbs(b[:, 16:80]), f16(b, 80), sc=sc & 0xF, m=f16(b, 82), mn=sc >> 4)
    if name == "Q3_K":  # hmask[32], qs[64], scales[12] (16 six-bit values), d
        lo, hi = b[:, 96:104], b[:, 104:108]
        lsc = torch.cat((lo & 0xF, lo >> 4), dim=1)
        hsc = ((hi[:, None, :] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[None, :, None]) & 3)
        sc = ((lsc | (hsc.reshape(-1, 16) << 4)).to(torch.int16) - 32).to(torch.int8)
        codes = _crumbs(b[:, 32:96]) | (_bitplanes(b[:, 0:32]) << 2)  # a set hmask bit adds 4: q - 4 + 4h
        return planes(p, n_rows, codes, f16(b, 108), sc=sc)
    if name in ("Q4_K", "Q5_K"):  # d, dmin, scales[12] (get_scale_min_k4), [qh[32]], qs[128]
        sc, mn = _k_scale_min(b[:, 4:16])
        if name == "Q4_K":
            codes = nibbles32(b[:, 16:144], chunk=32)
        else:
            codes = nibbles32(b[:, 48:176], chunk=32) | (_bitplanes(b[:, 16:48]) << 4)
        return planes(p, n_rows, codes, f16(b, 0), sc=sc.to(torch.uint8), m=f16(b, 2), mn=mn.to(torch.uint8))
    # Q6_K: ql[128], qh[64], scales[16] int8, d; per 128 values: ql's low nibbles of 64 bytes, then high
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    ql = torch.cat((ql & 0xF, ql >> 4), dim=2).reshape(n, 256)
    codes = ql | (_crumbs(b[:, 128:192]) << 4)
    return planes(p, n_rows, codes, f16(b, 208), sc=b[:, 192:208].contiguous().view(torch.int8))
