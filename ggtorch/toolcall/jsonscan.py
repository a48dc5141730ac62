"""A tolerant JSON scanner for text that may stop anywhere: where each value starts and ends, and
whether it is complete yet.

The parsers need spans rather than values: a tool call's ``arguments`` are sent to the client as the
text the model wrote, and while the model is still writing, the text so far is always a prefix of the
final text (so streamed argument fragments concatenate to the whole). llama.cpp does the same job
with its partial JSON "healing" (common/json-partial.cpp); this keeps the raw text instead.
"""
from __future__ import annotations

import json
import re

WS = " \t\n\r"
_NUM = set("0123456789+-.eE")
_LITERALS = ("true", "false", "null")
MAX_DEPTH = 128


class Invalid(ValueError):
    """The text is not (the start of) a JSON value."""


class Node:
    """One JSON value in the text: ``s[start:end]`` (``end`` is the text's end while incomplete)."""

    __slots__ = ("kind", "start", "end", "complete", "items")

    def __init__(self, kind: str, start: int):
        self.kind, self.start, self.end, self.complete = kind, start, start, False
        self.items: list = []  # object: [(key, Node)]; array: [Node]

    def get(self, key: str) -> "Node | None":
        """An object's member (the last one of that name), or None."""
        found = None
        for k, v in self.items:
            if k == key:
                found = v
        return found

    def text(self, s: str) -> str:
        return s[self.start:self.end]

    def string(self, s: str) -> str | None:
        """A complete string's value; None for anything else."""
        if self.kind != "string" or not self.complete:
            return None
        return json.loads(s[self.start:self.end])


def skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in WS:
        i += 1
    return i


def scan(s: str, i: int, depth: int = 0) -> Node:
    """The value starting at ``s[i]`` (no leading whitespace). Raises :class:`Invalid` on text that
    cannot become JSON; returns an incomplete node when the text ends first."""
    if depth > MAX_DEPTH:
        raise Invalid("JSON nested too deeply")
    n = len(s)
    if i >= n:
        node = Node("empty", i)
        return node
    c = s[i]
    if c == "{":
        return _container(s, i, depth, "object")
    if c == "[":
        return _container(s, i, depth, "array")
    if c == '"':
        return _string(s, i)
    if c in "-0123456789":
        node = Node("number", i)
        j = i
        while j < n and s[j] in _NUM:
            j += 1
        node.end = j
        node.complete = j < n  # a number is only known to be over when something follows it
        if node.complete:
            try:
                json.loads(s[i:j])
            except ValueError:
                raise Invalid(f"bad number {s[i:j][:20]!r}") from None
        return node
    for lit in _LITERALS:
        part = s[i:i + len(lit)]
        if lit.startswith(part):
            node = Node("literal", i)
            node.end = i + len(part)
            node.complete = part == lit
            return node
    raise Invalid(f"unexpected {c!r} at {i}")


_STR_BODY = re.compile(r'(?:[^"\\\n\r]|\\.)*')


def _string(s: str, i: int) -> Node:
    node = Node("string", i)
    n = len(s)
    j = _STR_BODY.match(s, i + 1).end()  # the characters and escapes inside the quotes
    if j < n and s[j] == '"':
        node.end, node.complete = j + 1, True
        return node
    if j < n and s[j] in "\n\r":
        raise Invalid("newline inside a JSON string")
    node.end = n  # the text ends inside the string (or inside an escape)
    return node


def _container(s: str, i: int, depth: int, kind: str) -> Node:
    node = Node(kind, i)
    close = "}" if kind == "object" else "]"
    n = len(s)
    j = skip_ws(s, i + 1)
    if j < n and s[j] == close:
        node.end, node.complete = j + 1, True
        return node
    while True:
        key = None
        if kind == "object":
            if j >= n:
                break
            if s[j] != '"':
                raise Invalid(f"expected a key at {j}")
            k = _string(s, j)
            if not k.complete:
                break
            key = json.loads(s[k.start:k.end])
            j = skip_ws(s, k.end)
            if j >= n:
                break
            if s[j] != ":":
                raise Invalid(f"expected ':' at {j}")
            j = skip_ws(s, j + 1)
            if j >= n:
                break
        if j >= n:
            break
        v = scan(s, j, depth + 1)
        node.items.append((key, v) if kind == "object" else v)
        if not v.complete:
            break
        j = skip_ws(s, v.end)
        if j >= n:
            break
        if s[j] == ",":
            j = skip_ws(s, j + 1)
            continue
        if s[j] == close:
            node.end, node.complete = j + 1, True
            return node
        raise Invalid(f"expected ',' or {close!r} at {j}")
    node.end = n
    return node


def partial_string(raw: str) -> str:
    """The decoded text of a JSON string literal that may be cut anywhere (``"abc\\u00`` -> ``abc``)."""
    body = raw[1:]
    if body.endswith('"') and len(raw) > 1:
        try:
            return json.loads(raw)
        except ValueError:
            pass
    # drop a cut escape at the end, then decode what is left
    for cut in range(0, 7):
        try:
            out = json.loads('"' + body[:len(body) - cut] + '"')
        except ValueError:
            continue
        # half a surrogate pair waits for its other half
        return out[:-1] if out and "\ud800" <= out[-1] <= "\udbff" else out
    return ""
