"""The continuous-batching engine (ggtorch.batch) from Python: same answers as one sequence at a time,
cancellation, prompt cache, queue bound, context bound. SmolLM2, a few tokens each."""
from __future__ import annotations

import pytest
import torch

from ggtorch.batch import BatchEngine, BatchRequest, ContextSizeError, QueueFullError
from ggtorch.sampling import SamplingParams


def small_margin(m, ids: list[int], k: int, limit: float = 0.5) -> bool:
    """Whether the top-2 logit margin at generated step k (after ids[:len(prompt)+k]) is below limit."""
    top = torch.topk(m.logits(ids)[-1], 2).values
    return float(top[0] - top[1]) < limit


def test_generate_batch_equals_generate(smollm):
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at"]
    out = smollm.generate_batch(prompts, parallel=3, max_tokens=10)
    for p, r in zip(prompts, out):
        ref = smollm.generate(p, max_tokens=10)
        assert r.prompt_ids == ref.prompt_ids and r.finish_reason == ref.finish_reason
        k = next((i for i, (a, b) in enumerate(zip(r.ids, ref.ids)) if a != b), None)
        if k is None:
            assert r.ids == ref.ids and r.text == ref.text
        else:  # batched numerics may flip a near-tie, nothing else
            assert small_margin(smollm, ref.prompt_ids + ref.ids[:k], k), (p, k)


def test_generate_batch_stop_and_seed(smollm):
    a, b = smollm.generate_batch(["1, 2, 3,", "1, 2, 3,"], max_tokens=12, stop=["5, 6"])
    assert a.text == b.text == " 4, " and a.finish_reason == "stop"
    x = smollm.generate_batch(["Hello"] * 2, max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    y = smollm.generate("Hello", max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    assert x[0].text == x[1].text  # one seed, one sampler state per sequence
    assert x[0].text == y.text or x[0].ids[:1] == y.ids[:1]


def run_collect(engine, reqs):
    events = {id(r): [] for r in reqs}
    for r in reqs:
        r.on_event = events[id(r)].append
        engine.submit(r)
    return events


def test_cancel_prompt_cache_and_bounds(smollm):
    eng = BatchEngine(smollm, n_slots=1, n_ctx=64, max_queue=1)
    ids = smollm.tokenize("A shared prefix for the prompt cache, then one", bos=True)
    greedy = SamplingParams()
    r1 = BatchRequest(ids, greedy, max_tokens=40, ignore_eos=True)
    r2 = BatchRequest(ids[:-1] + smollm.tokenize(" two"), greedy, max_tokens=2)
    ev = run_collect(eng, [r1, r2])
    with pytest.raises(QueueFullError):  # one in the slot's turn, one waiting: full
        eng.submit(BatchRequest(ids, greedy, max_tokens=1))
    with pytest.raises(ContextSizeError):
        eng.submit(BatchRequest(list(range(1, 70)), greedy, max_tokens=1))
    eng.step()
    eng.step()
    r1.cancel()
    eng.run_until_done()
    e1, e2 = ev[id(r1)], ev[id(r2)]
    assert e1[-1].finish_reason == "cancelled" and e1[-1].completion_tokens <= 3
    assert e2[-1].finish_reason == "length" and e2[-1].completion_tokens == 2
    assert e2[-1].cached_tokens == len(ids) - 1  # the slot kept r1's prompt
    # a sequence that fills its slot's context ends with "length"
    eng = BatchEngine(smollm, n_slots=1, n_ctx=12)
    r3 = BatchRequest(ids[:5], greedy, max_tokens=500, ignore_eos=True)
    ev = run_collect(eng, [r3])
    eng.run_until_done()
    last = ev[id(r3)][-1]
    assert last.finish_reason == "length" and last.completion_tokens == 12 - 5 + 1
    assert sum(len(e.tokens) for e in ev[id(r3)]) == last.completion_tokens


def test_one_sampler_call_per_step_and_the_masks_hook(smollm, monkeypatch):
    """Every row of a step is sampled in one sample_batch call, and the rows of _masks constrain
    greedy and sampled rows alike (the hook structured outputs fill in)."""
    import ggtorch.batch as batch

    allowed = sorted(set(smollm.tokenize(" yes no maybe 1 2 3", bos=False)))

    class Masked(BatchEngine):
        def _masks(self, seqs):
            m = torch.zeros(len(seqs), self.model.n_vocab, dtype=torch.bool)
            m[:, allowed] = True
            return m

    calls = []
    real = batch.sample_batch
    monkeypatch.setattr(batch, "sample_batch", lambda logits, *a: calls.append(len(logits)) or real(logits, *a))
    eng = Masked(smollm, n_slots=4, n_ctx=128)
    prompts = ["Is the sky blue?", "Count: 1", "Maybe", "The answer is"]
    reqs = [BatchRequest(smollm.tokenize(p, bos=True), SamplingParams(temperature=t, seed=3), max_tokens=5,
                         ignore_eos=True) for p, t in zip(prompts, [0.0, 0.9, 0.0, 1.2])]
    ev = run_collect(eng, reqs)
    eng.run_until_done()
    toks = [t.id for r in reqs for e in ev[id(r)] for t in e.tokens]
    assert len(toks) == 20 and set(toks) <= set(allowed)
    assert max(calls) == 4 and sum(calls) == 20  # the four rows of a step together, each token once


def test_a_row_with_nothing_allowed_fails_alone(smollm):
    """A constraint that leaves a row no token fails that request with an error; the others go on."""
    bad = BatchRequest(smollm.tokenize("Hello", bos=True), SamplingParams(), max_tokens=4, ignore_eos=True)

    class Masked(BatchEngine):
        def _masks(self, seqs):
            m = torch.ones(len(seqs), self.model.n_vocab, dtype=torch.bool)
            m[[i for i, q in enumerate(seqs) if q.req is bad]] = False
            return m

    eng = Masked(smollm, n_slots=2, n_ctx=64)
    good = BatchRequest(smollm.tokenize("Once upon", bos=True), SamplingParams(temperature=0.7, seed=1), max_tokens=4,
                        ignore_eos=True)
    ev = run_collect(eng, [bad, good])
    eng.run_until_done()
    assert ev[id(bad)][-1].finish_reason == "error" and "no token" in ev[id(bad)][-1].error
    assert ev[id(good)][-1].finish_reason == "length" and ev[id(good)][-1].completion_tokens == 4
