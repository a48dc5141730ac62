"""Architectures, one file per family, chosen by general.architecture."""
from ..errors import ModelError
from .config import Config
from .gemma3 import Gemma3
from .llama import Llama

ARCHITECTURES = {"llama": Llama, "qwen2": Llama, "qwen3": Llama, "gemma3": Gemma3}


def build(f, device="cpu"):
    cfg = Config.from_gguf(f)
    cls = ARCHITECTURES.get(cfg.arch)
    if cls is None:
        raise ModelError(f"architecture {cfg.arch!r} is not supported")
    return cls(f, cfg, device)
