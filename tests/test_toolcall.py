"""Tool calls (ggtorch.toolcall): each format's parser on answers written as the models write them
(from each format's documentation and the templates in tests/data/chat_templates), whole and streamed
in random pieces; format detection; forced-call grammars; the server and Model.chat end to end on
SmolLM2 with the official openai client."""
from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from ggtorch.toolcall import FORMATS, ToolSpec, detect_format, harmony, make_parser
from ggtorch.toolcall.grammar import forced_grammar

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# (format, answer, prompt tail, content, reasoning, [(name, arguments)])
WEATHER = {"city": "Zürich", "days": 3, "units": {"temp": "°C", "extra": [1, {"a": None}]}}
CASES = [
    # Qwen 2.5 / Hermes 3: text before, two calls, nested JSON, unicode
    ("hermes", 'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER, ensure_ascii=False)
     + '}\n</tool_call>\n<tool_call>\n{"name": "time_now", "arguments": {"tz": "Asia/東京"}}\n</tool_call>', "",
     "Let me look that up.", "", [("get_weather", WEATHER), ("time_now", {"tz": "Asia/東京"})]),
    # Qwen2.5-Coder: a fenced block instead of tags
    ("hermes", 'I will call the tool.\n```json\n{"name": "search", "arguments": {"query": "llama.cpp \\"hermes\\" parser"}}\n```',
     "", "I will call the tool.", "", [("search", {"query": 'llama.cpp "hermes" parser'})]),
    ("hermes", '<function=get_weather>{"city": "Paris", "days": 2}</function>', "", "", "",
     [("get_weather", {"city": "Paris", "days": 2})]),
    ("hermes", '<tools>\n{"name": "f", "arguments": {"x": [1, 2, {"y": "z"}]}}\n</tools>', "", "", "",
     [("f", {"x": [1, 2, {"y": "z"}]})]),
    ("hermes", '<json>{"name": "f", "arguments": {}}</json> and then <function_call>{"name": "g", "arguments": {"k": true}}'
     '</function_call>', "", "and then", "", [("f", {}), ("g", {"k": True})]),
    # Qwen3: reasoning first
    ("hermes", "<think>\nThe user wants the weather. I'll call get_weather.\n</think>\n\n<tool_call>\n"
     '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>', "",
     "", "The user wants the weather. I'll call get_weather.", [("get_weather", {"city": "Oslo", "days": 1})]),
    # the template opened <think> in the prompt (DeepSeek-R1 distills, QwQ)
    ("hermes", "Hmm, 2+2 is 4.\n</think>\n\nThe answer is **4**.", "<｜Assistant｜><think>\n", "The answer is **4**.",
     "Hmm, 2+2 is 4.", []),
    ("hermes", 'No call here: {"a": 1} is just JSON, and <b>bold</b> is HTML.', "",
     'No call here: {"a": 1} is just JSON, and <b>bold</b> is HTML.', "", []),
    # Llama 3.1 / 3.2 / 3.3
    ("llama3", '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + '}', "", "", "", [("get_weather", WEATHER)]),
    ("llama3", 'Sure! {"type": "function", "name": "a", "parameters": {"n": 1}}; {"name": "b", "parameters": {"s": "ü"}}',
     "", "Sure!", "", [("a", {"n": 1}), ("b", {"s": "ü"})]),
    ("llama3", '<|python_tag|>brave_search.call(query="weather in Menlo Park", count=3)', "", "", "",
     [("brave_search", {"query": "weather in Menlo Park", "count": 3})]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', "", "", "",
     [("get_weather", {"city": "Rome"})]),
    # Mistral Nemo (a list) and Small 3.2 (NAME[ARGS]{...})
    ("mistral", 'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(WEATHER, ensure_ascii=False)
     + ', "id": "a1B2c3D4e"}, {"name": "f", "arguments": {}, "id": "Zz9Yy8Xx7"}]', "", "Checking.", "",
     [("get_weather", WEATHER), ("f", {})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon", "days": 2}[TOOL_CALLS]time_now[ARGS]{"tz": "CET"}', "",
     "", "", [("get_weather", {"city": "Lyon", "days": 2}), ("time_now", {"tz": "CET"})]),
    # Granite 3.x
    ("granite", 'I can do that.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Bern"}}, '
     '{"name": "f", "arguments": {"deep": {"a": [{"b": "ç"}]}}}]', "", "I can do that.", "",
     [("get_weather", {"city": "Bern"}), ("f", {"deep": {"a": [{"b": "ç"}]}})]),
    ("granite", "<think>Simple greeting.</think><response>Hello there!</response>", "", "Hello there!", "Simple greeting.", []),
    # llama.cpp's generic JSON
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) + '}, {"name": "f", "arguments": {}}]}',
     "", "", "", [("get_weather", WEATHER), ("f", {})]),
    ("generic", '{"tool_call": {"name": "f", "arguments": {"q": "x"}}}', "", "", "", [("f", {"q": "x"})]),
    ("generic", '{"response": "Bonjour, \\u00e7a va? \\ud83d\\ude00"}', "", "Bonjour, ça va? 😀", "", []),
    ("generic", "Just an answer, with {braces}.", "", "Just an answer, with {braces}.", "", []),
    # gpt-oss harmony
    ("harmony", "<|channel|>analysis<|message|>User wants weather; call the tool.<|end|><|start|>assistant<|channel|>"
     'commentary to=functions.get_weather <|constrain|>json<|message|>' + json.dumps(WEATHER, ensure_ascii=False), "",
     "", "User wants weather; call the tool.", [("get_weather", WEATHER)]),
    ("harmony", "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is 4 ✓.", "",
     "It is 4 ✓.", "Easy.", []),
]


