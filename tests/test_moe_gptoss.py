"""gpt-oss's routed experts in the JIT library (quant/csrc/moe.cpp through model/fastpath.ExpertFFN):
expert biases (ggml_add_id), the clamped SwiGLU (swiglu_oai) and top-k on the raw router logits with a
softmax over the k (SOFTMAX_WEIGHT). moe.cpp stays within float rounding of model/moe.py's PyTorch
expert-by-expert path on the tiny gpt-oss fixtures (MXFP4 and Q8_0 experts; Q4_K experts on a qwen3moe
layer given gpt-oss's biases and activation), top-k ties included, and the fixtures keep their fidelity
to llama.cpp's logits."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import ggtorch
from conftest import FIXTURES, batch_rows_equal_alone
from test_moe_step import counting  # moe.cpp calls from Python and one-call steps
from ggtorch.model import fastpath
from ggtorch.model import moe as moe_mod
from ggtorch.model.layers import swiglu_oai
from ggtorch.quant import jit

ARCHS = FIXTURES / "archs"
FILES = ["tiny-gpt-oss-MXFP4", "tiny-gpt-oss-Q8_0"]
SEQ = [1, 15, 300, 42, 7, 99, 1000, 5, 23, 77, 512, 64, 3, 8]


@pytest.fixture(autouse=True)
def need_jit():
    if not jit.available():
        pytest.skip(f"JIT library unavailable: {jit.why()}")


def load(name):
    return ggtorch.load(str(ARCHS / f"{name}.gguf"), fast=True, cache=False).net


def decode(net, seq, steps=5):
    """A prompt, then ``steps`` tokens one at a time: the logits of every prompt token and decode step."""
    c = net.new_cache(32, dtype="f16")
    first = net.forward(seq[:-steps], c, all_logits=True)
    return torch.cat([first] + [net.forward([t], c) for t in seq[-steps:]])


def decode_cache(net, seq, steps=5):
    c = net.new_cache(32, dtype="f16")
    first = net.forward(seq[:-steps], c, all_logits=True)
    return torch.cat([first] + [net.forward([t], c) for t in seq[-steps:]]), c


@pytest.mark.parametrize("name", FILES)
def test_gpt_oss_step_equals_the_per_layer_path_and_the_pytorch_experts(name, monkeypatch):
    """gpt-oss now has a one-call step (Q/K/V and output biases, sinks, windows, moe.cpp's experts): a
    prompt of 9 tokens and 5 decode steps are 6 calls, equal to the bit (logits and cache) to the
    per-layer path, where every layer calls moe.cpp once per forward; and both stay within float rounding
    of the PyTorch experts (the activation's exp and the order of the sums differ in the last bits)."""
    net = load(name)
    assert all(len(L["ffn_gate_exps.bias"]) == net.cfg.n_expert for L in net.layers)  # the fixture has biases
    assert fastpath.step_of(net) is not None
    calls = counting(monkeypatch)
    got, cg = decode_cache(net, SEQ)
    assert calls == {"experts": 0, "step": 6}
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)
    want, cw = decode_cache(net, SEQ)
    assert calls["experts"] == 6 * net.cfg.n_layer
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cg.k + cg.v, cw.k + cw.v))
    monkeypatch.setattr(moe_mod, "expert_ffn", lambda *a, **k: None)
    old, _ = decode_cache(net, SEQ)
    assert calls["experts"] == 6 * net.cfg.n_layer  # the PyTorch experts: no more moe.cpp calls
    assert torch.allclose(got, old, atol=1e-4, rtol=1e-4), (got - old).abs().max()
    assert torch.equal(got.argmax(-1), old.argmax(-1))


@pytest.mark.parametrize("name", FILES)
def test_gpt_oss_fast_path_keeps_its_fidelity_to_llama_cpp(name):
    """With the one-call step (and moe.cpp) the fixture's logits stay within the fast kernels' bound of
    llama.cpp's (test_archs), through a slot cache (where the step applies) and model.logits."""
    man = json.loads((ARCHS / "manifest.json").read_text())
    m = ggtorch.load(str(ARCHS / f"{name}.gguf"), cache=False)
    assert fastpath.step_of(m.net) is not None
    ref = np.load(ARCHS / f"{name}.logits.npy")
    c = m.net.new_cache(32, dtype="f16")
    for lg in (m.net.forward(man["prompt_ids"], c, all_logits=True).numpy(), m.logits(man["prompt_ids"]).numpy()):
        e = np.abs(lg - ref).max() / ref.std()
        assert e <= 0.2, e


