"""Continuous batching: many sequences decoded together, each in its own slot of the KV cache.

Mirrors what llama.cpp's server does in ``server_context::update_slots``: every step runs one
forward over the next token of every decoding sequence; new prompts are prefilled in chunks between
decode steps; a sequence that finishes (or is cancelled) leaves its slot at once without pausing the
others; requests beyond the number of slots wait in a bounded queue. A slot keeps the tokens of its
last sequence, so a new prompt sharing a prefix with them starts from there (the prompt cache).

    engine = BatchEngine(model, n_slots=4)
    engine.start()                                   # a background thread runs the steps
    # or engine.run_forever() on the thread that loaded the model (see run_forever for why)
    req = engine.submit(BatchRequest(ids, params, max_tokens=32, on_event=print))
    req.cancel()                                     # leaves within one decode step

The engine is the only thing that touches the model's forward; callbacks run on its thread.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .constrain import fill_masks
from .errors import GenerationError
from .generate import Result, StopText, Timings, check_fits
from .lora.slots import SlotLoRA
from .sampling import SamplingParams, argmax_rows, make_generator, sample_batch


class QueueFullError(GenerationError):
    """Every slot is busy and the wait queue is full."""


class ContextSizeError(GenerationError):
    """A prompt does not fit in a slot's context."""

    def __init__(self, n_prompt: int, n_ctx: int):
        super().__init__(f"the prompt has {n_prompt} tokens, more than the context of {n_ctx} tokens "
                         f"(per slot) leaves room for")
        self.n_prompt, self.n_ctx = n_prompt, n_ctx


@dataclass
class TokenInfo:
    id: int
    logprob: float | None = None  # log-softmax of the raw logits (before penalties and sampling)
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely alternatives


@dataclass
class Event:
    """What one step produced for one request: new text (possibly empty while a stop string may
    still be forming), the tokens behind it, and on the last event the finish reason and counts."""
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    eog: bool = False  # the last token is the end-of-generation token that stopped it (not text)
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class BatchRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and k alternatives
    on_event: Callable[[Event], None] | None = None
    constraint: "Constraint | None" = None  # structured output (ggtorch.constrain): one per request
    lora: dict[int, float] | None = None  # {adapter id: scale}, others 0; None: the global ones (lora/slots.py)

    def __post_init__(self):
        self._cancel = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Stop this request; the engine drops it before its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


