"""llama.cpp numerics mode: with ggml's activation roundings, F16 KV cache and fp16 attention products,
the tiny fixtures whose types ggml pairs with Q8_K or Q8_0 activations agree with llama.cpp to float32
rounding, where plain float32 is ~0.1 away."""
import numpy as np
import pytest
import torch

import ggtorch
from conftest import TINY, tiny_manifest
from ggtorch.model.numerics import quant_q8_0, quant_q8_k

IDS = tiny_manifest()["prompt_ids"]


@pytest.mark.parametrize("name", ["tiny-llama-Q3_K", "tiny-llama-Q4_K", "tiny-llama-Q5_K", "tiny-llama-Q6_K",
                                  "tiny-llama-IQ4_NL", "tiny-llama-IQ4_XS", "tiny-qwen2-Q4_K", "tiny-qwen2-Q8_0"])
def test_ggml_numerics_match_llama_cpp(name):
    ref = np.load(TINY / f"{name}.logits.npy")
    m = ggtorch.load(str(TINY / f"{name}.gguf"), fast=False)
    plain = np.abs(m.logits(IDS).numpy() - ref).max()
    m.net.use_ggml_numerics()
    exact = np.abs(m.logits(IDS).numpy() - ref).max()
    assert plain > 0.05 and exact < 1e-4, (plain, exact)


def test_activation_quantizers():
    torch.manual_seed(0)
    x = torch.randn(3, 512) * torch.linspace(0.1, 10, 512)
    xh, d, q = quant_q8_0(x)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())
    amax = x.reshape(3, 16, 32).abs().amax(-1)
    assert torch.equal(q.abs().amax(-1), torch.full_like(amax, 127))  # each block's extreme hits 127
    assert (xh - x).abs().reshape(3, 16, 32).amax(-1).le(amax / 127 * 0.51 + amax * 1e-3).all()
    xk = quant_q8_k(x)
    b = x.reshape(3, 2, 256)
    step = b.abs().amax(-1, keepdim=True) / 127
    assert ((xk.reshape(3, 2, 256) - b).abs() <= step * 0.5001).all()
    assert torch.equal(quant_q8_k(torch.zeros(1, 256)), torch.zeros(1, 256))


def test_numerics_mode_runs_on_the_exact_path():
    m = ggtorch.load(str(TINY / "tiny-llama-Q4_K.gguf"), ggml_numerics=True)
    assert not m.fast and m.net.numerics
    ref = np.load(TINY / "tiny-llama-Q4_K.logits.npy")
    assert np.abs(m.logits(IDS).numpy() - ref).max() < 1e-4
