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
