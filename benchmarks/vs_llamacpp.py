"""ggtorch vs llama.cpp (through llama-cpp-python) on the same file, same thread count, one run.

    python benchmarks/vs_llamacpp.py [MODEL ...] [-p 512] [-n 128] [-r 3] [--threads 2] [--exact]

Prints a markdown table and the ratios. llama-cpp-python is optional (pip install llama-cpp-python,
~10 min to build); without it the llama.cpp rows are skipped with a message.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ggtorch.bench import bench, format_table  # noqa: E402
from ggtorch.packaged import resolve  # noqa: E402

LLAMA_CPP_CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
import llama_cpp
path, n_prompt, n_gen, reps, threads = sys.argv[1], *map(int, sys.argv[2:6])
t = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=n_prompt + n_gen + 8, n_threads=threads, n_batch=n_prompt, verbose=False)
load_s = time.perf_counter() - t
rng = np.random.default_rng(0)
prompt = rng.integers(0, llm.n_vocab(), n_prompt).tolist()
pp, tg = [], []
for _ in range(reps):
    llm.reset(); t = time.perf_counter(); llm.eval(prompt); pp.append(n_prompt / (time.perf_counter() - t))
    llm.reset(); llm.eval(prompt[:1]); t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    tg.append(n_gen / (time.perf_counter() - t))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"model": path.rsplit("/", 1)[-1], "backend": "llama.cpp", "threads": threads, "load_s": load_s,
                  f"pp{n_prompt}_tok_s": statistics.median(pp), f"tg{n_gen}_tok_s": statistics.median(tg),
                  "peak_rss_mb": rss}))
"""


def _expert_traffic(path, a):
    """MoE files: the expert bytes ggtorch reads per decoded token (ggtorch.model.moe.decode_expert_traffic)."""
    code = ("import json,sys; sys.path.insert(0, %r); import ggtorch; from ggtorch.model.moe import decode_expert_traffic; "
            "m = ggtorch.load(%r, threads=%d, fast=%r); "
            "print(json.dumps(decode_expert_traffic(m.net, [1] + list(range(10, 25)), 32) if m.cfg.n_expert else None))"
            % (os.path.join(os.path.dirname(__file__), ".."), path, a.threads, not a.exact))
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact", action="store_true", help="ggtorch's float32 reference path instead of its kernels")
    a = ap.parse_args()
    rows = []
    try:
        import llama_cpp  # noqa: F401
        have = True
    except ImportError:
        have = False
        print("llama-cpp-python is not installed: llama.cpp rows skipped (pip install llama-cpp-python)",
              file=sys.stderr)
    for m in a.models:
        path = resolve(m)
        # each measurement in its own process, so peak RSS is its own
        code = ("import json,sys; sys.path.insert(0, %r); from ggtorch.bench import bench; "
                "print(json.dumps(bench(%r, %d, %d, %d, threads=%d, fast=%r)))"
                % (os.path.join(os.path.dirname(__file__), ".."), path, a.p, a.n, a.r, a.threads, not a.exact))
        ours = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout)
        ours["backend"] = "ggtorch" + (" exact" if a.exact else "")
        rows.append(ours)
        moe = _expert_traffic(path, a)
        if moe:
            print(f"{m}: expert weights read per decoded token {moe['expert_bytes_per_token'] / 1024:.1f} KiB of "
                  f"{moe['expert_bytes_all'] / 1024:.1f} KiB in all experts ({100 * moe['fraction']:.0f}%)",
                  file=sys.stderr)
        if have:
            ref = json.loads(subprocess.run([sys.executable, "-c", LLAMA_CPP_CHILD, path, str(a.p), str(a.n), str(a.r),
                                             str(a.threads)], capture_output=True, text=True, check=True).stdout)
            rows.append(ref)
            pk, tk = f"pp{a.p}_tok_s", f"tg{a.n}_tok_s"
            print(f"{m}: prefill {ours[pk] / ref[pk]:.2f}x, decode {ours[tk] / ref[tk]:.2f}x, "
                  f"RSS {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, load {ours['load_s'] / ref['load_s']:.2f}x "
                  f"of llama.cpp", file=sys.stderr)
    print(format_table(rows))


if __name__ == "__main__":
    main()
