"""Request bodies in, checked parameters out; the OpenAI error object for every client mistake.

Validation is written out by hand rather than left to pydantic so that every mistake is a 400 with
the OpenAI error object naming the parameter (FastAPI's default would be a 422 in its own format).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..sampling import SamplingParams

MAX_N = 16
MAX_STOP = 16


class APIError(Exception):
    """An HTTP error answered with ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers, self.extra = headers or {}, extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes, want: type = dict) -> dict | list:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(None, f"the request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
    if not isinstance(body, want):
        kind = "an object" if want is dict else "an array"
        raise bad(None, f"the request body must be {kind}, got {type(body).__name__}")
    return body


# ---- typed getters ------------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(name, f"{name} must be {kind}, got {json.dumps(v)[:60]}", "invalid_type")
    if not integer and not math.isfinite(v):
        raise bad(name, f"{name} must be a finite number, got {v}", "invalid_value")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise bad(name, f"{name} must be in {rng}, got {v}", "invalid_value")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be a boolean, got {json.dumps(v)[:60]}", "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "stop must be a string or a list of strings", "invalid_type")
    if len(v) > MAX_STOP:
        raise bad("stop", f"stop takes at most {MAX_STOP} strings, got {len(v)}", "invalid_value")
    return [s for s in v if s]


def _logit_bias(body: dict, n_vocab: int) -> dict:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("logit_bias", "logit_bias must be an object mapping token ids to numbers", "invalid_type")
    out = {}
    for k, b in v.items():
        try:
            tid = int(k)
        except ValueError:
            raise bad("logit_bias", f"logit_bias keys must be token ids, got {k[:40]!r}", "invalid_type") from None
        if not 0 <= tid < n_vocab:
            raise bad("logit_bias", f"logit_bias token id {tid} is outside the vocabulary (0..{n_vocab - 1})",
                      "invalid_value")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (-100 <= b <= 100):  # NaN fails too
            raise bad("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {json.dumps(b)[:40]}",
                      "invalid_value")
        out[tid] = float(b)
    return out


@dataclass
class GenSpec:
    """What a completion request asks for, checked."""
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    ignore_eos: bool
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: off; k: the chosen token plus k alternatives
    seed: int | None
    prompts: list = field(default_factory=list)  # text or token-id lists, filled by the endpoint
    constraint: object = None  # a compiled ggtorch.constrain.Grammar: each choice gets its own matcher
    lora: dict | None = None  # {adapter id: scale} (llama.cpp's per-request lora field); None: global scales


def lora_field(body: dict, n_adapters: int) -> dict | None:
    """llama.cpp server's ``lora: [{"id": i, "scale": s}]``: adapters not listed get scale 0; absent or []
    takes the global scales (POST /lora-adapters). An id that names no loaded adapter is a 400."""
    from ..errors import LoRAError
    from ..lora.slots import parse_scales

    v = body.get("lora")
    if v is None:
        return None
    try:
        return parse_scales(v, n_adapters) or None
    except LoRAError as e:
        raise bad("lora", str(e), "invalid_value") from None


def gen_spec(body: dict, n_vocab: int, n_ctx: int, chat: bool, n_lora: int = 0) -> GenSpec:
    mt = _number(body, "max_completion_tokens", None, 0, None, integer=True)
    mt = _number(body, "max_tokens", mt, 0, None, integer=True) if body.get("max_tokens") is not None else mt
    max_tokens = n_ctx if mt is None else mt  # none given: until the end of generation or of the context
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1)
    seed = _number(body, "seed", None, -(2 ** 63), 2 ** 64 - 1, integer=True)
    params = SamplingParams(
        temperature=temperature,
        top_k=_number(body, "top_k", 0, None, None, integer=True),
        top_p=max(top_p, 1e-9),  # 0 keeps only the most likely token
        min_p=_number(body, "min_p", 0.0, 0, 1),
        typical_p=_number(body, "typical_p", 1.0, 0, 1, lo_open=True),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0, 10, lo_open=True),
        repeat_last_n=_number(body, "repeat_last_n", 64, -1, None, integer=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        logit_bias=_logit_bias(body, n_vocab),
        seed=None if seed is None else seed % 2 ** 64,
    )
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    stream = _bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options", "stream_options must be an object", "invalid_type")
    include_usage = _bool(so or {}, "include_usage", False)
    if so is not None and not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true", "invalid_value")
    if chat:
        lp = _bool(body, "logprobs", False)
        top = _number(body, "top_logprobs", None, 0, 20, integer=True)
        if top is not None and not lp:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true", "invalid_value")
        logprobs = (top or 0) if lp else None
    else:
        logprobs = _number(body, "logprobs", None, 0, 5, integer=True)
        if _bool(body, "echo", False):
            raise bad("echo", "echo is not supported", "unsupported_value")
    return GenSpec(params, int(max_tokens), _stop(body), _bool(body, "ignore_eos", False), int(n), stream,
                   include_usage, logprobs, params.seed, lora=lora_field(body, n_lora))


