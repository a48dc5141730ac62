"""Dev script: the random-weight 1.1B models (TinyLlama's shape) that `vs_llamacpp.py --synthetic` runs.

    python benchmarks/make_synthetic.py [OUT_DIR]     (default /tmp/ggtorch-synthetic)

Q4_0 and Q8_0 are written by ../shared/tools/make_synthetic_model.py (gguf-py); Q4_K_M, llama.cpp's
mix (Q4_K with Q6_K for the output matrix, attn_v and half of ffn_down), by llama-cpp-python's
llama_model_quantize from the F16 file, when llama-cpp-python is installed. Files that exist are kept.
About 4 GB of disk while the F16 file exists; never commit these files.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "..", "shared", "tools", "make_synthetic_model.py")
TYPES = ("Q4_0", "Q8_0", "Q4_K_M")


def path(out_dir: str, t: str) -> str:
    return os.path.join(out_dir, f"synthetic-1.1b-{t}.gguf")


def make(out_dir: str, types=TYPES) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    tool = os.environ.get("GGTORCH_SYNTHETIC_TOOL", TOOL)
    done = {}
    for t in types:
        p = path(out_dir, t)
        if os.path.exists(p):
            done[t] = p
            continue
        if t == "Q4_K_M":
            try:
                import llama_cpp
            except ImportError:
                print("llama-cpp-python is not installed: no Q4_K_M file", file=sys.stderr)
                continue
            f16 = path(out_dir, "F16")
            if not os.path.exists(f16):
                subprocess.run([sys.executable, tool, f16, "--type", "F16"], check=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            params.nthread = 2
            if llama_cpp.llama_model_quantize(f16.encode(), p.encode(), params) != 0:
                raise SystemExit(f"llama_model_quantize failed for {p}")
            os.unlink(f16)
        else:
            subprocess.run([sys.executable, tool, p, "--type", t], check=True)
        done[t] = p
    return done


if __name__ == "__main__":
    for t, p in make(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ggtorch-synthetic").items():
        print(t, p)
