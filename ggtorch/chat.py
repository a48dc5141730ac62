"""Chat templates: the model file's own Jinja template, rendered in the sandbox of jinja_sandbox.py.

    from ggtorch.chat import apply_template
    apply_template(source, [{"role": "user", "content": "Hi"}], bos_token="<s>")

Inputs are rebuilt out of plain JSON types before a template sees them (as transformers does), so a
template can only reach strings, numbers, lists and dicts. A file without a template gets llama.cpp's
default, ChatML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


# ---- a model's template ----------------------------------------------------------------------------------
def model_template(metadata: dict, name: str | None = None) -> tuple[str, str]:
    """(source, description) of the template to use: the file's ``tokenizer.chat_template``, a named variant
    ``tokenizer.chat_template.<name>``, a built-in (``chatml``, ``gemma``) or a template file; without any,
    llama.cpp's default ChatML (common_chat_templates_init), also when the file only has a tool_use variant
    that is then taken instead."""
    variants = {k.split(".", 2)[2]: v for k, v in metadata.items()
                if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
    if name is None:
        src = metadata.get("tokenizer.chat_template")
        if isinstance(src, str) and src and src != "chatml":
            return src, "the file's tokenizer.chat_template"
        if "tool_use" in variants:
            return variants["tool_use"], "the file's tokenizer.chat_template.tool_use"
        return CHATML, "chatml (llama.cpp's default: the file has no tokenizer.chat_template)"
    if name in variants:
        return variants[name], f"the file's tokenizer.chat_template.{name}"
    if name in BUILTIN:
        return BUILTIN[name], f"{name} (built in)"
    from pathlib import Path

    p = Path(name)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8"), f"the file {name}"
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read the chat template file {name}: {e}") from None
    raise ChatTemplateError(f"no chat template named {name!r}: expected one of the file's variants "
                            f"{sorted(variants) or '(none)'}, a built-in {sorted(BUILTIN)} or a template file")


def _probe(source: str, content) -> bool:
    try:
        out = apply_template(source, [{"role": "user", "content": content}])
    except ChatTemplateError:
        return False
    return "ggtorch-probe" in out


def content_caps(source: str) -> tuple[bool, bool]:
    """(takes string content, takes a list of text parts), found by rendering a probe as llama.cpp's
    jinja::caps does; cached per template."""
    caps = _CAPS.get(source)
    if caps is None:
        if len(_CAPS) > 64:
            _CAPS.clear()
        caps = _CAPS[source] = (_probe(source, "ggtorch-probe"), _probe(source, [{"type": "text", "text": "ggtorch-probe"}]))
    return caps


_CAPS: dict[str, tuple[bool, bool]] = {}


def fit_content(source: str, messages: list[dict]) -> list[dict]:
    """Give the template the content form it takes (messages_inp_normalizer in llama.cpp's common/chat.cpp):
    text parts joined with newlines for a string-only template, a string wrapped in one text part for a
    parts-only one."""
    strings, parts = content_caps(source)
    if strings == parts:
        return messages
    out = []
    for m in messages:
        c = m.get("content")
        if strings and isinstance(c, list):
            m = {**m, "content": "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")}
        elif parts and isinstance(c, str):
            m = {**m, "content": [{"type": "text", "text": c}]}
        out.append(m)
    return out


# ---- chatting with a model ---------------------------------------------------------------------------------
@dataclass
class ChatResult:
    text: str                  # the assistant's answer, without the end-of-generation token
    finish_reason: str         # "stop" (end of turn or a stop string) or "length"
    usage: dict                # prompt_tokens, completion_tokens, total_tokens
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    timings: Any = None        # generate.Timings: cached_tokens = prompt tokens taken from the session cache
    template: str = ""         # which template rendered the prompt
    # parsed (ggtorch.toolcall), when tools were given or the template has reasoning: the answer's
    # content without reasoning or calls, its reasoning_content, and its calls (OpenAI tool_calls)
    content: str | None = None
    reasoning_content: str = ""
    tool_calls: list = field(default_factory=list)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """One conversation's KV cache: a new turn evaluates only the tokens after the longest prefix that the
    cache already holds (like llama-server's prompt cache), keeping the rest."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.ids: list[int] = []  # the tokens whose K/V the cache holds, in order
        self._active = None  # the running turn's generator: a new turn closes it first

    def reset(self) -> None:
        self.close()
        self.cache, self.ids = None, []

    def close(self) -> None:
        if self._active is not None:
            self._active.close()  # runs its finally: ids match what the cache holds
            self._active = None

    def steps(self, prompt_ids: list[int], max_tokens: int, params, stop, ignore_eos, timings,
              context_shift: bool = False, n_keep: int = 0, constraint=None):
        """The turn's :class:`~ggtorch.generate.Step`s; not thread-safe (one session, one conversation)."""
        self.close()
        self._active = self._run(list(prompt_ids), max_tokens, params, stop, ignore_eos, timings,
                                 context_shift, n_keep, constraint)
        return self._active

    def _run(self, prompt_ids, max_tokens, params, stop, ignore_eos, timings, context_shift, n_keep, constraint=None):
        from .generate import generate_tokens

        n = min(common_prefix(self.ids, prompt_ids), len(prompt_ids) - 1)  # the last token is always evaluated
        if self.cache is None:
            self.cache, n = self.model.new_cache(), 0  # the model's n_ctx and KV type
        self.ids = list(prompt_ids[:n])  # until the forward below, only the kept prefix is known to be there
        out: list[int] = []
        try:
            for step in generate_tokens(self.model, prompt_ids, max_tokens, params, stop, ignore_eos, timings,
                                        cache=self.cache, n_cached=n, context_shift=context_shift, n_keep=n_keep,
                                        constraint=constraint):
                out.append(step.token)
                yield step
        finally:  # also when the caller stops early (Ctrl-C): what the cache holds stays reusable
            self.ids = (list(prompt_ids) + out)[:self.cache.n]
            if timings.context_shifts:  # the cache no longer holds a prefix of this history
                self.cache.truncate(0)
                self.ids = []
