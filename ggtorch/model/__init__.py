"""Architectures, one file per family, chosen by general.architecture."""
from ..errors import ModelError
from .config import SUPPORTED, Config
from .gemma2 import Gemma2
from .gemma3 import Gemma3
from .gptoss import GptOss
from .granite import Granite
from .llama import Llama
from .mistral3 import Mistral3
from .olmo2 import Olmo2
from .phi3 import Phi3
from .qwen3moe import Qwen3MoE
from .smollm3 import SmolLM3

ARCHITECTURES = {"llama": Llama, "qwen2": Llama, "qwen3": Llama, "gemma3": Gemma3, "qwen3moe": Qwen3MoE,
                 "gpt-oss": GptOss, "gemma2": Gemma2, "phi3": Phi3, "granite": Granite, "olmo2": Olmo2,
                 "smollm3": SmolLM3, "mistral3": Mistral3}
assert set(ARCHITECTURES) == set(SUPPORTED)


def build(f, device="cpu"):
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise ModelError(f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    cfg = Config.from_gguf(f)
    return ARCHITECTURES[cfg.arch](f, cfg, device)
