"""The decode step on CUDA as one CUDA graph: no launch overhead, no host sync per layer (issue 25).

A decode step (one new token for each of B sequences of a KV pool) is the same work every time but for
a few numbers: the token ids, their positions and their slots. :class:`GraphDecoder` keeps those in
device buffers and runs the model's own blocks with tensors only: each key/value is written at its
position (an index_put), every query attends over its slot's first L cache rows under a mask built
from the positions (L a power of two >= the longest sequence, so a graph serves many steps), and no
step depends on a host value. The first step of a given (B, L) runs twice eagerly (the warm-up that
compiles the Triton kernels; it writes the real keys and values) and is then recorded into a
``torch.cuda.CUDAGraph``; later steps copy the new ids/positions/slots in and replay it.

``Transformer.forward`` (one token) and ``forward_batch`` (one token per distinct slot) route here
when :func:`usable` says so, so ``run``, ``chat``, ``bench`` and ``serve --device cuda`` all decode
through graphs; prompts, chunks and anything else take the normal forward. The graphs belong to the
pool (``pool._graphs``): they hold its tensors' addresses, so a pool that regrows drops them. On CPU
the same step runs eagerly (``GraphDecoder(capture=False)``), which is how the tests check it against
the normal decode on every architecture.

Not used for: the exact ``--ggml-numerics`` path, fault injection, LoRA adapters (per-row scales are
host data), tracing, and MoE layers (the expert routing reads counts on the host).
"""
from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("GGTORCH_CUDA_GRAPH", "1") != "0"
MIN_KV = 256  # the smallest attention span a graph is recorded for
ON_CPU = False  # take the step (eagerly) on CPU too: tests and gpu_check.py's dry run


def usable(net, pool) -> bool:
    """Whether a one-token-per-sequence step of ``net`` over ``pool`` may go through a graph."""
    return (ENABLED and (net.device.type == "cuda" or ON_CPU) and not net.numerics and not net.faults
            and getattr(net, "lora_rows", None) is None and not getattr(net, "lora_embd", None)
            and not getattr(net, "lora_training", False) and not net.cfg.n_expert
            and not getattr(net, "graph_broken", False))


def decode(net, pool, ids: torch.Tensor, slots: list[int], pos: list[int]) -> torch.Tensor:
    """Logits [B, n_vocab] of token ids[b] at position pos[b] of slot slots[b] (slots distinct);
    each slot then holds pos[b] + 1 tokens. The pool's graphs are made on first use."""
    g = pool.__dict__.get("_graphs")
    if g is None:
        g = pool._graphs = GraphDecoder(net, pool)
    return g.step(ids, slots, pos)


class _View:
    """The pool as a graph's blocks see it: token b writes slot slots[b] at pos[b] and attends over
    that slot's first L rows (the mask hides those past pos[b])."""

    def __init__(self, pool, slots: torch.Tensor, pos: torch.Tensor, L: int):
        self.pool, self.slots, self.pos, self.L = pool, slots, pos, L

    def update(self, il, start, k, v):
        K, V = self.pool.k[il], self.pool.v[il]
        K[self.slots, :, self.pos] = k.transpose(0, 1).to(K.dtype)
        V[self.slots, :, self.pos] = v.transpose(0, 1).to(V.dtype)
        kk = K[:, :, :self.L].index_select(0, self.slots)
        vv = V[:, :, :self.L].index_select(0, self.slots)
        return kk.to(k.dtype), vv.to(v.dtype)


class _Entry:
    """One recorded step: its input buffers, its output and its graph (None: run eagerly)."""

    def __init__(self, B: int, L: int, dev):
        self.B, self.L = B, L
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.slots = torch.zeros(B, dtype=torch.long, device=dev)
        self.graph = None
        self.out: torch.Tensor | None = None


class GraphDecoder:
    def __init__(self, net, pool, capture: bool | None = None):
        self.net, self.pool = net, pool
        self.capture = net.device.type == "cuda" if capture is None else capture
        self.entries: dict[tuple, _Entry] = {}
        self.mempool = None
        self.captures = 0  # graphs recorded (for tests and benchmarks)

    def span(self, need: int) -> int:
        """The attention span L for sequences of up to ``need`` tokens: a power of two >= MIN_KV,
        at most the pool's capacity."""
        L = MIN_KV
        while L < need:
            L *= 2
        return min(L, self.pool.capacity)

    def _run(self, e: _Entry) -> torch.Tensor:
        """The step itself: the model's embeddings, blocks and head over the entry's buffers."""
        net = self.net
        net.force_mask = True  # one query that sees the whole cache is masked too: rows past pos are stale
        try:
            ctx = net.prepare(e.pos, e.pos, e.L)
            ctx["rows"] = None
            x = net.inputs(e.ids)
            view = _View(self.pool, e.slots, e.pos, e.L)
            for il in range(net.cfg.n_layer):
                x = net.block(il, x, view, e.pos, ctx, None)
            return net._head(x, None)
        finally:
            net.force_mask = False

    def _record(self, e: _Entry) -> torch.Tensor:
        """Warm up (compiles the kernels, writes this step's keys/values) and record the graph;
        the warm-up's logits are this step's answer."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                out = self._run(e)
        torch.cuda.current_stream().wait_stream(s)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.mempool):
            e.out = self._run(e)
        e.graph = g
        self.captures += 1
        return out

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, slots: list[int], pos: list[int]) -> torch.Tensor:
        pool, B = self.pool, len(slots)
        need = max(pos) + 1
        pool.reserve(pool.n_ctx if pool.n_ctx is not None else need)  # full size at once: fixed addresses
        L = self.span(need)
        ptr = pool.k[0].data_ptr()
        key = (B, L, ptr)
        e = self.entries.get(key)
        fresh = e is None
        if fresh:
            self.entries = {k: v for k, v in self.entries.items() if k[2] == ptr}  # the pool moved: old graphs go
            e = self.entries[key] = _Entry(B, L, self.net.device)
        e.ids.copy_(ids.reshape(-1))
        e.pos.copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        e.slots.copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        if e.graph is not None:
            e.graph.replay()
            out = e.out.clone()  # the next replay overwrites the graph's output
        elif fresh and self.capture:
            try:
                out = self._record(e)
            except Exception:  # an operation that cannot be recorded: this model decodes without graphs
                self.net.graph_broken = True
                del self.entries[key]
                raise Fallback() from None
        else:
            out = self._run(e)
        for s, p in zip(slots, pos):
            pool.lens[s] = p + 1
        return out


class Fallback(Exception):
    """Raised by :meth:`GraphDecoder.step` when recording failed: the caller runs its normal path."""
