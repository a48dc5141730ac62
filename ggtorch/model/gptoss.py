"""gpt-oss (src/models/openai-moe.cpp): Q/K/V and output projections with biases; NEOX RoPE with YaRN
(rope.scaling.*: see layers.rope_cache_yarn); attention sinks (one learned logit per head in the softmax
normalizer, attn_sinks); sliding-window attention on even layers (load_swa_pattern(2)) and full attention
on odd ones; the residual after attention goes through post_attention_norm into a MoE in every layer:
router with a bias, top-k on the raw logits, softmax over the k chosen (SOFTMAX_WEIGHT), experts with
biases and the clamped SwiGLU (swiglu_oai: alpha 1.702, limit 7); experts usually MXFP4."""
from __future__ import annotations

from ..quant.linear import qmatmul
from .base import Transformer
from .layers import rms_norm, rope, swiglu_oai
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
        ctx = {"global": self.rope_tables(rope_pos, c.rope_base) + (self.mask(pos, n_kv),)}
        ctx["local"] = self.rope_tables(rope_pos, c.rope_base_local) + (self.mask(pos, n_kv, c.sliding_window),)
        return ctx

    def block(self, il, x, cache, start, ctx, trace):
        c, L = self.cfg, self.layers[il]
        cur = rms_norm(x, L["attn_norm"], self.eps())
        if trace:
            trace(f"attn_norm-{il}", cur)
        q, k, v = self.qkv(L, cur, hd_q=c.n_rot)
        cos, sin, mask = ctx["local" if c.is_swa(il) else "global"]
        q = rope(q, cos, sin, True)
        k = rope(k, cos, sin, True)
        if trace:
            trace(f"Qcur-{il}", q)
            trace(f"Kcur-{il}", k)
            trace(f"Vcur-{il}", v)
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
