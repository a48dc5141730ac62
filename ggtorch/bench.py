"""`ggtorch bench`: prefill and decode speed (median of repetitions), load time, peak RSS — llama-bench style."""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model: str, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, device: str = "cpu",
          threads: int | None = None, fast: bool = True, kv_dtype=None, cache: bool = True) -> dict:
    from .api import load

    t0 = time.perf_counter()
    m = load(model, device=device, threads=threads, fast=fast, kv_dtype=kv_dtype, n_ctx=max(n_prompt + n_gen + 1, 8),
             cache=cache)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, m.n_vocab, (n_prompt,), generator=g).tolist()
    pp, tg = [], []
    first_token_s = None
    # one pool for every repetition, as a session keeps its cache (on CUDA its decode graphs are
    # recorded once, in the first repetition)
    cache = m.net.new_pool(1, n_prompt + n_gen + 1)
    for r in range(reps):
        cache.truncate(0)
        sync(m.net.device)
        t = time.perf_counter()
        logits = m.net.forward(prompt, cache)
        tok = int(logits[-1].argmax())
        dt = time.perf_counter() - t
        pp.append(n_prompt / dt)
        if first_token_s is None:
            first_token_s = load_s + dt
        cache.truncate(0)
        m.net.forward([prompt[0]], cache)
        sync(m.net.device)
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = int(m.net.forward([tok], cache)[-1].argmax())
        tg.append(n_gen / (time.perf_counter() - t))
    graphs = getattr(cache.__dict__.get("_graphs"), "captures", 0)
    return {"model": m.path.rsplit("/", 1)[-1], "device": device + ("" if fast else " exact"), "threads": torch.get_num_threads(),
            "load_s": load_s, f"pp{n_prompt}_tok_s": statistics.median(pp), f"tg{n_gen}_tok_s": statistics.median(tg),
            "first_token_s": first_token_s, "peak_rss_mb": peak_rss_mb(), "n_prompt": n_prompt, "n_gen": n_gen,
            "reps": reps, "kv_type": m.kv_type, "kv_bytes_per_token": m.kv_bytes_per_token(),
            "kv_mb": m.kv_bytes_per_token() * (n_prompt + n_gen) / 1e6,
            "repack_cache": getattr(m, "repack_cache", "off"), "cuda_graphs": graphs,
            **({"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if m.net.device.type == "cuda" else {})}


def kv_cell(r: dict) -> str:
    """KV cache MB at the benchmark's n_prompt + n_gen tokens, its type and bytes per token."""
    if "kv_mb" not in r:
        return ""
    return f"{r['kv_mb']:.1f} ({r['kv_type']}, {r['kv_bytes_per_token'] / 1024:.1f} KiB/tok)"


def format_table(rows: list[dict]) -> str:
    out = ["| model | backend | threads | load s | prefill tok/s | decode tok/s | peak RSS MB | KV MB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pp = next(v for k, v in r.items() if k.startswith("pp") and k.endswith("tok_s"))
        tg = next(v for k, v in r.items() if k.startswith("tg") and k.endswith("tok_s"))
        out.append(f"| {r['model']} | {r.get('backend') or 'ggtorch ' + r['device']} | {r['threads']} | {r['load_s']:.2f} "
                   f"| {pp:.1f} | {tg:.1f} | {r['peak_rss_mb']:.0f} | {kv_cell(r)} |")
    return "\n".join(out)
