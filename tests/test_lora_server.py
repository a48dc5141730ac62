"""Per-request LoRA adapters in the server (llama.cpp server's ``lora`` field and /lora-adapters) and the
per-sequence scales behind them: two adapters loaded on the tiny fixture model (tests/data/lora), requests
with different adapters batched in one forward, each answer equal to that adapter alone."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ggtorch
from conftest import TINY, Running, tiny_manifest
from ggtorch.lora.adapter import Adapter
from ggtorch.lora.apply import set_slot_scales
from ggtorch.server import create_app

DATA = Path(__file__).parent / "data" / "lora"
A, B = str(DATA / "peft_a.gguf"), str(DATA / "peft_b.gguf")
PROMPT = tiny_manifest()["prompt_ids"]
MODEL = str(TINY / "tiny-llama-Q8_0.gguf")
N_OUT = 8
# a request's lora field -> the adapters that alone must give its answer (the server loads A at 1, B at 0.5)
CASES = [(None, [(A, 1.0), (B, 0.5)]),  # no field: the global scales
         ([{"id": 0, "scale": 1.0}], [(A, 1.0)]),  # B unlisted: scale 0
         ([{"id": 1, "scale": 0.7}], [(B, 0.7)]),
         ([{"id": 0, "scale": 0}], [])]  # every adapter at 0: the base model


@pytest.fixture(scope="module")
def served():
    m = ggtorch.load(MODEL, lora=[(A, 1.0), (B, 0.5)])  # what `ggtorch serve MODEL --lora A --lora-scaled B 0.5` loads
    s = Running(create_app(m, parallel=4, n_ctx=4 * 64, engine_thread=False), stop_engine=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """Greedy text and logprobs of PROMPT with a list of adapters alone, from a model of its own."""
    m = ggtorch.load(MODEL)
    memo = {}

    def get(adapters, prompt=PROMPT):
        key = (tuple(adapters), tuple(prompt))
        if key not in memo:
            m.set_lora(adapters)
            r = m.generate(prompt, max_tokens=N_OUT, ignore_eos=True)
            lp = torch.log_softmax(m.logits(list(prompt) + r.ids[:-1]).float(), -1)
            memo[key] = r.text, [float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(r.ids)]
            m.set_lora([])
        return memo[key]

    return get


def ask(client, lora, **kw):
    extra = {"ignore_eos": True} | ({} if lora is None else {"lora": lora})
    return client.completions.create(model="m", prompt=PROMPT, max_tokens=N_OUT, temperature=0, logprobs=1,
                                     extra_body=extra, **kw)


def check(r, want, tol=1e-4):
    text, lps = want
    c = r.choices[0]
    assert c.text == text
    got = c.logprobs.token_logprobs
    assert len(got) == len(lps) and max(abs(a - b) for a, b in zip(got, lps)) < tol, (got, lps)


def running(engine):
    if engine.thread is None:
        engine.start()


# ---- the server -------------------------------------------------------------------------------------
def test_mixed_adapters_batched_each_equal_alone(served, client, reference):
    """Four requests with different lora fields enter one batch: each answer equals its adapters alone
    (a model loaded with only them, and the same request sent alone), and the decode steps mixed them."""
    eng, net = served.engine, served.engine.model.net
    eng.stop()  # hold the engine so that the four requests are admitted in one step
    calls = []
    plain = net.forward_batch

    def spy(tokens, slots, cache, rows=None):
        calls.append({s: eng.lora.held[s] for s in slots})
        return plain(tokens, slots, cache, rows)

    net.forward_batch = spy
    before = eng.lora.mixed_steps
    out = [None] * len(CASES)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, ask(client, CASES[i][0])))
               for i in range(len(CASES))]
    try:
        for t in threads:
            t.start()
        t0 = time.time()
        while len(eng.queue) < len(CASES):
            assert time.time() - t0 < 30, "the requests did not reach the queue"
            time.sleep(0.01)
        eng.start()
        for t in threads:
            t.join(120)
    finally:
        net.forward_batch = plain
        running(eng)
    # batched: forwards over the four slots, each row under its own scales
    mixed = [c for c in calls if len(c) == 4 and len(set(c.values())) == 4]
    assert len(mixed) >= N_OUT - 1, calls
    assert eng.lora.mixed_steps - before >= N_OUT - 1
    for (lora, adapters), r in zip(CASES, out):
        check(r, reference(adapters))
        check(ask(client, lora), reference(adapters))  # the same request alone
    assert len({r.choices[0].text for r in out}) == 4  # the adapters matter on this prompt


def test_slot_reuse_takes_the_new_scales_and_no_foreign_cache(served, client, reference):
    """A request under scales no slot holds gets no prompt cache from slots computed under other scales,
    and the slot it takes (last used by another request) runs with the new request's scales."""
    running(served.engine)
    for lora, _ in CASES:  # every slot holds PROMPT under one of the four settings
        ask(client, lora)
    new = [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 2.0}]
    r = ask(client, new)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    check(r, reference([(A, 0.5), (B, 2.0)]))
    again = ask(client, new)  # the same scales again: the slot's cache is reused
    assert again.usage.prompt_tokens_details.cached_tokens == len(PROMPT) - 1
    check(again, reference([(A, 0.5), (B, 2.0)]))


