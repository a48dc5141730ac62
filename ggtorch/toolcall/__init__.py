"""Tool calls: the model's answer parsed into OpenAI ``tool_calls``, whole or streamed, in the format its
chat template teaches; forced calls (``tool_choice`` ``required`` / a named function) as grammars.

    from ggtorch.toolcall import detect_format, make_parser
    p = make_parser(template_source, prompt_text)      # HermesParser, Llama3Parser, ...
    for piece in pieces: deltas = p.feed(piece)        # OpenAI delta fields
    p.finish(); p.message().to_openai()                # {"role", "content", "tool_calls", ...}

The format is recognised from markers in the template source, in the order llama.cpp's
common_chat_templates_apply (2025) tried them: harmony (``<|channel|>``), Mistral (``[TOOL_CALLS]``),
Granite (``<|tool_call|>``), Hermes/Qwen (``<tool_call>``), Llama 3.x (``ipython`` role /
``<|python_tag|>``), else the generic JSON fallback. Reasoning in ``<think>...</think>`` (and gpt-oss's
analysis channel) becomes ``reasoning_content`` whatever the format.
"""
from __future__ import annotations

import json

import regex

from ..errors import ToolCallError
from .base import Message, Parser, ToolCall, new_call_id
from .generic import GenericParser
from .granite import GraniteParser
from .grammar import forced_grammar
from .harmony import HarmonyParser
from .hermes import HermesParser
from .llama3 import Llama3Parser
from .mistral import MistralParser

__all__ = ["FORMATS", "detect_format", "make_parser", "Message", "ToolCall", "Parser", "new_call_id",
           "check_tools", "check_choice", "ToolSpec", "tool_spec", "forced_grammar", "forced_lark"]

FORMATS: dict[str, type[Parser]] = {
    "hermes": HermesParser, "llama3": Llama3Parser, "mistral": MistralParser, "harmony": HarmonyParser,
    "granite": GraniteParser, "generic": GenericParser,
}


def detect_format(template: str) -> str:
    """The tool-call format a chat template teaches (a key of :data:`FORMATS`)."""
    t = template or ""
    if "<|channel|>" in t:
        return "harmony"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|tool_call|>" in t:
        return "granite"
    if "<tool_call>" in t:
        return "hermes"
    if "ipython<|end_header_id|>" in t or "<|python_tag|>" in t:
        return "llama3"
    return "generic"


