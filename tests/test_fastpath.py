"""The JIT library's decode-step operations (model/fastpath.py, quant/csrc/ops.cpp, step.cpp) compute
what the PyTorch path computes: attention with its norms, RoPE, KV-cache writes and sliding windows,
for short prompts, one token and batched steps, and the gated FFN activations."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from test_batch_forward import SEQS, batched_vs_alone, tiny_gemma3
import ggtorch
from ggtorch.model import fastpath
from ggtorch.model.layers import gelu_tanh
from ggtorch.quant import jit


@pytest.fixture(autouse=True)
def need_jit():
    if not jit.available():  # without a compiler the PyTorch path is the only one (tested everywhere else)
        pytest.skip(f"JIT library unavailable: {jit.why()}")


@pytest.fixture(scope="module")
def gemma_tiny(tmp_path_factory):
    return str(tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf"))


def decode(net, seq, kv, steps):
    """Prefill all but the last ``steps`` tokens, then one token at a time: (logits, cache)."""
    c = net.new_cache(8, dtype=kv)
    net.forward(seq[:-steps], c)
    return torch.cat([net.forward([t], c) for t in seq[-steps:]]), c


def counting(monkeypatch):
    """Calls of the JIT attention: per layer (fastpath.attend), or per step with every layer (Step.run)."""
    calls = []
    real, real_run = fastpath.attend, fastpath.Step.run

    def attend(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def run(self, *a, **k):
        calls.extend([1] * self.model.n_layer)
        return real_run(self, *a, **k)

    monkeypatch.setattr(fastpath, "attend", attend)
    monkeypatch.setattr(fastpath.Step, "run", run)
    return calls


@pytest.mark.parametrize("kv", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", ["tiny-llama-F32", "tiny-qwen3-F32", "tiny-qwen2-Q8_0", "gemma3"])
def test_one_token_step_equals_the_pytorch_path(name, kv, gemma_tiny, monkeypatch):
    """llama (adjacent-pair RoPE), qwen3 (per-head Q/K norms, NEOX), qwen2 (Q/K/V biases), gemma3 (norms,
    NEOX, a 4-token sliding window on most layers: the sequence is longer): same logits and the same
    keys and values in the cache."""
    net = ggtorch.load(gemma_tiny if name == "gemma3" else str(TINY / f"{name}.gguf"), fast=False).net
    seq = SEQS[0] + [11, 12, 13, 14]
    calls = counting(monkeypatch)
    got, cg = decode(net, seq, kv, 5)
    assert len(calls) == (1 + 5) * net.cfg.n_layer  # every layer of the short prefill and of each step
    monkeypatch.setattr(fastpath, "ENABLED", False)
    want, cw = decode(net, seq, kv, 5)
    assert len(calls) == (1 + 5) * net.cfg.n_layer
    # a last-bit difference before the cache's rounding can round a key to the neighbouring f16/bf16 value
    lt = {"f32": 1e-4, "f16": 5e-4, "bf16": 2e-3}[kv]
    assert torch.allclose(got, want, atol=lt, rtol=lt), (got - want).abs().max()
    tol = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2}[kv]  # one rounding step of the cache's type
    for il in range(net.cfg.n_layer):
        n = len(seq)
        for a, b in ((cg.k[il], cw.k[il]), (cg.v[il], cw.v[il])):
            assert torch.allclose(a[0, :, :n].float(), b[0, :, :n].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["gemma3", "tiny-llama-Q4_0"])
def test_batched_step_takes_the_same_arithmetic(name, gemma_tiny, monkeypatch):
    """A batched step (several slots; then one slot three times: a prompt chunk riding along) runs the
    same loop per token as one token alone. With the JIT matmul (whose rows do not depend on how many
    there are) each row equals its sequence decoded alone bit for bit; with float32 weights PyTorch's
    GEMM blocks by the batch size, so last bits may differ."""
    fast = name != "gemma3"
    net = ggtorch.load(gemma_tiny if name == "gemma3" else str(TINY / f"{name}.gguf"), fast=fast).net
    calls = counting(monkeypatch)
    seqs = [SEQS[0] + [11, 12, 13], SEQS[2], SEQS[3]]  # longer than gemma3's window of 4
    got, want = batched_vs_alone(net, seqs, [2, 0, 1], n_slots=3, steps=2, dtype="f16")
    assert calls
    pool = net.new_pool(2, 64, dtype="f16")
    net.forward(SEQS[0], pool, slot=0)
    mixed = net.forward_batch([5, 1, 44, 9], [0, 1, 1, 1], pool)  # slot 1's three prompt tokens in one step
    alone = net.new_cache(8, dtype="f16")
    ref = torch.cat([net.forward([t], alone) for t in (1, 44, 9)])
    if fast:
        assert torch.equal(got, want) and torch.equal(mixed[1:], ref)
    else:
        # (and a last-bit difference can round a key to the neighbouring float16)
        assert torch.allclose(got, want, atol=5e-4, rtol=5e-4) and torch.allclose(mixed[1:], ref, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_gated_activation(act):
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(3, 1000, generator=g) * 6, torch.randn(3, 1000, generator=g)
    gate[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -1e-30])  # far tails and zero stay finite and exact
    fused = torch.cat((gate, up), dim=1)
    out = torch.empty(3, 1000)
    jit.library().qdot_glu(fused.data_ptr(), fused.data_ptr() + 4 * 1000, 3, 1000, 2000, 2000, fastpath.GLU[act],
                           out.data_ptr())
    ref = (F.silu(gate.double()) if act == "silu" else gelu_tanh(gate.double())) * up.double()
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny/tiny-llama-Q4_0", "tiny/tiny-qwen3-Q8_0", "archs/tiny-llama-qkv-Q8_0",
                                  "archs/tiny-smollm3-Q8_0", "smollm2-135m", "gemma3-270m"])
def test_whole_step_equals_the_per_layer_path(name, monkeypatch):
    """fastpath.Step (every layer in one call: csrc/step.cpp) calls the same functions in the same order
    as the per-operation path, so a decode step's logits are the same to the bit: llama with fused
    and separate Q/K/V, qwen3's per-head norms, smollm3's layers without RoPE, and the real models
    (SmolLM2; Gemma 3 with its sandwich norms, GELU, local/global RoPE and mixed Q4_K/Q6_K weights)."""
    from conftest import FIXTURES
    path = name if "/" not in name else str(FIXTURES / f"{name}.gguf")
    m = ggtorch.load(path, fast=True)
    net = m.net
    assert fastpath.step_of(net) is not None
    ids = m.tokenize("The quick brown fox jumps over the lazy dog. " * 3)[:30] if "/" not in name else SEQS[0] * 3
    got, cg = decode(net, ids, "f16", 6)
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)
    want, cw = decode(net, ids, "f16", 6)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cg.k + cg.v, cw.k + cw.v))


def test_step_not_taken_where_it_cannot_compute_the_same(monkeypatch):
    """Biases (qwen2), weights without the JIT kernel (exact mode) and a tracer keep the per-layer path."""
    qwen2 = ggtorch.load(str(TINY / "tiny-qwen2-Q8_0.gguf"), fast=True).net
    assert qwen2.step_spec() is None
    exact = ggtorch.load(str(TINY / "tiny-llama-Q4_0.gguf"), fast=False).net
    assert exact.step_spec() is not None and fastpath.step_of(exact) is None
    fast = ggtorch.load(str(TINY / "tiny-llama-Q4_0.gguf"), fast=True).net
    assert fastpath.step_of(fast) is not None
    c = fast.new_cache(8)
    fast.forward(SEQS[0], c)
    calls = counting(monkeypatch)
    seen = []
    fast.forward([5], c, trace=lambda n, t: seen.append(n))
    assert not calls and "Qcur-0" in seen and "l_out-1" in seen


def test_short_prompt_alone_equals_riding_along():
    """A prompt of up to MAX_TOKENS tokens gets the same arithmetic alone (forward) as riding along with
    another sequence's decode step (forward_batch): the server's answers do not depend on company."""
    net = ggtorch.load(str(TINY / "tiny-llama-Q4_0.gguf"), fast=True).net
    prompt = SEQS[0] + SEQS[3]
    alone = net.new_cache(8, dtype="f16")
    want = net.forward(prompt, alone, all_logits=True)
    pool = net.new_pool(2, 64, dtype="f16")
    net.forward(SEQS[2], pool, slot=0)
    got = net.forward_batch([5] + prompt, [0] + [1] * len(prompt), pool)
    assert torch.equal(got[1:], want)
    assert torch.equal(pool.k[0][1, :, :len(prompt)], alone.k[0][0, :, :len(prompt)])