def test_chat_lora_field(served, client, reference):
    running(served.engine)
    msgs = [{"role": "user", "content": "hello there"}]
    m = served.engine.model
    ids = m.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)  # as tests/test_server.py
    ids = m.tokenize(ids, special=True) if isinstance(ids, str) else list(ids)
    for lora, adapters in CASES[1:3]:
        r = client.chat.completions.create(model="m", messages=msgs, max_tokens=N_OUT, temperature=0,
                                           extra_body={"lora": lora, "ignore_eos": True})
        assert r.choices[0].message.content == reference(adapters, ids)[0]


def test_lora_adapters_get_post_round_trip(served, client, reference):
    running(served.engine)
    url = served.url + "/lora-adapters"
    got = httpx.get(url).json()
    assert [(e["id"], e["path"], e["scale"]) for e in got] == [(0, A, 1.0), (1, B, 0.5)]
    try:
        r = httpx.post(url, json=[{"id": 1, "scale": 0.25}])
        assert r.status_code == 200 and r.json() == {"success": True}
        # llama.cpp: an adapter missing from the list gets scale 0
        assert [e["scale"] for e in httpx.get(url).json()] == [0.0, 0.25]
        check(ask(client, None), reference([(B, 0.25)]))  # a request without lora takes the new global scales
        check(ask(client, [{"id": 0, "scale": 1.0}]), reference([(A, 1.0)]))  # its own field still wins
    finally:
        httpx.post(url, json=[{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}])
    assert [e["scale"] for e in httpx.get(url).json()] == [1.0, 0.5]
    check(ask(client, None), reference([(A, 1.0), (B, 0.5)]))


BAD_POST = [b'{"id": 0, "scale": 1}', b'[{"id": 2, "scale": 1}]', b'[{"id": -1, "scale": 1}]',
            b'[{"id": 0, "scale": "x"}]', b'[{"id": "0", "scale": 1}]', b'[{"id": 0}]', b'[{"id": true, "scale": 1}]',
            b'[{"id": 0, "scale": NaN}]', b'[{"id": 0, "scale": 1e30}]', b'[{"id": 0, "scale": null}]', b'[3]',
            b'not json']
BAD_FIELD = ["x", [{"id": 2, "scale": 1}], [{"id": 0, "scale": None}], [{"id": -1, "scale": 1}], [5],
             {"id": 0, "scale": 1}, [{"id": 0.0, "scale": 1}], [{"id": 0, "scale": [1]}], [{"id": 1, "scale": -1e30}]]


def test_bad_lora_input_is_a_400(served, client):
    running(served.engine)
    url = served.url + "/lora-adapters"
    for raw in BAD_POST:
        r = httpx.post(url, content=raw)
        assert r.status_code == 400, (raw, r.text)
        e = r.json()["error"]
        assert e["type"] == "invalid_request_error" and e["message"], e
    assert [e["scale"] for e in httpx.get(url).json()] == [1.0, 0.5]  # nothing changed
    for lora in BAD_FIELD:
        with pytest.raises(openai.BadRequestError) as ei:
            ask(client, lora)
        assert ei.value.status_code == 400 and ei.value.body["param"] == "lora", lora
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body={"lora": lora})
    r = httpx.post(served.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "lora": []})
    assert r.status_code == 200  # an empty list: the global scales, as llama.cpp


junk = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["id", "scale", "x"]), c,
                                                                        max_size=3), max_leaves=6)
