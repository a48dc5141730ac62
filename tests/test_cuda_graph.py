"""model/cuda_graph.py: the fixed-shape decode step that CUDA records as one graph, run eagerly here.

On every architecture it may serve, its logits and KV cache equal the normal batched decode's; routed
through forward/forward_batch (as on CUDA) it gives the same generations and engine outputs."""
import pytest
import torch

import ggtorch
from conftest import FIXTURES
from ggtorch.model import cuda_graph
from ggtorch.model.cuda_graph import GraphDecoder

ARCHS = [p for p in sorted((FIXTURES / "archs").glob("tiny-*-F32.gguf")) if "moe" not in p.stem]
TINY = FIXTURES / "tiny"
SEQS = [[1, 5, 9, 33, 2], [7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _prefilled(net, n_slots=4, n_ctx=64, dtype=torch.float16):
    pool = net.new_pool(n_slots, n_ctx, dtype=dtype)
    for s, ids in zip((0, 3, 1), SEQS):  # slots out of order: the step gathers them
        net.forward(ids, pool, slot=s)
    return pool


def _check_step(net, window=None):
    if window is not None:
        net.faults["sliding_window"] = window  # a window shorter than the sequences: the local masks bite
    a, b = _prefilled(net), _prefilled(net)
    g = GraphDecoder(net, a, capture=False)
    slots = [0, 3, 1]
    toks = [ids[-1] for ids in SEQS]
    for _ in range(4):
        pos = [a.lens[s] for s in slots]
        got = g.step(torch.tensor(toks), slots, pos)
        ref = net.forward_batch(toks, slots, b)
        assert (got - ref).abs().max().item() <= 1e-4 * ref.std().item()
        assert a.lens == b.lens
        toks = ref.argmax(-1).tolist()
    for il in range(net.cfg.n_layer):  # the same keys and values written, at the same places
        for s in slots:
            n = a.lens[s]
            torch.testing.assert_close(a.k[il][s, :, :n], b.k[il][s, :, :n], rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(a.v[il][s, :, :n], b.v[il][s, :, :n], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("path", ARCHS, ids=lambda p: p.stem)
def test_graph_step_equals_forward_batch(path):
    net = ggtorch.load(str(path), fast=False, cache=False).net
    _check_step(net)


@pytest.mark.parametrize("name", ["tiny-gemma2-F32", "tiny-gpt-oss-F32", "tiny-olmo2-F32"])
def test_graph_step_sliding_window(name):
    net = ggtorch.load(str(FIXTURES / "archs" / f"{name}.gguf"), fast=False, cache=False).net
    _check_step(net, window=3)


def test_single_query_is_masked():
    """One query over a static span must not see the rows past its position (mask() is forced)."""
    net = ggtorch.load(str(TINY / "tiny-llama-Q8_0.gguf"), fast=False, cache=False).net
    pool = net.new_pool(1, 64, dtype=torch.float16)
    net.forward([1, 2, 3, 4, 5, 6, 7, 8], pool)
    pool.lens[0] = 3  # rows 3.. now hold stale keys of a longer sequence
    g = GraphDecoder(net, pool, capture=False)
    got = g.step(torch.tensor([9]), [0], [3])
    ref = net.forward([1, 2, 3, 9], net.new_cache(8, dtype=torch.float16))[-1:]
    assert (got - ref).abs().max().item() <= 1e-4 * ref.std().item()


def test_span_buckets_and_pool_growth():
    net = ggtorch.load(str(TINY / "tiny-llama-Q8_0.gguf"), fast=False, cache=False).net
    cache = net.new_cache(4, dtype=torch.float16)  # no n_ctx: it grows, and the graphs keyed on it go
    net.forward([1, 2, 3], cache)
    g = GraphDecoder(net, cache, capture=False)
    tok, ref_cache = 5, net.new_cache(4, dtype=torch.float16)
    net.forward([1, 2, 3], ref_cache)
    for _ in range(6):
        got = g.step(torch.tensor([tok]), [0], [cache.n])
        ref = net.forward([tok], ref_cache)
        assert (got - ref).abs().max().item() <= 1e-4 * ref.std().item()
        tok = int(ref.argmax())
    assert cache.n == 9 and cache.capacity >= 9
    assert len(g.entries) == 1 and next(iter(g.entries))[1] == min(cuda_graph.MIN_KV, cache.capacity)
    assert g.span(300) == min(512, cache.capacity)


def _route(monkeypatch, calls):
    """forward/forward_batch take the graph step as on CUDA (eagerly: no capture on CPU)."""
    orig = cuda_graph.decode

    def counting(*args):
        calls.append(len(args[3]))
        return orig(*args)

    monkeypatch.setattr(cuda_graph, "ON_CPU", True)
    monkeypatch.setattr(cuda_graph, "decode", counting)


def test_generation_through_the_graph_step(monkeypatch):
    m = ggtorch.load(str(TINY / "tiny-llama-Q4_K.gguf"), fast=False, cache=False)
    a = m.generate([1, 5, 9, 33], max_tokens=12, ignore_eos=True)
    calls = []
    _route(monkeypatch, calls)
    b = m.generate([1, 5, 9, 33], max_tokens=12, ignore_eos=True)
    assert calls == [1] * 11  # every decode step after the prompt
    assert a.ids == b.ids


def test_engine_batches_through_the_graph_step(monkeypatch):
    """The server's engine: requests decoding together give each request's text alone (normal path)."""
    m = ggtorch.load(str(TINY / "tiny-llama-Q4_K.gguf"), fast=False, cache=False)
    prompts = [[1, 5, 9], [1, 200, 300, 17, 4], [1, 77]]
    alone = [m.generate(p, max_tokens=8, ignore_eos=True).ids for p in prompts]
    calls = []
    _route(monkeypatch, calls)
    outs = m.generate_batch(prompts, max_tokens=8, ignore_eos=True)
    assert [o.ids for o in outs] == alone
    assert max(calls) == 3  # the three sequences' decode steps went through one graph step together
