"""Hyper-parameters, read once from `{general.architecture}.*` metadata into a frozen dataclass.

What llama_model_base::load_hparams reads for every architecture is read here for every architecture;
the per-architecture keys and defaults (llama_model_<arch>::load_arch_hparams) are in the tables below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ModelError

# RoPE layout per architecture (llama_model_rope_type): "normal" rotates adjacent pairs (the converter
# permuted Q/K for llama), "neox" rotates the two halves of each head.
ROPE_TYPES = {"llama": "normal", "qwen2": "neox", "qwen3": "neox", "gemma3": "neox", "qwen3moe": "neox",
              "gpt-oss": "neox", "gemma2": "neox", "phi3": "neox", "granite": "normal", "olmo2": "neox",
              "smollm3": "normal", "mistral3": "normal"}
SUPPORTED = tuple(ROPE_TYPES)
# load_swa_pattern(ml, n) per architecture: layer il is sliding-window when il % n < n - 1
SWA_PATTERN = {"gemma3": 6, "gemma2": 2, "gpt-oss": 2, "olmo2": 4}
SWA_DEFAULT = {"gemma2": 4096}  # hparams.n_swa when the file has no attention.sliding_window
# MoE gating (llama_expert_gating_func_type) and whether the chosen weights are renormalized (norm_w),
# as each architecture's graph passes them to build_moe_ffn
MOE_GATING = {"llama": ("softmax", True), "qwen3moe": ("softmax", True), "gpt-oss": ("softmax_weight", False),
              "granite": ("softmax", True), "mistral3": ("softmax", True), "phi3": ("softmax", True)}
# keys an architecture needs beyond the common ones (ml.get_key without `false`)
REQUIRED = {"gpt-oss": ("expert_feed_forward_length", "attention.sliding_window"), "granite": ("logit_scale",),
            "qwen3moe": ("expert_count", "expert_used_count")}


@dataclass(frozen=True)
class Config:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # attention.key_length
    head_dim_v: int  # attention.value_length
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_type: str
    n_rot: int
    rope_base: float
    rope_freq_scale: float  # 1 / rope.scaling.factor (linear and YaRN)
    rope_base_local: float  # the sliding-window layers' base (rope.freq_base_swa)
    sliding_window: int  # 0 = none
    swa_period: int  # load_swa_pattern's n (kept for callers of is_swa)
    attn_scale: float
    embed_scale: float
    # RoPE scaling (llama_context's cparams.yarn_*): ext_factor 0 = plain (linear) scaling
    rope_scaling: str = "linear"
    yarn_ext_factor: float = 0.0
    yarn_attn_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    n_ctx_orig: int = 0
    swa_layers: tuple = ()  # per layer: True = sliding-window attention
    attn_softcap: float = 0.0  # gemma2: tanh cap on the attention scores (0 = none)
    final_softcap: float = 0.0  # gemma2: tanh cap on the logits
    residual_scale: float = 0.0  # granite: both branch outputs times this (0 = none)
    logit_scale: float = 0.0  # granite: logits divided by this (0 = none)
    attn_temp_scale: float = 0.0  # mistral3: Q times 1 + s*ln(floor(pos/n_ctx_orig) + 1) (0 = none)
    no_rope_step: int = 0  # smollm3: layers with (il + 1) % step == 0 have no RoPE
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    expert_gating: str = "softmax"
    expert_norm: bool = False
    expert_weights_scale: float = 0.0

    def is_swa(self, il: int) -> bool:
        """llama_hparams::is_swa: the per-layer pattern set by load_swa_pattern."""
        return self.sliding_window > 0 and il < len(self.swa_layers) and bool(self.swa_layers[il])

    def has_rope(self, il: int) -> bool:
        return not (self.no_rope_step and (il + 1) % self.no_rope_step == 0)

    @classmethod
    def from_gguf(cls, f) -> "Config":
        arch = f.architecture
        if arch not in ROPE_TYPES:
            raise ModelError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED)}")

        def need(key):
            v = f.arch_key(key)
            if v is None:
                raise ModelError(f"missing hyper-parameter {arch}.{key} in {f.path}")
            return v

        def scalar(v):  # per-layer arrays: these models use one value for all layers
            return int(v[0]) if hasattr(v, "__len__") else int(v)

        for k in REQUIRED.get(arch, ()):
            need(k)
        n_embd = int(need("embedding_length"))
        n_layer = int(need("block_count"))
        n_head = scalar(need("attention.head_count"))
        n_head_kv = scalar(f.arch_key("attention.head_count_kv", n_head))
        head_dim = int(f.arch_key("attention.key_length", n_embd // n_head))
        head_dim_v = int(f.arch_key("attention.value_length", head_dim))
        tok = f.get("tokenizer.ggml.tokens")
        n_vocab = int(f.arch_key("vocab_size", len(tok) if tok is not None else 0))
        if n_vocab <= 0:
            emb = f.tensors.get("token_embd.weight")
            n_vocab = emb.shape[1] if emb else 0
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        n_ctx_train = int(f.arch_key("context_length", 4096))
        rope_base = float(f.arch_key("rope.freq_base", 10000.0))

        # RoPE scaling (llama_model_base::load_hparams, then llama_context's constructor)
        scaling = str(f.arch_key("rope.scaling.type", "linear"))
        factor = float(f.arch_key("rope.scaling.factor", 0.0) or f.arch_key("rope.scale_linear", 0.0) or 0.0)
        freq_scale = 1.0 / factor if factor else 1.0
        if scaling == "none":
            freq_scale = 1.0
        n_ctx_orig = int(f.arch_key("rope.scaling.original_context_length", 0) or n_ctx_train)
        ext = 1.0 if scaling == "yarn" else 0.0
        attn_factor = 1.0
        if ext:
            def mscale(s, m):
                return 1.0 if s <= 1.0 else 0.1 * m * math.log(s) + 1.0
            fac = 1.0 / freq_scale
            log_mul = float(f.arch_key("rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
            attn_factor = mscale(fac, 1.0) / mscale(fac, log_mul) if log_mul else mscale(fac, 1.0)
            attn_factor /= 1.0 + 0.1 * math.log(fac)  # ggml's rope multiplies this back in
        attn_factor *= float(f.arch_key("rope.scaling.attn_factor", 1.0) or 1.0)

        # sliding-window attention (load_swa_pattern)
        window = int(f.arch_key("attention.sliding_window", SWA_DEFAULT.get(arch, 0)) or 0)
        period = SWA_PATTERN.get(arch, 0) if window else 0
        pattern = f.arch_key("attention.sliding_window_pattern")
        if hasattr(pattern, "__len__") and window:
            swa_layers = tuple(bool(x) for x in list(pattern)[:n_layer])
        else:
            if pattern is not None and window:
                period = int(pattern)
            swa_layers = tuple(period == 0 or il % period < period - 1 for il in range(n_layer)) if period else ()
        if not any(swa_layers):  # no sliding-window layer (phi3: llama.cpp disables its SWA; llama/qwen2 ignore it)
            window, swa_layers = 0, ()
        base_swa = float(f.arch_key("rope.freq_base_swa", 10000.0 if arch == "gemma3" else rope_base))

        # experts
        n_expert = int(f.arch_key("expert_count", 0) or 0)
        n_used = scalar(f.arch_key("expert_used_count", 0) or 0)
        n_ff = scalar(f.arch_key("feed_forward_length", 0) or 0)
        if not n_ff and arch != "gpt-oss":
            need("feed_forward_length")
        n_ff_exp = scalar(f.arch_key("expert_feed_forward_length", 0) or 0)
        if n_expert and not n_ff_exp:
            n_ff_exp = n_ff // n_used if arch == "qwen3moe" and n_used else n_ff
        if n_expert and not 0 < n_used <= n_expert:
            raise ModelError(f"{arch}.expert_used_count is {n_used}; expected 1..{n_expert} (expert_count)")
        gating, norm_w = MOE_GATING.get(arch, ("softmax", True))
        gating = {1: "softmax", 2: "sigmoid", 3: "softmax_weight"}.get(
            int(f.arch_key("expert_gating_func", 0) or 0), gating)
        if f.arch_key("expert_weights_norm") is not None and arch not in MOE_GATING:
            norm_w = bool(f.arch_key("expert_weights_norm"))

        # attention scale: gemma2/gemma3 1/sqrt(key_length); granite/mistral3/llama attention.scale
        attn_scale = 1.0 / math.sqrt(head_dim)
        if arch == "granite" and f.arch_key("attention.scale"):  # the only one here that reads it
            attn_scale = float(f.arch_key("attention.scale"))
        gemma = arch in ("gemma2", "gemma3")
        embed_scale = math.sqrt(n_embd) if gemma else 1.0
        if arch == "granite" and f.arch_key("embedding_scale"):
            embed_scale = float(f.arch_key("embedding_scale"))
        temp = float(f.arch_key("attention.temperature_scale", 0.0) or 0.0) if arch == "mistral3" else 0.0
        return cls(
            arch=arch,
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_ff=n_ff,
            n_ctx_train=n_ctx_train,
            rms_eps=float(f.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_type=ROPE_TYPES[arch],
            n_rot=int(f.arch_key("rope.dimension_count", head_dim)),
            rope_base=rope_base,
            rope_freq_scale=freq_scale,
            rope_base_local=base_swa,
            sliding_window=window,
            swa_period=period,
            attn_scale=attn_scale,
            embed_scale=embed_scale,
            rope_scaling=scaling,
            yarn_ext_factor=ext,
            yarn_attn_factor=attn_factor,
            yarn_beta_fast=float(f.arch_key("rope.scaling.yarn_beta_fast", 32.0)),
            yarn_beta_slow=float(f.arch_key("rope.scaling.yarn_beta_slow", 1.0)),
            n_ctx_orig=n_ctx_orig,
            swa_layers=swa_layers,
            attn_softcap=float(f.arch_key("attn_logit_softcapping", 50.0)) if arch == "gemma2" else 0.0,
            final_softcap=float(f.arch_key("final_logit_softcapping", 30.0)) if arch == "gemma2" else 0.0,
            residual_scale=float(f.arch_key("residual_scale", 0.0) or 0.0) if arch == "granite" else 0.0,
            logit_scale=float(f.arch_key("logit_scale", 0.0) or 0.0) if arch == "granite" else 0.0,
            attn_temp_scale=temp,
            # smollm3: n_no_rope_layer_step 4; granite: rope.scaling.finetuned false switches RoPE off (step 1)
            no_rope_step=4 if arch == "smollm3" else (
                1 if arch == "granite" and f.arch_key("rope.scaling.finetuned", True) is False else 0),
            n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_exp=n_ff_exp,
            expert_gating=gating,
            expert_norm=norm_w,
            expert_weights_scale=float(f.arch_key("expert_weights_scale", 0.0) or 0.0),
        )


def describe(cfg: Config) -> dict:
    """The hyper-parameters that shape an architecture's graph, as ggtorch reads them (for inspect)."""
    d = {"arch": cfg.arch, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
         "n_head_kv": cfg.n_head_kv, "head_dim": cfg.head_dim, "n_rot": cfg.n_rot, "rope": cfg.rope_type,
         "rope_base": cfg.rope_base, "rope_scaling": cfg.rope_scaling if cfg.rope_freq_scale != 1.0 else "none",
         "n_ff": cfg.n_ff, "rms_eps": cfg.rms_eps, "attn_scale": round(cfg.attn_scale, 6)}
    if cfg.rope_freq_scale != 1.0:
        d["rope_factor"] = 1.0 / cfg.rope_freq_scale
    if cfg.yarn_ext_factor:
        d["yarn"] = {"n_ctx_orig": cfg.n_ctx_orig, "attn_factor": cfg.yarn_attn_factor,
                     "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}
    if cfg.sliding_window:
        d["sliding_window"] = cfg.sliding_window
        d["swa_layers"] = [il for il in range(cfg.n_layer) if cfg.is_swa(il)]
    if cfg.n_expert:
        d["experts"] = {"count": cfg.n_expert, "used": cfg.n_expert_used, "width": cfg.n_ff_exp,
                        "gating": cfg.expert_gating, "renormalize": cfg.expert_norm}
    for k in ("attn_softcap", "final_softcap", "residual_scale", "logit_scale", "attn_temp_scale", "no_rope_step"):
        if getattr(cfg, k):
            d[k] = getattr(cfg, k)
    if cfg.embed_scale != 1.0:
        d["embed_scale"] = cfg.embed_scale
    return d


def validate(f, cfg: Config) -> list[str]:
    """Problems llama.cpp would refuse the file for, beyond what from_gguf already raises: tensor
    shapes against the hyper-parameters (experts, router, fused QKV, RoPE width)."""
    problems = []
    if cfg.n_rot > cfg.head_dim or cfg.n_rot % 2:
        problems.append(f"{cfg.arch}.rope.dimension_count {cfg.n_rot} must be even and at most the head size {cfg.head_dim}")
    if cfg.arch in ("llama", "granite", "smollm3", "mistral3", "qwen3moe") and cfg.n_rot != cfg.head_dim:
        problems.append(f"{cfg.arch}: rope.dimension_count {cfg.n_rot} differs from the head size {cfg.head_dim}")
    if cfg.arch in ("qwen3moe", "gpt-oss") and not cfg.n_expert:
        problems.append(f"{cfg.arch} needs {cfg.arch}.expert_count > 0")
    n_q, n_kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        gi = f.tensors.get(p + "ffn_gate_inp.weight")
        if cfg.n_expert and gi is None:
            problems.append(f"{p}ffn_gate_inp.weight is missing but expert_count is {cfg.n_expert}")
        elif gi is not None and gi.shape[-1] != cfg.n_expert:
            problems.append(f"{p}ffn_gate_inp.weight routes to {gi.shape[-1]} experts; expert_count is {cfg.n_expert}")
        for n in ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps"):
            t = f.tensors.get(p + n + ".weight")
            if t is not None and (len(t.shape) != 3 or t.shape[2] != cfg.n_expert):
                problems.append(f"{p}{n}.weight has shape {list(t.shape)}; expected {{.., .., {cfg.n_expert}}}")
        qkv = f.tensors.get(p + "attn_qkv.weight")
        if qkv is not None and qkv.shape[-1] != n_q + n_kv + cfg.n_head_kv * cfg.head_dim_v:
            problems.append(f"{p}attn_qkv.weight has {qkv.shape[-1]} rows; expected {n_q} + {n_kv} + {n_kv}")
        if qkv is None and f.tensors.get(p + "attn_q.weight") is None:
            problems.append(f"{p}: neither attn_qkv nor attn_q/k/v")
    return problems
