"""Granite 3.x: ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]``; with thinking on (Granite
3.3), ``<think>...</think><response>...</response>``, the response tags dropped from the content
(llama.cpp's common_chat_parse_granite)."""
from __future__ import annotations

import regex

from . import jsonscan
from .base import Call, Parser, call_from_object, held

_OPEN = regex.compile(r"<\|tool_call\|>")
_TAGS = ("<response>", "</response>")


class GraniteParser(Parser):
    format = "granite"
    settles = True
    preserved = ("<|tool_call|>", "<think>", "</think>")

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        m = _OPEN.search(text, partial=not final)
        calls: list[Call] = []
        if m is None:
            content = text
        elif m.partial:
            content = text[:m.start()]
        else:
            content = text[:m.start()]
            start = jsonscan.skip_ws(text, m.end())
            try:
                node = jsonscan.scan(text, start)
            except jsonscan.Invalid:
                node = None
            if node is not None and node.kind == "object":  # one call without its list
                c = call_from_object(text, node, final)
                calls = [c] if c else []
            elif node is not None and node.kind == "array":
                for item in node.items:
                    c = call_from_object(text, item, final)
                    if c is None:
                        break
                    calls.append(c)
            elif final:
                content = text
        if not final:
            content = content[:len(content) - held(content, _TAGS)]
        for t in _TAGS:
            content = content.replace(t, "")
        return content, calls
