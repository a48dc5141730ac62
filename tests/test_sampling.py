"""Sampling parts: each filter keeps what it should; penalties; stop strings; parameter errors."""
import pytest
import torch

from ggtorch.errors import GenerationError
from ggtorch.generate import _overlap
from ggtorch.sampling import (SamplingParams, apply_penalties, make_generator, min_p, sample, top_k, top_p,
                              typical_p)

L = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def kept(x):
    return torch.isfinite(x).nonzero().flatten().tolist()


def test_filters():
    assert kept(top_k(L, 2)) == [0, 1]
    assert kept(top_p(L, 0.6)) == [0, 1]
    assert kept(top_p(L, 0.5)) == [0]
    assert kept(min_p(L, 0.25)) == [0, 1, 2]
    assert kept(typical_p(L, 0.99)) == [0, 1, 2, 3, 4][: len(kept(typical_p(L, 0.99)))]
    assert len(kept(typical_p(L, 0.3))) < 5


def test_penalties():
    x = torch.tensor([2.0, -2.0, 1.0])
    p = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    y = apply_penalties(x, [0, 0, 1], p)
    assert y.tolist() == [2.0 / 2 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 1.0]


def test_seeded_sampling_is_reproducible():
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = [sample(L, p, [], make_generator(3)) for _ in range(5)]
    b = [sample(L, p, [], make_generator(3)) for _ in range(5)]
    assert a == b
    draws = {sample(L, p, [], g) for g in [make_generator(s) for s in range(40)]}
    assert len(draws) > 2  # it really samples
    assert sample(L, SamplingParams(), [], None) == 0  # greedy by default


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"min_p": 2}, {"repeat_penalty": 0}])
def test_bad_params(kw):
    with pytest.raises(GenerationError):
        SamplingParams(**kw)


def test_stop_overlap():
    assert _overlap("hello wor", "world") == 3 and _overlap("abc", "xyz") == 0


def test_stop_strings_and_stream(smollm):
    r = smollm.generate("The capital of France is", max_tokens=24)
    assert r.finish_reason == "length" and len(r.ids) == 24
    cut = r.text[: r.text.index(" ", 3) + 1]  # a stop string that occurs in the greedy text
    s = smollm.generate("The capital of France is", max_tokens=24, stop=[cut[2:]])
    assert s.finish_reason == "stop" and cut[2:] not in s.text and r.text.startswith(s.text)
    assert "".join(smollm.stream("The capital of France is", max_tokens=24)) == r.text


# ---- the batched sampler (sample_batch) against the one-row sampler and a full-vocabulary reference --
from ggtorch.sampling import apply_logit_bias, argmax_rows, sample_batch, sampling_probs, topk_rows  # noqa: E402

V = 12000  # not a multiple of the 64-logit chunks; large enough for the two-stage top-k at k <= 46


def mixed_rows():
    """(params, history, allowed or None) per row: every stage on its own and in the usual chain."""
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(V, generator=g) < 0.3
    hist = [int(t) for t in torch.randint(0, V, (40,), generator=g)] + [3, 3, 3, 9]
    S = SamplingParams
    return [
        (S(temperature=0.8), [], None),  # the server's defaults: top_k 40, top_p 0.95, min_p 0.05
        (S(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0), [], None),  # top-k alone
        (S(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0), [], None),  # top-p over the whole vocabulary
        (S(temperature=1.3, top_k=0, top_p=1.0, min_p=0.02), [], None),  # min-p alone
        (S(temperature=0.7, top_k=12, top_p=0.8, min_p=0.02), [], None),  # a smaller k in the top-k group
        (S(temperature=1.0, top_k=30, top_p=1.0, min_p=0.0, typical_p=0.6), [], None),  # typical
        (S(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0, typical_p=0.9), [], None),
        (S(temperature=0.9, repeat_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2, repeat_last_n=8,
           top_p=1.0, min_p=0.0), hist, None),  # penalties over the last 8 tokens
        (S(temperature=0.9, top_p=1.0, min_p=0.0, logit_bias={3: 9.0, "9": 12.5, 11: -100.0}), [], None),
        (S(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0), [], allowed),  # the structured-output mask
        (S(temperature=0.0, repeat_penalty=1.3, repeat_last_n=-1), hist, allowed),  # greedy after mask/penalties
        (S(temperature=0.0), [], None),
    ]


