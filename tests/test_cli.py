"""The `ggtorch` command: inspect, dequant, run/tokenize/logits/perplexity, one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, TINY, tiny_manifest

SMALL = TINY / "tiny-llama-Q4_K.gguf"


def gg(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "ggtorch", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_inspect_text_and_json():
    out = gg("inspect", SMALL).stdout
    assert "architecture: llama" in out and "blk.0.attn_q.weight" in out and "Q4_K x" in out
    assert "[str x 1024]" in out  # long arrays summarized
    j = json.loads(gg("inspect", SMALL, "--json").stdout)
    assert j["metadata"]["llama.block_count"] == 2
    t = {x["name"]: x for x in j["tensors"]}["blk.0.attn_k.weight"]
    assert t["type"] == "Q4_K" and t["shape"] == [256, 128] and t["nbytes"] == 128 * 144 and t["offset"] > 0
    assert j["n_params"] > 2_000_000


def test_dequant_npz(tmp_path):
    out = tmp_path / "d.npz"
    gg("dequant", SMALL, "--out", out, "--tensor", "blk.0.attn_k.weight", "--tensor", "output_norm.weight")
    d = np.load(out)
    assert set(d.files) == {"blk.0.attn_k.weight", "output_norm.weight"}
    assert d["blk.0.attn_k.weight"].shape == (128, 256) and d["blk.0.attn_k.weight"].dtype == np.float32
    gg("dequant", SMALL, "--out", tmp_path / "all.npz")
    assert len(np.load(tmp_path / "all.npz").files) == 21


@pytest.mark.parametrize("args,msg", [
    (["inspect", "/nonexistent.gguf"], "no such model file"),
    (["inspect", __file__], "not a GGUF file"),
    (["dequant", str(SMALL), "--out", "/tmp/x.npz", "--tensor", "nope"], "no tensor named"),
    (["run", "nope.gguf", "-p", "hi"], "no such model file"),
    (["run", str(SMALL), "-p", "hi", "--top-p", "0"], "top_p"),
    (["logits", str(SMALL), "--tokens", "1,x", "--out", "/tmp/l.npy"], "comma-separated"),
    (["logits", str(SMALL), "--tokens", "1,99999", "--out", "/tmp/l.npy"], "outside the vocabulary"),
])
def test_bad_input_one_line_exit_2(args, msg):
    r = gg(*args, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr


def test_run_json_and_tokenize_and_logits(tmp_path):
    m = tiny_manifest()
    key = "tiny-llama-F32"
    r = json.loads(gg("run", TINY / f"{key}.gguf", "-p", "hello world", "-n", "5", "--json").stdout)
    assert r["prompt_ids"][0] == 1 and len(r["ids"]) == 5 and set(r) == {"prompt_ids", "ids", "text", "timings"}
    t = json.loads(gg("tokenize", TINY / f"{key}.gguf", "hello world", "--bos", "--json").stdout)
    assert t["ids"] == r["prompt_ids"]
    ids = m["prompt_ids"]
    gg("logits", TINY / f"{key}.gguf", "--tokens", ",".join(map(str, ids)), "--out", tmp_path / "l.npy")
    lg = np.load(tmp_path / "l.npy")
    ref = np.load(TINY / f"{key}.logits.npy")
    assert lg.shape == ref.shape and lg.dtype == np.float32
    assert np.abs(lg - ref).max() < 0.004 * ref.std()


def test_perplexity_json_and_kl(tmp_path):
    f = TINY / "tiny-llama-Q8_0.gguf"
    base = tmp_path / "base.npz"
    a = json.loads(gg("perplexity", TINY / "tiny-llama-F32.gguf", "--file", FIXTURES / "text/gpl-3.txt",
                      "--ctx", "64", "--chunks", "3", "--json", "--save-logits", base).stdout)
    assert a["chunks"] == 3 and a["tokens_scored"] == 3 * 31 and a["ppl"] > 1
    b = json.loads(gg("perplexity", f, "--file", FIXTURES / "text/gpl-3.txt", "--ctx", "64", "--chunks", "3",
                      "--json", "--kl-base", base).stdout)
    assert 0 < b["kl"]["kl_mean"] < 0.05 and b["kl"]["top1_agreement"] > 0.8
