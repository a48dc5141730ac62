"""The architectures after llama (fixtures/archs): logits and greedy tokens against llama.cpp, on the exact
path and the default fast kernels; each feature switched off moves the logits beyond the bound."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import ggtorch
from ggtorch.gguf.reader import GGUFFile
from ggtorch.gguf.writer import GGUFWriter

from conftest import FIXTURES

ARCHS = FIXTURES / "archs"
MANIFEST = json.loads((ARCHS / "manifest.json").read_text())
PROMPT = MANIFEST["prompt_ids"]
KEYS = sorted(MANIFEST["models"])
_MODELS = {}


def limit(key: str, fast: bool = False) -> float:
    """fixtures/tiny's bounds: F32 0.004 sigma; quantized 0.15 exact, 0.2 on the fast kernels."""
    if key.endswith("-F32"):
        return 0.004
    return 0.2 if fast else 0.15


def get(key: str, fast: bool = False):
    k = (key, fast)
    if k not in _MODELS:
        _MODELS[k] = ggtorch.load(str(ARCHS / MANIFEST["models"][key]["file"]), fast=fast)
    return _MODELS[k]


def ref(key: str) -> np.ndarray:
    return np.load(ARCHS / f"{key}.logits.npy")


def err(m, key: str) -> float:
    r = ref(key)
    return float(np.abs(m.logits(PROMPT).numpy() - r).max() / r.std())


@pytest.mark.parametrize("key", KEYS)
def test_logits_match_llama_cpp_exact(key):
    e = err(get(key), key)
    assert e <= limit(key), f"{key}: max logit error {e:.4f} sigma > {limit(key)}"


@pytest.mark.parametrize("key", KEYS)
def test_logits_match_llama_cpp_fast(key):
    e = err(get(key, fast=True), key)
    assert e <= limit(key, True), f"{key}: max logit error {e:.4f} sigma > {limit(key, True)} (fast kernels)"


@pytest.mark.parametrize("key", KEYS)
def test_greedy_matches_until_small_margin(key):
    m = get(key)
    e = MANIFEST["models"][key]
    n = next((i for i, mg in enumerate(e["greedy_margins"]) if mg < 0.1), len(e["greedy"]))
    r = m.generate(PROMPT, max_tokens=len(e["greedy"]), ignore_eos=True)
    assert r.ids[:n] == e["greedy"][:n]


@pytest.mark.parametrize("key", ["tiny-gpt-oss-F32", "tiny-gemma2-F32", "tiny-qwen3moe-Q4_K", "tiny-mistral3-F32"])
def test_prefill_then_decode_equals_full_recompute(key):
    """Sliding windows, sinks, temperature and routing give the same logits token by token."""
    m = get(key)
    full = m.net.forward(PROMPT, m.net.new_cache(16, dtype=torch.float32), all_logits=True)  # exactness: f32 K/V
    cache = m.net.new_cache(4, dtype=torch.float32)
    rows = [m.net.forward(PROMPT[:3], cache, all_logits=True)]
    for t in PROMPT[3:]:
        rows.append(m.net.forward([t], cache, all_logits=True))
    assert torch.allclose(full, torch.cat(rows), atol=1e-4, rtol=1e-4)


# ---- each feature switched off moves the logits beyond the bound -------------------------------
def off(key, **cfg):
    """The error of a fresh exact model of ``key`` with config fields replaced."""
    m = ggtorch.load(str(ARCHS / MANIFEST["models"][key]["file"]), fast=False)
    m.net.cfg = dataclasses.replace(m.net.cfg, **cfg)
    return m


def moved(m, key) -> float:
    e = err(m, key)
    assert e > 10 * limit(key), f"{key}: switching the feature off moved the logits by only {e:.4f} sigma"
    return e


YARN_OFF = dict(yarn_ext_factor=0.0, yarn_attn_factor=1.0, rope_freq_scale=1.0)


