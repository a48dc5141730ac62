"""Phi-3 (src/models/phi3.cpp): a fused attn_qkv (rows [Q; K; V]) or separate Q/K/V; partial NEOX RoPE
(rope.dimension_count may be below head_dim: the other dimensions pass through) with optional LongRoPE
factors (rope_factors_short/long); Q scaled by 1/sqrt(head_dim) before attention with kq scale 1;
ffn_up holds [gate; up] rows for one SwiGLU (LLM_FFN_SWIGLU, LLM_FFN_SEQ); untied or tied output.
llama.cpp disables Phi-3's sliding window, so every layer attends to the whole context."""
from __future__ import annotations

import torch.nn.functional as F

from ..quant.linear import qmatmul
from .base import Transformer
from .layers import rms_norm
from .moe import load_moe, moe


class Phi3(Transformer):
    def __init__(self, f, cfg, device="cpu"):
        super().__init__(f, cfg, device)
        # get_rope_factors: the short factors unless the context exceeds rope.scaling.original_context_length
        short = self.vector("rope_factors_short.weight", required=False)
        if short is not None:
            self.freq_factors = short
        self.layers = []
        n = cfg.n_head * cfg.head_dim
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            L = {"attn_norm": self.vector(p + "attn_norm.weight"), "ffn_norm": self.vector(p + "ffn_norm.weight")}
            self.load_qkv(L, p, n, cfg.n_head_kv * cfg.head_dim, cfg.n_head_kv * cfg.head_dim_v)
            L["attn_output"] = self.weight(p + "attn_output.weight")
            if cfg.n_expert:
                load_moe(self, L, p)
            else:
                L["ffn_up"] = self.weight(p + "ffn_up.weight")
                L["ffn_down"] = self.weight(p + "ffn_down.weight")
            self.layers.append(L)

    def prepare(self, pos, rope_pos, n_kv):
        cos, sin = self.rope_tables(rope_pos, self.cfg.rope_base)
        return {"cos": cos, "sin": sin, "mask": self.mask(pos, n_kv)}

    def block(self, il, x, cache, start, ctx, trace):
        c, L = self.cfg, self.layers[il]
        cur = rms_norm(x, L["attn_norm"], self.eps())
        if trace:
            trace(f"attn_norm-{il}", cur)
        q, k, v = self.qkv_neox(il, L, cur, ctx["cos"], ctx["sin"], trace)
        q = q * (1.0 / c.head_dim ** 0.5)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        att = self.attend(il, q, k, v, cache, start, ctx["mask"], 1.0)
        if trace:
            trace(f"kqv_out-{il}", att)
        cur = qmatmul(att, L["attn_output"])
        if trace:
            trace(f"attn_out-{il}", cur)
        residual = cur + x
        if trace:
            trace(f"ffn_inp-{il}", residual)
        cur = rms_norm(residual, L["ffn_norm"], self.eps())
        if trace:
            trace(f"ffn_norm-{il}", cur)
        if c.n_expert:
            cur = moe(self, L, cur, trace, il)
        else:
            gate, up = qmatmul(cur, L["ffn_up"]).chunk(2, dim=-1)  # ggml_swiglu: silu(first half) * second
            cur = qmatmul(F.silu(gate) * up, L["ffn_down"])
        if trace:
            trace(f"ffn_out-{il}", cur)
        out = residual + cur
        if trace:
            trace(f"l_out-{il}", out)
        return out
