"""Merge LoRA adapters into a new GGUF model (llama.cpp's llama-export-lora).

Every adapted weight becomes ``W + sum_i s_i * B_i A_i`` computed in float32 from the dequantized base
(export-lora.cpp's merge graph; token_embd's transposed A gives ``W + s * A B^T``), stored in the chosen
type; every other tensor and all metadata are copied unchanged. Without ``out_type`` the merged tensors
are F32 where the base tensor is F32 and F16 otherwise, as llama-export-lora does.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import LoRAError
from ..gguf.reader import GGUFFile
from ..gguf.writer import GGUFWriter
from ..quant.dequant import dequantize
from .adapter import check, load_adapter

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}  # llama_ftype of a file whose merged tensors have this type


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """quantize_row_q8_0_ref: per 32 values d = amax / 127 (stored as F16), q = round(x / d) with
    roundf's ties away from zero. w [rows, cols] float32 -> raw blocks [rows, cols / 32 * 34] uint8."""
    rows, cols = w.shape
    if cols % 32:
        raise LoRAError(f"Q8_0 needs rows of whole 32-value blocks, got {cols} columns")
    g = w.reshape(rows, cols // 32, 32).double()
    d = g.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    x = g * inv[..., None]
    q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).to(torch.int8)
    out = np.empty((rows, cols // 32, 34), np.uint8)
    out[..., :2] = d.float().half().numpy().view(np.uint8).reshape(rows, cols // 32, 2)
    out[..., 2:] = q.numpy().view(np.uint8)
    return out.reshape(rows, -1)


def _encode(w: torch.Tensor, t: str):
    """(data, ggml type name) for the writer."""
    if t == "F32":
        return w.numpy().astype(np.float32), "F32"
    if t == "F16":
        return w.numpy().astype(np.float16), "F16"
    if t == "BF16":
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8), "BF16"
    return quantize_q8_0(w), "Q8_0"


def export_lora(model: str, adapters, out: str, out_type: str | None = None, progress=None) -> dict:
    """Write ``model`` with ``adapters`` ([(path or Adapter, scale)]) merged into ``out``; returns
    {"merged": n_tensors, "type": ...}. ``out_type``: f32, f16, bf16 or q8_0 for the merged tensors."""
    from . import resolve
    from ..model.config import Config

    if out_type is not None and out_type.lower() not in OUT_TYPES:
        raise LoRAError(f"--type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    if os.path.abspath(out) == os.path.abspath(model):
        raise LoRAError(f"{out}: the output must not overwrite the base model")
    f = GGUFFile(model)
    try:
        base = SimpleNamespace(cfg=Config.from_gguf(f), file=f)
        ads = resolve(adapters, base)
        if not ads:
            raise LoRAError("export-lora needs at least one adapter (--lora / --lora-scaled)")
        for ad, _ in ads:
            check(ad, base)
        names = {n for ad, _ in ads for n in ad.pairs}
        w = GGUFWriter()
        for k, v in f.metadata.items():
            if not k.startswith("split."):
                w.add(k, v, f.value_types[k])
        types = set()
        for i, ti in enumerate(f):
            if ti.name not in names:
                w.add_tensor(ti.name, f.raw(ti.name), ti.type, ti.shape)
                continue
            t = (out_type.upper() if out_type else ("F32" if ti.type_name == "F32" else "F16"))
            W = dequantize(f.raw(ti.name), ti.type).reshape(ti.numpy_shape).clone()
            for ad, user in ads:
                if ti.name in ad.pairs:
                    a, b = ad.pairs[ti.name]
                    s = ad.scale(ti.name, user)
                    W += s * (a @ b.T if ti.name == "token_embd.weight" else b @ a)
            data, tn = _encode(W, t)
            w.add_tensor(ti.name, data, tn, ti.shape)
            types.add(tn)
            if progress:
                progress(ti.name)
        if len(types) == 1:
            w.add("general.file_type", FILE_TYPES[types.pop()], f.value_types.get("general.file_type"))
        w.write(out)
    finally:
        f.close()
    return {"merged": len(names), "out": out}
