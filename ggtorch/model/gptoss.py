"""gpt-oss (src/models/openai-moe.cpp): Q/K/V and output projections with biases; NEOX RoPE with YaRN
(rope.scaling.*: see layers.rope_cache_yarn); attention sinks (one learned logit per head in the softmax
normalizer, attn_sinks); sliding-window attention on even layers (load_swa_pattern(2)) and full attention
on odd ones; the residual after attention goes through post_attention_norm into a MoE in every layer:
router with a bias, top-k on the raw logits, softmax over the k chosen (SOFTMAX_WEIGHT), experts with
biases and the clamped SwiGLU (swiglu_oai: alpha 1.702, limit 7); experts usually MXFP4.

With the JIT library the attention (biases, RoPE, cache, sinks) is ops.cpp's qdot_attend and the experts
moe.cpp's qdot_moe; a decode step (and a prompt) runs every layer in one call (step.cpp, step_spec)."""
from __future__ import annotations

import torch

from ..quant.linear import qmatmul
from . import fastpath
from .base import Transformer
from .layers import rms_norm, swiglu_oai
from .moe import load_moe, moe


class GptOss(Transformer):
    def __init__(self, f, cfg, device="cpu"):
        super().__init__(f, cfg, device)
        self.layers = []
        hd = cfg.n_rot  # llama_model_openai_moe: heads are n_rot wide
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            L = {"attn_norm": self.vector(p + "attn_norm.weight"),
                 "post_attention_norm": self.vector(p + "post_attention_norm.weight")}
            self.load_qkv(L, p, cfg.n_head * hd, cfg.n_head_kv * hd, cfg.n_head_kv * hd)
            L["attn_output"] = self.weight(p + "attn_output.weight")
            L["attn_output.bias"] = self.vector(p + "attn_output.bias")
            L["attn_sinks"] = self.vector(p + "attn_sinks.weight")
            load_moe(self, L, p)
            self.layers.append(L)

    def prepare(self, pos, rope_pos, n_kv):
        c = self.cfg
        g = self.rope_tables(rope_pos, c.rope_base)
        # one YaRN table for both kinds of layers when their bases agree (gpt-oss's do): a tenth of a tiny
        # model's decode step
        loc = g if c.rope_base_local == c.rope_base else self.rope_tables(rope_pos, c.rope_base_local)
        ctx = {"global": g + (self.mask(pos, n_kv),), "local": loc + (self.mask(pos, n_kv, c.sliding_window),)}
        return ctx

    def _jit_attention(self) -> bool:
        """Whether qdot_attend fits this file: heads of n_rot (its head_dim), the scale 1/sqrt(n_rot)."""
        c = self.cfg
        return c.head_dim == c.n_rot and c.head_dim_v == c.n_rot and c.attn_scale == c.n_rot ** -0.5

    def step_spec(self):
        """The layers for fastpath.Step: Q/K/V and output biases, sinks, local windows on the sliding-window
        layers, post_attention_norm as the FFN's norm and the routed experts (moe.cpp, swiglu_oai)."""
        c = self.cfg
        if not self._jit_attention():
            return None
        layers = []
        for il, L in enumerate(self.layers):
            experts = fastpath.expert_ffn(self, il, None, "swiglu_oai")
            bs = [L.get(n + ".bias") for n in ("attn_q", "attn_k", "attn_v")]
            if experts is None or any(b is None for b in bs):
                return None
            swa = c.is_swa(il)
            layers.append({"attn_norm": L["attn_norm"], "qkv": L.get("attn_qkv"), "q": L.get("attn_q"),
                           "k": L.get("attn_k"), "v": L.get("attn_v"), "o": L["attn_output"],
                           "ffn_norm": L["post_attention_norm"], "moe": experts,
                           "qkv_b": torch.cat(bs).float().contiguous(), "o_b": L["attn_output.bias"],
                           "sinks": L["attn_sinks"], "rope": 2 if swa else 1, "window": c.sliding_window if swa else 0})
            if layers[-1]["qkv"] is not None:
                layers[-1].update(q=None, k=None, v=None)
        return layers, "silu"  # (the dense FFN's activation: gpt-oss has none, its experts take swiglu_oai)

    def step_rope(self):
        return (self.cfg.rope_base, True), (self.cfg.rope_base_local, True)

    def step_tables(self, ctx):
        return ctx["global"][0], ctx["global"][1], ctx["local"][0], ctx["local"][1]

    def block(self, il, x, cache, start, ctx, trace):
        c, L = self.cfg, self.layers[il]
        cur = rms_norm(x, L["attn_norm"], self.eps())
        if trace:
            trace(f"attn_norm-{il}", cur)
        cos, sin, mask = ctx["local" if c.is_swa(il) else "global"]
        if ctx.get("rows") is not None and self._jit_attention():  # biases, RoPE, cache and sinks in one call
            qkv, parts = fastpath.qkv_row(self, L, cur)
            att = fastpath.attend(self, il, qkv, parts, cache, ctx["rows"], (cos, sin), True,
                                   c.sliding_window if c.is_swa(il) else 0, None, None, c.n_rot ** -0.5,
                                   L["attn_sinks"])
        else:
            q, k, v = self.qkv_neox(il, L, cur, cos, sin, trace, hd_q=c.n_rot)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            att = self.attend(il, q, k, v, cache, start, mask, c.n_rot ** -0.5, sinks=L["attn_sinks"])
        if trace:
            trace(f"kqv_out-{il}", att)
        cur = qmatmul(att, L["attn_output"]) + L["attn_output.bias"]
        if trace:
            trace(f"attn_out-{il}", cur)
        ffn_inp = cur + x
        if trace:
            trace(f"ffn_inp-{il}", ffn_inp)
        cur = rms_norm(ffn_inp, L["post_attention_norm"], self.eps())
        if trace:
            trace(f"attn_post_norm-{il}", cur)
        cur = moe(self, L, cur, trace, il, act=swiglu_oai)
        if trace:
            trace(f"ffn_out-{il}", cur)
        out = cur + ffn_inp
        if trace:
            trace(f"l_out-{il}", out)
        return out
