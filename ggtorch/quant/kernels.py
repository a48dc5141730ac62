"""Fast kernels for QWeight, chosen per tensor type ("fast" mode; measured in shared/notes/perf-probes.md
and benchmarks/).

- With the JIT kernel (quant/qdot.py, jit.py, csrc/qdot.cpp; built on first use when a C++ compiler exists):
  every type in quant/types' table (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; IQ4_NL,
  IQ4_XS; IQ3_S, IQ3_XXS; IQ2_XXS, IQ2_XS, IQ2_S; IQ1_S, IQ1_M; MXFP4) keeps its block scales and multiplies
  int8-quantized activations the way llama.cpp does. The values keep the file's bits (IQ3_XXS, IQ2_XXS,
  IQ2_XS and IQ1_S their grid indices, looked up in the kernel; IQ3_S, IQ2_S and IQ1_M their grid entries
  decoded once into small indices of their signed values); the scales are float16 per
  group, except the K layout (K-quants, the 256-value i-quants), which keeps the file's int8 sub-block
  scales and mins with d and dmin per 256. For one token it takes
  half the time of PyTorch's int4 kernel at 1.1B shapes, and it drops the int8 per-row requantization
  below. Without the JIT library (or for the other types), PyTorch's kernels:
- Q4_0, Q4_1, Q4_K: repacked once for PyTorch's int4 weight-only matmul (`_weight_int4pack_mm_for_cpu`),
  which computes w = (q - 8) * scale + zero per 32-element group with bf16 activations. The maps are
  exact in real arithmetic: Q4_0 scale d, zero 0; Q4_1 scale d, zero m + 8d; Q4_K scale d*sc,
  zero 8*d*sc - dmin*m. 4.5 bits per weight, the same as the GGUF blocks.
- Every other quantized type (Q8_0, Q5_0, Q6_K, ...): requantized once to int8 with one scale per
  row for `_weight_int8pack_mm` (8 bits per weight, half a bf16 copy, 2.3x faster than bf16 for one
  token). This is the one approximate step: a block whose scale is far below its row's largest gets
  fewer levels (on SmolLM2's Q8_0 output matrix: 0.09 sigma largest logit error, KL 0.001). For
  many rows at once (prefill) the int8 rows are widened to bf16 and multiplied, which is faster there.
- Weights that read the same input (Q/K/V, FFN gate/up) are fused into one matrix when their kernels
  agree, so one call replaces two or three.
The exact path (float32 dequantize-and-multiply) is `--exact` / ``fast=False``.
"""
from __future__ import annotations

import torch

from .blocks import INT4_TYPES, _int4_parts_rows, _plane_parts
from .fused import REFINE_TOP, Fused, finish as _finish  # noqa: F401  (REFINE_TOP, Fused: model.repack reads them here)
from .linear import QWeight
from .qdot import QDOT_TYPES, _flags, _qdot_pack, qdot_kernel

PLANE_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q5_K")  # two int4 planes per weight (see _plane_parts)
INT8_MAX_ROWS = 16  # above this many activation rows, widen int8 to bf16 and use a GEMM
FORMAT = "14"  # the repacked layout's version: bump when what install() stores changes (keys the repack cache)


def repack_format() -> str:
    """FORMAT plus whether the JIT kernel is in use (the stored state differs)."""
    from . import jit

    return FORMAT + ("-qdot" if jit.available() else "")


def int4_kernel(x: torch.Tensor, w) -> torch.Tensor:
    shape = x.shape
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), w.state["packed"], 32,
                                          w.state["sz"])
    return _finish(y, x, w)


def planes_kernel(x: torch.Tensor, w) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(torch.cat((x2, x2), 1), w.state["packed"], 32, w.state["sz"])
    return _finish(y, x, w)


