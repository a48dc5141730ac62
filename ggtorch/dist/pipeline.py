"""A model split by layers across processes (pipeline stages) with torch.distributed.

    torchrun --nproc-per-node 2 -m ggtorch run MODEL --pipeline 2 -p "Hello"

Stage k of N is process rank k and holds a contiguous range of the file's layers (:func:`split_layers`).
It builds a model of its own layers only: :class:`StageFile` shows the architecture's loader the range's
tensors renamed ``blk.0..``, so each architecture's code, its KV cache and the one-call decode step
(model/fastpath.py) run unchanged on the range, and only those layers' tensors of the memory-mapped GGUF
are ever read or repacked. :class:`StageConfig` keeps the per-layer rules (sliding window, layers without
RoPE) at the file's layer numbers. Stage 0 also tokenizes, embeds and samples; the last stage applies
output_norm and the output matrix and sends the logits back to stage 0. Between stages travel the hidden
states [T, n_embd] (float32) by point-to-point send/recv: gloo on CPU, NCCL on GPUs. This is what
llama.cpp's RPC backend does for a GGUF across hosts (ggml-rpc: the graph split by layers between
backends, activations shipped between them), here on PyTorch's own runtime.

Every stage runs its layers through Transformer.run_layers, the same per-layer arithmetic as the single
process (the one-call step over the stage's layers where the architecture has it, the per-layer path
otherwise, chosen by the same rule), so the logits equal the single process's bit for bit.

Protocol: stage 0 sends a fixed-size int64 header (an operation and its numbers) down the chain; each stage
passes it on, then the hidden states follow. Waiting for the next header has no time limit (a user may
pause); every other receive fails after the group's timeout, and a peer whose process ended fails at
once: both become one-line :class:`PipelineError`s.
"""
from __future__ import annotations

import itertools
import os
import re
import weakref
from datetime import timedelta

import torch

from ..api import Model
from ..errors import ModelError, PipelineError
from ..model.config import Config
from ..model.layers import BatchView, SlotView
from .stage import StageConfig, StageFile, load_stage, split_layers  # noqa: F401 (the package's API)

OP_STOP, OP_NEW, OP_FORWARD, OP_SHIFT, OP_FREE, OP_BATCH = range(6)
HEADER = 8  # int64 words per header
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # KV cache types by code
TIMEOUT_S = 60.0  # a stage that does not answer within this ends the run
IDLE = timedelta(days=365)  # waiting for stage 0's next request


class Link:
    """Point-to-point messages between stages; failures become one-line PipelineErrors."""

    def __init__(self, rank: int, world: int, timeout_s: float, device):
        self.rank, self.world, self.timeout_s, self.device = rank, world, timeout_s, device
        self.failed: str | None = None  # the first lost contact: the process group is unusable after it

    def check(self) -> None:
        """Refuse at once once a peer was lost (another send would wait for the timeout or fail anyway)."""
        if self.failed is not None:
            raise PipelineError(f"the pipeline is down: {self.failed}")

    def send(self, t: torch.Tensor, dst: int) -> None:
        try:
            torch.distributed.send(t.contiguous(), dst)
        except RuntimeError as e:
            raise self.lost(dst, e) from None

    def isend(self, t: torch.Tensor, dst: int):
        """Start sending t; returns what :meth:`wait` takes (t stays referenced until then)."""
        t = t.contiguous()
        try:
            return torch.distributed.isend(t, dst), t, dst
        except RuntimeError as e:
            raise self.lost(dst, e) from None

    def irecv(self, shape, dtype, src: int):
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            return torch.distributed.irecv(t, src), t, src
        except RuntimeError as e:
            raise self.lost(src, e) from None

    def wait(self, op) -> torch.Tensor:
        """Finish an :meth:`isend` / :meth:`irecv` within the timeout; the tensor."""
        w, t, peer = op
        try:
            w.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise self.lost(peer, e) from None
        return t

    def recv(self, shape, dtype, src: int, idle: bool = False) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            w = torch.distributed.irecv(t, src)
            w.wait(IDLE) if idle else w.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise self.lost(src, e) from None
        return t

    def header(self, *words: int) -> None:
        self.check()
        h = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        h[:len(words)] = torch.tensor(words, dtype=torch.int64)
        self.send(h, self.rank + 1)

    def lost(self, peer: int, e: Exception) -> PipelineError:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        msg = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(e).__name__)  # gloo's "[file.cc:N] "
        msg = msg.split(". This is typically")[0]  # gloo's advice to the reader after the cause
        low = msg.lower()
        if "timed out" in low or "timeout" in low:
            why = f"no answer within {self.timeout_s:g} s"
        elif any(w in low for w in ("closed", "reset", "broken pipe", "connection refused")):
            why = "its process ended"
        else:
            why = msg
        err = f"pipeline stage {self.rank}: lost contact with stage {peer}: {why} ({msg})"
        if self.failed is None:
            self.failed = err
        return PipelineError(err)


