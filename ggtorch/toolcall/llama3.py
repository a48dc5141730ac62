"""Llama 3.1 / 3.2 / 3.3: a JSON object ``{"name": ..., "parameters": {...}}`` (the templates' "custom
tool" instructions), and the built-in tools after ``<|python_tag|>``: ``brave_search.call(query="...")``
or plain code for the code interpreter.

As llama.cpp's Llama 3.x parser (common_chat_parse_llama_3_1): a call object may stand anywhere in the
answer, optionally with ``"type": "function"`` first; several calls may follow each other (Llama 3.3
separates them with ``;``); text around them is content.
"""
from __future__ import annotations

import json

import regex

from . import jsonscan
from .base import Call, Parser, call_from_object

_OPEN = regex.compile(r'(?P<tag><\|python_tag\|>)|(?P<obj>\{)\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:')
_BUILTIN = regex.compile(r'\s*(?P<name>\w+)\s*\.\s*call\(')
_KWARG = regex.compile(r'\s*(\w+)\s*=\s*')


def _builtin_args(text: str, pos: int, final: bool):
    """``k=JSON, k2=JSON)`` -> (arguments object, end) ; None while incomplete; raises Invalid."""
    args = {}
    while True:
        pos = jsonscan.skip_ws(text, pos)
        if pos >= len(text):
            return None
        if text[pos] == ")":
            return args, pos + 1
        m = _KWARG.match(text, pos)
        if m is None:
            if not final and regex.match(r"\s*\w*\s*$", text[pos:]):
                return None
            raise jsonscan.Invalid("bad built-in tool call")
        node = jsonscan.scan(text, m.end())
        if not node.complete:
            return None
        args[m.group(1)] = json.loads(node.text(text))
        pos = jsonscan.skip_ws(text, node.end)
        if pos < len(text) and text[pos] == ",":
            pos += 1


class Llama3Parser(Parser):
    format = "llama3"
    settles = True
    preserved = ("<|python_tag|>",)

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        content, calls, pos = [], [], 0
        while True:
            m = _OPEN.search(text, pos, partial=not final)
            if m is None:
                content.append(text[pos:])
                break
            content.append(text[pos:m.start()])
            if m.partial:
                break
            if m.group("tag"):
                start = jsonscan.skip_ws(text, m.end())
                if start < len(text) and text[start] == "{":
                    pos = start  # <|python_tag|>{"name": ...}: Llama 3.2 writes custom calls so too
                    continue
                b = _BUILTIN.match(text, start, partial=not final)
                if b is not None and not b.partial:
                    try:
                        got = _builtin_args(text, b.end(), final)
                    except (jsonscan.Invalid, ValueError):
                        got = False
                    if got is None:
                        break
                    if got:
                        calls.append(Call(b.group("name"), json.dumps(got[0], ensure_ascii=False)))
                        pos = got[1]
                        continue
                if not final:  # code for the interpreter: known only at the end
                    break
                code = text[start:]
                if code.strip():
                    calls.append(Call("python", json.dumps({"code": code}, ensure_ascii=False)))
                break
            try:
                node = jsonscan.scan(text, m.start("obj"))
            except jsonscan.Invalid:
                node = None
            call = call_from_object(text, node, final) if node is not None and (node.complete or not final) else None
            if call is None:
                if node is not None and not node.complete and not final:
                    break
                content.append(text[m.start():m.start() + 1])
                pos = m.start() + 1
                continue
            calls.append(call)
            if not node.complete:
                break
            pos = node.end
            sep = regex.compile(r"\s*;").match(text, pos, partial=not final)
            if sep is not None and sep.partial:
                break
            if sep is not None:
                pos = sep.end()
        return "".join(content), calls
