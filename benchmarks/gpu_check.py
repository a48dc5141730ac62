"""The GPU check of ggtorch's Triton kernels (ggtorch.quant.triton), run by benchmarks/gpu_check.sh on a
bare GPU machine: no network, no fixtures, only this repository. It

1. measures the device's copy bandwidth (the denominator of every bandwidth bound below);
2. checks the compiled kernels of every type against dequantize-then-matmul on the device (the
   dequantized weights bit for bit, matrix-vector products for 1..8 rows, tiled products for prefill);
3. writes tiny random models of every type (ggtorch's own GGUF writer; random blocks, so no quantizer
   is needed) and checks their logits on the GPU against the CPU float32 exact path, and the greedy
   tokens wherever the CPU's top-2 margin is at least 0.1;
4. checks the static decode step (model/cuda_graph.py, captured as one CUDA graph) against the
   model's batched decode;
5. writes the 1.1B synthetic model (TinyLlama's shape, random weights) in Q4_0, Q4_K_M (llama.cpp's
   mix: Q6_K for output, and attn_v/ffn_down in the layers llama.cpp's use_more_bits picks) and Q8_0,
   and measures load time, GPU memory, prefill tok/s at 512 tokens and decode tok/s at batch 1 and 8
   (the eager forward, and the static step replayed as a CUDA graph), beside each file's bandwidth
   bound (weight bytes read per token / copy bandwidth); then the same for the synthetic Qwen3-MoE
   (8 layers of Qwen3-30B-A3B's shape, 64 experts, 8 used; experts through the grouped kernel);
6. prints one table and writes it, with the raw figures, under --out.

    python benchmarks/gpu_check.py --out DIR [--models DIR] [--skip-big | --skip-checks] [--types T,..]
        [--cpu-dry-run]

``--cpu-dry-run`` runs the same steps on CPU tensors in Triton's interpreter with tiny shapes (a
~20M-parameter stand-in for the 1.1B model): a check of the script itself, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if "--cpu-dry-run" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ggtorch  # noqa: E402
from ggtorch.gguf.types import ggml_type  # noqa: E402
from ggtorch.quant import triton as qt  # noqa: E402
from ggtorch.quant.linear import QWeight  # noqa: E402
from gpu_models import random_blocks, write_llama, write_qwen3moe  # noqa: E402

def log(*a):
    print(*a, flush=True)


# ---- checks ------------------------------------------------------------------------------------------
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(dev, nbytes: int) -> float:
    """Bytes moved per second by a device-to-device copy (read + write), best of a few."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(dev)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            b.copy_(a)
        sync(dev)
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * nbytes / best


def check_kernels(dev, small: bool) -> list[str]:
    """Every type: the layout's weights equal the float32 dequantizer's, the products equal
    dequantize-then-matmul (fp32 matvec: within a few ulps of sum |x·w|; fp16 tiles: 2e-3 of the max)."""
    from ggtorch.quant.triton.kernels import dequantize, linear

    fails = []
    for name in sorted(qt.LAYOUTS):
        t0 = time.perf_counter()
        bs = ggml_type(name).block_size
        n, k = (37, 2 * bs if bs == 256 else 96) if small else (1001, 2048)
        raw = random_blocks(name, n * k, np.random.default_rng(len(name)), std=1.0)
        w = QWeight(torch.from_numpy(raw), ggml_type(name), (k, n), name)
        ref_w = w.dequantize().to(dev)  # the CPU reference dequantizer
        w.to(dev)
        qt.install(w)
        ok = torch.equal(dequantize(w.state, w.tparams, n, dev), ref_w)
        worst = 0.0
        g = torch.Generator().manual_seed(0)
        for m in (1, 8):  # BM 1 and 8; the tests cover 2 and 4
            x = torch.randn(m, k, generator=g).to(dev)
            y = linear(x, w.state, w.tparams, n)
            ref = x @ ref_w.T
            bound = 1e-5 * float((x.abs() @ ref_w.abs().T).max())
            err = float((y - ref).abs().max())
            ok &= err <= bound
            worst = max(worst, err / bound)
        for m in ((19,) if small else (64, 512)):
            x = torch.randn(m, k, generator=g).to(dev)
            y = linear(x, w.state, w.tparams, n)
            ref = x @ ref_w.T
            rel = float((y - ref).abs().max() / ref.abs().max())
            ok &= rel <= 2e-3
        sync(dev)
        log(f"  kernel {name:7s} {'ok' if ok else 'FAIL'}  (matvec err {worst:.2f} of bound, tiled rel {rel:.1e}, "
            f"{time.perf_counter() - t0:.1f} s)")
        if not ok:
            fails.append(f"kernel {name}")
    return fails