class PipelineNet:
    """Stage 0's stand-in for the Transformer that generation, chat and scoring call: ``forward`` runs the
    tokens through stage 0's layers here and every later stage's there, and returns the last stage's
    logits. Caches are made here (stage 0's layers) and mirrored on every stage under one id."""

    def __init__(self, stage, cfg: Config, link: Link):
        self.stage, self.cfg, self.link = stage, cfg, link
        self.device = stage.device
        self.kv_dtype = torch.float32
        self.numerics = False
        self._ids = itertools.count(1)
        self._freed: list[int] = []
        self.closed = False
        self.micro_batches = 1  # parts a batched step is split into (forward_batch)

    @property
    def ubatch(self) -> int:
        return self.stage.ubatch

    def new_cache(self, capacity: int = 256, dtype=None):
        return self.new_pool(1, None, dtype, capacity)

    def new_pool(self, n_slots: int, n_ctx: int | None, dtype=None, capacity: int = 256):
        dtype = dtype or self.kv_dtype
        self._flush()
        cache = self.stage.new_pool(n_slots, n_ctx, dtype, capacity)
        cache.pipe_id = next(self._ids)
        self.link.header(OP_NEW, cache.pipe_id, n_slots, -1 if n_ctx is None else n_ctx, capacity,
                         DTYPES.index(cache.dtype))
        weakref.finalize(cache, self._freed.append, cache.pipe_id)  # told to the stages with the next request
        return cache

    def _flush(self) -> None:
        while self._freed:
            self.link.header(OP_FREE, self._freed.pop())

    def _id(self, cache) -> int:
        cid = getattr(cache, "pipe_id", None)
        if cid is None:
            raise PipelineError("this KV cache was not made by the pipeline (use the model's new_cache/new_pool)")
        return cid

    @torch.inference_mode()
    def forward(self, ids, cache, start: int | None = None, all_logits: bool = False, trace=None,
                slot: int = 0) -> torch.Tensor:
        """Transformer.forward across the stages: the same checks, ubatch slices and cache bookkeeping."""
        if trace is not None:
            raise PipelineError("a pipeline does not trace (run the model in one process for `ggtorch debug`)")
        net = self.stage
        ids = net._check_ids(ids)
        start = cache.lens[slot] if start is None else start
        T = ids.numel()
        net._check_room(cache, slot, start + T)
        ub = net.ubatch
        if T > ub:  # Transformer.forward's slices
            outs = [self.forward(ids[i:i + ub], cache, start + i, all_logits, slot=slot) for i in range(0, T, ub)]
            return torch.cat(outs) if all_logits else outs[-1]
        cid = self._id(cache)
        self._flush()
        cache.reserve(start + T)
        pos = torch.arange(start, start + T, device=self.device)
        self.link.header(OP_FORWARD, cid, slot, start, T, int(all_logits))
        x = net.run_layers(net.inputs(ids), pos, start + T, SlotView(cache, slot), start)
        cache.lens[slot] = start + T
        self.link.send(x, 1)
        return self.link.recv((T if all_logits else 1, self.cfg.n_vocab), torch.float32, self.link.world - 1)

    @torch.inference_mode()
    def forward_batch(self, tokens, slots, cache, rows: list[int] | None = None) -> torch.Tensor:
        """Transformer.forward_batch across the stages (the continuous-batching engine's step): the same
        checks, the same single-sequence shortcut, the same logits. With ``micro_batches`` M > 1 the tokens
        go down the chain in M consecutive parts: stage k works on part m while stage k+1 works on part
        m-1, so with S stages one step takes about (M + S - 1) / (M * S) of the unsplit step's time when
        the stages have cores of their own (GPipe's schedule, here within one decode step)."""
        net = self.stage
        ids = net._check_ids(tokens)
        slots = [int(s) for s in slots]
        T = ids.numel()
        if len(slots) != T:
            raise ModelError(f"forward_batch got {T} tokens for {len(slots)} slots")
        if any(not 0 <= s < cache.n_slots for s in slots):
            raise ModelError(f"forward_batch: slots must lie in 0..{cache.n_slots - 1}, got {slots}")
        want = list(range(T)) if rows is None else [int(r) for r in rows]
        if any(not 0 <= r < T for r in want):
            raise ModelError(f"forward_batch: rows must lie in 0..{T - 1}, got {rows}")
        seen: dict[int, int] = {}
        pos = []
        for s in slots:
            pos.append(cache.lens[s] + seen.get(s, 0))
            seen[s] = seen.get(s, 0) + 1
        for s, k in seen.items():
            net._check_room(cache, s, cache.lens[s] + k)
        if len(seen) == 1:  # one sequence: Transformer.forward_batch's shortcut, through forward()
            got, i = {}, 0
            while i < T:
                j = i
                while j < T and slots[j] == slots[i]:
                    j += 1
                need = [r for r in want if i <= r < j]
                every = need != [j - 1] and bool(need)
                lg = self.forward(ids[i:j], cache, slot=slots[i], all_logits=every)
                for r in need:
                    got[r] = lg[r - i:r - i + 1] if every else lg
                i = j
            return torch.cat([got[r] for r in want]) if want else torch.empty(0, self.cfg.n_vocab)
        cid = self._id(cache)
        self._flush()
        M = max(1, min(self.micro_batches, T))
        need = torch.zeros(T, dtype=torch.int64)
        need[want] = 1
        meta = torch.stack([torch.tensor(slots), torch.tensor(pos), need]).to(self.device)
        self.link.header(OP_BATCH, cid, T, M)
        self.link.send(meta, 1)
        cache.reserve(max(pos) + 1)
        parts = micro_batches(T, M)
        # the logits of each part come back from the last stage: posted now, filled while we compute
        back = [self.link.irecv((int(need[p].sum()), self.cfg.n_vocab), torch.float32, self.link.world - 1)
                if int(need[p].sum()) else None for p in parts]
        sends = []
        for p in parts:
            x = net.run_layers(net.inputs(ids[p]), meta[1, p], int(meta[1, p].max()) + 1,
                               BatchView(cache, slots[p], meta[1, p]), meta[1, p])
            sends.append(self.link.isend(x, 1))
        for op in sends:
            self.link.wait(op)
        for s, k in seen.items():
            cache.lens[s] += k
        got, order = {}, [i for p in parts for i in range(p.start, p.stop) if need[i]]
        lg = torch.cat([self.link.wait(b) for b in back if b is not None])
        for i, r in enumerate(order):
            got[r] = lg[i:i + 1]
        return torch.cat([got[r] for r in want])

    @torch.inference_mode()
    def shift_context(self, cache, n_keep: int, n_discard: int, slot: int = 0) -> None:
        cid = self._id(cache)
        self.stage.shift_context(cache, n_keep, n_discard, slot)  # checks the numbers first
        self.link.header(OP_SHIFT, cid, slot, n_keep, n_discard)

    def close(self) -> None:
        """Tell the other stages to finish (they return from :func:`serve_stage`); nothing to tell when
        the pipeline is already down."""
        if not self.closed:
            self.closed = True
            if self.link.failed is None:
                try:
                    self.link.header(OP_STOP)
                except PipelineError:
                    pass


