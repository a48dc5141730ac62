"""OLMo 2 (src/models/olmo2.cpp): no pre-norms; Q and K RMS-normed over the whole projection
(attn_q_norm {n_embd}, attn_k_norm {n_head_kv * head_dim}) before the per-head reshape and NEOX RoPE;
post_attention_norm on the attention output and post_ffw_norm on the FFN output, each before its
residual add; SwiGLU FFN. With attention.sliding_window (OLMo 3), layers il % 4 < 3 use a window and
unscaled RoPE."""
from __future__ import annotations

import torch.nn.functional as F

from ..quant.linear import qmatmul
from .base import Transformer
from .layers import rms_norm, rope


class Olmo2(Transformer):
    def __init__(self, f, cfg, device="cpu"):
        super().__init__(f, cfg, device)
        self.layers = []
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            L = {}
            self.load_qkv(L, p, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_head_kv * cfg.head_dim_v)
            for n in ("attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                L[n] = self.weight(p + n + ".weight")
            for n in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"):
                L[n] = self.vector(p + n + ".weight")
            self.layers.append(L)

    def prepare(self, pos, rope_pos, n_kv):
        c = self.cfg
        ctx = {"global": self.rope_tables(rope_pos, c.rope_base) + (self.mask(pos, n_kv),)}
        if c.sliding_window:
            ctx["local"] = self.rope_tables(rope_pos, c.rope_base_local, yarn=False) + (
                self.mask(pos, n_kv, c.sliding_window),)
        return ctx

    def rope_yarn(self, il: int) -> bool:  # the context shift rotates as prepare() does
        return not self.cfg.is_swa(il)

    def block(self, il, x, cache, start, ctx, trace):
        c, L, T = self.cfg, self.layers[il], x.shape[0]
        eps = self.eps()
        q, k, v = self.qkv(L, x, reshape=False)
        q = rms_norm(q, L["attn_q_norm"], eps)  # over the full width: one norm for all heads
        k = rms_norm(k, L["attn_k_norm"], eps)
        cos, sin, mask = ctx["local" if c.is_swa(il) else "global"]
        q = rope(q.reshape(T, c.n_head, c.head_dim), cos, sin, True)
        k = rope(k.reshape(T, c.n_head_kv, c.head_dim), cos, sin, True)
        v = v.reshape(T, c.n_head_kv, c.head_dim_v)
        if trace:
            trace(f"Qcur-{il}", q)
            trace(f"Kcur-{il}", k)
            trace(f"Vcur-{il}", v)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        att = self.attend(il, q, k, v, cache, start, mask, c.head_dim ** -0.5)
        if trace:
            trace(f"kqv_out-{il}", att)
        ffn_inp = self.attn_post(il, att, x, L, eps, trace)
        gate, up = self.project(ffn_inp, L, ("ffn_gate", "ffn_up"), "ffn_gate_up")
        cur = qmatmul(F.silu(gate) * up, L["ffn_down"])
        return self.ffn_post(il, cur, ffn_inp, L, eps, trace)
