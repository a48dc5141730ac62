"""MXFP4 in the JIT kernel (quant/types/mxfp4.py): the e8m0 scales are kept exactly (every exponent byte,
the subnormal ones included, which float16 could not hold), the repacked form gives back the dequantized
weights, the library's repack writes the PyTorch reference's bytes, and the kernel equals the
dequantize-then-multiply product with llama.cpp's Q8_0 activation rounding (ggml_vec_dot_mxfp4_q8_0)."""
import numpy as np
import pytest
import torch

import ggtorch
from conftest import FIXTURES
from ggtorch.gguf.types import ggml_type
from ggtorch.model.numerics import ggml_matmul
from ggtorch.quant import jit
from ggtorch.quant.dequant import deq_mxfp4
from ggtorch.quant.linear import QWeight
from ggtorch.quant.qdot import _qdot_pack, _qdot_pack_jit, qdot_kernel, qdot_linear, qdot_unpack
from ggtorch.quant.types import E8M0, LUT_MXFP4, TYPES
from ggtorch.quant.types.mxfp4 import e8m0_byte, e8m0_scale

FIXTURE = FIXTURES / "archs" / "tiny-gpt-oss-MXFP4.gguf"
MX = ggml_type("MXFP4")


def need_jit():
    if not jit.available():
        pytest.skip(f"JIT kernel unavailable: {jit.why()}")


def weight(raw: np.ndarray, rows: int, K: int) -> QWeight:
    return QWeight(torch.from_numpy(np.ascontiguousarray(raw).reshape(-1)), MX, (K, rows), "mxfp4")


