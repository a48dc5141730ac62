"""Qwen3-MoE (src/models/qwen3moe.cpp): qwen3's attention (per-head Q/K RMS norms before NEOX RoPE,
head_dim from attention.key_length) with a softmax top-k MoE renormalized over the chosen experts in
every layer. The expert width is expert_feed_forward_length (feed_forward_length is not used by the
graph). The graph is the llama one with these tensors, so the class is Llama's."""
from __future__ import annotations

from .llama import Llama


class Qwen3MoE(Llama):
    pass
