"""The Python API: load a model once, then tokenize, detokenize, score and generate.

    m = ggtorch.load("smollm2-135m")          # or a .gguf path
    m.generate("Hello", max_tokens=32).text
    for piece in m.stream("Hello"): print(piece, end="")
"""
from __future__ import annotations

import math
import re
import time
import warnings
from functools import cached_property
from typing import Iterator

import torch

from .errors import ContextError, GenerationError, ModelError
from .generate import Result, Timings, check_fits, generate_tokens
from .gguf.reader import GGUFFile
from .model import build
from .packaged import resolve
from .sampling import SamplingParams


N_CTX_CAP = 4096  # the default context: the trained one, capped here (a KV cache grows only as used)
KV_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_KV = "f16"  # llama.cpp's default; keeps the fidelity bounds (tests/test_real_models.py)


def kv_dtype_of(name) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in KV_DTYPES.values():
        return name
    key = str(name).lower().removeprefix("torch.").replace("float", "f")
    key = {"f": "f32", "half": "f16", "bfloat16": "bf16", "bf": "bf16"}.get(key, key)
    if key not in KV_DTYPES:
        raise GenerationError(f"KV cache type must be one of {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[key]


class Model:
    def __init__(self, path: str, device: str = "cpu", threads: int | None = None, fast: bool = True,
                 ggml_numerics: bool = False, n_ctx: int | None = None, kv_dtype=None, context_shift: bool = False,
                 cache: bool = True, lora=None):
        fast = fast and not ggml_numerics  # the numerics mode runs on the exact path
        if threads:
            torch.set_num_threads(int(threads))
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
            raise ModelError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError("--device cuda asked for, but PyTorch sees no CUDA device")
        if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} CUDA device(s)")
        if ggml_numerics and device != "cpu":
            raise ModelError("--ggml-numerics reproduces llama.cpp's CPU roundings and runs on --device cpu only")
        t0 = time.perf_counter()
        self.path = resolve(path)
        self.file = GGUFFile(self.path)
        self.net = build(self.file, device)
        if self.net.device.type == "cuda":
            self.net.ubatch = 512  # prompt slices as llama.cpp's n_ubatch: a GPU gains from longer ones
        self.cfg = self.net.cfg
        self.fast = fast
        self.repack_cache = "off"  # "hit", "miss" (repacked, then stored) or "off" (see quant.cache)
        if fast:
            self.repack_cache = self.net.install_fast(cache)
        if ggml_numerics:
            self.net.use_ggml_numerics()
        if lora:
            self.set_lora(lora)
        self.device = device
        self._set_context(n_ctx, kv_dtype, context_shift)
        self.load_s = time.perf_counter() - t0

    def set_lora(self, adapters) -> None:
        """Replace the active LoRA adapters: a list of paths (llama.cpp adapter .gguf or PEFT
        directory), (path, scale) pairs or loaded ``ggtorch.lora.Adapter`` objects; [] for the base model."""
        from .lora import install

        install(self.net, adapters)
        if getattr(self, "_session", None) is not None:  # its KV cache was computed with the old adapters
            self.reset_chat()

    @property
    def loras(self) -> list:
        """[(Adapter, scale)] active on this model."""
        return list(getattr(self.net, "loras", []))

    @cached_property
    def tokenizer(self) -> "Tokenizer":  # noqa: F821
        """Built on first use (its tables take ~30 MB and ~0.1 s on a 49k vocabulary): scoring token
        ids and benchmarks never need it."""
        from .tokenizer import Tokenizer

        return Tokenizer(self.file.metadata)

    def _set_context(self, n_ctx, kv_dtype, context_shift) -> None:
        self.n_ctx_train = self.cfg.n_ctx_train
        if n_ctx is None or int(n_ctx) == 0:  # 0 = the default, as llama.cpp's -c 0 means "from the model"
            n_ctx = min(self.n_ctx_train, N_CTX_CAP) if self.n_ctx_train > 0 else N_CTX_CAP
        n_ctx = int(n_ctx)
        if n_ctx < 1:
            raise ContextError(f"n_ctx must be a positive number of tokens, got {n_ctx}")
        if 0 < self.n_ctx_train < n_ctx:
            warnings.warn(f"n_ctx {n_ctx} is above the model's trained context ({self.n_ctx_train} tokens): "
                          f"text past {self.n_ctx_train} tokens may be unreliable", stacklevel=3)
        self.n_ctx = n_ctx
        self.kv_dtype = kv_dtype_of(DEFAULT_KV if kv_dtype is None else kv_dtype)
        self.net.kv_dtype = self.kv_dtype
        self.context_shift = bool(context_shift)

    def new_cache(self):
        """A one-sequence KV cache of this model's n_ctx and KV type (memory grows as it fills)."""
        return self.net.new_pool(1, self.n_ctx)

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token of context (all layers, K and V, this model's KV type)."""
        c = self.cfg
        return c.n_layer * c.n_head_kv * (c.head_dim + c.head_dim_v) * torch.empty(0, dtype=self.kv_dtype).element_size()

    @property
    def kv_type(self) -> str:
        return {v: k for k, v in KV_DTYPES.items()}[self.kv_dtype]

    def context_info(self) -> str:
        """One line: the context and KV cache chosen (shown by the CLI on stderr)."""
        kv = self.kv_type
        mib = self.kv_bytes_per_token() * self.n_ctx / 2**20
        return (f"n_ctx {self.n_ctx} (trained {self.n_ctx_train}), KV cache {kv}: "
                f"{self.kv_bytes_per_token() / 1024:.1f} KiB per token, {mib:.1f} MiB when full")

    @property
    def n_vocab(self) -> int:
        return self.cfg.n_vocab

    # ---- text <-> ids --------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False, bos: bool = False) -> list[int]:
        return self.tokenizer.tokenize(text, special=special, bos=bos)

    def detokenize(self, ids, special: bool = False) -> str:
        return self.tokenizer.detokenize([int(i) for i in ids], special=special)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, special=True, bos=True)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise GenerationError("the prompt is empty (no tokens)")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        return ids

    # ---- scoring ---------------------------------------------------------------------------------
    def logits(self, ids, batch: int = 512) -> torch.Tensor:
        """float32 [len(ids), n_vocab]: the logits at every position."""
        ids = self._prompt_ids(ids)
        if len(ids) > self.n_ctx:
            raise ContextError(f"{len(ids)} tokens do not fit the context n_ctx {self.n_ctx}")
        cache = self.net.new_cache(len(ids))
        outs = [self.net.forward(ids[i:i + batch], cache, all_logits=True) for i in range(0, len(ids), batch)]
        return torch.cat(outs).float().cpu()

    # ---- generation ------------------------------------------------------------------------------
    def _params(self, kw) -> tuple[SamplingParams, int | None, list[str], bool]:
        max_tokens = kw.pop("max_tokens", 64)
        max_tokens = None if max_tokens is None or int(max_tokens) == -1 else int(max_tokens)  # -1: to the context
        if max_tokens is not None and max_tokens < 0:
            raise GenerationError("max_tokens must be >= 0 (or -1 / None: until the context is full)")
        stop = kw.pop("stop", None) or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        ignore_eos = bool(kw.pop("ignore_eos", False))
        try:
            params = SamplingParams(**kw)
        except TypeError as e:
            raise GenerationError(str(e)) from None
        return params, max_tokens, stop, ignore_eos

    def _grammar(self, kw):
        """Pops ``json_schema`` (a dict, JSON text or pydantic model) and ``grammar`` (llama.cpp GBNF
        text) from kw: the compiled constraint (ggtorch.constrain), or None when neither is given.
        A bad one raises :class:`ggtorch.errors.ConstraintError`."""
        schema, grammar = kw.pop("json_schema", None), kw.pop("grammar", None)
        if schema is None and grammar is None:
            return None
        from .constrain import compile_constraint

        return compile_constraint(self.tokenizer, json_schema=schema, grammar=grammar)

    def steps(self, prompt, **kw):
        kw = dict(kw)
        shift = bool(kw.pop("context_shift", self.context_shift))
        n_keep = int(kw.pop("n_keep", 0))
        grammar = self._grammar(kw)
        params, max_tokens, stop, ignore_eos = self._params(kw)
        ids = self._prompt_ids(prompt)
        check_fits(len(ids), max_tokens, self.n_ctx, shift)  # before any work
        timings = Timings()
        return ids, timings, generate_tokens(self, ids, max_tokens, params, stop, ignore_eos, timings,
                                             context_shift=shift, n_keep=n_keep,
                                             constraint=grammar.new() if grammar is not None else None)

    def stream(self, prompt, **kw) -> Iterator[str]:
        """Text pieces as they are generated (never a broken UTF-8 character)."""
        _, _, it = self.steps(prompt, **kw)
        for step in it:
            if step.piece:
                yield step.piece

    def generate(self, prompt, **kw) -> Result:
        """Generate a continuation: ``prompt`` is text (BOS added as the metadata says, special tokens
        parsed) or token ids. Keywords: max_tokens, temperature, top_k, top_p, min_p, typical_p,
        repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, logit_bias, seed, stop,
        ignore_eos; context_shift (default: as loaded) and n_keep (tokens kept after BOS when the
        context shifts); json_schema (a dict, JSON text or pydantic model: the output is JSON that
        validates) or grammar (llama.cpp GBNF text): structured output, see ggtorch.constrain. ``max_tokens=None`` generates until the context is full. A prompt plus
        max_tokens over n_ctx raises :class:`ggtorch.errors.ContextError` before any work."""
        ids, timings, it = self.steps(prompt, **kw)
        out, text, reason = [], [], "length"
        for step in it:
            out.append(step.token)
            text.append(step.piece)
            if step.finish_reason:
                reason = step.finish_reason
        return Result(ids, out, "".join(text), reason, timings)

    def generate_batch(self, prompts, parallel: int = 4, **kw) -> list[Result]:
        """Generate for several prompts at once, ``parallel`` sequences decoded together in one
        forward per step (continuous batching, see ggtorch.batch); keywords as :meth:`generate`.
        Returns one Result per prompt, in order."""
        from .batch import generate_batch

        return generate_batch(self, list(prompts), parallel=parallel, **kw)

    # ---- chat (ggtorch/chat.py) -------------------------------------------------------------------
    def chat_template(self, name: str | None = None) -> tuple[str, str]:
        """(source, description) of the chat template: the file's own, a named variant, a built-in or a
        template file; llama.cpp's default (ChatML) for a file without one."""
        from .chat import model_template

        return model_template(self.file.metadata, name)

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True, tokenize: bool = False,
                            template: str | None = None, **kwargs):
        """The prompt text (or, with ``tokenize``, its token ids) for ``messages``, as Hugging Face's
        ``apply_chat_template``; ``kwargs`` reach the template (``enable_thinking`` ...). As llama.cpp does,
        a BOS that the template renders first is dropped when the tokenizer adds one itself, and the text
        is tokenized with special tokens parsed."""
        from .chat import apply_template, fit_content, normalize_messages

        tok = self.tokenizer
        source, _ = self.chat_template(template)
        bos = tok.detokenize([tok.bos_id], special=True) if tok.bos_id is not None else ""
        eos = tok.detokenize([tok.eos_id], special=True) if tok.eos_id is not None else ""
        msgs = fit_content(source, normalize_messages(messages))
        text = apply_template(source, msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                              bos_token=bos, eos_token=eos, **kwargs)
        if tok.add_bos and bos and text.startswith(bos):  # common_chat_template_direct_apply_impl
            text = text[len(bos):]
        if tok.add_eos and eos and text.endswith(eos):
            text = text[:-len(eos)]
        return tok.tokenize(text, special=True, bos=True, eos=True) if tokenize else text

    def chat_steps(self, messages, tools=None, template: str | None = None, chat_template_kwargs=None, **kw):
        """(prompt ids, timings, description of the template, steps): a turn on the session's KV cache."""
        from .chat import ChatSession

        kw = dict(kw)
        kw.setdefault("max_tokens", 512)
        shift = bool(kw.pop("context_shift", self.context_shift))
        n_keep = int(kw.pop("n_keep", 0))
        grammar = self._grammar(kw)
        params, max_tokens, stop, ignore_eos = self._params(kw)
        messages = list(messages)
        while True:
            ids = self._prompt_ids(self.apply_chat_template(messages, tools=tools, tokenize=True, template=template,
                                                            **(chat_template_kwargs or {})))
            if not (shift and self.n_ctx and len(ids) + (max_tokens or 0) > self.n_ctx):
                break
            shorter = _drop_oldest_turn(messages)  # with context shift on, old turns make room
            if shorter is None:
                break
            messages = shorter
        check_fits(len(ids), max_tokens, self.n_ctx, shift)  # the whole history must fit, before any work
        if getattr(self, "_session", None) is None:
            self._session = ChatSession(self)
        timings = Timings()
        steps = self._session.steps(ids, max_tokens, params, stop, ignore_eos, timings,
                                    context_shift=shift, n_keep=n_keep,
                                    constraint=grammar.new() if grammar is not None else None)
        return ids, timings, self.chat_template(template)[1], steps

    def chat_stream(self, messages, **kw) -> Iterator[str]:
        """The assistant's answer as text pieces (never a broken UTF-8 character); keywords as :meth:`chat`
        (the raw text: a forced tool call is enforced, parsing is :meth:`chat`'s or ggtorch.toolcall's)."""
        kw, _ = self._chat_tools(messages, kw)
        _, _, _, steps = self.chat_steps(self._chat_messages(messages, kw), **kw)
        try:
            for step in steps:
                if step.piece:
                    yield step.piece
        finally:  # stopping early (close, Ctrl-C) leaves the session cache consistent
            steps.close()

    def chat(self, messages, **kw):
        """Answer a conversation through the model's chat template: ``messages`` are ``{"role", "content"}``
        dicts. Keywords: tools, tool_choice ("auto", "none", "required" or {"type": "function", "function":
        {"name": ...}}: the last two are enforced with a grammar), parallel_tool_calls; the answer's calls
        are parsed in the template's format (ggtorch.toolcall) into ``tool_calls`` (finish_reason
        "tool_calls"), with ``content`` and ``reasoning_content`` beside them. Also: template (a variant
        name, "chatml", "gemma" or a file), chat_template_kwargs (e.g. ``{"enable_thinking": False}``)
        and the sampling keywords of :meth:`generate`
        (max_tokens defaults to 512). Generation stops at the model's end-of-turn tokens. A follow-up turn
        reuses the KV cache of the previous one for the common prefix (:meth:`reset_chat` drops it)."""
        from .chat import ChatResult

        kw, tools = self._chat_tools(messages, kw)
        messages = self._chat_messages(messages, kw)
        ids, timings, label, steps = self.chat_steps(messages, **kw)
        out, text, reason = [], [], "length"
        for step in steps:
            out.append(step.token)
            text.append(step.piece)
            reason = step.finish_reason or reason
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
        res = ChatResult("".join(text), reason, usage, ids, out, timings, label)
        return self._chat_parse(res, tools, kw)

    # ---- tool calls (ggtorch.toolcall) --------------------------------------------------------------
    def _chat_tools(self, messages, kw: dict):
        """Split tool_choice / parallel_tool_calls off the keywords; the template sees the tools unless
        tool_choice is none. A forced call (required / named) is enforced with a grammar (Lark, which
        ggtorch.constrain's ``grammar=`` takes as well as GBNF)."""
        from .errors import ToolCallError
        from .toolcall import ToolSpec

        kw = dict(kw)
        spec = ToolSpec(kw.pop("tools", None), kw.pop("tool_choice", None), kw.pop("parallel_tool_calls", None))
        kw["tools"] = spec.render_tools
        if spec.forced:
            if kw.get("grammar") is not None or kw.get("json_schema") is not None:
                raise ToolCallError("a forced tool call (tool_choice required or named) cannot be combined with "
                                    "json_schema or grammar", "tool_choice")
            src = self.chat_template(kw.get("template"))[0]
            prompt = self.apply_chat_template(self._chat_messages(messages, kw), tools=spec.render_tools,
                                              template=kw.get("template"),
                                              **(kw.get("chat_template_kwargs") or {}))
            kw["grammar"] = spec.grammar(src, prompt)
        return kw, spec

    def _chat_messages(self, messages, kw):
        """For a template that ignores tools, the tools said in a system message (ggtorch.toolcall)."""
        from .toolcall import template_takes_tools, with_tools_prompt

        if kw.get("tools") and not template_takes_tools(self.chat_template(kw.get("template"))[0]):
            return with_tools_prompt(list(messages), kw["tools"])
        return messages

    def _chat_parse(self, res, spec, kw):
        from .toolcall import parse_ids

        src = self.chat_template(kw.get("template"))[0]
        if not (spec.parse_calls or "<think>" in src or "<|channel|>" in src):
            return res
        prompt = self.tokenizer.detokenize(res.prompt_ids[-16:], special=True)
        stop = kw.get("stop") or []
        msg = parse_ids(src, prompt, res.ids, self.tokenizer, tools=spec.parse_calls,
                        stop=[stop] if isinstance(stop, str) else stop)
        res.content = msg.content if msg.content or not msg.tool_calls else None
        res.reasoning_content, res.tool_calls = msg.reasoning_content, msg.tool_calls
        if msg.tool_calls and res.finish_reason == "stop":
            res.finish_reason = "tool_calls"
        return res

    def reset_chat(self) -> None:
        """Forget the chat session's KV cache."""
        if getattr(self, "_session", None) is not None:
            self._session.reset()
        self._session = None

    def perplexity(self, text: str, ctx: int = 256, chunks: int | None = None, progress=None,
                   keep_logprobs: bool = False):
        from .perplexity import perplexity

        return perplexity(self, text, ctx, chunks, progress, keep_logprobs)

    def close(self) -> None:
        self.file.close()


