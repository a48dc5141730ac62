"""Dev script: the random-weight 1.1B models (TinyLlama's shape) that `vs_llamacpp.py --synthetic` runs.

    python benchmarks/make_synthetic.py [OUT_DIR] [TYPE ...] [--layers N]
    (vs_llamacpp.py --requantize MODEL --types ...: a real model requantized, make_synthetic.requantize)
        (default /tmp/ggtorch-synthetic; Q4_0 Q8_0 Q4_K_M; all 22 layers)

Q4_0 and Q8_0 are written by ../shared/tools/make_synthetic_model.py (gguf-py); every other type
(llama.cpp's ftype names: Q4_K_M, Q2_K, Q3_K_M, IQ4_XS, IQ4_NL, IQ3_S, IQ3_XXS, IQ2_XS, IQ1_S, ...) by
llama-cpp-python's llama_model_quantize from an F16 file, as llama.cpp's quantizer lays it out (its mix
of types per tensor). llama.cpp refuses IQ3_XXS, IQ2_* and IQ1_* without an importance matrix: those get
a random one (positive values, fixed seed), which is all a speed measurement needs. Files that exist are
kept; the F16 file is deleted once every requested type is written. About 4 GB of disk while the F16
file exists; never commit these files.
"""
import ctypes
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "..", "shared", "tools", "make_synthetic_model.py")
TYPES = ("Q4_0", "Q8_0", "Q4_K_M")
GGUF_PY_TYPES = ("Q4_0", "Q8_0", "Q4_1", "Q5_0", "Q5_1", "F16")  # what make_synthetic_model.py writes itself
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")


def path(out_dir: str, t: str, layers: int | None = None) -> str:
    """The file for type t; ``layers``: fewer of TinyLlama's layers (same widths and vocabulary), a
    quicker stand-in on a loaded machine (the per-layer cost ratio is what a same-run comparison shows)."""
    return os.path.join(out_dir, f"synthetic-1.1b-{t}.gguf" if not layers else f"synthetic-1.1b-{layers}L-{t}.gguf")


def _random_imatrix(f16: str):
    """A ctypes array of llama_model_imatrix_data, one random importance vector per matrix (null-terminated),
    plus the buffers it points into (keep them alive while quantizing)."""
    import gguf
    import numpy as np
    import llama_cpp

    rng = np.random.default_rng(0)
    keep, rows = [], []
    for t in gguf.GGUFReader(f16).tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        v = rng.uniform(0.1, 1.0, int(t.shape[0])).astype(np.float32)
        keep.append(v)
        rows.append((t.name.encode(), v))
    arr = (llama_cpp.llama_model_imatrix_data * (len(rows) + 1))()
    for i, (name, v) in enumerate(rows):
        arr[i].name = name
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(rows)].name = None
    return arr, keep


def _quantize(f16: str, out: str, t: str, requantize: bool = False) -> None:
    """In a child process: Linux carries a process's peak RSS across exec into what it spawns, so a
    quantizer run in vs_llamacpp.py's own process (a GB resident) inflated every later peak RSS."""
    import multiprocessing

    p = multiprocessing.get_context("spawn").Process(target=_quantize_here, args=(f16, out, t, requantize))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"quantizing {out} failed (exit code {p.exitcode})")


def _quantize_here(f16: str, out: str, t: str, requantize: bool) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}", None)
    if ftype is None:
        raise SystemExit(f"llama-cpp-python has no ftype {t}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.allow_requantize = requantize
    keep = None
    if t in NEEDS_IMATRIX:
        arr, keep = _random_imatrix(f16)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep = (arr, keep)
    if llama_cpp.llama_model_quantize(f16.encode(), out.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {out}")


def make(out_dir: str, types=TYPES, layers: int | None = None) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    tool = os.environ.get("GGTORCH_SYNTHETIC_TOOL", TOOL)
    done = {}
    f16 = path(out_dir, "F16", layers)
    more = ["--layers", str(layers)] if layers else []
    made_f16 = False
    for t in types:
        p = path(out_dir, t, layers)
        if os.path.exists(p):
            done[t] = p
            continue
        if t not in GGUF_PY_TYPES:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print(f"llama-cpp-python is not installed: no {t} file", file=sys.stderr)
                continue
            if not os.path.exists(f16):
                subprocess.run([sys.executable, tool, f16, "--type", "F16", *more], check=True)
                made_f16 = True
            _quantize(f16, p, t)
        else:
            subprocess.run([sys.executable, tool, p, "--type", t, *more], check=True)
        done[t] = p
    if made_f16 and "F16" not in types:
        os.unlink(f16)
    return done


def requantize(src: str, out_dir: str, types) -> dict[str, str]:
    """A real model file (a path, or a packaged name such as smollm2-135m) requantized by llama.cpp's
    quantizer into each type (--allow-requantize; a random importance matrix where the type needs one),
    as issue 22 asks for SmolLM2: its 576-wide rows are not a multiple of 256, so llama.cpp falls back
    to other types for most of its matrices, and the file is whatever mix that gives."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    from ggtorch.packaged import resolve

    src = resolve(src)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(src))[0]
    done = {}
    for t in types:
        p = os.path.join(out_dir, f"{stem}-requant-{t}.gguf")
        if not os.path.exists(p):
            _quantize(src, p, t, requantize=True)
        done[t] = p
    return done


def moe_path(out_dir: str, t: str, layers: int | None = None) -> str:
    return os.path.join(out_dir, f"synthetic-qwen3moe-{t}.gguf" if not layers else f"synthetic-qwen3moe-{layers}L-{t}.gguf")


def make_moe(out_dir: str, types=("Q4_K_M",), layers: int | None = None) -> dict[str, str]:
    """The synthetic Qwen3-MoE (make_synthetic_model.py --arch qwen3moe: Qwen3-30B-A3B's layer shape, 8
    layers unless ``layers``): Q8_0 written by the tool, any other type requantized from it by llama.cpp's
    quantizer (--allow-requantize), as issue 22 describes. The Q8_0 file is kept (1.5 GB at 4 layers)."""
    os.makedirs(out_dir, exist_ok=True)
    tool = os.environ.get("GGTORCH_SYNTHETIC_TOOL", TOOL)
    q8 = moe_path(out_dir, "Q8_0", layers)
    if not os.path.exists(q8):
        subprocess.run([sys.executable, tool, q8, "--arch", "qwen3moe", "--type", "Q8_0",
                        *(["--layers", str(layers)] if layers else [])], check=True)
    done = {}
    for t in types:
        p = moe_path(out_dir, t, layers)
        if t != "Q8_0" and not os.path.exists(p):
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print(f"llama-cpp-python is not installed: no {t} file", file=sys.stderr)
                continue
            _quantize(q8, p, t, requantize=True)
        done[t] = p
    return done


if __name__ == "__main__":
    args = sys.argv[1:]
    layers = None
    if "--layers" in args:
        i = args.index("--layers")
        layers = int(args[i + 1])
        del args[i:i + 2]
    out = args.pop(0) if args and not args[0].isupper() else "/tmp/ggtorch-synthetic"
    for t, p in make(out, args or TYPES, layers).items():
        print(t, p)
