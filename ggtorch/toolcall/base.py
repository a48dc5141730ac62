"""What every tool-call parser shares: the parsed message, reasoning (``<think>``) split off, and
streaming by difference.

A format's parser only has to say, for the text so far, what is content and which calls it holds
(:meth:`Parser.split`), both for a text that may still grow (``final=False``: hold back anything that
could still turn into a call) and for the whole answer. Streaming then re-parses the text so far after
each piece and sends what grew since the last time, as llama.cpp's server does
(common_chat_msg_diff::compute_diffs): content and reasoning as text deltas, each new call with its
index, id and name first, then its arguments as fragments, as OpenAI streams them. The same code
parses a whole answer, so the streamed deltas add up to the whole parse.
"""
from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field

from . import jsonscan

_ALNUM = string.ascii_letters + string.digits


def new_call_id(style: str = "call") -> str:
    """A tool call id: ``call_`` + 24 random characters; Mistral's templates insist on 9 alphanumerics
    (as llama.cpp generates for them)."""
    if style == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text, as the model wrote it
    id: str = ""

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Message:
    """A parsed assistant answer."""
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_openai(self) -> dict:
        """The ``message`` object of a chat.completion: content null when the answer is only calls."""
        m: dict = {"role": "assistant", "content": self.content if self.content or not self.tool_calls else None}
        if self.reasoning_content:
            m["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            m["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return m


@dataclass
class Call:
    """A call as far as it has been read: the name is complete, the arguments may not be."""
    name: str
    args: str
    id: str = ""  # when the model wrote one (Mistral)


def held(text: str, markers) -> int:
    """Length of the longest end of ``text`` that is the start of one of ``markers`` (to be held back)."""
    best = 0
    for m in markers:
        for k in range(min(len(text), len(m) - 1), best, -1):
            if m.startswith(text[-k:]):
                best = k
                break
    return best


def call_from_object(s: str, node: jsonscan.Node, final: bool, arg_keys=("arguments", "parameters")) -> Call | None:
    """A call from a ``{"name": ..., "arguments": {...}}`` object (complete or not): None until the name
    is complete. ``arguments`` may also be a JSON string holding the object (some models write that)."""
    if node.kind != "object":
        return None
    name_node = node.get("name")
    if name_node is None and node.get("function") is not None:  # {"function": {"name", "arguments"}}
        return call_from_object(s, node.get("function"), final, arg_keys)
    name = name_node.string(s) if name_node is not None else None
    if not name:
        return None
    args = next((node.get(k) for k in arg_keys if node.get(k) is not None), None)
    cid = node.get("id")
    cid = cid.string(s) if cid is not None else None
    if args is None:
        text = "{}" if node.complete or final else ""
    elif args.kind == "string":
        text = jsonscan.partial_string(args.text(s))
    else:
        text = args.text(s)
    return Call(name, text, cid or "")


class Parser:
    """Base class: reasoning, the streaming machinery, and plain content (no calls)."""

    format = "none"
    # special tokens that the text given to the parser must show (detokenized with ``special``), as
    # llama.cpp keeps a format's preserved_tokens
    preserved: tuple[str, ...] = ("<think>", "</think>")
    id_style = "call"

    def __init__(self, tools: bool = True, reasoning: bool = True, thinking_open: bool = False):
        self.parse_tools = tools
        self.reasoning = reasoning
        self.thinking_open = thinking_open
        self.buf = ""
        self._r, self._c = "", ""
        self._calls: list[list] = []  # [name, arguments sent, id] per call already announced
        self._final: Message | None = None
        self._settled = 0  # text before this index (after the reasoning) is settled content

    # ---- per format ----------------------------------------------------------------------------
    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        """(content, calls) of ``text`` (the answer after its reasoning). While ``final`` is False the
        content must stop before anything that could still become a call."""
        return text, []

    # ---- shared -----------------------------------------------------------------------------------
    def _think(self, text: str, final: bool) -> tuple[str, int | None]:
        """(reasoning, where the rest starts); None while it is not yet known whether reasoning has ended."""
        if not self.reasoning:
            return "", 0
        start = None
        if self.thinking_open:  # the template opened <think> in the prompt (Qwen3, DeepSeek-R1 distills)
            start = 0
            s = text.lstrip()
            if s.startswith("<think>"):  # ... and the model wrote it again
                start = len(text) - len(s) + len("<think>")
            elif not final and s and "<think>".startswith(s):
                return "", None
        else:
            s = text.lstrip()
            if s.startswith("<think>"):
                start = len(text) - len(s) + len("<think>")
            elif not final and s and "<think>".startswith(s):
                return "", None
        if start is None:
            return "", 0
        end = text.find("</think>", start)
        if end < 0:
            r = text[start:] if final else text[start:len(text) - held(text, ("</think>",))]
            return r.strip(), (len(text) if final else None)
        return text[start:end].strip(), end + len("</think>")

    # a format whose content before a call is settled once no call can start in it (a left-to-right
    # scan): later pieces re-parse only the text after it, so streaming stays linear
    settles = False

    def _parse(self, text: str, final: bool) -> tuple[str, str, list[Call]]:
        reasoning, rest = self._think(text, final)
        if rest is None:
            return reasoning, "", []
        if not self.parse_tools:
            return reasoning, text[rest:].strip(), []
        base = max(rest, self._settled) if self.settles else rest
        content, calls = self.split(text[base:], final)
        if self.settles and not final and not calls and text.startswith(content, base):
            # no call (nor the start of one) begins in this content: it is final as it stands
            self._settled = base + len(content)
        return reasoning, (text[rest:base] + content).strip(), calls

    def _diff(self, reasoning: str, content: str, calls: list[Call]) -> list[dict]:
        out = []
        if len(reasoning) > len(self._r) and reasoning.startswith(self._r):
            out.append({"reasoning_content": reasoning[len(self._r):]})
            self._r = reasoning
        if len(content) > len(self._c) and content.startswith(self._c):
            out.append({"content": content[len(self._c):]})
            self._c = content
        for i, c in enumerate(calls):
            if i >= len(self._calls):
                cid = c.id or new_call_id(self.id_style)
                self._calls.append([c.name, "", cid])
                out.append({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                            "function": {"name": c.name, "arguments": ""}}]})
            sent = self._calls[i][1]
            if len(c.args) > len(sent) and c.args.startswith(sent):
                out.append({"tool_calls": [{"index": i, "function": {"arguments": c.args[len(sent):]}}]})
                self._calls[i][1] = c.args
        return out

    def feed(self, piece: str) -> list[dict]:
        """Deltas (OpenAI ``delta`` fields) that ``piece`` makes certain."""
        if not piece:
            return []
        self.buf += piece
        return self._diff(*self._parse(self.buf, False))

    def finish(self) -> list[dict]:
        """The remaining deltas at the end of the answer; :meth:`message` is then the whole parse."""
        reasoning, content, calls = self._parse(self.buf, True)
        out = self._diff(reasoning, content, calls)
        tcs = []
        for i, c in enumerate(calls):
            cid = self._calls[i][2] if i < len(self._calls) else (c.id or new_call_id(self.id_style))
            tcs.append(ToolCall(c.name, c.args if c.args.strip() else "{}", cid))
        self._final = Message(content, reasoning, tcs)
        return out

    def message(self) -> Message:
        if self._final is None:
            self.finish()
        return self._final

    def parse(self, text: str) -> Message:
        """The whole answer at once."""
        self.feed(text)
        self.finish()
        return self._final
