"""Every type dequantizes bit for bit like gguf-py (the oracle), on random and crafted blocks and on
every tensor of every fixture file and both real models."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from conftest import tiny_files
from ggtorch.gguf.reader import GGUFFile
from ggtorch.gguf.types import TYPES, type_by_id
from ggtorch.packaged import resolve
from ggtorch.quant.dequant import DEQUANTIZERS, dequantize

ORACLE_TYPES = [t for t in TYPES if t not in ("Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64", "Q1_0")]


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray, what: str):
    ours, ref = ours.reshape(-1), ref.reshape(-1).astype(np.float32)
    assert ours.shape == ref.shape, what
    both_nan = np.isnan(ours) & np.isnan(ref)
    diff = (ours.view(np.uint32) != ref.view(np.uint32)) & ~both_nan
    assert not diff.any(), f"{what}: {diff.sum()} values differ, first at {np.argmax(diff)}: " \
                           f"{ours[diff][:3]} vs {ref[diff][:3]}"


def test_registry_matches_gguf_py():
    for q, (bs, ts) in GGML_QUANT_SIZES.items():
        t = TYPES.get(q.name)
        assert t is not None, q.name
        assert (t.id, t.block_size) == (q.value, bs)
        if q.name == "Q8_1":
            # gguf-py lists 40 bytes; ggml's block_q8_1 is {half d, half s, int8 qs[32]} = 36 (ggml-common.h)
            assert t.type_size == 36
        else:
            assert t.type_size == ts, q.name


@pytest.mark.parametrize("name", ORACLE_TYPES)
def test_random_blocks(name):
    t = TYPES[name]
    rng = np.random.default_rng(t.id)
    raw = rng.integers(0, 256, size=(257, t.type_size), dtype=np.uint8)
    ref = quants.dequantize(raw, GGMLQuantizationType[name])
    assert_bits_equal(dequantize(raw.reshape(-1), t).numpy(), ref, name)


F16_SCALES = np.array([0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x8001, 0x3C00, 0x0000], np.uint16)


@pytest.mark.parametrize("name", [n for n in ORACLE_TYPES if TYPES[n].quantized])
def test_extreme_scales(name):
    """Subnormal, largest, infinite, NaN and zero fp16 scales at every 2-byte position of the block."""
    t = TYPES[name]
    rng = np.random.default_rng(99)
    blocks = []
    for pos in range(0, t.type_size - 1, 2):
        for s in F16_SCALES:
            b = rng.integers(0, 256, size=t.type_size, dtype=np.uint8)
            b[pos:pos + 2] = np.frombuffer(np.uint16(s).tobytes(), np.uint8)
            blocks.append(b)
    raw = np.stack(blocks)
    with np.errstate(all="ignore"):
        ref = quants.dequantize(raw, GGMLQuantizationType[name])
    assert_bits_equal(dequantize(raw.reshape(-1), t).numpy(), ref, name)


def _check_file(path):
    with GGUFFile(path) as f:
        for ti in f:
            raw = f.raw(ti.name)
            ours = dequantize(raw, ti.type, ti.shape).numpy()
            assert ours.shape == ti.numpy_shape
            ref = quants.dequantize(raw.reshape(ti.numpy_shape[:-1] + (-1,)), GGMLQuantizationType(ti.type_id))
            assert_bits_equal(ours, ref, f"{path.name}:{ti.name}")


@pytest.mark.parametrize("path", tiny_files(), ids=lambda p: p.name)
def test_fixture_tensors(path):
    _check_file(path)


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_real_model_tensors(model):
    from pathlib import Path

    _check_file(Path(resolve(model)))


def test_hand_built_q8_1_q8_k_and_plain_types():
    # Q8_1: d=0.5 (fp16 0x3800), s ignored, qs = -16..15
    q = np.arange(-16, 16, dtype=np.int8)
    blk = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8),
                          np.frombuffer(np.float16(123.0).tobytes(), np.uint8), q.view(np.uint8)])
    assert np.array_equal(dequantize(blk, "Q8_1").numpy(), q.astype(np.float32) * 0.5)
    # Q8_K: f32 d = 0.25, 256 int8, 16 int16 sums
    q = (np.arange(256) - 128).astype(np.int8)
    blk = np.concatenate([np.frombuffer(np.float32(0.25).tobytes(), np.uint8), q.view(np.uint8),
                          np.zeros(32, np.uint8)])
    assert np.array_equal(dequantize(blk, "Q8_K").numpy(), q.astype(np.float32) * 0.25)
    for name, dt in (("I8", np.int8), ("I16", np.int16), ("I32", np.int32), ("I64", np.int64), ("F64", np.float64)):
        v = np.array([-3, 0, 7, 100], dtype=dt)
        assert np.array_equal(dequantize(v.view(np.uint8), name).numpy(), v.astype(np.float32)), name


def test_every_listed_type_has_a_dequantizer():
    wanted = ("F32 F16 BF16 F64 I8 I16 I32 I64 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ1_S "
              "IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS TQ1_0 TQ2_0 MXFP4").split()
    assert set(wanted) <= set(DEQUANTIZERS)


def test_q6_k_interleaved_layout():
    """Q6_K's low nibbles of ql[l] and ql[l+32] and the 2-bit fields of qh[l] feed outputs l, l+32, l+64, l+96."""
    blk = np.zeros(210, np.uint8)
    blk[0] = 0x21  # ql[0]: low nibble 1 -> out 0, high nibble 2 -> out 64
    blk[32] = 0x43  # ql[32]: low 3 -> out 32, high 4 -> out 96
    blk[192:208] = 1  # all scales 1
    blk[208:210] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    out = dequantize(blk, "Q6_K").numpy() + 32  # q - 32
    assert out[0] == 1 and out[32] == 3 and out[64] == 2 and out[96] == 4
