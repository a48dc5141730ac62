"""Weights kept in their GGUF form, and the per-type matmul dispatch.

A :class:`QWeight` holds a 2-D GGUF tensor as raw blocks (a zero-copy view of the file until it is
moved to another device) plus its type. ``qmatmul(x, w)`` computes ``x @ W.T`` (W is [out, in], the
reverse of GGUF's [in, out] listing) through the kernel registered for the weight's type; the
fallback dequantizes row chunks and multiplies in float32. Kernels register in ``KERNELS``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import QuantError
from ..gguf.types import GGMLType
from .dequant import DEQUANTIZERS, dequantize

FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


class QWeight:
    """A weight matrix [out, in] stored as GGUF blocks (or as float for float types)."""

    def __init__(self, raw: torch.Tensor, gtype: GGMLType, shape_gguf: tuple[int, ...], name: str = ""):
        if gtype.name not in DEQUANTIZERS:
            raise QuantError(f"tensor {name!r} has type {gtype.name}, which ggtorch cannot dequantize")
        self.name, self.type = name, gtype
        self.shape = tuple(reversed(shape_gguf))  # numpy/PyTorch order
        self.in_features = shape_gguf[0]
        self.out_features = int(np.prod(shape_gguf[1:])) if len(shape_gguf) > 1 else 1
        self.row_bytes = gtype.row_bytes(self.in_features)
        self.raw = raw.reshape(self.out_features, self.row_bytes)
        self.dense: torch.Tensor | None = None  # float32 [out, in] when the kernel keeps one
        self.kernel: Callable | None = None
        self.state: dict = {}
        self.refine_top = 0  # fast kernels: recompute this many largest outputs in float32 (the output matrix)
        self.release: Callable[..., None] | None = None  # (start, end) bytes: drop the file's pages once repacked
        if gtype.name in FLOAT_TYPES:
            # float weights: F32 is used in place; F16/BF16/F64 are widened once (exact)
            self.dense = dequantize(self.raw, gtype).reshape(self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def to(self, device) -> "QWeight":
        self.raw = self.raw.to(device)
        if self.dense is not None:
            self.dense = self.dense.to(device)
        self.state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.state.items()}
        return self

    def dequantize(self, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """float32 [n_rows, in] for the given rows (all when None)."""
        if self.dense is not None:
            return self.dense if rows is None else self.dense[rows]
        raw = self.raw if rows is None else self.raw[rows]
        return dequantize(raw, self.type).reshape(-1, self.in_features)

    def nbytes(self) -> int:
        n = self.raw.numel()
        if self.dense is not None and self.dense.data_ptr() != self.raw.data_ptr():
            n += self.dense.numel() * self.dense.element_size()
        return n + sum(v.numel() * v.element_size() for v in self.state.values() if torch.is_tensor(v))


# ---- kernels ---------------------------------------------------------------------------------
Kernel = Callable[[torch.Tensor, QWeight], torch.Tensor]
KERNELS: dict[str, Kernel] = {}  # ggml type name -> fast kernel, filled by quant.kernels
CHUNK_ROWS = 4096


def dequant_matmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """The exact fallback: dequantize row chunks of W to float32 and multiply."""
    if w.dense is not None:
        return x @ w.dense.T
    if w.out_features <= CHUNK_ROWS:
        return x @ w.dequantize().T
    out = torch.empty(*x.shape[:-1], w.out_features, dtype=torch.float32, device=x.device)
    for i in range(0, w.out_features, CHUNK_ROWS):
        j = min(w.out_features, i + CHUNK_ROWS)
        torch.matmul(x, w.dequantize(slice(i, j)).T, out=out[..., i:j])
    return out


def qmatmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out], through the weight's kernel, plus the LoRA adapters' low-rank
    terms when some are attached (``w.lora``, see ggtorch.lora.apply). With autograd on and an input
    that needs a gradient (LoRA training), the product is a :class:`QProduct`."""
    if torch.is_grad_enabled() and x.requires_grad:
        y = QProduct.apply(x, w)
    else:
        y = (w.kernel or dequant_matmul)(x, w)
    lo = getattr(w, "lora", None)
    return y if lo is None else lo(x, y)


class QProduct(torch.autograd.Function):
    """x @ W.T for a frozen quantized W with a gradient for x only: the forward runs the weight's
    kernel, the backward multiplies the output's gradient by W dequantized again, a chunk of rows at
    a time, so no float copy of W is ever kept for the backward pass (LoRA training on GGUF weights)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        with torch.no_grad():
            return (w.kernel or dequant_matmul)(x, w).float()

    @staticmethod
    def backward(ctx, gy):
        w = ctx.w
        if getattr(w, "dequantize", None) is None:
            raise QuantError("LoRA training needs the exact path (fused fast-mode matrices have no backward)")
        if w.dense is not None:
            return gy @ w.dense, None
        gx = None
        for i in range(0, w.out_features, CHUNK_ROWS):
            j = min(w.out_features, i + CHUNK_ROWS)
            part = gy[..., i:j] @ w.dequantize(slice(i, j))
            gx = part if gx is None else gx.add_(part)
        return gx, None


def embedding(ids: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Rows of a [n_vocab, n_embd] GGUF matrix (llama.cpp's ggml_get_rows): only those rows are dequantized."""
    return w.dequantize(ids)
