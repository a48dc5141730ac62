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


def test_decode_with_adapter_equals_full_forward(models, monkeypatch):
    """Token-by-token decoding with an adapter (the one-call step, its LoRA terms in step.cpp) gives the
    logits of the whole-prompt forward, and those of the per-layer path, to the bit."""
    from ggtorch.model import fastpath

    m = models("Q8_0", True)
    m.set_lora([(A, 1.0)])
    try:
        st = fastpath.step_of(m.net)
        assert st is not None and st.lora_b  # the adapter's terms are in the step
        full = m.net.forward(PROMPT, m.net.new_cache(16, dtype="f32"), all_logits=True)

        def decode():
            cache = m.net.new_cache(4, dtype="f32")
            rows = [m.net.forward(PROMPT[:5], cache, all_logits=True)]
            return torch.cat(rows + [m.net.forward([t], cache, all_logits=True) for t in PROMPT[5:]])

        rows = decode()
        # bit for bit: the low-rank terms compute each row alone (csrc/lowrank.cpp), as the quantized kernels
        # do, so a row's numbers do not depend on how many rows share its forward
        assert torch.equal(full, rows), (full - rows).abs().max()
        with monkeypatch.context() as mp:
            mp.setattr(fastpath, "step_of", lambda model: None)
            assert torch.equal(decode(), rows)  # the per-layer path: qmatmul, then LowRank's same calls
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


# ---- export-lora ------------------------------------------------------------------------------------
@pytest.mark.parametrize("base,out_type,tol", [("F32", "f32", 1e-4), ("F32", None, 1e-4), ("Q8_0", "f16", 0.01),
                                               ("Q8_0", "q8_0", 0.15)])
def test_export_lora_merged_model_equals_base_plus_adapter(models, tmp_path, base, out_type, tol):
    from ggtorch.cli import main

    out = tmp_path / "merged.gguf"
    args = ["export-lora", str(TINY / f"tiny-llama-{base}.gguf"), "--lora-scaled", A, "0.5", "--lora", B, "-o", str(out)]
    assert main(args + (["--type", out_type] if out_type else [])) == 0
    want = logits(models(base), [(A, 0.5), (B, 1.0)])
    merged = ggtorch.load(str(out), fast=False)
    assert not merged.loras
    got = merged.logits(PROMPT).numpy()
    err = np.abs(got - want).max() / want.std()
    assert err <= tol, f"merged ({out_type}) vs base+adapters: {err:.5f} sigma"
    from ggtorch.gguf.reader import GGUFFile

    with GGUFFile(str(out)) as f:
        kinds = {f.tensors["blk.0.attn_q.weight"].type_name, f.tensors["blk.0.attn_k.weight"].type_name}
    assert kinds == ({out_type.upper()} if out_type else {"F32"} if base == "F32" else {"F16", "Q8_0"}) or \
        (base == "Q8_0" and out_type and kinds == {out_type.upper(), "Q8_0"})


# ---- training ---------------------------------------------------------------------------------------
TRAIN = [{"text": f"count {i} {i + 1} {i + 2} {i + 3} {i + 4} {i + 5}"} for i in range(10)]