def random_weight(rows: int, K: int, seed: int, lo: int = 112, hi: int = 132) -> QWeight:
    """Random blocks: random indices, exponent bytes in [lo, hi) (scales 2^-16 .. 2^3 by default)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * K // 32, 17), dtype=np.uint8)
    raw[:, 0] = rng.integers(lo, hi, raw.shape[0])
    return weight(raw, rows, K)


def state_equal(a: dict, b: dict) -> bool:
    def u8(t):
        return t.view(torch.uint8) if t.dtype == torch.float16 else t

    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(u8(a[k]), u8(b[k])) for k in a)


def test_every_exponent_byte_is_kept_exactly():
    """e8m0 -> float32 is ggml's dequantizer's bit for bit and e8m0_byte inverts it for all 256 bytes; the
    range is beyond float16 (why the layout keeps the byte), and the spec says so."""
    e = torch.arange(256, dtype=torch.uint8)
    s = e8m0_scale(e)
    blocks = torch.zeros(256, 17, dtype=torch.uint8)
    blocks[:, 0] = e
    blocks[:, 1] = 1  # index 1: kvalues_mxfp4[1] = 1, so the value is the scale itself
    assert torch.equal(deq_mxfp4(blocks)[:, 0], s)
    assert torch.equal(s.double(), torch.pow(2.0, e.double() - 128))
    assert torch.equal(e8m0_byte(s), e)
    assert not torch.equal(s.half().float(), s)  # float16 would lose the small and the large ones
    spec = TYPES["MXFP4"]
    assert spec.flags & E8M0 and spec.flags & LUT_MXFP4 and spec.zoff == -12.0 and spec.G == 32
    with pytest.raises(ValueError):
        e8m0_byte(torch.tensor([0.75]))


def test_repacked_form_gives_back_the_weights():
    """Unpacking the PyTorch reference's state gives the dequantized weights exactly: the fixture's expert
    matrices and random blocks with every exponent byte up to 251 (beyond it the unpacked form's
    (k + 12) * 2^(e - 128) overflows float32 before the offset comes off) and a partial tile."""
    m = ggtorch.load(str(FIXTURE), fast=False)
    ws = [w for w in m.net.weights().values() if w.type.name == "MXFP4"]
    assert len(ws) >= 6
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=(37 * 512 // 32, 17), dtype=np.uint8)
    raw[:, 0] = np.arange(raw.shape[0]) % 252
    ws += [weight(raw, 37, 512), random_weight(16, 256, 3)]
    for w in ws:
        st = _qdot_pack(w, jit=False)
        assert st["dw"].dtype == torch.uint8 and int(st["flags"]) == TYPES["MXFP4"].flags
        assert torch.equal(qdot_unpack(st, w.in_features)[:w.out_features], w.dequantize()), w.name


def test_library_repack_equals_the_pytorch_repack():
    need_jit()
    m = ggtorch.load(str(FIXTURE), fast=False)
    full = next(w for w in m.net.weights().values() if w.type.name == "MXFP4")
    for w in (full, QWeight(full.raw[:37], MX, (full.in_features, 37), "part"),
              random_weight(40, 768, 2, 0, 256)):
        a, b = _qdot_pack_jit(w), _qdot_pack(w, jit=False)
        assert a is not None and state_equal(a, b), w.name


def test_kernel_equals_llama_cpp_arithmetic():
    """x @ W.T through the kernel (vectorized and portable loops) equals the float64 product of the
    dequantized weights with Q8_0-rounded activations (ggml_matmul) up to float32 summation, on every
    tile shape."""
    need_jit()
    g = torch.Generator().manual_seed(0)
    for i, (M, N, K) in enumerate(((1, 48, 512), (2, 37, 256), (3, 16, 768), (4, 20, 256), (5, 64, 512),
                                   (6, 16, 256), (7, 33, 256), (8, 32, 1024), (11, 40, 512), (17, 16, 2880))):
        w = random_weight(N, K, 10 + i)
        w.state = _qdot_pack(w)
        x = torch.randn(M, K, generator=g)
        if M > 1:
            x[0, :] = 2.0
        ref = ggml_matmul(x, w)
        scale = ref.abs().max().item()
        st = w.state
        y = qdot_linear(w)(x)
        y_ref = jit.matmul(x, st["qw"], st["dw"], st.get("mw"), float(st["zoff"]), ref=True, mode=int(st["amode"]),
                           n=N, flags=int(st["flags"]))
        assert y.shape == (M, N)
        assert (y.double() - ref).abs().max().item() <= 2e-6 * scale, (M, N, K)
        assert (y_ref.double() - ref).abs().max().item() <= 2e-6 * scale, (M, N, K)
        plain = x[-1:].double() @ w.dequantize().double().T  # the activations really are rounded
        assert (plain - ref[-1:]).abs().max().item() > 1e-4 * scale


def test_kernel_scales_are_exact_down_to_the_subnormal_exponents():
    """One 32-value group per row, row r with exponent byte r (0..239: 2^-128 .. 2^111), activations
    q / 128 with integers q (Q8_0 gives back q with scale 2^-7 exactly): every product is then a
    power-of-two multiple of an integer and both kernel loops must give it exactly, where a float16 scale
    would flush the first 104 rows to zero."""
    need_jit()
    rng = np.random.default_rng(9)
    N = 240
    raw = rng.integers(0, 256, size=(N, 17), dtype=np.uint8)
    raw[:, 0] = np.arange(N)
    w = weight(raw, N, 32)
    q = torch.from_numpy(rng.integers(-127, 128, size=(3, 32))).double()
    q[:, 5] = 127  # each activation row's maximum: amax 127/128, so the Q8_0 scale is 2^-7
    x = (q / 128).float()
    want = (q @ w.dequantize().double().T) / 128  # exact in float64 (and representable in float32)
    assert (want != 0).all()
    st = _qdot_pack(w)
    w.state = st
    got = qdot_linear(w)(x).double()
    got_ref = jit.matmul(x, st["qw"], st["dw"], None, float(st["zoff"]), ref=True, mode=0, n=N,
                         flags=int(st["flags"])).double()
    assert torch.equal(got, want) and torch.equal(got_ref, want)


def test_fast_load_gives_the_experts_the_kernel():
    """The default (fast) load of the MXFP4 fixture repacks its expert matrices for the JIT kernel."""
    need_jit()
    net = ggtorch.load(str(FIXTURE), cache=False).net
    exps = [w for n, w in net.weights().items() if "_exps" in n and w.type.name == "MXFP4"]
    assert exps and all(w.kernel is qdot_kernel for w in exps if w.kernel is not None)
    for L in net.layers:
        fused = L.get("ffn_gate_up_exps") or {}
        assert len(fused) == net.cfg.n_expert and all(f.kernel is qdot_kernel for f in fused.values())
