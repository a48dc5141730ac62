"""Structured outputs (ggtorch/constrain.py): the vocabulary bridge and masks on both tokenizers, JSON schema /
GBNF constrained generation through the Python API, the batch engine, the CLI and the server (the official
`openai` client's ``chat.completions.parse``), and one clear error for every bad schema or grammar."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from enum import Enum
from typing import Optional

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from conftest import TINY, Running
from ggtorch.constrain import compile_constraint, fill_masks, json_lark
from ggtorch.errors import ConstraintError, GGTorchError
from ggtorch.special_tokens import A_CONTROL, A_UNKNOWN

YES_NO = 'root ::= ("yes" | "no")'


# ---- a nested schema: objects, arrays, enums, numbers with ranges, optional fields -------------------
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=16)
    zip_code: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    height_m: float = Field(ge=0.5, le=2.5)
    favourite: Color
    colors: list[Color] = Field(max_length=3)
    address: Address
    nickname: Optional[str] = Field(default=None, max_length=12)


PERSON = Person.model_json_schema()
PROMPT = "Here is a person described as JSON:"


def _allowed(mask_row: torch.Tensor) -> set[int]:
    return set(mask_row.nonzero().flatten().tolist())


def _walk(tok, grammar, text: str) -> None:
    """Feed the tokenizer's own tokens of ``text`` through the grammar: each must be allowed."""
    c = grammar.new()
    for t in tok.tokenize(text):
        assert fill_masks([c], 1, tok.n_vocab)[0, t], (text, t, tok.piece(t))
        assert c.advance(t)
    return c


# ---- the vocabulary bridge and masks ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smollm", "gemma"])
def test_mask_special_tokens_and_eos(request, name):
    tok = request.getfixturevalue(name).tokenizer
    special = set(((torch.from_numpy(tok.attrs) & (A_CONTROL | A_UNKNOWN)) != 0).nonzero().flatten().tolist())
    eog = set(tok.eog_ids)
    assert eog <= special and len(special) > len(eog)
    g = compile_constraint(tok, grammar='root ::= "a" "b"*')
    c = g.new()
    first = _allowed(fill_masks([c], 1, tok.n_vocab)[0])
    assert first and not first & special  # neither control tokens nor end-of-generation before "a"
    assert all(tok.piece(t) and (b"a" + b"b" * 64).startswith(tok.piece(t)) for t in first)
    a = tok.tokenize("a")
    assert len(a) == 1 and c.advance(a[0]) and c.accepting and not c.done
    after = _allowed(fill_masks([c], 1, tok.n_vocab)[0])
    assert eog <= after and not after & (special - eog)  # complete: end-of-generation allowed, "b" too
    assert all(tok.piece(t) == b"b" * len(tok.piece(t)) for t in after - eog)
    assert c.advance(sorted(eog)[0]) and c.done
    # a grammar that cannot go on is done at once, and then only end-of-generation may follow
    c = _walk(tok, compile_constraint(tok, grammar=YES_NO), "yes")
    assert c.done and _allowed(fill_masks([c], 1, tok.n_vocab)[0]) == eog


@pytest.mark.parametrize("name", ["smollm", "gemma"])
def test_bridge_bytes_follow_the_tokenizer(request, name):
    """SentencePiece (▁, <0xXX> byte pieces) and byte-level BPE alike: the tokenizer's own tokens of a text
    with spaces, newlines, digits and non-ASCII letters are allowed at every step of a literal grammar."""
    tok = request.getfixturevalue(name).tokenizer
    text = 'Grüße, 東京 {"k": [1, 2.5]}\n  done'
    g = compile_constraint(tok, lark="start: " + json.dumps(text))
    assert _walk(tok, g, text).done
    # and a wrong token is refused: the mask excludes it, advancing on it is an error
    c = g.new()
    wrong = tok.tokenize("Hello")[0]
    assert not fill_masks([c], 1, tok.n_vocab)[0, wrong]
    assert not c.advance(wrong) and c.error and c.done
    assert _allowed(fill_masks([c], 1, tok.n_vocab)[0]) == set(tok.eog_ids)  # a broken row can only end


