"""The same answer under load: on the default kernels (the JIT matrix kernel, ops.cpp's attention and the
one-call step), a token's logits do not depend on what it is computed with. A prompt of 10, 40, 200 or
1,000 tokens gets bit-identical logits, and so the same greedy tokens, alone, in any chunking of its
prompt, after a cached prefix, and served by the batching engine beside other requests (prefilled in
chunks while others decode, riding along with their decode step, or reusing a slot's cached prefix).
Comparisons are torch.equal, never a tolerance."""
import random

import pytest
import torch

import ggtorch
from ggtorch.batch import BatchEngine, BatchRequest
from ggtorch.model import fastpath
from ggtorch.quant import jit
from ggtorch.sampling import SamplingParams

N_GEN = 4  # greedy tokens per request (each compared with its logits)


@pytest.fixture(autouse=True)
def need_jit():
    if not jit.available():  # without a compiler there are no default kernels to hold to this
        pytest.skip(f"JIT library unavailable: {jit.why()}")


def words(n_words: int, seed: int) -> str:
    """Varied English-like text (seeded), so that prompts are realistic and differ from each other."""
    rnd = random.Random(seed)
    vocab = ("the river city market old new stone bridge light morning people walk under over and then "
             "a of to is was were many few quiet loud green seven twelve 1984 road; story, because.").split()
    return " ".join(rnd.choice(vocab) for _ in range(n_words))


def prompt(model, n: int, seed: int) -> list[int]:
    ids = model.tokenize(words(2 * n + 20, seed))
    assert len(ids) >= n
    return ids[:n]


_ALONE: dict = {}


def alone(net, ids: list[int], all_logits: bool = True):
    """The reference: the prompt in one forward on a fresh cache, then greedy decoding one token at a
    time. Returns (logits of every prompt position, or of the last with all_logits=False; [the logits
    each generated token was chosen from]; the generated tokens; the cache). Kept per model and prompt."""
    full = _ALONE.get((id(net), tuple(ids), True))
    if full is not None and not all_logits:
        return (full[0][-1:],) + full[1:]
    key = (id(net), tuple(ids), all_logits)
    if key not in _ALONE:
        c = net.new_cache(len(ids) + N_GEN)
        lg = net.forward(ids, c, all_logits=all_logits)
        rows, toks = [lg[-1:]], []
        for i in range(N_GEN):
            toks.append(int(rows[-1].argmax()))
            if i + 1 < N_GEN:
                rows.append(net.forward([toks[-1]], c))
        _ALONE[key] = lg, rows, toks, c
    return _ALONE[key]


def same_cache(a, b, n: int) -> bool:
    """Slot 0 of two caches holds the same keys and values for positions 0..n-1 in every layer."""
    return all(torch.equal(x[0, :, :n], y[0, :, :n]) for x, y in zip(a.k + a.v, b.k + b.v))


