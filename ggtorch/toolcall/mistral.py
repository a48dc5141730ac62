"""Mistral: Nemo's ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]`` and the
newer (Small 3.2, tokenizer v11+) ``[TOOL_CALLS]NAME[ARGS]{...}`` (optionally ``[CALL_ID]ID`` before
``[ARGS]``), one ``[TOOL_CALLS]`` per call or names back to back. Text before the first call is content
(llama.cpp's common_chat_parse_mistral_nemo and its Magistral/Ministral successors). Call ids are 9
alphanumerics, as Mistral's templates require."""
from __future__ import annotations

import regex

from . import jsonscan
from .base import Call, Parser, call_from_object

_OPEN = regex.compile(r"\[TOOL_CALLS\]")
_NAMED = regex.compile(r"\s*(?P<name>[^\[\]{}\s]+)\s*(?:\[CALL_ID\]\s*(?P<id>[A-Za-z0-9_-]+)\s*)?\[ARGS\]\s*")


class MistralParser(Parser):
    format = "mistral"
    settles = True
    preserved = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")
    id_style = "mistral"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        m = _OPEN.search(text, partial=not final)
        if m is None:
            return text, []
        content, calls = text[:m.start()], []
        if m.partial:
            return content, calls
        pos = jsonscan.skip_ws(text, m.end())
        if pos < len(text) and text[pos] == "[":  # Nemo: a list of call objects
            try:
                node = jsonscan.scan(text, pos)
            except jsonscan.Invalid:
                return (text if final else content), []
            for item in node.items:
                c = call_from_object(text, item, final)
                if c is None:
                    break
                calls.append(c)
            if final and not node.complete:
                return text, []
            return content, calls
        while pos < len(text):  # NAME[ARGS]{...}, repeated
            n = _NAMED.match(text, pos, partial=not final)
            if n is None or n.partial:
                if final and n is None and not calls:
                    return text, []
                break
            try:
                node = jsonscan.scan(text, n.end())
            except jsonscan.Invalid:
                break
            if final and not node.complete:
                break
            calls.append(Call(n.group("name"), node.text(text), n.group("id") or ""))
            if not node.complete:
                break
            nxt = regex.compile(r"\s*(?:\[TOOL_CALLS\])?").match(text, node.end)
            pos = nxt.end()
        return content, calls
