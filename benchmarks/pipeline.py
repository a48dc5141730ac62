"""Dev script: decode speed of one model in 1 process vs a 2-stage pipeline (ggtorch.dist.pipeline, gloo
on loopback), one sequence and several at once (the server's batched step, Transformer.forward_batch vs
PipelineNet.forward_batch with and without micro-batches), and the per-token hand-off cost alone (hidden
state [1, n_embd] to stage 1, logits [1, n_vocab] back to stage 0, no compute).

    python benchmarks/pipeline.py [MODEL] [-n 32] [--rounds 2] [--threads 2] [--batch 4] [--micro 1,2,4]
                                  [--configs 1x2,1x1,2x2,2x1] [--handoff-only]

MODEL defaults to the 1.1B synthetic Q4_0 of make_synthetic.py when /tmp/ggtorch-synthetic holds it,
else smollm2-135m. Each round runs, in fresh processes and in this order (the machine's load drifts):
1 stage with --threads threads and with half as many; 2 stages with --threads threads each (the stages of
one step take turns, so each may use them all) and with half as many each (a core per stage: what
micro-batches need to overlap). Prints one JSON line per run and a table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYNTH = "/tmp/ggtorch-synthetic/synthetic-1.1b-Q4_0.gguf"
PROMPT = list(range(1, 33))


def decode(m, n: int, batch: int, micro: list[int], cycles: int = 3) -> dict:
    """ms per decode step, the median of ``cycles`` interleaved measurements of n steps each: one sequence
    (Model.generate's path), and ``batch`` sequences in one batched step (forward_batch over the slots of
    a pool) once per micro-batch count (a pipeline) or once (one process). Every slot is prefilled with
    PROMPT (shifted); the steps decode greedy tokens."""
    pipe = hasattr(m.net, "micro_batches")
    micro = micro if pipe else [1]
    cache = m.new_cache()
    one = [int(m.net.forward(PROMPT, cache)[-1].argmax())]
    pools = {}
    for M in micro:
        pool = m.net.new_pool(batch, len(PROMPT) + (cycles * n + 2))
        toks = [int(m.net.forward([p + s for p in PROMPT], pool, slot=s)[-1].argmax()) for s in range(batch)]
        pools[M] = (pool, toks)
    times: dict = {"B1": []} | {f"B{batch}_M{M}": [] for M in micro}
    slots = list(range(batch))
    for c in range(cycles):  # interleaved, so that the machine's load drifts over all of them alike
        t0 = time.perf_counter()
        for _ in range(n):
            one[0] = int(m.net.forward(one, cache)[-1].argmax())
        times["B1"].append((time.perf_counter() - t0) * 1e3 / n)
        for M in micro:
            if pipe:
                m.net.micro_batches = M
            pool, toks = pools[M]
            t0 = time.perf_counter()
            for _ in range(n):
                toks = m.net.forward_batch(toks, slots, pool).argmax(-1).tolist()
            times[f"B{batch}_M{M}"].append((time.perf_counter() - t0) * 1e3 / n)
            pools[M] = (pool, toks)
    return {k: statistics.median(v) for k, v in times.items()}


def handoff(link, cfg, reps: int = 200) -> float:
    """Round trip of one token's messages between stage 0 and stage 1 (ms), measured on stage 0."""
    import torch
    import torch.distributed as dist

    x, lg = torch.zeros(1, cfg.n_embd), torch.zeros(1, cfg.n_vocab)
    if link.rank == 0:
        for i in range(reps + 20):
            if i == 20:
                t0 = time.perf_counter()
            dist.send(torch.zeros(8, dtype=torch.int64), 1)  # the header
            dist.send(x, 1)
            dist.recv(lg, 1)
        return (time.perf_counter() - t0) * 1e3 / reps
    for _ in range(reps + 20):
        dist.recv(torch.zeros(8, dtype=torch.int64), 0)
        dist.recv(x, 0)
        dist.send(lg, 0)
    return 0.0


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    micro = [int(x) for x in args.micro.split(",")]
    if args.stages == 1:
        import ggtorch

        m = ggtorch.load(args.model)
        print(json.dumps({"stages": 1, "threads": args.threads, **decode(m, args.n, args.batch, micro)}))
        return
    from ggtorch.dist import pipeline as P

    link = P.init(args.rank, 2, f"tcp://127.0.0.1:{args.port}")
    from ggtorch.gguf.reader import GGUFFile
    from ggtorch.model.config import Config
    from ggtorch.packaged import resolve

    cfg = Config.from_gguf(GGUFFile(resolve(args.model)))
    if args.handoff_only:  # the messages alone, with the model's shapes (its weights are never read)
        ms = handoff(link, cfg, reps=1000)
        if link.rank == 0:
            print(json.dumps({"stages": 2, "handoff_ms": ms}))
        return
    m = P.start(args.model, 2, link)
    out = {}
    if m is not None:
        out = decode(m, args.n, args.batch, micro)
        m.close()
    ms = handoff(link, cfg)
    if link.rank == 0:
        print(json.dumps({"stages": 2, "threads": args.threads, **out, "handoff_ms": ms}))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, stages: int, threads: int) -> dict:
    base = [sys.executable, os.path.abspath(__file__), args.model, "-n", str(args.n), "--threads", str(threads),
            "--stages", str(stages), "--batch", str(args.batch), "--micro", args.micro] + \
        (["--handoff-only"] if args.handoff_only else [])
    env = dict(os.environ, PYTHONPATH=ROOT)
    if stages == 1:
        procs = [subprocess.Popen(base + ["--worker"], stdout=subprocess.PIPE, env=env, text=True)]
    else:
        port = _port()
        procs = [subprocess.Popen(base + ["--worker", "--rank", str(r), "--port", str(port)], stdout=subprocess.PIPE,
                                  env=env, text=True) for r in (0, 1)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a {stages}-stage run failed")
    r = json.loads(outs[0].strip().splitlines()[-1])
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=SYNTH if os.path.exists(SYNTH) else "smollm2-135m")
    ap.add_argument("-n", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences decoded together (default 4)")
    ap.add_argument("--micro", default="1,2,4", help="micro-batch counts to time on the pipeline (default 1,2,4)")
    ap.add_argument("--configs", default=None, help="STAGESxTHREADS,... to run instead of the four (e.g. 1x1,2x1)")
    ap.add_argument("--stages", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--handoff-only", action="store_true",
                    help="only the per-token messages between two processes, with MODEL's shapes")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.handoff_only:
        hs = [run(args, 2, args.threads)["handoff_ms"] for _ in range(args.rounds)]
        print(f"{os.path.basename(args.model)}: hand-off {statistics.median(hs):.3f} ms/token")
        return
    half = max(1, args.threads // 2)
    configs = [(1, args.threads), (1, half), (2, args.threads), (2, half)] if half < args.threads else \
        [(1, args.threads), (2, args.threads)]
    if args.configs:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    runs: dict = {c: [] for c in configs}
    for _ in range(args.rounds):  # interleaved: the machine's load drifts
        for st, th in configs:
            runs[(st, th)].append(run(args, st, th))
    B = args.batch
    print(f"\n{os.path.basename(args.model)}: decode, medians of {args.rounds} interleaved rounds "
          f"(tok/s = sequences x steps / s)")
    print("| stages x threads | 1 sequence | " + " | ".join(
        f"{B} seq., {M} micro-batch{'es' if M > 1 else ''}" for M in map(int, args.micro.split(","))) + " |")
    for (st, th), rs in runs.items():
        cells = [f"{1e3 / statistics.median(r['B1'] for r in rs):.1f}"]
        for M in map(int, args.micro.split(",")):
            key = f"B{B}_M{M}"
            cells.append(f"{B * 1e3 / statistics.median(r[key] for r in rs):.1f}" if key in rs[0] else "(one process)"
                         if M > 1 else "")
        print(f"| {st} x {th} | " + " | ".join(cells) + " |")
    h = statistics.median(r["handoff_ms"] for c in configs if c[0] == 2 for r in runs[c])
    print(f"hand-off alone {h:.3f} ms/token (header + hidden state + logits on loopback)")


if __name__ == "__main__":
    main()