def load(model: str = "smollm2-135m", device: str = "cpu", threads: int | None = None, fast: bool = True,
         ggml_numerics: bool = False, n_ctx: int | None = None, kv_dtype=None, context_shift: bool = False,
         cache: bool = True, lora=None) -> Model:
    """Load a .gguf file or a packaged model name ("smollm2-135m", "gemma3-270m").

    By default each quantized weight gets the fastest kernel for its type (int4 repacking or int8
    rows, bf16 activations; see ggtorch.quant.kernels). ``fast=False`` is the exact float32
    reference: weights stay as GGUF blocks and are dequantized on every call.
    ``ggml_numerics=True`` rounds activations, the KV cache and attention as llama.cpp's CPU backend
    does (see ggtorch.model.numerics): slow, for bit-level comparisons.

    ``n_ctx``: the context window in tokens (default: the model's trained context, capped at 4096;
    ``m.n_ctx`` says which; above the trained context warns). ``kv_dtype``: "f16" (default, as
    llama.cpp), "bf16" or "f32" for the KV cache. ``context_shift``: when generation fills the
    context, drop the oldest half of the tokens after the first n_keep and go on.
    ``cache=False`` repacks the weights without reading or writing the repack cache (by default the
    repacked form is kept in ~/.cache/ggtorch/repack and memory-mapped on the next load; see
    ggtorch.quant.cache).

    ``lora``: LoRA adapters applied beside the quantized weights, ``[(path, scale), ...]`` or paths
    (scale 1): llama.cpp's adapter GGUF or a PEFT directory (ggtorch.lora; ``m.set_lora`` changes them)."""
    return Model(model, device=device, threads=threads, fast=fast, ggml_numerics=ggml_numerics, n_ctx=n_ctx,
                 kv_dtype=kv_dtype, context_shift=context_shift, cache=cache, lora=lora)


def _drop_oldest_turn(messages: list) -> list | None:
    """``messages`` without their oldest turn: leading system messages stay; the first user message and
    the assistant/tool messages that answer it go. None when only the last user turn is left."""
    def role(m):
        return m.get("role") if isinstance(m, dict) else getattr(m, "role", None)

    i = 0
    while i < len(messages) and role(messages[i]) == "system":
        i += 1
    j = i + 1
    while j < len(messages) and role(messages[j]) != "user":
        j += 1
    if j >= len(messages):
        return None
    return messages[:i] + messages[j:]
