"""Record Hugging Face transformers' renderings of the chat-template corpus (tests/data/chat_templates/).

Dev tool, run once when the corpus or the cases change; transformers is not a dependency of ggtorch:

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install transformers jinja2
    /tmp/tf/bin/python tools/record_chat_renderings.py      # writes tests/data/chat_renderings.json

tests/test_chat_templates.py renders the same cases with ggtorch.chat and compares. ``strftime_now`` is
frozen at 2024-07-26 here and in the test, so templates that print today's date compare too.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import transformers
from transformers.utils import chat_template_utils as ctu

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "tests" / "data" / "chat_templates"
OUT = ROOT / "tests" / "data" / "chat_renderings.json"
FROZEN = datetime(2024, 7, 26, 12, 0, 0)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city's name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are a concise assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
USER2 = {"role": "user", "content": "And of Germany?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
RESULT = {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
          "content": "{\"temperature\": 22, \"unit\": \"celsius\"}"}

CASES = {
    "single": {"messages": [USER]},
    "system_user": {"messages": [SYSTEM, USER]},
    "multi_turn": {"messages": [SYSTEM, USER, ASSISTANT, USER2]},
    "no_system_multi_turn": {"messages": [USER, ASSISTANT, USER2]},
    "no_generation_prompt": {"messages": [SYSTEM, USER, ASSISTANT], "add_generation_prompt": False},
    "content_parts": {"messages": [SYSTEM, {"role": "user", "content": [
        {"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]}]},
    "tools": {"messages": [{"role": "user", "content": "What's the weather in Paris?"}], "tools": TOOLS},
    "tool_calls": {"messages": [{"role": "user", "content": "What's the weather in Paris?"}, CALL, RESULT],
                   "tools": TOOLS},
    "non_ascii": {"messages": [{"role": "system", "content": "Réponds en français 🙂"},
                               {"role": "user", "content": "Ünïcödé — 日本語のテキスト, Ελληνικά, العربية"}]},
    "jinja_literal": {"messages": [{"role": "user", "content":
                                    "{{ 7*7 }} {% if true %}yes{% endif %} {# c #} {{ raise_exception('x') }}"}]},
    "thinking_off": {"messages": [USER], "kwargs": {"enable_thinking": False}},
    "reasoning": {"messages": [USER, {"role": "assistant", "content": "Paris.",
                                      "reasoning_content": "The user asks about France."}, USER2]},
}
BOS, EOS = "<s>", "</s>"
KWARGS = {"date_string": "26 Jul 2024"}  # Llama 3.x templates' own default


class _Frozen(datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN


def main() -> int:
    ctu.datetime = _Frozen  # strftime_now reads the module's datetime
    out = {"transformers": transformers.__version__, "bos_token": BOS, "eos_token": EOS, "kwargs": KWARGS,
           "frozen_now": FROZEN.isoformat(), "cases": CASES, "renderings": []}
    for path in sorted(TEMPLATES.glob("*.jinja")):
        src = path.read_text()
        for name, case in CASES.items():
            rec = {"template": path.name, "case": name}
            try:
                rendered, _ = ctu.render_jinja_template(
                    conversations=[case["messages"]], tools=case.get("tools"), chat_template=src,
                    add_generation_prompt=case.get("add_generation_prompt", True),
                    bos_token=BOS, eos_token=EOS, **KWARGS, **case.get("kwargs", {}))
                rec["output"] = rendered[0]
            except Exception as e:  # the template refused these messages: ours must refuse them too
                rec["error"] = f"{type(e).__name__}: {e}"
            out["renderings"].append(rec)
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    n_err = sum("error" in r for r in out["renderings"])
    print(f"wrote {len(out['renderings'])} renderings ({n_err} refused) to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
