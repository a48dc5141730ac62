"""The `ggtorch` command: thin front ends over the library. Bad input prints one line and exits 2."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import GGTorchError


def _add_model(p, optional=False):
    if optional:
        p.add_argument("model", nargs="?", default="smollm2-135m",
                       help="a .gguf path or a packaged model name (smollm2-135m, gemma3-270m); default smollm2-135m")
    else:
        p.add_argument("model", help="a .gguf path or a packaged model name (smollm2-135m, gemma3-270m)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--exact", dest="fast", action="store_false",
                   help="the float32 reference path: dequantize GGUF blocks on every call (slow); the default "
                        "is a fast kernel per type (int4-repacked Q4_0/Q4_1/Q4_K, int8 rows otherwise, bf16 activations)")
    p.add_argument("--fast", dest="fast", action="store_true",
                   help="the fast kernels (the default, except for trace and diff, which compare numbers)")
    p.add_argument("--ggml-numerics", action="store_true",
                   help="round activations, KV cache and attention like llama.cpp's CPU backend (slow)")


def _add_sampling(p):
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=64)
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.0,
                   help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ggtorch", description="Run, inspect and debug GGUF models on PyTorch.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("inspect", help="metadata, tensor table and type histogram of a GGUF file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("dequant", help="dequantize tensors to float32 arrays in an .npz")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--tensor", action="append", default=[], help="tensor name (repeatable); default all")

    p = sub.add_parser("run", help="generate a continuation of a prompt")
    _add_model(p, optional=True)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--json", action="store_true")
    _add_sampling(p)

    p = sub.add_parser("tokenize", help="token ids of a text")
    _add_model(p)
    p.add_argument("text")
    p.add_argument("--special", action="store_true", help="parse special/control tokens in the text")
    p.add_argument("--bos", action="store_true", help="add BOS (as the metadata's add_bos_token would)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("logits", help="logits of a token sequence (float32, all positions) to .npy")
    _add_model(p)
    p.add_argument("--tokens", required=True, help="comma-separated ids, e.g. 1,2,3")
    p.add_argument("--out", required=True)

    p = sub.add_parser("perplexity", help="perplexity of a text file, llama-perplexity's method")
    _add_model(p)
    p.add_argument("--file", required=True)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save-logits", default=None, help="save the scored logits' log-probs to an .npz for --kl-base")
    p.add_argument("--kl-base", default=None, help="compare against a --save-logits file: KL, top-1 agreement")

    p = sub.add_parser("bench", help="prefill/decode speed, load time, peak RSS")
    _add_model(p, optional=True)
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--json", action="store_true")
    _add_debug(sub)
    return ap


def _add_input(p):
    p.add_argument("-p", "--prompt", default=None, help="text (BOS added as the model asks, special tokens parsed)")
    p.add_argument("--tokens", default=None, help="comma-separated token ids instead of a prompt")


def _add_inject(p):
    p.add_argument("--inject", action="append", default=[], metavar="FAULT",
                   help="runtime fault in the forward: position-offset[=N], no-causal-mask, rms-eps[=X] (repeatable)")


def _add_debug(sub):
    # trace and diff compare numbers, so they default to the exact float32 path (--fast to trace the kernels)
    p = sub.add_parser("trace", help="per-layer table of named intermediate tensors (llama.cpp names)")
    _add_model(p)
    p.set_defaults(fast=False)
    _add_input(p)
    _add_inject(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", default=None, metavar="FILE.safetensors", help="save the full tensors")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot per-layer RMS")

    p = sub.add_parser("diff", help="compare traces with another GGUF, a saved trace or llama.cpp; "
                                    "exit 1 on divergence")
    _add_model(p)
    p.set_defaults(fast=False)
    p.add_argument("model_b", nargs="?", default=None, help="another GGUF of the same model (reference side)")
    p.add_argument("--trace", default=None, metavar="FILE", help="a saved trace (safetensors) as the reference")
    p.add_argument("--llama-cpp", action="store_true", help="llama.cpp (llama-cpp-python) on MODEL as the reference")
    _add_input(p)
    _add_inject(p)
    p.add_argument("--tol", type=float, default=0.15, help="largest relative L2 error (default 0.15)")
    p.add_argument("--min-cosine", type=float, default=0.99, help="smallest cosine similarity (default 0.99)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot the error by layer")

    p = sub.add_parser("lens", help="logit lens: top-k next tokens after every layer")
    _add_model(p)
    _add_input(p)
    p.add_argument("-k", "--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check", help="scan every tensor (NaN/Inf, gguf-py equality) and the metadata")
    p.add_argument("file", help="a .gguf path or a packaged model name")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with gguf-py")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plant", help="write a copy of a GGUF carrying a classic porting bug (for diff demos)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--fault", required=True, help="q6k-sequential, transpose or unpermute-qk")
    p.add_argument("--tensor", default=None, help="tensor to break (default: a suitable one)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import commands, commands_debug

        fn = getattr(commands, "cmd_" + args.cmd, None) or getattr(commands_debug, "cmd_" + args.cmd)
        return int(fn(args) or 0)
    except GGTorchError as e:
        print(f"ggtorch {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"ggtorch {args.cmd}: error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
