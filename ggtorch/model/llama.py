"""The llama family: llama (SmolLM2, TinyLlama, Llama 2/3, Mistral; Mixtral-style MoE files with
ffn_gate_inp + ffn_{gate,up,down}_exps; a fused attn_qkv), qwen2 (Q/K/V biases) and qwen3 (per-head
Q/K RMS norms). Mirrors src/models/llama.cpp, qwen2.cpp and qwen3.cpp."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.linear import qmatmul
from . import fastpath
from .base import Transformer
from .layers import rms_norm, rope
from .moe import load_moe, moe


class Llama(Transformer):
    def __init__(self, f, cfg, device="cpu"):
        super().__init__(f, cfg, device)
        self.layers = []
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            L = {"attn_norm": self.vector(p + "attn_norm.weight"), "ffn_norm": self.vector(p + "ffn_norm.weight")}
            hq, hkv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
            self.load_qkv(L, p, hq, hkv, cfg.n_head_kv * cfg.head_dim_v)  # qwen2: Q/K/V biases
            L["attn_output"] = self.weight(p + "attn_output.weight")
            L["attn_output.bias"] = self.vector(p + "attn_output.bias", required=False)
            for n in ("attn_q_norm", "attn_k_norm"):  # qwen3 per-head norms
                L[n] = self.vector(p + n + ".weight", required=cfg.arch == "qwen3moe")
            if cfg.n_expert:  # Mixtral-style experts (llama), qwen3moe
                load_moe(self, L, p)
            else:
                for n in ("ffn_gate", "ffn_up", "ffn_down"):
                    L[n] = self.weight(p + n + ".weight")
                    L[n + ".bias"] = self.vector(p + n + ".bias", required=False)
            self.layers.append(L)

    def prepare(self, pos, rope_pos, n_kv):
        cos, sin = self.rope_tables(rope_pos, self.cfg.rope_base)
        # cis (cos + i sin, for rope's complex multiply) is made by the first block that rotates: the
        # one-call step never needs it
        ctx = {"cos": cos, "sin": sin, "cis": None, "mask": self.mask(pos, n_kv)}
        t = self.cfg.attn_temp_scale
        if t:  # mistral3 (llm_graph_input_attn_temp::set_input)
            scale = torch.log(torch.floor(pos.double() / self.cfg.n_ctx_orig) + 1.0) * t + 1.0
            ctx["attn_temp"] = scale.float()[:, None, None]
        return ctx

    def step_spec(self):
        """The layers for fastpath.Step: llama, qwen3 (per-head norms), smollm3 (layers without RoPE) and
        the routed experts of Mixtral-style llama and qwen3moe files (fastpath.ExpertFFN); not biases
        (qwen2), shared experts, granite's scalings or mistral3's attention temperature."""
        c = self.cfg
        if c.residual_scale or c.attn_temp_scale or any(c.is_swa(il) for il in range(c.n_layer)):
            return None
        layers = []
        for il, L in enumerate(self.layers):
            if any(L.get(n) is not None for n in ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
                                                   "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")):
                return None
            experts = None
            if c.n_expert:
                experts = fastpath.expert_ffn(self, il)
                if experts is None or L.get("ffn_up_shexp") is not None:
                    return None
            layers.append({"attn_norm": L["attn_norm"], "qkv": L.get("attn_qkv"), "q": L.get("attn_q"),
                           "k": L.get("attn_k"), "v": L.get("attn_v"), "q_norm": L["attn_q_norm"],
                           "k_norm": L["attn_k_norm"], "o": L["attn_output"], "ffn_norm": L["ffn_norm"],
                           "gate_up": L.get("ffn_gate_up"), "gate": L.get("ffn_gate"), "up": L.get("ffn_up"),
                           "down": L.get("ffn_down"), "moe": experts, "rope": int(c.has_rope(il)), "window": 0})
            if layers[-1]["qkv"] is not None:
                layers[-1].update(q=None, k=None, v=None)
            if layers[-1]["gate_up"] is not None:
                layers[-1].update(gate=None, up=None)
        return layers, "silu"

    def block(self, il, x, cache, start, ctx, trace):
        c, L = self.cfg, self.layers[il]
        cur = rms_norm(x, L["attn_norm"], self.eps())
        if trace:
            trace(f"attn_norm-{il}", cur)
        if ctx["rows"] is not None and "attn_temp" not in ctx:  # norms, RoPE, cache and attention in one call
            qkv, parts = fastpath.qkv_row(self, L, cur)
            rope_cs = (ctx["cos"], ctx["sin"]) if c.has_rope(il) else None
            att = fastpath.attend(self, il, qkv, parts, cache, ctx["rows"], rope_cs, c.rope_type == "neox", 0,
                                   L["attn_q_norm"], L["attn_k_norm"], c.attn_scale)
            return self.block_rest(il, L, x, att, trace)
        q, k, v = self.qkv(L, cur)
        if L["attn_q_norm"] is not None:  # qwen3
            q = rms_norm(q, L["attn_q_norm"], self.eps())
            k = rms_norm(k, L["attn_k_norm"], self.eps())
        if c.has_rope(il):  # smollm3: no RoPE on every 4th layer
            neox = c.rope_type == "neox"
            if not neox and ctx["cis"] is None:
                ctx["cis"] = torch.complex(ctx["cos"], ctx["sin"])
            q = rope(q, ctx["cos"], ctx["sin"], neox, ctx["cis"])
            k = rope(k, ctx["cos"], ctx["sin"], neox, ctx["cis"])
        if trace:
            trace(f"Qcur-{il}", q)
            trace(f"Kcur-{il}", k)
            trace(f"Vcur-{il}", v)
        if "attn_temp" in ctx:  # mistral3: Q times the per-position attention temperature
            q = q * ctx["attn_temp"]
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        att = self.attend(il, q, k, v, cache, start, ctx["mask"], c.attn_scale)
        return self.block_rest(il, L, x, att, trace)

    def block_rest(self, il, L, x, att, trace):
        """From the attention's output to the layer's output."""
        c = self.cfg
        if trace:
            trace(f"kqv_out-{il}", att)
        cur = qmatmul(att, L["attn_output"])
        if L["attn_output.bias"] is not None:
            cur = cur + L["attn_output.bias"]
        if trace:
            trace(f"attn_out-{il}", cur)
        if c.residual_scale:  # granite
            cur = cur * c.residual_scale
        ffn_inp = cur + x
        if trace:
            trace(f"ffn_inp-{il}", ffn_inp)
        cur = rms_norm(ffn_inp, L["ffn_norm"], self.eps())
        if trace:
            trace(f"ffn_norm-{il}", cur)
        if c.n_expert:
            cur = moe(self, L, cur, trace, il)
        else:
            cur = self.ffn(L, cur)
        if trace:
            trace(f"ffn_out-{il}", cur)
        if c.residual_scale:  # granite
            cur = cur * c.residual_scale
        out = cur + ffn_inp
        if trace:
            trace(f"l_out-{il}", out)
        return out

    def ffn(self, L, x):
        """build_ffn with LLM_FFN_SILU, LLM_FFN_PAR and the optional biases."""
        act = fastpath.gated(self, L, x, "silu")
        if act is not None:
            return qmatmul(act, L["ffn_down"]) if L.get("ffn_down.bias") is None else \
                qmatmul(act, L["ffn_down"]) + L["ffn_down.bias"]
        gate, up = self.project(x, L, ("ffn_gate", "ffn_up"), "ffn_gate_up")
        if L.get("ffn_gate.bias") is not None:
            gate = gate + L["ffn_gate.bias"]
        if L.get("ffn_up.bias") is not None:
            up = up + L["ffn_up.bias"]
        out = qmatmul(F.silu(gate) * up, L["ffn_down"])
        if L.get("ffn_down.bias") is not None:
            out = out + L["ffn_down.bias"]
        return out
