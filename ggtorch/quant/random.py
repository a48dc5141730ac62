"""Random weights of any GGUF type, for the kernel tests and benchmarks (tests/test_kernels*.py,
benchmarks/qdot_types.py): every byte of every block random, so all bit patterns of values, signs, grid
indices and sub-block scales occur, except the float16 super-block scales, drawn in [1e-4, 0.05] so that
no block is NaN or infinite."""
from __future__ import annotations

import numpy as np
import torch

from ..gguf.types import ggml_type
from .linear import QWeight

# byte offsets of each type's float16 scales in its block (d, and dmin where there is one); IQ1_M keeps d
# in the top nibbles of its four u16 scale words instead (random_weight sets them)
F16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,),
          "IQ3_S": (0,), "IQ3_XXS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": ()}


def random_weight(t: str, rows: int, K: int, seed: int) -> QWeight:
    """A [rows, K] QWeight of type t (a name in F16_AT) made of random blocks."""
    gt = ggml_type(t)
    rng = np.random.default_rng(seed)
    nb = rows * K // gt.block_size
    raw = rng.integers(0, 256, size=(nb, gt.type_size), dtype=np.uint8)
    for at in F16_AT[t]:
        raw[:, at:at + 2] = rng.uniform(1e-4, 0.05, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    if t == "IQ1_M":  # d's 16 bits are the top nibbles of the four u16 scale words (bytes 49, 51, 53, 55)
        d = rng.uniform(1e-4, 0.05, nb).astype(np.float16).view(np.uint16)
        for k in range(4):
            raw[:, 49 + 2 * k] = (raw[:, 49 + 2 * k] & 0x0F) | (((d >> (4 * k)) & 15) << 4).astype(np.uint8)
    return QWeight(torch.from_numpy(raw.reshape(-1)), gt, (K, rows), f"random-{t}")
