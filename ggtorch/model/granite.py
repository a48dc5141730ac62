"""Granite (src/models/granite.cpp): the llama graph with four scalars: input embeddings times
embedding_scale (Config.embed_scale), both branch outputs (attention and FFN) times residual_scale
before their residual adds, attention.scale as the kq scale (Config.attn_scale), and the logits divided
by logit_scale (Transformer.head). Granite-MoE files (experts, shared experts) take the MoE branch."""
from __future__ import annotations

from .llama import Llama


class Granite(Llama):
    pass
