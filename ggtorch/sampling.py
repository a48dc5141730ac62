"""Sampling, composed from small pure parts over a logits row, with an explicit seeded generator.

Order follows llama.cpp's default sampler chain: penalties, logit bias, top-k, typical-p, top-p,
min-p, temperature, then a draw (or argmax when temperature <= 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # <= 0: greedy
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    typical_p: float = 1.0  # 1: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"),
                  (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
                  (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
                  (0.0 < self.typical_p <= 1.0, "typical_p must be in (0, 1]"),
                  (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
                  (self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1 = whole context)")]
        for ok, msg in checks:
            if not ok:
                raise GenerationError(msg)


def apply_penalties(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """llama_sampler_penalties: repetition (divide positive / multiply negative logits), then
    frequency and presence penalties, over the last repeat_last_n tokens."""
    if not history or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0):
        return logits
    window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:] if p.repeat_last_n > 0 else []
    if not window:
        return logits
    ids, counts = torch.tensor(window, device=logits.device).unique(return_counts=True)
    out = logits.clone()
    x = out[ids]
    x = torch.where(x <= 0, x * p.repeat_penalty, x / p.repeat_penalty)
    x = x - counts.to(x.dtype) * p.frequency_penalty - p.presence_penalty
    out[ids] = x
    return out


def apply_logit_bias(logits: torch.Tensor, bias: dict) -> torch.Tensor:
    if not bias:
        return logits
    out = logits.clone()
    for tid, b in bias.items():
        out[int(tid)] += float(b)
    return out


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_l, idx = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_l, -1)
    cum = probs.cumsum(-1)
    drop = (cum - probs) >= p  # a token is dropped when the ones before it already reach p
    drop[0] = False
    out = logits.clone()
    out[idx[drop]] = float("-inf")
    return out


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p times the top token's."""
    if p <= 0.0:
        return logits
    thresh = logits.max() + torch.log(torch.tensor(p, dtype=logits.dtype))
    return logits.masked_fill(logits < thresh, float("-inf"))


def typical_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy, up to mass p."""
    if p >= 1.0:
        return logits
    logp = torch.log_softmax(logits, -1)
    probs = logp.exp()
    ent = -(probs * torch.nan_to_num(logp, neginf=0.0)).sum()
    dev = (-logp - ent).abs()
    order = torch.argsort(dev)
    cum = probs[order].cumsum(-1)
    keep_n = int((cum < p).sum().item()) + 1
    out = torch.full_like(logits, float("-inf"))
    keep = order[:keep_n]
    out[keep] = logits[keep]
    return out


def sample(logits: torch.Tensor, p: SamplingParams, history: list[int], gen: torch.Generator | None) -> int:
    """One token id from a logits row [n_vocab]."""
    logits = logits.float()
    logits = apply_penalties(logits, history, p)
    logits = apply_logit_bias(logits, p.logit_bias)
    if p.temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = top_k(logits, p.top_k)
    logits = typical_p(logits, p.typical_p)
    logits = top_p(logits, p.top_p)
    logits = min_p(logits, p.min_p)
    probs = torch.softmax(logits / p.temperature, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
