"""llguidance vs xgrammar on ggtorch's own tokenizers: which constrained-decoding library to use.

For SmolLM2 (byte-level BPE, 49,152 tokens) and Gemma 3 270M (SentencePiece, 262,144 tokens), both fed the
same token bytes from the GGUF vocabulary (ggtorch/constrain.py's bridge), with compact JSON (no free
whitespace, "," and ":" separators) and closed objects:

- vocabulary set-up (llguidance: ggtorch.constrain.bridge, token bytes included; xgrammar: TokenizerInfo
  and GrammarCompiler from the same bytes, which are timed apart);
- schema compile (a nested schema; and GBNF);
- per-step mask for 1 and 8 rows while decoding a valid document, the first time a grammar is used (cold)
  and again (warm): the library's bitmask, then the bool [rows, n_vocab] mask ggtorch's sampler takes
  (llguidance through ggtorch.constrain.fill_masks itself);
- bad schemas: the error, or how long a pathological one runs (llguidance has fuel limits; a compile
  still running after --limit seconds is reported as such);
- install size and dependencies of each wheel.

    python benchmarks/constrain_libs.py [--limit 10] [--json]
    python benchmarks/constrain_libs.py --speed [--models smollm2-135m]   # constrained vs free tok/s

Figures on a shared machine are noisy: compare the two columns of one run.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import statistics
import threading
import time

import numpy as np
import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "favourite": {"enum": ["red", "green", "blue"]},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip_code": {"type": "integer"}},
                    "required": ["city", "zip_code"], "additionalProperties": False},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "age", "height_m", "favourite", "colors", "address"],
    "additionalProperties": False,
}
DOC = ('{"name":"Ada Lovelace","age":36,"height_m":1.65,"favourite":"blue","colors":["red","blue"],'
       '"address":{"city":"London","zip_code":10001},"nickname":null}')
GBNF = 'root ::= "The answer is " ("yes" | "no") "."'
BAD = {
    "unknown type": {"type": "frobnicate"},
    "dangling $ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    "huge minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 100000},
    "huge string bounds": {"type": "string", "minLength": 5000, "maxLength": 50000},
    "exploding pattern": {"type": "string", "pattern": "(a|b|ab|ba)*c(a|b){30}"},
}


def _timed(fn, limit: float):
    """(seconds, result or exception) of fn() on a daemon thread; (None, 'still running') past limit."""
    box = {}

    def work():
        t = time.perf_counter()
        try:
            box["r"] = fn()
        except Exception as e:  # noqa: BLE001 - reporting what each library raises
            box["r"] = e
        box["t"] = time.perf_counter() - t

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(limit)
    if th.is_alive():
        return None, f"still running after {limit:g} s"
    return box["t"], box["r"]


def _median_ms(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _bool_mask(bm: np.ndarray, n_vocab: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bm.view(np.uint8), axis=1, count=n_vocab, bitorder="little").view(np.bool_))


def token_bytes(tok) -> list[bytes]:
    from ggtorch.constrain import _Vocab

    return _Vocab(tok).tokens


# ---- llguidance (through ggtorch.constrain, as the engine uses it) ---------------------------------------
def _steps(fill, advance, doc_ids, n):
    """Per-step seconds of fill() (-> bool mask [rows, n]) over the document, checking each token is allowed."""
    step = []
    for tid in doc_ids:
        t0 = time.perf_counter()
        mask = fill()
        step.append(time.perf_counter() - t0)
        assert mask.shape[1] == n and mask[0, tid], "the document's token is not allowed"
        advance(tid)
    return step


def bench_llguidance(tok, doc_ids, vocab, limit):
    import llguidance as llg
    from llguidance.gbnf_to_lark import any_to_lark

    from ggtorch import constrain

    out = {}
    t = time.perf_counter()
    b = constrain.bridge(tok)  # token bytes + LLTokenizer; the bytes alone are timed in main()
    out["vocab_setup_s"] = time.perf_counter() - t
    n = tok.n_vocab

    def compile_schema(s):
        m = llg.LLMatcher(b.lltok, llg.LLMatcher.grammar_from_json_schema(s, overrides=constrain.JSON_OPTIONS),
                          log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    out["schema_compile_ms"] = _median_ms(lambda: compile_schema(SCHEMA), 5)
    g = constrain.compile_constraint(tok, json_schema=SCHEMA)
    for rows in (1, 8):
        for phase in ("cold", "warm"):  # the lexer's states are built lazily, then shared by the copies
            if phase == "cold":
                g = constrain.Grammar(b, "json_schema", "", compile_schema(constrain._closed(SCHEMA)))
            cs = [g.new() for _ in range(rows)]
            step = _steps(lambda: constrain.fill_masks(cs, rows, n), lambda t: [c.advance(t) for c in cs],
                          doc_ids, n)
            out[f"mask_ms_{rows}_rows_{phase}"] = statistics.median(step) * 1e3
            out[f"mask_ms_{rows}_rows_{phase}_max"] = max(step) * 1e3
    t = time.perf_counter()
    m = llg.LLMatcher(b.lltok, llg.LLMatcher.grammar_from_lark(any_to_lark(GBNF)), log_level=0)
    out["gbnf"] = f"yes ({(time.perf_counter() - t) * 1e3:.1f} ms)" if not m.is_error() else m.get_error()
    bad = {}
    for name, s in BAD.items():
        t, r = _timed(lambda s=s: compile_schema(s), limit)
        bad[name] = (f"error after {t * 1e3:.0f} ms: {str(r)[:90]}" if isinstance(r, Exception) else
                     f"compiled in {t * 1e3:.0f} ms" if t is not None else r)
    out["bad_schemas"] = bad
    return out


# ---- xgrammar ---------------------------------------------------------------------------------------------
def bench_xgrammar(tok, doc_ids, vocab, limit):
    import xgrammar as xgr

    out = {}
    # xgrammar has no special-token prefix: control tokens get an empty string (never allowed)
    vocab = [b"" if v.startswith(b"\xff") else v for v in vocab]
    t = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.n_vocab, stop_token_ids=sorted(tok.eog_ids))
    comp = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    out["vocab_setup_s"] = time.perf_counter() - t
    n = tok.n_vocab

    def compile_schema(s):
        return comp.compile_json_schema(json.dumps(s), any_whitespace=False, separators=(",", ":"), strict_mode=True)

    out["schema_compile_ms"] = _median_ms(lambda: compile_schema(SCHEMA), 3)
    cg = compile_schema(SCHEMA)
    words = (n + 31) // 32
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    for rows in (1, 8):
        for phase in ("cold", "warm"):  # xgrammar precomputes its masks when compiling: no difference
            ms = [xgr.GrammarMatcher(cg) for _ in range(rows)]
            bm = torch.empty((rows, words), dtype=torch.int32)

            def fill():
                if rows == 1:
                    ms[0].fill_next_token_bitmask(bm, 0)
                else:
                    batch.batch_fill_next_token_bitmask(ms, bm)
                return _bool_mask(bm.numpy(), n)

            step = _steps(fill, lambda t: [m.accept_token(t) for m in ms], doc_ids, n)
            out[f"mask_ms_{rows}_rows_{phase}"] = statistics.median(step) * 1e3
            out[f"mask_ms_{rows}_rows_{phase}_max"] = max(step) * 1e3
    t, r = _timed(lambda: comp.compile_grammar(GBNF), limit)
    out["gbnf"] = f"yes ({t * 1e3:.1f} ms)" if t is not None and not isinstance(r, Exception) else str(r)
    bad = {}
    for name, s in BAD.items():
        t, r = _timed(lambda s=s: compile_schema(s), limit)
        bad[name] = (f"error after {t * 1e3:.0f} ms: {' '.join(str(r).split())[:90]}" if isinstance(r, Exception)
                     else f"compiled in {t * 1e3:.0f} ms" if t is not None else r)
    out["bad_schemas"] = bad
    return out


# ---- constrained vs free decoding in ggtorch ----------------------------------------------------------------
PROMPTS = ["Describe a person as JSON:", "Here is a record of a customer:", "Profile:", "A character sheet:",
           "Data about a scientist:", "Employee entry:", "The next JSON line:", "Someone famous, as JSON:"]


def constrained_vs_free(model, rounds: int = 3, max_tokens: int = 48) -> dict:
    """Decode tokens/s with a JSON schema vs without, 1 sequence (Model.generate) and 8 (generate_batch),
    same prompts, the two modes interleaved ``rounds`` times; free runs use ignore_eos so both produce
    about the same number of tokens. Returns medians and the constrained/free ratios."""
    def one(constrained: bool) -> float:
        kw = dict(json_schema=SCHEMA) if constrained else dict(ignore_eos=True)
        r = model.generate(PROMPTS[0], max_tokens=max_tokens, **kw)
        return r.timings.gen_tokens / r.timings.gen_s

    def eight(constrained: bool) -> float:
        kw = dict(json_schema=SCHEMA) if constrained else dict(ignore_eos=True)
        t = time.perf_counter()
        rs = model.generate_batch(PROMPTS, parallel=8, max_tokens=max_tokens, **kw)
        return sum(r.timings.gen_tokens for r in rs) / (time.perf_counter() - t)

    one(True), eight(True)  # warm-up: compile, lexer states, kernels
    res = {k: [] for k in ("1_free", "1_json", "8_free", "8_json")}
    for k in range(rounds):
        res["1_free"].append(one(False))
        res["1_json"].append(one(True))
        res["8_free"].append(eight(False))
        res["8_json"].append(eight(True))
        print(f"  round {k}: " + ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in res.items()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    med["ratio_1"] = med["1_json"] / med["1_free"]
    med["ratio_8"] = med["8_json"] / med["8_free"]
    return med


def install_size(dist: str) -> tuple[float, list[str]]:
    """(MiB on disk, its requirements) of an installed distribution."""
    d = md.distribution(dist)
    size = sum((f.size or 0) for f in d.files or [])
    reqs = [r.split(";")[0].strip() for r in (d.requires or []) if "extra ==" not in r]
    return size / 2**20, reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=10.0, help="seconds a bad schema may compile before we stop waiting")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--speed", action="store_true",
                    help="instead: ggtorch's decode tokens/s with a JSON schema vs without (1 and 8 sequences)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import ggtorch

    if a.speed:
        for name in a.models:
            r = constrained_vs_free(ggtorch.load(name), rounds=a.rounds)
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
        return
    torch.set_num_threads(1)

    report = {"install": {}}
    for dist in ("llguidance", "xgrammar"):
        try:
            mib, reqs = install_size(dist)
            extra = {r.split(">")[0].split("=")[0].split("<")[0].strip(): round(install_size(
                r.split(">")[0].split("=")[0].split("<")[0].strip())[0], 1)
                for r in reqs if _installed(r)}
            report["install"][dist] = {"MiB": round(mib, 1), "requires": reqs, "requires_MiB": extra}
        except md.PackageNotFoundError:
            report["install"][dist] = "not installed"
    for name in a.models:
        tok = ggtorch.load(name).tokenizer
        doc_ids = tok.tokenize(DOC)
        t = time.perf_counter()
        vocab = token_bytes(tok)
        r = {"n_vocab": tok.n_vocab, "tokenizer": tok.model, "doc_tokens": len(doc_ids),
             "token_bytes_s": time.perf_counter() - t}
        for lib, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            try:
                r[lib] = fn(tok, doc_ids, vocab, a.limit)
            except ImportError as e:
                r[lib] = f"not installed: {e}"
        report[name] = r
    if a.json:
        print(json.dumps(report, indent=1, default=str))
        return
    print("install:", json.dumps(report["install"], indent=1))
    for name in a.models:
        r = report[name]
        print(f"\n{name} ({r['tokenizer']}, {r['n_vocab']} tokens; document of {r['doc_tokens']} tokens; "
              f"token bytes from the GGUF vocabulary {r['token_bytes_s']:.2f} s)")
        keys = ["vocab_setup_s", "schema_compile_ms"] + [f"mask_ms_{k}_rows_{p}{m}" for k in (1, 8)
                                                           for p in ("cold", "warm") for m in ("", "_max")] + ["gbnf"]
        print(f"  {'':22} {'llguidance':>28} {'xgrammar':>28}")
        for k in keys:
            vals = [r[lib].get(k) if isinstance(r[lib], dict) else "-" for lib in ("llguidance", "xgrammar")]
            print(f"  {k:22} " + " ".join(f"{v:>28.3f}" if isinstance(v, float) else f"{str(v):>28}" for v in vals))
        for lib in ("llguidance", "xgrammar"):
            if isinstance(r[lib], dict):
                for bname, v in r[lib]["bad_schemas"].items():
                    print(f"  {lib:10} bad schema {bname:20} {v}")


def _installed(req: str) -> bool:
    name = req.split(">")[0].split("=")[0].split("<")[0].strip()
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