def streamed(parser, text: str, seed: int):
    """Feed text in random pieces; the deltas reassembled as an OpenAI client does."""
    rnd, i, deltas = random.Random(seed), 0, []
    while i < len(text):
        k = rnd.randint(1, 9)
        deltas += parser.feed(text[i:i + k])
        i += k
    deltas += parser.finish()
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in tc:
                assert c["id"] is None and tc["function"]["name"], "the id and name come first, once"
                c["id"], c["name"] = tc["id"], tc["function"]["name"]
            c["arguments"] += tc["function"].get("arguments", "")
    return content, reasoning, [calls[i] for i in sorted(calls)]


@pytest.fixture(scope="module")
def harmony_package(tmp_path_factory):
    """openai-harmony's encoding, its o200k table built offline into a temporary cache (once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GGTORCH_CACHE", str(tmp_path_factory.mktemp("harmony-cache")))
        mp.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
        mp.setattr(harmony, "_state", {})
        enc = harmony.encoding()
        assert enc is not None, harmony.why_not()
        state = dict(harmony._state)
    return state


@pytest.fixture(params=["package", "markers"])
def harmony_mode(request, monkeypatch, harmony_package):
    """Harmony parsed by openai-harmony, and by the marker fallback (no package or no vocabulary)."""
    monkeypatch.setattr(harmony, "_state", dict(harmony_package))
    if request.param == "markers":
        monkeypatch.setattr(harmony, "encoding", lambda tokenizer=None: None)
    return request.param


def _check_case(fmt, text, prompt, content, reasoning, calls):
    whole = make_parser("", prompt, fmt=fmt).parse(text)
    assert whole.content == content
    assert whole.reasoning_content == reasoning
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == calls
    ids = [c.id for c in whole.tool_calls]
    assert len(set(ids)) == len(ids) and all(ids)
    for seed in range(3):
        s_content, s_reasoning, s_calls = streamed(make_parser("", prompt, fmt=fmt), text, seed)
        assert (s_content, s_reasoning) == (content, reasoning)
        assert [(c["name"], c["arguments"]) for c in s_calls] == [(c.name, c.arguments) for c in whole.tool_calls]


@pytest.mark.parametrize("case", [i for i, c in enumerate(CASES) if c[0] != "harmony"])
def test_parsers_whole_and_streamed(case):
    _check_case(*CASES[case])


@pytest.mark.parametrize("case", [i for i, c in enumerate(CASES) if c[0] == "harmony"])
def test_harmony_whole_and_streamed(case, harmony_mode):
    _check_case(*CASES[case])


def test_harmony_offline_encoding_is_harmony(harmony_mode):
    """The vocabulary built offline is o200k (openai-harmony checks its SHA-256 itself) and its special
    tokens are harmony's."""
    if harmony_mode != "package":
        return
    enc = harmony.encoding()
    ids = enc.encode("<|channel|>final<|message|>hi", allowed_special="all")
    assert ids[0] == 200005 and ids[2] == 200008 and enc.decode(ids) == "<|channel|>final<|message|>hi"


