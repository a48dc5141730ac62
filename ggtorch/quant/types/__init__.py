"""One table of the quantized types the JIT kernel multiplies: how each family's blocks are read,
laid out and multiplied (csrc/qdot.cpp's layout comment says what the fields mean).

Each family has one module here (``legacy`` for the 32-value types Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, ``kquants``
for Q2_K..Q6_K, ``iq4`` for IQ4_NL/IQ4_XS, ``iq3`` for IQ3_S) that registers a :class:`TypeSpec` per type: the width of its
stored unsigned values, its scale group, how llama.cpp quantizes the activations it multiplies (its
type_traits vec_dot_type), its offset, its layout flags, and a PyTorch reader of the file's blocks (the
reference the C++ repack in csrc/repack.cpp is held to, byte for byte). The linear layer's kernel
choice (quant/kernels.py), the repack (quant/qdot.py), the one-call step (through the kernel it
installs) and the benchmark read :data:`TYPES`. Adding a type: a spec in its family's module (or a new
module imported below), its block loop in csrc/repack.cpp, and a test.

Imports point one way: types -> blocks/dequant; nothing here imports qdot or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# activation quantization modes (csrc/qdot.cpp qdot_quantize): llama.cpp's Q8_0, Q8_1, Q8_K
Q8_0, Q8_1, Q8_K = 0, 1, 2
# layout flags (csrc/qdot.h)
LUT_IQ4 = 1  # 4-bit values are indices into kvalues_iq4nl; the kernel looks them up with a byte shuffle
SM4 = 2  # K layout whose sc byte holds the file's scale | min << 4 (Q2_K)

IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


@dataclass(frozen=True)
class TypeSpec:
    """One GGUF type in the JIT kernel's layout.

    bits: width of the stored unsigned values u (2, 3, 4, 5, 6 or 8); G: values per scale group.
    amode: the activation quantization llama.cpp pairs with the type (Q8_0, Q8_1 or Q8_K).
    klayout: the two-level scales of K-quants (int8 sc per group, float16 d per 256 values) instead of a
    float16 scale per group. mins: an offset per group is stored (mw, or mn/-dmin in the K layout);
    without it the value is scale * (u + zoff). flags: LUT_IQ4, SM4.
    read(w, raw rows) -> dict: the exact parts, {"u", "dw", "mw"} (value = dw * u + mw per group) or,
    for the K layout, {"u", "sc", "mn", "d", "dm"} (value = d * sc * (u + zoff) + dm * mn).
    """
    name: str
    family: str
    bits: int
    G: int
    amode: int
    klayout: bool
    mins: bool
    zoff: float
    read: Callable
    flags: int = 0
    grid: str | None = None  # the iq_grids.npz table csrc/repack.cpp decodes the blocks with

    @property
    def block(self) -> int:
        """Values per file block (what a row length must be a multiple of)."""
        return 256 if self.klayout else 32


TYPES: dict[str, TypeSpec] = {}


def register(spec: TypeSpec) -> TypeSpec:
    TYPES[spec.name] = spec
    return spec


def spec(name: str) -> TypeSpec | None:
    return TYPES.get(name)


_GRIDS: dict = {}


def grid_bytes(name: str):
    """An i-quant grid as contiguous uint8 [entries, values] (csrc/repack.cpp reads it by pointer)."""
    if name not in _GRIDS:
        import os

        import numpy as np
        import torch

        g = np.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "iq_grids.npz"))[name]
        _GRIDS[name] = torch.from_numpy(np.ascontiguousarray(g.astype(np.uint8)))
    return _GRIDS[name]


from . import iq3, iq4, kquants, legacy  # noqa: E402,F401  (each registers its types)
