"""The one-token decode step in one foreign call (model/decode.py, csrc/step.cpp's qdot_decode and
csrc/rows.cpp's embedding rows) gives the logits and cache of the general path to the bit, falls back
where it does not apply, and keeps forward's errors."""
import numpy as np
import pytest
import torch

from conftest import FIXTURES, TINY
import ggtorch
from ggtorch.errors import ModelError
from ggtorch.gguf.types import ggml_type
from ggtorch.model import base, decode
from ggtorch.quant import jit
from ggtorch.quant.dequant import dequantize_blocks

ARCHS = FIXTURES / "archs"


@pytest.fixture(autouse=True)
def need_jit():
    if not jit.available():  # without a compiler every forward takes the general path (tested everywhere)
        pytest.skip(f"JIT library unavailable: {jit.why()}")


def calls(monkeypatch) -> list:
    """The one-token steps that answered (not None)."""
    seen = []
    real = decode.OneToken.__call__

    def call(self, *a, **k):
        out = real(self, *a, **k)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(decode.OneToken, "__call__", call)
    return seen


def run(net, prompt, steps, kv=torch.float16, as_tensor=False):
    c = net.new_pool(2, 64, dtype=kv)
    net.forward(prompt, c, slot=1)
    out = [net.forward(torch.tensor([t]) if as_tensor else [t], c, slot=1) for t in steps]
    return torch.cat(out), c


def same_as_general_path(net, monkeypatch, kv=torch.float16, as_tensor=False):
    prompt, steps = [1, 5, 9, 2, 7], [3, 8, 11, 4, 6, 10]
    seen = calls(monkeypatch)
    fast, c1 = run(net, prompt, steps, kv, as_tensor)
    assert seen == [True] * len(steps), "the one-token step was not taken"
    monkeypatch.setattr(decode, "ENABLED", False)
    ref, c2 = run(net, prompt, steps, kv, as_tensor)
    assert len(seen) == len(steps)
    assert fast.shape == ref.shape == (len(steps), net.cfg.n_vocab)
    assert torch.equal(fast, ref)
    for a, b in zip(c1.k + c1.v, c2.k + c2.v):
        assert torch.equal(a[:, :, :11], b[:, :, :11])
    assert c1.lens == c2.lens == [0, 11]


@pytest.mark.parametrize("name", ["tiny-llama-Q4_0", "tiny-llama-Q4_1", "tiny-llama-Q5_0", "tiny-llama-Q5_1",
                                  "tiny-llama-Q8_0", "tiny-llama-Q4_K", "tiny-llama-Q5_K", "tiny-llama-Q6_K",
                                  "tiny-llama-tied-Q6_K", "tiny-qwen3-Q8_0",
                                  "tiny-llama-IQ4_XS", "tiny-llama-Q2_K"])  # the last two: embedding rows in Python
def test_one_token_equals_general_path_types(name, monkeypatch):
    same_as_general_path(ggtorch.load(str(TINY / f"{name}.gguf")).net, monkeypatch)


@pytest.mark.parametrize("name", ["tiny-llama-moe-Q4_K", "tiny-qwen3moe-Q8_0", "tiny-gpt-oss-MXFP4", "tiny-smollm3-Q8_0",
                                  "tiny-llama-qkv-Q8_0"])
def test_one_token_equals_general_path_archs(name, monkeypatch):
    """Routed experts, gpt-oss's local/global tables, biases and sinks, layers without RoPE, a fused QKV."""
    same_as_general_path(ggtorch.load(str(ARCHS / f"{name}.gguf")).net, monkeypatch)


@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16])
def test_one_token_other_cache_types_and_tensor_ids(kv, monkeypatch):
    same_as_general_path(ggtorch.load(str(TINY / "tiny-llama-Q4_K.gguf")).net, monkeypatch, kv, as_tensor=True)


def test_one_token_gemma3_embedding_scale_and_tied_head(gemma, monkeypatch):
    """Gemma 3 270M: the embedding scaled by sqrt(n_embd), local/global RoPE, a 262k-row tied head."""
    same_as_general_path(gemma.net, monkeypatch)


def test_one_token_not_taken_where_the_step_is_not(monkeypatch):
    """Final soft-cap (gemma2) and float32 weights: no one-token step, the general path answers."""
    for path in (ARCHS / "tiny-gemma2-Q8_0.gguf", TINY / "tiny-llama-F32.gguf"):
        net = ggtorch.load(str(path)).net
        assert decode.one_token(net, net.new_pool(1, 8)) is None


