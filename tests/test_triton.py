"""The Triton kernels (ggtorch.quant.triton) on CPU tensors, in Triton's interpreter: the weights they
dequantize equal ggtorch's float32 dequantizer bit for bit, their products equal dequantize-then-matmul,
and tiny fixture models run through them give llama.cpp's logits within the fixtures' bounds.
The same kernels compile for a GPU (benchmarks/gpu_check.sh runs them there)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on CPU tensors

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (it comes with the dev extra)")

from conftest import TINY, tiny_manifest  # noqa: E402
import ggtorch  # noqa: E402
from ggtorch.gguf.types import ggml_type  # noqa: E402
from ggtorch.quant import triton as qt  # noqa: E402
from ggtorch.quant.linear import QWeight, dequant_matmul  # noqa: E402

TYPES = sorted(qt.LAYOUTS)
# byte offsets of each type's fp16 scales: set to moderate values (random bytes make inf/NaN scales,
# whose products test nothing but NaN propagation)
F16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


@pytest.fixture(scope="module", autouse=True)
def triton_on_cpu():
    qt.enable_on_cpu()
    yield
    qt.enable_on_cpu(False)  # other test modules keep their CPU kernels


def random_weight(name: str, n: int, k: int, seed: int = 0) -> QWeight:
    t = ggml_type(name)
    rng = np.random.default_rng(seed)
    nb = n * k // t.block_size
    raw = rng.integers(0, 256, size=(nb, t.type_size), dtype=np.uint8)
    for at in F16_AT[name]:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, size=(nb, 1)).astype(np.float16).view(np.uint8)
    return QWeight(torch.from_numpy(raw.reshape(-1)), t, (k, n), name)


def test_every_type_has_a_layout():
    assert set(TYPES) == set(F16_AT)


MATVEC_TILES = ((16, 64), (32, 128), (8, 256))  # (BN, BK): N = 37 and K = 96 split unevenly
TILED_TILES = ((16, 16, 64), (32, 64, 32), (16, 32, 128))  # (BM, BN, BK)


def close(y, x, ref_w):
    """fp32 products summed in another order: within a few ulps of sum |x·w|."""
    bound = 1e-5 * float((x.reshape(-1, x.shape[-1]).abs() @ ref_w.abs().T).max())
    assert (y.reshape(-1, ref_w.shape[0]) - x.reshape(-1, x.shape[-1]) @ ref_w.T).abs().max() <= bound


@pytest.mark.parametrize("name", TYPES)
def test_kernels_match_dequantize_then_matmul(name):
    from ggtorch.quant.triton.kernels import dequantize, linear

    i = TYPES.index(name) % 3
    bs = ggml_type(name).block_size
    n, k = 37, (3 * bs if bs == 32 else 2 * bs)  # odd row count; K = 96 or 512
    w = random_weight(name, n, k, seed=len(name))
    ref_w = w.dequantize()
    assert qt.install(w) and w.kernel is qt.triton_kernel
    # the weights the kernels multiply are ggml's, bit for bit
    assert torch.equal(dequantize(w.state, w.tparams, n, "cpu"), ref_w)
    g = torch.Generator().manual_seed(1)
    # matrix-vector kernel: one row with small tiles; 5 rows (padded to 8) through qmatmul's entry point
    x = torch.randn(1, k, generator=g)
    close(linear(x, w.state, w.tparams, n, tiles=MATVEC_TILES[i]), x, ref_w)
    x = torch.randn(5, 1, k, generator=g)
    y = qt.triton_kernel(x, w)
    assert y.shape == (5, 1, n)
    close(y, x, ref_w)
    # tiled (tl.dot) kernel: a prefill-sized row count, activations and weights rounded to fp16
    x = torch.randn(19, k, generator=g)
    y = linear(x, w.state, w.tparams, n, tiles=TILED_TILES[i])
    ref = x @ ref_w.T
    assert (y - ref).abs().max() <= 2e-3 * ref.abs().max()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q5_1"])
def test_decode_kernel_of_cuda_matches(name):
    """_matvec and _matvec_pairs (4-bit layouts), the autotuned decode kernels CUDA uses (1-8 rows),
    with fixed tiles here: rows and K not multiples of the tile, weight planes that differ per type."""
    from ggtorch.quant.triton import kernels as K

    bs = ggml_type(name).block_size
    n, k = 37, (3 * bs if bs == 32 else 2 * bs)
    w = random_weight(name, n, k, seed=3)
    ref_w = w.dequantize()
    qt.install(w)
    lo = w.state["lo"]
    args = [lo, w.state.get("hi", lo), w.state["d"], w.state.get("sc", lo), w.state.get("m", lo),
            w.state.get("mn", lo), K._table("cpu") if w.tparams.TABLE else w.state["d"]]
    p = w.tparams
    consts = dict(LO_BITS=p.LO_BITS, HI_BITS=p.HI_BITS, OFF=p.OFF, SB=p.SB, G=p.G, HAS_SC=p.HAS_SC, HAS_M=p.HAS_M,
                  HAS_MN=p.HAS_MN, MIN_SUB=p.MIN_SUB, TABLE=p.TABLE)
    g = torch.Generator().manual_seed(2)
    kernels = [K._matvec] + ([K._matvec_pairs] if p.LO_BITS == 4 and p.HI_BITS == 0 else [])
    for kern in kernels:
        for m, (bn, bk) in ((1, (4, 64)), (1, (1, 1024)), (3, (2, 128)), (8, (8, 64))):
            x = torch.randn(m, k, generator=g)
            y = torch.empty(m, n)
            kern[(-(-n // bn),)](x, y, m, n, k, *args, BM=max(1, 1 << (m - 1).bit_length()), BN=bn, BK=bk, **consts)
            close(y, x, ref_w)


def test_a_wrong_layout_is_caught():
    """The comparison above can fail: Q4_K read with Q4_0's constants gives other weights."""
    from ggtorch.quant.triton.kernels import dequantize

    w = random_weight("Q4_K", 16, 256)
    qt.install(w)
    assert not torch.equal(dequantize(w.state, qt.LAYOUTS["Q4_0"], 16, "cpu")[:, :256], w.dequantize())


