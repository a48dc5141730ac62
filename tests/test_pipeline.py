"""A model split by layers across two processes (ggtorch.dist.pipeline, gloo on loopback) gives the single
process's logits bit for bit and its greedy text, for every architecture, also for the server's batched
steps cut into micro-batches; a stage that dies or goes
silent ends the other with one clear error, not a hang; `ggtorch run --pipeline 2` works under torchrun."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "..", "shared", "fixtures")
TINY, ARCHS = os.path.join(FIX, "tiny"), os.path.join(FIX, "archs")
# one file per architecture (and the llama variants: tied output, fused QKV, experts), quantized so that
# the fast kernels and the one-call step are in play where the architecture takes them
MODELS = [os.path.join(TINY, n) for n in ("tiny-llama-Q4_0.gguf", "tiny-llama-tied-Q6_K.gguf", "tiny-qwen2-Q8_0.gguf",
                                          "tiny-qwen3-Q8_0.gguf")] + \
         [os.path.join(ARCHS, f"tiny-{a}.gguf") for a in ("gemma2-Q8_0", "gpt-oss-MXFP4", "granite-Q8_0", "llama-moe-Q4_K",
                                                          "llama-qkv-Q8_0", "mistral3-Q8_0", "olmo2-Q8_0", "phi3-Q8_0",
                                                          "qwen3moe-Q8_0", "smollm3-Q8_0")]
PY = sys.executable

# What one process of the pipeline runs: rank 0 drives each model and saves what it got; rank 1 serves.
WORKER = r"""
import os, sys, torch
from ggtorch.dist import pipeline as P
rank, port, out, threads = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
paths = sys.argv[5:]
torch.set_num_threads(threads)
link = P.init(rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=float(os.environ.get("PIPE_TIMEOUT", "60")))
fault = os.environ.get("PIPE_FAULT", "")
if fault == f"kill{rank}":
    os.kill(os.getpid(), 9)
if fault == f"stop{rank}":
    os.kill(os.getpid(), 19)
try:
    for i, path in enumerate(paths):
        m = P.start(path, 2, link)
        if m is None:
            continue
        from tests_pipeline_probe import probe
        torch.save(probe(m), os.path.join(out, f"{i}.pt"))
        m.close()
except P.PipelineError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""

# The measurements, the same for the pipeline (in the worker) and the single process (here).
PROBE = r"""
import torch

SHORT = list(range(1, 17))  # 16 tokens: the JIT attention / one-call step
LONG = [(i * 37) % 900 + 3 for i in range(40)]  # over fastpath.MAX_TOKENS: PyTorch's attention


def probe(m):
    out = {}
    cache = m.new_cache()
    steps = [m.net.forward(SHORT, cache, all_logits=True)]
    t = int(steps[-1][-1].argmax())
    for _ in range(4):  # decode steps
        steps.append(m.net.forward([t], cache))
        t = int(steps[-1][-1].argmax())
    out["steps"] = steps
    out["long"] = m.net.forward(LONG, m.new_cache(), all_logits=True)
    r = m.generate("Hello world", max_tokens=8)
    out["ids"], out["text"] = r.ids, r.text
    # the server's batched steps (forward_batch): 3 slots decoding together, then 2 of them with a
    # 3-token prompt chunk riding along (logits of the decode rows and the chunk's last token); a pipeline
    # also cuts each step into 2 micro-batches
    out["batch"] = {}
    for M in (1, 2) if hasattr(m.net, "micro_batches") else (1,):
        if hasattr(m.net, "micro_batches"):
            m.net.micro_batches = M
        pool = m.net.new_pool(3, 64)
        nxt = [int(m.net.forward(p, pool, slot=s)[-1].argmax()) for s, p in enumerate((SHORT[:5], SHORT[5:8], SHORT[8:12]))]
        steps = []
        for _ in range(2):
            steps.append(m.net.forward_batch(nxt, [0, 1, 2], pool))
            nxt = steps[-1].argmax(-1).tolist()
        steps.append(m.net.forward_batch(nxt[:2] + [5, 6, 7], [0, 1, 2, 2, 2], pool, rows=[0, 1, 4]))
        out["batch"][M] = steps
    return out
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp, paths, env_extra=None, threads=None):
    """Two pipeline processes on loopback; returns them (started)."""
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "tests_pipeline_probe.py"), "w") as f:
        f.write(PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp)]), **(env_extra or {}))
    port, threads = _port(), threads or torch.get_num_threads()
    return [subprocess.Popen([PY, "-c", WORKER, str(r), str(port), str(tmp), str(threads), *paths], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]


def _wait(procs, timeout=600):
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a pipeline process hung")
        outs.append((p.returncode, o, e))
    return outs


@pytest.fixture(scope="session")
def pipelined(tmp_path_factory):
    """Every model of MODELS through a 2-stage pipeline (one pair of processes for all of them)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    outs = _wait(_spawn(tmp, MODELS))
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    return {p: torch.load(os.path.join(tmp, f"{i}.pt")) for i, p in enumerate(MODELS)}


