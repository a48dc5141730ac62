"""The JIT matrix kernel's speed per weight type and matrix shape (no model, no llama.cpp).

    OMP_NUM_THREADS=1 python benchmarks/qdot_types.py [--types Q4_0,Q4_K,...] [--shapes 2048x2048,...]
                                                      [-M 1,128] [-r 7]

Random blocks of each type (every byte random except the float16 scales) are repacked into the
kernel's layout and multiplied with random activations through the same call a linear layer makes
(jit.Linear: activation quantization + tiles). The types are interleaved round by round and the
median per (type, shape, M) is printed as microseconds per call and as weight values x activation
rows per nanosecond (GMAC/s), with the best round's GMAC/s (what a shared machine still shows), so that low-bit tiles can be compared with Q4_0's on equal terms.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ggtorch.gguf.types import ggml_type  # noqa: E402
from ggtorch.quant.linear import QWeight  # noqa: E402
from ggtorch.quant.qdot import _qdot_pack, qdot_linear  # noqa: E402
from ggtorch.quant.random import random_weight  # noqa: E402

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_0,Q4_K,Q6_K,Q8_0,IQ4_XS,IQ4_NL,Q2_K,Q3_K")
    ap.add_argument("--shapes", default="2048x2048,5632x2048,2048x5632", help="NxK (rows x inputs)")
    ap.add_argument("-M", default="1,128", help="activation rows")
    ap.add_argument("-r", "--rounds", type=int, default=7)
    a = ap.parse_args()
    types = a.types.split(",")
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    Ms = [int(m) for m in a.M.split(",")]
    fns = {}
    for t in types:
        for N, K in shapes:
            w = random_weight(t, N, K, 1)
            w.state = _qdot_pack(w)
            fns[t, N, K] = qdot_linear(w)
    xs = {(M, K): torch.randn(M, K) for M in Ms for _, K in shapes}
    times = {}
    for _ in range(a.rounds):
        for key, f in fns.items():
            for M in Ms:
                x = xs[M, key[2]]
                n = max(1, int(2e8 // (M * key[1] * key[2])))  # ~0.1-0.3 s per measurement
                f(x)
                t0 = time.perf_counter()
                for _ in range(n):
                    f(x)
                times.setdefault((*key, M), []).append((time.perf_counter() - t0) / n)
    print(f"threads={torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'type':8} {'N x K':>11} {'M':>4} {'us/call':>10} {'GMAC/s':>8} {'best':>8}")
    for (t, N, K, M), v in times.items():
        s = statistics.median(v)
        print(f"{t:8} {N:>5}x{K:<5} {M:>4} {s * 1e6:10.1f} {M * N * K / s / 1e9:8.2f} {M * N * K / min(v) / 1e9:8.2f}")


if __name__ == "__main__":
    main()
