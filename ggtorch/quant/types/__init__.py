"""One table of the quantized types the JIT kernel multiplies: how each family's blocks are read,
laid out and multiplied (csrc/qdot.cpp's layout comment says what the fields mean).

Each family has one module here (``legacy`` for the 32-value types Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, ``kquants``
for Q2_K..Q6_K, ``iq4`` for IQ4_NL/IQ4_XS, ``iq3`` for IQ3_S/IQ3_XXS, ``iq2`` for IQ2_XXS/IQ2_XS/IQ2_S,
``iq1`` for IQ1_S/IQ1_M, ``mxfp4`` for MXFP4) that registers a :class:`TypeSpec` per type: the width of its
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
LUT_IQ3XXS = 4  # 4-bit index | sign << 3 into IQ3_XXS's 8 grid levels (LUTS below)
LUT_IQ2 = 8  # 3-bit index | sign << 2 into the iq2 grids' 3 levels
LUT_IQ1M = 16  # 3-bit (g + 1) | delta sign << 2 -> 8 g +- 1 (IQ1_M)
IQ1S = 32  # 2-bit g + 1; the sc byte holds ls | delta sign << 3 (IQ1_S)
LUT_MXFP4 = 64  # 4-bit values are indices into kvalues_mxfp4 (MXFP4), looked up like LUT_IQ4
LUT_IQ3S = 2048  # 4-bit v -> 2 v (IQ3_S: the signed odd magnitude s * g = 2 v - 15, an integer offset)
E8M0 = 128  # dw holds each group's e8m0 exponent byte (uint8), the scale being 2^(e - 128) (MXFP4)
GRIDL = 4096  # the grid layout: the file's grid indices kept (TypeSpec.glayout; csrc/tiles.h)
# grid layout codes (csrc/qdot.h), in QWeight's bits: what a tile's group holds for each type
G_IQ1S, G_IQ2XXS, G_IQ2XS, G_IQ3XXS, G_IQ2S, G_IQ1M, G_IQ3S = 9, 10, 11, 12, 13, 14, 15


def oshift(n: int) -> int:
    """The flags bits for a factor 2^-n on d (llama.cpp's final * 0.25 or * 0.125 of the i-quants' sums)."""
    return n << 8


def oscale(flags: int) -> float:
    return 2.0 ** -((flags >> 8) & 7)


IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
IQ3XXS_LEVELS = (4, 12, 20, 28, 36, 44, 52, 62)  # the magnitudes in iq3xxs_grid
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # kvalues_mxfp4 (e2m1 doubled)
IQ2_LEVELS = (8, 25, 43)  # the magnitudes in iq2xxs_grid, iq2xs_grid and iq2s_grid
# What the kernel's byte shuffle makes of a stored index (csrc/qdot.cpp's tables hold the same numbers):
# the signed value plus the offset that makes it unsigned (= -zoff); unused indices give the offset.
LUTS = {
    LUT_IQ4: tuple(v + 128 for v in IQ4NL_VALUES),
    LUT_IQ3XXS: tuple(62 + v for v in IQ3XXS_LEVELS) + tuple(62 - v for v in IQ3XXS_LEVELS),
    LUT_IQ2: tuple(43 + v for v in IQ2_LEVELS) + (43,) + tuple(43 - v for v in IQ2_LEVELS) + (43,) * 9,
    LUT_MXFP4: tuple(v + 12 for v in MXFP4_VALUES),
    LUT_IQ3S: tuple(2 * v for v in range(16)),
    LUT_IQ1M: tuple(9 + 8 * g + 1 for g in (-1, 0, 1)) + (9,) + tuple(9 + 8 * g - 1 for g in (-1, 0, 1)) + (9,) * 9,
}


def lut(flags: int):
    """The table (16 unsigned values) a type's stored indices go through in the kernel, or None."""
    return next((v for f, v in LUTS.items() if flags & f), None)


@dataclass(frozen=True)
class TypeSpec:
    """One GGUF type in the JIT kernel's layout.

    bits: width of the stored unsigned values u (2, 3, 4, 5, 6 or 8); G: values per scale group.
    amode: the activation quantization llama.cpp pairs with the type (Q8_0, Q8_1 or Q8_K).
    klayout: the two-level scales of K-quants (int8 sc per group, float16 d per 256 values) instead of a
    float16 scale per group. mins: an offset per group is stored (mw, or mn/-dmin in the K layout);
    without it the value is scale * (u + zoff). flags: LUT_*, SM4, IQ1S and oshift(n).
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
    glayout: int = 0  # a grid layout code (G_*): the grid indices are kept and unpacked by the kernel

    @property
    def lbits(self) -> int:
        """What the layout's ``bits`` field holds: the value width, or the grid layout code."""
        return self.glayout or self.bits

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


def grid_codes(name: str):
    """A grid's entries as the layouts store their values before the kernel's table: uint8 [entries, 4 or 8]
    (IQ3_XXS: level index (g - 4) / 8; IQ3_S: (g + 15) / 2; IQ2_*: 0/1/2 for 8/25/43; IQ1_S/IQ1_M: g + 1), as
    csrc/repack.cpp's grid_tables() makes them."""
    import torch

    g = grid_bytes(name).to(torch.int32)
    if name == "IQ3_XXS":
        return ((g - 4) >> 3).to(torch.uint8)
    if name == "IQ3_S":
        return ((g + 15) >> 1).to(torch.uint8)
    if name.startswith("IQ1"):
        return (g.to(torch.uint8).view(torch.int8).to(torch.int32) + 1).to(torch.uint8)
    return ((g > 8).to(torch.int32) + (g > 25).to(torch.int32)).to(torch.uint8)


from . import iq1, iq2, iq3, iq4, kquants, legacy, mxfp4  # noqa: E402,F401  (each registers its types)
