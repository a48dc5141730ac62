"""LoRA adapters on GGUF models: load llama.cpp's adapter GGUF or PEFT's directory (adapter.py), apply the
low-rank term beside the quantized products (apply.py), merge into a new GGUF (export.py), and train new
adapters on the quantized base (train.py)."""
from __future__ import annotations

import os

from ..errors import LoRAError
from .adapter import Adapter, load_adapter
from .apply import attach


def resolve(specs, net) -> list[tuple[Adapter, float]]:
    """[(Adapter, scale)] from a list of paths, (path, scale) pairs or Adapter objects (scale 1 by default)."""
    out = []
    for spec in specs or []:
        if isinstance(spec, (str, os.PathLike, Adapter)):
            spec = (spec, 1.0)
        try:
            src, scale = spec
            scale = float(scale)
        except (TypeError, ValueError):
            raise LoRAError(f"a LoRA adapter is a path or a (path, scale) pair, got {spec!r}") from None
        out.append((src if isinstance(src, Adapter) else load_adapter(src, net), scale))
    return out


def install(net, specs) -> list[tuple[Adapter, float]]:
    """Load and attach ``specs`` (see :func:`resolve`) on the network ``net``; returns what was attached."""
    ads = resolve(specs, net)
    attach(net, ads)
    return ads


__all__ = ["Adapter", "load_adapter", "attach", "install", "resolve"]
