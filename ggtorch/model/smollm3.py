"""SmolLM3 (src/models/smollm3.cpp): llama with no RoPE ("NoPE") on the layers where (il + 1) % 4 == 0
(hparams.n_no_rope_layer_step = 4); everything else is the llama graph, so Llama.block runs it with
Config.has_rope deciding per layer."""
from __future__ import annotations

from .llama import Llama


class SmolLM3(Llama):
    pass
