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


def bytes_per_token(f, n_expert: int = 0, n_expert_used: int = 0) -> int:
    """Weight bytes one decode step reads, from the file's tensors: every tensor once, except
    token_embd (one row; all of it when it is also the output matrix) and MoE experts (``_exps``:
    the routed n_expert_used of n_expert)."""
    names = {t.name for t in f}
    total = 0
    for t in f:
        nb = t.nbytes or 0
        if t.name == "token_embd.weight" and "output.weight" in names and len(t.shape) > 1:
            nb //= t.shape[1]
        elif "_exps" in t.name and n_expert:
            nb = nb * n_expert_used // n_expert
        total += nb
    return total


_BANDWIDTH_CODE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
dev = sys.argv[2]
a = torch.ones(int(sys.argv[3]) // 4, dtype=torch.float32, device=dev)
best = float("inf")
for _ in range(6):
    if dev != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    a.sum().item()
    best = min(best, time.perf_counter() - t)
print(a.numel() * 4 / best)
"""


def memory_bandwidth(device: str = "cpu", threads: int | None = None, nbytes: int = 1 << 30) -> float:
    """Bytes per second of one full read of a ``nbytes`` buffer (torch.sum, best of 6), measured in a
    child process so that its buffer stays out of this process's peak RSS."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _BANDWIDTH_CODE, str(threads or torch.get_num_threads()),
                          str(device), str(nbytes)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"bandwidth probe failed: {out.stderr.strip()[-300:]}")
    return float(out.stdout.strip().splitlines()[-1])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model: str, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, device: str = "cpu",
          threads: int | None = None, fast: bool = True, kv_dtype=None, cache: bool = True,
          bound: bool = False) -> dict:
    """llama-bench's figures for one model. ``bound``: also the memory bandwidth (measured in a child
    process) and the decode bound it sets, weight bytes per token / bandwidth, and decode's share of it."""
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
    c = m.cfg
    extra = {"weight_bytes_per_token": bytes_per_token(m.file, c.n_expert, c.n_expert_used)}
    if bound:
        bw = memory_bandwidth(device, threads)
        extra.update(bandwidth_gb_s=bw / 1e9, bound_tok_s=bw / extra["weight_bytes_per_token"],
                     decode_of_bound=statistics.median(tg) * extra["weight_bytes_per_token"] / bw)
    return {"model": m.path.rsplit("/", 1)[-1], "device": device + ("" if fast else " exact"), "threads": torch.get_num_threads(),
            "load_s": load_s, f"pp{n_prompt}_tok_s": statistics.median(pp), f"tg{n_gen}_tok_s": statistics.median(tg),
            "first_token_s": first_token_s, "peak_rss_mb": peak_rss_mb(), "n_prompt": n_prompt, "n_gen": n_gen,
            "reps": reps, "kv_type": m.kv_type, "kv_bytes_per_token": m.kv_bytes_per_token(),
            "kv_mb": m.kv_bytes_per_token() * (n_prompt + n_gen) / 1e6,
            "repack_cache": getattr(m, "repack_cache", "off"), "cuda_graphs": graphs, **extra,
            **({"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if m.net.device.type == "cuda" else {})}


def kv_cell(r: dict) -> str:
    """KV cache MB at the benchmark's n_prompt + n_gen tokens, its type and bytes per token."""
    if "kv_mb" not in r:
        return ""
    return f"{r['kv_mb']:.1f} ({r['kv_type']}, {r['kv_bytes_per_token'] / 1024:.1f} KiB/tok)"


def format_table(rows: list[dict]) -> str:
    bound = any("bound_tok_s" in r for r in rows)
    out = ["| model | backend | threads | load s | prefill tok/s | decode tok/s | peak RSS MB | KV MB |"
           + (" decode bound tok/s (of it) |" if bound else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if bound else "")]
    for r in rows:
        pp = next(v for k, v in r.items() if k.startswith("pp") and k.endswith("tok_s"))
        tg = next(v for k, v in r.items() if k.startswith("tg") and k.endswith("tok_s"))
        out.append(f"| {r['model']} | {r.get('backend') or 'ggtorch ' + r['device']} | {r['threads']} | {r['load_s']:.2f} "
                   f"| {pp:.1f} | {tg:.1f} | {r['peak_rss_mb']:.0f} | {kv_cell(r)} |"
                   + (f" {r['bound_tok_s']:.1f} ({100 * r['decode_of_bound']:.0f}%) |" if "bound_tok_s" in r
                      else (" |" if bound else "")))
    return "\n".join(out)
