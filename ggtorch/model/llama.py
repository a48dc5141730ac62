"""The llama family: llama (SmolLM2, TinyLlama, Llama 2/3, Mistral), qwen2 (Q/K/V biases) and qwen3
(per-head Q/K RMS norms). Mirrors llm_build_llama / llm_build_qwen2 / llm_build_qwen3."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.linear import qmatmul
from .base import Transformer
from .layers import rms_norm, rope


class Llama(Transformer):
    def __init__(self, f, cfg, device="cpu"):
        super().__init__(f, cfg, device)
        self.layers = []
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            L = {n: self.weight(p + n + ".weight") for n in
                 ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
            for n in ("attn_norm", "ffn_norm"):
                L[n] = self.vector(p + n + ".weight")
            for n in ("attn_q", "attn_k", "attn_v"):  # qwen2 biases
                L[n + ".bias"] = self.vector(p + n + ".bias", required=False)
            for n in ("attn_q_norm", "attn_k_norm"):  # qwen3 per-head norms
                L[n] = self.vector(p + n + ".weight", required=False)
            self.layers.append(L)

    def prepare(self, pos, rope_pos, n_kv):
        cos, sin = self.rope_tables(rope_pos, self.cfg.rope_base)
        cis = torch.complex(cos, sin) if self.cfg.rope_type != "neox" else None
        return {"cos": cos, "sin": sin, "cis": cis, "mask": self.mask(pos, n_kv)}

    def block(self, il, x, cache, start, ctx, trace):
        c, L, T = self.cfg, self.layers[il], x.shape[0]
        cur = rms_norm(x, L["attn_norm"], self.eps())
        if trace:
            trace(f"attn_norm-{il}", cur)
        q, k, v = self.project(cur, L, ("attn_q", "attn_k", "attn_v"), "attn_qkv")
        if L["attn_q.bias"] is not None:  # qwen2
            q, k, v = q + L["attn_q.bias"], k + L["attn_k.bias"], v + L["attn_v.bias"]
        q = q.reshape(T, c.n_head, c.head_dim)
        k = k.reshape(T, c.n_head_kv, c.head_dim)
        v = v.reshape(T, c.n_head_kv, c.head_dim_v)
        if L["attn_q_norm"] is not None:  # qwen3
            q = rms_norm(q, L["attn_q_norm"], self.eps())
            k = rms_norm(k, L["attn_k_norm"], self.eps())
        neox = c.rope_type == "neox"
        q = rope(q, ctx["cos"], ctx["sin"], neox, ctx["cis"])
        k = rope(k, ctx["cos"], ctx["sin"], neox, ctx["cis"])
        if trace:
            trace(f"Qcur-{il}", q)
            trace(f"Kcur-{il}", k)
            trace(f"Vcur-{il}", v)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        att = self.attend(il, q, k, v, cache, start, ctx["mask"], c.head_dim ** -0.5)
        if trace:
            trace(f"kqv_out-{il}", att)
        cur = qmatmul(att, L["attn_output"])
        if trace:
            trace(f"attn_out-{il}", cur)
        ffn_inp = cur + x
        if trace:
            trace(f"ffn_inp-{il}", ffn_inp)
        cur = rms_norm(ffn_inp, L["ffn_norm"], self.eps())
        if trace:
            trace(f"ffn_norm-{il}", cur)
        gate, up = self.project(cur, L, ("ffn_gate", "ffn_up"), "ffn_gate_up")
        cur = qmatmul(F.silu(gate) * up, L["ffn_down"])
        if trace:
            trace(f"ffn_out-{il}", cur)
        out = cur + ffn_inp
        if trace:
            trace(f"l_out-{il}", out)
        return out
