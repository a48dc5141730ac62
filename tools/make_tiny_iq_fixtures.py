"""Make the tiny fixture models of the grid i-quants (IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) that
../shared/fixtures/tiny lacks, with llama.cpp's reference outputs, in that directory's format.

llama.cpp's quantizer refuses these types without an importance matrix, which is why
../shared/tools/make_tiny_models.py has none of them; here they get a random one (positive values,
fixed seed, as benchmarks/make_synthetic.py gives the synthetic models). The source is the fixtures'
own tiny-llama-F32.gguf, quantized with `pure` set like the other tiny models; the outputs are
llama.cpp's logits at every position of the manifest's prompt_ids and its 24 greedy tokens with their
margins (the shared tool's reference_outputs, the same settings). Dev tool; needs llama-cpp-python:

    python tools/make_tiny_iq_fixtures.py OUT_DIR [TYPE ...]

writes OUT_DIR/tiny-llama-<TYPE>.gguf, .logits.npy and OUT_DIR/manifest.json (the shared manifest's
entries plus the new ones), so OUT_DIR can be merged into ../shared/fixtures/tiny. tests/test_kernels_iq.py
holds every type with such a fixture to llama.cpp's logits on the default (JIT) path.
"""
import ctypes
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "..", "shared", "fixtures", "tiny")
TYPES = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
FTYPE = {"IQ2_S": "IQ2_M"}  # llama.cpp's IQ2_S ftype writes IQ2_XS tensors; its IQ2_M ftype writes IQ2_S ones


def reference_outputs(llama_cpp, path: str, prompt_ids: list[int], n_gen: int = 24):
    """llama.cpp's logits over the prompt, then its greedy tokens and top-1 minus top-2 margins."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                          seed=0)
    llm.reset()
    llm.eval(prompt_ids)
    logits = np.array(llm.scores[:len(prompt_ids)], dtype=np.float32)
    gen, margins = [], []
    for _ in range(n_gen):
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top2 = np.sort(last)[-2:]
        tok = int(np.argmax(last))
        gen.append(tok)
        margins.append(float(top2[1] - top2[0]))
        llm.eval([tok])
    return logits, gen, margins


def main() -> None:
    import gguf
    import llama_cpp

    sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    from make_synthetic import _random_imatrix

    out = sys.argv[1]
    types = sys.argv[2:] or TYPES
    os.makedirs(out, exist_ok=True)
    have = os.path.join(out, "manifest.json")  # a previous run's, else the shared one
    manifest = json.load(open(have if os.path.exists(have) else os.path.join(TINY, "manifest.json")))
    src = os.path.join(TINY, "tiny-llama-F32.gguf")
    for t in types:
        dst = os.path.join(out, f"tiny-llama-{t}.gguf")
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE.get(t, t)}")
        p.pure = True
        p.nthread = 2
        arr, keep = _random_imatrix(src)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
            raise SystemExit(f"llama_model_quantize failed for {t}")
        del keep
        logits, gen, margins = reference_outputs(llama_cpp, dst, manifest["prompt_ids"])
        key = f"tiny-llama-{t}"
        np.save(os.path.join(out, key + ".logits.npy"), logits)
        hist: dict[str, int] = {}
        for tensor in gguf.GGUFReader(dst).tensors:
            hist[tensor.tensor_type.name] = hist.get(tensor.tensor_type.name, 0) + 1
        manifest["models"][key] = {"arch": "llama", "file": os.path.basename(dst), "greedy": gen,
                                   "greedy_margins": margins, "tensor_types": hist, "bytes": os.path.getsize(dst)}
        print(key, hist, gen[:8], "min margin %.4f" % min(margins), flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