def greedy_check(path: str, dev, prompt: list[int], n_gen: int, fast_dev=None) -> tuple[float, int, int]:
    """(max logit error in sigmas, greedy tokens equal, tokens compared) of the device's Triton path
    against the CPU float32 exact path: the CPU's greedy continuation is fed to both (teacher forcing),
    and a token counts where the CPU's top-2 margin is >= 0.1."""
    cpu = ggtorch.load(path, fast=False, cache=False)
    cache = cpu.net.new_cache(len(prompt) + n_gen + 1)
    ids = list(prompt)
    lg = [cpu.net.forward(ids, cache, all_logits=True)]
    for _ in range(n_gen - 1):
        ids.append(int(lg[-1][-1].argmax()))
        lg.append(cpu.net.forward(ids[-1:], cache, all_logits=True))
    ref = torch.cat(lg)
    del cpu
    gpu = fast_dev or ggtorch.load(path, device=str(dev), cache=False)
    cache = gpu.net.new_cache(len(ids) + 1)
    got = [gpu.net.forward(ids[:len(prompt)], cache, all_logits=True)]  # prefill: the tiled kernel
    for t in ids[len(prompt):]:
        got.append(gpu.net.forward([t], cache, all_logits=True))  # decode: the matrix-vector kernel
    got = torch.cat(got).float().cpu()
    err = float((got - ref).abs().max() / ref.std())
    top2 = ref.topk(2, dim=-1).values
    sure = (top2[:, 0] - top2[:, 1]) >= 0.1
    same = (got.argmax(-1) == ref.argmax(-1)) | ~sure
    return err, int(same[len(prompt) - 1:].sum()), n_gen


def check_tiny_models(dev, tmp: str, dry: bool = False) -> list[str]:
    fails = []
    for name in (("Q4_K", "Q6_K") if dry else sorted(qt.LAYOUTS)):  # the interpreter is slow
        path = os.path.join(tmp, f"tiny-{name}.gguf")
        write_llama(path, name, n_layer=2, n_embd=256, n_ff=768, n_head=4, n_head_kv=2, n_vocab=1024, seed=1)
        err, same, n = greedy_check(path, dev, list(range(3, 19)), 3 if dry else 8)
        ok = err <= 0.05 and same == n
        log(f"  tiny model {name:7s} {'ok' if ok else 'FAIL'}  logits {err:.4f} sigma from the CPU exact path, "
            f"greedy {same}/{n}")
        if not ok:
            fails.append(f"tiny model {name}")
    return fails