@pytest.mark.parametrize("key,change", [
    ("tiny-llama-moe-F32", dict(n_expert_used=1)), ("tiny-llama-moe-F32", dict(n_expert_used=4)),
    ("tiny-qwen3moe-F32", dict(n_expert_used=1)), ("tiny-qwen3moe-F32", dict(n_expert_used=4)),
    ("tiny-gpt-oss-F32", dict(n_expert_used=1)), ("tiny-gpt-oss-F32", dict(n_expert_used=4)),
    ("tiny-llama-moe-F32", dict(expert_norm=False)),
    ("tiny-gpt-oss-F32", dict(expert_gating="softmax")),
    ("tiny-gpt-oss-F32", dict(sliding_window=4096)),
    ("tiny-gpt-oss-F32", YARN_OFF),
    ("tiny-gemma2-F32", dict(attn_softcap=0.0)), ("tiny-gemma2-F32", dict(final_softcap=0.0)),
    ("tiny-gemma2-F32", dict(sliding_window=4096)),
    ("tiny-phi3-F32", dict(n_rot=32)),
    ("tiny-granite-F32", dict(embed_scale=1.0)), ("tiny-granite-F32", dict(residual_scale=0.0)),
    ("tiny-granite-F32", dict(attn_scale=32 ** -0.5)), ("tiny-granite-F32", dict(logit_scale=0.0)),
    ("tiny-smollm3-F32", dict(no_rope_step=0)),
    ("tiny-mistral3-F32", dict(attn_temp_scale=0.0)), ("tiny-mistral3-F32", YARN_OFF),
])
def test_feature_switched_off_moves_logits(key, change):
    moved(off(key, **change), key)


def test_gpt_oss_without_sinks_or_clamps_moves_logits(monkeypatch):
    m = off("tiny-gpt-oss-F32")
    for L in m.net.layers:
        L["attn_sinks"] = None
    moved(m, "tiny-gpt-oss-F32")
    import ggtorch.model.gptoss as g
    import torch.nn.functional as F

    monkeypatch.setattr(g, "swiglu_oai", lambda gate, up: F.silu(gate * 1.702) / 1.702 * (up + 1))
    moved(off("tiny-gpt-oss-F32"), "tiny-gpt-oss-F32")


def test_olmo2_post_norms_and_full_width_qk_norm():
    m = off("tiny-olmo2-F32")
    for L in m.net.layers:
        L["post_attention_norm"] = torch.ones_like(L["post_attention_norm"])
        L["post_ffw_norm"] = torch.ones_like(L["post_ffw_norm"])
    moved(m, "tiny-olmo2-F32")
    m = off("tiny-olmo2-F32")  # a per-head norm (qwen3's) instead of the full-width one
    import ggtorch.model.olmo2 as o

    c = m.net.cfg
    for L in m.net.layers:
        L["attn_q_norm"] = L["attn_q_norm"][: c.head_dim]
        L["attn_k_norm"] = L["attn_k_norm"][: c.head_dim]
    real = o.rms_norm
    o.rms_norm = lambda x, w, eps: real(x.reshape(x.shape[0], -1, w.shape[0]), w, eps).reshape(x.shape) \
        if w is not None and x.shape[-1] != w.shape[0] else real(x, w, eps)
    try:
        moved(m, "tiny-olmo2-F32")
    finally:
        o.rms_norm = real


def test_qwen3moe_per_head_norms_are_used():
    m = off("tiny-qwen3moe-F32")
    for L in m.net.layers:
        L["attn_q_norm"] = L["attn_k_norm"] = None
    moved(m, "tiny-qwen3moe-F32")


# ---- fused attn_qkv ------------------------------------------------------------------------------
def rewrite(src, dst, arch=None, edit=None):
    """A copy of a GGUF with another architecture name and/or tensors changed by ``edit(dict)``."""
    f = GGUFFile(src)
    w = GGUFWriter()
    old = f.architecture
    for k, v in f.metadata.items():
        if arch and k.startswith(old + "."):
            w.add(arch + k[len(old):], v, f.value_types[k])
        elif arch and k == "general.architecture":
            w.add(k, arch)
        else:
            w.add(k, v, f.value_types[k])
    tensors = {ti.name: (np.array(f.raw(ti.name)), ti.type, ti.shape) for ti in f}
    if edit:
        edit(tensors)
    for n, (raw, t, shape) in tensors.items():
        w.add_tensor(n, raw, t, shape)
    w.write(dst)
    return dst


