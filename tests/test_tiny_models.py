"""Tiny random models in every tensor type against llama.cpp's logits and greedy tokens."""
import numpy as np
import pytest
import torch

from conftest import TINY, tiny_manifest
import ggtorch

MANIFEST = tiny_manifest()
PROMPT = MANIFEST["prompt_ids"]


def limit(key: str) -> float:
    t = key.rsplit("-", 1)[1]
    return {"F32": 0.004, "F16": 0.008, "BF16": 0.04}.get(t, 0.15)


@pytest.fixture(scope="module")
def models():
    return {}


def get(models, key):
    if key not in models:
        models[key] = ggtorch.load(str(TINY / MANIFEST["models"][key]["file"]), fast=False)
    return models[key]


@pytest.mark.parametrize("key", sorted(MANIFEST["models"]))
def test_logits_match_llama_cpp(models, key):
    m = get(models, key)
    ref = np.load(TINY / f"{key}.logits.npy")
    lg = m.logits(PROMPT).numpy()
    err = np.abs(lg - ref).max() / ref.std()
    assert err <= limit(key), f"{key}: max logit error {err:.4f} sigma > {limit(key)}"


@pytest.mark.parametrize("key", sorted(MANIFEST["models"]))
def test_greedy_matches_until_small_margin(models, key):
    m = get(models, key)
    e = MANIFEST["models"][key]
    n = next((i for i, mg in enumerate(e["greedy_margins"]) if mg < 0.1), len(e["greedy"]))
    r = m.generate(PROMPT, max_tokens=len(e["greedy"]), ignore_eos=True)
    assert r.ids[:n] == e["greedy"][:n]


@pytest.mark.parametrize("key", ["tiny-llama-Q4_K", "tiny-qwen2-Q8_0", "tiny-qwen3-F32", "tiny-llama-tied-Q6_K"])
def test_prefill_then_decode_equals_full_recompute(models, key):
    m = get(models, key)
    # an f32 cache: with F16 (the default) a last-bit difference between the two paths can flip an
    # f16 rounding of a key, which this tolerance would see (test_context.py covers the F16 cache)
    full = m.net.forward(PROMPT, m.net.new_cache(16, dtype="f32"), all_logits=True)
    cache = m.net.new_cache(4, dtype="f32")  # small on purpose: the cache must grow
    rows = [m.net.forward(PROMPT[:5], cache, all_logits=True)]
    for t in PROMPT[5:]:
        rows.append(m.net.forward([t], cache, all_logits=True))
    step = torch.cat(rows)
    assert torch.allclose(full, step, atol=1e-4, rtol=1e-4)


def test_wrong_weight_orientation_is_caught(models):
    """The test above can fail: reading a [in, out] weight as [out, in] moves the logits by far."""
    m = ggtorch.load(str(TINY / "tiny-llama-F32.gguf"))
    w = m.net.layers[0]["attn_q"]
    w.dense = w.dense.T.contiguous()
    err = np.abs(m.logits(PROMPT).numpy() - np.load(TINY / "tiny-llama-F32.logits.npy")).max()
    assert err > 0.5


def test_same_seed_same_text(models):
    m = get(models, "tiny-llama-F32")
    a = m.generate(PROMPT, max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    b = m.generate(PROMPT, max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    c = m.generate(PROMPT, max_tokens=12, temperature=0.9, seed=8, ignore_eos=True)
    assert a.ids == b.ids and a.text == b.text
    assert a.ids != c.ids