def micro_batches(T: int, M: int) -> list[slice]:
    """T tokens in M consecutive parts as even as possible (the first parts take the remainder); stage 0
    and every later stage cut a batched step the same way."""
    base, extra = divmod(T, M)
    out, a = [], 0
    for m in range(M):
        b = a + base + (m < extra)
        out.append(slice(a, b))
        a = b
    return out


def _stage_batch(net, link: Link, cache, T: int, M: int) -> None:
    """A later stage's part of PipelineNet.forward_batch: each part from the previous stage, through this
    stage's layers, on to the next (or, on the last stage, its logits rows back to stage 0). Receives are
    posted up front and sends run while the next part computes, so parts overlap across stages."""
    r, last = link.rank, link.rank == link.world - 1
    meta = link.wait(link.irecv((3, T), torch.int64, r - 1))
    if not last:
        link.send(meta, r + 1)
    slots, pos, need = meta[0].tolist(), meta[1], meta[2].bool()
    cache.reserve(int(pos.max()) + 1)
    parts = micro_batches(T, M)
    ins = [link.irecv((p.stop - p.start, net.cfg.n_embd), torch.float32, r - 1) for p in parts]
    sends = []
    for p, op in zip(parts, ins):
        x = link.wait(op)
        x = net.run_layers(x, pos[p], int(pos[p].max()) + 1, BatchView(cache, slots[p], pos[p]), pos[p])
        if not last:
            sends.append(link.isend(x, r + 1))
        elif bool(need[p].any()):
            sends.append(link.isend(net._head(x[need[p]], None).float(), 0))
    for s in set(slots):  # stage 0's lengths: each slot ends after its last token here
        cache.lens[s] = int(pos[meta[0] == s].max()) + 1
    for op in sends:
        link.wait(op)


