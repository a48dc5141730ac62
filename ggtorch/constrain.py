"""Structured outputs: a JSON schema, grammar or regex turned into a token mask per sequence per step.

Library: llguidance (the constrained-decoding engine behind llama.cpp's ``LLAMA_LLGUIDANCE`` build and
one of vLLM's backends). Measured against xgrammar on our two tokenizers by
``benchmarks/constrain_libs.py`` (figures in the README); llguidance was chosen because it sets up a
vocabulary in a fraction of a second, compiles a schema in milliseconds (xgrammar precomputes masks per
grammar and takes far longer on a 262k vocabulary), computes a mask in tens of microseconds, has a
time/fuel limit on both compile and per-step work and reports a bad schema as an error instead of
hanging, reads Lark (with embedded ``%json`` schemas, which the tool-call grammars use) as well as GBNF,
and is one ~8 MB wheel with no dependencies (xgrammar pulls in transformers, triton and tvm-ffi).

The pieces:

- the vocabulary bridge (:func:`bridge`), built once per tokenizer from the GGUF vocabulary: each
  token's bytes are what ``Tokenizer.piece`` appends mid-text (SentencePiece ``▁`` -> space and
  ``<0xXX>`` byte pieces, GPT-2 byte alphabet -> bytes); a token whose piece is empty without
  ``special`` (CONTROL/UNKNOWN: ``<|im_end|>``, ``<eos>``, ``<unusedN>`` ...) is marked special with
  llguidance's ``\\xff`` prefix, as llama.cpp's ``llama_sampler_llg_new_tokenizer`` does, so no grammar
  text can produce it; the end-of-generation ids are llguidance's EOS set, allowed exactly when the
  grammar accepts;
- :func:`compile_constraint` -> :class:`Grammar`, compiled once per text (cached), in a worker thread
  with a time limit; whatever the library rejects is a :class:`~ggtorch.errors.ConstraintError`;
- :meth:`Grammar.new` -> :class:`Constraint`, one per sequence: ``fill``/``advance``/``done``;
- :func:`fill_masks`: the bool masks ``[rows, n_vocab]`` of one step, computed only for the constrained
  rows (in parallel by llguidance's executor), None when no row is constrained.

JSON is compiled without flexible whitespace and with compact separators (``,`` and ``:``): a small
model given the freedom writes runs of spaces or newlines between tokens and never closes the object.
"""
from __future__ import annotations

import copy
import json
import os
import threading
import time
import weakref
from collections import OrderedDict

import numpy as np
import torch

from .errors import ConstraintError

# JSON options for every schema we compile (llguidance JsonCompileOptions): no free whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_CACHE_SIZE = 128  # compiled grammars kept per tokenizer


def _llg():
    try:
        import llguidance
    except ImportError as e:  # a declared dependency; a broken install still gets one clear line
        raise ConstraintError(f"structured output needs the llguidance package (pip install llguidance): {e}") from None
    return llguidance


class _Vocab:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS ids and a tokenize function."""

    def __init__(self, tok):
        # llguidance tokenizes forced text mid-output: a SentencePiece tokenizer must not prepend its
        # space there ("es" after "y" would become "▁es"); a shallow copy shares the tables
        self.tok = copy.copy(tok)
        self.tok.add_space_prefix = False
        self.tokens = []
        for i in range(tok.n_vocab):
            p = tok.piece(i)
            if not p:  # control/unknown: reachable only through the grammar's special-token syntax
                s = tok.piece(i, special=True)
                p = b"\xff" + s if s else b""
            self.tokens.append(p)
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids, default=0)
        self.bos_token_id = tok.bos_id
        self.special_token_ids = []

    def __call__(self, text):  # llguidance tokenizes literal text with it (forced tokens, tokenize_str)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tok.tokenize(text)


class Bridge:
    """One tokenizer's vocabulary as llguidance sees it, plus the compiled-grammar cache."""

    def __init__(self, tok):
        llg = _llg()
        t0 = time.perf_counter()
        self.n_tokens = tok.n_vocab
        self.words = (self.n_tokens + 31) // 32  # int32 words of one bitmask row
        self.eog_ids = sorted(int(i) for i in tok.eog_ids if 0 <= i < tok.n_vocab)
        vocab = _Vocab(tok)
        self.lltok = llg.LLTokenizer(llg.TokenizerWrapper(vocab), eos_token=self.eog_ids or None)
        self.setup_s = time.perf_counter() - t0
        self.cache: OrderedDict[tuple[str, str], Grammar | ConstraintError] = OrderedDict()
        self.lock = threading.Lock()


_bridges: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_bridges_lock = threading.Lock()


def bridge(tokenizer) -> Bridge:
    """The tokenizer's :class:`Bridge`, built on first use (~0.5 s for 49k tokens, ~2 s for 262k)."""
    with _bridges_lock:
        b = _bridges.get(tokenizer)
        if b is None:
            b = _bridges[tokenizer] = Bridge(tokenizer)
        return b


