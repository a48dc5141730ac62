"""What mixing adapters in one batch costs: one decode step of 4 sequences on SmolLM2-135M with two random
rank-16 adapters on every projection, as the server runs it when 4 requests ask for 4 different adapter
settings (one forward_batch, per-row scales), against the same step with every row under the loaded scales
(the plain path), against 4 single-row forwards (one per setting: how llama.cpp's server, which batches
only equal adapters, would run them), and against the model without adapters (the one-call step).
CPU time of the calling thread with one torch thread, the four variants interleaved.

    .venv/bin/python benchmarks/lora_mixed_batch.py [MODEL] [--reps 25]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ggtorch
from ggtorch.lora.adapter import Adapter
from ggtorch.lora.apply import set_slot_scales

PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def random_adapter(net, name: str, rank: int = 16) -> Adapter:
    pairs = {}
    for il in range(net.cfg.n_layer):
        for t in PROJ:
            n = f"blk.{il}.{t}.weight"
            n_in, n_out = net.file.tensors[n].shape[:2]
            pairs[n] = (torch.randn(rank, n_in) * 0.01, torch.randn(n_out, rank) * 0.01)
    return Adapter(name, net.cfg.arch, 2.0 * rank, pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=25)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base, m = ggtorch.load(a.model), ggtorch.load(a.model)
    net = m.net
    m.set_lora([(random_adapter(net, "a"), 1.0), (random_adapter(net, "b"), 0.5)])
    prompt = base.tokenize("The quick brown fox jumps over the lazy dog. " * 4, bos=True)[:40]
    pools = {}
    for mm in (base, m):
        p = mm.net.new_pool(4, 1024)
        for s in range(4):
            mm.net.forward(prompt, p, slot=s)
        pools[mm] = p
    pools = {"no adapters": (base.net, pools[base]), "plain": (net, pools[m]), "mixed": (net, pools[m]),
             "separate": (net, pools[m])}  # one pool for the three: each step adds a token to every slot
    mixed = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [1.0, 0.5], 3: [0.0, 0.0]}
    tok = [prompt[-1]] * 4
    times: dict[str, list[float]] = {k: [] for k in pools}
    for _ in range(a.reps):
        for key, (n, p) in pools.items():
            if n is net:
                set_slot_scales(net, mixed if key in ("mixed", "separate") else None, 4)
            t = time.process_time()
            if key == "separate":
                for s in range(4):
                    n.forward([tok[s]], p, slot=s)
            else:
                n.forward_batch(tok, [0, 1, 2, 3], p)
            times[key].append(time.process_time() - t)
    set_slot_scales(net, None)
    for k, v in times.items():
        print(f"{k:12s} median {statistics.median(v[3:]) * 1e3:7.2f} ms per step of 4 rows")


if __name__ == "__main__":
    main()
