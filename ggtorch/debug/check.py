"""``ggtorch check``: is this GGUF sound? Every tensor dequantized and scanned for NaN/Inf, compared
bit for bit against gguf-py when it is installed, and the metadata a runtime needs looked over."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

from ..errors import GGTorchError
from ..gguf.reader import GGUFFile
from ..quant.dequant import DEQUANTIZERS, dequantize

_NEED = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count")
_DEFAULTED = {"attention.head_count_kv": "head_count", "rope.freq_base": "10000",
              "attention.layer_norm_rms_epsilon": "none: llama.cpp refuses the file"}
_CHUNK = 1 << 22  # values dequantized at a time


def _gguf_py():
    try:
        import gguf.quants
        return gguf
    except ImportError:
        return None


def check_metadata(f: GGUFFile) -> tuple[list[str], list[str], list[str]]:
    """(problems, warnings, notes) about the metadata."""
    problems, warns, notes = [], [], []
    arch = f.metadata.get("general.architecture")
    if not arch:
        return ["general.architecture is missing"], warns, notes
    from ..model.config import SUPPORTED

    if arch not in SUPPORTED:
        warns.append(f"architecture {arch!r} is not one ggtorch runs ({', '.join(SUPPORTED)})")
    for k in _NEED:
        if f.arch_key(k) is None and not (k == "feed_forward_length" and arch == "gpt-oss"):
            problems.append(f"missing hyper-parameter {arch}.{k}")
    if arch in SUPPORTED:  # the architecture's own keys and the tensor shapes they imply
        from ..errors import ModelError
        from ..model.config import Config, validate

        try:
            cfg = Config.from_gguf(f)
        except ModelError as e:
            problems.append(str(e))
        else:
            problems += [p for p in validate(f, cfg) if p not in problems]
            if arch == "gemma2":
                for k, d in (("attn_logit_softcapping", 50), ("final_logit_softcapping", 30)):
                    if f.arch_key(k) is None:
                        warns.append(f"{arch}.{k} is absent (default: {d})")
            if cfg.n_expert:
                notes.append(f"mixture of experts: {cfg.n_expert_used} of {cfg.n_expert} experts per token, "
                             f"{cfg.expert_gating} gating")
            if cfg.sliding_window:
                notes.append(f"sliding-window attention ({cfg.sliding_window} tokens) on layers "
                             f"{[il for il in range(cfg.n_layer) if cfg.is_swa(il)]}")
    for k, default in _DEFAULTED.items():
        if f.arch_key(k) is None:
            (problems if k.endswith("epsilon") and arch in SUPPORTED else warns).append(
                f"{arch}.{k} is absent (default: {default})")
    model = f.metadata.get("tokenizer.ggml.model")
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        problems.append("no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    else:
        for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            v = f.metadata.get(k)
            if v is not None and len(v) != len(tokens):
                problems.append(f"{k} has {len(v)} entries, tokenizer.ggml.tokens has {len(tokens)}")
        if model == "gpt2":
            from ..tokenizer import PRE_TOKENIZERS

            pre = f.metadata.get("tokenizer.ggml.pre")
            if pre is None:
                problems.append("tokenizer.ggml.pre is missing: BPE pre-tokenization falls back to 'default' "
                                "and tokens will differ from the original tokenizer")
            elif pre not in PRE_TOKENIZERS:
                warns.append(f"tokenizer.ggml.pre {pre!r} is unknown to ggtorch (default regex used)")
            if f.metadata.get("tokenizer.ggml.merges") is None:
                problems.append("BPE tokenizer without tokenizer.ggml.merges")
        emb = f.tensors.get("token_embd.weight")
        if emb is not None and emb.shape[-1] != len(tokens):
            warns.append(f"token_embd has {emb.shape[-1]} rows, the vocabulary {len(tokens)} pieces")
    if "token_embd.weight" in f.tensors and "output.weight" not in f.tensors:
        notes.append("output.weight absent: the output projection is tied to token_embd.weight")
    hist = Counter(ti.type.name if ti.type else f"unknown({ti.type_id})" for ti in f)
    if len([t for t in hist if t not in ("F32",)]) > 1:
        notes.append("mixed tensor types: " + ", ".join(f"{t} x{n}" for t, n in hist.most_common()))
    return problems, warns, notes


def check_tensor(f: GGUFFile, name: str, gg=None) -> dict:
    ti = f.info(name)
    out = {"tensor": name, "type": ti.type.name if ti.type else f"unknown({ti.type_id})",
           "shape": list(ti.shape), "nan": 0, "inf": 0, "absmax": 0.0, "gguf_py": None}
    if ti.type is None or ti.type.name not in DEQUANTIZERS:
        out["error"] = f"no dequantizer for {out['type']}"
        return out
    raw = f.raw(name)
    row_bytes = ti.shape[0] // ti.type.block_size * ti.type.type_size
    rows = max(1, _CHUNK // max(ti.shape[0], 1))
    same = True if gg is not None else None
    for r0 in range(0, len(raw) // row_bytes, rows):
        part = raw[r0 * row_bytes:(r0 + rows) * row_bytes]
        x = dequantize(part, ti.type).numpy()
        fin = np.isfinite(x)
        out["nan"] += int(np.isnan(x).sum())
        out["inf"] += int((~fin).sum()) - int(np.isnan(x).sum())
        if fin.any():
            out["absmax"] = max(out["absmax"], float(np.abs(x[fin]).max()))
        if gg is not None and same:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = gg.quants.dequantize(np.asarray(part), gg.GGMLQuantizationType(ti.type_id)).reshape(-1)
            same = ref.shape == x.shape and bool(np.array_equal(ref.astype(np.float32), x, equal_nan=True))
    out["gguf_py"] = same
    return out


def check(path: str, compare: bool = True, progress=None) -> dict:
    """Problems make the verdict FAIL; warnings and notes are reported only."""
    with GGUFFile(path) as f:
        problems, warns, notes = check_metadata(f)
        gg = _gguf_py() if compare else None
        if compare and gg is None:
            notes.append("gguf-py not installed: tensors not compared against it (pip install gguf)")
        results = []
        names = list(f.tensors)
        for i, n in enumerate(names):
            try:
                r = check_tensor(f, n, gg)
            except (GGTorchError, ValueError, KeyError) as e:
                r = {"tensor": n, "error": str(e)}
            results.append(r)
            if r.get("error"):
                problems.append(f"{n}: {r['error']}")
            elif r["nan"] or r["inf"]:
                problems.append(f"{n}: {r['nan']} NaN and {r['inf']} Inf values")
            elif r["gguf_py"] is False:
                problems.append(f"{n}: dequantized values differ from gguf-py's")
            if progress:
                progress(i + 1, len(names), n)
    compared = sum(1 for r in results if r.get("gguf_py") is True)
    vs = f"{compared} identical to gguf-py" if gg is not None else "not compared with gguf-py"
    verdict = (f"{'FAIL' if problems else 'OK'}: {len(results)} tensors scanned, {vs}, "
               f"{len(problems)} problems, {len(warns)} warnings")
    return {"file": str(path), "verdict": verdict, "ok": not problems, "problems": problems,
            "warnings": warns, "notes": notes, "tensors": results}


def format_check(r: dict) -> str:
    lines = [f"problem: {p}" for p in r["problems"]] + [f"warning: {w}" for w in r["warnings"]]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines + [r["verdict"]])