class Grammar:
    """A compiled constraint: ``new()`` gives each sequence its own matcher (a copy of a fresh one)."""

    def __init__(self, bridge: Bridge, kind: str, source: str, matcher):
        self.bridge, self.kind, self.source = bridge, kind, source
        self._fresh = matcher
        self.compile_s = 0.0

    def new(self) -> "Constraint":
        return Constraint(self, self._fresh.deep_copy())

    def __repr__(self) -> str:
        return f"Grammar({self.kind}, {len(self.source)} chars)"


class Constraint:
    """One sequence's position in a grammar: which tokens may come next, advanced token by token."""

    __slots__ = ("grammar", "matcher")

    def __init__(self, grammar: Grammar, matcher):
        self.grammar, self.matcher = grammar, matcher

    def fill(self, mask_row: torch.Tensor) -> None:
        """Write this sequence's allowed tokens into a bool row (True = allowed) of any width."""
        mask_row.copy_(fill_masks([self], 1, mask_row.numel())[0])

    def advance(self, token_id: int) -> bool:
        """Take the sampled token; False when the grammar does not allow it (the matcher then stays in
        its error state, and the masks it gives allow only end-of-generation)."""
        return bool(self.matcher.consume_token(int(token_id)))

    @property
    def done(self) -> bool:
        """The grammar is complete and only end-of-generation may follow (also true after an error)."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (end-of-generation is allowed now)."""
        return bool(self.matcher.is_accepting())

    @property
    def error(self) -> str | None:
        e = self.matcher.get_error()
        return e or None


def _source(json_schema, json_object, grammar, lark, regex) -> tuple[str, str]:
    given = [(k, v) for k, v in (("json_schema", json_schema), ("grammar", grammar), ("lark", lark),
                                 ("regex", regex)) if v is not None]
    if json_object:
        given.append(("json_object", '{"type": "object"}'))
    if len(given) != 1:
        names = ", ".join(k for k, _ in given) or "none"
        raise ConstraintError(f"give exactly one of json_schema, json_object, grammar, lark, regex; got {names}")
    kind, v = given[0]
    if kind == "json_schema":
        if hasattr(v, "model_json_schema"):  # a pydantic model class
            v = v.model_json_schema()
        if isinstance(v, (str, bytes)):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(v, bool):  # true accepts any JSON value, false nothing
            v = {} if v else {"not": {}}
        if not isinstance(v, dict):
            raise ConstraintError(f"a JSON schema must be an object (or true/false), got {type(v).__name__}")
        return kind, json.dumps(_closed(v), ensure_ascii=False)
    if not isinstance(v, str):
        raise ConstraintError(f"{kind} must be text, got {type(v).__name__}")
    if not v.strip():
        raise ConstraintError(f"the {kind} is empty")
    return kind, v