def test_top_k_ties_go_to_the_lower_index(monkeypatch):
    """A zero router and router bias give every expert the same logit: moe.cpp and route() both choose
    experts 0 and 1; the step equals the per-layer path to the bit and the PyTorch experts as above."""
    net = load("tiny-gpt-oss-MXFP4")
    for L in net.layers:
        L["ffn_gate_inp"].dense = torch.zeros_like(L["ffn_gate_inp"].dense)
        L["ffn_gate_inp.bias"] = torch.zeros_like(L["ffn_gate_inp.bias"])
    got = decode(net, SEQ)
    seen = []
    real = fastpath.ExpertFFN.__call__

    def log(self, x):
        out, sel = real(self, x)
        seen.append(sel)
        return out, sel

    monkeypatch.setattr(fastpath.ExpertFFN, "__call__", log)
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)
    want = decode(net, SEQ)
    assert len(seen) == 6 * net.cfg.n_layer and all(s.tolist() == [[0, 1]] * s.shape[0] for s in seen)
    assert torch.equal(got, want)
    monkeypatch.setattr(moe_mod, "expert_ffn", lambda *a, **k: None)
    net.expert_log = []
    old = decode(net, SEQ)
    assert net.expert_log and all(e.tolist() == [[0, 1]] * e.shape[0] for _, e in net.expert_log)
    net.expert_log = None
    assert len(seen) == 6 * net.cfg.n_layer  # the PyTorch run made no moe.cpp call
    assert torch.allclose(got, old, atol=1e-4, rtol=1e-4)


def test_sinks_take_probability_mass(monkeypatch):
    """qdot_attend's sinks: the step's logits move when the sinks are raised (they are read), and
    match the per-layer PyTorch attention (attention_ext with sinks) within float rounding."""
    net = load("tiny-gpt-oss-Q8_0")
    got = decode(net, SEQ)
    monkeypatch.setattr(fastpath, "usable", lambda *a, **k: False)  # PyTorch attention (experts: moe.cpp)
    torch_attn = decode(net, SEQ)
    assert torch.allclose(got, torch_attn, atol=2e-4, rtol=1e-4), (got - torch_attn).abs().max()
    monkeypatch.undo()
    for L in net.layers:
        L["attn_sinks"].add_(3.0)  # in place: the step's struct points at these
    moved = decode(net, SEQ)
    assert (moved - got).abs().max() > 1e-2


def one_layer(net, L, x, act_name, act):
    with torch.inference_mode():
        out, sel = fastpath.ExpertFFN(net, L, act_name)(x)
        want, experts = moe_mod._moe_torch(net, L, x, None, 1, act)
    return out, sel, want, experts


@pytest.mark.parametrize("name,T", [("tiny-gpt-oss-MXFP4", 1), ("tiny-gpt-oss-MXFP4", 7), ("tiny-gpt-oss-Q8_0", 7),
                                    ("tiny-qwen3moe-Q4_K", 1), ("tiny-qwen3moe-Q4_K", 7)])
def test_biases_and_swiglu_oai_as_the_pytorch_experts(name, T):
    """One layer of T random tokens, with large random expert biases (so that they matter, and the clamp
    at 7 is reached) and gpt-oss's gating: moe.cpp chooses the same experts as route() and its output is
    within float rounding of the PyTorch experts; without the biases the output moves (they are used)."""
    net = load(name)
    c = net.cfg
    L = dict(net.layers[1])
    g = torch.Generator().manual_seed(7)
    F, E = L["ffn_up_exps"].n_out, L["ffn_down_exps"].n_out
    L["ffn_gate_exps.bias"] = torch.randn(c.n_expert, F, generator=g) * 3
    L["ffn_up_exps.bias"] = torch.randn(c.n_expert, F, generator=g) * 3
    L["ffn_down_exps.bias"] = torch.randn(c.n_expert, E, generator=g)
    L["ffn_gate_inp.bias"] = torch.randn(c.n_expert, generator=g)
    real = net.cfg
    net.cfg = dataclasses.replace(c, expert_gating="softmax_weight", expert_norm=False, expert_weights_scale=0.0)
    try:
        x = torch.randn(T, c.n_embd, generator=g) * 4
        out, sel, want, experts = one_layer(net, L, x, "swiglu_oai", swiglu_oai)
        no_bias = dict(L, **{f"ffn_{p}_exps.bias": None for p in ("gate", "up", "down")})
        out0, sel0, _, _ = one_layer(net, no_bias, x, "swiglu_oai", swiglu_oai)
    finally:
        net.cfg = real
    assert torch.equal(sel.long(), experts) and torch.equal(sel0, sel)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4), (out - want).abs().max()
    assert (out0 - out).abs().max() > 0.1


def test_swiglu_oai_kernel_equals_ggml_formula():
    """ops.cpp's kind 2 against ggml_compute_forward_swiglu_oai_f32's formula (float64 here), clamps included."""
    lib = jit.library()
    g = torch.linspace(-20, 20, 4001)
    u = torch.linspace(-15, 15, 4001).flip(0)
    out = torch.empty_like(g)
    lib.qdot_glu(g.data_ptr(), u.data_ptr(), 1, g.numel(), g.numel(), g.numel(), fastpath.GLU["swiglu_oai"],
                 out.data_ptr())
    x, y = g.double().clamp(max=7), u.double().clamp(-7, 7)
    want = x / (1 + torch.exp(-1.702 * x)) * (y + 1)
    assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out, swiglu_oai(g, u), rtol=1e-5, atol=1e-6)


def test_batched_gpt_oss_step_changes_no_row():
    """A batched step (decode tokens of 3 slots, then a 9-token prompt riding along) through the gpt-oss
    step: each row equals its sequence run alone, to the bit (windows and sinks per slot)."""
    net = load("tiny-gpt-oss-MXFP4")
    seqs = [SEQ[:12], [1, 44, 9], SEQ[4:13]]  # the first is longer than the sliding window (8)
    batch_rows_equal_alone(net, seqs, SEQ[2:11])