def thinking_open(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open ``<think>`` (Qwen3, DeepSeek-R1 distills)."""
    tail = (prompt or "").rstrip()
    return tail.endswith("<think>")


def make_parser(template: str, prompt: str = "", tools: bool = True, fmt: str | None = None,
                tokenizer=None) -> Parser:
    """A fresh parser for one answer: ``tools`` False parses reasoning only (no tools were offered,
    or tool_choice none)."""
    fmt = fmt or detect_format(template)
    cls = FORMATS[fmt]
    kw = {"tokenizer": tokenizer} if cls is HarmonyParser else {}
    return cls(tools=tools, reasoning=True, thinking_open=thinking_open(prompt), **kw)


# ---- request checks -----------------------------------------------------------------------------
_NAME = regex.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def check_tools(tools) -> list[dict]:
    """OpenAI ``tools`` -> ``[{"name", "description", "parameters"}]``; :class:`ToolCallError` names the
    first thing wrong."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolCallError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ToolCallError(f"{p} must be an object", p)
        if t.get("type", "function") != "function":
            raise ToolCallError(f"{p}.type must be \"function\", got {json.dumps(t.get('type'))[:40]}", p + ".type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolCallError(f"{p}.function must be an object with a name", p + ".function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolCallError(f"{p}.function.name must be 1-64 letters, digits, _ . or -, got "
                                f"{json.dumps(name)[:60]}", p + ".function.name")
        if name in seen:
            raise ToolCallError(f"{p}.function.name {name!r} is given twice", p + ".function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolCallError(f"{p}.function.description must be a string", p + ".function.description")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolCallError(f"{p}.function.parameters must be a JSON schema object", p + ".function.parameters")
        out.append({"name": name, "description": desc, "parameters": params})
    return out


def check_choice(choice, functions: list[dict]) -> tuple[str, str | None]:
    """``tool_choice`` -> (mode, name): mode ``auto``, ``none``, ``required`` or ``named``."""
    if choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolCallError(f"tool_choice must be \"auto\", \"none\", \"required\" or "
                                f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice[:40]!r}",
                                "tool_choice")
        if choice == "required" and not functions:
            raise ToolCallError("tool_choice \"required\" needs tools", "tool_choice")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        names = [f["name"] for f in functions]
        if name not in names:
            raise ToolCallError(f"tool_choice names the function {json.dumps(name)[:60]}, which is not among the "
                                f"tools ({', '.join(names) or 'none given'})", "tool_choice")
        return "named", name
    raise ToolCallError("tool_choice must be \"auto\", \"none\", \"required\" or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


class ToolSpec:
    """What a request asks of tools, checked: the functions, the mode, parallel calls."""

    def __init__(self, tools, tool_choice=None, parallel_tool_calls=None):
        self.tools = tools
        self.functions = check_tools(tools)
        self.mode, self.name = check_choice(tool_choice, self.functions)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ToolCallError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
        self.parallel = True if parallel_tool_calls is None else parallel_tool_calls

    @property
    def render_tools(self):
        """The tools given to the template: none for tool_choice none (llama.cpp renders none either)."""
        return self.tools if self.functions and self.mode != "none" else None

    @property
    def parse_calls(self) -> bool:
        return bool(self.functions) and self.mode != "none"

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def grammar(self, template: str, prompt: str = "", fmt: str | None = None) -> str | None:
        """The Lark grammar of a forced call, or None."""
        if not self.forced:
            return None
        fmt = fmt or detect_format(template)
        fns = self.functions if self.mode == "required" else [f for f in self.functions if f["name"] == self.name]
        return forced_grammar(fmt, fns, self.parallel and self.mode == "required", thinking_open(prompt),
                              mistral_args="[ARGS]" in (template or ""))


def tool_spec(tools=None, tool_choice=None, parallel_tool_calls=None) -> ToolSpec:
    return ToolSpec(tools, tool_choice, parallel_tool_calls)


def forced_lark(template: str, tools, tool_choice, parallel_tool_calls=None, prompt: str = "") -> str | None:
    return ToolSpec(tools, tool_choice, parallel_tool_calls).grammar(template, prompt)


def special_ids(parser: Parser, tokenizer) -> set[int]:
    """The ids of the format's markers that are single (special) tokens: detokenized as text for the
    parser, as llama.cpp renders a format's preserved_tokens."""
    out = set()
    for marker in parser.preserved:
        ids = tokenizer.tokenize(marker, special=True)
        if len(ids) == 1:
            out.add(ids[0])
    return out


def parse_ids(template: str, prompt: str, ids, tokenizer, tools: bool = True, stop=()) -> Message:
    """A whole answer's token ids -> its Message (content, reasoning, calls); ``stop`` strings cut it."""
    p = make_parser(template, prompt, tools=tools, tokenizer=tokenizer)
    special = special_ids(p, tokenizer)
    text = b"".join(tokenizer.piece(int(t), int(t) in special) for t in ids).decode("utf-8", "replace")
    hits = [text.find(s) for s in stop if s and s in text]
    if hits:
        text = text[:min(hits)]
    return p.parse(text)


# ---- templates that ignore tools ------------------------------------------------------------------------
_TAKES_TOOLS: dict[str, bool] = {}
_PROBE = [{"type": "function", "function": {"name": "ggtorch_probe_tool", "description": "probe",
                                            "parameters": {"type": "object", "properties": {}}}}]


def template_takes_tools(template: str) -> bool:
    """Whether the template renders the tools it is given (a probe tool's name shows in its output), as
    llama.cpp's minja caps.supports_tools is found; cached per template."""
    hit = _TAKES_TOOLS.get(template)
    if hit is None:
        from ..chat import apply_template

        try:
            hit = "ggtorch_probe_tool" in apply_template(template, [{"role": "user", "content": "x"}], tools=_PROBE)
        except Exception:  # noqa: BLE001 - a template that refuses tools does not take them
            hit = False
        if len(_TAKES_TOOLS) > 64:
            _TAKES_TOOLS.clear()
        _TAKES_TOOLS[template] = hit
    return hit


def with_tools_prompt(messages: list, tools: list) -> list:
    """For a template that ignores tools: the tools and the generic JSON answer format said in a system
    message (first, or merged into the first system message), as llama.cpp's generic handler and minja's
    tools polyfill do."""
    text = ("You can call these tools (JSON schemas):\n" + json.dumps(tools, ensure_ascii=False) +
            '\n\nAnswer with one JSON object only: {"tool_calls": [{"name": "<tool name>", "arguments": {...}}]} '
            'to call tools, or {"response": "<your answer>"} to answer directly.')
    msgs = [dict(m) if isinstance(m, dict) else m for m in messages]
    if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system" and isinstance(msgs[0].get("content"), str):
        msgs[0]["content"] = msgs[0]["content"] + "\n\n" + text
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return msgs
