"""Batched decode through the model layer: `Transformer.forward_batch` with B sequences, each in its
own slot of a KV cache pool, each at its own position. Reports ms per step and aggregate tok/s for
each B, next to the single-sequence `forward` of one token (all measured in one run, interleaved).

    .venv/bin/python benchmarks/batched_decode.py [MODEL] [--batch 1,4,8] [--steps 32] [--prompt 64]
        [--reps 3] [--threads 2] [--cache-type f16] [--exact] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ggtorch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--batch", default="1,4,8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64, help="tokens prefilled per sequence (lengths differ by 7 each)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-type", default=None)
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sizes = [int(b) for b in a.batch.split(",")]
    kw = {"kv_dtype": a.cache_type} if a.cache_type else {}
    try:
        m = ggtorch.load(a.model, threads=a.threads, fast=not a.exact, **kw)
    except TypeError:  # an engine without kv_dtype
        m = ggtorch.load(a.model, threads=a.threads, fast=not a.exact)
    net = m.net
    g = torch.Generator().manual_seed(0)
    B = max(sizes)
    prompts = [torch.randint(0, m.n_vocab, (a.prompt + 7 * i,), generator=g).tolist() for i in range(B)]
    res = {f"B={b}": [] for b in sizes}
    res["single forward"] = []
    for _ in range(a.reps):
        # one sequence through forward(): the path generate() uses
        cache = net.new_cache(a.prompt + a.steps + 1)
        tok = int(net.forward(prompts[0], cache)[-1].argmax())
        t = time.perf_counter()
        for _ in range(a.steps):
            tok = int(net.forward([tok], cache)[-1].argmax())
        res["single forward"].append((time.perf_counter() - t) / a.steps)
        for b in sizes:
            pool = net.new_pool(B, a.prompt + 7 * B + a.steps + 1)
            slots = list(range(B))[::-1][:b]  # not in order: the gathering path
            toks = [int(net.forward(prompts[s], pool, slot=s)[-1].argmax()) for s in slots]
            t = time.perf_counter()
            for _ in range(a.steps):
                toks = net.forward_batch(toks, slots, pool).argmax(-1).tolist()
            res[f"B={b}"].append((time.perf_counter() - t) / a.steps)
            del pool
    rows = []
    for name, ts in res.items():
        b = 1 if name == "single forward" else int(name[2:])
        ms = statistics.median(ts) * 1e3
        rows.append({"path": name, "B": b, "ms_per_step": ms, "tok_s": b * 1e3 / ms})
    if a.json:
        print(json.dumps({"model": a.model, "threads": torch.get_num_threads(), "rows": rows}))
        return
    print(f"{m.path.rsplit('/', 1)[-1]}, {torch.get_num_threads()} threads, prompts {a.prompt}+7i tokens, "
          f"{a.steps} steps, median of {a.reps}")
    print("| path | B | ms/step | aggregate tok/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['B']} | {r['ms_per_step']:.1f} | {r['tok_s']:.0f} |")


if __name__ == "__main__":
    main()