@pytest.mark.parametrize("path", MODELS, ids=[os.path.basename(p)[5:-5] for p in MODELS])
def test_pipeline_equals_single_process(pipelined, path):
    import ggtorch

    ns = {}
    exec(PROBE, ns)
    want, got = ns["probe"](ggtorch.load(path)), pipelined[path]
    for i, (a, b) in enumerate(zip(want["steps"], got["steps"])):
        assert a.dtype == b.dtype and torch.equal(a, b), f"step {i}: largest difference {(a - b).abs().max()}"
    assert len(got["steps"]) == 5
    assert torch.equal(want["long"], got["long"]), f"long prompt: largest difference {(want['long'] - got['long']).abs().max()}"
    assert (want["ids"], want["text"]) == (got["ids"], got["text"])
    assert len(got["ids"]) == 8
    assert [tuple(b.shape) for b in got["batch"][1]] == [(3, want["long"].shape[1])] * 3
    for i, (a, b) in enumerate(zip(want["batch"][1], got["batch"][1])):
        assert torch.equal(a, b), f"batched step {i}: largest difference {(a - b).abs().max()}"
    # in 2 micro-batches: the same numbers, except where experts are routed (the expert kernels group the
    # rows of a micro-batch, and a group's size picks the kernel): float rounding, the same argmax
    moe = "moe" in path or "gpt-oss" in path
    for i, (a, b) in enumerate(zip(want["batch"][1], got["batch"][2])):
        if moe:
            assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(a.abs().max())), f"micro-batched step {i}"
            assert torch.equal(a.argmax(-1), b.argmax(-1))
        else:
            assert torch.equal(a, b), f"micro-batched step {i}: largest difference {(a - b).abs().max()}"


def test_stage_split_loads_only_its_layers():
    from ggtorch.dist.pipeline import load_stage, split_layers

    assert split_layers(22, 2) == [range(0, 11), range(11, 22)]
    assert split_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    path = os.path.join(ARCHS, "tiny-smollm3-Q8_0.gguf")  # smollm3: RoPE-less layers by the file's numbering
    a, cfg = load_stage(path, 0, 2, fast=False)
    b, _ = load_stage(path, 1, 2, fast=False)
    k = cfg.n_layer // 2
    assert a.cfg.n_layer == b.cfg.n_layer == k and b.cfg.layer_offset == k
    assert [b.cfg.has_rope(il) for il in range(k)] == [cfg.has_rope(il) for il in range(k, cfg.n_layer)]
    assert not all(cfg.has_rope(il) for il in range(k, cfg.n_layer))  # the file's numbering matters here
    assert "output.weight" not in a.weights() and "token_embd.weight" not in b.weights()
    assert all(int(n.split(".")[1]) < k for n in b.weights() if n.startswith("blk."))
    assert b.file.raw("blk.0.attn_q.weight").tobytes() == a.file.file.raw(f"blk.{k}.attn_q.weight").tobytes()


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("fault,alive,why", [("kill1", 0, "its process ended"), ("kill0", 1, "its process ended"),
                                             ("stop1", 0, "no answer within 3 s")])
def test_lost_stage_ends_the_other(tmp_path, fault, alive, why):
    """A stage killed (or stopped: SIGSTOP) ends the other stage with one clear line, within seconds."""
    procs = _spawn(tmp_path, [MODELS[0]], {"PIPE_FAULT": fault, "PIPE_TIMEOUT": "3"}, threads=1)
    t0 = time.monotonic()
    try:
        rc, _, err = _wait([procs[alive]], timeout=180)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert rc == 2, err[-3000:]
    line = _one_error_line(err)
    assert f"pipeline stage {alive}: lost contact with stage {1 - alive}: {why}" in line
    assert time.monotonic() - t0 < 150


def test_run_cli_under_torchrun():
    """`ggtorch run --pipeline 2` under torchrun prints what the single process's `ggtorch run` does."""
    import ggtorch

    torchrun = shutil.which("torchrun", path=os.path.dirname(PY))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    path = MODELS[3]
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ggtorch", "run", path, "--pipeline",
                        "2", "-p", "Hello world", "-n", "8", "--json"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = ggtorch.load(path).generate("Hello world", max_tokens=8)
    assert (got["ids"], got["text"]) == (want.ids, want.text)
    # without torchrun: one line, exit 2
    r = subprocess.run([PY, "-m", "ggtorch", "run", path, "--pipeline", "2", "-p", "Hi"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