def check_graph(dev, tmp: str) -> list[str]:
    """The decode step as a CUDA graph (model/cuda_graph.py, taken by forward/forward_batch on CUDA)
    against the same steps without graphs: 4 sequences in slots out of order, 6 steps, then one
    sequence alone; then the continuous-batching engine (what `serve` runs) against each prompt alone."""
    from ggtorch.model import cuda_graph

    path = os.path.join(tmp, "tiny-Q4_K.gguf")
    if not os.path.exists(path):
        write_llama(path, "Q4_K", n_layer=2, n_embd=256, n_ff=768, n_head=4, n_head_kv=2, n_vocab=1024, seed=1)
    m = ggtorch.load(path, device=str(dev), cache=False)
    net = m.net
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 2, 7)]
    slots = [2, 0, 3, 1]
    pools = []
    for graphs in (False, True):
        cuda_graph.ENABLED = graphs
        pool = net.new_pool(4, 64)
        toks = [int(net.forward(p, pool, slot=s)[-1].argmax()) for s, p in zip(slots, prompts)]
        outs = []
        for _ in range(6):
            lg = net.forward_batch(toks, slots, pool).float()
            outs.append(lg.cpu())
            toks = lg.argmax(-1).tolist()
        outs.append(net.forward([toks[0]], pool, slot=slots[0]).float().cpu())
        pools.append((pool, outs))
    cuda_graph.ENABLED = True
    (p0, ref), (p1, got) = pools
    worst = max(float((a - b).abs().max() / b.std()) for a, b in zip(got, ref))
    g = p1.__dict__.get("_graphs")
    n = g.captures if g is not None else 0
    ok = worst <= 1e-3 and (n >= 2 or dev.type != "cuda")
    log(f"  decode step through CUDA graphs {'ok' if ok else 'FAIL'}  {worst:.2e} sigma from the eager steps, "
        f"{n} graphs recorded")
    fails = [] if ok else ["CUDA-graph decode step"]
    # the engine: 6 prompts, 4 decoded together, against each alone
    ps = [list(range(3, 3 + n)) for n in (4, 11, 6, 2, 9, 5)]
    alone = [m.generate(p, max_tokens=10, ignore_eos=True).ids for p in ps]
    together = [r.ids for r in m.generate_batch(ps, parallel=4, max_tokens=10, ignore_eos=True)]
    same = sum(a == b for a, b in zip(alone, together))
    log(f"  engine (serve's batching) {'ok' if same == len(ps) else 'FAIL'}  {same}/{len(ps)} prompts decoded "
        f"4 at a time give their text alone")
    if same != len(ps):
        fails.append("engine batching")
    return fails


def kernel_sweep(dev, bw: float, small: bool) -> list[str]:
    """The matrix-vector kernel alone on a 1.1B ffn_up-shaped matrix (5632 x 2048) for a few tiles:
    GB/s of weight bytes read (the layout's planes) and its share of the copy bandwidth."""
    from ggtorch.quant.triton import kernels as K

    lines = []
    n, k = (64, 512) if small else (5632, 2048)
    for name in ("Q4_0", "Q4_K", "Q6_K", "Q8_0"):
        raw = random_blocks(name, n * k, np.random.default_rng(0), std=1.0)
        w = QWeight(torch.from_numpy(raw), ggml_type(name), (k, n), name).to(dev)
        qt.install(w)
        nbytes = sum(v.numel() * v.element_size() for v in w.state.values())
        x = torch.randn(1, k, device=dev)
        res = []
        for tiles in ((8, 512), (4, 512), (16, 256), (32, 256), (8, 1024)):
            K.linear(x, w.state, w.tparams, n, tiles=tiles)
            sync(dev)
            reps = 3 if small else 200
            t = time.perf_counter()
            for _ in range(reps):
                K.linear(x, w.state, w.tparams, n, tiles=tiles)
            sync(dev)
            dt = (time.perf_counter() - t) / reps
            res.append(f"{tiles[0]}x{tiles[1]}: {nbytes / dt / 1e9:.0f} GB/s ({100 * nbytes / dt / bw:.0f}%)")
        for m in (1, 8):  # the autotuned decode kernel (_matvec) the product uses
            x = torch.randn(m, k, device=dev)
            K.linear(x, w.state, w.tparams, n)
            sync(dev)
            reps = 3 if small else 200
            t = time.perf_counter()
            for _ in range(reps):
                K.linear(x, w.state, w.tparams, n)
            sync(dev)
            dt = (time.perf_counter() - t) / reps
            tuned = K._matvec_1 if m == 1 else K._matvec_n
            best = getattr(tuned, "best_config", None)
            res.append(f"tuned b={m} {best.kwargs if best else ''}: {nbytes / dt / 1e9:.0f} GB/s ({100 * nbytes / dt / bw:.0f}%)")
        lines.append(f"  matvec {name:5s} " + ", ".join(res))
        log(lines[-1])
    return lines


