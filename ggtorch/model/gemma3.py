"""Gemma 3 (llm_build_gemma3): embeddings scaled by sqrt(n_embd), per-head Q/K RMS norms, NEOX RoPE
with a separate base on sliding-window layers, sandwich norms around attention and FFN, GELU-gated FFN,
tied output. The GGUF converter already folded Gemma's (1 + w) into the norm weights."""
from __future__ import annotations

from ..quant.linear import qmatmul
from . import fastpath
from .base import Transformer
from .layers import gelu_tanh, rms_norm


class Gemma3(Transformer):
    def __init__(self, f, cfg, device="cpu"):
        super().__init__(f, cfg, device)
        self.layers = []
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            L = {n: self.weight(p + n + ".weight") for n in ("attn_output", "ffn_gate", "ffn_up", "ffn_down")}
            self.load_qkv(L, p, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_head_kv * cfg.head_dim_v)
            for n in ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
                L[n] = self.vector(p + n + ".weight")
            self.layers.append(L)

    def prepare(self, pos, rope_pos, n_kv):
        c = self.cfg
        g_cos, g_sin = self.rope_tables(rope_pos, c.rope_base)
        l_cos, l_sin = self.rope_tables(rope_pos, c.rope_base_local)
        return {"global": (g_cos, g_sin, self.mask(pos, n_kv)),
                "local": (l_cos, l_sin, self.mask(pos, n_kv, self.window()))}

    def window(self) -> int:
        return int(self.faults.get("sliding_window", self.cfg.sliding_window))

    def step_spec(self):
        """The layers for fastpath.Step: sandwich norms, per-head norms, local/global RoPE and windows."""
        c, layers = self.cfg, []
        for il, L in enumerate(self.layers):
            swa = c.is_swa(il)
            layers.append({"attn_norm": L["attn_norm"], "qkv": L.get("attn_qkv"), "q": L.get("attn_q"),
                           "k": L.get("attn_k"), "v": L.get("attn_v"), "q_norm": L["attn_q_norm"],
                           "k_norm": L["attn_k_norm"], "o": L["attn_output"],
                           "post_attn_norm": L["post_attention_norm"], "ffn_norm": L["ffn_norm"],
                           "gate_up": L.get("ffn_gate_up"), "gate": L.get("ffn_gate"), "up": L.get("ffn_up"),
                           "down": L["ffn_down"], "post_ffw_norm": L["post_ffw_norm"], "rope": 2 if swa else 1,
                           "window": self.window() if swa else 0})
            if layers[-1]["qkv"] is not None:
                layers[-1].update(q=None, k=None, v=None)
            if layers[-1]["gate_up"] is not None:
                layers[-1].update(gate=None, up=None)
        return layers, "gelu"

    def step_rope(self):
        return (self.cfg.rope_base, True), (self.cfg.rope_base_local, True)

    def step_tables(self, ctx):
        return ctx["global"][0], ctx["global"][1], ctx["local"][0], ctx["local"][1]

    def block(self, il, x, cache, start, ctx, trace):
        c, L = self.cfg, self.layers[il]
        cos, sin, mask = ctx["local" if c.is_swa(il) else "global"]
        eps = self.eps()
        cur = rms_norm(x, L["attn_norm"], eps)
        if trace:
            trace(f"attn_norm-{il}", cur)
        if ctx["rows"] is not None:  # norms, RoPE, cache and attention in one call
            qkv, parts = fastpath.qkv_row(self, L, cur)
            att = fastpath.attend(self, il, qkv, parts, cache, ctx["rows"], (cos, sin), True,
                                   self.window() if c.is_swa(il) else 0, L["attn_q_norm"], L["attn_k_norm"],
                                   c.attn_scale)
        else:
            q, k, v = self.qkv_neox(il, L, cur, cos, sin, trace, eps=eps)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            att = self.attend(il, q, k, v, cache, start, mask, c.attn_scale)
        if trace:
            trace(f"kqv_out-{il}", att)
        sa_out = self.attn_post(il, att, x, L, eps, trace)
        cur = rms_norm(sa_out, L["ffn_norm"], eps)
        if trace:
            trace(f"ffn_norm-{il}", cur)
        act = fastpath.gated(self, L, cur, "gelu")
        if act is None:
            gate, up = self.project(cur, L, ("ffn_gate", "ffn_up"), "ffn_gate_up")
            act = gelu_tanh(gate) * up
        cur = qmatmul(act, L["ffn_down"])
        return self.ffn_post(il, cur, sa_out, L, eps, trace)
