"""The one registry of ggml tensor types: id, block size, bytes per block.

Every size in ggtorch (row bytes, tensor bytes, block counts) is derived from here.
Ids and sizes follow ggml.h / ggml.c's type_traits table.
"""
from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # elements in a K-quant / IQ super-block


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int
    block_size: int  # elements per block
    type_size: int  # bytes per block

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of ``n`` elements; ``n`` must be a whole number of blocks."""
        if n % self.block_size:
            raise ValueError(f"{self.name}: row of {n} elements is not a whole number of {self.block_size}-element blocks")
        return n // self.block_size * self.type_size

    @property
    def quantized(self) -> bool:
        return self.block_size > 1


_TABLE = [
    # name, id, block size, bytes per block
    ("F32", 0, 1, 4),
    ("F16", 1, 1, 2),
    ("Q4_0", 2, 32, 2 + 16),
    ("Q4_1", 3, 32, 2 + 2 + 16),
    ("Q5_0", 6, 32, 2 + 4 + 16),
    ("Q5_1", 7, 32, 2 + 2 + 4 + 16),
    ("Q8_0", 8, 32, 2 + 32),
    ("Q8_1", 9, 32, 2 + 2 + 32),  # block_q8_1 {half d, half s, int8 qs[32]}
    ("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    ("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    ("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2),
    ("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    ("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    ("Q8_K", 15, QK_K, 4 + QK_K + QK_K // 16 * 2),
    ("IQ2_XXS", 16, QK_K, 2 + QK_K // 4),
    ("IQ2_XS", 17, QK_K, 2 + QK_K // 4 + QK_K // 32),
    ("IQ3_XXS", 18, QK_K, 2 + QK_K // 4 + QK_K // 8),
    ("IQ1_S", 19, QK_K, 2 + QK_K // 8 + QK_K // 16),
    ("IQ4_NL", 20, 32, 2 + 16),
    ("IQ3_S", 21, QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64),
    ("IQ2_S", 22, QK_K, 2 + QK_K // 4 + QK_K // 16),
    ("IQ4_XS", 23, QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
    ("I8", 24, 1, 1),
    ("I16", 25, 1, 2),
    ("I32", 26, 1, 4),
    ("I64", 27, 1, 8),
    ("F64", 28, 1, 8),
    ("IQ1_M", 29, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    ("BF16", 30, 1, 2),
    ("TQ1_0", 34, QK_K, 2 + 4 * 13),
    ("TQ2_0", 35, QK_K, 2 + QK_K // 4),
    ("MXFP4", 39, 32, 1 + 16),
    ("NVFP4", 40, 64, 4 + 32),
    ("Q1_0", 41, 128, 2 + 16),  # size known; no dequantizer yet
]

TYPES: dict[str, GGMLType] = {n: GGMLType(n, i, b, s) for n, i, b, s in _TABLE}
TYPES_BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES.values()}


def type_by_id(type_id: int) -> GGMLType | None:
    """The registered type with ggml id ``type_id``, or None when this version does not know it."""
    return TYPES_BY_ID.get(type_id)


def ggml_type(t: "str | int | GGMLType") -> GGMLType:
    """Look a type up by name, id or instance; raises QuantError when unknown."""
    from ..errors import QuantError

    if isinstance(t, GGMLType):
        return t
    found = TYPES.get(t.upper()) if isinstance(t, str) else TYPES_BY_ID.get(int(t))
    if found is None:
        raise QuantError(f"unknown ggml tensor type {t!r}; known: {', '.join(TYPES)}")
    return found
