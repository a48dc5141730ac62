"""Reader and writer: every metadata type, versions, alignment, splits, round trips, bad input."""
import filecmp
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, tiny_files
from ggtorch.errors import GGUFError, QuantError
from ggtorch.gguf.constants import ValueType
from ggtorch.gguf.reader import GGUFFile
from ggtorch.gguf.writer import GGUFWriter, copy_gguf
from ggtorch.quant.dequant import dequantize

SMALL = TINY / "tiny-llama-Q4_K.gguf"


def write(tmp_path, build, name="m.gguf", **kw):
    w = GGUFWriter(**kw)
    build(w)
    p = tmp_path / name
    w.write(p)
    return p


@pytest.mark.parametrize("path", tiny_files(), ids=lambda p: p.name)
def test_round_trip_is_byte_identical(path, tmp_path):
    with GGUFFile(path) as f:
        copy_gguf(f, tmp_path / "copy.gguf")
    assert filecmp.cmp(path, tmp_path / "copy.gguf", shallow=False)


def test_reads_metadata_and_tensor_index():
    with GGUFFile(SMALL) as f:
        assert f.version == 3 and f.alignment == 32 and f.architecture == "llama"
        assert f.arch_key("block_count") == 2 and f.value_types["llama.block_count"] == ValueType.UINT32
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 1024
        q = f.info("blk.0.attn_q.weight")
        assert q.shape == (256, 256) and q.type.name == "Q4_K" and q.numpy_shape == (256, 256)
        k = f.info("blk.0.attn_k.weight")
        assert k.shape == (256, 128) and k.numpy_shape == (128, 256)  # [in, out] -> 128 rows of 256
        assert f.raw("blk.0.attn_k.weight").nbytes == 128 * 144


def test_every_value_type_and_nested_arrays(tmp_path):
    vals = {
        "u8": (7, ValueType.UINT8), "i8": (-7, ValueType.INT8), "u16": (65535, ValueType.UINT16),
        "i16": (-300, ValueType.INT16), "u32": (4_000_000_000, ValueType.UINT32), "i32": (-5, ValueType.INT32),
        "f32": (1.5, ValueType.FLOAT32), "b": (True, ValueType.BOOL), "s": ("héllo ✓", ValueType.STRING),
        "u64": (2**63 + 5, ValueType.UINT64), "i64": (-(2**40), ValueType.INT64), "f64": (0.1, ValueType.FLOAT64),
        "arr_f": (np.array([1.0, 2.5], np.float32), None), "arr_s": (["a", "", "ü"], None),
        "nested": ([np.array([1, 2], np.int32), ["x", "y"], [np.array([3], np.uint8)]], None),
    }

    def build(w):
        w.add("general.architecture", "llama")
        for k, (v, t) in vals.items():
            w.add(k, v, t)
        w.add_tensor("t", np.arange(32, dtype=np.float32).reshape(2, 16))

    p = write(tmp_path, build)
    with GGUFFile(p) as f:
        for k, (v, t) in vals.items():
            got = f.metadata[k]
            if k == "nested":
                assert np.array_equal(got[0], v[0]) and got[1] == v[1] and np.array_equal(got[2][0], v[2][0])
            elif isinstance(v, np.ndarray):
                assert np.array_equal(got, v) and got.dtype == v.dtype
            elif isinstance(v, float):
                assert got == pytest.approx(v)
            else:
                assert got == v, k
            if t is not None:
                assert f.value_types[k] == t
        assert np.array_equal(dequantize(f.raw("t"), "F32", f.info("t").shape).numpy(),
                              np.arange(32, dtype=np.float32).reshape(2, 16))
        copy_gguf(f, tmp_path / "again.gguf")
    assert filecmp.cmp(p, tmp_path / "again.gguf", shallow=False)


def test_version_2_and_custom_alignment(tmp_path):
    def build(w):
        w.add("general.alignment", 64, ValueType.UINT32)
        w.add_tensor("a", np.ones(5, np.float32))
        w.add_tensor("b", np.full(3, 2.0, np.float32))

    p = write(tmp_path, build)
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p.write_bytes(bytes(data))
    with GGUFFile(p) as f:
        assert f.version == 2 and f.alignment == 64
        assert f.info("b").offset % 64 == 0
        assert dequantize(f.raw("b"), "F32").tolist() == [2.0, 2.0, 2.0]


def test_split_model_opens_from_first_shard(tmp_path):
    names = [f"m-{i:05d}-of-00002.gguf" for i in (1, 2)]
    for i, n in enumerate(names):
        def build(w, i=i):
            w.add("general.architecture", "llama")
            w.add("split.no", i, ValueType.UINT16)
            w.add("split.count", 2, ValueType.UINT16)
            w.add("split.tensors.count", 2, ValueType.INT32)
            w.add_tensor(f"t{i}", np.full(4, float(i), np.float32))
        write(tmp_path, build, n)
    with GGUFFile(tmp_path / names[0]) as f:
        assert list(f.tensors) == ["t0", "t1"] and len(f.shards) == 2
        assert dequantize(f.raw("t1"), "F32").tolist() == [1.0] * 4
    (tmp_path / names[1]).unlink()
    with pytest.raises(GGUFError, match="shard 2 of 2 is missing"):
        GGUFFile(tmp_path / names[0])


