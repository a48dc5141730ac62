"""Routed experts in the JIT library (quant/csrc/moe.cpp through model/fastpath.ExpertFFN): the one-call
step equals the per-layer path bit for bit on the tiny MoE fixtures (top-k ties included), both stay
within float rounding of the PyTorch expert-by-expert path, a batch groups tokens by expert without
changing any row, and every gating mode routes as model/moe.py's route() does."""
import dataclasses

import pytest
import torch

import ggtorch
from conftest import FIXTURES, batch_rows_equal_alone
from ggtorch.model import decode as decode_one
from ggtorch.model import fastpath
from ggtorch.model import moe as moe_mod
from ggtorch.quant import jit

ARCHS = FIXTURES / "archs"
FILES = ["tiny-qwen3moe-Q4_K", "tiny-qwen3moe-Q8_0", "tiny-llama-moe-Q8_0", "tiny-llama-moe-Q4_K"]
SEQ = [1, 15, 300, 42, 7, 99, 1000, 5, 23, 77, 512, 64, 3, 8]


@pytest.fixture(autouse=True)
def need_jit():
    if not jit.available():  # without a compiler the PyTorch experts are the only path (test_archs covers it)
        pytest.skip(f"JIT library unavailable: {jit.why()}")


_NETS = {}


def net_of(name):
    if name not in _NETS:
        _NETS[name] = ggtorch.load(str(ARCHS / f"{name}.gguf"), fast=True, cache=False).net
    return _NETS[name]


def decode(net, seq, steps=5):
    """A short prompt, then ``steps`` tokens one at a time: (logits of the decode steps, cache)."""
    c = net.new_cache(32, dtype="f16")
    net.forward(seq[:-steps], c)
    return torch.cat([net.forward([t], c) for t in seq[-steps:]]), c


def counting(monkeypatch):
    """Calls of moe.cpp (ExpertFFN.__call__: the per-layer path's) and of the one-call step."""
    calls = {"experts": 0, "step": 0}
    real_ffn, real_run, real_one = fastpath.ExpertFFN.__call__, fastpath.Step.run, decode_one.OneToken.__call__

    def ffn(self, x):
        calls["experts"] += 1
        return real_ffn(self, x)

    def run(self, *a, **k):
        calls["step"] += 1
        return real_run(self, *a, **k)

    def one(self, *a, **k):  # a decode step in one call (model/decode.py): every layer too
        out = real_one(self, *a, **k)
        calls["step"] += out is not None
        return out

    monkeypatch.setattr(fastpath.ExpertFFN, "__call__", ffn)
    monkeypatch.setattr(fastpath.Step, "run", run)
    monkeypatch.setattr(decode_one.OneToken, "__call__", one)
    return calls


def pytorch_experts(monkeypatch, net):
    """The per-layer path with model/moe.py's expert-by-expert PyTorch products."""
    monkeypatch.setattr(moe_mod, "expert_ffn", lambda *a, **k: None)
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)


@pytest.mark.parametrize("name", FILES)
def test_moe_step_equals_the_per_layer_path(name, monkeypatch):
    net = net_of(name)
    assert fastpath.step_of(net) is not None  # MoE layers now have a one-call step
    calls = counting(monkeypatch)
    got, cg = decode(net, SEQ)
    assert calls == {"experts": 0, "step": 6}  # the prompt and 5 steps, each one call for every layer
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)
    want, cw = decode(net, SEQ)
    assert calls["experts"] == 6 * net.cfg.n_layer  # the per-layer path: moe.cpp once per layer and forward
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cg.k + cg.v, cw.k + cw.v))
    monkeypatch.undo()
    pytorch_experts(monkeypatch, net)
    old, _ = decode(net, SEQ)
    # the router's float32 sums and the activation differ from PyTorch's in the last bits only
    assert torch.allclose(got, old, atol=1e-4, rtol=1e-4), (got - old).abs().max()
    assert torch.equal(got.argmax(-1), old.argmax(-1))


@pytest.mark.parametrize("name", ["tiny-qwen3moe-Q4_K", "tiny-llama-moe-Q8_0"])
def test_batched_moe_step_groups_tokens_without_changing_a_row(name):
    """A batched step (decode tokens of 3 slots, then a prompt of 9 tokens riding along) sorts its
    (token, slot) rows by expert, so each routed expert is read once; each row equals its sequence
    decoded alone, to the bit."""
    net = net_of(name)
    seqs = [SEQ[:6], [1, 44, 9], SEQ[4:12]]
    batch_rows_equal_alone(net, seqs, SEQ[2:11])


def test_top_k_ties_go_to_the_lower_index(monkeypatch):
    """A zero router gives every expert the same probability: moe.cpp and route() both choose experts 0
    and 1 (ggml_argsort_top_k leaves ties to std::sort; this rule is one fixed choice), and the one-call
    step still equals the per-layer path bit for bit."""
    net = ggtorch.load(str(ARCHS / "tiny-qwen3moe-Q8_0.gguf"), fast=True, cache=False).net
    for L in net.layers:
        L["ffn_gate_inp"].dense = torch.zeros_like(L["ffn_gate_inp"].dense)
    net.expert_log = []
    got, cg = decode(net, SEQ)
    assert net.expert_log == []  # the one-call step
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)
    want, cw = decode(net, SEQ)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(cg.k + cg.v, cw.k + cw.v))
    assert net.expert_log and all(e.tolist() == [[0, 1]] * e.shape[0] for _, e in net.expert_log)
    net.expert_log = []
    monkeypatch.setattr(moe_mod, "expert_ffn", lambda *a, **k: None)
    old, _ = decode(net, SEQ)
    assert all(e.tolist() == [[0, 1]] * e.shape[0] for _, e in net.expert_log)
    assert torch.allclose(got, old, atol=1e-4, rtol=1e-4)
    net.expert_log = None


