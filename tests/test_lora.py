"""LoRA adapters (ggtorch.lora) against llama.cpp: adapters made by llama.cpp's own converter from random PEFT
adapters, and llama.cpp's logits with them, recorded by tools/record_lora.py into tests/data/lora/."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, tiny_manifest
import ggtorch
from ggtorch.errors import LoRAError
from ggtorch.gguf.writer import GGUFWriter
from ggtorch.lora import load_adapter
from ggtorch.lora.adapter import Adapter

DATA = Path(__file__).parent / "data" / "lora"
PROMPT = tiny_manifest()["prompt_ids"]
REF = dict(np.load(DATA / "llama_cpp_logits.npz"))
A, B = str(DATA / "peft_a.gguf"), str(DATA / "peft_b.gguf")
# tests/test_tiny_models.py's bounds: max |logit error| / std of llama.cpp's logits, per base type
LIMIT = {"F32": 0.004, "Q8_0": 0.15}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(base: str, fast: bool = False):
        key = (base, fast)
        if key not in cache:
            cache[key] = ggtorch.load(str(TINY / f"tiny-llama-{base}.gguf"), fast=fast)
        return cache[key]

    return get


def logits(m, adapters):
    m.set_lora(adapters)
    try:
        return m.logits(PROMPT).numpy()
    finally:
        m.set_lora([])


CASES = [("tiny-llama-F32+peft_a", "F32", [(A, 1.0)]), ("tiny-llama-Q8_0+peft_a", "Q8_0", [(A, 1.0)]),
         ("tiny-llama-F32+peft_b", "F32", [(B, 1.0)]),
         ("tiny-llama-F32+peft_a*0.5+peft_b", "F32", [(A, 0.5), (B, 1.0)])]


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("key,base,adapters", CASES, ids=[c[0] for c in CASES])
def test_gguf_adapter_matches_llama_cpp(models, key, base, adapters, fast):
    ref = REF[key]
    err = np.abs(logits(models(base, fast), adapters) - ref).max() / ref.std()
    assert err <= LIMIT[base], f"{key}: max logit error {err:.4f} sigma > {LIMIT[base]}"
    # the adapter matters: llama.cpp's logits with it are far from the base model's
    assert np.abs(ref - REF["tiny-llama-F32"]).max() / ref.std() > 20 * LIMIT["F32"]


def test_peft_directory_equals_converted_gguf(models):
    m = models("F32")
    got = logits(m, [(str(DATA / "peft_a"), 1.0)])
    assert np.abs(got - logits(m, [(A, 1.0)])).max() < 1e-4  # F32 conversion: the same numbers
    got_b = logits(m, [(str(DATA / "peft_b"), 1.0)])
    assert np.abs(got_b - logits(m, [(B, 1.0)])).max() < 0.01  # the converter rounded peft_b to F16
    err = np.abs(got - REF["tiny-llama-F32+peft_a"]).max() / REF["tiny-llama-F32+peft_a"].std()
    assert err <= LIMIT["F32"]


def test_peft_qk_permutation_is_applied(models):
    """Without the converter's Q/K row permutation, PEFT's q_proj/k_proj terms land on the wrong RoPE pairs."""
    m = models("F32")
    ad = load_adapter(str(DATA / "peft_a"), m.net)
    raw = Adapter(ad.path, ad.arch, ad.alpha, dict(ad.pairs))
    from ggtorch.lora.adapter import _permute_rows

    for il in range(2):  # undo the permutation (its inverse is a reshape the other way round)
        for n, h in (("attn_q", 4), ("attn_k", 2)):
            a, b = raw.pairs[f"blk.{il}.{n}.weight"]
            inv = b.reshape(h, b.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(b.shape)
            assert torch.equal(_permute_rows(inv, h), b)
            raw.pairs[f"blk.{il}.{n}.weight"] = (a, inv)
    ref = REF["tiny-llama-F32+peft_a"]
    assert np.abs(logits(m, [(raw, 1.0)]) - ref).max() / ref.std() > 0.05


def test_scale_zero_gives_the_base_model(models):
    for fast in (False, True):
        m = models("F32", fast)
        base = m.logits(PROMPT).numpy()
        assert np.array_equal(logits(m, [(A, 0.0)]), base)
    assert np.abs(base - REF["tiny-llama-F32"]).max() / REF["tiny-llama-F32"].std() <= LIMIT["F32"]


def test_scale_follows_alpha_over_rank(models):
    """scale = user * alpha / rank: peft_a (alpha 8, rank 4) at 0.5 equals the same pairs with alpha = rank."""
    m = models("F32")
    ad = load_adapter(A)
    assert ad.alpha == 8.0 and ad.scale("blk.0.attn_q.weight", 0.5) == 1.0
    same = Adapter(ad.path, ad.arch, 0.0, dict(ad.pairs))  # alpha 0: the user scale alone
    assert np.abs(logits(m, [(A, 0.5)]) - logits(m, [(same, 1.0)])).max() < 1e-5


def test_two_adapters_add(models):
    """Two adapters on a weight add their terms: each layer computes W x + s1 B1 A1 x + s2 B2 A2 x, which is
    one adapter whose pairs are the two stacked along the rank (scales folded into B)."""
    m = models("F32")
    a, b = load_adapter(A), load_adapter(B)
    stacked = {}
    for name in set(a.pairs) | set(b.pairs):
        parts = [(p[0], p[1] * ad.scale(name, s)) for ad, s in ((a, 0.5), (b, 1.0)) if name in ad.pairs
                 for p in [ad.pairs[name]]]
        stacked[name] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1))
    one = Adapter("stacked", "llama", 0.0, stacked)
    both = logits(m, [(A, 0.5), (B, 1.0)])
    assert np.abs(both - logits(m, [(one, 1.0)])).max() < 1e-4
    # and per product: the output of an adapted weight is the base output plus both deltas
    w = m.net.layers[0]["attn_q"]
    x = torch.randn(3, w.in_features, generator=torch.Generator().manual_seed(0))
    from ggtorch.quant.linear import qmatmul

    outs = {}
    for k, ads in {"0": [], "a": [(A, 0.5)], "b": [(B, 1.0)], "ab": [(A, 0.5), (B, 1.0)]}.items():
        m.set_lora(ads)
        outs[k] = qmatmul(x, w)
    m.set_lora([])
    assert torch.allclose(outs["ab"] - outs["0"], (outs["a"] - outs["0"]) + (outs["b"] - outs["0"]), atol=1e-5)
    assert (outs["a"] - outs["0"]).abs().max() > 0.01 and (outs["b"] - outs["0"]).abs().max() > 0.01


def test_decode_with_adapter_equals_full_forward(models):
    """Token-by-token decoding (the JIT per-layer path; the one-call step is bypassed) gives the logits of
    the whole-prompt forward with the adapter."""
    from ggtorch.model import fastpath

    m = models("Q8_0", True)
    m.set_lora([(A, 1.0)])
    try:
        assert fastpath.step_of(m.net) is None
        full = m.net.forward(PROMPT, m.net.new_cache(16, dtype="f32"), all_logits=True)
        cache = m.net.new_cache(4, dtype="f32")
        rows = [m.net.forward(PROMPT[:5], cache, all_logits=True)]
        rows += [m.net.forward([t], cache, all_logits=True) for t in PROMPT[5:]]
        assert torch.allclose(full, torch.cat(rows), atol=2e-3, rtol=1e-3)
        r = m.generate(PROMPT, max_tokens=4, ignore_eos=True)
        assert r.ids[0] == int(np.argmax(REF["tiny-llama-Q8_0+peft_a"][-1]))
    finally:
        m.set_lora([])


def _bad_adapter(path, arch="llama", b_rows=256):
    w = GGUFWriter()
    w.add("general.architecture", arch)
    w.add("general.type", "adapter")
    w.add("adapter.type", "lora")
    w.add("adapter.lora.alpha", 4.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 256), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((b_rows, 4), np.float32))
    w.write(path)
    return str(path)


def test_mismatched_adapters_fail_with_one_line(models, tmp_path):
    m = models("F32")
    with pytest.raises(LoRAError, match=r"blk\.0\.attn_q\.weight.*wrong base model") as e:
        m.set_lora([_bad_adapter(tmp_path / "shape.gguf", b_rows=128)])
    assert "\n" not in str(e.value)
    with pytest.raises(LoRAError, match="architecture 'qwen2'"):
        m.set_lora([_bad_adapter(tmp_path / "arch.gguf", arch="qwen2")])
    with pytest.raises(LoRAError, match="general.type"):
        m.set_lora([str(TINY / "tiny-llama-F32.gguf")])  # a model is not an adapter
    assert m.loras == []  # a refused adapter leaves the model as it was
    from ggtorch.cli import main

    bad = _bad_adapter(tmp_path / "cli.gguf", b_rows=128)
    out = tmp_path / "l.npy"
    assert main(["logits", str(TINY / "tiny-llama-F32.gguf"), "--tokens", "1,2", "--out", str(out), "--lora", bad]) == 2


def test_cli_lora_scaled(tmp_path, capsys):
    from ggtorch.cli import main

    out = tmp_path / "l.npy"
    ids = ",".join(map(str, PROMPT))
    assert main(["logits", str(TINY / "tiny-llama-F32.gguf"), "--exact", "--tokens", ids, "--out", str(out),
                 "--lora-scaled", A, "0.5", "--lora", B]) == 0
    ref = REF["tiny-llama-F32+peft_a*0.5+peft_b"]
    assert np.abs(np.load(out) - ref).max() / ref.std() <= LIMIT["F32"]
