"""Regression tests of ggtorch.lora.train found while running benchmarks/lora_finetune.py on SmolLM2:
the packed forward outside the training loop, and the validation loss of a run stopped by max_steps."""
import pytest
import torch

from conftest import TINY, tiny_manifest
import ggtorch
from ggtorch.lora.train import Example, batch_loss, encode, evaluate, forward_packed

PROMPT = tiny_manifest()["prompt_ids"]


@pytest.fixture(scope="module")
def model():
    return ggtorch.load(str(TINY / "tiny-llama-F32.gguf"), fast=False)


def test_packed_forward_outside_the_training_loop(model):
    """forward_packed (and so evaluate) must keep its block-diagonal mask when called without the
    training loop's flag: the JIT attention the plain forward takes would attend across examples."""
    net = model.net
    a, b = PROMPT[:9], PROMPT[4:]
    assert not getattr(net, "lora_training", False)
    with torch.no_grad():
        want = torch.cat([net.forward(s, net.new_cache(16, dtype="f32"), all_logits=True) for s in (a, b)])
        packed = forward_packed(net, [a, b])
    assert packed.shape == want.shape and torch.allclose(packed, want, atol=1e-3)
    assert not getattr(net, "lora_training", False)  # restored
    # evaluate() over a packed batch: the token-weighted mean of the examples' own losses
    exs = [Example(list(s), [True] * len(s)) for s in (a, b)]
    with torch.no_grad():
        sums = [batch_loss(net, [e]) for e in exs]
    alone = sum(float(l) for l, _ in sums) / sum(n for _, n in sums)
    assert abs(evaluate(net, exs) - alone) < 1e-4


def test_max_steps_stop_measures_the_returned_adapter(model):
    """A run stopped by max_steps in the middle of an epoch reports the validation loss of the adapter
    it returns (not only that of the last finished epoch). Every example is the same text, so the
    validation split is that text whatever the shuffle."""
    rows = [{"text": "count 1 2 3 4 5 6 7"}] * 10
    r = ggtorch.finetune(model, rows, None, rank=4, alpha=8, lr=3e-3, epochs=3, batch=2, val=0.2, seed=0,
                         max_steps=3, progress=False, targets="attn_v,ffn_down")  # 4 steps an epoch
    assert r.steps == 3 and len(r.val_loss) == 2  # before training, at the stop
    model.set_lora([(r.adapter, 1.0)])
    try:
        got = evaluate(model.net, [encode(model, rows[0], None, 512)])
    finally:
        model.set_lora([])
    assert abs(r.val_loss[-1] - got) < 1e-4 and r.val_loss[-1] < r.val_loss[0]
