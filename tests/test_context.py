"""The context window (issue 15): n_ctx, refusing what does not fit, context shift, the KV cache type."""
import dataclasses
import warnings

import pytest
import torch

from conftest import TINY, tiny_manifest
import ggtorch
from ggtorch.cli import main
from ggtorch.errors import ContextError, GGTorchError

PROMPT = tiny_manifest()["prompt_ids"]  # 16 tokens, BOS first
LLAMA = str(TINY / "tiny-llama-F32.gguf")


def test_n_ctx_default_is_the_trained_context_capped():
    m = ggtorch.load(LLAMA, fast=False)
    assert m.n_ctx_train == 512 and m.n_ctx == 512 and m.kv_type == "f16"
    assert "n_ctx 512 (trained 512)" in m.context_info()
    m.cfg.__dict__["n_ctx_train"] = 8192  # a model trained on more: capped at 4096
    m._set_context(None, None, False)
    assert m.n_ctx == 4096


def test_n_ctx_above_the_trained_context_warns():
    with pytest.warns(UserWarning, match="above the model's trained context"):
        m = ggtorch.load(LLAMA, fast=False, n_ctx=1024)
    assert m.n_ctx == 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggtorch.load(LLAMA, fast=False, n_ctx=256)


def test_prompt_that_does_not_fit_is_refused_before_any_work():
    m = ggtorch.load(LLAMA, fast=False, n_ctx=24)
    calls = []
    m.net.forward = lambda *a, **k: calls.append(a)
    with pytest.raises(ContextError, match=r"16 tokens and 9 more.*25 > the context n_ctx 24"):
        m.generate(PROMPT, max_tokens=9)
    with pytest.raises(ContextError, match="do not fit the context n_ctx 8"):
        ggtorch.load(LLAMA, fast=False, n_ctx=8).logits(PROMPT)
    assert calls == [] and issubclass(ContextError, GGTorchError)


def test_generate_at_the_cache_limit_ends_with_length():
    m = ggtorch.load(LLAMA, fast=False, n_ctx=24)
    r = m.generate(PROMPT, max_tokens=8, ignore_eos=True)  # exactly fits
    assert len(r.ids) == 8 and r.finish_reason == "length"
    r2 = m.generate(PROMPT, max_tokens=None, ignore_eos=True)  # until the context is full
    assert r2.ids == r.ids and r2.finish_reason == "length"


