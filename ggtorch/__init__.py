"""ggtorch: run, inspect and debug GGUF language models on PyTorch, matching llama.cpp."""
from .errors import ContextError, GGTorchError, GGUFError, GenerationError, ModelError, QuantError, TokenizerError

__version__ = "0.1.0"


def load(model: str = "smollm2-135m", device: str = "cpu", threads: int | None = None, fast: bool = True,
         ggml_numerics: bool = False, **kw):
    """Load a .gguf file or a packaged model name ("smollm2-135m", "gemma3-270m"); see api.load
    (keywords such as n_ctx, kv_dtype, context_shift pass through)."""
    from .api import load as _load

    return _load(model, device=device, threads=threads, fast=fast, ggml_numerics=ggml_numerics, **kw)


def finetune(model, data, out=None, **kw):
    """Train a LoRA adapter on a GGUF model (frozen, quantized); see ggtorch.lora.train.finetune."""
    from .lora.train import finetune as _finetune

    return _finetune(model, data, out, **kw)


__all__ = ["load", "finetune", "ContextError", "GGTorchError", "GGUFError", "GenerationError", "ModelError", "QuantError", "TokenizerError"]
