"""Dev script: decode speed of one model in 1 process vs a 2-stage pipeline (ggtorch.dist.pipeline, gloo
on loopback), and the per-token hand-off cost alone (hidden state [1, n_embd] to stage 1, logits
[1, n_vocab] back to stage 0, no compute).

    python benchmarks/pipeline.py [MODEL] [-n 64] [--rounds 2] [--threads 2] [--handoff-only]

MODEL defaults to the 1.1B synthetic Q4_0 of make_synthetic.py when /tmp/ggtorch-synthetic holds it,
else smollm2-135m. The 1-stage and 2-stage runs alternate (rounds), each in fresh processes; every
process gets the same thread count (the stages of one sequence take turns, so each may use them all).
Prints one JSON line per run and a summary.
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


def decode(m, n: int) -> dict:
    """Prefill PROMPT, then n greedy decode steps; ms per decode step."""
    cache = m.new_cache()
    t = int(m.net.forward(PROMPT, cache)[-1].argmax())
    t0 = time.perf_counter()
    for _ in range(n):
        t = int(m.net.forward([t], cache)[-1].argmax())
    return {"ms_per_token": (time.perf_counter() - t0) * 1e3 / n}


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
    if args.stages == 1:
        import ggtorch

        m = ggtorch.load(args.model)
        print(json.dumps({"stages": 1, **decode(m, args.n)}))
        return
    from ggtorch.dist import pipeline as P

    link = P.init(args.rank, 2, f"tcp://127.0.0.1:{args.port}")
    if args.handoff_only:  # the messages alone, with the model's shapes (its weights are never read)
        from ggtorch.gguf.reader import GGUFFile
        from ggtorch.model.config import Config
        from ggtorch.packaged import resolve

        ms = handoff(link, Config.from_gguf(GGUFFile(resolve(args.model))), reps=1000)
        if link.rank == 0:
            print(json.dumps({"stages": 2, "handoff_ms": ms}))
        return
    m = P.start(args.model, 2, link)
    out = decode(m, args.n) if m is not None else {}
    if m is not None:
        cfg = m.cfg
        m.close()
    else:
        cfg = None
    if cfg is None:  # stage 1 learns the shapes from the file
        from ggtorch.gguf.reader import GGUFFile
        from ggtorch.model.config import Config
        from ggtorch.packaged import resolve

        cfg = Config.from_gguf(GGUFFile(resolve(args.model)))
    ms = handoff(link, cfg)
    if link.rank == 0:
        print(json.dumps({"stages": 2, **out, "handoff_ms": ms}))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, stages: int) -> dict:
    base = [sys.executable, os.path.abspath(__file__), args.model, "-n", str(args.n), "--threads", str(args.threads),
            "--stages", str(stages)] + (["--handoff-only"] if args.handoff_only else [])
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
    ap.add_argument("-n", type=int, default=64, help="decode steps per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
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
        hs = [run(args, 2)["handoff_ms"] for _ in range(args.rounds)]
        print(f"{os.path.basename(args.model)}: hand-off {statistics.median(hs):.3f} ms/token")
        return
    one, two = [], []
    for _ in range(args.rounds):  # interleaved: the machine's load drifts
        one.append(run(args, 1))
        two.append(run(args, 2))
    a = statistics.median(r["ms_per_token"] for r in one)
    b = statistics.median(r["ms_per_token"] for r in two)
    h = statistics.median(r["handoff_ms"] for r in two)
    print(f"{os.path.basename(args.model)}: 1 stage {a:.1f} ms/token, 2 stages {b:.1f} ms/token "
          f"(x{b / a:.2f}); hand-off alone {h:.3f} ms/token (header + hidden state + logits on loopback)")


if __name__ == "__main__":
    main()
