"""ggtorch vs llama.cpp (through llama-cpp-python) on the same file, same thread count, one run.

    python benchmarks/vs_llamacpp.py [MODEL ...] [-p 512] [-n 128] [-r 3] [--threads 2] [--exact]
    python benchmarks/vs_llamacpp.py --synthetic [--synthetic-dir DIR] [--types Q4_0,Q8_0,Q4_K_M] [--layers N]
    python benchmarks/vs_llamacpp.py --moe [--moe-types Q4_K_M] [--moe-layers N]
    python benchmarks/vs_llamacpp.py --requantize smollm2-135m --types IQ4_XS,Q2_K,...

Each measurement runs in its own process, so peak RSS is its own, and each engine starts with the file
read once into the page cache (page_in: cold means an empty repack cache, not a disk read). ggtorch's load is measured twice,
with a fresh repack cache (cold: repack; the entry is written on a thread after load returns; the
median of --cold-reps fresh processes) and with the stored one (warm: memory-mapped);
prefill, decode and peak RSS come from the warm process. The repack cache is a temporary directory,
never the user's. Peak RSS is printed in total and above a floor: `import torch` alone for ggtorch,
`import llama_cpp` alone for llama.cpp, both measured in the same run.
`--synthetic` adds the random-weight 1.1B models (TinyLlama's shape) made by make_synthetic.py, one per
`--types` entry (llama.cpp's ftype names: Q4_0, Q8_0, Q4_K_M, IQ4_XS, IQ4_NL, Q2_K, Q3_K_M, IQ3_S, IQ3_XXS,
IQ2_XS, IQ1_S, ...: llama.cpp's quantizer writes them from an F16 file, with a random importance matrix
where it needs one); `--layers N` keeps N of its 22 layers (a quicker stand-in). Each file's line says
how its weight bytes split over tensor types and which of them take ggtorch's JIT kernel
(ggtorch.quant.types.TYPES); the others take PyTorch's kernels. `--moe` adds the synthetic Qwen3-MoE
(Qwen3-30B-A3B's layer shape: 64 experts of width 768, 8 routed) and prints, for MoE files, the expert
bytes ggtorch reads per decoded token beside the file's bytes of the same experts (llama.cpp's).
llama-cpp-python is optional; without it the llama.cpp rows are skipped with a message.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
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
                  "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg), "peak_rss_mb": rss}))
"""