def _pack(parts, w: QWeight, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """int4-pack ``parts(w, raw rows)`` a chunk of rows at a time (the int32 temporaries stay small);
    chunks are multiples of 64 rows, the packed layout's row block, so they concatenate."""
    packed, sz = [], []
    for i in range(0, w.out_features, chunk):
        q, s, z = parts(w, w.raw[i:i + chunk])
        packed.append(_int4pack(q))
        sz.append(torch.stack((s.T.to(torch.bfloat16), z.T.to(torch.bfloat16)), dim=-1))
        if w.release is not None:
            w.release(i * w.row_bytes, (i + chunk) * w.row_bytes)
    return torch.cat(packed), torch.cat(sz, dim=1).contiguous()


def _int4pack_bytes(q: torch.Tensor) -> torch.Tensor:
    """PyTorch's CPU int4 layout with AVX-512 (weight_to_int4pack_kernel), written with byte ops: per
    64-row block and column k, 32 bytes; byte d < 16 holds rows d and d+32, byte 16+d rows 16+d and
    48+d (low nibble first). 10x less memory traffic than the int32 input the converter takes."""
    N, K = q.shape
    u = q.to(torch.uint8).view(N // 64, 4, 16, K)
    b = torch.cat((u[:, 0] | (u[:, 2] << 4), u[:, 1] | (u[:, 3] << 4)), dim=1)  # [N/64, 32, K]
    return b.transpose(1, 2).contiguous().view(N, K // 2)


def _byte_packing_matches() -> bool:
    """Whether _int4pack_bytes reproduces this build's converter (checked once, on a random matrix)."""
    global _BYTES_OK
    if _BYTES_OK is None:
        q = torch.randint(0, 16, (128, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        _BYTES_OK = torch.equal(_int4pack_bytes(q), torch._convert_weight_to_int4pack_for_cpu(q, 1))
    return _BYTES_OK


_BYTES_OK = None


def _int4pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> the packed weight for _weight_int4pack_mm_for_cpu."""
    if q.shape[0] % 64 == 0 and _byte_packing_matches():
        return _int4pack_bytes(q)
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def int8_kernel(x: torch.Tensor, w) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    q, s = w.state["q8"], w.state["s8"]
    if x2.shape[0] <= INT8_MAX_ROWS:
        y = torch._weight_int8pack_mm(x2, q, s)
    else:  # y = (x @ q^T) * s, the same product with the int8 rows widened once per call
        y = (x2 @ q.to(torch.bfloat16).T) * s
    return _finish(y, x, w)


def _int8_rows(w: QWeight, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Requantize to int8 [N, K] with one bf16 scale per row (round to nearest, symmetric)."""
    q = torch.empty(w.out_features, w.in_features, dtype=torch.int8)
    s = torch.empty(w.out_features, dtype=torch.bfloat16)
    for i in range(0, w.out_features, chunk):
        rows = w.dequantize(slice(i, i + chunk))
        sc = (rows.abs().amax(1) / 127).to(torch.bfloat16)
        safe = torch.where(sc > 0, sc.float(), torch.ones_like(sc, dtype=torch.float32))
        q[i:i + chunk] = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        s[i:i + chunk] = sc
        if w.release is not None:  # a big matrix's file pages go as its int8 copy grows
            w.release(i * w.row_bytes, (i + chunk) * w.row_bytes)
    return q, s


def install(w: QWeight, planes: bool = True, qdot: bool = True) -> None:
    """Give ``w`` its fast kernel (on CPU), then let the file's pages of the repacked bytes go."""
    if w.dense is not None or w.device.type != "cpu" or w.kernel is not None:
        return
    if qdot and w.type.name in QDOT_TYPES:
        from . import jit

        if jit.available():
            w.state = _qdot_pack(w)
            w.kernel = qdot_kernel
            if w.release is not None:
                w.release()
            return
    # the int4 layout needs whole 32-value groups and rows in multiples of 16 (the converter's rule)
    int4 = w.in_features % 32 == 0 and w.out_features % 16 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu")
    if w.type.name in INT4_TYPES and int4:
        w.state["packed"], w.state["sz"] = _pack(_int4_parts_rows, w)
        w.kernel = int4_kernel
    elif w.type.name in PLANE_TYPES and int4 and planes:
        w.state["packed"], w.state["sz"] = _pack(_plane_parts, w)
        w.kernel = planes_kernel
    else:
        w.state["q8"], w.state["s8"] = _int8_rows(w)
        w.kernel = int8_kernel
    if w.release is not None:
        w.release()


def trim_heap() -> None:
    """glibc keeps freed heap memory for reuse; malloc_trim returns whole free pages to the OS."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def fuse(ws: list[QWeight]) -> Fused | None:
    """One matrix for weights that share an input and a kernel; None when they cannot be fused."""
    if any(w is None or w.kernel not in (int4_kernel, planes_kernel, int8_kernel, qdot_kernel) for w in ws):
        return None
    if len({w.kernel for w in ws}) != 1 or len({w.in_features for w in ws}) != 1:
        return None
    if ws[0].kernel is qdot_kernel and (any(w.out_features % 16 for w in ws) or len(
            {(w.state["qw"].shape[1], w.state["dw"].shape[1], "mw" in w.state, "sc" in w.state, "mn" in w.state,
              float(w.state["zoff"]), int(w.state["amode"]), _flags(w.state)) for w in ws}) != 1):
        return None  # one layout (bits, group) per matrix, and parts of whole 16-row tiles
    if ws[0].kernel in (int4_kernel, planes_kernel) and any(w.out_features % 64 for w in ws):
        return None  # the CPU int4 packing interleaves rows in blocks of 64: packed parts only concatenate whole blocks
    f = Fused(ws)
    for w in ws:  # the parts' own copies are no longer needed
        w.state, w.kernel = {}, None
    return f


KERNELS_BY_NAME = {"int4": int4_kernel, "int4x2": planes_kernel, "int8": int8_kernel, "qdot": qdot_kernel}
KERNEL_NAMES = {k: n for n, k in KERNELS_BY_NAME.items()}
