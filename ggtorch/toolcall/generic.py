"""The generic fallback for templates without a tool-call syntax of their own (llama.cpp's
common_chat_params_init_generic / common_chat_parse_generic): the whole answer is one JSON object,
``{"tool_calls": [{"name", "arguments", "id"?}, ...]}``, ``{"tool_call": {"name", "arguments"}}`` or
``{"response": "text"}``. Anything else is plain content."""
from __future__ import annotations

from . import jsonscan
from .base import Call, Parser, call_from_object


class GenericParser(Parser):
    format = "generic"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        start = jsonscan.skip_ws(text, 0)
        if start >= len(text) or text[start] != "{":
            return text, []
        try:
            node = jsonscan.scan(text, start)
        except jsonscan.Invalid:
            return text, []
        if final and (not node.complete or text[node.end:].strip()):
            return text, []
        calls: list[Call] = []
        tc, one, resp = node.get("tool_calls"), node.get("tool_call"), node.get("response")
        if tc is not None and tc.kind == "array":
            for item in tc.items:
                c = call_from_object(text, item, final)
                if c is None:
                    break
                calls.append(c)
            return "", calls
        if one is not None and one.kind == "object":
            c = call_from_object(text, one, final)
            return "", [c] if c else []
        if resp is not None:
            if resp.kind == "string":
                return jsonscan.partial_string(resp.text(text)), []
            return resp.text(text), []
        return (text if final else ""), []
