"""Mistral 3 (src/models/mistral3.cpp): the llama graph with YaRN RoPE (read from rope.scaling.* like
every architecture, see Config and layers.rope_cache_yarn) and, when attention.temperature_scale is set,
Q multiplied after RoPE by 1 + scale * ln(floor(pos / n_ctx_orig) + 1) (llm_graph_input_attn_temp), with
n_ctx_orig = rope.scaling.original_context_length. Llama.prepare/block apply both."""
from __future__ import annotations

from .llama import Llama


class Mistral3(Llama):
    pass
