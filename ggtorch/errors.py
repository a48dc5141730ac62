"""One exception type per area. Each message says what was expected and what was found.

The CLI catches :class:`GGTorchError` and prints its message as one line (exit code 2).
"""


class GGTorchError(Exception):
    """Base class of every error ggtorch raises for bad input."""


class GGUFError(GGTorchError):
    """A GGUF file is malformed, truncated, or uses something this version cannot read."""


class QuantError(GGTorchError):
    """A tensor type is unknown or cannot be dequantized/used."""


class ModelError(GGTorchError):
    """A model file lacks a tensor or hyper-parameter the architecture needs, or is unsupported."""


class TokenizerError(GGTorchError):
    """The tokenizer metadata is missing or inconsistent."""


class GenerationError(GGTorchError):
    """A generation or sampling parameter is out of range."""


class ChatTemplateError(GGTorchError):
    """A chat template does not parse, refuses the messages (raise_exception), breaks the sandbox's
    rules, or exceeds its output/time limits."""


class ContextError(GenerationError):
    """The tokens do not fit the context window (n_ctx): the prompt plus the requested tokens, or a
    sequence that reached the end of its KV cache slot."""


class ToolCallError(GGTorchError):
    """``tools``, ``tool_choice`` or ``parallel_tool_calls`` are malformed (a tool without a name, a
    tool_choice naming a function that is not among the tools ...). ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConstraintError(GGTorchError):
    """A JSON schema, grammar or regex for structured output is malformed, unsupported by the
    constrained-decoding library, or took longer than its time limit to compile."""


class PipelineError(GGTorchError):
    """A layer-split pipeline (ggtorch.dist) cannot start, or a stage stopped answering: the process
    group, the stage count against the layers, a lost or silent peer."""


class LoRAError(GGTorchError):
    """A LoRA adapter is malformed or does not fit the base model (architecture, tensor names, shapes),
    or a finetuning parameter is out of range."""