def check_chunking_and_prefix(net, ids: list[int], chunkings, all_logits: bool = True):
    """Alone vs other chunkings vs a cached prefix: the cache at every position and the logits (of every
    position, or of each chunk's last token), bit for bit. (A model's forward already cuts prompts
    longer than its ubatch, 256, into slices.)"""
    want, _, _, cw = alone(net, ids, all_logits)
    n = len(ids)
    for sizes in chunkings:
        c, i, k = net.new_cache(n), 0, 0
        while i < n:
            m = min(sizes[k % len(sizes)], n - i)
            got = net.forward(ids[i:i + m], c, all_logits=all_logits)
            ref = want[i:i + m] if all_logits else want if i + m == n else None
            assert ref is None or torch.equal(got, ref), \
                f"{n} tokens in chunks {sizes}: positions {i}..{i + m - 1} differ by {(got - ref).abs().max()}"
            i, k = i + m, k + 1
        assert same_cache(c, cw, n), f"{n} tokens in chunks {sizes}: the cache differs"
    # a cache that held a longer sequence, cut back to a prefix and continued with this prompt's tail
    c = net.new_cache(n + 8)
    k = max(1, n * 2 // 3)
    net.forward(ids[:k] + [11, 12, 13, 14, 15], c)
    c.truncate(k)
    got = net.forward(ids[k:], c, all_logits=all_logits)
    assert torch.equal(got, want[k:] if all_logits else want), f"{n} tokens after a cached prefix of {k}"
    assert same_cache(c, cw, n)


SHORT = ([1, 2, 31, 33, 7], [5])  # around MAX_TOKENS and odd sizes
LONG = ([97, 300],)  # boundaries other than ubatch's 256 and the engine's 128


def test_long_prompts_take_the_per_token_attention(smollm, monkeypatch):
    """Guard: a 200-token prompt on the default kernels goes through the one-call step (whose attention
    computes each token on its own), not PyTorch's SDPA, whose arithmetic depends on the chunk."""
    net = smollm.net
    calls = []
    real = fastpath.Step.run
    monkeypatch.setattr(fastpath.Step, "run", lambda self, x, *a: calls.append(x.shape[0]) or real(self, x, *a))
    net.forward(prompt(smollm, 200, 0), net.new_cache(200))
    assert calls == [200]


@pytest.mark.parametrize("n", [10, 40, 200, 1000])
def test_smollm_prompt_same_in_any_chunking_and_after_a_cached_prefix(smollm, n):
    check_chunking_and_prefix(smollm.net, prompt(smollm, n, n), SHORT if n <= 200 else LONG)


@pytest.mark.parametrize("n", [10, 40, 200])
def test_gemma3_prompt_same_in_any_chunking_and_after_a_cached_prefix(gemma, n):
    """(Last positions only: Gemma's 262k-token vocabulary makes every position's logits costly.)"""
    check_chunking_and_prefix(gemma.net, prompt(gemma, n, n), SHORT[:1] if n <= 40 else ([33, 64],), False)


def recording(engine):
    """Record, per request, the logits row each of its tokens was chosen from (BatchEngine._next)."""
    rec = {}
    real = engine._next

    def _next(q, logits, tid=None):
        rec.setdefault(id(q.req), []).append(logits.clone())
        return real(q, logits, tid)

    engine._next = _next
    return rec


def serve(engine, waves):
    """Submit waves of prompts, a few engine steps apart (so later prompts are prefilled in chunks while
    earlier ones decode, ride along with their steps, or find a slot's cached prefix), then finish.
    Returns [(prompt, request, tokens, final event)]."""
    done = []
    for ids_list, gap in waves:
        for ids in ids_list:
            toks, last = [], {}

            def on_event(ev, toks=toks, last=last):
                toks.extend(t.id for t in ev.tokens)
                if ev.finish_reason:
                    last["ev"] = ev

            req = engine.submit(BatchRequest(ids, SamplingParams(temperature=0.0), max_tokens=N_GEN,
                                             ignore_eos=True, on_event=on_event))
            done.append((ids, req, toks, last))
        for _ in range(gap):
            engine.step()
    engine.run_until_done()
    return [(ids, req, toks, last["ev"]) for ids, req, toks, last in done]


def engine_vs_alone(model, waves, n_ctx):
    """Every request served by an 8-slot engine (prefill chunks of 128, rides of up to 32 tokens) gets
    the logits rows and greedy tokens it gets alone, bit for bit; returns the engine and the results."""
    engine = BatchEngine(model, n_slots=8, n_ctx=n_ctx)
    rec, mixed, chunks = recording(engine), [], []
    real_mixed, real_prefill = engine.backend.mixed, engine.backend.prefill
    engine.backend.mixed = lambda t, s, r: mixed.append(len(t)) or real_mixed(t, s, r)
    engine.backend.prefill = lambda s, ids: chunks.append(len(ids)) or real_prefill(s, ids)
    results = serve(engine, waves)
    for ids, req, toks, ev in results:
        _, rows, want, _ = alone(model.net, ids, False)
        got = rec[id(req)]
        assert toks == want, f"{len(ids)}-token prompt: {toks} served, {want} alone"
        assert len(got) == len(rows) and all(torch.equal(a, b[0]) for a, b in zip(got, rows)), \
            f"{len(ids)}-token prompt: logits differ from alone"
        assert ev.finish_reason == "length" and ev.completion_tokens == N_GEN
    # the scenario exercised what it is meant to (else this test would prove less than it says)
    assert mixed, "no prompt rode along with a decode step"
    assert any(n == engine.prefill_chunk for n in chunks), "no prompt was prefilled in chunks"
    assert any(ev.cached_tokens > 0 for *_, ev in results), "no prompt reused a cached prefix"
    return results


def test_smollm_served_under_load_equals_alone(smollm):
    """Prompts of 10, 40, 200 and 1,000 tokens among others of other lengths, 8 slots."""
    p = {n: prompt(smollm, n, n) for n in (10, 40, 200, 1000)}
    others = [prompt(smollm, n, 100 + n) for n in (25, 70, 130, 17)]
    again = p[200][:150] + prompt(smollm, 50, 7)  # shares 150 tokens with a finished request's slot
    waves = [([p[40], others[0]], 2),  # decoding from here on
             ([p[1000], p[200], others[1], others[2]], 3),  # chunks of 128 while those decode
             ([p[10], others[3]], 1),  # may ride along with the decode step
             ([p[40], again, p[10]], 0)]  # the same prompts again: cached prefixes
    engine_vs_alone(smollm, waves, n_ctx=1100)


def test_gemma3_served_under_load_equals_alone(gemma):
    p = {n: prompt(gemma, n, n) for n in (10, 40, 200)}
    others = [prompt(gemma, n, 100 + n) for n in (25, 70, 17)]
    waves = [([p[40], others[0]], 2), ([p[200], others[1]], 2), ([p[10], others[2]], 1), ([p[200], p[40]], 0)]
    engine_vs_alone(gemma, waves, n_ctx=300)


def test_generate_batch_equals_generate(smollm):
    """The public API: Model.generate_batch (8 at a time) and Model.generate give the same greedy tokens."""
    prompts = [prompt(smollm, n, 200 + n) for n in (10, 40, 100, 12, 33, 64, 90, 5)]
    batch = smollm.generate_batch(prompts, parallel=8, max_tokens=N_GEN, temperature=0.0, ignore_eos=True)
    for ids, res in zip(prompts, batch):
        assert res.ids == smollm.generate(ids, max_tokens=N_GEN, temperature=0.0, ignore_eos=True).ids


@pytest.mark.parametrize("arch", ["tiny-gpt-oss-F32", "tiny-gemma2-F32", "tiny-mistral3-F32"])
def test_rope_table_rows_equal_positions_computed_alone(arch):
    """rope_tables reads rows of a table made once (model/base.py): each equals its position computed
    alone, for plain, YaRN and local-base RoPE, inside the table, past it and with the table regrown."""
    from conftest import FIXTURES

    net = ggtorch.load(str(FIXTURES / "archs" / f"{arch}.gguf")).net
    bases = {net.cfg.rope_base, net.cfg.rope_base_local or net.cfg.rope_base}
    for base in bases:
        for pos in ([0], [7], [5, 6, 7, 8], [300, 2, 299], [255], [256], [100_000], [40_000, 3]):
            p = torch.tensor(pos)
            got = net.rope_tables(p, base)
            want = net._rope_compute(p, base, True)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (arch, base, pos)
            assert got[0].shape == (len(pos), 1, net.cfg.n_rot // 2)
    assert net._rope_memo and all(t[0].shape[0] == 512 for t in net._rope_memo.values())  # grown to 300