def test_quantized_product_backward_equals_dense_gradient(models):
    from ggtorch.quant.linear import qmatmul

    w = models("Q8_0").net.layers[0]["ffn_down"]
    assert w.dense is None  # a quantized weight: the backward dequantizes it on the fly
    x = torch.randn(5, w.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(5, w.out_features, generator=torch.Generator().manual_seed(2))
    (qmatmul(x, w) * g).sum().backward()
    assert torch.allclose(x.grad, g @ w.dequantize(), atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    r = ggtorch.finetune(str(TINY / "tiny-llama-F32.gguf"), TRAIN, str(d / "a.gguf"), rank=4, alpha=8, lr=3e-3,
                         epochs=2, batch=4, val=0.2, seed=3, peft=str(d / "peft"), progress=False,
                         targets="attn_q,attn_v,ffn_down")
    return r, d


def test_finetune_lowers_the_loss(trained):
    r, _ = trained
    assert r.steps == 4 and len(r.val_loss) == 3
    assert r.train_loss[-1] < r.train_loss[0] - 0.5
    assert r.val_loss[-1] < r.val_loss[0] - 0.5


def test_saved_adapter_reloads_to_the_trained_model(models, trained):
    r, d = trained
    m = models("F32")
    want = logits(m, [(r.adapter, 1.0)])
    assert np.abs(want - logits(m, [])).max() > 0.1  # the adapter changed the model
    assert np.abs(logits(m, [(str(d / "a.gguf"), 1.0)]) - want).max() < 1e-5
    assert np.abs(logits(m, [(str(d / "peft"), 1.0)]) - want).max() < 1e-5


def test_same_seed_same_adapter(trained, tmp_path):
    r, _ = trained
    kw = dict(rank=4, alpha=8, lr=3e-3, epochs=2, batch=4, val=0.2, progress=False, targets="attn_q,attn_v,ffn_down")
    model = str(TINY / "tiny-llama-F32.gguf")
    again = ggtorch.finetune(model, TRAIN, seed=3, **kw)
    for n, (a, b) in r.adapter.pairs.items():
        assert torch.equal(a, again.adapter.pairs[n][0]) and torch.equal(b, again.adapter.pairs[n][1])
    other = ggtorch.finetune(model, TRAIN, seed=4, max_steps=1, **kw)
    n = "blk.0.attn_q.weight"
    assert not torch.equal(other.adapter.pairs[n][0], r.adapter.pairs[n][0])


def test_checkpoint_resume_gives_the_same_adapter(trained, tmp_path):
    r, _ = trained
    kw = dict(rank=4, alpha=8, lr=3e-3, epochs=2, batch=4, val=0.2, seed=3, progress=False,
              targets="attn_q,attn_v,ffn_down", checkpoint=str(tmp_path / "c.ckpt"), save_every=1)
    model = str(TINY / "tiny-llama-F32.gguf")
    ggtorch.finetune(model, TRAIN, max_steps=1, **kw)  # stopped after one step
    rest = ggtorch.finetune(model, TRAIN, resume=True, **kw)
    assert rest.steps == 4
    for n, (a, b) in r.adapter.pairs.items():
        assert torch.allclose(a, rest.adapter.pairs[n][0], atol=1e-6) and torch.allclose(b, rest.adapter.pairs[n][1], atol=1e-6)


def test_chat_loss_covers_the_assistant_tokens_only(models):
    from ggtorch.lora.train import encode

    m = models("F32")
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]
    ex = encode(m, {"messages": msgs}, None, 512)
    learned = m.detokenize([t for t, k in zip(ex.ids, ex.mask) if k], special=True)
    assert "general kenobi" in learned and "hello" not in learned


LLAMA_CPP_CHILD = r"""
import ctypes, sys
import numpy as np
import llama_cpp
model, adapter, out = sys.argv[1:4]
prompt = [int(t) for t in sys.argv[4].split(",")]
llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                      seed=0, yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0)
h = llama_cpp.llama_adapter_lora_init(llm.model, adapter.encode())
assert h
arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(h)
assert llama_cpp.llama_set_adapters_lora(llm.ctx, arr, 1, (ctypes.c_float * 1)(1.0)) == 0
llm.eval(prompt)
np.save(out, np.array(llm.scores[:len(prompt)], dtype=np.float32))
"""


def test_trained_adapter_loads_in_llama_cpp(models, trained, tmp_path):
    """llama.cpp (optional: skipped without llama-cpp-python) loads the adapter we trained and gives our
    logits. It runs in a child process: llama.cpp and PyTorch in one process can crash each other."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    r, d = trained
    out = tmp_path / "ref.npy"
    p = subprocess.run([sys.executable, "-c", LLAMA_CPP_CHILD, str(TINY / "tiny-llama-F32.gguf"), str(d / "a.gguf"),
                        str(out), ",".join(map(str, PROMPT))], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    ref = np.load(out)
    got = logits(models("F32"), [(str(d / "a.gguf"), 1.0)])
    assert np.abs(got - ref).max() / ref.std() <= LIMIT["F32"]


def test_packed_training_forward_equals_separate_forwards(models):
    """forward_packed runs several examples as one row (block-diagonal mask, positions restarting)."""
    from ggtorch.lora.train import forward_packed

    m = models("F32")
    a, b = PROMPT[:9], PROMPT[4:]
    m.set_lora([(A, 1.0)])
    try:
        want = torch.cat([m.net.forward(s, m.net.new_cache(16, dtype="f32"), all_logits=True) for s in (a, b)])
        m.net.lora_training = True
        with torch.no_grad():
            packed = forward_packed(m.net, [a, b])
    finally:
        m.net.lora_training = False
        m.set_lora([])
    assert packed.shape == want.shape and torch.allclose(packed, want, atol=1e-3)


def test_cli_finetune_writes_an_adapter(tmp_path, capsys):
    import json

    from ggtorch.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:4]))
    out = tmp_path / "a.gguf"
    model = str(TINY / "tiny-llama-F32.gguf")
    args = ["finetune", model, "--data", str(data), "--rank", "2", "--alpha", "4", "--batch", "2", "--val", "0",
            "--max-steps", "1", "--targets", "attn_v", "-o", str(out), "--peft", str(tmp_path / "p")]
    assert main(args) == 0
    ad = load_adapter(str(out))
    assert sorted(ad.pairs) == ["blk.0.attn_v.weight", "blk.1.attn_v.weight"] and ad.alpha == 4.0
    assert (tmp_path / "p" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert main(args[:-4] + ["--targets", "attn_x", "-o", str(out)]) == 2
    assert "attn_x" in capsys.readouterr().err


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_one_batch_mixes_sequences_with_different_adapters(models, fast):
    """Per-sequence scales (the server's per-request adapters): in one batched decode step, slot 0 runs with
    adapter A only, slot 1 with B only, slot 2 with none; each row equals that sequence run alone."""
    from ggtorch.lora.apply import set_slot_scales

    m = models("Q8_0", fast)
    net = m.net
    prompts = [PROMPT[:7], PROMPT[3:12], PROMPT[:5]]
    nxt = [PROMPT[7], PROMPT[12], PROMPT[5]]
    alone = []
    for p, t, ads in zip(prompts, nxt, ([(A, 1.0)], [(B, 1.0)], [])):
        m.set_lora(ads)
        c = net.new_cache(16, dtype="f32")
        net.forward(p, c)
        alone.append(net.forward([t], c))
    m.set_lora([(A, 1.0), (B, 1.0)])
    try:
        set_slot_scales(net, {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [0.0, 0.0]})
        pool = net.new_pool(3, 64, dtype="f32")
        for s, p in enumerate(prompts):
            net.forward(p, pool, slot=s)
        got = net.forward_batch(nxt, [0, 1, 2], pool)
    finally:
        m.set_lora([])
    want = torch.cat(alone)
    if fast:  # the JIT kernels and low-rank terms: each row's bits independent of the batch
        assert torch.equal(got, want), (got - want).abs().max()
    assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()
    assert (alone[0] - alone[2]).abs().max() > 0.1 and (alone[1] - alone[2]).abs().max() > 0.1


def test_mixed_adapter_batch_takes_the_one_call_step(models, monkeypatch):
    """Per-sequence adapter scales run in the one-call step (each LoRA term pointed at the call's per-row
    scales, or skipped where no row uses its adapter: step.cpp's Term.rows/skip), equal to the per-layer
    path to the bit; a forward without the table then takes the attached scales again."""
    from ggtorch.lora.apply import set_slot_scales
    from ggtorch.model import fastpath

    m = models("Q8_0", True)
    net = m.net
    prompts = [PROMPT[:7], PROMPT[3:12], PROMPT[:5]]
    nxt = [PROMPT[7], PROMPT[12], PROMPT[5]]

    def batch():
        set_slot_scales(net, {0: [1.0, 0.0], 1: [0.0, 2.0], 2: [0.0, 0.0]})  # slot 2: no adapter (both skipped)
        pool = net.new_pool(3, 64, dtype="f32")
        pre = [net.forward(p, pool, slot=s, all_logits=True) for s, p in enumerate(prompts)]
        return torch.cat(pre + [net.forward_batch(nxt, [0, 1, 2], pool)])

    def plain():
        return net.forward(PROMPT, net.new_cache(16, dtype="f32"), all_logits=True)

    m.set_lora([(A, 1.0), (B, 0.5)])
    try:
        runs, real = [], fastpath.Step.run
        monkeypatch.setattr(fastpath.Step, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
        got = batch()
        assert len(runs) == 4 and fastpath.step_of(net).per_row
        with monkeypatch.context() as mp:
            mp.setattr(fastpath, "step_of", lambda model: None)
            assert torch.equal(batch(), got)
        set_slot_scales(net, None)
        after = plain()
        assert not fastpath.step_of(net).per_row
        with monkeypatch.context() as mp:
            mp.setattr(fastpath, "step_of", lambda model: None)
            assert torch.equal(plain(), after)
    finally:
        set_slot_scales(net, None)
        m.set_lora([])


def test_one_call_step_sees_adapter_weights_trained_in_place(models, monkeypatch):
    """Training updates B in place: the one-call step (which holds B transposed) is built again, and
    decoding still equals the per-layer path with the new weights."""
    from ggtorch.model import fastpath

    m = models("Q8_0", True)
    ad = load_adapter(A)
    ad = Adapter(ad.path, ad.arch, ad.alpha, {n: (a.clone(), b.clone()) for n, (a, b) in ad.pairs.items()})
    m.set_lora([(ad, 1.0)])
    try:
        c = m.net.new_cache(16, dtype="f32")
        before = m.net.forward(PROMPT, c)
        first = fastpath.step_of(m.net)
        for _, b in ad.pairs.values():
            b.mul_(3.0)  # as an optimizer step does: in place
        c = m.net.new_cache(16, dtype="f32")
        after = m.net.forward(PROMPT, c)
        assert fastpath.step_of(m.net) is not first
        assert not torch.equal(before, after)
        with monkeypatch.context() as mp:
            mp.setattr(fastpath, "step_of", lambda model: None)
            assert torch.equal(m.net.forward(PROMPT, m.net.new_cache(16, dtype="f32")), after)
    finally:
        m.set_lora([])
