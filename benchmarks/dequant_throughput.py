"""Dequantization throughput per ggml type: ggtorch vs gguf-py (numpy), same blocks, same run.

    python benchmarks/dequant_throughput.py [--mb 16] [--reps 3]

Prints a markdown table of million elements per second and the ratio.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ggtorch.gguf.types import TYPES  # noqa: E402
from ggtorch.quant.dequant import DEQUANTIZERS, dequantize  # noqa: E402


def best(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=16, help="MB of raw blocks per type")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        quants = None
        print("gguf-py not installed: ggtorch column only", file=sys.stderr)
    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}")
    print("| type | ggtorch M elem/s | gguf-py M elem/s | ratio |")
    print("|---|---|---|---|")
    for name, t in TYPES.items():
        if name not in DEQUANTIZERS or not t.quantized and name not in ("F16", "BF16"):
            continue
        n_blocks = int(a.mb * 2**20) // t.type_size
        raw = rng.integers(0, 256, size=(n_blocks, t.type_size), dtype=np.uint8)
        if t.quantized or name in ("F16", "BF16"):
            # keep scales finite so both sides do ordinary arithmetic
            pass
        n = n_blocks * t.block_size
        ours = n / best(lambda: dequantize(raw.reshape(-1), t), a.reps) / 1e6
        ref = None
        if quants is not None and hasattr(GGMLQuantizationType, name):
            try:
                with np.errstate(all="ignore"):
                    ref = n / best(lambda: quants.dequantize(raw, GGMLQuantizationType[name]), a.reps) / 1e6
            except NotImplementedError:
                ref = None
        ratio = f"{ours / ref:.1f}x" if ref else "-"
        print(f"| {name} | {ours:.0f} | {ref:.0f} | {ratio} |" if ref else f"| {name} | {ours:.0f} | - | - |")


if __name__ == "__main__":
    main()
