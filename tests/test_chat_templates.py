"""Chat templates render exactly as Hugging Face transformers renders them (recorded by
tools/record_chat_renderings.py over tests/data/chat_templates/), and hostile templates fail cleanly."""
import json
from datetime import datetime
from pathlib import Path

import pytest

from ggtorch import chat, jinja_sandbox
from ggtorch.errors import ChatTemplateError

DATA = Path(__file__).parent / "data"
REC = json.loads((DATA / "chat_renderings.json").read_text())


@pytest.fixture
def frozen_now(monkeypatch):
    now = datetime.fromisoformat(REC["frozen_now"])
    monkeypatch.setattr(jinja_sandbox, "_now", lambda: now)


def test_corpus_covers_the_families():
    names = {r["template"] for r in REC["renderings"]}
    for family in ("Llama-3.1", "Llama-3.2", "Llama-3.3", "Qwen2.5", "Qwen3", "gemma-2", "gemma-3", "Mistral",
                   "Phi-3.5", "phi-4", "DeepSeek-R1-Distill-Llama", "DeepSeek-R1-Distill-Qwen", "SmolLM2", "SmolLM3",
                   "gpt-oss"):
        assert any(family in n for n in names), family
    assert {r["case"] for r in REC["renderings"]} == set(REC["cases"])
    # the corpus exercises both outcomes, and tool calls render somewhere
    assert sum("error" in r for r in REC["renderings"]) > 10
    assert any(r["case"] == "tool_calls" and "get_weather" in r.get("output", "") for r in REC["renderings"])


@pytest.mark.parametrize("rec", REC["renderings"], ids=lambda r: f"{r['template'][:-6]}-{r['case']}")
def test_rendering_equals_transformers(rec, frozen_now):
    case = REC["cases"][rec["case"]]
    src = (DATA / "chat_templates" / rec["template"]).read_text()

    def render():
        return chat.apply_template(src, case["messages"], tools=case.get("tools"),
                                   add_generation_prompt=case.get("add_generation_prompt", True),
                                   bos_token=REC["bos_token"], eos_token=REC["eos_token"],
                                   **REC["kwargs"], **case.get("kwargs", {}))

    if "error" in rec:
        with pytest.raises(ChatTemplateError):
            render()
    else:
        out = render()
        assert out == rec["output"]
        if rec["case"] == "jinja_literal":  # message text is data, never template code
            assert "{{ 7*7 }}" in out and "49" not in out


def test_template_choice_follows_llama_cpp(tmp_path):
    from ggtorch.chat import CHATML, GEMMA, model_template

    md = {"tokenizer.chat_template": "main", "tokenizer.chat_template.tool_use": "tools", "tokenizer.chat_template.rag": "r"}
    assert model_template(md) == ("main", "the file's tokenizer.chat_template")
    assert model_template(md, "rag")[0] == "r" and model_template(md, "gemma")[0] == GEMMA
    # no default template: a tool_use variant is taken, else ChatML (common_chat_templates_init)
    assert model_template({"tokenizer.chat_template.tool_use": "tools"})[0] == "tools"
    assert model_template({})[0] == CHATML and "chatml" in model_template({})[1]
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0].content }}")
    assert model_template({}, str(f))[0] == "{{ messages[0].content }}"
    with pytest.raises(ChatTemplateError, match="expected one of the file's variants \\['rag', 'tool_use'\\]"):
        model_template(md, "missing")


def test_globals_and_filters_templates_use(monkeypatch):
    monkeypatch.setattr(jinja_sandbox, "_now", lambda: datetime(2025, 1, 2))
    src = ("{{ strftime_now('%d %b %Y') }}|{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|"
           "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
           "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ extra }}|{{ bos_token }}{{ eos_token }}|"
           "{% generation %}{{ add_generation_prompt }}{% endgeneration %}")
    tools = [{"name": "météo", "x": [1]}]
    out = chat.apply_template(src, [{"role": "user", "content": "a"}] * 3, tools=tools, extra="kw",
                              bos_token="<s>", eos_token="</s>")
    assert out == ("02 Jan 2025|" + json.dumps(tools, ensure_ascii=False) + "|"
                   + json.dumps(tools, ensure_ascii=False, indent=2) + "|1|kw|<s></s>|True")