@torch.inference_mode()
def serve_stage(net, link: Link) -> None:
    """A later stage's loop: take stage 0's requests until it stops (or is lost: PipelineError)."""
    r, last = link.rank, link.rank == link.world - 1
    caches = {}
    E = net.cfg.n_embd
    while True:
        h = link.recv((HEADER,), torch.int64, r - 1, idle=True)
        if not last:
            link.send(h, r + 1)
        op, a, b, c, d, e, *_ = h.tolist()
        if op == OP_STOP:
            return
        if op == OP_NEW:
            caches[a] = net.new_pool(b, None if c < 0 else c, DTYPES[e], d)
        elif op == OP_FREE:
            caches.pop(a, None)
        elif op == OP_SHIFT:
            net.shift_context(caches[a], c, d, b)
        elif op == OP_BATCH:
            _stage_batch(net, link, caches[a], b, c)
        elif op == OP_FORWARD:
            cache, slot, start, T = caches[a], b, c, d
            x = link.recv((T, E), torch.float32, r - 1)
            cache.reserve(start + T)
            pos = torch.arange(start, start + T, device=net.device)
            x = net.run_layers(x, pos, start + T, SlotView(cache, slot), start)
            cache.lens[slot] = start + T
            if last:
                link.send(net._head(x if e else x[-1:], None).float(), 0)
            else:
                link.send(x, r + 1)
        else:
            raise PipelineError(f"pipeline stage {r}: unknown request {op} from stage {r - 1}")