def structured_output(body: dict) -> tuple[dict, str] | None:
    """What the request constrains its output to, as compile_constraint keywords, and the parameter that
    asked for it: OpenAI's ``response_format`` (``json_object``, ``json_schema``) or llama.cpp server's
    ``json_schema`` (a schema) and ``grammar`` (GBNF) fields. None: free text."""
    found = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise bad("response_format", "response_format must be an object with a type", "invalid_type")
        kind = rf["type"]
        if kind == "json_object":  # llama.cpp also takes a schema here
            s = rf.get("schema")
            found.append(({"json_schema": s} if s is not None else {"json_object": True}, "response_format"))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict):
                raise bad("response_format.json_schema", "response_format.json_schema must be an object with a "
                          "schema", "invalid_type")
            s = js.get("schema", {})  # as llama.cpp: no schema, any JSON value
            if not isinstance(s, (dict, bool)):
                raise bad("response_format.json_schema.schema", "response_format.json_schema.schema must be a "
                          "JSON schema object", "invalid_type")
            found.append(({"json_schema": s}, "response_format.json_schema.schema"))
        elif kind != "text":
            raise bad("response_format", f"response_format.type must be text, json_object or json_schema, got "
                      f"{json.dumps(kind)[:40]}", "invalid_value")
    if body.get("json_schema") is not None:
        s = body["json_schema"]
        if not isinstance(s, (dict, bool)):
            raise bad("json_schema", "json_schema must be a JSON schema object", "invalid_type")
        found.append(({"json_schema": s}, "json_schema"))
    if body.get("grammar") is not None:
        g = body["grammar"]
        if not isinstance(g, str):
            raise bad("grammar", "grammar must be a string (llama.cpp GBNF)", "invalid_type")
        found.append(({"grammar": g}, "grammar"))
    if len(found) > 1:
        raise bad(found[1][1].split(".")[0], "give one of response_format (json), json_schema and grammar, not "
                  "several", "invalid_value")
    return found[0] if found else None


ROLES = ("system", "developer", "user", "assistant", "tool")


def messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "messages is required", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of message objects", "invalid_value")
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(p, f"{p} must be an object with a role and content", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(p + ".role", f"{p}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                      "invalid_value")
        c = m.get("content")
        if c is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise bad(p + ".content", f"{p}.content is required", "missing_required_parameter")
        elif isinstance(c, list):
            for j, part in enumerate(c):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"{p}.content[{j}]", f"{p}.content[{j}] must be {{\"type\": \"text\", \"text\": ...}} "
                              "(only text parts are supported)", "invalid_value")
        elif not isinstance(c, str):
            raise bad(p + ".content", f"{p}.content must be a string or a list of text parts", "invalid_type")
        tc = m.get("tool_calls")
        if tc is not None and not isinstance(tc, list):
            raise bad(p + ".tool_calls", f"{p}.tool_calls must be a list", "invalid_type")
    return msgs


def completion_prompts(body: dict, n_vocab: int) -> list:
    """`prompt`: text, token ids, or a list of either."""
    p = body.get("prompt")
    if p is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    else:
        raise bad("prompt", "prompt must be a string, a list of token ids, or a non-empty list of either",
                  "invalid_type")
    if len(items) > MAX_N:
        raise bad("prompt", f"at most {MAX_N} prompts per request", "invalid_value")
    for x in items:
        if isinstance(x, list):
            if not x or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                raise bad("prompt", "a token-id prompt must be a non-empty list of integers", "invalid_type")
            if not all(0 <= t < n_vocab for t in x):
                raise bad("prompt", f"prompt token ids must lie in 0..{n_vocab - 1}", "invalid_value")
    return items


# ---- tool calls (ggtorch.toolcall) ----------------------------------------------------------------
def tools(body: dict):
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` checked -> a ToolSpec; a mistake is a 400
    naming the parameter (e.g. a tool_choice naming a function that is not among the tools)."""
    from ..errors import ToolCallError
    from ..toolcall import ToolSpec

    try:
        return ToolSpec(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    except ToolCallError as e:
        raise bad(e.param, str(e), "invalid_value") from None