def test_unknown_type_is_listed_and_fails_on_use(tmp_path):
    p = tmp_path / "u.gguf"
    shutil.copy(SMALL, p)
    data = bytearray(p.read_bytes())
    with GGUFFile(SMALL) as f:
        # find the type field of the first tensor info: it follows name, n_dims and dims
        name = next(iter(f.tensors))
        i = bytes(data).index(name.encode()) + len(name)
        n_dims = struct.unpack_from("<I", data, i)[0]
        tpos = i + 4 + 8 * n_dims
    data[tpos:tpos + 4] = struct.pack("<I", 200)
    p.write_bytes(bytes(data))
    with GGUFFile(p) as f:
        assert f.info(name).type is None and f.info(name).type_name == "unknown(200)"
        with pytest.raises(QuantError, match="200"):
            f.raw(name)


def _bad(tmp_path, data: bytes):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    return p


def header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv_string(key, val):
    k, v = key.encode(), val.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def tensor_info(name, dims, type_id, off):
    n = name.encode()
    return struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", type_id, off)


def pad(b, a=32):
    return b + b"\0" * ((-len(b)) % a)


@pytest.mark.parametrize("data,msg", [
    (b"PK\x03\x04" + b"\0" * 40, "not a GGUF file"),
    (b"GGUF", "shorter than a GGUF header"),
    (header(version=1), "unsupported GGUF version 1"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (header(n_tensors=2**40), "claims 1099511627776 tensors"),
    (header(n_kv=2**40), "claims 1099511627776 metadata"),
    (header(n_kv=1) + struct.pack("<Q", 2**60) + b"\0" * 20, "truncated"),
    (header(n_kv=1) + kv_string("a", "b")[:-1], "truncated"),
    (header(n_kv=2) + kv_string("a", "b") + kv_string("a", "c"), "duplicate metadata key"),
    (header(n_kv=1) + struct.pack("<Q", 1) + b"a" + struct.pack("<I", 77), "unknown value type 77"),
    (header(n_kv=1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 4, 2**59), "truncated"),
    (pad(header(1) + tensor_info("w", [32], 0, 0)) + b"\0" * 16, "outside the file"),
    (pad(header(1) + tensor_info("w", [8], 0, 8)) + b"\0" * 64, "not a multiple of the alignment"),
    (pad(header(2) + tensor_info("w", [8], 0, 0) + tensor_info("w", [8], 0, 32)) + b"\0" * 64, "duplicate tensor"),
    (pad(header(2) + tensor_info("a", [16], 0, 0) + tensor_info("b", [8], 0, 32)) + b"\0" * 96, "overlap"),
    (pad(header(1) + tensor_info("q", [33], 2, 0)) + b"\0" * 64, "not a whole number"),
    (pad(header(1) + tensor_info("q", [4, 4, 4, 4, 4], 0, 0)) + b"\0" * 64, "dimensions"),
    (header(n_kv=1) + kv_string("general.alignment", "x"), "alignment"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_clear_error(tmp_path, data, msg):
    with pytest.raises(GGUFError, match=msg):
        GGUFFile(_bad(tmp_path, data))


_meta_values = st.one_of(
    st.integers(0, 2**32 - 1), st.integers(-(2**31), -1), st.booleans(),
    st.floats(allow_nan=False, width=32), st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=5),
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=5).map(lambda v: np.array(v, np.int32)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.dictionaries(st.text(min_size=1, max_size=12), _meta_values, max_size=6),
       tensors=st.lists(st.tuples(st.sampled_from(["F32", "F16", "Q8_0", "Q4_K", "IQ4_NL"]), st.integers(1, 3),
                                  st.integers(1, 3)), max_size=4),
       seed=st.integers(0, 1000))
def test_property_round_trip(tmp_path_factory, meta, tensors, seed):
    from ggtorch.gguf.types import TYPES

    rng = np.random.default_rng(seed)
    w = GGUFWriter()
    for k, v in meta.items():
        w.add(k, v)
    expect = {}
    for i, (tname, blocks, rows) in enumerate(tensors):
        t = TYPES[tname]
        ne0 = blocks * max(t.block_size, 8)
        raw = rng.integers(0, 256, size=rows * t.row_bytes(ne0), dtype=np.uint8)
        w.add_tensor(f"t{i}", raw, tname, (ne0, rows))
        expect[f"t{i}"] = raw
    p = tmp_path_factory.mktemp("rt") / "x.gguf"
    w.write(p)
    with GGUFFile(p) as f:
        for k, v in meta.items():
            got = f.metadata[k]
            if isinstance(v, np.ndarray):
                assert np.array_equal(got, v)
            elif isinstance(v, float):
                assert got == pytest.approx(v, rel=1e-6, abs=1e-38) or (abs(v) < 1e-37)
            else:
                assert got == v
        for name, raw in expect.items():
            assert np.array_equal(f.raw(name), raw)
        copy_gguf(f, p.with_name("y.gguf"))
    assert filecmp.cmp(p, p.with_name("y.gguf"), shallow=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_mutations_only_raise_gguf_error(tmp_path_factory, data):
    """Flip, overwrite or cut bytes of a fixture's header: the reader either opens it or raises GGUFError."""
    src = SMALL.read_bytes()
    with GGUFFile(SMALL) as f:
        hdr_end = f.data_offset
    buf = bytearray(src[: hdr_end + 4096])
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "u64"]))
        i = data.draw(st.integers(0, hdr_end - 1))
        if i >= len(buf):
            break
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "u64" and i + 8 <= len(buf):
            buf[i:i + 8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**31, 2**40, 2**63, 2**64 - 1])))
        else:
            del buf[data.draw(st.integers(0, len(buf))):]
    p = tmp_path_factory.mktemp("fz") / "f.gguf"
    p.write_bytes(bytes(buf))
    try:
        with GGUFFile(p) as f:
            for ti in f:
                if ti.type is not None:
                    f.raw(ti.name)
    except GGUFError:
        pass