def test_harmony_vocabulary_from_a_gguf_tokenizer(monkeypatch, tmp_path):
    """A gpt-oss GGUF's own vocabulary (ids 0..199997 are o200k's ranks) is enough for openai-harmony
    offline; a vocabulary that is not o200k is refused (the SHA-256 differs) and the markers are read."""
    ranks = harmony._ranks_from_quicktok()

    class GGUFVocab:  # what Tokenizer offers: tokens and piece(id) -> bytes
        def __init__(self, table):
            self.tokens, self.table = [""] * len(table), table

        def piece(self, i, special=False):
            return self.table[i]

    monkeypatch.setattr(harmony, "_ranks_from_quicktok", lambda: None)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    for table, ok in [(ranks[:5] + [b"oops"] + ranks[6:], False), (ranks, True)]:
        monkeypatch.setenv("GGTORCH_CACHE", str(tmp_path / str(ok)))
        monkeypatch.setattr(harmony, "_state", {})
        enc = harmony.encoding(GGUFVocab(table))
        assert (enc is not None) == ok, harmony.why_not()
    m = make_parser("", fmt="harmony").parse("<|channel|>final<|message|>hi")
    assert m.content == "hi"


def test_mistral_ids_are_nine_alphanumerics():
    m = make_parser("", fmt="mistral").parse('[TOOL_CALLS]f[ARGS]{"a": 1}')
    assert len(m.tool_calls[0].id) == 9 and m.tool_calls[0].id.isalnum()
    m = make_parser("", fmt="hermes").parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert m.tool_calls[0].id.startswith("call_")


EXPECTED_FORMATS = {
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "generic", "HuggingFaceTB-SmolLM2-135M-Instruct": "generic",
    "HuggingFaceTB-SmolLM3-3B": "generic", "Mistral-Small-3.2-24B-Instruct-2506": "mistral",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes", "Qwen-QwQ-32B": "hermes",
    "Qwen-Qwen2.5-7B-Instruct": "hermes", "Qwen-Qwen3-0.6B": "hermes",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "generic", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "generic",
    "google-gemma-2-2b-it": "generic", "google-gemma-3-it": "generic", "ibm-granite-granite-3.3-2B-Instruct": "granite",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3", "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3", "microsoft-Phi-3.5-mini-instruct": "generic",
    "microsoft-phi-4": "generic", "mistralai-Mistral-Nemo-Instruct-2407": "mistral", "openai-gpt-oss-120b": "harmony",
    "tencent-Hy3": "generic",
}


def test_detection_on_every_template():
    found = {p.stem: detect_format(p.read_text(encoding="utf-8")) for p in sorted(TEMPLATES.glob("*.jinja"))}
    assert found == EXPECTED_FORMATS


FUNCS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}},
    {"name": "ping", "parameters": None}]
