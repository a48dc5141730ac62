"""Trace, diff, lens, check and the planted faults: diff must name the tensor where each fault enters."""
import json
import struct

import numpy as np
import pytest
import torch

import ggtorch
from ggtorch.cli import main
from ggtorch.debug import faults as F
from ggtorch.debug.check import check
from ggtorch.debug.diff import diff
from ggtorch.debug.lens import logit_lens
from ggtorch.debug.trace import Trace, TraceFileError, injected, record, tensor_stats
from ggtorch.gguf.reader import GGUFFile
from ggtorch.gguf.writer import GGUFWriter
from ggtorch.quant.dequant import dequantize

from conftest import TINY, tiny_manifest

IDS = tiny_manifest()["prompt_ids"]
_CACHE = {}


def trace_of(path, **kw):
    key = (str(path), tuple(sorted(kw.items())))
    if key not in _CACHE:
        m = ggtorch.load(str(path))
        with injected(m.net, **kw):
            _CACHE[key] = record(m.net, IDS)
    return _CACHE[key]


# ---- the faults are what they claim to be --------------------------------------------------------
def sequential_q6k_decode(raw):
    """A port's naive Q6_K decoder (written independently of ggtorch.debug.faults)."""
    b = raw.reshape(-1, 210)
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    out = np.empty((b.shape[0], 256), np.float32)
    for i in range(256):
        lo = (ql[:, i // 2] >> (4 * (i % 2))) & 15
        hi = (qh[:, i // 4] >> (2 * (i % 4))) & 3
        q = (lo.astype(np.int32) | (hi.astype(np.int32) << 4)) - 32
        out[:, i] = d[:, 0] * sc[:, i // 16] * q
    return out.reshape(-1)


def test_q6k_sequential_bytes_decode_as_a_sequential_port_reads_them():
    f = GGUFFile(TINY / "tiny-llama-Q6_K.gguf")
    raw = np.array(f.raw("blk.0.attn_q.weight"))
    planted = F.q6k_sequential(raw)
    assert not np.array_equal(planted, raw)
    got = dequantize(planted, "Q6_K").numpy()
    np.testing.assert_array_equal(got, sequential_q6k_decode(raw))
    assert not np.allclose(got, dequantize(raw, "Q6_K").numpy())


def test_unpermute_inverts_the_converters_permutation():
    n_head, hd, cols = 4, 8, 3
    hf = np.arange(n_head * hd * cols, dtype=np.float32).reshape(n_head * hd, cols)
    # convert_hf_to_gguf's permute for llama Q/K, restated here
    gguf = hf.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert np.array_equal(F.unpermute_rows(gguf, n_head * hd, n_head), hf)


# ---- diff names the entry point of every planted fault -------------------------------------------
FILE_CASES = [
    ("tiny-llama-Q6_K.gguf", "q6k-sequential", "blk.0.attn_q.weight", "Qcur-0"),
    ("tiny-llama-Q6_K.gguf", "q6k-sequential", "blk.1.attn_v.weight", "Vcur-1"),
    ("tiny-llama-Q6_K.gguf", "q6k-sequential", "blk.1.ffn_down.weight", "ffn_out-1"),
    ("tiny-llama-Q6_K.gguf", "q6k-sequential", "output.weight", "result_output"),
    ("tiny-llama-tied-Q6_K.gguf", "q6k-sequential", "token_embd.weight", "inp_embd"),
    ("tiny-llama-F32.gguf", "transpose", "blk.0.attn_q.weight", "Qcur-0"),
    ("tiny-llama-F32.gguf", "transpose", "blk.1.attn_output.weight", "attn_out-1"),
    ("tiny-llama-F16.gguf", "transpose", "blk.1.attn_q.weight", "Qcur-1"),
    ("tiny-llama-F32.gguf", "unpermute-qk", None, "Qcur-0"),
    ("tiny-llama-Q4_K.gguf", "unpermute-qk", None, "Qcur-0"),
]


@pytest.mark.parametrize("src,fault,tensor,expected", FILE_CASES)
def test_diff_names_where_a_planted_file_fault_enters(tmp_path, src, fault, tensor, expected):
    bad = tmp_path / "bad.gguf"
    changed = F.plant(str(TINY / src), str(bad), fault, tensor)
    assert changed
    r = diff(trace_of(bad), trace_of(TINY / src))
    assert r.first_divergence == expected
    # everything before the entry point is untouched, the entry point is far off
    idx = [x.name for x in r.rows].index(expected)
    assert all(x.max_abs == 0 for x in r.rows[:idx])
    assert r.rows[idx].rel_l2 > 0.3


@pytest.mark.parametrize("spec,expected", [("position-offset", "Qcur-0"), ("no-causal-mask", "kqv_out-0"),
                                           ("rms-eps", "attn_norm-0")])
def test_diff_names_where_a_runtime_fault_enters(spec, expected):
    path = TINY / "tiny-llama-F32.gguf"
    r = diff(trace_of(path, **F.parse_runtime(spec)), trace_of(path))
    assert r.first_divergence == expected


def test_position_fault_in_a_neox_model_too():
    path = TINY / "tiny-qwen2-F32.gguf"
    assert diff(trace_of(path, position_offset=3), trace_of(path)).first_divergence == "Qcur-0"


def test_same_model_does_not_diverge_and_different_quant_stays_close():
    clean = trace_of(TINY / "tiny-llama-F32.gguf")
    assert diff(clean, clean).ok
    r = diff(trace_of(TINY / "tiny-llama-Q8_0.gguf"), clean)
    assert r.ok and all(x.cosine > 0.999 for x in r.rows)
    r2 = diff(trace_of(TINY / "tiny-llama-Q2_K.gguf"), clean, tol=0.01)
    assert not r2.ok  # a tight tolerance flags 2-bit weights: the check can fail


def test_diff_refuses_different_tokens():
    a = trace_of(TINY / "tiny-llama-F32.gguf")
    b = Trace(a.tokens[:-1] + [a.tokens[-1] + 1], a.stats, a.tensors)
    with pytest.raises(ggtorch.GGTorchError, match="different tokens"):
        diff(a, b)


# ---- trace files ---------------------------------------------------------------------------------
def test_trace_names_and_stats():
    tr = trace_of(TINY / "tiny-llama-F32.gguf")
    names = tr.names
    assert names[0] == "inp_embd" and names[-2:] == ["result_norm", "result_output"]
    for il in range(2):
        for base in ("attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"):
            assert f"{base}-{il}" in names
    assert tr.tensors["Qcur-0"].shape == (16, 4, 64) and tr.tensors["Kcur-1"].shape == (16, 2, 64)
    s = tr.stats["l_out-1"]
    t = tr.tensors["l_out-1"].double()
    assert s["rms"] == pytest.approx(float(t.pow(2).mean().sqrt())) and s["absmax"] == pytest.approx(float(t.abs().max()))
    st = tensor_stats(torch.tensor([1.0, float("nan"), float("inf"), -3.0]))
    assert (st["nan"], st["inf"], st["min"], st["max"], st["absmax"]) == (1, 1, -3.0, 1.0, 3.0)


def test_trace_file_round_trip_and_a_foreign_port_file(tmp_path):
    tr = trace_of(TINY / "tiny-llama-F32.gguf")
    p = tmp_path / "t.safetensors"
    tr.save(str(p))
    back = Trace.load(str(p))
    assert back.tokens == tr.tokens and back.names == tr.names
    assert all(torch.equal(back.tensors[n], tr.tensors[n]) for n in tr.names)
    # a port writes its own file by hand: float16, no metadata, one tensor wrong
    tensors = {n: t.numpy().astype(np.float16) for n, t in tr.tensors.items()}
    tensors["ffn_norm-1"] = tensors["ffn_norm-1"] * np.float16(1.5)
    header, off, blobs = {}, 0, []
    for n, a in tensors.items():
        b = a.tobytes()
        header[n] = {"dtype": "F16", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    hj = json.dumps(header).encode()
    port = tmp_path / "port.safetensors"
    port.write_bytes(struct.pack("<Q", len(hj)) + hj + b"".join(blobs))
    theirs = Trace.load(str(port))
    assert theirs.names == tr.names  # graph order recovered without an "order" key
    assert diff(tr, theirs).first_divergence == "ffn_norm-1"


def test_corrupt_trace_file_is_a_clear_error(tmp_path, capsys):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    rc = main(["diff", str(TINY / "tiny-llama-F32.gguf"), "--trace", str(p), "--tokens", "1,2,3"])
    assert rc == 2 and "not a readable safetensors file" in capsys.readouterr().err
    p.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(TraceFileError):
        Trace.load(str(p))


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_diff_exit_codes_json_and_plot(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    assert main(["plant", str(TINY / "tiny-llama-Q6_K.gguf"), str(bad), "--fault", "q6k-sequential",
                 "--tensor", "blk.1.ffn_up.weight"]) == 0
    capsys.readouterr()
    png = tmp_path / "d.png"
    rc = main(["diff", str(bad), str(TINY / "tiny-llama-Q6_K.gguf"), "--tokens", ",".join(map(str, IDS)), "--json",
               "--plot", str(png)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["first_divergence"] == "ffn_out-1" and not out["ok"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["diff", str(TINY / "tiny-llama-Q6_K.gguf"), str(TINY / "tiny-llama-Q6_K.gguf"), "--tokens", "1,2,3", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["first_divergence"] is None
    rc = main(["diff", str(TINY / "tiny-llama-F32.gguf"), "--tokens", "1,2,3", "--inject", "no-causal-mask",
               "--trace", str(_saved(tmp_path))])
    text = capsys.readouterr().out
    assert rc == 1 and "first divergence: kqv_out-0" in text


def _saved(tmp_path):
    p = tmp_path / "clean.safetensors"
    assert main(["trace", str(TINY / "tiny-llama-F32.gguf"), "--tokens", "1,2,3", "--save", str(p)]) == 0
    return p


def test_cli_trace_table_json_plot(tmp_path, capsys):
    png = tmp_path / "t.png"
    assert main(["trace", str(TINY / "tiny-qwen3-F32.gguf"), "--tokens", "1,2,3,4", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "-- layer 1" in out and "l_out-1" in out and "absmax" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["trace", str(TINY / "tiny-qwen3-F32.gguf"), "--tokens", "1,2", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["tokens"] == [1, 2] and j["tensors"][0]["tensor"] == "inp_embd" and j["tensors"][0]["shape"] == [2, 256]


def test_cli_bad_debug_input_is_one_line(tmp_path, capsys):
    f32 = str(TINY / "tiny-llama-F32.gguf")
    for argv in (["diff", f32, "--tokens", "1,2"],  # no reference side
                 ["diff", f32, f32, "--tokens", "1,2", "--inject", "sideways"],
                 ["plant", f32, str(tmp_path / "x.gguf"), "--fault", "q6k-sequential"],  # no Q6_K tensor
                 ["plant", f32, str(tmp_path / "x.gguf"), "--fault", "transpose", "--tensor", "blk.0.ffn_up.weight"],
                 ["trace", f32, "--tokens", "1,99999"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err, argv
    assert not (tmp_path / "x.gguf").exists()


def test_llama_cpp_side_missing_gives_a_clear_message(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_llama(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    rc = main(["diff", str(TINY / "tiny-llama-F32.gguf"), "--llama-cpp", "--tokens", "1,2,3"])
    assert rc == 2 and "pip install 'ggtorch[llama-cpp]'" in capsys.readouterr().err


def test_against_llama_cpp_when_installed():
    pytest.importorskip("llama_cpp", reason="optional extra llama-cpp not installed")
    from ggtorch.debug.llamacpp import capture

    for name in ("tiny-llama-Q4_K.gguf", "tiny-qwen2-Q8_0.gguf"):
        a = trace_of(TINY / name)
        r = diff(a, capture(str(TINY / name), IDS, set(a.names)))
        assert r.ok and len(r.rows) >= 20 and all(x.cosine > 0.999 for x in r.rows)


# ---- lens and check ------------------------------------------------------------------------------
def test_logit_lens_last_layer_is_the_model_output():
    m = ggtorch.load(str(TINY / "tiny-llama-F32.gguf"))
    rows = logit_lens(m, IDS, k=3)
    assert [r["layer"] for r in rows] == [0, 1]
    final = int(m.logits(IDS)[-1].argmax())
    assert rows[-1]["top"][0]["id"] == final and rows[-1]["final_top1_rank"] == 0
    assert all(len(r["top"]) == 3 and r["top"][0]["p"] >= r["top"][1]["p"] for r in rows)


def test_check_passes_a_good_file_and_flags_bad_ones(tmp_path, capsys):
    assert main(["check", str(TINY / "tiny-llama-Q4_K.gguf")]) == 0
    assert "OK: 21 tensors scanned, 21 identical to gguf-py" in capsys.readouterr().out
    # NaN in a weight, and a BPE tokenizer without tokenizer.ggml.pre
    f = GGUFFile(TINY / "tiny-llama-F32.gguf")
    w = GGUFWriter()
    for k, v in f.metadata.items():
        if k != "tokenizer.ggml.pre":
            w.add(k, "gpt2" if k == "tokenizer.ggml.model" else v, f.value_types[k])
    w.add("tokenizer.ggml.merges", ["a b"])
    for ti in f:
        raw = np.array(f.raw(ti.name))
        if ti.name == "blk.1.ffn_up.weight":
            raw.view(np.float32)[7] = np.nan
        w.add_tensor(ti.name, raw, ti.type, ti.shape)
    bad = tmp_path / "bad.gguf"
    w.write(bad)
    r = check(str(bad))
    assert not r["ok"]
    assert any("blk.1.ffn_up.weight: 1 NaN" in p for p in r["problems"])
    assert any("tokenizer.ggml.pre is missing" in p for p in r["problems"])
    assert main(["check", str(bad)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAIL")


def test_check_real_model_against_gguf_py(smollm):
    r = check(str(smollm.path))
    assert r["ok"], r["problems"]
    assert all(t["gguf_py"] is True for t in r["tensors"]) and len(r["tensors"]) == 272
    assert any("tied" in n for n in r["notes"]) and any("mixed tensor types" in n for n in r["notes"])


def test_gemma_trace_has_its_extra_norms(gemma):
    tr = record(gemma.net, gemma.tokenize("Hi there", bos=True))
    for n in ("attn_post_norm-0", "ffn_post_norm-17", "l_out-17", "result_output"):
        assert n in tr.names