def test_forced_text_gets_no_space_prefix():
    """A SentencePiece vocabulary with add_space_prefix: llguidance tokenizes forced text ("es" after "y")
    through our tokenizer, which must not prepend "▁" there, or " e" would be the only token allowed."""
    import ggtorch

    tok = ggtorch.load(TINY / "tiny-llama-Q4_K.gguf").tokenizer
    assert tok.model == "llama" and tok.add_space_prefix
    c = compile_constraint(tok, grammar=YES_NO).new()
    assert c.advance(tok.token_to_id["y"])
    allowed = _allowed(fill_masks([c], 1, tok.n_vocab)[0])
    assert allowed and all(b"es".startswith(tok.piece(t)) and tok.piece(t) for t in allowed)


def test_fill_masks_rows_and_width(smollm):
    tok = smollm.tokenizer
    g = compile_constraint(tok, json_object=True)
    assert fill_masks([None, None], 2, tok.n_vocab) is None
    a, b = g.new(), g.new()
    for t in tok.tokenize('{"x":'):
        b.advance(t)
    m = fill_masks([a, None, b], 3, tok.n_vocab + 7)  # an output matrix wider than the vocabulary
    assert m.shape == (3, tok.n_vocab + 7) and m.dtype == torch.bool
    assert m[1].all() and not m[0, tok.n_vocab:].any() and not m[2, tok.n_vocab:].any()
    assert m[0].sum() < 50 and m[2].sum() > m[0].sum()  # '{' pieces only, then any value
    assert torch.equal(m[0], fill_masks([a], 1, tok.n_vocab + 7)[0])
    row = torch.zeros(tok.n_vocab, dtype=torch.bool)
    b.fill(row)
    assert torch.equal(row, m[2, :tok.n_vocab])


def test_listed_properties_close_the_object(smollm):
    """As llama.cpp's converter: an object schema with properties and no additionalProperties takes no
    others (a small model would invent properties forever); {"type": "object"} alone takes any."""
    tok = smollm.tokenizer
    c = compile_constraint(tok, json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}).new()
    for t in tok.tokenize('{"a":1'):
        c.advance(t)
    assert {tok.piece(t) for t in _allowed(fill_masks([c], 1, tok.n_vocab)[0])} >= {b"}"}
    assert not fill_masks([c], 1, tok.n_vocab)[0, tok.tokenize(",")[0]]
    c = compile_constraint(tok, json_object=True).new()
    assert _walk(tok, compile_constraint(tok, json_object=True), '{"b":[1,{"c":null}]}').done
    c = compile_constraint(tok, json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                             "additionalProperties": True}).new()
    for t in tok.tokenize('{"a":1'):
        c.advance(t)
    assert fill_masks([c], 1, tok.n_vocab)[0, tok.tokenize(",")[0]]


def test_json_is_compact(smollm):
    """No free whitespace: a small model cannot wander off into spaces and newlines."""
    tok = smollm.tokenizer
    c = compile_constraint(tok, json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}).new()
    for t in tok.tokenize('{"a"'):
        c.advance(t)
    allowed = _allowed(fill_masks([c], 1, tok.n_vocab)[0])
    assert allowed and all(tok.piece(t).startswith(b":") for t in allowed)


# ---- bad input: one ConstraintError, never a hang ----------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(json_schema={"type": "frobnicate"}), "frobnicate"),
    (dict(json_schema='{"type": '), "not valid JSON"),
    (dict(json_schema=[1, 2]), "must be an object"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (dict(grammar='root ::= ("yes" | "no"'), "grammar"),
    (dict(grammar="root ::= undefined-rule"), "undefined-rule"),
    (dict(grammar="   "), "empty"),
    (dict(lark="start: nothere"), "nothere"),
    (dict(regex="a(b"), "regex"),
    (dict(json_schema={}, grammar=YES_NO), "exactly one"),
    ({}, "exactly one"),
])
def test_bad_constraints_raise(smollm, kw, msg):
    with pytest.raises(ConstraintError, match=None) as e:
        compile_constraint(smollm.tokenizer, **kw)
    assert isinstance(e.value, GGTorchError) and msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConstraintError):  # the failure is cached: the same answer again
        compile_constraint(smollm.tokenizer, **kw)


