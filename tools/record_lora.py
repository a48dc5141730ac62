"""Record llama.cpp's logits with LoRA adapters on the tiny fixture models (tests/test_lora.py reads them).

1. Writes two small random PEFT adapters (seeded; PEFT's own file format: adapter_config.json +
   adapter_model.safetensors) for tiny-llama (2 layers, n_embd 256, n_ff 768, 4 heads, 2 KV heads).
2. Converts each with llama.cpp's own convert_lora_to_gguf.py (from the llama.cpp sources behind the
   fixtures), given a config.json that describes the tiny model as Hugging Face's LlamaForCausalLM.
3. Runs llama.cpp (llama-cpp-python 0.3.36) on the fixture prompt with the adapters and saves the logits.

Everything lands in tests/data/lora/. Needs transformers, safetensors, torch, numpy and llama-cpp-python
(dev tools only; the tests do not need them). Run from the repository root:

    python tools/record_lora.py [--llama-src DIR] [--shared DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "lora"
LLAMA_SRC = Path("/work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp")

# tiny-llama's shapes (shared/fixtures/README.md)
E, FF, H, HKV, D, V, NL = 256, 768, 4, 2, 64, 1024, 2
MODULES = {"self_attn.q_proj": (E, H * D), "self_attn.k_proj": (E, HKV * D), "self_attn.v_proj": (E, HKV * D),
           "self_attn.o_proj": (H * D, E), "mlp.gate_proj": (E, FF), "mlp.up_proj": (E, FF), "mlp.down_proj": (FF, E)}

# adapter name -> (seed, rank, lora_alpha, modules, lm_head, converter outtype)
ADAPTERS = {
    "peft_a": (1, 4, 8.0, list(MODULES), True, "f32"),
    "peft_b": (2, 2, 2.0, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], False, "f16"),
}
BASES = ("tiny-llama-F32", "tiny-llama-Q8_0")


def hf_config() -> dict:
    """tiny-llama as transformers' LlamaForCausalLM config (what the converter reads)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": E, "intermediate_size": FF,
            "num_attention_heads": H, "num_key_value_heads": HKV, "num_hidden_layers": NL, "head_dim": D,
            "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2}


def write_peft(d: Path, seed: int, r: int, alpha: float, modules: list[str], lm_head: bool) -> None:
    """A PEFT LoRA adapter: lora_A [r, in] ~ N(0, 0.08^2), lora_B [out, r] ~ N(0, 0.08^2) (B is
    non-zero, unlike a fresh PEFT init, so that the adapter changes the logits)."""
    g = torch.Generator().manual_seed(seed)
    t = {}

    def pair(prefix, n_in, n_out):
        t[f"{prefix}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.08
        t[f"{prefix}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.08

    for il in range(NL):
        for m in modules:
            pair(f"base_model.model.model.layers.{il}.{m}", *MODULES[m])
    if lm_head:
        pair("base_model.model.lm_head", E, V)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "adapter_model.safetensors"))
    targets = sorted({m.split(".")[-1] for m in modules} | ({"lm_head"} if lm_head else set()))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": targets, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
           "base_model_name_or_path": None, "inference_mode": True}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def convert(peft_dir: Path, base_dir: Path, out: Path, outtype: str, llama_src: Path) -> None:
    cmd = [sys.executable, str(llama_src / "convert_lora_to_gguf.py"), "--base", str(base_dir), "--outfile", str(out),
           "--outtype", outtype, str(peft_dir)]
    subprocess.run(cmd, check=True, cwd=str(llama_src))


def llama_logits(model: str, prompt: list[int], adapters: list[tuple[str, float]]) -> np.ndarray:
    """llama.cpp's logits at every prompt position with the adapters applied (low-level API, so that
    several adapters with their scales can be set at once)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                          seed=0, yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0)
    handles = []
    for path, _ in adapters:
        h = llama_cpp.llama_adapter_lora_init(llm.model, path.encode())
        if not h:
            raise RuntimeError(f"llama.cpp could not load {path}")
        handles.append(h)
    if handles:
        import ctypes

        n = len(handles)
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*handles)
        scales = (ctypes.c_float * n)(*[s for _, s in adapters])
        rc = llama_cpp.llama_set_adapters_lora(llm.ctx, arr, n, scales)
        if rc != 0:
            raise RuntimeError(f"llama.cpp refused the adapters (rc {rc})")
    llm.reset()
    llm.eval(prompt)
    return np.array(llm.scores[:len(prompt)], dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-src", type=Path, default=LLAMA_SRC)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--no-llama", action="store_true", help="write and convert the adapters only")
    a = ap.parse_args()
    tiny = a.shared / "fixtures" / "tiny"
    prompt = json.loads((tiny / "manifest.json").read_text())["prompt_ids"]
    OUT.mkdir(parents=True, exist_ok=True)
    base_dir = OUT / "hf_config"
    base_dir.mkdir(exist_ok=True)
    (base_dir / "config.json").write_text(json.dumps(hf_config(), indent=1) + "\n")
    for name, (seed, r, alpha, modules, lm_head, outtype) in ADAPTERS.items():
        write_peft(OUT / name, seed, r, alpha, modules, lm_head)
        convert(OUT / name, base_dir, OUT / f"{name}.gguf", outtype, a.llama_src)
    if a.no_llama:
        return
    runs = {}
    for base in BASES:
        model = str(tiny / f"{base}.gguf")
        runs[f"{base}+peft_a"] = llama_logits(model, prompt, [(str(OUT / "peft_a.gguf"), 1.0)])
    model = str(tiny / "tiny-llama-F32.gguf")
    runs["tiny-llama-F32+peft_b"] = llama_logits(model, prompt, [(str(OUT / "peft_b.gguf"), 1.0)])
    runs["tiny-llama-F32+peft_a*0.5+peft_b"] = llama_logits(
        model, prompt, [(str(OUT / "peft_a.gguf"), 0.5), (str(OUT / "peft_b.gguf"), 1.0)])
    runs["tiny-llama-F32"] = llama_logits(model, prompt, [])
    np.savez_compressed(OUT / "llama_cpp_logits.npz", **runs)
    import llama_cpp

    (OUT / "README.md").write_text(
        "Made by tools/record_lora.py: random PEFT adapters for tiny-llama (seeded), converted by llama.cpp's\n"
        "convert_lora_to_gguf.py, and llama.cpp's logits with them on the tiny fixtures' prompt_ids\n"
        f"(llama-cpp-python {llama_cpp.__version__}, n_threads 2, n_batch 64).\n\n"
        + "\n".join(f"- {k}: rank {v[1]}, lora_alpha {v[2]}, {', '.join(v[3])}{', lm_head' if v[4] else ''}; "
                    f"converted --outtype {v[5]}" for k, v in ADAPTERS.items())
        + "\n- llama_cpp_logits.npz: " + ", ".join(runs) + " (float32 [16, 1024], every position)\n")


if __name__ == "__main__":
    main()
