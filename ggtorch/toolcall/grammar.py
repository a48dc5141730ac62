"""Forced tool calls (``tool_choice`` ``required`` or a named function) as llguidance Lark grammars, in
the syntax of the template's format, each call's arguments an embedded ``%json`` schema (the
function's ``parameters``), as llama.cpp builds a grammar per format (common_chat_params_init_*).

One call, or one or more when ``parallel_tool_calls``. Literal markers are written as text: the
vocabulary bridge of ggtorch.constrain keeps control tokens out of reach of grammar text, and the
parsers read the marker's text the same whichever tokens spelled it. Harmony's markers are its own
special tokens, named as llguidance names them (``<|channel|>``).
"""
from __future__ import annotations

import json

# compact JSON without free whitespace, as ggtorch.constrain compiles schemas (a small model given
# the freedom writes runs of spaces and newlines)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _json(schema: dict) -> str:
    s = dict(schema)
    s["x-guidance"] = {**JSON_OPTIONS, **s.get("x-guidance", {})}
    return "%json " + json.dumps(s, ensure_ascii=False)


def closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object that has ``properties`` and does
    not say otherwise: llama.cpp's json-schema-to-grammar reads a missing additionalProperties so
    (JSON Schema would allow any extra key, and a small model then writes keys until max_tokens)."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "$defs", "definitions", "patternProperties") and isinstance(v, dict):
            out[k] = {name: closed(sub) for name, sub in v.items()}
        elif k in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "additionalProperties"):
            out[k] = closed(v)
        else:
            out[k] = v
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _params(fn: dict) -> dict:
    p = fn.get("parameters")
    return closed(p) if isinstance(p, dict) and p else {"type": "object"}


def call_schema(fn: dict, name_key: str = "name", args_key: str = "arguments", extra: dict | None = None) -> dict:
    """``{"name": <const>, "arguments": <parameters>}`` (name first: llguidance keeps the order)."""
    props = {name_key: {"const": fn["name"]}, args_key: _params(fn)}
    req = [name_key, args_key]
    for k, v in (extra or {}).items():
        props[k] = v
        req.append(k)
    return {"type": "object", "properties": props, "required": req, "additionalProperties": False}


def _repeat(rule: str, sep: str, parallel: bool) -> str:
    if not parallel:
        return rule
    return f"{rule}+" if not sep else f"{rule} ({_lit(sep)} {rule})*"


def _alts(prefix: str, bodies: list[str]) -> list[str]:
    """Rules ``prefix: a | b ...`` with one sub-rule per function."""
    names = [f"{prefix}_{i}" for i in range(len(bodies))]
    return [f"{prefix}: " + " | ".join(names)] + [f"{n}: {b}" for n, b in zip(names, bodies)]


def forced_grammar(fmt: str, functions: list[dict], parallel: bool, thinking_open: bool = False,
                   mistral_args: bool = False) -> str:
    """The Lark grammar that makes the answer one (or, parallel, several) calls of ``functions``
    (each ``{"name", "parameters"}``) in format ``fmt``."""
    lines: list[str] = []
    head = '"</think>\\n\\n" ' if thinking_open and fmt != "harmony" else ""
    if fmt == "hermes":
        lines.append(f"start: {head}{_repeat('tc', chr(10), parallel)}")
        lines.append('tc: "<tool_call>\\n" call "\\n</tool_call>"')
        lines += _alts("call", [_json(call_schema(f)) for f in functions])
    elif fmt == "llama3":
        lines.append(f"start: {head}{_repeat('call', '; ', parallel)}")
        lines += _alts("call", [_json(call_schema(f, args_key="parameters")) for f in functions])
    elif fmt == "mistral" and mistral_args:
        lines.append(f"start: {head}{_repeat('tc', '', parallel)}")
        lines += _alts("tc", [f"{_lit('[TOOL_CALLS]' + f['name'] + '[ARGS]')} {_json(_params(f))}" for f in functions])
    elif fmt in ("mistral", "granite"):
        extra = {"id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}} if fmt == "mistral" else None
        marker = "[TOOL_CALLS]" if fmt == "mistral" else "<|tool_call|>"
        lines.append(f'start: {head}{_lit(marker + "[")} {_repeat("call", ",", parallel)} "]"')
        lines += _alts("call", [_json(call_schema(f, extra=extra)) for f in functions])
    elif fmt == "harmony":
        lines.append("start: tc")  # a call ends the turn (<|call|>): one per answer
        bodies = [f"<|channel|> {_lit('commentary to=functions.' + f['name'] + ' ')} <|constrain|> \"json\" "
                  f"<|message|> {_json(_params(f))}" for f in functions]
        lines += _alts("tc", bodies)
    else:  # generic: the whole answer is one JSON object
        one = {"anyOf": [call_schema(f) for f in functions]} if len(functions) > 1 else call_schema(functions[0])
        if parallel:
            schema = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}},
                      "required": ["tool_calls"], "additionalProperties": False}
        else:
            schema = {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"],
                      "additionalProperties": False}
        lines.append(f"start: {head}{_json(schema)}")
    return "\n".join(lines) + "\n"
