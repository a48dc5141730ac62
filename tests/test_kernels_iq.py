"""The JIT kernel for the low-bit types (IQ4_NL, IQ4_XS, Q2_K, Q3_K, IQ3_S, and the grid i-quants IQ3_XXS,
IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): the repacked form gives back the
dequantized weights exactly, the library's repack writes the PyTorch reference's bytes, the kernel
equals the dequantize-then-multiply product with llama.cpp's activation rounding on every tile shape,
and the tiny fixture models keep their fidelity on the default (fast) path."""
import numpy as np
import pytest
import torch

from conftest import TINY, tiny_manifest
import ggtorch
from ggtorch.gguf.types import ggml_type
from ggtorch.model.numerics import ggml_matmul
from ggtorch.quant import jit
from ggtorch.quant.linear import QWeight
from ggtorch.quant.qdot import _qdot_pack, _qdot_pack_jit, qdot_kernel, qdot_linear, qdot_unpack
from ggtorch.quant.random import random_weight
from ggtorch.quant.types import TYPES

NEW = ["IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "IQ3_S"]
GRID = ["IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]  # no tiny fixture model of these (yet)
def need_jit():
    if not jit.available():
        pytest.skip(f"JIT kernel unavailable: {jit.why()}")


def state_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8)
                                                                                    if a[k].dtype == torch.float16
                                                                                    else a[k], b[k].view(torch.uint8)
                                                                                    if b[k].dtype == torch.float16
                                                                                    else b[k]) for k in a)


def tiny_file(t: str):
    """The tiny fixture model of type t, or None (the grid i-quants have none yet: llama.cpp quantizes them
    only with an importance matrix; their tests use random blocks, where every bit pattern occurs)."""
    f = TINY / f"tiny-llama-{t}.gguf"
    assert f.exists() or t in GRID, f"missing fixture {f}"
    return f if f.exists() else None


@pytest.mark.parametrize("t", NEW + GRID)
def test_repacked_form_gives_back_the_weights(t):
    """The layout keeps the file's bits: unpacking the PyTorch reference's state gives the dequantized
    weights exactly (tiny model's matrices and random blocks, padded tiles included)."""
    ws = []
    if tiny_file(t):
        m = ggtorch.load(str(tiny_file(t)), fast=False)
        ws = [w for w in m.net.weights().values() if w.type.name == t]
        assert ws, f"no {t} matrix in the tiny model"
    ws += [random_weight(t, 37, 512, 1), random_weight(t, 16, 256, 3)]
    for w in ws:
        st = _qdot_pack(w, jit=False)
        assert int(st["flags"]) == TYPES[t].flags and int(st["amode"]) == TYPES[t].amode
        assert torch.equal(qdot_unpack(st, w.in_features)[:w.out_features], w.dequantize()), w.name


@pytest.mark.parametrize("t", NEW + GRID)
def test_library_repack_equals_the_pytorch_repack(t):
    """csrc/repack.cpp writes the PyTorch reference's bytes, whole tiles and a partial one."""
    need_jit()
    if tiny_file(t):
        m = ggtorch.load(str(tiny_file(t)), fast=False)
        full = next(w for w in m.net.weights().values() if w.type.name == t)
    else:
        full = random_weight(t, 64, 512, 4)
    for w in (full, QWeight(full.raw[:37], full.type, (full.in_features, 37), "part"), random_weight(t, 40, 768, 2)):
        a, b = _qdot_pack_jit(w), _qdot_pack(w, jit=False)
        assert a is not None and state_equal(a, b), w.name


@pytest.mark.parametrize("t", NEW + GRID)
def test_kernel_equals_llama_cpp_arithmetic(t):
    """x @ W.T through the JIT kernel (vectorized and portable loops) equals the float64 product of the
    dequantized weights with the activations rounded as llama.cpp rounds them for this type (Q8_0 for
    IQ4_NL, Q8_K for the others: numerics.ggml_matmul), up to float32 summation, on every tile shape:
    1 to 8 activation rows (the kernel's row tiles), more than 8 (several), rows not a multiple of 16."""
    need_jit()
    g = torch.Generator().manual_seed(0)
    for i, (M, N, K) in enumerate(((1, 48, 512), (2, 37, 256), (3, 16, 768), (4, 20, 256), (5, 64, 512),
                                   (6, 16, 256), (7, 33, 256), (8, 32, 1024), (11, 40, 512), (17, 16, 256))):
        w = random_weight(t, N, K, 10 + i)
        w.state = _qdot_pack(w)
        x = torch.randn(M, K, generator=g)
        if M > 1:
            x[0, :] = 2.0  # a row whose every activation is the block maximum
        ref = ggml_matmul(x, w)
        scale = ref.abs().max().item()
        y = qdot_linear(w)(x)
        st = w.state
        y_ref = jit.matmul(x, st["qw"], st["dw"], st.get("mw"), float(st["zoff"]), ref=True, mode=int(st["amode"]),
                           n=N, sc=st.get("sc"), mn=st.get("mn"), flags=int(st["flags"]))
        assert y.shape == (M, N)
        assert (y.double() - ref).abs().max().item() <= 2e-6 * scale, (t, M, N, K)
        assert (y_ref.double() - ref).abs().max().item() <= 2e-6 * scale, (t, M, N, K)
        plain = x[-1:].double() @ w.dequantize().double().T  # the activations really are rounded as llama.cpp does
        assert (plain - ref[-1:]).abs().max().item() > 1e-4 * scale