@pytest.mark.parametrize("gating,norm,scale,bias", [("softmax", True, 0.0, False), ("softmax", False, 2.5, False),
                                                    ("sigmoid", True, 0.0, True), ("sigmoid", False, 1.0, False),
                                                    ("softmax_weight", False, 0.0, True)])
def test_every_gating_routes_as_route(gating, norm, scale, bias):
    """build_moe_ffn's gating functions, renormalization, scale, router bias and selection bias in
    moe.cpp against model/moe.py's PyTorch routing and experts, on one layer of 7 random tokens."""
    net = net_of("tiny-qwen3moe-Q8_0")
    L = dict(net.layers[1])
    g = torch.Generator().manual_seed(3)
    if bias:
        L["ffn_gate_inp.bias"] = torch.randn(net.cfg.n_expert, generator=g) * 0.5
        L["exp_probs_b"] = torch.rand(net.cfg.n_expert, generator=g) * 0.1
    cfg = dataclasses.replace(net.cfg, expert_gating=gating, expert_norm=norm, expert_weights_scale=scale)
    real = net.cfg
    net.cfg = cfg
    try:
        x = torch.randn(7, cfg.n_embd, generator=g)
        with torch.inference_mode():
            out, sel = fastpath.ExpertFFN(net, L)(x)
            want, experts = moe_mod._moe_torch(net, L, x, None, 1, moe_mod.silu_glu)
    finally:
        net.cfg = real
    assert torch.equal(sel.long(), experts)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4), (out - want).abs().max()


def test_decode_token_reads_only_its_experts():
    """The experts a decode token was not routed to can hold anything: with their repacked scales set
    to NaN after the prompt, the token's logits are unchanged (moe.cpp makes jobs only for routed
    experts); with a routed expert's scales poisoned they change (the check can fail)."""
    net = ggtorch.load(str(ARCHS / "tiny-qwen3moe-Q4_K.gguf"), fast=True, cache=False).net
    c = net.new_cache(32)
    net.forward(SEQ[:-1], c)
    lens = list(c.lens)
    want = net.forward(SEQ[-1:], c)
    c.lens[:] = lens
    step = net._step
    net._step, net.expert_log = False, []  # the per-layer path logs the routed experts
    assert torch.equal(net.forward(SEQ[-1:], c), want)
    routed = {il: set(e.reshape(-1).tolist()) for il, e in net.expert_log}
    net._step, net.expert_log = step, None
    assert all(len(es) == net.cfg.n_expert_used < net.cfg.n_expert for es in routed.values())

    def poison(il, e):
        L = net.layers[il]
        for st in (L["ffn_gate_up_exps"][e].state, L["ffn_down_exps"][e].state):
            st["dw"].fill_(float("nan"))

    for il, es in routed.items():
        for e in set(range(net.cfg.n_expert)) - es:
            poison(il, e)
    c.lens[:] = lens
    assert torch.equal(net.forward(SEQ[-1:], c), want)
    poison(0, min(routed[0]))
    c.lens[:] = lens
    assert not torch.equal(net.forward(SEQ[-1:], c), want)


def test_experts_repacked_straight_into_their_fused_matrix():
    """model/repack.py repacks each expert's gate and up straight into one matrix (qdot_fused): the same
    bytes as packing each and concatenating (quant.kernels.install + fuse), and the repack cache gives
    them back (second load a hit, same logits)."""
    from ggtorch.quant.kernels import fuse, install

    path = str(ARCHS / "tiny-llama-moe-Q4_K.gguf")
    fast = ggtorch.load(path, fast=True, cache=False).net
    ref = ggtorch.load(path, fast=False).net
    for Lf, Lr in zip(fast.layers, ref.layers):
        for e in range(fast.cfg.n_expert):
            g, u = Lr["ffn_gate_exps"][e], Lr["ffn_up_exps"][e]
            install(g)
            install(u)
            want = fuse([g, u]).state
            got = Lf["ffn_gate_up_exps"][e].state
            assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    first = ggtorch.load(path, fast=True)
    second = ggtorch.load(path, fast=True)
    assert second.repack_cache == "hit"
    a, _ = decode(first.net, SEQ)
    b, _ = decode(second.net, SEQ)
    c, _ = decode(fast, SEQ)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_expert_traffic_counts_routed_experts_only():
    """benchmarks/vs_llamacpp.py's expert bytes per decoded token: the k routed experts of each layer
    (half of the 4), within 5% of the file's blocks of the same experts (what llama.cpp reads: the
    repacked Q4_K keeps a float16 d per 256 values instead of per 32-value pair, +2.8%); the model
    keeps its one-call step afterwards."""
    net = net_of("tiny-qwen3moe-Q4_K")
    step = fastpath.step_of(net)
    r = moe_mod.decode_expert_traffic(net, SEQ[:8], 6)
    assert r["fraction"] == pytest.approx(net.cfg.n_expert_used / net.cfg.n_expert)
    assert 1.0 <= r["expert_bytes_per_token"] / r["file_bytes_per_token"] <= 1.05
    assert fastpath.step_of(net) is step
