"""Perplexity as llama-perplexity computes it (perplexity() in tools/perplexity/perplexity.cpp):
the text is tokenized without BOS and cut into chunks of n_ctx tokens; each chunk's first token is
replaced by BOS; the negative log-likelihood of positions n_ctx/2 .. n_ctx-2 predicting the next
token is averaged over all chunks."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import GenerationError


def perplexity(model, text: str, ctx: int = 256, chunks: int | None = None, progress=None, keep_logprobs=False):
    if ctx < 8:
        raise GenerationError("--ctx must be at least 8")
    ids = model.tokenize(text, special=False, bos=False)
    n_chunks = len(ids) // ctx
    if chunks is not None:
        n_chunks = min(n_chunks, int(chunks))
    if n_chunks < 1:
        raise GenerationError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
    bos = model.tokenizer.bos_id
    first = ctx // 2
    nll, count, logprobs, targets = 0.0, 0, [], []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        lg = model.logits(chunk)[first:ctx - 1].double()
        lp = torch.log_softmax(lg, -1)
        tgt = torch.tensor(chunk[first + 1:ctx])
        nll -= float(lp.gather(1, tgt[:, None]).sum())
        count += tgt.numel()
        if keep_logprobs:
            logprobs.append(lp.float().numpy())
            targets.append(tgt.numpy())
        if progress:
            progress(c + 1, n_chunks, math.exp(nll / count))
    out = {"ppl": math.exp(nll / count), "nll": nll / count, "n_ctx": ctx, "chunks": n_chunks,
           "tokens_scored": count}
    if keep_logprobs:
        out["logprobs"] = np.concatenate(logprobs)
        out["targets"] = np.concatenate(targets)
    return out


def kl_stats(base_logprobs: np.ndarray, logprobs: np.ndarray, targets: np.ndarray) -> dict:
    """Mean KL(base || new), top-1 agreement and delta-p of the target token (as llama-perplexity --kl-divergence)."""
    if base_logprobs.shape != logprobs.shape:
        raise GenerationError(f"base logits have shape {base_logprobs.shape}, this run {logprobs.shape}: "
                              f"use the same text, --ctx and --chunks")
    b = torch.from_numpy(base_logprobs).double()
    n = torch.from_numpy(logprobs).double()
    kl = (b.exp() * (b - n)).sum(-1)
    agree = (b.argmax(-1) == n.argmax(-1)).double().mean()
    t = torch.from_numpy(targets).long()[:, None]
    dp = n.gather(1, t).exp() - b.gather(1, t).exp()
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(agree),
            "delta_p_mean": float(dp.mean()), "delta_p_rms": float(dp.pow(2).mean().sqrt())}
