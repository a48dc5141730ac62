import atexit
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GGTORCH_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
TINY = FIXTURES / "tiny"
GOLDENS = FIXTURES / "goldens"

# the repack cache (ggtorch.quant.cache) of every load in this test session, CLI subprocesses included,
# goes to a temporary directory: tests never read or write the user's ~/.cache/ggtorch/repack
_REPACK = tempfile.mkdtemp(prefix="ggtorch-test-repack-")
os.environ["GGTORCH_REPACK_CACHE"] = _REPACK
atexit.register(shutil.rmtree, _REPACK, True)


def tiny_manifest() -> dict:
    return json.loads((TINY / "manifest.json").read_text())


def tiny_files() -> list[Path]:
    return sorted(TINY.glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm():
    import ggtorch

    return ggtorch.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    import ggtorch

    return ggtorch.load("gemma3-270m")


@pytest.fixture(scope="session")
def smollm_exact():
    import ggtorch

    return ggtorch.load("smollm2-135m", fast=False)


@pytest.fixture(scope="session")
def gemma_exact():
    import ggtorch

    return ggtorch.load("gemma3-270m", fast=False)


def golden(name: str) -> dict:
    return json.loads((GOLDENS / f"{name}.json").read_text())


def batch_rows_equal_alone(net, seqs, ride):
    """A batched step (the last tokens of 3 slots' sequences, then the prompt ``ride`` riding along in
    another slot) gives each row, to the bit, what its sequence gives run alone (batch invariance)."""
    import torch

    alone = []
    for s in seqs:
        c = net.new_cache(32, dtype="f16")
        net.forward(s[:-1], c)
        alone.append(net.forward(s[-1:], c))
    pool = net.new_pool(4, 32, dtype="f16")
    for i, s in enumerate(seqs):
        net.forward(s[:-1], pool, slot=i)
    got = net.forward_batch([s[-1] for s in seqs], list(range(len(seqs))), pool)
    assert all(torch.equal(got[i:i + 1], alone[i]) for i in range(len(seqs)))
    c = net.new_cache(32, dtype="f16")
    want = net.forward(ride, c, all_logits=True)
    pool2 = net.new_pool(2, 32, dtype="f16")
    net.forward(seqs[0], pool2, slot=0)
    got = net.forward_batch([5] + list(ride), [0] + [1] * len(ride), pool2)
    assert torch.equal(got[1:], want)


class Running:
    """A server app on a real uvicorn server, on a free loopback port in a thread of its own (the server
    tests, the LoRA, tool-call and constrained-output ones). stop_engine: stop() ends the engine's loop
    too (an app made with engine_thread=False, whose engine runs in the app's lifespan)."""

    def __init__(self, app, stop_engine: bool = False):
        self.stop_engine = stop_engine
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        import uvicorn

        self.app = app
        self.engine = app.state.server.engine
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30 and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        if self.stop_engine:
            self.engine.stop()

    def wait_idle(self, timeout=30.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = httpx.get(self.url + "/health").json()
            if h["slots_processing"] == 0 and h["queued"] == 0:
                return h
            time.sleep(0.02)
        raise AssertionError(f"server still busy after {timeout}s: {h}")