def split_qkv(tensors):
    """attn_qkv [Q; K; V] rows written as separate attn_q/k/v tensors."""
    for n in [n for n in tensors if n.endswith("attn_qkv.weight")]:
        raw, t, (cols, rows) = tensors.pop(n)
        per_row = raw.nbytes // rows
        hkv = (rows - cols) // 2  # these fixtures have n_q == n_embd == cols
        parts = {"attn_q": cols, "attn_k": hkv, "attn_v": hkv}
        at = 0
        for name, r in parts.items():
            tensors[n.replace("attn_qkv", name)] = (raw[at * per_row:(at + r) * per_row], t, (cols, r))
            at += r


@pytest.mark.parametrize("key", ["tiny-llama-qkv-Q8_0", "tiny-phi3-F32"])
def test_fused_qkv_equals_separate_qkv(tmp_path, key):
    src = ARCHS / MANIFEST["models"][key]["file"]
    sep = ggtorch.load(rewrite(src, str(tmp_path / "sep.gguf"), edit=split_qkv), fast=False)
    assert "attn_qkv" not in sep.net.layers[0] and sep.net.layers[0]["attn_q"] is not None
    a, b = get(key).logits(PROMPT), sep.logits(PROMPT)
    assert torch.allclose(a, b, atol=1e-5)


def swap_kv_rows(tensors):
    """attn_qkv with its K and V row blocks exchanged: what a reader splitting [Q; V; K] would see."""
    for n in [n for n in tensors if n.endswith("attn_qkv.weight")]:
        raw, t, (cols, rows) = tensors[n]
        per_row, hkv = raw.nbytes // rows, (rows - cols) // 2
        q, k, v = np.split(raw, [cols * per_row, (cols + hkv) * per_row])
        tensors[n] = (np.concatenate([q, v, k]), t, (cols, rows))


@pytest.mark.parametrize("key", ["tiny-llama-qkv-F32", "tiny-phi3-F32"])
def test_fused_qkv_row_order_matters(tmp_path, key):
    m = ggtorch.load(rewrite(ARCHS / MANIFEST["models"][key]["file"], str(tmp_path / "x.gguf"), edit=swap_kv_rows),
                     fast=False)
    moved(m, key)


# ---- loading -------------------------------------------------------------------------------------
def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    bad = rewrite(ARCHS / "tiny-llama-qkv-F32.gguf", str(tmp_path / "bad.gguf"), arch="mamba9")
    with pytest.raises(ggtorch.GGTorchError) as e:
        ggtorch.load(bad)
    msg = str(e.value)
    assert "'mamba9'" in msg and "gpt-oss" in msg and "qwen3moe" in msg and "\n" not in msg


def test_wrong_expert_count_in_metadata_is_a_clear_error(tmp_path):
    src = ARCHS / "tiny-qwen3moe-F32.gguf"
    f = GGUFFile(src)
    w = GGUFWriter()
    for k, v in f.metadata.items():
        w.add(k, 8 if k == "qwen3moe.expert_count" else v, f.value_types[k])
    for ti in f:
        w.add_tensor(ti.name, np.array(f.raw(ti.name)), ti.type, ti.shape)
    w.write(tmp_path / "x.gguf")
    with pytest.raises(ggtorch.GGTorchError, match="expert"):
        ggtorch.load(str(tmp_path / "x.gguf"))