# ---- the model behind the engine ----------------------------------------------------------------
class SlotCaches:
    """One ordinary KV cache per slot and one forward per sequence: the fallback for models
    without a slot pool and ``forward_batch``."""

    batched = False

    def __init__(self, net, n_slots: int, n_ctx: int):
        self.net = net
        self.caches = [net.new_cache(min(n_ctx, 256)) for _ in range(n_slots)]

    def length(self, slot: int) -> int:
        return self.caches[slot].n

    def truncate(self, slot: int, n: int) -> None:
        self.caches[slot].truncate(n)

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        return self.net.forward(ids, self.caches[slot])[-1]

    def decode(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        return torch.cat([self.net.forward([t], self.caches[s]) for t, s in zip(tokens, slots)])


class SlotPool:
    """The model layer's slot pool: prefill a chunk into a slot, decode one token of every slot in
    one ``forward_batch``."""

    batched = True

    def __init__(self, net, n_slots: int, n_ctx: int):
        self.net = net
        self.cache = net.new_pool(n_slots, n_ctx)

    def length(self, slot: int) -> int:
        return int(self.cache.lens[slot])

    def truncate(self, slot: int, n: int) -> None:
        self.cache.truncate(n, slot=slot)

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        return self.net.forward(ids, self.cache, slot=slot)[-1]

    def decode(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        if len(tokens) == 1:  # alone: the single-sequence path, the same numbers as Model.generate
            return self.net.forward(tokens, self.cache, slot=slots[0])
        return self.net.forward_batch(tokens, slots, self.cache)

    def mixed(self, tokens: list[int], slots: list[int], rows: list[int]) -> torch.Tensor:
        """Decode tokens and prompt chunks in one forward; logits for the token indices ``rows``."""
        return self.net.forward_batch(tokens, slots, self.cache, rows=rows)


def make_backend(net, n_slots: int, n_ctx: int):
    if hasattr(net, "forward_batch") and hasattr(net, "new_pool"):
        return SlotPool(net, n_slots, n_ctx)
    return SlotCaches(net, n_slots, n_ctx)


# ---- the scheduler ----------------------------------------------------------------------------
class _Seq:
    """A request in a slot: its prompt still to prefill, its history, its sampler state."""

    def __init__(self, req: BatchRequest, slot: int, cached: int, tok):
        self.req, self.slot, self.cached = req, slot, cached
        self.pending = list(req.prompt_ids[cached:])  # prompt tokens not in the slot's cache yet
        self.history = list(req.prompt_ids)  # for the penalties
        self.gen = make_generator(req.params.seed)
        self.text = StopText(tok, req.stop)
        self.n_out = 0
        p = req.params
        self.constraint = req.constraint
        self.plain_greedy = p.temperature <= 0 and not p.logit_bias and p.repeat_penalty == 1.0 and \
            p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and self.constraint is None
        self.next: int | None = None  # sampled, to be decoded in the next step
        self.t_first: float | None = None


class _Slot:
    def __init__(self):
        self.tokens: list[int] = []  # what its KV cache holds
        self.seq: _Seq | None = None
        self.last_used = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchEngine:
    """``n_slots`` sequences at once, each with ``n_ctx`` tokens of context; up to ``max_queue``
    more wait. ``prefill_chunk`` bounds the prompt tokens evaluated between two decode steps while
    other sequences are decoding (like llama.cpp's n_batch)."""

    def __init__(self, model, n_slots: int = 4, n_ctx: int = 1024, max_queue: int = 64,
                 prefill_chunk: int = 128, mixed_chunk: int = 32):
        if n_slots < 1:
            raise GenerationError(f"the number of slots must be >= 1, got {n_slots}")
        if n_ctx < 2:
            raise GenerationError(f"the context per slot must be >= 2 tokens, got {n_ctx}")
        self.model, self.tok = model, model.tokenizer
        self.n_slots, self.n_ctx, self.max_queue, self.prefill_chunk = n_slots, n_ctx, max_queue, prefill_chunk
        self.mixed_chunk = mixed_chunk  # prompt tokens that may ride along with a decode step
        self.backend = make_backend(model.net, n_slots, n_ctx)
        self.slots = [_Slot() for _ in range(n_slots)]
        self.queue: deque[BatchRequest] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.steps = 0  # decode steps run (each one forward over every decoding sequence)
        self.lora = SlotLoRA.of(model.net, n_slots, self.backend.batched)  # per-request adapters, or None

    # ---- requests ------------------------------------------------------------------------------
    def check(self, req: BatchRequest) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise GenerationError("the prompt is empty (no tokens)")
        if n >= self.n_ctx:
            raise ContextSizeError(n, self.n_ctx)
        bad = [i for i in req.prompt_ids if not 0 <= i < self.model.n_vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.model.n_vocab - 1})")
        if req.max_tokens < 0:
            raise GenerationError("max_tokens must be >= 0")
        if req.lora:
            SlotLoRA.check(self.lora, req.lora)  # an id that names no loaded adapter: one line

    def submit(self, req: BatchRequest) -> BatchRequest:
        self.check(req)
        with self.cond:
            busy = sum(s.seq is not None for s in self.slots)
            if busy + len(self.queue) >= self.n_slots + self.max_queue:
                raise QueueFullError(f"all {self.n_slots} slots are busy and {len(self.queue)} requests wait")
            self.queue.append(req)
            self.cond.notify()
        return req

    def submit_many(self, reqs: list[BatchRequest]) -> None:
        """All or nothing: n choices of one request enter together or not at all."""
        for r in reqs:
            self.check(r)
        with self.cond:
            busy = sum(s.seq is not None for s in self.slots)
            if busy + len(self.queue) + len(reqs) > self.n_slots + self.max_queue:
                raise QueueFullError(f"all {self.n_slots} slots are busy and {len(self.queue)} requests wait")
            self.queue.extend(reqs)
            self.cond.notify()

    def stats(self) -> dict:
        with self.cond:
            busy = sum(s.seq is not None for s in self.slots)
            return {"slots_idle": self.n_slots - busy, "slots_processing": busy, "queued": len(self.queue)}

    # ---- the loop --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.thread is not None:
            return
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="ggtorch-batch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _loop(self, alive: Callable[[], bool] = lambda: True, poll: float | None = None) -> None:
        while True:
            with self.cond:
                while self.running and not self.queue and all(s.seq is None for s in self.slots):
                    if not alive():
                        return
                    self.cond.wait(poll)
                if not self.running or not alive():
                    return
            self.step()

    def run_forever(self, alive: Callable[[], bool] = lambda: True, poll: float = 0.5) -> None:
        """Run the loop on the calling thread until stop() or until alive() turns false.

        Best called on the thread that loaded the model and ran its first forward. PyTorch's CPU
        parallelism is OpenMP, and libgomp keeps one thread team per thread that ever opened a
        parallel region; once the teams hold more threads than there are cores, every team switches to
        sleeping between regions, and each of the ~200 parallel kernels of a decode step then pays a
        futex wake-up. Measured here (2 cores, SmolLM2): a decode loop on a second thread runs 1.7-2x
        slower than the same loop on the thread that loaded the model."""
        self.running = True
        self._loop(alive, poll)

    def run_until_done(self) -> None:
        """Run steps on the calling thread until nothing is queued or active (the Python API)."""
        while self.queue or any(s.seq is not None for s in self.slots):
            self.step()

    def step(self) -> None:
        """One scheduling round: admit waiting requests, drop cancelled ones, prefill prompt chunks,
        then one decode step over every sequence that has a token to decode."""
        try:
            self._admit()
            for s in self.slots:
                if s.seq is not None and s.seq.req.cancelled:
                    self._finish(s.seq, "cancelled")
            if not self._mixed():
                self._prefill()
                self._decode()
        except Exception as e:  # a bug must not kill the loop: fail the sequences involved, keep serving
            for i, s in enumerate(self.slots):
                if s.seq is not None:
                    self._finish(s.seq, "error", error=f"{type(e).__name__}: {e}")
                s.tokens = []
                self.backend.truncate(i, 0)

    def _admit(self) -> None:
        with self.cond:
            while self.queue:
                free = [i for i, s in enumerate(self.slots) if s.seq is None]
                if not free:
                    return
                req = self.queue.popleft()
                if req.cancelled:
                    self._emit(req, Event(finish_reason="cancelled", prompt_tokens=len(req.prompt_ids)))
                    continue
                # the free slot whose cached tokens share the longest prefix (computed under this request's
                # LoRA scales: lora/slots.py); else the least recently used
                lora = self.lora.resolve(req.lora) if self.lora is not None else None
                prefix = {i: common_prefix(self.slots[i].tokens, req.prompt_ids)
                          if lora is None or self.lora.held[i] == lora else 0 for i in free}
                best = max(free, key=lambda i: (prefix[i], -self.slots[i].last_used))
                slot = self.slots[best]
                # keep at least one prompt token to evaluate: its logits start the generation
                keep = min(prefix[best], len(req.prompt_ids) - 1)
                if lora is not None:
                    self.lora.assign(best, lora)
                self.backend.truncate(best, keep)
                slot.tokens = slot.tokens[:keep]
                slot.seq = _Seq(req, best, keep, self.tok)
                slot.last_used = time.perf_counter()

    def _prefill(self) -> None:
        """Prompt chunks, first come first served: at most ``prefill_chunk`` tokens in all while other
        sequences are decoding (they wait for this), every pending prompt when none is."""
        todo = sorted((s.seq for s in self.slots if s.seq is not None and s.seq.pending),
                      key=lambda x: x.req.submitted)
        decoding = any(s.seq is not None and s.seq.next is not None for s in self.slots)
        budget = self.prefill_chunk if decoding else None
        done, rows = [], []
        for q in todo:
            if budget is not None and budget <= 0:
                break
            n = len(q.pending) if budget is None else min(budget, len(q.pending))
            chunk, q.pending = q.pending[:n], q.pending[n:]
            logits = self.backend.prefill(q.slot, chunk)
            self.slots[q.slot].tokens += chunk
            if budget is not None:
                budget -= n
            if not q.pending:
                done.append(q)
                rows.append(logits)
        if done:  # the prompts that finished: their first tokens, sampled together
            self._sampled(done, torch.stack(rows))

    def _mixed(self) -> bool:
        """Short prompts ride along with the decode step: one forward over every decoding sequence's
        next token plus the pending prompts' tokens (llama.cpp's server mixes them in one batch too), so
        a new request costs no extra pass over the weights. Only prompts of at most ``mixed_chunk``
        tokens: a longer one goes through ``_prefill``. False when there is nothing to mix."""
        if not getattr(self.backend, "mixed", None):
            return False
        batch = [s.seq for s in self.slots if s.seq is not None and s.seq.next is not None]
        todo = sorted((s.seq for s in self.slots if s.seq is not None and 0 < len(s.seq.pending) <= self.mixed_chunk),
                      key=lambda x: x.req.submitted)
        if not batch or not todo or any(s.seq is not None and len(s.seq.pending) > self.mixed_chunk
                                        for s in self.slots):
            return False
        tokens, slots = [q.next for q in batch], [q.slot for q in batch]
        rows, budget = list(range(len(batch))), self.mixed_chunk
        for q in todo:
            if len(q.pending) > budget:
                break
            tokens += q.pending
            slots += [q.slot] * len(q.pending)
            rows.append(len(tokens) - 1)
            budget -= len(q.pending)
        prompts = todo[:len(rows) - len(batch)]
        logits = self.backend.mixed(tokens, slots, rows)
        for q in prompts:
            self.slots[q.slot].tokens += q.pending
            q.pending = []
        self._decoded(batch, logits, prompts)  # one sampler call over the decoded rows and the prompts
        return True

    def _decode(self) -> None:
        batch = [s.seq for s in self.slots if s.seq is not None and s.seq.next is not None]
        if not batch:
            return
        tokens = [q.next for q in batch]
        self._decoded(batch, self.backend.decode(tokens, [q.slot for q in batch]))

    def _decoded(self, batch: list[_Seq], logits: torch.Tensor, prompts: list[_Seq] = ()) -> None:
        """After a decode step over ``batch`` (whose logits rows come first, then one row for each of
        ``prompts`` that finished in the same forward): record the decoded tokens, sample every row."""
        self.steps += 1
        if self.lora is not None:
            self.lora.note([q.slot for q in batch] + [q.slot for q in prompts])
        for q in batch:
            self.slots[q.slot].tokens.append(q.next)
            q.next = None
        self._sampled(list(batch) + list(prompts), logits)

    def _sampled(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Choose the next token of every sequence in ``seqs`` from its logits row (logits [len, V])
        with one sampler call for all of them, then emit / finish each in order."""
        want = [i for i, q in enumerate(seqs) if q.n_out < q.req.max_tokens]  # max_tokens = 0: no token
        ids: list[int | None] = [None] * len(seqs)
        if want:
            rows = logits if len(want) == len(seqs) else logits[want]
            sel = [seqs[i] for i in want]
            masks = self._masks(sel)
            if masks is None and all(q.plain_greedy for q in sel):
                chosen = argmax_rows(rows).tolist()  # plain greedy: one argmax over the batch
            else:
                try:
                    chosen = sample_batch(rows, [q.req.params for q in sel], [q.history for q in sel],
                                          [q.gen for q in sel], masks)
                except GenerationError:  # a row left with no token (its mask): fail that row, not all
                    chosen = [self._sample_one(q, rows[k], None if masks is None else masks[k])
                              for k, q in enumerate(sel)]
            for i, t in zip(want, chosen):
                ids[i] = t
        for q, row, tid in zip(seqs, logits, ids):
            if isinstance(tid, GenerationError):
                self._finish(q, "error", error=str(tid))
            else:
                self._next(q, row, tid)

    @staticmethod
    def _sample_one(q: _Seq, row: torch.Tensor, mask: torch.Tensor | None) -> int | GenerationError:
        # sample_batch checks its rows before any draw, so a failed batch consumed no random numbers
        try:
            return sample_batch(row[None], [q.req.params], [q.history], [q.gen],
                                None if mask is None else mask[None])[0]
        except GenerationError as e:
            return e

    def _masks(self, batch: list[_Seq]) -> torch.Tensor | None:
        """The allowed-token masks [len(batch), n_vocab] (bool, True = allowed) of a step's rows, or
        None when no row is constrained: computed for the constrained rows only (ggtorch.constrain)."""
        if all(q.constraint is None for q in batch):
            return None
        return fill_masks([q.constraint for q in batch], len(batch), self.model.n_vocab)

    def _next(self, q: _Seq, logits: torch.Tensor, tid: int | None) -> None:
        """Record q's next token ``tid`` (chosen by ``_sampled`` from the logits row; None when
        max_tokens is 0), emit it; finish or queue it for decoding."""
        r = q.req
        if q.n_out >= r.max_tokens or tid is None:  # max_tokens = 0
            self._finish(q, "length")
            return
        if q.constraint is not None:
            q.constraint.advance(tid)
        q.history.append(tid)
        q.n_out += 1
        info = TokenInfo(tid)
        if r.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            info.logprob = float(lp[tid])
            if r.logprobs > 0:
                v, i = torch.topk(lp, min(r.logprobs, lp.numel()))
                info.top = [(int(a), float(b)) for a, b in zip(i, v)]
        if q.t_first is None:
            q.t_first = time.perf_counter()
        if not r.ignore_eos and tid in self.tok.eog_ids:
            self._finish(q, "stop", Event(q.text.flush(), [info], eog=True))
            return
        text, hit = q.text.feed(tid)
        if hit:
            self._finish(q, "stop", Event(text, [info]))
        elif q.constraint is not None and q.constraint.done:  # the grammar is complete: nothing may follow
            self._finish(q, "stop", Event(text + q.text.flush(), [info]))
        elif q.n_out >= r.max_tokens or len(self.slots[q.slot].tokens) >= self.n_ctx:  # no room for it
            self._finish(q, "length", Event(text + q.text.flush(), [info]))
        else:
            self._emit(r, Event(text, [info]))
            q.next = tid

    def _finish(self, q: _Seq, reason: str, ev: Event | None = None, error: str | None = None) -> None:
        ev = ev or Event()
        ev.finish_reason, ev.error = reason, error
        ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens = len(q.req.prompt_ids), q.cached, q.n_out
        slot = self.slots[q.slot]
        with self.cond:
            slot.seq = None
            slot.last_used = time.perf_counter()
        self._emit(q.req, ev)

    @staticmethod
    def _emit(req: BatchRequest, ev: Event) -> None:
        if req.on_event is not None:
            try:
                req.on_event(ev)
            except Exception:  # a consumer's failure is its own; the engine goes on
                req.cancel()


def generate_batch(model, prompts: list, parallel: int = 4, n_ctx: int | None = None, **kw) -> list[Result]:
    """Generate a continuation for each prompt (text or token ids), ``parallel`` at a time in one
    batch; keywords as :meth:`ggtorch.api.Model.generate`. Returns one Result per prompt, in order."""
    reqs, results, errors = [], [], []
    kw = dict(kw)
    grammar = model._grammar(kw)  # json_schema / grammar: compiled once, one matcher per prompt
    parsed = model._params(kw)
    params, max_tokens, stop, ignore_eos = parsed
    ids_list = [model._prompt_ids(p) for p in prompts]
    n_ctx = n_ctx or model.n_ctx  # per sequence, like Model.generate's context
    for ids in ids_list:
        check_fits(len(ids), max_tokens, n_ctx, False)
    if max_tokens is None:  # until the context is full
        max_tokens = n_ctx
    engine = BatchEngine(model, n_slots=max(1, min(parallel, len(prompts))), n_ctx=n_ctx, max_queue=len(prompts))
    for ids in ids_list:
        res = Result(ids, [], "", "length", Timings(prompt_tokens=len(ids)))
        parts: list[str] = []

        def on_event(ev, res=res, parts=parts):
            parts.append(ev.text)
            res.ids.extend(t.id for t in ev.tokens)
            if ev.finish_reason:
                res.text, res.finish_reason = "".join(parts), ev.finish_reason
                res.timings.gen_tokens = ev.completion_tokens
                res.timings.cached_tokens = ev.cached_tokens
                res.timings.prompt_tokens = ev.prompt_tokens - ev.cached_tokens
                errors.extend([ev.error] if ev.error else [])

        reqs.append(BatchRequest(ids, params, max_tokens, stop, ignore_eos, on_event=on_event,
                                 constraint=grammar.new() if grammar is not None else None))
        results.append(res)
    t0 = time.perf_counter()
    engine.submit_many(reqs)
    engine.run_until_done()
    if errors:
        raise GenerationError(errors[0])
    for r in results:
        r.timings.gen_s = time.perf_counter() - t0
    return results
