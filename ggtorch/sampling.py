"""Sampling, with an explicit seeded generator per sequence.

Order follows llama.cpp's default sampler chain: (an allowed-token mask), penalties, logit bias,
top-k, typical-p, top-p, min-p, temperature, then a draw (or argmax when temperature <= 0).
``sample_batch`` runs the chain over every row of a decode step at once, shrinking each row to its
top-k candidates first as llama.cpp does; ``sample`` is its one-row case. The small full-row filters
(top_k, top_p, ...) are the same chain written plainly: the tests hold the batched one to them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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


def sample(logits: torch.Tensor, p: SamplingParams, history: list[int], gen: torch.Generator | None,
           allowed: torch.Tensor | None = None) -> int:
    """One token id from a logits row [n_vocab]: the one-row case of :func:`sample_batch`."""
    if allowed is None and p.temperature <= 0.0 and not p.logit_bias and p.repeat_penalty == 1.0 \
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
        # plain greedy: one argmax, nothing to prepare (sample_batch's checks and float copy cost about
        # a millisecond a token on SmolLM2, a fifth of a decode step)
        return int(torch.argmax(logits))
    return sample_batch(logits.reshape(1, -1), [p], [history], [gen],
                        None if allowed is None else allowed.reshape(1, -1))[0]


# ---- the batched chain ------------------------------------------------------------------------
# The functions above are the chain written plainly over a full row (they stay as the reference the
# tests hold the batched chain to). sample_batch runs the same chain over every row of a step at once:
# the full-vocabulary stages (mask, penalties, bias) on [B, V], then, as llama.cpp's top_k sampler
# does (llama_sampler_top_k_impl truncates the candidate array to the k best), everything else on the
# [B, k] candidates, kept sorted by logit with dropped ones set to -inf.

_NEG_INF = float("-inf")


def _penalize_batch(x: torch.Tensor, params, histories) -> torch.Tensor:
    """apply_penalties for every row in one scatter (llama_sampler_penalties_apply)."""
    n_vocab = x.shape[1]
    keys = []
    for i, (p, h) in enumerate(zip(params, histories)):
        if not h or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0):
            continue
        n = p.repeat_last_n
        window = h if n == -1 else h[-n:] if n > 0 else []
        if window:
            keys.append(torch.tensor(window, dtype=torch.int64) + i * n_vocab)
    if not keys:
        return x
    key, counts = torch.cat(keys).unique(return_counts=True)
    rows, ids = key // n_vocab, key % n_vocab
    per_row = torch.tensor([[p.repeat_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                           dtype=x.dtype)[rows]
    v = x[rows, ids]
    v = torch.where(v <= 0, v * per_row[:, 0], v / per_row[:, 0])
    v = v - counts.to(x.dtype) * per_row[:, 1] - per_row[:, 2]
    x = x.clone()
    x[rows, ids] = v
    return x


def _bias_batch(x: torch.Tensor, params) -> torch.Tensor:
    """apply_logit_bias for every row (llama_sampler_logit_bias_apply)."""
    rows, ids, vals = [], [], []
    for i, p in enumerate(params):
        for tid, b in p.logit_bias.items():
            rows.append(i)
            ids.append(int(tid))
            vals.append(float(b))
    if not rows:
        return x
    bad = [t for t in ids if not 0 <= t < x.shape[1]]
    if bad:
        raise GenerationError(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{x.shape[1] - 1})")
    x = x.clone()
    x.index_put_((torch.tensor(rows), torch.tensor(ids)), torch.tensor(vals, dtype=x.dtype), accumulate=True)
    return x


_CHUNK = 64  # a row is read as chunks of this many logits for the two-stage argmax and top-k


def _chunks(x: torch.Tensor, fill: float = _NEG_INF) -> torch.Tensor:
    """x [B, V] as [B, V / _CHUNK, _CHUNK], padded with ``fill`` when V is not a multiple."""
    n_rows, n_vocab = x.shape
    pad = -n_vocab % _CHUNK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.view(n_rows, -1, _CHUNK)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for [B, V], the first index of each row's maximum, in two stages: torch's argmax
    kernel is not vectorised (measured ~8x slower than amax on [8, 49152]), so take each chunk's
    maximum with amax, then argmax over the chunk maxima and inside the winning chunk."""
    if x.shape[1] < 4 * _CHUNK or x.device.type != "cpu":  # on an accelerator: one argmax kernel
        return x.argmax(-1)
    xc = _chunks(x)
    c = xc.amax(-1).argmax(-1)  # the first chunk holding the row's maximum
    rows = torch.arange(x.shape[0])
    return c * _CHUNK + xc[rows, c].argmax(-1)


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, -1) (values sorted descending, and their ids) for [B, V] with k well below V,
    in two stages, ~4x faster on [8, 49152], k = 40: the k chunks with the largest maxima hold the k
    largest logits (any logit outside them has k larger-or-equal chunk maxima above it), so top-k runs
    over those k * _CHUNK logits only. Ties at the k-th value may resolve to other ids than
    torch.topk's, as llama.cpp's partial sort leaves them unspecified."""
    n_rows, n_vocab = x.shape
    xc = _chunks(x)
    if k * _CHUNK * 4 > xc.shape[1] * _CHUNK:
        return torch.topk(x, k, -1)
    c = torch.topk(xc.amax(-1), k, -1, sorted=False).indices  # [B, k]
    sub = xc[torch.arange(n_rows).unsqueeze(1), c].reshape(n_rows, k * _CHUNK)
    vals, j = torch.topk(sub, k, -1)
    return vals, c.gather(1, torch.div(j, _CHUNK, rounding_mode="floor")) * _CHUNK + j % _CHUNK


def _softmax(v: torch.Tensor) -> torch.Tensor:
    # not torch.softmax: its CPU kernel opens an OpenMP region even for [8, 40] (grain size 0), which
    # on a loaded machine costs milliseconds; log_softmax splits work by chunks and stays serial here
    return torch.log_softmax(v, -1).exp()


def _col(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).unsqueeze(1)


def _typical_cand(vals: torch.Tensor, typ: torch.Tensor) -> torch.Tensor:
    """llama_sampler_typical_apply on [G, K] candidates: order by |surprise - entropy| and keep up to
    and including the first token where the running mass exceeds p (min_keep = 1)."""
    logp = torch.log_softmax(vals, -1)
    probs = logp.exp()
    ent = -(probs * torch.nan_to_num(logp, neginf=0.0)).sum(-1, keepdim=True)
    order = torch.argsort((-logp - ent).abs(), dim=-1, stable=True)  # -inf candidates: +inf, last
    ps = probs.gather(-1, order)
    keep_sorted = (ps.cumsum(-1) - ps) <= typ  # the mass before it has not yet exceeded p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return vals.masked_fill(~keep & (typ < 1.0), _NEG_INF)


def _top_p_cand(vals: torch.Tensor, top: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """llama_sampler_top_p_apply on candidates sorted by logit: keep the shortest prefix whose mass
    reaches p, at least one token (min_keep = 1). ``lse``: the log of the normalizer when the
    candidates are only the head of the distribution (the whole vocabulary's logsumexp)."""
    probs = _softmax(vals) if lse is None else (vals - lse).exp()
    drop = (probs.cumsum(-1) - probs) >= top  # the ones before it already reach p
    drop[:, 0] = False
    return vals.masked_fill(drop & (top < 1.0), _NEG_INF)


def _min_p_cand(vals: torch.Tensor, mp: torch.Tensor) -> torch.Tensor:
    """llama_sampler_min_p_apply: drop logits below max + log(p), i.e. probability below p * p_max."""
    thresh = vals.amax(-1, keepdim=True) + torch.log(mp.clamp_min(1e-30))
    return vals.masked_fill((vals < thresh) & (mp > 0.0), _NEG_INF)


def _searchsorted(cum: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose running total exceeds target [G]."""
    return torch.searchsorted(cum, target.unsqueeze(1), right=True).squeeze(1)


def _draw(w: torch.Tensor, gens) -> torch.Tensor:
    """llama_sampler_dist_apply: one uniform u per row from the row's own generator; the first
    candidate whose running weight exceeds u times the total (weights w [G, K] >= 0, unnormalised,
    summed in double as llama.cpp does). Over a long row the running totals are taken per chunk
    first, then inside the chosen chunk. Returns candidate positions [G]."""
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in gens])
    n_rows, k = w.shape
    if k <= 4 * _CHUNK:
        cum = w.double().cumsum(-1)
        pos = _searchsorted(cum, u * cum[:, -1])  # cum[pos] > target, so w[pos] > 0
    else:
        wc = _chunks(w, 0.0)
        sums = wc.double().sum(-1)
        cum = sums.cumsum(-1)
        target = u * cum[:, -1]
        c = _searchsorted(cum, target).clamp_max(cum.shape[1] - 1)
        rows = torch.arange(n_rows)
        inner = wc[rows, c].double().cumsum(-1)
        pos = c * _CHUNK + _searchsorted(inner, target - (cum[rows, c] - sums[rows, c])).clamp_max(_CHUNK - 1)
    pos = pos.clamp_max(k - 1)
    rows = torch.arange(n_rows)
    zero = (w[rows, pos] <= 0).nonzero().flatten()
    if len(zero):  # rounding pushed the target onto the total: the last candidate with weight
        pos[zero] = k - 1 - (w[zero] > 0).flip(-1).to(torch.uint8).argmax(-1)
    return pos


_HEADS = (256, 4096)  # heads tried in turn for whole-vocabulary rows (llama.cpp's top-p starts at 256)


def _head(x: torch.Tensor, params, typical: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Whole-vocabulary rows with top-p or min-p: as llama_sampler_top_p_apply's adaptive partial
    sort, try the best logits of a head first (256, then 4096: a top-k of 4096 is several times
    cheaper than sorting 49152). A head is enough when, for every row, it already holds top_p of the
    mass (top-p then drops everything after it) or its last logit is below min-p's threshold (min-p
    drops everything after it); then top-p runs on the head with the whole row's normaliser.
    Otherwise (or with typical-p, which needs the whole distribution) sort the row.
    Returns the candidates, their ids, and the normaliser's log (None after a full sort)."""
    n_vocab = x.shape[1]
    if not typical:
        lse = None
        top = _col([p.top_p for p in params])
        log_mp = torch.log(_col([p.min_p for p in params]).clamp_min(1e-30))
        has_mp = _col([p.min_p > 0.0 for p in params], torch.bool)
        for size in _HEADS:
            if 4 * size > n_vocab:
                break
            vals, idx = topk_rows(x, size)
            if lse is None:
                lse = torch.logsumexp(x, -1, keepdim=True)
            mass = (vals - lse).exp().sum(-1, keepdim=True)
            cut = (vals[:, -1:] < vals[:, :1] + log_mp) & has_mp
            if bool(((mass >= top) & (top < 1.0) | cut).all()):
                return vals, idx, lse
    vals, idx = torch.sort(x, -1, descending=True)
    return vals, idx, None


def _candidates(x: torch.Tensor, params, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows x [G, V] (of one kind of top-k: k candidates, or k = V for the whole vocabulary)
    through top-k, typical, top-p, min-p and temperature. Returns the candidates' weights
    (unnormalised probabilities, 1 for the best) and token ids, both [G, k], sorted by logit unless
    nothing was cut (dropped candidates weigh 0)."""
    n_vocab, lse = x.shape[1], None
    typical = any(p.typical_p < 1.0 for p in params)
    if k >= n_vocab and not typical and all(p.top_p >= 1.0 and p.min_p <= 0.0 for p in params):
        # nothing to cut: draw over the whole row in vocabulary order (llama_sampler_dist_apply does
        # not sort either)
        vals, idx = x, torch.arange(n_vocab).expand(x.shape[0], n_vocab)
    elif k >= n_vocab:
        vals, idx, lse = _head(x, params, typical)
    else:
        vals, idx = topk_rows(x, k)  # sorted, descending: llama_sampler_top_k_impl
        ks = [p.top_k for p in params]
        if min(ks) < k:  # rows asking for fewer candidates than the group's largest k
            vals = vals.masked_fill(torch.arange(k) >= _col(ks, torch.int64), _NEG_INF)
    if typical:
        vals = _typical_cand(vals, _col([p.typical_p for p in params]))
    if any(p.top_p < 1.0 for p in params):
        vals = _top_p_cand(vals, _col([p.top_p for p in params]), lse)
    if any(p.min_p > 0.0 for p in params):
        vals = _min_p_cand(vals, _col([p.min_p for p in params]))
    # llama_sampler_temp_impl, then the weights exp((l - max) / T) that llama_sampler_dist_apply draws from
    temp = {p.temperature for p in params}
    w = vals - vals.amax(-1, keepdim=True)
    w.mul_(1.0 / temp.pop() if len(temp) == 1 else 1.0 / _col([p.temperature for p in params]))
    return w.exp_(), idx


def _prepare(logits: torch.Tensor, params, histories, n_gens: int, allowed) -> tuple[torch.Tensor, list, dict]:
    """Checks; the full-vocabulary stages (mask, penalties, logit bias); the rows split into greedy
    ones and groups to sample together: {whole vocabulary?: rows}."""
    if logits.dim() != 2:
        raise GenerationError(f"sample_batch expects logits [batch, n_vocab], got shape {tuple(logits.shape)}")
    n_rows, n_vocab = logits.shape
    if not len(params) == len(histories) == n_gens == n_rows:
        raise GenerationError(f"sample_batch: {n_rows} logits rows but {len(params)} params, "
                              f"{len(histories)} histories, {n_gens} generators")
    # on the CPU (logits of a model on an accelerator come over: [B, V] per step, as the draw needs
    # them here anyway); a copy only when something writes into it
    x = logits.detach().cpu().float()
    if allowed is not None:
        if allowed.shape != logits.shape or allowed.dtype != torch.bool:
            raise GenerationError(f"the allowed mask must be bool {tuple(logits.shape)}, "
                                  f"got {allowed.dtype} {tuple(allowed.shape)}")
        x = x.masked_fill(~allowed.cpu(), _NEG_INF)
    x = _penalize_batch(x, params, histories)
    x = _bias_batch(x, params)
    if allowed is not None or any(p.logit_bias for p in params):
        dead = (x.amax(-1) == _NEG_INF).nonzero().flatten().tolist()
        if dead:
            raise GenerationError(f"no token is left to sample in row {dead[0]}: the allowed mask and "
                                  f"logit bias exclude the whole vocabulary")
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0.0]
    groups: dict[bool, list[int]] = {}
    for i, p in enumerate(params):
        if p.temperature > 0.0:
            groups.setdefault(p.top_k <= 0 or p.top_k >= n_vocab, []).append(i)
    return x, greedy, groups


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == x.shape[0] else x[rows]


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[list[int]],
                 gens: Sequence[torch.Generator | None], allowed: torch.Tensor | None = None) -> list[int]:
    """One token id per row of ``logits`` [B, n_vocab], every row with its own parameters, history
    (for the penalties) and generator; ``allowed`` [B, n_vocab] (bool, True = allowed) masks tokens
    out first (structured outputs). Order as llama.cpp's default chain: mask, penalties, logit bias,
    then greedy rows (temperature <= 0) take the argmax; the others: top-k (shrinks to the
    candidates), typical-p, top-p, min-p, temperature, one draw from the row's generator. Rows with a
    top-k are sampled together (over the largest k among them); top_k <= 0 sorts the whole
    vocabulary (slower)."""
    x, greedy, groups = _prepare(logits, params, histories, len(gens), allowed)
    out = [0] * logits.shape[0]
    if greedy:
        for i, t in zip(greedy, argmax_rows(_rows(x, greedy)).tolist()):
            out[i] = t
    for full, rows in groups.items():
        ps = [params[i] for i in rows]
        w, idx = _candidates(_rows(x, rows), ps, x.shape[1] if full else max(p.top_k for p in ps))
        pos = _draw(w, [gens[i] for i in rows])
        for i, t in zip(rows, idx.gather(-1, pos.unsqueeze(1)).squeeze(1).tolist()):
            out[i] = t
    return out


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[list[int]],
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution :func:`sample_batch` draws from, over the whole vocabulary: [B, n_vocab]
    probabilities (greedy rows: 1 on the argmax). For tests and inspection."""
    x, greedy, groups = _prepare(logits, params, histories, len(params), allowed)
    out = torch.zeros_like(x)
    if greedy:
        out[greedy, argmax_rows(_rows(x, greedy))] = 1.0
    for full, rows in groups.items():
        ps = [params[i] for i in rows]
        w, idx = _candidates(_rows(x, rows), ps, x.shape[1] if full else max(p.top_k for p in ps))
        out[rows] = torch.zeros_like(out[rows]).scatter_(-1, idx, w / w.sum(-1, keepdim=True))
    return out


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
