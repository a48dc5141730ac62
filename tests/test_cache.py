"""The repack cache (ggtorch.quant.cache): reused, invalidated when the model file changes, rebuilt
from a corrupt or partial entry, bypassed by cache=False / --no-cache. Each test uses its own
XDG_CACHE_HOME, never the user's cache."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TINY, tiny_manifest
import ggtorch
from ggtorch.quant import cache as repack_cache


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("GGTORCH_REPACK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "ggtorch" / "repack"


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "m.gguf"
    shutil.copy(TINY / "tiny-llama-Q4_K.gguf", p)  # Q4_K: int4 repacks; its Q6_K/Q8_0 tensors: int8 rows
    return p


def entries(d):
    """The entries on disk once this process's background writes are done."""
    repack_cache.flush()
    return sorted(d.glob("*.gtrp")) if d.exists() else []


def logits(m):
    return m.logits(tiny_manifest()["prompt_ids"])


@pytest.fixture(scope="module")
def reference():
    return logits(ggtorch.load(str(TINY / "tiny-llama-Q4_K.gguf"), cache=False))


def test_cache_is_written_then_reused(xdg, model_file, reference):
    m = ggtorch.load(str(model_file))
    assert m.repack_cache == "miss" and len(entries(xdg)) == 1
    assert torch.equal(logits(m), reference)
    m2 = ggtorch.load(str(model_file))
    assert m2.repack_cache == "hit"
    kinds = {type(f).__name__ for L in m2.net.layers for f in (L.get("attn_qkv"), L.get("ffn_gate_up"))}
    assert kinds == {"Fused"}  # the fused matrices come back from the cache too
    assert torch.equal(logits(m2), reference)
    assert len(entries(xdg)) == 1


def test_cache_written_in_the_background(xdg, model_file, monkeypatch):
    """The entry is written on a thread: load returns first; a later load in the same process waits
    for the write instead of repacking again."""
    started, release = [], __import__("threading").Event()
    real = repack_cache.save

    def slow_save(*a):
        started.append(1)
        release.wait(10)
        return real(*a)

    monkeypatch.setattr(repack_cache, "save", slow_save)
    m = ggtorch.load(str(model_file))
    assert m.repack_cache == "miss" and started  # returned while the write waits
    assert not (xdg.exists() and list(xdg.glob("*.gtrp")))
    release.set()
    assert ggtorch.load(str(model_file)).repack_cache == "hit"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_background_write_runs_at_the_lowest_priority(xdg, model_file, monkeypatch):
    """The writer thread is niced to 19, so decode threads preempt it; the main thread keeps its own."""
    import threading

    seen = []
    real = repack_cache.save

    def spy(*a):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(*a)

    monkeypatch.setattr(repack_cache, "save", spy)
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert ggtorch.load(str(model_file)).repack_cache == "miss"
    repack_cache.flush()
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
    assert ggtorch.load(str(model_file)).repack_cache == "hit"


def test_cache_invalidated_when_the_file_changes(xdg, model_file):
    ggtorch.load(str(model_file))
    old = entries(xdg)
    data = bytearray(model_file.read_bytes())
    data[-100] ^= 0x55  # a byte of the last tensor's data
    model_file.write_bytes(bytes(data))
    os.utime(model_file, ns=(os.stat(model_file).st_atime_ns, os.stat(model_file).st_mtime_ns + 10**9))
    m = ggtorch.load(str(model_file))
    assert m.repack_cache == "miss"
    new = entries(xdg)
    assert len(new) == 1 and new != old  # the stale entry was replaced, not kept beside
    ref = ggtorch.load(str(model_file), cache=False)
    assert torch.equal(logits(m), logits(ref))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header", "empty"])
def test_corrupt_or_partial_entry_is_rebuilt(xdg, model_file, reference, damage):
    ggtorch.load(str(model_file))
    (p,) = entries(xdg)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(os.urandom(len(data)))
    elif damage == "header":
        p.write_bytes(data[:20] + b"}{" + data[22:])
    else:
        p.write_bytes(b"")
    m = ggtorch.load(str(model_file))
    assert m.repack_cache == "miss"
    assert torch.equal(logits(m), reference)
    assert ggtorch.load(str(model_file)).repack_cache == "hit"


def test_no_cache_neither_reads_nor_writes(xdg, model_file, reference):
    m = ggtorch.load(str(model_file), cache=False)
    assert m.repack_cache == "off" and entries(xdg) == []
    ggtorch.load(str(model_file))
    assert ggtorch.load(str(model_file), cache=False).repack_cache == "off"
    stamp = [q.stat().st_mtime_ns for q in entries(xdg)]

    def run(*opt):  # the CLI in a child process, with this test's XDG_CACHE_HOME
        r = subprocess.run([sys.executable, "-m", "ggtorch", "run", str(model_file), *opt, "-p", "hi", "-n", "2"],
                           capture_output=True, text=True, env=dict(os.environ))
        assert r.returncode == 0, r.stderr

    run("--no-cache")
    assert [q.stat().st_mtime_ns for q in entries(xdg)] == stamp  # not read (a hit touches the entry)
    run()
    assert [q.stat().st_mtime_ns for q in entries(xdg)] != stamp


def test_size_cap_and_unwritable_dir(xdg, model_file, monkeypatch, reference):
    monkeypatch.setenv("GGTORCH_CACHE_MAX_MB", "0.01")  # smaller than the entry: not written
    m = ggtorch.load(str(model_file))
    assert m.repack_cache == "miss" and entries(xdg) == []
    assert torch.equal(logits(m), reference)
    monkeypatch.delenv("GGTORCH_CACHE_MAX_MB")
    xdg.parent.mkdir(parents=True)
    xdg.write_text("not a directory")  # the cache cannot be written: loading still works
    assert torch.equal(logits(ggtorch.load(str(model_file))), reference)


def test_lru_eviction_over_the_cap(xdg, tmp_path, monkeypatch):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    shutil.copy(TINY / "tiny-llama-Q4_0.gguf", a)
    shutil.copy(TINY / "tiny-llama-Q4_0.gguf", b)
    ggtorch.load(str(a))
    size = entries(xdg)[0].stat().st_size
    monkeypatch.setenv("GGTORCH_CACHE_MAX_MB", str(1.5 * size / 2**20))  # room for one entry
    ggtorch.load(str(b))
    (left,) = entries(xdg)
    assert left.name.startswith("b-")