def logits_rows(n, seed):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def reference_probs(x, p, history, allowed):
    """Today's chain written plainly over the full row (the filters above), as a distribution."""
    x = x.float()
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    x = apply_logit_bias(apply_penalties(x, history, p), p.logit_bias)
    if p.temperature <= 0:
        return torch.zeros_like(x).scatter_(0, x.argmax().reshape(1), 1.0)
    x = min_p(top_p(typical_p(top_k(x, p.top_k), p.typical_p), p.top_p), p.min_p)
    return torch.softmax(x / p.temperature, -1)


def test_sample_batch_equals_one_row_sampler():
    rows = mixed_rows()
    params, hists, masks = zip(*rows)
    allowed = torch.stack([m if m is not None else torch.ones(V, dtype=torch.bool) for m in masks])
    gb = [make_generator(100 + i) for i in range(len(rows))]
    g1 = [make_generator(100 + i) for i in range(len(rows))]
    seen = set()
    for step in range(4):  # several steps: each row's generator must advance exactly as alone
        x = logits_rows(len(rows), step)
        got = sample_batch(x, params, hists, gb, allowed)
        want = [sample(x[i], params[i], hists[i], g1[i], masks[i]) for i in range(len(rows))]
        assert got == want
        seen.update((i, t) for i, t in enumerate(got))
    assert len({t for i, t in seen if params[i].temperature > 0}) > 20  # it really samples, per row
    # a row whose neighbours change still draws the same token (no state shared across rows)
    x = logits_rows(len(rows), 99)
    a = sample_batch(x, params, hists, [make_generator(7) for _ in rows], allowed)
    b = sample_batch(x[:1], params[:1], hists[:1], [make_generator(7)])
    assert a[0] == b[0]


@pytest.mark.parametrize("subset", ["all", "head", "fallback"])
def test_stages_match_full_vocabulary_reference(subset, monkeypatch):
    """all: typical-p over the whole vocabulary sorts it; head: the whole-vocabulary rows' top-p / min-p
    cut falls inside the 256-logit head; fallback: no typical, but top-p needs more than the head."""
    rows = mixed_rows()
    if subset != "all":
        rows = [r for r in rows if not (r[0].top_k <= 0 and r[0].typical_p < 1)]
    if subset == "head":
        rows = [r for r in rows if not (r[0].top_k <= 0 and r[0].top_p > 0.8)]
        rows.append((SamplingParams(temperature=0.6, top_k=0, top_p=0.6, min_p=0.0), [], None))
    import ggtorch.sampling as sampling
    heads = []
    real_head = sampling._head
    monkeypatch.setattr(sampling, "_head", lambda *a: heads.append(real_head(*a)[2] is not None) or real_head(*a))
    params, hists, masks = zip(*rows)
    allowed = torch.stack([m if m is not None else torch.ones(V, dtype=torch.bool) for m in masks])
    for seed in range(3):
        x = logits_rows(len(rows), 10 + seed)
        for i, h in enumerate(hists):  # the penalised tokens among the candidates, so that they count
            if h:
                x[i, h[-12:]] = x[i].max() + torch.linspace(-2, 1, 12)
                if seed == 1:  # all negative: the repeat penalty multiplies instead of dividing
                    x[i] -= x[i].max() + 0.5
        got = sampling_probs(x, params, hists, allowed)
        for i, (p, h, m) in enumerate(rows):
            ref = reference_probs(x[i], p, h, m)
            assert kept(got[i].log()) == kept(ref.log()), (i, p)  # the same candidates survive
            assert torch.allclose(got[i], ref, atol=1e-6, rtol=1e-4), (i, p)
            n = int((ref > 0).sum())
            assert n == 1 if p.temperature <= 0 else 1 < n < V  # every sampling row is really filtered
            if p.top_k > 0 and p.temperature > 0:
                assert n <= p.top_k
            if m is not None:
                assert bool(m[got[i] > 0].all())
    assert heads == [subset == "head"] * 3  # the whole-vocabulary rows took the path meant