# what each format's forced grammar must accept (and then parse back into the same calls)
FORCED = {
    "hermes": '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","days":2}}\n</tool_call>',
    "llama3": '{"name":"get_weather","parameters":{"city":"Oslo","days":2}}',
    "mistral": '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Oslo","days":2},"id":"abcde1234"}]',
    "granite": '<|tool_call|>[{"name":"get_weather","arguments":{"city":"Oslo","days":2}}]',
    "generic": '{"tool_call":{"name":"get_weather","arguments":{"city":"Oslo","days":2}}}',
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_forced_grammars_compile(fmt):
    import llguidance

    for parallel in (False, True):
        g = forced_grammar(fmt, FUNCS, parallel)
        assert not llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", g)), g


@pytest.mark.parametrize("fmt", sorted(FORCED))
def test_forced_grammar_accepts_the_call_and_nothing_else(fmt, smollm):
    from ggtorch.constrain import compile_constraint

    tok = smollm.tokenizer

    def accepts(grammar, text):
        c = grammar.new()
        for t in tok.tokenize(text):
            if not c.advance(t):
                return False
        return c.accepting

    g = compile_constraint(tok, lark=forced_grammar(fmt, FUNCS, False))
    assert accepts(g, FORCED[fmt])
    assert not accepts(g, FORCED[fmt].replace('"days":2', '"days":9'))  # maximum 7
    assert not accepts(g, FORCED[fmt].replace("get_weather", "get_weathe"))
    m = make_parser("", fmt=fmt).parse(FORCED[fmt])
    assert [(c.name, json.loads(c.arguments)) for c in m.tool_calls] == [("get_weather", {"city": "Oslo", "days": 2})]


def test_tool_spec_checks():
    from ggtorch.errors import ToolCallError

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert ToolSpec(tools, None).mode == "auto" and ToolSpec(None, None).mode == "none"
    assert ToolSpec(tools, {"type": "function", "function": {"name": "f"}}).name == "f"
    assert ToolSpec(tools, "none").render_tools is None
    for bad_tools, choice, param in [
            (tools, {"type": "function", "function": {"name": "g"}}, "tool_choice"), (tools, "always", "tool_choice"),
            (None, "required", "tool_choice"), ("f", None, "tools"), ([{"type": "function"}], None, "tools[0].function"),
            ([{"function": {"name": "bad name!"}}], None, "tools[0].function.name"),
            ([{"function": {"name": "f", "parameters": [1]}}], None, "tools[0].function.parameters")]:
        with pytest.raises(ToolCallError) as e:
            ToolSpec(bad_tools, choice)
        assert e.value.param == param


# ---- end to end: the server with the official openai client, and Model.chat -------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city for some days",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 20},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "days", "unit"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                      "b": {"type": "number"}},
                                                     "required": ["a", "b"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def tool_server(smollm):
    from conftest import Running

    from ggtorch.server import create_app

    s = Running(create_app(smollm, parallel=2, n_ctx=2 * 1024, model_name="smollm2-135m"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0)


def _check_call(name, arguments, expect=None):
    assert name in SCHEMAS and (expect is None or name == expect)
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_server_forced_call_whole_and_streamed(client, choice):
    expect = None if choice == "required" else "add"
    kw = dict(model="m", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=60,
              parallel_tool_calls=False)
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    assert len(ch.message.tool_calls) == 1
    tc = ch.message.tool_calls[0]
    assert tc.type == "function" and tc.id.startswith("call_")
    _check_call(tc.function.name, tc.function.arguments, expect)

    calls, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                e = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                e["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    # greedy: the streamed deltas reassemble to the same call as the whole answer
    assert (calls[0]["name"], calls[0]["arguments"]) == (tc.function.name, tc.function.arguments)


def test_server_tool_errors_are_400(client, tool_server):
    bad = [
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        dict(tools=TOOLS, tool_choice="sometimes"),
        dict(tools=[{"type": "function", "function": {"description": "no name"}}]),
        dict(tools=[{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]),
        dict(tools="get_weather"),
        dict(tools=TOOLS, parallel_tool_calls="yes"),
        dict(tool_choice="required"),
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=ASK, max_tokens=4, **extra)
        err = e.value.body
        assert err["type"] == "invalid_request_error" and err["message"], extra
    r = httpx.post(tool_server.url + "/v1/chat/completions", json={
        "messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice" and "nope" in r.json()["error"]["message"]


def test_server_tool_choice_none_renders_no_tools(tool_server):
    def prompt(**kw):
        return httpx.post(tool_server.url + "/apply-template", json={"messages": ASK, **kw}).json()["prompt"]

    hermes_srv = prompt(tools=TOOLS)
    assert prompt(tools=TOOLS, tool_choice="none") == prompt() != hermes_srv


def test_server_chat_template_and_reasoning(smollm):
    """--chat-template: a Hermes (Qwen 2.5) template gives SmolLM2 <tool_call> calls; a DeepSeek-R1
    template opens <think> in the prompt, so the answer is reasoning_content."""
    from test_server import Running

    from ggtorch.server import create_app

    for tpl, check in [("Qwen-Qwen2.5-7B-Instruct", "hermes"), ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "think")]:
        s = Running(create_app(smollm, parallel=1, n_ctx=1024, chat_template=str(TEMPLATES / f"{tpl}.jinja")))
        try:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            if check == "hermes":
                p = httpx.post(s.url + "/apply-template", json={"messages": ASK, "tools": TOOLS}).json()["prompt"]
                assert "<tools>" in p and "<tool_call>" in p
                r = c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0, max_tokens=60)
                assert r.choices[0].finish_reason == "tool_calls"
                tc = r.choices[0].message.tool_calls[0]
                _check_call(tc.function.name, tc.function.arguments)
            else:
                kw = {"chat_template_kwargs": {"enable_thinking": True}}  # this template closes <think> otherwise
                r = c.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=12, extra_body=kw)
                m = r.choices[0].message
                prompt = httpx.post(s.url + "/apply-template", json={"messages": ASK, **kw}).json()["prompt"]
                assert prompt.endswith("<think>\n")
                raw = httpx.post(s.url + "/v1/completions", json={
                    "prompt": prompt,
                    "temperature": 0, "max_tokens": 12}).json()["choices"][0]["text"]
                assert raw.strip() and "</think>" not in raw
                assert m.content in ("", None) and m.model_extra["reasoning_content"] == raw.strip()
        finally:
            s.stop()


def test_model_chat_tools(smollm):
    r = smollm.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                    temperature=0, max_tokens=60)
    assert r.finish_reason == "tool_calls" and r.content is None and len(r.tool_calls) == 1
    _check_call(r.tool_calls[0].name, r.tool_calls[0].arguments, "get_weather")
    r = smollm.chat(ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8)
    assert r.tool_calls == [] and r.finish_reason in ("stop", "length")


def test_parsers_never_raise_on_junk():
    """Any text, whole or in pieces, parses (into content at worst): a model's mistakes are not a 500."""
    bits = ["<tool_call>", "</tool_call>", "<think>", "</think>", "```json\n", "```", '{"name": ', '"f"', ', "arguments": ',
            '{"a": [1, "x\\"', "}", "]", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<|tool_call|>", "<function=g>",
            "</function>", "<|channel|>", "<|message|>", "analysis", " to=functions.f", "<|end|>", "<|start|>assistant",
            '{"tool_calls": [', '{"response": "', "\\u12", "é", " ", "\n", "call(q=", ")", ";"]
    rnd = random.Random(7)
    for _ in range(60):
        text = "".join(rnd.choice(bits) for _ in range(rnd.randint(1, 12)))
        for fmt in FORMATS:
            m = make_parser("", fmt=fmt).parse(text)
            assert isinstance(m.content, str) and all(isinstance(c.arguments, str) for c in m.tool_calls)
            streamed(make_parser("", fmt=fmt), text, rnd.randint(0, 99))


def test_serve_cli_bad_chat_template_is_one_line():
    """`ggtorch serve --chat-template` is checked before the weights load: one line, exit code 2."""
    import os
    import subprocess
    import sys

    from conftest import TINY

    r = subprocess.run([sys.executable, "-m", "ggtorch", "serve", str(TINY / "tiny-llama-Q4_K.gguf"), "--chat-template",
                        "no-such-template.jinja", "--port", "1"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and "no chat template named 'no-such-template.jinja'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_server_parse_sees_special_tokens_and_stops():
    """The server parses the generated ids with the format's markers shown even when they are control
    tokens (empty in plain text), as llama.cpp keeps preserved_tokens; stop strings still cut the answer."""
    from ggtorch.server.jobs import ChoiceParse, ToolPlan

    class Tok:  # id 1 and 2 are control tokens: shown only with special=True
        pieces = {0: b"Sure. ", 1: b"<tool_call>", 2: b"</tool_call>", 3: b'{"name": "f", "arguments": {"a": "\xc3',
                  4: b'\xa9"}}', 5: b" STOP and more"}

        def tokenize(self, text, special=False):
            ids = [i for i, p in self.pieces.items() if p == text.encode()]
            return ids or [9, 9]

        def piece(self, i, special=False):
            return self.pieces[i] if special or i not in (1, 2) else b""

    plan = ToolPlan((TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(), "", True, Tok())
    assert plan.fmt == "hermes" and plan.special == {1, 2}
    for lazy in (True, False):
        cp = ChoiceParse(plan, ["STOP"], lazy=lazy)
        deltas = []
        for t in [0, 1, 3, 4, 2, 5]:
            deltas += cp.feed([t])
        deltas += cp.finish()
        m = cp.parser.message()
        assert m.content == "Sure." and [(c.name, json.loads(c.arguments)) for c in m.tool_calls] == [("f", {"a": "é"})]
        assert "".join(d.get("content", "") for d in deltas) == "Sure."
