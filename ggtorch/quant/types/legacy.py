"""The 32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): one float16 scale per block, an offset that is a
multiple of it (Q4_0: -8d, Q5_0: -16d, Q8_0 stored as q + 128: -128d) or stored (Q4_1, Q5_1: m).
Activations: Q8_0 blocks, Q8_1 for the types with a stored offset (ggml's type_traits vec_dot_type)."""
from __future__ import annotations

import torch

from ..blocks import _affine_parts, _int4_parts_rows
from . import Q8_0, Q8_1, TypeSpec, register


def _read_q4(w, raw) -> dict:
    q, s, z = _int4_parts_rows(w, raw)  # value = (q - 8) * s + z
    return {"u": q.to(torch.uint8), "dw": s, "mw": z - 8 * s}


def _read_affine(w, raw) -> dict:
    q, a, b = _affine_parts(w, raw)  # value = a * q + b
    if w.type.name == "Q8_0":  # signed: stored as q + 128
        return {"u": (q + 128).to(torch.uint8), "dw": a, "mw": b - 128 * a}
    return {"u": q.to(torch.uint8), "dw": a, "mw": b}


register(TypeSpec("Q4_0", "legacy", 4, 32, Q8_0, False, False, -8.0, _read_q4))
register(TypeSpec("Q4_1", "legacy", 4, 32, Q8_1, False, True, 0.0, _read_q4))
register(TypeSpec("Q5_0", "legacy", 5, 32, Q8_0, False, False, -16.0, _read_affine))
register(TypeSpec("Q5_1", "legacy", 5, 32, Q8_1, False, True, 0.0, _read_affine))
register(TypeSpec("Q8_0", "legacy", 8, 32, Q8_0, False, False, -128.0, _read_affine))
