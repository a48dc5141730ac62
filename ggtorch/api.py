"""The Python API: load a model once, then tokenize, detokenize, score and generate.

    m = ggtorch.load("smollm2-135m")          # or a .gguf path
    m.generate("Hello", max_tokens=32).text
    for piece in m.stream("Hello"): print(piece, end="")
"""
from __future__ import annotations

import math
import time
from functools import cached_property
from typing import Iterator

import torch

from .errors import GenerationError, ModelError
from .generate import Result, Timings, generate_tokens
from .gguf.reader import GGUFFile
from .model import build
from .packaged import resolve
from .sampling import SamplingParams


class Model:
    def __init__(self, path: str, device: str = "cpu", threads: int | None = None, fast: bool = True,
                 ggml_numerics: bool = False, cache: bool = True):
        fast = fast and not ggml_numerics  # the numerics mode runs on the exact path
        if threads:
            torch.set_num_threads(int(threads))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError("--device cuda asked for, but PyTorch sees no CUDA device")
        t0 = time.perf_counter()
        self.path = resolve(path)
        self.file = GGUFFile(self.path)
        self.net = build(self.file, device)
        self.cfg = self.net.cfg
        self.fast = fast
        self.repack_cache = "off"  # "hit", "miss" (repacked, then stored) or "off" (see quant.cache)
        if fast:
            self.repack_cache = self.net.install_fast(cache)
        if ggml_numerics:
            self.net.use_ggml_numerics()
        self.device = device
        self.load_s = time.perf_counter() - t0

    @cached_property
    def tokenizer(self) -> "Tokenizer":  # noqa: F821
        """Built on first use (its tables take ~30 MB and ~0.1 s on a 49k vocabulary): scoring token
        ids and benchmarks never need it."""
        from .tokenizer import Tokenizer

        return Tokenizer(self.file.metadata)

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
        cache = self.net.new_cache(len(ids))
        outs = [self.net.forward(ids[i:i + batch], cache, all_logits=True) for i in range(0, len(ids), batch)]
        return torch.cat(outs).float().cpu()

    # ---- generation ------------------------------------------------------------------------------
    def _params(self, kw) -> tuple[SamplingParams, int, list[str], bool]:
        max_tokens = int(kw.pop("max_tokens", 64))
        if max_tokens < 0:
            raise GenerationError("max_tokens must be >= 0")
        stop = kw.pop("stop", None) or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        ignore_eos = bool(kw.pop("ignore_eos", False))
        try:
            params = SamplingParams(**kw)
        except TypeError as e:
            raise GenerationError(str(e)) from None
        return params, max_tokens, stop, ignore_eos

    def steps(self, prompt, **kw):
        params, max_tokens, stop, ignore_eos = self._params(dict(kw))
        ids = self._prompt_ids(prompt)
        timings = Timings()
        return ids, timings, generate_tokens(self, ids, max_tokens, params, stop, ignore_eos, timings)

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
        ignore_eos."""
        ids, timings, it = self.steps(prompt, **kw)
        out, text, reason = [], [], "length"
        for step in it:
            out.append(step.token)
            text.append(step.piece)
            if step.finish_reason:
                reason = step.finish_reason
        return Result(ids, out, "".join(text), reason, timings)

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

        kw.setdefault("max_tokens", 512)
        params, max_tokens, stop, ignore_eos = self._params(dict(kw))
        ids = self.apply_chat_template(messages, tools=tools, tokenize=True, template=template,
                                       **(chat_template_kwargs or {}))
        ids = self._prompt_ids(ids)
        if getattr(self, "_session", None) is None:
            self._session = ChatSession(self)
        timings = Timings()
        steps = self._session.steps(ids, max_tokens, params, stop, ignore_eos, timings)
        return ids, timings, self.chat_template(template)[1], steps

    def chat_stream(self, messages, **kw) -> Iterator[str]:
        """The assistant's answer as text pieces (never a broken UTF-8 character); keywords as :meth:`chat`."""
        _, _, _, steps = self.chat_steps(messages, **kw)
        for step in steps:
            if step.piece:
                yield step.piece

    def chat(self, messages, **kw):
        """Answer a conversation through the model's chat template: ``messages`` are ``{"role", "content"}``
        dicts. Keywords: tools, template (a variant name, "chatml", "gemma" or a file), chat_template_kwargs
        (e.g. ``{"enable_thinking": False}``) and the sampling keywords of :meth:`generate`
        (max_tokens defaults to 512). Generation stops at the model's end-of-turn tokens. A follow-up turn
        reuses the KV cache of the previous one for the common prefix (:meth:`reset_chat` drops it)."""
        from .chat import ChatResult

        ids, timings, label, steps = self.chat_steps(messages, **kw)
        out, text, reason = [], [], "length"
        for step in steps:
            out.append(step.token)
            text.append(step.piece)
            reason = step.finish_reason or reason
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
        return ChatResult("".join(text), reason, usage, ids, out, timings, label)

    def reset_chat(self) -> None:
        """Forget the chat session's KV cache."""
        self._session = None

    def perplexity(self, text: str, ctx: int = 256, chunks: int | None = None, progress=None,
                   keep_logprobs: bool = False):
        from .perplexity import perplexity

        return perplexity(self, text, ctx, chunks, progress, keep_logprobs)

    def close(self) -> None:
        self.file.close()


def load(model: str = "smollm2-135m", device: str = "cpu", threads: int | None = None, fast: bool = True,
         ggml_numerics: bool = False, cache: bool = True) -> Model:
    """Load a .gguf file or a packaged model name ("smollm2-135m", "gemma3-270m").

    By default each quantized weight gets the fastest kernel for its type (int4 repacking or int8
    rows, bf16 activations; see ggtorch.quant.kernels). ``fast=False`` is the exact float32
    reference: weights stay as GGUF blocks and are dequantized on every call.
    ``ggml_numerics=True`` rounds activations, the KV cache and attention as llama.cpp's CPU backend
    does (see ggtorch.model.numerics): slow, for bit-level comparisons.
    ``cache=False`` repacks the weights without reading or writing the repack cache (by default the
    repacked form is kept in ~/.cache/ggtorch/repack and memory-mapped on the next load; see
    ggtorch.quant.cache)."""
    return Model(model, device=device, threads=threads, fast=fast, ggml_numerics=ggml_numerics, cache=cache)
