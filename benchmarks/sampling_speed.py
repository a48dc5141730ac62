"""Cost of sampling one decode step of B sequences: sample_batch (one call for every row) against the
per-row sampler ggtorch used before it (each row on its own over the whole vocabulary: top-k masks,
top-p sorts the row, softmax and multinomial over the row), composed here from the full-row filters
that sampling.py keeps as the reference.

    python benchmarks/sampling_speed.py [MODEL] [--rows 8] [--threads 2] [--reps 50] [--random]

The logits are a real decode step of MODEL for B different prompts (or, with --random, Gaussian
logits over the model's vocabulary size, 49152 for SmolLM2). Each configuration times the two
samplers interleaved (A, B, A, B, ...) and reports medians and their ratio: only ratios from one run
mean anything on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from ggtorch.sampling import (SamplingParams, apply_logit_bias, apply_penalties, make_generator, min_p,  # noqa: E402
                              sample_batch, top_k, top_p, typical_p)

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3,",
           "My favourite food is", "In 1969, the first", "The best way to learn a language is",
           "Dear diary, today"]

CONFIGS = {  # name: SamplingParams for every row
    "llama.cpp defaults, T 0.8 (top_k 40, top_p 0.95, min_p 0.05)": SamplingParams(temperature=0.8),
    "server defaults, T 0.8 (whole vocabulary, no cut)": SamplingParams(temperature=0.8, top_k=0, top_p=1.0,
                                                                        min_p=0.0),
    "T 0.8, top_k 0, top_p 0.95": SamplingParams(temperature=0.8, top_k=0, top_p=0.95, min_p=0.0),
    "T 0.8, top_k 40, repeat_penalty 1.1 (last 64)": SamplingParams(temperature=0.8, repeat_penalty=1.1),
    "greedy, repeat_penalty 1.1 (not the engine's plain-greedy path)": SamplingParams(repeat_penalty=1.1),
}


def old_sample(logits: torch.Tensor, p: SamplingParams, history: list[int], gen) -> int:
    """ggtorch's sampler before sample_batch, one row at a time."""
    logits = logits.float()
    logits = apply_penalties(logits, history, p)
    logits = apply_logit_bias(logits, p.logit_bias)
    if p.temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = min_p(top_p(typical_p(top_k(logits, p.top_k), p.typical_p), p.top_p), p.min_p)
    probs = torch.softmax(logits / p.temperature, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def step_logits(a) -> tuple[torch.Tensor, list[list[int]]]:
    if a.random:
        g = torch.Generator().manual_seed(0)
        return torch.randn(a.rows, a.vocab, generator=g) * 3, [list(range(100, 164))] * a.rows
    import ggtorch

    m = ggtorch.load(a.model, threads=a.threads)
    rows, hists = [], []
    for i in range(a.rows):
        r = m.generate(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), max_tokens=16, ignore_eos=True)
        ids = r.prompt_ids + r.ids
        rows.append(m.logits(ids)[-1].float())
        hists.append(ids)
    return torch.stack(rows), hists


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--random", action="store_true", help="Gaussian logits instead of a real decode step")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size with --random")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x, hists = step_logits(a)
    n, v = x.shape
    print(f"B={n} rows, V={v}, {a.threads} threads, {a.reps} interleaved repetitions; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name, p in CONFIGS.items():
        params = [p] * n
        gb = [make_generator(i) for i in range(n)]
        go = [make_generator(i) for i in range(n)]
        new_t, old_t = [], []
        for _ in range(3):  # warm-up
            sample_batch(x, params, hists, gb)
            [old_sample(x[i], p, hists[i], go[i]) for i in range(n)]
        for _ in range(a.reps):
            t = time.perf_counter()
            sample_batch(x, params, hists, gb)
            new_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(n):
                old_sample(x[i], p, hists[i], go[i])
            old_t.append(time.perf_counter() - t)
        new, old = statistics.median(new_t), statistics.median(old_t)
        print(f"{name:66s} sample_batch {1e3 * new:7.3f} ms   {n} x per-row {1e3 * old:7.3f} ms   "
              f"ratio {old / new:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