def test_compile_time_limit(smollm):
    # ~150 ms to compile here (60 such properties took 4 ms once the tokenizer was bridged: too close to
    # the 1 ms limit when another test has shortened the GIL switch interval, as `serve` does)
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i},{i + 40}}}"}
                                               for i in range(2000)}, "required": [f"p{i}" for i in range(2000)]}
    t0 = time.perf_counter()
    with pytest.raises(ConstraintError, match="longer than"):
        compile_constraint(smollm.tokenizer, json_schema=schema, timeout_s=0.001)
    assert time.perf_counter() - t0 < 1.0


def test_cache_and_lark_json(smollm):
    tok = smollm.tokenizer
    g = compile_constraint(tok, json_schema=PERSON)
    assert compile_constraint(tok, json_schema=json.dumps(PERSON)) is g  # same text, same compiled grammar
    assert compile_constraint(tok, json_schema=Person) is g  # a pydantic model gives its schema
    tool = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
    lg = compile_constraint(tok, lark='start: "<tool_call>" ' + json_lark(tool) + ' "</tool_call>"')
    assert _walk(tok, lg, '<tool_call>{"city":"Paris"}</tool_call>').done


# ---- generation: Python API, batch engine, sampled ------------------------------------------------------
def test_generate_json_schema_validates(smollm):
    r = smollm.generate(PROMPT, json_schema=PERSON, max_tokens=200)
    assert r.finish_reason == "stop", r.text
    obj = json.loads(r.text)
    jsonschema.validate(obj, PERSON)
    Person.model_validate(obj)
    assert r.ids[-1] not in smollm.tokenizer.eog_ids  # stopped when the grammar completed


def test_chat_grammar_and_stream(smollm):
    msgs = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    r = smollm.chat(msgs, grammar=YES_NO, max_tokens=8)
    assert r.text in ("yes", "no") and r.finish_reason == "stop"
    assert "".join(smollm.chat_stream(msgs, grammar=YES_NO, max_tokens=8)) == r.text
    assert "".join(smollm.stream("Answer:", grammar=YES_NO, max_tokens=8)) in ("yes", "no")
    with pytest.raises(ConstraintError):
        smollm.chat(msgs, grammar="root ::= (", max_tokens=8)


def test_sampled_outputs_always_validate(smollm):
    """Temperature 1 with the server's wide sampler (top_k 0, top_p 1, min_p 0), batched: each row draws
    with its own generator (the server's n choices and parse(n=3) below add more seeds)."""
    prompts = [PROMPT, "Write some JSON:", "Once upon a time", "{"]
    rs = smollm.generate_batch(prompts, parallel=4, json_schema=PERSON, max_tokens=200, temperature=1.0, top_k=0,
                               top_p=1.0, min_p=0.0, seed=11)
    for r in rs:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), PERSON)


def test_batch_constrained_beside_unconstrained(smollm):
    """Constrained and free rows in one batch: each free row gives the tokens it gives alone; each
    constrained row validates (JSON) or matches (GBNF)."""
    from ggtorch.batch import BatchEngine, BatchRequest
    from ggtorch.sampling import SamplingParams

    tok = smollm.tokenizer
    free = ["The capital of France is", "1, 2, 3,"]
    alone = [smollm.generate(p, max_tokens=12).ids for p in free]
    out: dict[int, list] = {}
    reqs = []
    specs = [(free[0], None), (PROMPT, compile_constraint(tok, json_schema=PERSON)), (free[1], None),
             ("Is it raining?", compile_constraint(tok, grammar=YES_NO))]
    for k, (p, g) in enumerate(specs):
        reqs.append(BatchRequest(smollm._prompt_ids(p), SamplingParams(), max_tokens=12 if g is None else 200,
                                 on_event=lambda ev, k=k: out.setdefault(k, []).append(ev),
                                 constraint=g.new() if g is not None else None))
    eng = BatchEngine(smollm, n_slots=4, n_ctx=512)
    eng.submit_many(reqs)
    eng.run_until_done()
    ids = {k: [t.id for ev in evs for t in ev.tokens] for k, evs in out.items()}
    text = {k: "".join(ev.text for ev in evs) for k, evs in out.items()}
    assert ids[0] == alone[0] and ids[2] == alone[1]
    assert out[1][-1].finish_reason == "stop" and out[3][-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text[1]), PERSON)
    assert text[3] in ("yes", "no")


