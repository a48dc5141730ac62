"""Fast kernels for QWeight, chosen per tensor type ("fast" mode).

- Q4_0, Q4_1, Q4_K: repacked once for PyTorch's int4 weight-only matmul (`_weight_int4pack_mm_for_cpu`),
  which computes w = (q - 8) * scale + zero per 32-element group with bf16 activations. The maps are
  exact in real arithmetic: Q4_0 scale d, zero 0; Q4_1 scale d, zero m + 8d; Q4_K scale d*sc,
  zero 8*d*sc - dmin*m. 4.5 bits per weight, the same as the GGUF blocks.
- Every other quantized type: dequantized once to bf16 and multiplied in bf16.
The exact path (float32 dequantize-and-multiply) stays the default; see docs in README.
"""
from __future__ import annotations

import torch

from .dequant import _f16, _k_scale_min, _nibbles
from .linear import QWeight

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _int4_parts(w: QWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K] int32 in 0..15, scale and zero [N, K/32] float32."""
    N, K, t = w.out_features, w.in_features, w.type.name
    b = w.raw.reshape(-1, w.type.type_size)
    if t in ("Q4_0", "Q4_1"):
        at = 2 if t == "Q4_0" else 4
        q = _nibbles(b[:, at:at + 16]).reshape(-1, 32)
        d = _f16(b, 0)
        z = torch.zeros_like(d) if t == "Q4_0" else _f16(b, 2) + 8 * d
        return q.reshape(N, K), d.reshape(N, K // 32), z.reshape(N, K // 32)
    # Q4_K: 8 sub-blocks of 32 per 256-element block
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    s = d * sc.float()
    z = 8 * s - dmin * mn.float()
    q = _nibbles(b[:, 16:144].reshape(n * 4, 32)).reshape(n, 256)
    return q.reshape(N, K), s.reshape(N, K // 32), z.reshape(N, K // 32)


def int4_kernel(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    shape = x.shape
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), w.state["packed"], 32,
                                          w.state["sz"])
    return y.float().reshape(*shape[:-1], w.out_features)


def bf16_kernel(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    return (x.to(torch.bfloat16) @ w.state["bf16"].T).float()


def install(w: QWeight) -> None:
    """Give ``w`` its fast kernel (on CPU)."""
    if w.dense is not None or w.device.type != "cpu":
        return
    if w.type.name in INT4_TYPES and w.in_features % 32 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        q, s, z = _int4_parts(w)
        w.state["packed"] = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        w.state["sz"] = torch.stack((s.T, z.T), dim=-1).contiguous().to(torch.bfloat16)
        w.kernel = int4_kernel
    else:
        w.state["bf16"] = w.dequantize().to(torch.bfloat16)
        w.kernel = bf16_kernel
