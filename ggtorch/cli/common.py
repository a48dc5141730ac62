"""What every command group shares: model and sampling options, loading, JSON output, id lists."""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager

from ..errors import GGTorchError


def add_model(p, optional=False):
    if optional:
        p.add_argument("model", nargs="?", default="smollm2-135m",
                       help="a .gguf path or a packaged model name (smollm2-135m, gemma3-270m); default smollm2-135m")
    else:
        p.add_argument("model", help="a .gguf path or a packaged model name (smollm2-135m, gemma3-270m)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--exact", dest="fast", action="store_false",
                   help="the float32 reference path: dequantize GGUF blocks on every call (slow). The default "
                        "repacks each weight once (cached on disk) for a C++ kernel compiled on first use: the file's "
                        "bits and block scales kept, activations quantized to int8 as llama.cpp does, for "
                        "Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS, IQ3_S, IQ3_XXS, IQ2_XXS/IQ2_XS/IQ2_S, "
                        "IQ1_S/IQ1_M; other types, or without a C++ "
                        "compiler, PyTorch's int4/int8 kernels with bf16 activations")
    p.add_argument("--fast", dest="fast", action="store_true",
                   help="the default path's kernels (see --exact); the default except for trace and diff, "
                        "which compare numbers")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="repack the weights without reading or writing the repack cache (~/.cache/ggtorch/repack)")
    p.add_argument("--ggml-numerics", action="store_true",
                   help="round activations, KV cache and attention like llama.cpp's CPU backend (slow)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA adapter (llama.cpp adapter .gguf or PEFT directory) at scale 1 (repeatable)")
    p.add_argument("--lora-scaled", action="append", default=[], nargs=2, metavar=("FILE", "SCALE"),
                   help="LoRA adapter with a user scale (repeatable)")


def add_sampling(p):
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


def add_structured(p):
    """--json-schema, --grammar: structured output (run, chat)."""
    g = p.add_argument_group("structured output")
    g.add_argument("--json-schema", default=None, metavar="FILE|JSON",
                   help="the output is JSON that validates against this JSON schema (a file or the JSON text)")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="the output follows this llama.cpp GBNF grammar (a file, or the grammar text itself)")


def structured_kwargs(a) -> dict:
    """json_schema= / grammar= from --json-schema / --grammar (files read here; compiled by the model)."""
    out = {}
    if getattr(a, "json_schema", None) is not None:
        v = a.json_schema
        if v.lstrip()[:1] in ("{", "[") or v.strip() in ("true", "false"):
            out["json_schema"] = v
        else:
            out["json_schema"] = _read(v, "--json-schema", "a JSON schema file or JSON text")
    if getattr(a, "grammar", None) is not None:
        v = a.grammar
        out["grammar"] = v if "::=" in v and not os.path.isfile(v) else _read(v, "--grammar", "a GBNF grammar file")
    return out


def _read(path: str, opt: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise GGTorchError(f"{opt} expects {what}; cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from None


def add_context(p, ctx_help=None):
    """--ctx, --cache-type, --context-shift, --keep: the context window (run, chat, serve; perplexity has --ctx)."""
    g = p.add_argument_group("context")
    g.add_argument("-c", "--ctx", type=int, default=None, metavar="N",
                   help=ctx_help or "context window in tokens (default: the model's trained context, capped at "
                                    "4096); a prompt plus -n that does not fit is refused")
    g.add_argument("--cache-type", default=None, choices=["f16", "bf16", "f32"],
                   help="KV cache storage type (default f16, as llama.cpp)")
    g.add_argument("--context-shift", action="store_true",
                   help="when the context fills during generation, drop the oldest half of the tokens after "
                        "the first --keep and go on (llama.cpp's --context-shift)")
    g.add_argument("--keep", type=int, default=0, metavar="N",
                   help="tokens kept at the start (after BOS) when the context shifts (llama.cpp's --keep)")


def add_input(p):
    p.add_argument("-p", "--prompt", default=None, help="text (BOS added as the model asks, special tokens parsed)")
    p.add_argument("--tokens", default=None, help="comma-separated token ids instead of a prompt")


def add_inject(p):
    p.add_argument("--inject", action="append", default=[], metavar="FAULT",
                   help="runtime fault in the forward: position-offset[=N], no-causal-mask, rms-eps[=X] (repeatable)")



def load(a):
    """The model the options name (with --ctx/--cache-type/--context-shift where the command has them).
    A context above the trained one warns: :func:`show_context` prints that with the choice made."""
    import warnings

    from ..api import load as _load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = _load(a.model, device=a.device, threads=a.threads, fast=a.fast,
                  ggml_numerics=getattr(a, "ggml_numerics", False), n_ctx=getattr(a, "ctx", None),
                  kv_dtype=getattr(a, "cache_type", None), context_shift=getattr(a, "context_shift", False),
                  cache=getattr(a, "cache", True), lora=lora_specs(a))
    m.load_warnings = [str(w.message) for w in caught]
    return m


def lora_specs(a) -> list:
    """[(path, scale)] from --lora and --lora-scaled."""
    out = [(f, 1.0) for f in getattr(a, "lora", None) or []]
    for f, s in getattr(a, "lora_scaled", None) or []:
        try:
            out.append((f, float(s)))
        except ValueError:
            raise GGTorchError(f"--lora-scaled {f} {s}: the scale must be a number") from None
    return out


def show_context(m) -> None:
    """One stderr line with the context and KV cache chosen (after the input was checked, so that bad
    input still gets exactly one line), preceded by the warning, if any."""
    for w in getattr(m, "load_warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(f"[{m.context_info()}]", file=sys.stderr)


def sampling_kwargs(a) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                typical_p=a.typical_p, repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n,
                presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty, seed=a.seed,
                stop=a.stop, ignore_eos=a.ignore_eos,
                **({"n_keep": a.keep} if hasattr(a, "keep") else {}), **structured_kwargs(a))


def print_json(obj) -> None:
    def clean(v):  # JSON has no NaN/Infinity
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    json.dump(clean(obj), sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


def parse_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise GGTorchError(f"--tokens must be comma-separated integers, got {s!r}") from None
    if not ids:
        raise GGTorchError("--tokens is empty")
    return ids


@contextmanager
def written_atomically(path: str):
    """A temporary name next to ``path`` to write to: on success it is renamed to ``path``; on an error or
    Ctrl-C it is removed. Readers never see a partial file, and an interrupted command leaves none."""
    ext = os.path.splitext(path)[1]
    tmp = f"{path}.part{ext}"  # the same extension: numpy appends .npz to names without it
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
