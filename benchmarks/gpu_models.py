"""Random-weight GGUF models written with ggtorch's own writer (no quantizer, no gguf package): random
block bytes whose fp16 scales are set to moderate values. Used by gpu_check.py, which makes its models
on the GPU machine (nothing is brought along but this repository)."""
from __future__ import annotations

import numpy as np

from ggtorch.gguf.types import ggml_type
from ggtorch.gguf.writer import GGUFWriter

# byte offsets of the fp16 scale fields of each type's block, and a value for d that gives the
# dequantized weights a standard deviation near 1 when the other bytes are random (then scaled by std)
F16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
SPREAD = {"Q4_0": 4.6, "Q4_1": 4.6, "Q5_0": 9.2, "Q5_1": 9.2, "Q8_0": 74, "Q2_K": 8, "Q3_K": 40, "Q4_K": 147,
          "Q5_K": 294, "Q6_K": 1370, "IQ4_NL": 70, "IQ4_XS": 1260}



# ---- random GGUF models ------------------------------------------------------------------------------
def random_blocks(name: str, n_values: int, rng, std: float = 0.02) -> np.ndarray:
    """Random blocks of a type: random bytes, with the fp16 scales set so the weights have ~``std``."""
    t = ggml_type(name)
    nb = n_values // t.block_size
    raw = np.frombuffer(rng.bytes(nb * t.type_size), dtype=np.uint8).reshape(nb, t.type_size).copy()
    d = (std / SPREAD[name]) * (0.5 + rng.random((nb, 1), dtype=np.float32))
    for i, at in enumerate(F16_AT[name]):  # d, then dmin/m (small, so the mins do not dominate)
        v = d if i == 0 else d * (0.25 if name.endswith("_K") else -2.0)
        raw[:, at:at + 2] = v.astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits (llama-quant.cpp): the layers whose attn_v/ffn_down Q4_K_M makes Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_llama(path: str, ftype: str, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                n_vocab: int, seed: int = 0) -> int:
    """A random llama-architecture GGUF; ``ftype`` a type name or Q4_K_M. Returns the bytes of the
    weights one token reads (every matrix but the token embedding, whose one row is negligible)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter()
    a = "llama"
    for k, v in ((f"general.architecture", a), ("general.name", f"synthetic-{ftype}"),
                 (f"{a}.context_length", 2048), (f"{a}.embedding_length", n_embd), (f"{a}.block_count", n_layer),
                 (f"{a}.feed_forward_length", n_ff), (f"{a}.attention.head_count", n_head),
                 (f"{a}.attention.head_count_kv", n_head_kv), (f"{a}.rope.freq_base", 10000.0),
                 (f"{a}.attention.layer_norm_rms_epsilon", 1e-5), (f"{a}.rope.dimension_count", n_embd // n_head),
                 (f"{a}.vocab_size", n_vocab), ("tokenizer.ggml.model", "llama"),
                 ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.eos_token_id", 2),
                 ("tokenizer.ggml.unknown_token_id", 0), ("tokenizer.ggml.add_bos_token", True)):
        w.add(k, v)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [("\u2581" if i % 2 else "") + f"t{i}" for i in range(n_vocab - len(toks))]
    w.add("tokenizer.ggml.tokens", toks)
    w.add("tokenizer.ggml.scores", np.array([0.0] * 259 + [-float(i) for i in range(n_vocab - 259)], np.float32))
    w.add("tokenizer.ggml.token_type", np.array([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259), np.int32))
    per_token = 0

    def mat(name, rows, cols, t):
        nonlocal per_token
        blocks = random_blocks(t, rows * cols, rng)
        w.add_tensor(name, blocks, t, shape=(cols, rows))
        if name != "token_embd.weight":
            per_token += blocks.nbytes

    def vec(name, n):
        nonlocal per_token
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))
        per_token += 4 * n

    base = "Q4_K" if ftype == "Q4_K_M" else ftype
    hi = "Q6_K" if ftype == "Q4_K_M" else ftype
    hd = n_embd // n_head
    mat("token_embd.weight", n_vocab, n_embd, base)
    vec("output_norm.weight", n_embd)
    mat("output.weight", n_vocab, n_embd, hi)
    for i in range(n_layer):
        p = f"blk.{i}."
        more = use_more_bits(i, n_layer)
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * hd, n_embd, base)
        mat(p + "attn_k.weight", n_head_kv * hd, n_embd, base)
        mat(p + "attn_v.weight", n_head_kv * hd, n_embd, hi if more else base)
        mat(p + "attn_output.weight", n_embd, n_head * hd, base)
        vec(p + "ffn_norm.weight", n_embd)
        mat(p + "ffn_gate.weight", n_ff, n_embd, base)
        mat(p + "ffn_up.weight", n_ff, n_embd, base)
        mat(p + "ffn_down.weight", n_embd, n_ff, hi if more else base)
    w.write(path)
    return per_token


def write_qwen3moe(path: str, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int,
                   n_expert: int, n_expert_used: int, n_ff_exp: int, n_vocab: int, seed: int = 0) -> int:
    """The synthetic Qwen3-MoE (make_synthetic_model.py --arch qwen3moe's shape: Qwen3-30B-A3B's layers,
    fewer of them and fewer experts), Q4_K with a Q6_K output matrix. Returns the bytes one token
    reads: attention, router, output and n_expert_used of the experts of every layer."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter()
    a = "qwen3moe"
    for k, v in (("general.architecture", a), ("general.name", "synthetic-qwen3moe"),
                 (f"{a}.context_length", 4096), (f"{a}.embedding_length", n_embd), (f"{a}.block_count", n_layer),
                 (f"{a}.feed_forward_length", 6144), (f"{a}.attention.head_count", n_head),
                 (f"{a}.attention.head_count_kv", n_head_kv), (f"{a}.attention.key_length", head_dim),
                 (f"{a}.attention.value_length", head_dim), (f"{a}.expert_count", n_expert),
                 (f"{a}.expert_used_count", n_expert_used), (f"{a}.expert_feed_forward_length", n_ff_exp),
                 (f"{a}.rope.freq_base", 1000000.0), (f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
                 (f"{a}.vocab_size", n_vocab), ("tokenizer.ggml.model", "llama"),
                 ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.eos_token_id", 2)):
        w.add(k, v)
    toks = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(n_vocab - 3)]
    w.add("tokenizer.ggml.tokens", toks)
    w.add("tokenizer.ggml.scores", np.zeros(n_vocab, np.float32))
    w.add("tokenizer.ggml.token_type", np.array([2, 3, 3] + [1] * (n_vocab - 3), np.int32))
    per_token = 0

    def mat(name, rows, cols, t, n=None):
        nonlocal per_token
        blocks = random_blocks(t, rows * cols * (n or 1), rng)
        w.add_tensor(name, blocks, t, shape=(cols, rows) if n is None else (cols, rows, n))
        if name != "token_embd.weight":
            per_token += blocks.nbytes if n is None else blocks.nbytes * n_expert_used // n

    def vec(name, n, std=0.1):
        nonlocal per_token
        w.add_tensor(name, (1.0 + std * rng.standard_normal(n)).astype(np.float32))
        per_token += 4 * n

    mat("token_embd.weight", n_vocab, n_embd, "Q4_K")
    vec("output_norm.weight", n_embd)
    mat("output.weight", n_vocab, n_embd, "Q6_K")
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * head_dim, n_embd, "Q4_K")
        mat(p + "attn_k.weight", n_head_kv * head_dim, n_embd, "Q4_K")
        mat(p + "attn_v.weight", n_head_kv * head_dim, n_embd, "Q6_K")
        mat(p + "attn_output.weight", n_embd, n_head * head_dim, "Q4_K")
        vec(p + "attn_q_norm.weight", head_dim)
        vec(p + "attn_k_norm.weight", head_dim)
        vec(p + "ffn_norm.weight", n_embd)
        w.add_tensor(p + "ffn_gate_inp.weight", (0.02 * rng.standard_normal((n_expert, n_embd))).astype(np.float32))
        per_token += 4 * n_expert * n_embd
        mat(p + "ffn_gate_exps.weight", n_ff_exp, n_embd, "Q4_K", n_expert)
        mat(p + "ffn_up_exps.weight", n_ff_exp, n_embd, "Q4_K", n_expert)
        mat(p + "ffn_down_exps.weight", n_embd, n_ff_exp, "Q6_K", n_expert)
    w.write(path)
    return per_token
