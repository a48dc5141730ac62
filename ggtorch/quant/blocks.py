"""GGUF blocks read into integers and per-group scales, the form every fast kernel starts from
(quant/kernels.py for PyTorch's int4/int8 kernels, quant/qdot.py for the JIT kernel). The block
layouts are ggml's (dequantize_row_q4_0 and kin); each reader returns exact integers and scales, so a
kernel's map from them is exact before its own rounding."""
from __future__ import annotations

import torch

from .dequant import _bits, _f16, _k_scale_min, _nibbles, _q5
from .linear import QWeight

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # one nibble a value


def _int4_parts(w: QWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] int32 in 0..15, scale and zero [N, K/32] float32."""
    return _int4_parts_rows(w, w.raw)


def _nibbles_u8(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] uint8: low nibbles, then high nibbles (ggml's q4 order), no widening."""
    return torch.cat((qs & 15, qs >> 4), dim=1)


def _int4_parts_rows(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K, t = raw.shape[0], w.in_features, w.type.name
    b = raw.reshape(-1, w.type.type_size)
    if t in ("Q4_0", "Q4_1"):
        at = 2 if t == "Q4_0" else 4
        q = _nibbles_u8(b[:, at:at + 16])
        d = _f16(b, 0)
        z = torch.zeros_like(d) if t == "Q4_0" else _f16(b, 2) + 8 * d
        return q.reshape(N, K), d.reshape(N, K // 32), z.reshape(N, K // 32)
    # Q4_K: 8 sub-blocks of 32 per 256-element block
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    s = d * sc.float()
    z = 8 * s - dmin * mn.float()
    q = _nibbles_u8(b[:, 16:144].reshape(n * 4, 32)).reshape(n, 256)
    return q.reshape(N, K), s.reshape(N, K // 32), z.reshape(N, K // 32)


def _affine_parts(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the types with one scale per 32 values: integers q [n, K] and a, b [n, K/32] float32 with
    value = a * q + b, read from the blocks (ggml's dequantize_row_q8_0 / q5_0 / q5_1 / q5_K)."""
    t, K = w.type.name, w.in_features
    b = raw.reshape(-1, w.type.type_size)
    if t == "Q8_0":
        q, a = b[:, 2:34].contiguous().view(torch.int8).to(torch.int32), _f16(b, 0)
        off = torch.zeros_like(a)
    elif t == "Q5_0":
        q, a = _q5(b, 2, 6), _f16(b, 0)
        off = -16 * a
    elif t == "Q5_1":
        q, a, off = _q5(b, 4, 8), _f16(b, 0), _f16(b, 2)
    else:  # Q5_K: 8 groups of 32 per 256-element block, 6-bit scales and mins
        n = b.shape[0]
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scale_min(b[:, 4:16])
        a, off = d * sc.float(), -dmin * mn.float()
        q = _q5k_values(b)
    rows = raw.shape[0]
    return q.reshape(rows, K), a.reshape(rows, K // 32), off.reshape(rows, K // 32)


def _plane_parts(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights as two int4 planes side by side, [hi | lo] along K, for the int4 kernel: with
    q = 16 hi + lo (lo in 0..15, hi in -8..7), a*q + b = (hi + 8 - 8) * 16a + ((lo - 8) * a + 8a + b).
    So x @ W.T = [x, x] @ [H, L].T with H's groups scaled 16a (zero 0) and L's scaled a (zero 8a + b):
    the file's block scales are kept, and the product is exact before bf16 rounding (16a and 8a are
    a's bf16 rounding times a power of two)."""
    q, a, b = _affine_parts(w, raw)
    hi, lo = ((q >> 4) + 8).to(torch.uint8), (q & 15).to(torch.uint8)
    return (torch.cat((hi, lo), 1), torch.cat((16 * a, a), 1), torch.cat((torch.zeros_like(a), 8 * a + b), 1))


def _q6k_values(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [n, 210] -> the unsigned 6-bit values [n, 256] uint8 in order (ql low/high nibbles, qh pairs)."""
    from .dequant import _shifts

    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    ql = torch.cat((ql & 0xF, ql >> 4), dim=2).reshape(n, 8, 32)
    qh = b[:, 128:192].to(torch.int32).reshape(n, 2, 1, 32)
    qh = ((qh >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3).to(torch.uint8).reshape(n, 8, 32)
    return (ql | (qh << 4)).reshape(n, 256)


def _q5k_values(b: torch.Tensor) -> torch.Tensor:
    """Q5_K blocks [n, 176] -> the 5-bit values [n, 256] int32 (low nibbles at 48, high bits at 16)."""
    n = b.shape[0]
    ql = _nibbles(b[:, 48:176].reshape(n * 4, 32)).reshape(n, 8, 32)
    return (ql | (_bits(b[:, 16:48], 8).transpose(1, 2) << 4)).reshape(n, 256)


def _q6k_parts(w: QWeight, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K as u [n, K] in 0..63 with a = d*sc per 16 values and b = -32a (ggml's dequantize_row_q6_K)."""
    n = raw.numel() // w.type.type_size
    b = raw.reshape(n, w.type.type_size)
    u = _q6k_values(b)
    a = _f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    rows = raw.shape[0]
    return u.reshape(rows, -1), a.reshape(rows, -1), (-32 * a).reshape(rows, -1)
