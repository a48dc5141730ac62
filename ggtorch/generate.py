"""Generation as a Python generator: prefill once, then one token per step, yielding each token.

Streaming, the CLI and the API's `generate` all sit on :func:`generate_tokens`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .constrain import fill_masks
from .errors import ContextError
from .sampling import SamplingParams, make_generator, sample


@dataclass
class Step:
    token: int
    piece: str  # text this token completes (UTF-8 safe)
    finish_reason: str | None = None  # "stop" (EOS / stop string) or "length" on the last step


@dataclass
class Timings:
    prompt_tokens: int = 0  # evaluated by the prefill
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose K/V a reused cache already held (chat sessions)
    context_shifts: int = 0  # times the cache was full and its oldest tokens were dropped (context_shift)

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "prompt_ms": round(self.prompt_s * 1e3, 3),
                "prompt_tok_s": self.prompt_tokens / self.prompt_s if self.prompt_s else None,
                "gen_tokens": self.gen_tokens, "gen_ms": round(self.gen_s * 1e3, 3),
                "gen_tok_s": self.gen_tokens / self.gen_s if self.gen_s else None,
                "context_shifts": self.context_shifts}


@dataclass
class Result:
    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str
    timings: Timings = field(default_factory=Timings)


def check_fits(n_prompt: int, max_tokens: int | None, n_ctx: int | None, context_shift: bool = False) -> None:
    """Refuse, before any work, what cannot fit the context (llama.cpp: "prompt is too long"): the
    prompt plus the requested tokens must fit n_ctx; with context shift only the prompt must (with
    room for one more token), since generation then makes room by dropping old tokens."""
    if n_ctx is None:
        return
    if context_shift or max_tokens is None:
        if n_prompt >= n_ctx:
            raise ContextError(f"the prompt has {n_prompt} tokens, the context n_ctx is {n_ctx}: "
                               f"it must be shorter (raise --ctx / n_ctx, or shorten the prompt)")
        return
    if n_prompt + max_tokens > n_ctx:
        raise ContextError(f"the prompt has {n_prompt} tokens and {max_tokens} more were requested: "
                           f"{n_prompt + max_tokens} > the context n_ctx {n_ctx} (raise --ctx / n_ctx, "
                           f"lower max_tokens, or use context shift)")


def generate_tokens(model, prompt_ids: list[int], max_tokens: int | None, params: SamplingParams,
                    stop: list[str] = (), ignore_eos: bool = False, timings: Timings | None = None,
                    cache=None, n_cached: int = 0, context_shift: bool = False, n_keep: int = 0,
                    constraint=None) -> Iterator[Step]:
    """Yields :class:`Step`s. Stop strings are held back until they can no longer match, and the
    matched stop string itself is not emitted (as llama-cpp-python does).

    ``cache``/``n_cached``: continue in an existing KV cache whose first ``n_cached`` positions already
    hold ``prompt_ids[:n_cached]`` (a chat session's prefix); only the rest of the prompt is evaluated.
    The context is the cache's ``n_ctx`` (a new cache gets the model's). ``max_tokens=None``: until the
    context is full (the last step then ends with "length"). ``context_shift``: when the cache is full,
    keep the first ``n_keep`` tokens (plus BOS), drop the oldest half of the rest and go on."""
    timings = timings if timings is not None else Timings()
    net, tok = model.net, model.tokenizer
    if cache is None:
        make = getattr(model, "new_cache", None)
        cache = make() if make else net.new_cache(len(prompt_ids) + (max_tokens or 0) + 1)
        n_cached = 0
    n_ctx = cache.n_ctx
    check_fits(len(prompt_ids), max_tokens, n_ctx, context_shift)
    if max_tokens is None:
        max_tokens = sys.maxsize if context_shift or n_ctx is None else n_ctx - len(prompt_ids)
    if max_tokens <= 0:
        return
    # BOS stays, as llama.cpp's n_keep counts it (server: n_keep + add_bos)
    keep = n_keep + (1 if prompt_ids and prompt_ids[0] == tok.bos_id else 0)
    gen = make_generator(params.seed)
    n_cached = max(0, min(n_cached, len(prompt_ids) - 1))  # at least the last prompt token is evaluated
    cache.truncate(n_cached)
    t0 = time.perf_counter()
    logits = net.forward(prompt_ids[n_cached:], cache, start=n_cached)[-1]
    timings.prompt_tokens, timings.prompt_s = len(prompt_ids) - n_cached, time.perf_counter() - t0
    timings.cached_tokens = n_cached
    history = list(prompt_ids)
    text = StopText(tok, stop)
    t1 = time.perf_counter()
    i = 0
    while True:
        # a constraint: the grammar's allowed tokens only (llama.cpp: the grammar sampler)
        allowed = fill_masks([constraint], 1, logits.shape[-1])[0] if constraint is not None else None
        tid = sample(logits, params, history, gen, allowed)
        if constraint is not None:
            constraint.advance(tid)
        history.append(tid)
        timings.gen_tokens += 1
        if not ignore_eos and tid in tok.eog_ids:
            timings.gen_s = time.perf_counter() - t1
            yield Step(tid, text.flush(), "stop")
            return
        out, hit = text.feed(tid)
        if hit or (constraint is not None and constraint.done):  # a stop string, or the grammar is complete
            timings.gen_s = time.perf_counter() - t1
            yield Step(tid, out + ("" if hit else text.flush()), "stop")
            return
        full = n_ctx is not None and cache.n >= n_ctx and not context_shift
        if i == max_tokens - 1 or full:
            timings.gen_s = time.perf_counter() - t1
            yield Step(tid, out + text.flush(), "length")
            return
        yield Step(tid, out)
        if n_ctx is not None and cache.n >= n_ctx:  # context shift (llama.cpp's context_shift in the server/cli)
            k = min(keep, cache.n - 2)
            net.shift_context(cache, k, (cache.n - k) // 2)
            timings.context_shifts += 1
        logits = net.forward([tid], cache)[-1]
        i += 1


class StopText:
    """Token ids -> text pieces, with stop strings that may span token boundaries.

    Text that could still be the start of a stop string is held back until it can no longer match;
    the matched stop string itself (and anything after it) is not emitted, as llama-cpp-python does.
    Shared by :func:`generate_tokens` and the continuous-batching engine (ggtorch.batch)."""

    def __init__(self, tok, stop=()):
        from .tokenizer import StreamDecoder

        self.dec = StreamDecoder(tok, first=False)
        self.stop = [s for s in stop if s]
        self.held = ""

    def feed(self, tid: int) -> tuple[str, bool]:
        """Text that is now safe to emit, and whether a stop string was reached."""
        self.held += self.dec.feed(tid)
        hit = min((self.held.find(s) for s in self.stop if s in self.held), default=-1)
        if hit >= 0:
            out, self.held = self.held[:hit], ""
            return out, True
        keep = max((_overlap(self.held, s) for s in self.stop), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        """Everything held back (at the end of generation)."""
        out, self.held = self.held + self.dec.flush(), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-k:]):
            return k
    return 0