def test_whole_vocabulary_second_head(monkeypatch):
    """top-p over the whole vocabulary whose mass needs more than 256 logits: the 4096-logit head."""
    import ggtorch.sampling as sampling
    sizes = []
    real = sampling.topk_rows
    monkeypatch.setattr(sampling, "topk_rows", lambda x, k: sizes.append(k) or real(x, k))
    n_vocab = 20000
    x = torch.randn(2, n_vocab, generator=torch.Generator().manual_seed(4)) * 3
    params = [SamplingParams(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0),
              SamplingParams(temperature=1.1, top_k=0, top_p=0.97, min_p=0.0)]
    got = sampling_probs(x, params, [[], []])
    assert sizes == [256, 4096]
    for i, p in enumerate(params):
        ref = reference_probs(x[i], p, [], None)
        assert kept(got[i].log()) == kept(ref.log()) and 256 < len(kept(ref.log())) < 4096
        assert torch.allclose(got[i], ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("whole", [False, True])
def test_draw_follows_the_distribution(whole):
    """The draw picks candidates as often as their probabilities say: six candidates after top-k, or
    a whole 2,000-token row with no cut (drawn through per-chunk running totals) whose mass sits on six
    tokens spread over several chunks."""
    n_vocab = 2000 if whole else 500
    x = logits_rows(1, 5)[0, :n_vocab] / 3  # a flat head: six candidates with real mass
    if whole:
        heads = torch.tensor([5, 300, 301, 1000, 1500, 1999])
        x = torch.full((n_vocab,), -30.0)
        x[heads] = torch.tensor([0.0, 0.5, -0.3, 0.2, 0.8, -0.1])
    p = SamplingParams(temperature=1.0, top_k=0 if whole else 6, top_p=1.0, min_p=0.0)
    probs = sampling_probs(x[None], [p], [[]])[0]
    n_rows, n_steps = 100, 40
    xs = x.expand(n_rows, n_vocab)
    gens = [make_generator(1000 + i) for i in range(n_rows)]
    counts = torch.zeros(n_vocab)
    for _ in range(n_steps):
        for t in sample_batch(xs, [p] * n_rows, [[]] * n_rows, gens):
            counts[t] += 1
    freq = counts / (n_rows * n_steps)
    head = probs > 1e-6
    assert int(head.sum()) == 6 and set(kept(freq.log())) <= set(head.nonzero().flatten().tolist())
    assert (freq - probs).abs().max() < 0.03  # 4000 draws: binomial sd <= 0.008


def test_batched_edge_cases_follow_llama_cpp():
    x = L[None]  # probabilities 0.5, 0.2, 0.15, 0.1, 0.05
    S = SamplingParams

    def support(p, logits=x, **kw):
        return kept(sampling_probs(logits, [p], [[]], **kw)[0].log())

    assert support(S(temperature=1, top_k=0, top_p=0.01, min_p=0)) == [0]  # top-p keeps at least one
    assert support(S(temperature=1, top_k=0, top_p=0.6, min_p=0)) == [0, 1]
    assert support(S(temperature=1, top_k=0, top_p=1, min_p=0.35)) == [0, 1]  # 0.15 < 0.35 * 0.5
    assert support(S(temperature=1, top_k=0, top_p=1, min_p=0.25)) == [0, 1, 2]
    assert len(support(S(temperature=1, top_k=0, top_p=1, min_p=0, typical_p=0.01))) == 1  # min_keep 1
    assert support(S(temperature=1, top_k=3, top_p=1, min_p=0)) == [0, 1, 2]
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # llama_sampler_top_k_impl truncates to exactly k
    tied = support(S(temperature=1, top_k=2, top_p=1, min_p=0), ties)
    assert len(tied) == 2 and set(tied) <= {0, 1, 2}
    # mask first: the argmax among allowed tokens; an all-True row changes nothing
    allow = torch.tensor([[False, True, True, True, True]])
    assert sample_batch(x, [S()], [[]], [None], allow) == [1]
    assert sample_batch(x, [S()], [[]], [None], torch.ones(1, 5, dtype=torch.bool)) == [0]
    with pytest.raises(GenerationError):
        sample_batch(x, [S()], [[]], [None], torch.zeros(1, 5, dtype=torch.bool))  # nothing left
    with pytest.raises(GenerationError):
        sample_batch(x, [S(), S()], [[]], [None])  # one row, two params
    with pytest.raises(GenerationError):
        sample_batch(x, [S(logit_bias={7: 1.0})], [[]], [None])  # outside the vocabulary


def test_two_stage_argmax_and_top_k_match_torch():
    g = torch.Generator().manual_seed(3)
    for n_vocab in (V, 4096, 49152):
        x = torch.randn(5, n_vocab, generator=g)
        x[1, [17, 300, n_vocab - 1]] = 9.0  # ties at the maximum: the first index wins, as argmax
        assert argmax_rows(x).tolist() == x.argmax(-1).tolist()
        for k in (1, 40, 200):
            v, i = topk_rows(x, k)
            ref = torch.topk(x, k, -1).values
            assert torch.equal(v, ref) and torch.equal(x.gather(1, i), v)
            assert all(len(set(r)) == k for r in i.tolist())