GRID_LAYOUT = [t for t in NEW + GRID if TYPES[t].glayout]  # the types that keep their grid indices


@pytest.fixture(scope="module")
def no_vbmi_library(tmp_path_factory):
    need_jit()
    if not jit.library().qdot_has_vnni():
        pytest.skip("no AVX-512 VNNI here: the portable loops serve every CPU alike")
    return jit.variant(("-mno-avx512vbmi",), tmp_path_factory.mktemp("jit") / "qdot-no-vbmi.so")


@pytest.mark.parametrize("t", GRID_LAYOUT)
def test_grid_layout_without_vbmi_gives_the_same_products(t, no_vbmi_library, monkeypatch):
    """A CPU with AVX-512 VNNI but not VBMI (Cascade Lake) unpacks the grid layout with scalar table loads
    instead of byte permutes (csrc/tiles.h): the same products, bit for bit, for one activation row (a
    unit at a time) and several (the tile unpacked once)."""
    w = random_weight(t, 48, 512, 5)
    st = w.state = _qdot_pack(w)
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(1))

    def product(M):
        return jit.matmul(x[:M], st["qw"], st["dw"], st.get("mw"), float(st["zoff"]), mode=int(st["amode"]), n=48,
                          sc=st.get("sc"), mn=st.get("mn"), flags=int(st["flags"]))

    vbmi = [product(M) for M in (1, 6)]
    monkeypatch.setattr(jit, "_lib", no_vbmi_library)
    for y, z in zip(vbmi, [product(M) for M in (1, 6)]):
        assert torch.equal(y, z), t


def need_fixture(t: str):
    if tiny_file(t) is None:
        pytest.skip(f"no tiny-llama-{t} fixture in {TINY} (tools/make_tiny_iq_fixtures.py makes it with llama.cpp)")


@pytest.mark.parametrize("t", NEW + GRID)
def test_tiny_model_fidelity_on_the_default_path(t):
    """The default (fast) load gives the type's matrices the JIT kernel, and the tiny model still matches
    llama.cpp's logits and greedy tokens as tightly as the exact path is held to (test_tiny_models)."""
    need_jit()
    need_fixture(t)
    key = f"tiny-llama-{t}"
    man = tiny_manifest()
    m = ggtorch.load(str(TINY / f"{key}.gguf"), cache=False)
    for L in m.net.layers:  # Q/K/V, O, gate/up, down (fused parts hand their kernel to the fused matrix)
        kernels = [w.kernel for w in L.values() if getattr(w, "kernel", None) is not None]
        assert len(kernels) >= 4 and all(k is qdot_kernel for k in kernels)
    ref = np.load(TINY / f"{key}.logits.npy")
    lg = m.logits(man["prompt_ids"]).numpy()
    assert np.abs(lg - ref).max() / ref.std() <= 0.15
    e = man["models"][key]
    n = next((i for i, mg in enumerate(e["greedy_margins"]) if mg < 0.1), len(e["greedy"]))
    r = m.generate(man["prompt_ids"], max_tokens=len(e["greedy"]), ignore_eos=True)
    assert r.ids[:n] == e["greedy"][:n]


@pytest.mark.parametrize("t", ["IQ4_XS", "Q2_K", "IQ2_XXS", "IQ1_S"])
def test_one_call_step_takes_the_new_types(t, monkeypatch):
    """The new types use the same kernel entry point, so the one-call decode step takes them and equals
    the per-layer path bit for bit."""
    need_jit()
    need_fixture(t)
    from test_fastpath import SEQS, decode

    from ggtorch.model import fastpath

    net = ggtorch.load(str(TINY / f"tiny-llama-{t}.gguf"), cache=False).net
    assert fastpath.step_of(net) is not None
    got, _ = decode(net, SEQS[0] * 3, "f16", 4)
    monkeypatch.setattr(fastpath, "step_of", lambda model: None)
    want, _ = decode(net, SEQS[0] * 3, "f16", 4)
    assert torch.equal(got, want)