# ---- experts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
def test_decode_token_touches_only_its_experts(fast, monkeypatch):
    """The PyTorch expert-by-expert path (model/moe.py; moe.cpp's experts: tests/test_moe_step.py)."""
    m = ggtorch.load(str(ARCHS / "tiny-qwen3moe-Q4_K.gguf"), fast=fast)
    net = m.net
    from ggtorch.model import fastpath
    from ggtorch.model import moe as moe_mod

    monkeypatch.setattr(moe_mod, "expert_ffn", lambda *a, **k: None)
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)
    cache = net.new_cache(32)
    net.forward(PROMPT, cache)
    touched = []

    real = moe_mod.qmatmul

    def spy(x, w):
        touched.append(getattr(w, "name", None) or id(w))
        return real(x, w)

    net.expert_log = []
    moe_mod.qmatmul = spy
    try:
        net.forward([PROMPT[-1]], cache)
    finally:
        moe_mod.qmatmul = real
    routed = {il: set(e.reshape(-1).tolist()) for il, e in net.expert_log}
    fused = {id(f): (il, e) for il, L in enumerate(net.layers) for e, f in (L.get("ffn_gate_up_exps") or {}).items()}
    used = set()
    for t in touched:
        if t in fused:
            used.add(fused[t])
        elif isinstance(t, str) and "_exps" in t:
            il, e = int(t.split(".")[1]), int(t.split("[")[1].rstrip("]"))
            used.add((il, e))
    assert len(routed) == net.cfg.n_layer and used == {(il, e) for il, es in routed.items() for e in es}
    assert all(len(es) == net.cfg.n_expert_used for es in routed.values())  # fewer than the 4 experts


# ---- gpt-4o and tekken pre-tokenizers ------------------------------------------------------------
TOKENIZE = json.loads((ARCHS / "tokenize.json").read_text())


@pytest.mark.parametrize("fname", sorted(TOKENIZE))
def test_tokenize_json_exactly_as_llama_cpp(fname):
    from ggtorch.tokenizer import Tokenizer

    tok = Tokenizer(GGUFFile(ARCHS / fname).metadata)
    assert tok.pre in ("gpt-4o", "tekken")
    bad = [(it["text"], it["ids"], tok.tokenize(it["text"])) for it in TOKENIZE[fname] if tok.tokenize(it["text"]) != it["ids"]]
    assert not bad, bad[:3]


@pytest.mark.parametrize("fname,other", [("tiny-bpe-gpt-4o.gguf", "llama-bpe"), ("tiny-bpe-tekken.gguf", "qwen2")])
def test_pre_tokenizer_choice_matters(fname, other):
    """The check can fail: the nearest other pre-tokenizer gives other ids on some texts."""
    from ggtorch.tokenizer import Tokenizer

    meta = dict(GGUFFile(ARCHS / fname).metadata)
    meta["tokenizer.ggml.pre"] = other
    tok = Tokenizer(meta)
    assert sum(tok.tokenize(it["text"]) != it["ids"] for it in TOKENIZE[fname]) >= 3


# ---- traces use llama.cpp's MoE callback names; diff works across quantizations -------------------
def moe_trace(path):
    from ggtorch.debug.trace import record

    return record(ggtorch.load(str(path), fast=False).net, PROMPT)


def test_moe_trace_names_and_diff_against_requantized_copy(tmp_path):
    from ggtorch.debug.diff import diff

    f32 = moe_trace(ARCHS / "tiny-qwen3moe-F32.gguf")
    for n in ("ffn_moe_logits-1", "ffn_moe_probs-1", "ffn_moe_topk-1", "ffn_moe_weights-1",
              "ffn_moe_weights_norm-1", "ffn_moe_gate-1", "ffn_moe_up-1", "ffn_moe_down-1", "ffn_moe_out-1"):
        assert n in f32.tensors
    T, k = len(PROMPT), 2
    assert list(f32.tensors["ffn_moe_probs-0"].shape) == [T, 4]
    assert list(f32.tensors["ffn_moe_down-0"].shape) == [T, k, 256]
    assert torch.allclose(f32.tensors["ffn_moe_weights_norm-0"].sum(-1), torch.ones(T))
    r = diff(moe_trace(ARCHS / "tiny-qwen3moe-Q8_0.gguf"), f32)  # llama.cpp's requantized copy
    assert r.ok, r.first_divergence
    assert {"ffn_moe_out-0", "ffn_moe_weights-1"} <= {x.name for x in r.rows}

    def bad_router(t):  # layer 1's router rows in another order: the first wrong tensor is its logits
        raw, ty, shape = t["blk.1.ffn_gate_inp.weight"]
        t["blk.1.ffn_gate_inp.weight"] = (np.ascontiguousarray(raw.view(np.float32).reshape(4, -1)[::-1]).view(np.uint8).reshape(-1), ty, shape)

    bad = rewrite(ARCHS / "tiny-qwen3moe-F32.gguf", str(tmp_path / "bad.gguf"), edit=bad_router)
    assert diff(moe_trace(bad), f32).first_divergence == "ffn_moe_logits-1"


