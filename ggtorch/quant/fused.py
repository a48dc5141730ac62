"""What every fast kernel shares: fused matrices (several weights with one input) and the float32
refinement of the output matrix's largest logits. Imports nothing from the kernels, so that
quant/kernels.py (PyTorch's kernels, install) and quant/qdot.py (the JIT kernel) both read it without
importing each other."""
from __future__ import annotations

import torch

REFINE_TOP = 16  # output-matrix rows recomputed in float32 per token (see finish)
SCALARS = ("zoff", "amode", "flags")  # per-matrix constants of a state: the same for every part, not concatenated
ALONG = {"sz": 1}  # state tensors whose rows run along dim 1 (PyTorch's int4 scales/zeros)


def finish(y: torch.Tensor, x: torch.Tensor, w) -> torch.Tensor:
    """float32 [..., out] from a kernel's [M, out]. PyTorch's int4/int8 kernels round their output to bf16
    (8 significant bits: a logit of 16 is known to 0.06). For the output matrix (``w.refine_top`` set by
    model.repack) the largest logits of each row are recomputed in float32 from their dequantized rows,
    so the probable tokens get exact logits; the measured KL to llama.cpp on SmolLM2 fell from 0.0056
    to 0.0047 for ~0.1 ms a token."""
    y = y.float()
    k = getattr(w, "refine_top", 0)
    if k:
        xf = x.reshape(-1, x.shape[-1]).float()
        idx = y.topk(min(k, y.shape[-1]), dim=-1).indices
        rows = w.dequantize(idx.reshape(-1)).view(idx.shape[0], idx.shape[1], -1)
        y.scatter_(1, idx, torch.bmm(rows, xf[:, :, None])[..., 0])
    return y.reshape(*x.shape[:-1], w.out_features)


class Fused:
    """Several weights with one input, concatenated along the output dimension (their kernels agree,
    which quant.kernels.fuse checks)."""

    def __init__(self, ws: list | None):
        if ws is None:  # filled by from_state
            return
        self.parts = [w.out_features for w in ws]
        self.out_features, self.in_features = sum(self.parts), ws[0].in_features
        self.kernel = ws[0].kernel
        self.state = {}
        for k, v in ws[0].state.items():
            if k in SCALARS:
                self.state[k] = v
            else:
                self.state[k] = torch.cat([w.state[k] for w in ws], dim=ALONG.get(k, 0)).contiguous()

    @classmethod
    def from_state(cls, kernel, state: dict, parts: list[int], in_features: int) -> "Fused":
        """A fused matrix rebuilt from stored state (the repack cache)."""
        f = cls(None)
        f.kernel, f.state, f.parts = kernel, state, [int(p) for p in parts]
        f.out_features, f.in_features = sum(f.parts), int(in_features)
        return f