entry = st.fixed_dictionaries({}, optional={"id": st.integers(-2, 3) | junk, "scale": st.floats() | junk})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.lists(entry, max_size=3) | junk, post=st.booleans())
def test_fuzz_lora_fields_never_500(served, field, post):
    """Whatever the lora field or POST body, a 2xx or a 400 with the error object; never a 500."""
    running(served.engine)
    if post:
        r = httpx.post(served.url + "/lora-adapters", content=json.dumps(field).encode(), timeout=60)
        httpx.post(served.url + "/lora-adapters", json=[{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}])
    else:
        body = {"prompt": PROMPT, "max_tokens": 2, "logprobs": 2, "lora": field}
        r = httpx.post(served.url + "/v1/completions", content=json.dumps(body).encode(), timeout=60)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"]


def test_server_without_adapters():
    from fastapi.testclient import TestClient

    app = create_app(ggtorch.load(MODEL), parallel=1, n_ctx=64, engine_thread=False)
    assert app.state.server.engine.lora is None
    with TestClient(app) as c:
        assert c.get("/lora-adapters").json() == []
        assert c.post("/lora-adapters", json=[]).json() == {"success": True}
        assert c.post("/lora-adapters", json=[{"id": 0, "scale": 1}]).status_code == 400
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "lora": [{"id": 0, "scale": 1}]})
        assert r.status_code == 400 and "--lora" in r.json()["error"]["message"]


# ---- the model layer: per-sequence scales -------------------------------------------------------------
def _batch(net, prompts, nxt, scales):
    pool = net.new_pool(len(prompts), 64, dtype="f32")
    set_slot_scales(net, scales, len(prompts))
    try:
        for s, p in enumerate(prompts):
            net.forward(p, pool, slot=s)
        return net.forward_batch(nxt, list(range(len(prompts))), pool)
    finally:
        set_slot_scales(net, None)


def test_per_row_scales_equal_to_the_attached_ones_change_no_bit():
    """A batch whose rows all run under the attached scales gives the same bits through the per-row table
    as through the plain path (requests with equal adapters behave exactly as without the feature)."""
    net = ggtorch.load(MODEL, lora=[(A, 1.0), (B, 0.5)]).net
    prompts, nxt = [PROMPT[:7], PROMPT[3:12], PROMPT[:5]], [PROMPT[7], PROMPT[12], PROMPT[5]]
    plain = _batch(net, prompts, nxt, None)
    table = _batch(net, prompts, nxt, {s: [1.0, 0.5] for s in range(3)})
    assert torch.equal(plain, table)
    other = _batch(net, prompts, nxt, {1: [0.0, 0.5]})
    assert torch.equal(other[[0, 2]], plain[[0, 2]]) and not torch.equal(other[1], plain[1])


def test_token_embd_adapter_takes_per_row_scales():
    """An adapter on token_embd (llm_build_inp_embd's term) also follows each row's scale."""
    m = ggtorch.load(MODEL)
    net = m.net
    g = torch.Generator().manual_seed(0)
    r, n_vocab, n_embd = 3, net.cfg.n_vocab, net.cfg.n_embd
    ad = Adapter("embd", "llama", 0.0, {"token_embd.weight": (torch.randn(n_vocab, r, generator=g),
                                                                torch.randn(n_embd, r, generator=g))})
    prompts, nxt = [PROMPT[:6], PROMPT[2:9]], [PROMPT[6], PROMPT[9]]
    alone = []
    for p, t, s in zip(prompts, nxt, (0.0, 0.8)):
        m.set_lora([(ad, s)])
        c = net.new_cache(16, dtype="f32")
        net.forward(p, c)
        alone.append(net.forward([t], c))
    m.set_lora([(ad, 1.0)])
    got = _batch(net, prompts, nxt, {0: [0.0], 1: [0.8]})
    want = torch.cat(alone)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (alone[0] - alone[1]).abs().max() > 0.1


def test_cli_serve_loads_several_adapters():
    """`ggtorch serve MODEL --lora A --lora-scaled B 0.5`: GET /lora-adapters lists both with their scales."""
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([sys.executable, "-m", "ggtorch", "serve", MODEL, "--port", str(port), "--parallel", "2",
                          "--ctx", "128", "--threads", "1", "--lora", A, "--lora-scaled", B, "0.5"],
                         stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while True:
            assert p.poll() is None and time.time() - t0 < 120, "ggtorch serve did not come up"
            try:
                got = httpx.get(f"http://127.0.0.1:{port}/lora-adapters", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert [(e["id"], e["path"], e["scale"]) for e in got] == [(0, A, 1.0), (1, B, 0.5)]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 2, "lora": [{"id": 1, "scale": 1.0}]})
        assert r.status_code == 200
    finally:
        p.terminate()
        err = p.communicate(timeout=30)[1]
    assert f"LoRA adapter 1: {B} (scale 0.5)" in err