# ---- speed --------------------------------------------------------------------------------------------
def bench(path: str, dev, per_token: int, bw: float, prefill: int, steps: int) -> dict:
    from ggtorch.model import cuda_graph

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    m = ggtorch.load(path, device=str(dev), cache=False)
    sync(dev)
    load_s = time.perf_counter() - t
    mem = torch.cuda.memory_allocated() - base if dev.type == "cuda" else 0
    net = m.net
    g = torch.Generator().manual_seed(0)
    V = m.n_vocab
    r = {"file": os.path.basename(path), "load_s": load_s, "weights_gib": mem / 2 ** 30,
         "bytes_per_token": per_token, "bound_tok_s": bw / per_token}
    # prefill: one forward of `prefill` tokens (the first call compiles the kernels)
    ids = torch.randint(0, V, (prefill + 16 + 8 * 8,), generator=g).tolist()
    pool = net.new_pool(8, prefill + 16 + 8 * 8 + steps + 16)
    from ggtorch.quant.triton import kernels as K

    default = K.PREFILL
    for mode in ("tiled", "dequant"):  # the _tiled kernel, or fp16 weights written once + cuBLAS
        K.PREFILL = mode
        best = 0.0
        for rep in range(3):
            pool.truncate(0)
            sync(dev)
            t = time.perf_counter()
            net.forward(ids[:prefill], pool)
            sync(dev)
            best = max(best, prefill / (time.perf_counter() - t))
        r[f"prefill_{mode}_tok_s"] = best
    K.PREFILL = default
    r["prefill_tok_s"] = r[f"prefill_{default}_tok_s"]
    p0, dp = (16, 7) if dev.type == "cuda" else (2, 1)  # each slot's prompt (short in the dry run)
    for graphs in (False, True):  # eager, then the step replayed as one CUDA graph (model/cuda_graph.py)
        cuda_graph.ENABLED = graphs
        tag = "graph" if graphs else "eager"
        for B in (1, 8):
            for s in range(B):
                pool.truncate(0, slot=s)
            toks = [int(net.forward(ids[:p0 + dp * s], pool, slot=s)[-1].argmax()) for s in range(B)]
            slots = list(range(B))
            for i in range(steps + 3):  # the host reads each step's tokens, as generation does
                if i == 3:
                    sync(dev)
                    t = time.perf_counter()
                if B == 1:
                    toks = [int(net.forward(toks, pool, slot=0)[-1].argmax())]
                else:
                    toks = net.forward_batch(toks, slots, pool).argmax(-1).tolist()
            r[f"{tag}{B}_tok_s"] = B * steps / (time.perf_counter() - t)
    cuda_graph.ENABLED = True
    gd = pool.__dict__.get("_graphs")
    r["graphs"] = gd.captures if gd is not None else 0
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else 0.0
    r["graph1_of_bound"] = r["graph1_tok_s"] / r["bound_tok_s"]
    del m, net, pool
    return r


def profile_step(path: str, dev) -> None:
    """Where an eager batch-1 decode step's GPU time goes (torch.profiler, 5 steps): the kernels by
    total time."""
    from torch.profiler import ProfilerActivity, profile

    m = ggtorch.load(path, device=str(dev), cache=False)
    net = m.net
    cache = net.new_pool(1, 64)
    tok = int(net.forward(list(range(3, 19)), cache)[-1].argmax())
    for _ in range(3):
        tok = int(net.forward([tok], cache)[-1].argmax())
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            tok = int(net.forward([tok], cache)[-1].argmax())
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            log(ka.table(sort_by=key, row_limit=18, max_name_column_width=60))
            break
        except Exception:
            continue
    del m, net, cache


