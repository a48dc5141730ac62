"""Triton kernels for GGUF weights: the fast path on CUDA devices.

``install_net(net)`` (called from model.repack when the model's device is CUDA, or CPU after
:func:`enable_on_cpu`) repacks every weight of a supported type once into the GPU layout
(layout.py; one module per type family: q4, q5, q8, kquants, iq4) and gives it :func:`triton_kernel`,
which picks the matrix-vector kernel for 1-8 activation rows and the tiled ``tl.dot`` kernel above
(kernels.py). Q/K/V and gate/up are fused when their types agree. Other types keep the exact path
(dequantize in float32 and multiply), which also stays the reference (``--exact``).

On CPU the same kernels run in Triton's interpreter (tests, ``gpu_check.py --cpu-dry-run``):
``enable_on_cpu()`` or ``GGTORCH_TRITON_CPU=1`` before the kernels are first imported.
"""
from __future__ import annotations

import os

import torch

from . import iq4, kquants, q4, q5, q8

_FAMILIES = (q4, q5, q8, kquants, iq4)
LAYOUTS = {name: p for fam in _FAMILIES for name, p in fam.LAYOUTS.items()}
_PACK = {name: fam.pack for fam in _FAMILIES for name in fam.LAYOUTS}
_ON_CPU = os.environ.get("GGTORCH_TRITON_CPU") == "1"


def enable_on_cpu(on: bool = True) -> None:
    """Run the Triton path on CPU tensors, through Triton's interpreter (slow: for tests). Must come
    before the kernels are first imported (it sets TRITON_INTERPRET=1 for them)."""
    global _ON_CPU
    _ON_CPU = on
    if on:
        import sys

        if "ggtorch.quant.triton.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("enable_on_cpu() must be called before the Triton kernels are imported")
        os.environ["TRITON_INTERPRET"] = "1"


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def wanted(device) -> bool:
    """Whether weights on ``device`` take the Triton kernels."""
    t = torch.device(device).type
    return (t == "cuda" or (t == "cpu" and _ON_CPU)) and available()


def pack(w) -> dict:
    """The GPU layout of a QWeight's blocks (on the weight's device), as state tensors."""
    return _PACK[w.type.name](w.type.name, w.raw.reshape(-1, w.type.type_size), w.out_features)


def triton_kernel(x: torch.Tensor, w) -> torch.Tensor:
    """x [..., in] @ W.T -> float32 [..., out] for a weight (or fused weights) with a Triton layout."""
    from .kernels import linear

    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = linear(x2, w.state, w.tparams, w.out_features)
    return y.reshape(*x.shape[:-1], w.out_features)


def install(w) -> bool:
    """Give a QWeight the Triton kernel when its type has a layout; False when it keeps its path."""
    if w.dense is not None or w.kernel is not None or w.type.name not in LAYOUTS or w.in_features % w.type.block_size:
        return False
    w.state = pack(w)
    w.tparams = LAYOUTS[w.type.name]
    w.kernel = triton_kernel
    return True


FUSIONS = (("attn_qkv", ("attn_q", "attn_k", "attn_v")), ("ffn_gate_up", ("ffn_gate", "ffn_up")))


def _fuse(ws):
    """One matrix for Triton weights that share an input and a layout (rows concatenated), or None."""
    from ..kernels import Fused

    if any(w is None or getattr(w, "kernel", None) is not triton_kernel for w in ws):
        return None
    if len({w.tparams for w in ws}) != 1 or len({w.in_features for w in ws}) != 1:
        return None
    state = {k: torch.cat([w.state[k] for w in ws]) for k in ws[0].state}
    f = Fused.from_state(triton_kernel, state, [w.out_features for w in ws], ws[0].in_features)
    f.tparams = ws[0].tparams
    for w in ws:  # the parts' own planes are no longer needed
        w.state, w.kernel = {}, None
    return f


def install_net(net) -> str:
    """Triton kernels for every supported weight of ``net`` and fused Q/K/V, gate/up (the CUDA
    counterpart of model.repack's CPU repack; no repack cache: packing on the device is fast)."""
    for w in net.weights().values():
        install(w)
    for L in getattr(net, "layers", []):
        for key, names in FUSIONS:
            if all(L.get(n) is not None for n in names) and L.get(key) is None:
                f = _fuse([L.get(n) for n in names])
                if f is not None:
                    L[key] = f
        _group_experts(L)
    return "off"


def _group_experts(L: dict) -> None:
    """MoE layers: each expert tensor's layouts stacked into one matrix for the grouped kernel
    (grouped.py), which model.moe.moe_ffn then uses; the per-expert copies are dropped (their blocks stay
    for the exact path, e.g. under a tracer)."""
    names = [n for n in ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps") if L.get(n)]
    if "ffn_up_exps" not in names or "ffn_down_exps" not in names:
        return
    from .grouped import stack

    stacked = {n: stack(L[n].w) for n in names}
    if any(v is None for v in stacked.values()):
        return
    for n in names:
        L[n].grouped = stacked[n]
        for w in L[n].w:
            w.state, w.kernel = {}, None