MANIFEST = tiny_manifest()
PROMPT = MANIFEST["prompt_ids"]
FIXTURE_MODELS = ["tiny-llama-Q4_0", "tiny-llama-Q4_K", "tiny-llama-Q8_0", "tiny-llama-IQ4_NL"]


@pytest.mark.parametrize("key", FIXTURE_MODELS)
def test_fixture_logits_through_triton(key):
    path = str(TINY / MANIFEST["models"][key]["file"])
    m = ggtorch.load(path, cache=False)  # fast mode: model.repack hands the weights to the Triton kernels
    quantized = [w for w in m.net.weights().values() if w.type.name in qt.LAYOUTS]
    assert quantized and all(w.kernel is qt.triton_kernel for w in quantized if w.state)
    assert m.net.layers[0].get("attn_qkv") is not None  # Q/K/V fused into one Triton matrix
    ref = np.load(TINY / f"{key}.logits.npy")
    cache = m.net.new_cache(32)
    lg = m.net.forward(PROMPT[:-1], cache, all_logits=True)  # 15 rows: the tiled kernel
    last = m.net.forward(PROMPT[-1:], cache, all_logits=True)  # 1 row: the matrix-vector kernel
    got = torch.cat((lg, last)).numpy()
    err = np.abs(got - ref).max() / ref.std()
    assert err <= 0.15, f"{key}: max logit error {err:.4f} sigma"  # test_tiny_models.py's bound
    # and close to the float32 exact path on the same machine
    ex = ggtorch.load(path, fast=False, cache=False).logits(PROMPT).numpy()
    assert np.abs(got - ex).max() / ex.std() <= 0.05
    assert int(np.argmax(got[-1])) == int(np.argmax(ex[-1]))


def test_exact_path_stays_the_reference():
    """--exact (fast=False) never takes the Triton kernels, even when they are enabled."""
    m = ggtorch.load(str(TINY / "tiny-llama-Q4_0.gguf"), fast=False, cache=False)
    assert all(w.kernel is None for w in m.net.weights().values())


def test_cpu_weights_keep_their_kernels_when_not_enabled():
    qt.enable_on_cpu(False)
    try:
        assert not qt.wanted("cpu") and qt.wanted("cuda")
        m = ggtorch.load(str(TINY / "tiny-llama-Q4_0.gguf"), cache=False)
        assert not any(w.kernel is qt.triton_kernel for w in m.net.weights().values())
    finally:
        qt.enable_on_cpu()


def test_dequant_matmul_is_untouched():
    w = random_weight("Q8_0", 8, 64)
    x = torch.randn(2, 64)
    torch.testing.assert_close(dequant_matmul(x, w), x @ w.dequantize().T)


class _Experts:
    """The parts of model.moe.Experts the MoE paths read."""

    def __init__(self, ws):
        self.w, self.n_out = ws, ws[0].out_features

    def __len__(self):
        return len(self.w)

    def __bool__(self):
        return True

    def __getitem__(self, e):
        return self.w[e]


@pytest.mark.parametrize("T", [1, 11])  # a decode token (blocks of 1 row), a prefill (16-row tl.dot blocks)
def test_grouped_moe_matches_per_expert_path(T):
    """quant/triton/grouped.py (rows sorted by expert, one launch per projection) against model.moe's
    expert-by-expert loop on the float32 exact path."""
    from ggtorch.model.moe import moe_ffn, silu_glu
    from ggtorch.quant.triton import grouped

    E, k, n_embd, n_ff = 5, 3, 256, 96
    mk = lambda name, n, kk, s: _Experts([random_weight(name, n, kk, seed=s + e) for e in range(E)])  # noqa: E731
    up, gate, down = mk("Q4_K", n_ff, n_embd, 10), mk("Q6_K", n_ff, n_embd, 20), mk("Q8_0", n_embd, n_ff, 30)
    g = torch.Generator().manual_seed(T)
    x = 0.01 * torch.randn(T, n_embd, generator=g)  # random blocks make large weights: keep fp16 in range
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    experts[0] = torch.tensor([4, 0, 2])  # an expert nobody else picks, and unsorted slots
    weights = torch.rand(T, k, generator=g)
    ref = moe_ffn(x, experts, weights, up, gate, down, silu_glu)
    for ex in (up, gate, down):
        for w in ex.w:
            qt.install(w)
        ex.grouped = grouped.stack(ex.w)
    got = moe_ffn(x, experts, weights, up, gate, down, silu_glu)  # the hook takes the grouped kernel
    tol = 1e-4 if T * k <= 16 else 3e-3  # fp32 products; fp16 tiles for prefill-sized groups
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    slots, bexp = grouped.plan(experts, E, 16)
    assert sorted(slots[slots >= 0].tolist()) == list(range(T * k))  # every (token, slot) row exactly once


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_device_cuda_without_cuda_is_one_line(device):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ggtorch", "run", str(TINY / "tiny-llama-Q4_0.gguf"), "--device", device,
                        "-p", "hi", "-n", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--device" in r.stderr
    with pytest.raises(ggtorch.GGTorchError):
        ggtorch.load(str(TINY / "tiny-llama-Q4_0.gguf"), device=device)
