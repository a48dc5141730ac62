"""Gemma 2 (src/models/gemma2.cpp): embeddings times sqrt(n_embd); NEOX RoPE with one base; Q scaled by
f_attention_scale (1/sqrt(key_length), or 1/sqrt(n_embd/n_head) for the 27B) and the kq scores
soft-capped (cap * tanh(kq / cap), attn_logit_softcapping, default 50) before the softmax; sliding-window
attention on even layers (load_swa_pattern(2), window default 4096); post-attention and post-FFN RMS
norms; GELU-gated FFN; tied output; final logits soft-capped (final_logit_softcapping, default 30)."""
from __future__ import annotations

import math

from ..quant.linear import qmatmul
from .base import Transformer
from .layers import gelu_tanh, rms_norm


class Gemma2(Transformer):
    def __init__(self, f, cfg, device="cpu"):
        super().__init__(f, cfg, device)
        self.output = self.tok_embd  # llama_model_gemma2 always ties the output to token_embd
        self.layers = []
        hq, hkv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            L = {}
            self.load_qkv(L, p, hq, hkv, cfg.n_head_kv * cfg.head_dim_v)
            for n in ("attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                L[n] = self.weight(p + n + ".weight")
            for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
                L[n] = self.vector(p + n + ".weight")
            self.layers.append(L)
        # llama_model_gemma2::load_arch_hparams: the 27B (46 layers) scales by n_embd / n_head
        d = cfg.n_embd // cfg.n_head if cfg.n_layer == 46 else cfg.head_dim
        self.q_scale = 1.0 / math.sqrt(d)

    def prepare(self, pos, rope_pos, n_kv):
        cos, sin = self.rope_tables(rope_pos, self.cfg.rope_base)
        window = int(self.faults.get("sliding_window", self.cfg.sliding_window))
        return {"cos": cos, "sin": sin, "global": self.mask(pos, n_kv), "local": self.mask(pos, n_kv, window)}

    def block(self, il, x, cache, start, ctx, trace):
        c, L = self.cfg, self.layers[il]
        eps = self.eps()
        cur = rms_norm(x, L["attn_norm"], eps)
        if trace:
            trace(f"attn_norm-{il}", cur)
        q, k, v = self.qkv_neox(il, L, cur, ctx["cos"], ctx["sin"], trace)
        q = q * self.q_scale
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        mask = ctx["local" if c.is_swa(il) else "global"]
        att = self.attend(il, q, k, v, cache, start, mask, 1.0, softcap=c.attn_softcap)
        if trace:
            trace(f"kqv_out-{il}", att)
        sa_out = self.attn_post(il, att, x, L, eps, trace)
        cur = rms_norm(sa_out, L["ffn_norm"], eps)
        if trace:
            trace(f"ffn_norm-{il}", cur)
        gate, up = self.project(cur, L, ("ffn_gate", "ffn_up"), "ffn_gate_up")
        cur = qmatmul(gelu_tanh(gate) * up, L["ffn_down"])
        return self.ffn_post(il, cur, sa_out, L, eps, trace)