_SUB = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "additionalItems", "unevaluatedItems", "unevaluatedProperties")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUB_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def _closed(schema):
    """A copy where an object schema that lists ``properties`` and says nothing of
    ``additionalProperties`` allows no others: what llama.cpp's converter does (common/json-schema.cpp,
    build_object) and xgrammar's strict mode, and what OpenAI's strict schemas say outright. A small model
    given leave to add properties invents them until max_tokens and never closes the object."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict) and not any(
            k in out for k in ("additionalProperties", "unevaluatedProperties", "patternProperties")):
        out["additionalProperties"] = False
    for k in _SUB:
        if isinstance(out.get(k), dict):
            out[k] = _closed(out[k])
    for k in _SUB_LIST:
        if isinstance(out.get(k), list):
            out[k] = [_closed(x) for x in out[k]]
    for k in _SUB_MAP:
        if isinstance(out.get(k), dict):
            out[k] = {n: _closed(x) for n, x in out[k].items()}
    return out


def _to_llg(kind: str, text: str) -> str:
    """The llguidance grammar definition (a JSON text) for a source."""
    llg = _llg()
    M = llg.LLMatcher
    try:
        if kind in ("json_schema", "json_object"):
            return M.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
        if kind == "grammar":  # llama.cpp GBNF (Lark text is passed through by the converter)
            from llguidance.gbnf_to_lark import any_to_lark

            return M.grammar_from_lark(any_to_lark(text))
        if kind == "lark":
            return M.grammar_from_lark(text)
        return M.grammar_from_regex(text)
    except Exception as e:  # the converters' own ValueErrors and parse errors
        raise ConstraintError(f"the {kind.replace('_', ' ')} is invalid: {_one_line(str(e))}") from None


def _one_line(msg: str, limit: int = 400) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _build(b: Bridge, kind: str, text: str) -> Grammar:
    llg = _llg()
    t0 = time.perf_counter()
    m = llg.LLMatcher(b.lltok, _to_llg(kind, text), log_level=0)
    if m.is_error():
        raise ConstraintError(f"the {kind.replace('_', ' ')} is not accepted by llguidance: {_one_line(m.get_error())}")
    g = Grammar(b, kind, text, m)
    g.compile_s = time.perf_counter() - t0
    return g


def compile_constraint(tokenizer, *, json_schema=None, json_object: bool = False, grammar: str | None = None,
                       lark: str | None = None, regex: str | None = None, timeout_s: float = 5.0) -> Grammar:
    """Compile one constraint for ``tokenizer`` (exactly one of the keywords):

    - ``json_schema``: a dict, JSON text or pydantic model class; ``json_object``: any JSON object;
    - ``grammar``: llama.cpp GBNF text (``root ::= ...``); ``lark``: llguidance Lark (``start: ...``,
      may embed ``%json {...}`` schemas); ``regex``: a regular expression for the whole output.

    Compiled once per text (cached per tokenizer), in a worker thread: one that takes more than
    ``timeout_s`` or that the library rejects raises :class:`~ggtorch.errors.ConstraintError`."""
    kind, text = _source(json_schema, json_object, grammar, lark, regex)
    b = bridge(tokenizer)
    key = (kind, text)
    with b.lock:
        hit = b.cache.get(key)
        if hit is not None:
            b.cache.move_to_end(key)
    if hit is None:
        hit = _limited(lambda: _build(b, kind, text), timeout_s, kind)
        with b.lock:  # failures are kept too: the same bad schema sent again costs nothing
            b.cache[key] = hit
            while len(b.cache) > _CACHE_SIZE:
                b.cache.popitem(last=False)
    if isinstance(hit, ConstraintError):
        raise ConstraintError(str(hit))
    return hit


def _limited(fn, timeout_s: float, kind: str):
    """fn() on a daemon thread, waited for at most timeout_s; a ConstraintError is returned (to be
    cached), not raised. llguidance's own fuel limits end a runaway compile in the background."""
    box: dict = {}

    def work():
        try:
            box["ok"] = fn()
        except ConstraintError as e:
            box["ok"] = e
        except Exception as e:  # noqa: BLE001 - any library failure is the grammar's fault here
            box["ok"] = ConstraintError(f"the {kind.replace('_', ' ')} could not be compiled: {_one_line(str(e))}")

    th = threading.Thread(target=work, name="ggtorch-constrain-compile", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        return ConstraintError(f"compiling the {kind.replace('_', ' ')} took longer than {timeout_s:g} s "
                               f"(simplify it)")
    return box["ok"]


# ---- masks ------------------------------------------------------------------------------------------
_executor = None
_executor_lock = threading.Lock()


def _par():
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = _llg().LLExecutor(num_threads=max(1, min(4, os.cpu_count() or 1)))
        return _executor


def fill_masks(constraints: list, logits_rows: int, n_vocab: int) -> torch.Tensor | None:
    """The allowed tokens of one step: bool ``[logits_rows, n_vocab]``, True = allowed. Row i follows
    ``constraints[i]``; a None entry (or a row past the list) is unconstrained (all True). None when no
    row is constrained. Ids past the tokenizer's vocabulary (a padded output matrix) are never allowed."""
    rows = [(i, c) for i, c in enumerate(constraints[:logits_rows]) if c is not None]
    if not rows:
        return None
    out = np.ones((logits_rows, n_vocab), dtype=np.bool_)
    by_bridge: dict[int, list] = {}
    for i, c in rows:
        by_bridge.setdefault(id(c.grammar.bridge), []).append((i, c))
    for group in by_bridge.values():
        b = group[0][1].grammar.bridge
        bm = np.empty((len(group), b.words), dtype=np.int32)
        if len(group) >= 4 and (os.cpu_count() or 1) > 4:  # rows in parallel, without the GIL
            _par().unsafe_compute_mask_ptr([(c.matcher, k) for k, (_, c) in enumerate(group)],
                                           bm.ctypes.data, b.words * 4, len(group))
        else:  # a mask takes ~5-50 us: on few cores the executor's hand-off costs more than it saves
            for k, (_, c) in enumerate(group):
                c.matcher.unsafe_compute_mask_ptr(bm[k].ctypes.data, b.words * 4)
        # bit j of word w is token 32w + j: little-endian bytes, unpacked least significant bit first
        m = min(n_vocab, b.n_tokens)
        bits = np.unpackbits(bm.view(np.uint8), axis=1, count=m, bitorder="little")
        idx = [i for i, _ in group]
        out[idx, :m] = bits.view(np.bool_)
        if m < n_vocab:
            out[idx, m:] = False
        for i, c in group:
            if c.matcher.is_error():  # a broken state ends the sequence: end-of-generation only
                out[i] = False
                out[i, [t for t in b.eog_ids if t < n_vocab]] = True
    return torch.from_numpy(out)
    return out


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Logits with the disallowed tokens at -inf (a new tensor; ``allowed`` None: unchanged)."""
    if allowed is None:
        return logits
    return torch.where(allowed.to(logits.device), logits, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def json_lark(schema) -> str:
    """A Lark ``%json`` fragment for ``schema`` with the same compact JSON options as ``json_schema=``
    (for grammars that embed a schema, e.g. a tool call: ``start: "<tool_call>" %json{...} "</tool_call>"``)."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    s = dict(schema)
    s["x-guidance"] = {**JSON_OPTIONS, **s.get("x-guidance", {})}
    return "%json " + json.dumps(s, ensure_ascii=False)