def test_one_token_beyond_the_rope_tables_falls_back(monkeypatch):
    """A position past ROPE_TABLE_MAX takes the general path (the tables stop there): same logits."""
    monkeypatch.setattr(base, "ROPE_TABLE_MAX", 8)
    net = ggtorch.load(str(TINY / "tiny-llama-Q8_0.gguf")).net
    seen = calls(monkeypatch)
    fast, _ = run(net, [1, 5, 9, 2, 7], [3, 8, 11, 4, 6, 10])
    assert seen[:3] == [True] * 3 and seen[3:] == [False] * 3  # positions 5-7 in the tables, 8-10 past them
    monkeypatch.setattr(decode, "ENABLED", False)
    ref, _ = run(net, [1, 5, 9, 2, 7], [3, 8, 11, 4, 6, 10])
    assert torch.equal(fast, ref)


def test_one_token_errors_keep_the_cache():
    net = ggtorch.load(str(TINY / "tiny-llama-Q8_0.gguf")).net
    c = net.new_pool(1, 6)
    net.forward([1, 2, 3, 4, 5], c)
    for bad in ([-1], [net.cfg.n_vocab], torch.tensor([net.cfg.n_vocab])):
        with pytest.raises(ModelError, match="token ids"):
            net.forward(bad, c)
    assert c.lens == [5]
    net.forward([6], c)
    with pytest.raises(ggtorch.errors.ContextError):
        net.forward([7], c)
    assert c.lens == [6]


@pytest.mark.parametrize("tname", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_rows_cpp_equals_dequant_py_on_random_blocks(tname):
    """Every byte pattern, scales included (subnormal, infinite, NaN): rows.cpp's row equals dequant.py's."""
    t = ggml_type(tname)
    assert t.id in decode.ROW_TYPES
    g = np.random.default_rng(t.id)
    n_blocks = 64
    raw = torch.from_numpy(g.integers(0, 256, n_blocks * t.type_size, dtype=np.uint8))
    ref = dequantize_blocks(raw, t).reshape(-1)
    out = torch.full((ref.numel(),), 1234.5)
    assert jit.library().qdot_dequant_row(t.id, raw.data_ptr(), ref.numel(), out.data_ptr()) == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_rows_cpp_refuses_other_types():
    raw = torch.zeros(256, dtype=torch.uint8)
    out = torch.empty(256)
    for tname in ("IQ4_NL", "Q2_K", "MXFP4"):
        assert jit.library().qdot_dequant_row(ggml_type(tname).id, raw.data_ptr(), 32, out.data_ptr()) == -1


@pytest.mark.parametrize("name", ["tiny-llama-Q4_0", "tiny-llama-Q5_0", "tiny-llama-Q8_0", "tiny-llama-Q4_K",
                                  "tiny-llama-Q6_K", "tiny-llama-BF16", "tiny-llama-F16", "tiny-llama-F32"])
def test_prompt_embedding_rows_in_c_equal_dequant_py(name, monkeypatch):
    """A prompt's embedding rows read and dequantized in one call (jit.embed_rows) equal GGUFFile.rows +
    dequant.py's, repeated and out-of-order ids included; an id out of range is an IndexError."""
    net = ggtorch.load(str(TINY / f"{name}.gguf"), fast=False).net
    ids = torch.tensor([5, 0, net.cfg.n_vocab - 1, 5, 17, 3])
    w = net.tok_embd
    fd, off = net.file.row_source("token_embd.weight")
    got = jit.embed_rows(w.type.id, fd, off, w.row_bytes, w.out_features, ids, w.in_features)
    assert got is not None
    monkeypatch.setattr(jit, "ROW_TYPES", frozenset())
    want = net.embed(ids)
    assert torch.equal(got, want)
    monkeypatch.undo()
    assert torch.equal(net.embed(ids), want)
    with pytest.raises(IndexError):
        jit.embed_rows(w.type.id, fd, off, w.row_bytes, w.out_features, torch.tensor([1, net.cfg.n_vocab]), w.in_features)


def test_two_threads_decoding_with_one_model():
    """Each call has its own hidden state and read buffer: two threads decoding different sequences with
    one model get what each gets alone (the library call releases the GIL, so they do overlap)."""
    import threading

    net = ggtorch.load(str(TINY / "tiny-llama-Q4_K.gguf")).net
    seqs = [[1, 5, 9, 2, 7] + list(range(10, 60)), [3, 4] + list(range(100, 153))]

    def run_alone(seq, out):
        c = net.new_pool(1, 64)
        net.forward(seq[:2], c)
        out.extend(net.forward([t], c) for t in seq[2:])

    want = [[], []]
    for s, o in zip(seqs, want):
        run_alone(s, o)
    for _ in range(3):
        got = [[], []]
        ts = [threading.Thread(target=run_alone, args=(s, o)) for s, o in zip(seqs, got)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for g, w in zip(got, want):
            assert len(g) == len(w) and all(torch.equal(a, b) for a, b in zip(g, w))
