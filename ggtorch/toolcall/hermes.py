"""Hermes 2/3 and Qwen 2.5/3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

Models stray from their template's own syntax, so this takes what llama.cpp's Hermes 2 Pro parser
takes (common_chat_parse_hermes_2_pro in its 2025 common/chat.cpp): an optional ```` ```json ```` or
```` ```xml ```` fence, then ``<tool_call>``, ``<function_call>``, ``<tool>``, ``<tools>``,
``<response>``, ``<json>``, ``<xml>``, ``<JSON>`` or no tag at all before ``{"name": ...}`` (Qwen2.5-Coder
writes a fenced ``{"name", "arguments"}`` block), or ``<function=NAME>{...}</function>`` and
``<function name="NAME">{...}</function>``. Text around the calls is content; several calls in a row
are several calls.
"""
from __future__ import annotations

import regex

from . import jsonscan
from .base import Call, Parser, call_from_object

# the start of a call; (?P<obj>) is the object's brace
_OPEN = regex.compile(
    r'(?P<fence>```(?:json|xml)?\n\s*)?(?:<(?P<tag>tool_call|function_call|tool|tools|response|json|xml|JSON)>)?'
    r'\s*(?P<obj>\{)\s*"name"\s*:'
    r'|<function=(?P<fn>[^>\n]+)>|<function name="(?P<fn2>[^"\n]+)">')


def _close(text: str, pos: int, pattern: str, final: bool) -> int | None:
    """Position after an optional closing ``pattern`` at ``pos``; None when the text ends inside it."""
    m = regex.compile(r"\s*" + pattern).match(text, pos, partial=not final)
    if m is None:
        return pos
    if m.partial:
        return None
    return m.end()


class HermesParser(Parser):
    format = "hermes"
    settles = True
    preserved = ("<think>", "</think>", "<tool_call>", "</tool_call>")

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        content, calls, pos = [], [], 0
        while True:
            m = _OPEN.search(text, pos, partial=not final)
            if m is None:
                content.append(text[pos:])
                break
            content.append(text[pos:m.start()])
            if m.partial:  # the text ends in what may become a call: hold it back
                break
            if m.group("obj") is not None:
                start, tag, fence = m.start("obj"), m.group("tag"), m.group("fence")
                close = [f"</{tag}>"] if tag else []
                close += ["```"] if fence else []
                name = None
            else:
                name = m.group("fn") or m.group("fn2")
                start, close = jsonscan.skip_ws(text, m.end()), ["</function>"]
            try:
                node = jsonscan.scan(text, start)
            except jsonscan.Invalid:
                node = None
            if node is None or (name is None and node.kind != "object") or (final and not node.complete):
                # not a call after all: its first character is content, look again after it
                content.append(text[m.start():m.start() + 1])
                pos = m.start() + 1
                continue
            if name is None:
                call = call_from_object(text, node, final)
            else:
                call = Call(name.strip(), node.text(text) if node.kind != "empty" else "")
            if call is None:
                if not node.complete:
                    break
                content.append(text[m.start():node.end])  # an object without a usable name: content
                pos = node.end
                continue
            calls.append(call)
            if not node.complete:
                break
            pos = node.end
            for c in close:
                pos = _close(text, pos, regex.escape(c), final)
                if pos is None:
                    break
            if pos is None:
                break
        return "".join(content), calls
