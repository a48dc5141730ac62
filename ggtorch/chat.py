"""Chat templates: the model file's own Jinja template, rendered in the sandbox of jinja_sandbox.py.

    from ggtorch.chat import apply_template
    apply_template(source, [{"role": "user", "content": "Hi"}], bos_token="<s>")

Inputs are rebuilt out of plain JSON types before a template sees them (as transformers does), so a
template can only reach strings, numbers, lists and dicts. A file without a template gets llama.cpp's
default, ChatML.
"""
from __future__ import annotations

from typing import Any

from .errors import ChatTemplateError
from .jinja_sandbox import LIMITS, Limits, render

__all__ = ["apply_template", "normalize_messages", "render", "Limits", "LIMITS", "CHATML", "GEMMA", "BUILTIN"]


# llama.cpp's default when a file has no template (common/chat.cpp CHATML_TEMPLATE_SRC); content parts
# are joined here so that the fallback also takes OpenAI-style messages
CHATML = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\n' -}}\n"
    "  {%- if message.content is string -%}{{- message.content -}}\n"
    "  {%- elif message.content is iterable -%}{%- for p in message.content if p.type == 'text' -%}{{- p.text -}}"
    "{%- endfor -%}{%- endif -%}\n"
    "  {{- '<|im_end|>\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")

# llama.cpp's built-in "gemma" format (llm_chat_apply_template, LLM_CHAT_TEMPLATE_GEMMA) as a template:
# system text goes in front of the first user turn, assistant is "model", contents are trimmed
GEMMA = (
    "{%- set ns = namespace(system='') -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message.content is string -%}{%- set text = message.content -%}\n"
    "  {%- else -%}{%- set text = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') -%}{%- endif -%}\n"
    "  {%- if message.role == 'system' -%}{%- set ns.system = ns.system + text | trim -%}\n"
    "  {%- else -%}\n"
    "    {%- set role = 'model' if message.role == 'assistant' else message.role -%}\n"
    "    {{- '<start_of_turn>' + role + '\n' -}}\n"
    "    {%- if ns.system and role != 'model' -%}{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}{%- endif -%}\n"
    "    {{- text | trim + '<end_of_turn>\n' -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}")

BUILTIN = {"chatml": CHATML, "gemma": GEMMA}


# ---- inputs -------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A copy made of plain JSON types (str, int, float, bool, None, dict, list), as transformers passes."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. the openai client's messages
        return _plain(value.model_dump())
    raise ChatTemplateError(f"a chat message holds a {type(value).__name__}; expected JSON-like values "
                            "(str, number, bool, None, dict, list)")


_REASONING = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages) -> list[dict]:
    """Plain dicts with a string role; keys whose value is None dropped; reasoning under its usual names."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        m = _plain(m)
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} is a {type(m).__name__}; expected a dict with 'role' and 'content'")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"message {i} has no string 'role'")
        m = {k: v for k, v in m.items() if v is not None}
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ChatTemplateError(f"message {i}: content must be a string or a list of parts, "
                                    f"got {type(content).__name__}")
        # transformers fills reasoning_content from older names, and thinking (gpt-oss templates read it)
        r = next((m[k] for k in _REASONING if m.get(k) is not None), None)
        if r is not None:
            m = {"thinking": r, **m, "reasoning_content": r}
        out.append(m)
    return out


def apply_template(template: str, messages, *, tools=None, add_generation_prompt: bool = True,
                   bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """Render a chat: ``messages`` is a list of ``{"role", "content"}`` dicts (content a string or a list of
    ``{"type": "text", "text": ...}`` parts; assistant messages may carry ``tool_calls``, followed by
    ``tool`` messages), ``tools`` a list of JSON schemas; other keywords (``enable_thinking``,
    ``reasoning_effort``, ``date_string`` ...) are passed to the template as variables."""
    variables = {"documents": None, **_plain(kwargs),
                 "messages": normalize_messages(messages), "tools": _plain(tools) if tools is not None else None,
                 "add_generation_prompt": bool(add_generation_prompt),
                 "bos_token": bos_token, "eos_token": eos_token}
    return render(template, variables)