GGTORCH_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch  # imported before the clock starts, as in any program that calls ggtorch.load
from ggtorch.bench import bench, peak_rss_mb
path, n_prompt, n_gen, reps, threads, fast, load_only = sys.argv[2], *map(int, sys.argv[3:9])
if load_only:
    import ggtorch
    t = time.perf_counter()
    m = ggtorch.load(path, threads=threads, fast=bool(fast))
    print(json.dumps({"load_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "repack_cache": m.repack_cache}))
else:
    r = bench(path, n_prompt, n_gen, reps, threads=threads, fast=bool(fast))
    r["pp_tok_s"], r["tg_tok_s"] = r[f"pp{n_prompt}_tok_s"], r[f"tg{n_gen}_tok_s"]
    print(json.dumps(r))
"""

FLOOR_CHILD = r"""
import resource, sys
__import__(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def child(code, *args, env=None) -> str:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def wall(cmd, env=None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, env=env)
    return time.perf_counter() - t


def _expert_traffic(root, path, a, env):
    """MoE files: the expert bytes ggtorch reads per decoded token (ggtorch.model.moe.decode_expert_traffic)."""
    code = ("import json,sys; sys.path.insert(0, %r); import ggtorch; from ggtorch.model.moe import decode_expert_traffic; "
            "m = ggtorch.load(%r, threads=%d, fast=%r); "
            "print(json.dumps(decode_expert_traffic(m.net, [1] + list(range(10, 25)), 32) if m.cfg.n_expert else None))"
            % (root, path, a.threads, not a.exact))
    return json.loads(child(code, env=env))


def type_mix(path: str) -> str:
    """'IQ4_XS 77% jit, Q6_K 23% jit': the file's 2-D weight bytes by tensor type, and whether ggtorch's
    JIT kernel multiplies that type (quant.types' table) or PyTorch's kernels do."""
    from ggtorch.gguf.reader import open_gguf
    from ggtorch.quant.types import TYPES

    by = {}
    with open_gguf(path) as f:
        for t in f:
            if len(t.numpy_shape) >= 2 and t.nbytes:
                by[t.type_name] = by.get(t.type_name, 0) + t.nbytes
    total = sum(by.values()) or 1
    return ", ".join(f"{k} {100 * v / total:.0f}% {'jit' if k in TYPES else 'torch'}"
                     for k, v in sorted(by.items(), key=lambda kv: -kv[1]))


def page_in(path: str) -> None:
    """Read the file once, untimed, so that each engine's load starts with it in the page cache. llama.cpp
    maps the file and reads a weight on first use (inside its first prefill), ggtorch repacks every weight
    at a cold load: on this machine, whose memory manager reclaims idle page cache within minutes, a
    cold load measured just after another file's run read the disk and took 3-4x longer (a 1.1B Q4_0:
    3.2 s from disk, 0.35 s from the page cache)."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def run_one(path: str, a, have_llama: bool) -> tuple[dict, dict | None]:
    root = os.path.join(HERE, "..")
    page_in(path)
    fast = int(not a.exact)
    if a.quick:  # prefill and decode only: one ggtorch process (repacking into an empty cache), then llama.cpp
        with tempfile.TemporaryDirectory(prefix="ggtorch-bench-cache-") as d:
            env = {**os.environ, "GGTORCH_REPACK_CACHE": d, "PYTHONPATH": root}
            ours = json.loads(child(GGTORCH_CHILD, root, path, a.p, a.n, a.r, a.threads, fast, 0, env=env))
        nan = float("nan")
        ours.update(backend="ggtorch" + (" exact" if a.exact else ""), load_cold_s=ours["load_s"],
                    load_cold_all_s=[round(ours["load_s"], 3)], load_warm_s=nan, ttft_cli_s=nan, moe=None)
        if have_llama:
            page_in(path)
        return ours, json.loads(child(LLAMA_CPP_CHILD, path, a.p, a.n, a.r, a.threads)) if have_llama else None
    colds = []
    for _ in range(a.cold_reps - 1):  # extra cold loads, each with its own empty cache (median reported)
        with tempfile.TemporaryDirectory(prefix="ggtorch-bench-cache-") as d:
            env = {**os.environ, "GGTORCH_REPACK_CACHE": d, "PYTHONPATH": root}
            colds.append(json.loads(child(GGTORCH_CHILD, root, path, a.p, a.n, a.r, a.threads, fast, 1, env=env)))
    with tempfile.TemporaryDirectory(prefix="ggtorch-bench-cache-") as d:
        env = {**os.environ, "GGTORCH_REPACK_CACHE": d, "PYTHONPATH": root}
        colds.append(json.loads(child(GGTORCH_CHILD, root, path, a.p, a.n, a.r, a.threads, fast, 1, env=env)))
        cold = sorted(colds, key=lambda c: c["load_s"])[len(colds) // 2]
        cold["all_s"] = [round(c["load_s"], 3) for c in colds]
        ours = json.loads(child(GGTORCH_CHILD, root, path, a.p, a.n, a.r, a.threads, fast, 0, env=env))
        ours["moe"] = _expert_traffic(root, path, a, env)
        # time to first token from the command line, warm cache: `ggtorch run -n 1`, process start to exit
        ours["ttft_cli_s"] = wall([sys.executable, "-m", "ggtorch", "run", path, "-p", "Hello", "-n", "1",
                                   "--threads", str(a.threads)] + (["--exact"] if a.exact else []), env=env)
    ours.update(backend="ggtorch" + (" exact" if a.exact else ""), load_cold_s=cold["load_s"], load_cold_all_s=cold["all_s"],
                cold_peak_rss_mb=cold["peak_rss_mb"], load_warm_s=ours["load_s"],
                warm_cache=ours.get("repack_cache"), cold_cache=cold["repack_cache"])
    ref = None
    if have_llama:
        page_in(path)
        ref = json.loads(child(LLAMA_CPP_CHILD, path, a.p, a.n, a.r, a.threads))
    return ours, ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact", action="store_true", help="ggtorch's float32 reference path instead of its kernels")
    ap.add_argument("--cold-reps", type=int, default=3, help="cold loads per model, each in a fresh process with an "
                    "empty cache (the median is printed; this machine's spread between single runs was 2x)")
    ap.add_argument("--synthetic", action="store_true", help="add the random 1.1B models (TinyLlama shape)")
    ap.add_argument("--synthetic-dir", default="/tmp/ggtorch-synthetic")
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K_M", help="synthetic model types (llama.cpp ftype names)")
    ap.add_argument("--layers", type=int, default=None, help="synthetic models with this many of the 22 layers")
    ap.add_argument("--moe", action="store_true", help="add the synthetic Qwen3-MoE (Qwen3-30B-A3B's layer shape, "
                    "make_synthetic.make_moe) in --moe-types")
    ap.add_argument("--moe-types", default="Q4_K_M", help="synthetic Qwen3-MoE types (Q8_0, or requantized from it)")
    ap.add_argument("--moe-layers", type=int, default=None, help="synthetic Qwen3-MoE with this many layers (8)")
    ap.add_argument("--requantize", default=None, metavar="MODEL", help="add MODEL (a path or packaged name) "
                    "requantized by llama.cpp's quantizer into each of --types (make_synthetic.requantize)")
    ap.add_argument("--json", default=None, help="also write every row to this file")
    ap.add_argument("--quick", action="store_true", help="prefill and decode only (one cold ggtorch process, no warm "
                    "load, `run -n 1` or expert traffic): for a loaded machine")
    a = ap.parse_args()
    models = list(a.models) or ([] if a.synthetic or a.moe or a.requantize else ["smollm2-135m", "gemma3-270m"])
    if a.synthetic:
        from make_synthetic import make

        models += list(make(a.synthetic_dir, a.types.split(","), a.layers).values())
    if a.requantize:
        from make_synthetic import requantize

        models += list(requantize(a.requantize, a.synthetic_dir, a.types.split(",")).values())
    if a.moe:
        from make_synthetic import make_moe

        models += list(make_moe(a.synthetic_dir, a.moe_types.split(","), a.moe_layers).values())
    try:
        import llama_cpp  # noqa: F401
        have = True
    except ImportError:
        have = False
        print("llama-cpp-python is not installed: llama.cpp rows skipped (pip install llama-cpp-python)",
              file=sys.stderr)
    torch_floor = float(child(FLOOR_CHILD, "torch"))
    import_torch_s = wall([sys.executable, "-c", "import torch"])
    llama_floor = float(child(FLOOR_CHILD, "llama_cpp")) if have else 0.0
    print(f"peak RSS floors: import torch {torch_floor:.0f} MB, import llama_cpp {llama_floor:.0f} MB; "
          f"`python -c 'import torch'` takes {import_torch_s:.2f} s", file=sys.stderr)
    out = ["| model | backend | load cold s | load warm s | prefill pp%d tok/s | decode tg%d tok/s | peak RSS MB "
           "| above floor MB | `run -n 1` s |" % (a.p, a.n), "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for m in models:
        path = resolve(m)
        name = os.path.basename(path)
        print(f"{name}: weights {type_mix(path)}", file=sys.stderr, flush=True)
        ours, ref = run_one(path, a, have)
        ours_above = ours["peak_rss_mb"] - torch_floor
        out.append(f"| {name} | {ours['backend']} | {ours['load_cold_s']:.2f} | {ours['load_warm_s']:.2f} "
                   f"| {ours['pp_tok_s']:.1f} | {ours['tg_tok_s']:.1f} | {ours['peak_rss_mb']:.0f} | {ours_above:.0f} "
                   f"| {ours['ttft_cli_s']:.2f} |")
        rows.append(ours)
        if ref:
            ref_above = ref["peak_rss_mb"] - llama_floor
            out.append(f"| | llama.cpp | {ref['load_s']:.2f} | | {ref['pp_tok_s']:.1f} | {ref['tg_tok_s']:.1f} "
                       f"| {ref['peak_rss_mb']:.0f} | {ref_above:.0f} | |")
            out.append(f"| | ratio | {ours['load_cold_s'] / ref['load_s']:.1f}× | {ours['load_warm_s'] / ref['load_s']:.1f}× "
                       f"| **{ours['pp_tok_s'] / ref['pp_tok_s']:.2f}×** | **{ours['tg_tok_s'] / ref['tg_tok_s']:.2f}×** "
                       f"| {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}× | {ours_above / ref_above:.2f}× | |")
            rows.append(ref)
        print("\n".join(out[-3:] if ref else out[-1:]), file=sys.stderr, flush=True)
        print(f"{name}: cold loads {ours['load_cold_all_s']} s (median in the table)", file=sys.stderr, flush=True)
        moe = ours.get("moe")
        if moe:
            print(f"{name}: expert weights read per decoded token {moe['expert_bytes_per_token'] / 1024:.1f} KiB of "
                  f"{moe['expert_bytes_all'] / 1024:.1f} KiB in all experts ({100 * moe['fraction']:.0f}%); the file's "
                  f"blocks of the same experts {moe['file_bytes_per_token'] / 1024:.1f} KiB "
                  f"({moe['expert_bytes_per_token'] / moe['file_bytes_per_token']:.3f}x)", file=sys.stderr)
    print("\n".join(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch_floor_mb": torch_floor, "llama_cpp_floor_mb": llama_floor, "import_torch_s": import_torch_s,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
