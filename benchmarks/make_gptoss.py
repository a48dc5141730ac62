"""Dev script: a random-weight model with gpt-oss-20b's layer shape, as llama.cpp's MXFP4_MOE quantization
lays it out (experts MXFP4, the other matrices Q8_0, norms/biases/sinks/router F32), for speed comparisons.

    python benchmarks/make_gptoss.py [OUT] [--layers 4] [--vocab 32000] [--seed 0] [--experts MXFP4|Q8_0]
        (default /tmp/ggtorch-synthetic/synthetic-gptoss-4L-MXFP4.gguf)

Shape (gpt-oss-20b's): n_embd 2880, 64 query heads of 64, 8 KV heads, 32 experts of width 2880 with 4
routed, sliding window 128 on even layers, YaRN (factor 32 over 4096), attention sinks, biases; vocabulary
smaller (default 32000, an SPM-style "llama" vocabulary of byte tokens and placeholders). The blocks are
written directly, without a float copy (gguf-py's GGUFWriter): Q8_0 with random int8 values and a float16
scale, MXFP4 with random 4-bit indices and e8m0 exponents 119..120 (values of about 1/sqrt(2880)), so the
activations stay in a normal range; the weights mean nothing, only their shapes and types matter. About
430 MB per layer; never commit these files.
"""
import argparse
import os

import numpy as np

E, H, HKV, HD, N_EXPERT, N_USED, FF, WINDOW = 2880, 64, 8, 64, 32, 4, 2880, 128


def q8_0(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q8_0 blocks [rows, cols/32 * 34]: float16 d, then 32 int8 (std of d*q about ``std``)."""
    nb = rows * cols // 32
    b = np.empty((nb, 34), dtype=np.uint8)
    b[:, :2] = np.full(nb, std / 73.0, dtype=np.float16).view(np.uint8).reshape(nb, 2)  # uniform int8: std 73
    b[:, 2:] = rng.integers(-127, 128, size=(nb, 32), dtype=np.int8).view(np.uint8)
    return b.reshape(rows, cols // 32 * 34)


def mxfp4(rng, n: int, rows: int, cols: int) -> np.ndarray:
    """Random MXFP4 blocks [n, rows, cols/32 * 17]: e8m0 exponent (2^(e-128) * kvalues_mxfp4 has std about
    1/sqrt(cols) for e 119..120 and cols 2880), then 16 bytes of index pairs."""
    nb = n * rows * cols // 32
    b = rng.integers(0, 256, size=(nb, 17), dtype=np.uint8)
    b[:, 0] = rng.integers(119, 121, size=nb, dtype=np.uint8)
    return b.reshape(n, rows, cols // 32 * 17)


def vocab(n: int):
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(n - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    return toks, [0.0] * n, types


def make(path: str, layers: int = 4, n_vocab: int = 32000, seed: int = 0, experts: str = "MXFP4") -> str:
    import gguf

    Q8, MX = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.MXFP4
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "gpt-oss")
    a = "gpt-oss."
    for k, v in {"context_length": 131072, "embedding_length": E, "block_count": layers, "feed_forward_length": FF,
                 "attention.head_count": H, "attention.head_count_kv": HKV, "attention.key_length": HD,
                 "attention.value_length": HD, "expert_count": N_EXPERT, "expert_used_count": N_USED,
                 "expert_feed_forward_length": FF, "attention.sliding_window": WINDOW,
                 "rope.scaling.original_context_length": 4096}.items():
        w.add_uint32(a + k, v)
    for k, v in {"rope.freq_base": 150000.0, "attention.layer_norm_rms_epsilon": 1e-5, "rope.scaling.factor": 32.0}.items():
        w.add_float32(a + k, v)
    w.add_string(a + "rope.scaling.type", "yarn")
    toks, scores, types = vocab(n_vocab)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def f32(name, shape, mean=0.0, std=0.1):
        w.add_tensor(name, (mean + std * rng.standard_normal(shape)).astype(np.float32))

    w.add_tensor("token_embd.weight", q8_0(rng, n_vocab, E, 1.0), raw_dtype=Q8)
    f32("output_norm.weight", E, 1.0)
    w.add_tensor("output.weight", q8_0(rng, n_vocab, E, 1.8 / np.sqrt(E)), raw_dtype=Q8)
    for il in range(layers):
        p = f"blk.{il}."
        f32(p + "attn_norm.weight", E, 1.0)
        f32(p + "post_attention_norm.weight", E, 1.0)
        for n, rows, cols in (("attn_q", H * HD, E), ("attn_k", HKV * HD, E), ("attn_v", HKV * HD, E),
                              ("attn_output", E, H * HD)):
            w.add_tensor(p + n + ".weight", q8_0(rng, rows, cols, 1.0 / np.sqrt(cols)), raw_dtype=Q8)
            f32(p + n + ".bias", rows, 0.0, 0.1)
        f32(p + "attn_sinks.weight", H, 0.5, 1.0)
        f32(p + "ffn_gate_inp.weight", (N_EXPERT, E), 0.0, 4.0 / np.sqrt(E))
        f32(p + "ffn_gate_inp.bias", N_EXPERT, 0.0, 0.5)
        for n, rows, cols in (("ffn_gate_exps", FF, E), ("ffn_up_exps", FF, E), ("ffn_down_exps", E, FF)):
            if experts == "MXFP4":
                w.add_tensor(p + n + ".weight", mxfp4(rng, N_EXPERT, rows, cols), raw_dtype=MX)
            else:  # Q8_0 experts (the same shapes, for comparisons)
                b = np.stack([q8_0(rng, rows, cols, 1.0 / np.sqrt(cols)) for _ in range(N_EXPERT)])
                w.add_tensor(p + n + ".weight", b, raw_dtype=Q8)
            f32(p + n + ".bias", (N_EXPERT, rows), 0.0, 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", choices=("MXFP4", "Q8_0"), default="MXFP4")
    a = ap.parse_args()
    out = a.out or f"/tmp/ggtorch-synthetic/synthetic-gptoss-{a.layers}L-{a.experts}.gguf"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    print(make(out, a.layers, a.vocab, a.seed, a.experts))