def test_cli_diff_moe_file_against_requantized_copy(capsys):
    from ggtorch.cli import main

    rc = main(["diff", str(ARCHS / "tiny-llama-moe-Q8_0.gguf"), str(ARCHS / "tiny-llama-moe-F32.gguf"),
               "--tokens", ",".join(map(str, PROMPT)), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and any(t["tensor"] == "ffn_moe_out-1" for t in out["tensors"])


# ---- inspect and check know the architectures ------------------------------------------------------
def test_inspect_shows_how_the_architecture_runs(capsys):
    from ggtorch.cli import main

    assert main(["inspect", str(ARCHS / "tiny-gpt-oss-MXFP4.gguf"), "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["experts"] == {"count": 4, "used": 2, "width": 64, "gating": "softmax_weight", "renormalize": False}
    assert model["sliding_window"] == 8 and model["swa_layers"] == [0] and model["rope_scaling"] == "yarn"
    assert main(["inspect", str(ARCHS / "tiny-gemma2-F32.gguf")]) == 0
    out = capsys.readouterr().out
    assert "attn_softcap = 8.0" in out and "final_softcap = 6.0" in out


def test_check_validates_moe_hyper_parameters(tmp_path):
    from ggtorch.debug.check import check

    ok = check(str(ARCHS / "tiny-qwen3moe-Q4_K.gguf"), compare=False)
    assert ok["ok"] and any("2 of 4 experts" in n for n in ok["notes"])
    f = GGUFFile(ARCHS / "tiny-qwen3moe-Q4_K.gguf")
    w = GGUFWriter()
    for k, v in f.metadata.items():
        w.add(k, 3 if k == "qwen3moe.expert_count" else v, f.value_types[k])
    for ti in f:
        w.add_tensor(ti.name, np.array(f.raw(ti.name)), ti.type, ti.shape)
    w.write(tmp_path / "x.gguf")
    bad = check(str(tmp_path / "x.gguf"), compare=False)
    assert not bad["ok"] and any("ffn_gate_inp.weight routes to 4 experts; expert_count is 3" in p for p in bad["problems"])


@pytest.mark.parametrize("key", ["tiny-qwen3moe-Q4_K", "tiny-gpt-oss-F32"])
def test_moe_trace_lines_up_with_llama_cpp(key):
    """Every MoE tensor name and shape matches llama.cpp's eval callback (needs llama-cpp-python)."""
    pytest.importorskip("llama_cpp")
    from ggtorch.debug.diff import diff
    from ggtorch.debug.llamacpp import capture

    path = str(ARCHS / MANIFEST["models"][key]["file"])
    ours = moe_trace(path)
    r = diff(ours, capture(path, PROMPT, set(ours.names)))
    moe_rows = [x for x in r.rows if x.name.startswith("ffn_moe_")]
    assert r.ok, r.first_divergence
    assert {"ffn_moe_logits-1", "ffn_moe_probs-1", "ffn_moe_weights-1", "ffn_moe_gate-1", "ffn_moe_down-1",
            "ffn_moe_out-1"} <= {x.name for x in moe_rows}


def test_gemma2_softcap_defaults_apply_when_keys_are_absent(tmp_path):
    """llama.cpp's defaults (50 / 30) when the file has no softcap keys: the logits move."""
    src = GGUFFile(ARCHS / "tiny-gemma2-F32.gguf")
    w = GGUFWriter()
    for k, v in src.metadata.items():
        if not k.endswith("_softcapping"):
            w.add(k, v, src.value_types[k])
    for ti in src:
        w.add_tensor(ti.name, np.array(src.raw(ti.name)), ti.type, ti.shape)
    w.write(tmp_path / "g.gguf")
    m = ggtorch.load(str(tmp_path / "g.gguf"), fast=False)
    assert (m.cfg.attn_softcap, m.cfg.final_softcap) == (50.0, 30.0)
    moved(m, "tiny-gemma2-F32")
