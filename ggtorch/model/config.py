"""Hyper-parameters, read once from `{general.architecture}.*` metadata into a frozen dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ModelError

# RoPE layout per architecture (llama_model_rope_type): "normal" rotates adjacent pairs (the converter
# permuted Q/K for llama), "neox" rotates the two halves of each head.
ROPE_TYPES = {"llama": "normal", "qwen2": "neox", "qwen3": "neox", "gemma3": "neox"}
SUPPORTED = tuple(ROPE_TYPES)


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
    rope_freq_scale: float  # 1 / rope.scaling.factor for linear scaling
    rope_base_local: float  # gemma3's sliding-window layers
    sliding_window: int  # 0 = none
    swa_period: int  # every swa_period-th layer is global (gemma3: 6)
    attn_scale: float
    embed_scale: float

    def is_swa(self, il: int) -> bool:
        """llama_hparams::set_swa_pattern: layers whose index is not (period-1) mod period are local."""
        return self.sliding_window > 0 and self.swa_period > 0 and (il % self.swa_period) < self.swa_period - 1

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

        n_embd = int(need("embedding_length"))
        n_head = scalar(need("attention.head_count"))
        n_head_kv = scalar(f.arch_key("attention.head_count_kv", n_head))
        head_dim = int(f.arch_key("attention.key_length", n_embd // n_head))
        head_dim_v = int(f.arch_key("attention.value_length", head_dim))
        tok = f.get("tokenizer.ggml.tokens")
        n_vocab = int(f.arch_key("vocab_size", len(tok) if tok is not None else 0))
        if n_vocab <= 0:
            emb = f.tensors.get("token_embd.weight")
            n_vocab = emb.shape[1] if emb else 0
        scaling = f.arch_key("rope.scaling.type", "none")
        factor = float(f.arch_key("rope.scaling.factor", 0.0) or 0.0)
        freq_scale = 1.0 / factor if scaling == "linear" and factor > 0 else 1.0
        gemma = arch == "gemma3"
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        return cls(
            arch=arch,
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=int(need("block_count")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_ff=scalar(need("feed_forward_length")),
            n_ctx_train=int(f.arch_key("context_length", 4096)),
            rms_eps=float(f.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_type=ROPE_TYPES[arch],
            n_rot=int(f.arch_key("rope.dimension_count", head_dim)),
            rope_base=float(f.arch_key("rope.freq_base", 10000.0)),
            rope_freq_scale=freq_scale,
            rope_base_local=float(f.arch_key("rope.freq_base_swa", 10000.0)) if gemma else 0.0,
            sliding_window=int(f.arch_key("attention.sliding_window", 0) or 0) if gemma else 0,
            swa_period=6 if gemma else 0,
            # gemma3: llama_model::load_hparams sets f_attention_scale = 1/sqrt(key_length)
            attn_scale=1.0 / math.sqrt(head_dim),
            embed_scale=math.sqrt(n_embd) if gemma else 1.0,
        )
