"""The GPU layout the Triton kernels read, made once at load from a weight's GGUF blocks.

Every supported type is written as the same few row-major planes, so one kernel template serves them
all (the type picks its compile-time constants):

    code[n, k]  = lo[n, k] | hi[n, k] << LO_BITS      (LO_BITS 2, 4 or 8; HI_BITS 0, 1 or 2)
    value       = table[code]  (IQ4)   or   code - OFF
    scale[n, k] = d[n, k // SB] * sc[n, k // G]   (sc only for K-quants and IQ4_XS)
    min[n, k]   = m[n, k // SB] * mn[n, k // G]   (mn only for K-quants)
    w[n, k]     = scale * value  (+ min for Q4_1/Q5_1, - min for K-quants)

``lo``/``hi`` pack 8 // BITS consecutive codes of a row per byte, lowest bits first (Q8_0 keeps its
int8 values as they are). ``d`` and ``m`` keep the file's fp16 scales; the K-quants' 4/6-bit sub-block
scales and mins stay small integers, so the planes hold as many bytes as the blocks (Q4_0: 4.5 bits a
weight, Q4_K: 4.5, Q6_K: 6.56) and each product is the one ggml's dequantize_row_* computes, in the
same order: the kernels' weights equal ggtorch.quant.dequant's float32 values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Params:
    """The compile-time constants of one type's layout (the kernel's constexpr arguments)."""
    LO_BITS: int
    HI_BITS: int = 0
    OFF: int = 0
    SB: int = 32          # values per d (and m)
    G: int = 32           # values per sc (and mn)
    HAS_SC: bool = False
    HAS_M: bool = False
    HAS_MN: bool = False
    MIN_SUB: bool = False  # K-quants subtract their min; Q4_1/Q5_1 add theirs
    TABLE: bool = False    # IQ4: value = kvalues_iq4nl[code]


PLANES = ("lo", "hi", "d", "sc", "m", "mn")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (each < 2**bits) -> [N, K * bits / 8], 8 // bits codes a byte, lowest first."""
    per = 8 // bits
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // per, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (j * bits)
    return out.contiguous()


def planes(params: Params, n_rows: int, codes: torch.Tensor, d: torch.Tensor, sc=None, m=None, mn=None) -> dict:
    """The state tensors of a layout from per-block pieces: ``codes`` [n_blocks, block_size] (uint8, or
    int8 when LO_BITS is 8), ``d``/``m`` [n_blocks, block_size // SB], ``sc``/``mn`` [n_blocks, block_size // G]."""
    codes = codes.reshape(n_rows, -1)
    st = {}
    if params.LO_BITS == 8:
        st["lo"] = codes.contiguous()
    else:
        lo = codes & ((1 << params.LO_BITS) - 1) if params.HI_BITS else codes
        st["lo"] = pack_bits(lo, params.LO_BITS)
    if params.HI_BITS:
        st["hi"] = pack_bits(codes >> params.LO_BITS, params.HI_BITS)
    st["d"] = d.reshape(n_rows, -1).contiguous()
    for name, t in (("sc", sc), ("m", m), ("mn", mn)):
        if t is not None:
            st[name] = t.reshape(n_rows, -1).contiguous()
    return st


def f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of each block, kept as fp16 [n, 1] (the kernel widens it, exactly)."""
    return b[:, at:at + 2].contiguous().view(torch.float16)


def nibbles32(q: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """[n, chunk·j] bytes -> [n, 2·chunk·j] codes: per ``chunk`` bytes, the low nibbles then the high
    ones (ggml's order: 16-byte chunks in the 32-value types, 32-byte ones in Q4_K/Q5_K)."""
    n = q.shape[0]
    q = q.reshape(n, -1, chunk)
    return torch.cat((q & 0xF, q >> 4), dim=2).reshape(n, -1)
