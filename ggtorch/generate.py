"""Generation as a Python generator: prefill once, then one token per step, yielding each token.

Streaming, the CLI and the API's `generate` all sit on :func:`generate_tokens`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

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

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "prompt_ms": round(self.prompt_s * 1e3, 3),
                "prompt_tok_s": self.prompt_tokens / self.prompt_s if self.prompt_s else None,
                "gen_tokens": self.gen_tokens, "gen_ms": round(self.gen_s * 1e3, 3),
                "gen_tok_s": self.gen_tokens / self.gen_s if self.gen_s else None}


@dataclass
class Result:
    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str
    timings: Timings = field(default_factory=Timings)


def generate_tokens(model, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                    stop: list[str] = (), ignore_eos: bool = False, timings: Timings | None = None,
                    cache=None, n_cached: int = 0) -> Iterator[Step]:
    """Yields :class:`Step`s. Stop strings are held back until they can no longer match, and the
    matched stop string itself is not emitted (as llama-cpp-python does).

    ``cache``/``n_cached``: continue in an existing KV cache whose first ``n_cached`` positions already
    hold ``prompt_ids[:n_cached]`` (a chat session's prefix); only the rest of the prompt is evaluated."""
    from .tokenizer import StreamDecoder

    timings = timings if timings is not None else Timings()
    net, tok = model.net, model.tokenizer
    gen = make_generator(params.seed)
    if cache is None:
        cache, n_cached = net.new_cache(len(prompt_ids) + max_tokens + 1), 0
    n_cached = max(0, min(n_cached, len(prompt_ids) - 1))  # at least the last prompt token is evaluated
    cache.truncate(n_cached)
    t0 = time.perf_counter()
    logits = net.forward(prompt_ids[n_cached:], cache, start=n_cached)[-1]
    timings.prompt_tokens, timings.prompt_s = len(prompt_ids) - n_cached, time.perf_counter() - t0
    timings.cached_tokens = n_cached
    history = list(prompt_ids)
    dec = StreamDecoder(tok, first=False)
    held = ""
    t1 = time.perf_counter()
    for i in range(max_tokens):
        tid = sample(logits, params, history, gen)
        history.append(tid)
        timings.gen_tokens += 1
        if not ignore_eos and tid in tok.eog_ids:
            timings.gen_s = time.perf_counter() - t1
            yield Step(tid, held + dec.flush(), "stop")
            return
        held += dec.feed(tid)
        hit = min((held.find(s) for s in stop if s and s in held), default=-1)
        if hit >= 0:
            timings.gen_s = time.perf_counter() - t1
            yield Step(tid, held[:hit], "stop")
            return
        # emit what can no longer be the start of a stop string
        keep = max((_overlap(held, s) for s in stop if s), default=0)
        last = i == max_tokens - 1
        if last:
            timings.gen_s = time.perf_counter() - t1
            yield Step(tid, held + dec.flush(), "length")
            return
        out, held = (held[: len(held) - keep], held[len(held) - keep:]) if keep else (held, "")
        yield Step(tid, out)
        logits = net.forward([tid], cache)[-1]
    timings.gen_s = time.perf_counter() - t1


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-k:]):
            return k
    return 0