# ---- CLI -----------------------------------------------------------------------------------------------
def _gg(*args):
    return subprocess.run([sys.executable, "-m", "ggtorch", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_grammar_and_bad_input(tmp_path):
    model = TINY / "tiny-llama-Q4_K.gguf"  # a random tiny model: only the grammar makes it say yes or no
    (tmp_path / "yn.gbnf").write_text(YES_NO + "\n")
    r = _gg("run", model, "-p", "Hello", "--grammar", tmp_path / "yn.gbnf", "-n", "8", "--temp", "1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("yes", "no")
    (tmp_path / "bad.gbnf").write_text('root ::= "yes" | (\n')
    for args, msg in [(["--grammar", tmp_path / "bad.gbnf"], "grammar"),
                      (["--grammar", tmp_path / "missing.gbnf"], "cannot read"),
                      (["--json-schema", '{"type": "nope"}'], "nope"),
                      (["--json-schema", "{oops"], "not valid JSON")]:
        r = _gg("run", model, "-p", "Hello", "-n", "4", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr


# ---- server: the official openai client ------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(smollm):
    from ggtorch.server import create_app

    s = Running(create_app(smollm, parallel=4, n_ctx=4 * 512, model_name="smollm2-135m"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_server_parse_pydantic(oai):
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    r = oai.chat.completions.parse(model="smollm2-135m", messages=msgs, response_format=Person, max_tokens=200,
                                   temperature=0)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and isinstance(m.parsed, Person), m.content
    jsonschema.validate(json.loads(m.content), PERSON)
    # sampled, several choices at once: each validates
    r = oai.chat.completions.parse(model="smollm2-135m", messages=msgs, response_format=Person, max_tokens=200,
                                   temperature=1.0, n=3, seed=5)
    assert len(r.choices) == 3 and all(isinstance(c.message.parsed, Person) for c in r.choices)


def test_server_json_object_and_grammar(oai, served):
    msgs = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]
    chunks = list(oai.chat.completions.create(model="m", messages=msgs, response_format={"type": "json_object"},
                                              max_tokens=120, stream=True, temperature=0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict) and chunks[-1].choices[0].finish_reason == "stop"
    r = oai.completions.create(model="m", prompt="Is water wet? Answer:", max_tokens=8,
                               extra_body={"grammar": YES_NO})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    # llama.cpp's json_schema field, on the completions endpoint
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "A number:", "max_tokens": 16,
                                                         "json_schema": {"type": "integer", "minimum": 3, "maximum": 9}},
                   timeout=120).json()
    assert 3 <= json.loads(r["choices"][0]["text"]) <= 9


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "frob"}}}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": "nope"}},
     "response_format.json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/chat/completions", {"grammar": 'root ::= "a" | ('}, "grammar"),
    ("/v1/completions", {"grammar": "root ::= missing"}, "grammar"),
    ("/v1/completions", {"json_schema": {"type": "object", "required": 5}}, "json_schema"),
    ("/v1/completions", {"json_schema": {"type": "object"}, "grammar": YES_NO}, "grammar"),
])
def test_server_bad_schema_400(served, oai, path, body, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    r = httpx.post(served.url + path, json={**base, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["param"] == param and e["type"] == "invalid_request_error" and e["message"]
    if "chat" in path and "grammar" in body:  # and through the official client: a BadRequestError
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(model="m", messages=base["messages"], max_tokens=4,
                                        extra_body={"grammar": body["grammar"]})