class PipelineModel(Model):
    """Stage 0's :class:`ggtorch.api.Model`: tokenizer, sampling, generation and chat as usual, with
    ``net`` the pipeline (:class:`PipelineNet`)."""

    def __init__(self, path: str, stage, cfg: Config, link: Link, n_ctx=None, kv_dtype=None,
                 context_shift: bool = False):
        import time

        t0 = time.perf_counter()
        from ..packaged import resolve

        self.path = resolve(path)
        self.file = stage.file.file  # the whole file's metadata: tokenizer, chat template
        self.net = PipelineNet(stage, cfg, link)
        self.cfg = cfg
        self.fast = True
        self.repack_cache = "off"
        self.device = str(stage.device)
        self._set_context(n_ctx, kv_dtype, context_shift)
        self.load_s = time.perf_counter() - t0

    @property
    def failure(self) -> str | None:
        """Why the pipeline is down (a stage was lost), or None: the server answers 503 with it."""
        return self.net.link.failed

    def close(self) -> None:
        self.net.close()
        super().close()


def init(rank: int | None = None, world: int | None = None, init_method: str | None = None,
         device: str = "cpu", timeout_s: float = TIMEOUT_S) -> Link:
    """Join the process group: from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) unless
    ``init_method`` (e.g. tcp://127.0.0.1:PORT) with rank and world are given. gloo on CPU, NCCL on GPUs."""
    import torch.distributed as dist

    if init_method is None and "RANK" not in os.environ:
        raise PipelineError("a pipeline runs one process per stage: start it under torchrun --nproc-per-node N")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if not dist.is_initialized():
        try:
            if init_method is None:
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            else:
                dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                        timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise PipelineError(f"cannot join the pipeline's process group: {str(e).strip().splitlines()[0]}") from None
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return Link(rank, world, timeout_s, dev)


def start(path: str, n_stages: int, link: Link, fast: bool = True, n_ctx=None, kv_dtype=None,
          context_shift: bool = False, micro_batches: int = 1) -> PipelineModel | None:
    """Load this process's stage. Stage 0 gets the model to generate with (call its ``close()`` at the
    end); a later stage serves stage 0 until then and gets None. ``micro_batches``: the parts a batched
    step (forward_batch) is cut into on its way down the stages."""
    from ..packaged import resolve

    if link.world != n_stages:
        raise PipelineError(f"--pipeline {n_stages} but {link.world} processes were started "
                            f"(torchrun --nproc-per-node {n_stages})")
    stage, cfg = load_stage(resolve(path), link.rank, n_stages, str(link.device), fast)
    if link.rank == 0:
        m = PipelineModel(path, stage, cfg, link, n_ctx, kv_dtype, context_shift)
        m.net.micro_batches = max(1, int(micro_batches))
        return m
    serve_stage(stage, link)
    stage.file.close()
    return None


def cli(a, body) -> int:
    """``ggtorch run/serve --pipeline N`` in each torchrun process: stage 0 runs ``body(model)``; the
    others serve it. The process group is left as it ends."""
    import torch.distributed as dist

    if a.threads:
        torch.set_num_threads(int(a.threads))
    if getattr(a, "ggml_numerics", False):
        raise PipelineError("--ggml-numerics runs in one process (no --pipeline)")
    if getattr(a, "lora", None) or getattr(a, "lora_scaled", None):
        raise PipelineError("LoRA adapters (--lora, --lora-scaled) run in one process (no --pipeline)")
    n = int(a.pipeline)
    if "RANK" not in os.environ:
        raise PipelineError(f"--pipeline {n} runs one process per stage: start it under torchrun --nproc-per-node {n}")
    timeout = getattr(a, "pipeline_timeout", None)
    timeout = TIMEOUT_S if timeout is None else timeout
    if not timeout > 0:
        raise PipelineError(f"--pipeline-timeout must be > 0 seconds, got {timeout}")
    link = init(device=a.device, timeout_s=timeout)
    try:
        m = start(a.model, n, link, fast=a.fast, n_ctx=getattr(a, "ctx", None),
                  kv_dtype=getattr(a, "cache_type", None), context_shift=getattr(a, "context_shift", False),
                  micro_batches=getattr(a, "micro_batches", 1) or 1)
        if m is None:
            return 0
        try:
            return body(m)
        finally:
            m.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