def test_cli_too_long_prompt_is_one_line_exit_2(capsys):
    assert main(["run", LLAMA, "-p", "hello world " * 20, "-n", "4", "--ctx", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([l for l in err if "n_ctx 16" in l and "tokens" in l]) == 1
    assert not any("Traceback" in l for l in err)


def test_cli_shows_the_context_and_cache_type(capsys):
    assert main(["run", LLAMA, "-p", "hello", "-n", "2", "--ctx", "64", "--cache-type", "f32", "--exact"]) == 0
    assert "[n_ctx 64 (trained 512), KV cache f32" in capsys.readouterr().err


def shifted_vs_fresh(net, ids, n_keep, n_discard, nxt, dtype="f32"):
    cache = net.new_pool(1, len(ids), dtype=dtype)
    net.forward(ids, cache)
    net.shift_context(cache, n_keep, n_discard)
    kept = ids[:n_keep] + ids[n_keep + n_discard:]
    assert cache.n == len(kept)
    got = net.forward(nxt, cache, all_logits=True)
    want = net.forward(kept + nxt, net.new_cache(8, dtype=dtype), all_logits=True)[-len(nxt):]
    return got, want


def one_layer(net):
    """Layer 0 only: its K/V depend on nothing but each token and its position, so after a shift the
    cache must equal a fresh run over the kept tokens exactly (in deeper layers the kept tokens'
    states still carry what they saw of the dropped ones, in llama.cpp too)."""
    net.cfg = dataclasses.replace(net.cfg, n_layer=1)
    return net


IDS = PROMPT + [5, 77, 300, 12, 600, 42, 9, 18, 250, 3, 901, 33, 70, 71, 72, 73]  # 32 tokens


@pytest.mark.parametrize("name", ["tiny-llama-F32", "tiny-qwen2-F32", "tiny-qwen3-Q8_0"])  # normal and neox RoPE
def test_context_shift_equals_a_fresh_run_over_the_kept_tokens(name):
    net = one_layer(ggtorch.load(str(TINY / f"{name}.gguf"), fast=False).net)
    got, want = shifted_vs_fresh(net, IDS, 4, 14, [44, 45])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # can fail: keys left at their old rotation give other logits
    net.rope_shift = lambda il, k, delta: k
    stale, _ = shifted_vs_fresh(net, IDS, 4, 14, [44, 45])
    assert (stale - want).abs().max() > 1e-2


def shifted_cache_vs_offset_run(net, ids, n_discard, dtype="f32"):
    """Every layer: RoPE attention depends on relative positions only, so the whole sequence run at
    positions -n_discard.. stores, for the tokens after the dropped ones, exactly the K/V that a
    shift (n_keep 0) must leave at positions 0.."""
    cache = net.new_pool(1, len(ids), dtype=dtype)
    net.forward(ids, cache)
    net.shift_context(cache, 0, n_discard)
    ref = net.new_cache(len(ids), dtype=dtype)
    net.faults["position_offset"] = -n_discard
    try:
        net.forward(ids, ref)
    finally:
        del net.faults["position_offset"]
    m = len(ids) - n_discard
    return max(max(float((cache.k[il][0, :, :m] - ref.k[il][0, :, n_discard:]).abs().max()),
                   float((cache.v[il][0, :, :m] - ref.v[il][0, :, n_discard:]).abs().max()))
               for il in range(net.cfg.n_layer))


@pytest.mark.parametrize("name", ["tiny-llama-F32", "tiny-qwen2-F32", "tiny-qwen3-Q8_0"])
def test_context_shift_rerotates_the_keys_of_every_layer(name):
    net = ggtorch.load(str(TINY / f"{name}.gguf"), fast=False).net
    assert shifted_cache_vs_offset_run(net, IDS, 13) < 1e-4
    net.rope_shift = lambda il, k, delta: k  # can fail
    assert shifted_cache_vs_offset_run(net, IDS, 13) > 1e-2


def test_context_shift_with_freq_factors_and_f16_cache():
    net = one_layer(ggtorch.load(LLAMA, fast=False).net)
    net.freq_factors = torch.linspace(1.0, 4.0, net.cfg.n_rot // 2)  # llama3-style rope_freqs
    got, want = shifted_vs_fresh(net, IDS, 1, 15, [44])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    got, want = shifted_vs_fresh(net, IDS, 1, 15, [44], dtype="f16")  # rotated keys rounded again to f16
    assert torch.allclose(got, want, atol=2e-2), (got - want).abs().max()


@pytest.mark.parametrize("window", [4, 0])  # layer 0 local (rope.freq_base_swa) or global (rope.freq_base)
def test_context_shift_gemma3_per_layer_rope_bases(tmp_path, window):
    from test_batch_forward import tiny_gemma3

    path = str(tiny_gemma3(tmp_path / "g.gguf", window=window))
    net = ggtorch.load(path, fast=False).net
    assert net.rope_base(0) == (1e4 if window else 1e6) and net.rope_base(5) == 1e6
    assert shifted_cache_vs_offset_run(net, IDS, 13) < 1e-4
    net = one_layer(ggtorch.load(path, fast=False).net)
    got, want = shifted_vs_fresh(net, IDS, 2, 15, [44, 45])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_generation_continues_past_n_ctx_with_context_shift():
    m = ggtorch.load(LLAMA, fast=False, n_ctx=24, kv_dtype="f32")
    with pytest.raises(ContextError):
        m.generate(PROMPT, max_tokens=30, ignore_eos=True)
    r = m.generate(PROMPT, max_tokens=30, ignore_eos=True, context_shift=True, n_keep=3)
    assert len(r.ids) == 30 and r.finish_reason == "length" and r.timings.context_shifts >= 2
    # up to the first shift it is the plain generation
    plain = ggtorch.load(LLAMA, fast=False, kv_dtype="f32").generate(PROMPT, max_tokens=30, ignore_eos=True)
    assert r.ids[:9] == plain.ids[:9]
    with pytest.raises(ContextError, match="the prompt has 16 tokens, the context n_ctx is 16"):
        ggtorch.load(LLAMA, fast=False, n_ctx=16).generate(PROMPT, max_tokens=4, context_shift=True)


def test_cli_context_shift(capsys):
    assert main(["run", LLAMA, "--exact", "-p", "hello world", "-n", "40", "--ctx", "24", "--context-shift",
                 "--ignore-eos", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) == 40 and out["timings"]["context_shifts"] >= 1


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
def test_kv_cache_types(kind):
    m = ggtorch.load(LLAMA, fast=False, kv_dtype=kind)
    c = m.new_cache()
    size = {"f32": 4, "f16": 2, "bf16": 2}[kind]
    assert c.k[0].dtype == getattr(torch, {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[kind])
    assert m.kv_bytes_per_token() == c.bytes_per_token() == m.cfg.n_layer * m.cfg.n_head_kv * 2 * m.cfg.head_dim * size
    ref = ggtorch.load(LLAMA, fast=False, kv_dtype="f32").logits(PROMPT)
    err = float((m.logits(PROMPT) - ref).abs().max())
    assert err < {"f32": 1e-6, "f16": 5e-3, "bf16": 5e-2}[kind]
    with pytest.raises(GGTorchError):
        ggtorch.load(LLAMA, fast=False, kv_dtype="q8")


def test_bench_reports_kv_cache_bytes():
    from ggtorch.bench import bench, format_table

    r = bench(LLAMA, n_prompt=8, n_gen=4, reps=1, fast=False, kv_dtype="f16")
    m = ggtorch.load(LLAMA, fast=False)
    assert r["kv_type"] == "f16" and r["kv_bytes_per_token"] == m.kv_bytes_per_token()
    assert r["kv_mb"] == pytest.approx(m.kv_bytes_per_token() * 12 / 1e6)
    assert "KiB/tok" in format_table([r])
