"""A single sequence's one-token step through the JIT library's small operations (quant/csrc/ops.cpp).

Decoding one token costs each layer about twenty small PyTorch operations around its matrix products:
splitting the fused Q/K/V product, per-head norms, RoPE, writing K and V into the float16 cache and
reading the cache back as float32, attention, reshapes. Each is cheap, but their dispatch cost was
half of SmolLM2's decode step (4.9 of 9.3 ms, measured). ``attend1`` does the same arithmetic in one
foreign call. It is taken only where it computes exactly what ``Transformer.attend`` would: one token
of one sequence (a :class:`SlotView`), no tracer (a trace reports the intermediate tensors under
llama.cpp's names), no ggml-numerics mode, no fault injection, on CPU with the library built.
"""
from __future__ import annotations

import torch

from ..quant import jit
from ..quant.linear import qmatmul
from .layers import BatchView, SlotView

ENABLED = True  # tests compare with the PyTorch path by turning this off
KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ops.cpp's load_kv/store_kv


def usable(model, n_tokens: int, cache, trace) -> bool:
    """Whether this forward may take the JIT attention (see the module's docstring)."""
    one = isinstance(cache, SlotView) and n_tokens == 1
    return ((one or isinstance(cache, BatchView)) and ENABLED and trace is None and not model.numerics and not model.faults
            and model.device.type == "cpu" and cache.pool.dtype in KV_TYPES and jit.available())


def rows(cache, start) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, position) of each token as int64 tensors, made once per forward for all layers."""
    if isinstance(cache, BatchView):
        return cache.idx.contiguous(), cache.pos.to(torch.int64).contiguous()
    return torch.tensor([cache.slot], dtype=torch.int64), torch.tensor([int(start)], dtype=torch.int64)


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.is_contiguous(), "the JIT library takes contiguous float32 tensors"
    return t.data_ptr()


def qkv_row(model, L: dict, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The tokens' Q, K and V side by side, [T, nq + nk + nv] (biases added), and the widths:
    the fused product itself when there is one (no split), else the three concatenated."""
    f = L.get("attn_qkv")
    if f is not None and all(L.get(n + ".bias") is None for n in ("attn_q", "attn_k", "attn_v")):
        return qmatmul(x, f), list(f.parts)
    q, k, v = model.qkv(L, x, reshape=False)
    return torch.cat((q, k, v), dim=-1), [q.shape[-1], k.shape[-1], v.shape[-1]]


def attend(model, il: int, qkv: torch.Tensor, parts: list[int], cache, where: tuple[torch.Tensor, torch.Tensor],
           rope: tuple[torch.Tensor, torch.Tensor] | None, neox: bool, window: int, q_norm: torch.Tensor | None,
           k_norm: torch.Tensor | None, scale: float) -> torch.Tensor:
    """qkv [T, H*D + Hkv*D + Hkv*Dv] (each token's projections, see qkv_row) -> attention output
    [T, H*Dv]; each token's K/V is now in its slot of the cache at its position (``where``, from
    :func:`rows`). ``rope``: the tokens' (cos, sin) tables, None for a layer without RoPE; ``window``
    > 0: sliding-window attention (is_masked_swa: keys within ``window`` positions);
    ``q_norm``/``k_norm``: per-head RMS norms before RoPE."""
    c, pool = model.cfg, cache.pool
    K, V = pool.k[il], pool.v[il]
    H, Hkv, D, Dv = c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v
    assert parts == [H * D, Hkv * D, Hkv * Dv], "Q/K/V widths"
    assert qkv.dtype == torch.float32 and qkv.stride(-1) == 1
    T = qkv.shape[0]
    out = torch.empty(T, H * Dv)
    cs, sn = rope if rope is not None else (None, None)
    n_rot = 0 if rope is None else cs.shape[-1] * 2
    slot, pos = where
    jit.library().qdot_attend(qkv.data_ptr(), T, qkv.stride(0), H, Hkv, D, Dv, _ptr(q_norm), _ptr(k_norm),
                              model.eps(), _ptr(cs), _ptr(sn), n_rot, int(neox), K.data_ptr(), V.data_ptr(),
                              KV_TYPES[pool.dtype], K.shape[2], slot.data_ptr(), pos.data_ptr(), window, scale,
                              out.data_ptr())
    return out


GLU = {"silu": 0, "gelu": 1}  # ops.cpp qdot_glu's kinds


def gated(model, L: dict, x: torch.Tensor, act: str) -> torch.Tensor | None:
    """act(x @ ffn_gate^T) * (x @ ffn_up^T) for x [M, n_embd] (build_ffn's LLM_FFN_PAR without biases),
    the activation in one call on the fused gate/up product; None where the JIT library cannot do it
    (the caller then uses PyTorch)."""
    if x.device.type != "cpu" or any(L.get(n + ".bias") is not None for n in ("ffn_gate", "ffn_up")):
        return None
    lib = jit.library()
    if lib is None:
        return None
    f = L.get("ffn_gate_up")
    if f is not None:
        y = qmatmul(x, f).reshape(-1, f.out_features)
        F = f.parts[0]
        if y.dtype != torch.float32 or not y.is_contiguous() or f.parts != [F, F]:
            return None
        g, u, ld = y.data_ptr(), y.data_ptr() + 4 * F, y.stride(0)
        ldu, keep = ld, y
    else:
        gate, up = qmatmul(x, L["ffn_gate"]), qmatmul(x, L["ffn_up"])
        if gate.dtype != torch.float32 or up.dtype != torch.float32:
            return None
        gate, up = gate.reshape(-1, gate.shape[-1]).contiguous(), up.reshape(-1, up.shape[-1]).contiguous()
        F, keep = gate.shape[-1], (gate, up)
        g, u, ld, ldu = gate.data_ptr(), up.data_ptr(), F, F
    out = torch.empty(*x.shape[:-1], F)
    lib.qdot_glu(g, u, out.numel() // F, F, ld, ldu, GLU[act], out.data_ptr())
    del keep
    return out