def cli_bench(path: str, a) -> None:
    """`ggtorch run` and `ggtorch bench` with --device cuda in a child process (the product's own path:
    load, repack, prefill, decode through CUDA graphs); their output goes to the log and gpu_cli.txt."""
    import subprocess

    dev = ["--device", "cpu" if a.cpu_dry_run else "cuda"]
    n = ["-p", "32", "-n", "4", "-r", "1"] if a.cpu_dry_run else ["-p", "512", "-n", "128", "-r", "3"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = []
    for cmd in (["run", path, "-p", "Once upon a time", "-n", "16", "--ignore-eos"] + dev,
                ["bench", path] + n + dev + ["--json"]):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "ggtorch"] + cmd, cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=150)
        out.append(f"$ ggtorch {' '.join(cmd)}  (rc {p.returncode}, {time.perf_counter() - t:.1f} s)\n"
                   f"{p.stdout[-3000:]}{p.stderr[-2000:]}")
        log("  " + out[-1].replace("\n", "\n  "))
        if p.returncode != 0:
            raise RuntimeError(f"ggtorch {cmd[0]} exited {p.returncode}")
    with open(os.path.join(a.out, "gpu_cli.txt"), "a") as f:
        f.write("\n".join(out) + "\n")


def table(rows: list[dict], bw: float, device: str) -> str:
    out = [f"ggtorch Triton path on {device}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", "",
           "| model | weights read/token | bound tok/s | decode b=1 tok/s: graph (of bound) / eager | "
           "decode b=8 tok/s: graph / eager | prefill 512 tok/s: dequant+cuBLAS / tiled | load s | GPU GiB (weights / peak) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['file']} | {r['bytes_per_token'] / 2 ** 20:.0f} MiB | {r['bound_tok_s']:.0f} | "
                   f"{r['graph1_tok_s']:.1f} ({100 * r['graph1_of_bound']:.1f}%) / {r['eager1_tok_s']:.1f} | "
                   f"{r['graph8_tok_s']:.1f} / {r['eager8_tok_s']:.1f} | "
                   f"{r['prefill_dequant_tok_s']:.0f} / {r['prefill_tiled_tok_s']:.0f} | {r['load_s']:.1f} | {r['weights_gib']:.2f} / {r['peak_gib']:.2f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/ggtorch-gpu-check"))
    ap.add_argument("--models", default=None, help="where to write the synthetic models (default: OUT/../models)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU tensors in Triton's interpreter, tiny shapes")
    ap.add_argument("--skip-big", action="store_true", help="only the checks, no 1.1B models")
    ap.add_argument("--skip-checks", action="store_true", help="only the speed table")
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q8_0,qwen3moe", help="qwen3moe: the synthetic Qwen3-MoE")
    a = ap.parse_args()
    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    models = a.models or os.path.join(os.environ.get("TMPDIR", "/tmp"), "ggtorch-gpu-models")
    os.makedirs(models, exist_ok=True)
    if a.cpu_dry_run:
        from ggtorch.model import cuda_graph

        qt.enable_on_cpu()
        cuda_graph.ON_CPU = True  # the graph step's code, eagerly
        dev = torch.device("cpu")
        device = "CPU (Triton interpreter dry run: not a measurement)"
    else:
        if not torch.cuda.is_available():
            log("no CUDA device: use --cpu-dry-run")
            return 2
        dev = torch.device("cuda")
        device = torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
    import triton

    log(f"[gpu_check] {device}; torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth(dev, (1 << 24) if a.cpu_dry_run else (1 << 30))
    log(f"[gpu_check] copy bandwidth {bw / 1e9:.1f} GB/s")
    fails = []

    def stage(what, fn, *args):
        """One step; an exception is reported and counted as a failure, and the run goes on."""
        try:
            return fn(*args)
        except Exception:
            import traceback

            log(f"  {what}: EXCEPTION\n{traceback.format_exc()}")
            fails.append(f"{what} (exception)")
            return None

    if not a.skip_checks:
        log("[gpu_check] kernels against dequantize-then-matmul")
        fails += stage("kernels", check_kernels, dev, a.cpu_dry_run) or []
        log(f"[gpu_check] tiny random models of every type against the CPU exact path "
            f"({time.perf_counter() - t_start:.0f} s)")
        fails += stage("tiny models", check_tiny_models, dev, models, a.cpu_dry_run) or []
        log(f"[gpu_check] the static decode step ({time.perf_counter() - t_start:.0f} s)")
        fails += stage("static decode step", check_graph, dev, models) or []
    sweep = stage("matvec tile sweep", kernel_sweep, dev, bw, a.cpu_dry_run) or []
    rows = []
    if not a.skip_big:
        shape = (dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=1024) if a.cpu_dry_run else
                 dict(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000))
        prefill, steps = (32, 2) if a.cpu_dry_run else (512, 64)
        moe_shape = (dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=8, n_expert_used=2,
                          n_ff_exp=256, n_vocab=1024) if a.cpu_dry_run else
                     dict(n_layer=8, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=64,
                          n_expert_used=8, n_ff_exp=768, n_vocab=32000))
        for ft in a.types.split(","):
            size = "tiny" if a.cpu_dry_run else ("moe" if ft == "qwen3moe" else "1.1b")
            path = os.path.join(models, f"synthetic-{size}-{ft}.gguf")
            t = time.perf_counter()
            per_token = write_qwen3moe(path, **moe_shape) if ft == "qwen3moe" else write_llama(path, ft, **shape)
            log(f"[gpu_check] wrote {os.path.basename(path)} ({os.path.getsize(path) / 2 ** 30:.2f} GiB, "
                f"{time.perf_counter() - t:.0f} s)")
            if ft == "Q4_K_M":  # the big model's GPU logits against the CPU exact path too
                got = stage(f"{ft} logits", greedy_check, path, dev, list(range(3, 11)), 3)
                if got is not None:
                    err, same, n = got
                    ok = err <= 0.05 and same == n
                    log(f"  {os.path.basename(path)} {'ok' if ok else 'FAIL'}  logits {err:.4f} sigma from the CPU "
                        f"exact path, greedy {same}/{n}")
                    if not ok:
                        fails.append(os.path.basename(path))
            if ft == "Q4_K_M" or a.cpu_dry_run and ft == "Q4_0":  # the command line users type, end to end
                stage(f"{ft} ggtorch bench", cli_bench, path, a)
                stage(f"{ft} profile", profile_step, path, dev)
            r = stage(f"{ft} speed", bench, path, dev, per_token, bw, prefill, steps)
            if r is not None:
                log(f"  {json.dumps(r)}  ({time.perf_counter() - t_start:.0f} s)")
                rows.append(r)
                with open(os.path.join(a.out, "gpu_check.md"), "w") as f:  # kept if a later step times out
                    f.write(table(rows, bw, device) + "\n\n(partial: the run went on)\n")
            if not a.cpu_dry_run:
                os.remove(path)  # disk: one 1.1B file at a time
    text = table(rows, bw, device) if rows else f"(no speed table: --skip-big) on {device}"
    if sweep:
        text += "\n\nmatrix-vector kernel alone, one row, 5632 x 2048 (tiles BN x BK; share of the copy bandwidth):\n"
        text += "\n".join(sweep)
    text += f"\n\nchecks: {'all passed' if not fails else 'FAILED: ' + ', '.join(fails)}; " \
            f"{time.perf_counter() - t_start:.0f} s in all"
    print(text)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump({"device": device, "copy_bandwidth": bw, "rows": rows, "fails": fails,
                   "torch": torch.__version__, "triton": triton.__version__}, f, indent=1)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
