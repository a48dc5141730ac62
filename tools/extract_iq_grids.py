"""Regenerate ggtorch/quant/iq_grids.npz: the codebooks (lattice grids) of ggml's IQ1/IQ2/IQ3 types.

These grids are constants of the file format (ggml-common.h iq*_grid tables); they cannot be
derived, only transcribed. This dev-only script reads them from gguf-py and stores each as an
int8 array [n_entries, entry_len] of the values ggml uses. Run: python tools/extract_iq_grids.py
"""
import os

import numpy as np
from gguf import quants

out = {}
for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S"):
    cls = getattr(quants, name)
    cls.init_grid()
    g = cls.grid.reshape(cls.grid_shape)
    assert np.all(g == np.round(g)) and g.min() >= -128 and g.max() < 128
    out[name] = g.astype(np.int8)
dst = os.path.join(os.path.dirname(__file__), "..", "ggtorch", "quant", "iq_grids.npz")
np.savez_compressed(dst, **out)
print("wrote", os.path.normpath(dst), {k: v.shape for k, v in out.items()})
