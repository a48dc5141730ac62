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
from dataclasses import dataclass, fields
from datetime import timedelta

import torch

from ..api import Model
from ..errors import ModelError, PipelineError
from ..gguf.reader import GGUFFile
from ..model import ARCHITECTURES
from ..model.config import Config
from ..model.layers import SlotView

OP_STOP, OP_NEW, OP_FORWARD, OP_SHIFT, OP_FREE = range(5)
HEADER = 8  # int64 words per header
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # KV cache types by code
TIMEOUT_S = 60.0  # a stage that does not answer within this ends the run
IDLE = timedelta(days=365)  # waiting for stage 0's next request


def split_layers(n_layer: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, as even as possible (earlier stages take the remainder)."""
    if not 1 <= n_stages <= n_layer:
        raise PipelineError(f"a pipeline of {n_stages} stages needs 1..{n_layer} stages (the model has {n_layer} layers)")
    base, extra = divmod(n_layer, n_stages)
    out, a = [], 0
    for k in range(n_stages):
        b = a + base + (k < extra)
        out.append(range(a, b))
        a = b
    return out


@dataclass(frozen=True)
class StageConfig(Config):
    """A stage's hyper-parameters: n_layer is the stage's count; per-layer rules (is_swa, has_rope) take
    the stage's layer il at the file's number il + layer_offset."""
    layer_offset: int = 0
    n_layer_model: int = 0  # the whole model's layer count

    def is_swa(self, il: int) -> bool:
        return super().is_swa(il + self.layer_offset)

    def has_rope(self, il: int) -> bool:
        return super().has_rope(il + self.layer_offset)


class StageFile:
    """The GGUF file as one stage's model sees it: layers ``layers`` renamed ``blk.0.``.., the other
    layers' tensors absent, everything else (metadata, embeddings, output) as in the file."""

    def __init__(self, f: GGUFFile, layers: range):
        self.file, self.layers = f, layers
        self.path, self.metadata = f.path, f.metadata
        self._orig: dict[str, str] = {}
        for name in f.tensors:
            m = re.match(r"blk\.(\d+)\.(.*)", name)
            if m is None:
                self._orig[name] = name
            elif int(m.group(1)) in layers:
                self._orig[f"blk.{int(m.group(1)) - layers.start}.{m.group(2)}"] = name
        self.tensors = {n: f.tensors[o] for n, o in self._orig.items()}

    @property
    def architecture(self):
        return self.file.architecture

    def get(self, key, default=None):
        return self.file.get(key, default)

    def arch_key(self, suffix, default=None):
        return self.file.arch_key(suffix, default)

    def info(self, name):
        return self.file.info(self._orig.get(name, name))

    def raw(self, name):
        return self.file.raw(self._orig[name])

    def release(self, name, start=0, end=None):
        self.file.release(self._orig[name], start, end)

    def close(self):
        self.file.close()


def load_stage(path: str, stage: int, n_stages: int, device: str = "cpu", fast: bool = True):
    """Stage ``stage``'s model: its layers only, plus the embeddings on stage 0 and output_norm/output
    on the last stage. Returns (the stage's Transformer, the whole model's Config)."""
    f = GGUFFile(path)
    cfg = Config.from_gguf(f)
    if cfg.arch not in ARCHITECTURES:
        raise ModelError(f"{path}: architecture {cfg.arch!r} is not supported")
    layers = split_layers(cfg.n_layer, n_stages)[stage]
    scfg = StageConfig(**{k.name: getattr(cfg, k.name) for k in fields(Config)} | {"n_layer": len(layers)},
                       layer_offset=layers.start, n_layer_model=cfg.n_layer)
    net = ARCHITECTURES[cfg.arch](StageFile(f, layers), scfg, device)
    if cfg.arch == "gemma2":  # llama_model_gemma2's query scale reads the whole model's layer count (27B: 46)
        net.q_scale = (cfg.n_embd // cfg.n_head if cfg.n_layer == 46 else cfg.head_dim) ** -0.5
    last = stage == n_stages - 1
    # The ends of the model: stage 0 embeds (rows read from the file, no repacked form needed), the last
    # stage projects. A matrix this stage never multiplies by is left out of the repack, so its pages of
    # the file are never read.
    if not (last and net.output is net.tok_embd):
        net._weights.pop("token_embd.weight", None)
    if not last:
        net._weights.pop("output.weight", None)
    if fast:
        net.install_fast(cache=False)  # the repack cache is keyed by the whole file, not a stage's part of it
    return net, cfg


class Link:
    """Point-to-point messages between stages; failures become one-line PipelineErrors."""

    def __init__(self, rank: int, world: int, timeout_s: float, device):
        self.rank, self.world, self.timeout_s, self.device = rank, world, timeout_s, device

    def send(self, t: torch.Tensor, dst: int) -> None:
        try:
            torch.distributed.send(t.contiguous(), dst)
        except RuntimeError as e:
            raise self.lost(dst, e) from None

    def recv(self, shape, dtype, src: int, idle: bool = False) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            w = torch.distributed.irecv(t, src)
            w.wait(IDLE) if idle else w.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise self.lost(src, e) from None
        return t

    def header(self, *words: int) -> None:
        h = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        h[:len(words)] = torch.tensor(words, dtype=torch.int64)
        self.send(h, self.rank + 1)

    def lost(self, peer: int, e: Exception) -> PipelineError:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        msg = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(e).__name__)  # gloo's "[file.cc:N] "
        low = msg.lower()
        if "timed out" in low or "timeout" in low:
            why = f"no answer within {self.timeout_s:g} s"
        elif any(w in low for w in ("closed", "reset", "broken pipe", "connection refused")):
            why = "its process ended"
        else:
            why = msg
        return PipelineError(f"pipeline stage {self.rank}: lost contact with stage {peer}: {why} ({msg})")


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

    def forward_batch(self, tokens, slots, cache, rows=None):
        raise PipelineError("a pipeline runs one sequence at a time (batched decode across stages is not built yet)")

    @torch.inference_mode()
    def shift_context(self, cache, n_keep: int, n_discard: int, slot: int = 0) -> None:
        cid = self._id(cache)
        self.stage.shift_context(cache, n_keep, n_discard, slot)  # checks the numbers first
        self.link.header(OP_SHIFT, cid, slot, n_keep, n_discard)

    def close(self) -> None:
        """Tell the other stages to finish (they return from :func:`serve_stage`)."""
        if not self.closed:
            self.closed = True
            self.link.header(OP_STOP)


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
          context_shift: bool = False) -> PipelineModel | None:
    """Load this process's stage. Stage 0 gets the model to generate with (call its ``close()`` at the
    end); a later stage serves stage 0 until then and gets None."""
    from ..packaged import resolve

    if link.world != n_stages:
        raise PipelineError(f"--pipeline {n_stages} but {link.world} processes were started "
                            f"(torchrun --nproc-per-node {n_stages})")
    stage, cfg = load_stage(resolve(path), link.rank, n_stages, str(link.device), fast)
    if link.rank == 0:
        return PipelineModel(path, stage, cfg, link, n_ctx, kv_dtype, context_shift)
    serve_stage(stage, link)
    stage.file.close()
    return None


def cli(a, body) -> int:
    """``ggtorch run --pipeline N`` in each torchrun process: stage 0 runs ``body(model)``; the others
    serve it. The process group is left as it ends."""
    import torch.distributed as dist

    if a.threads:
        torch.set_num_threads(int(a.threads))
    if getattr(a, "ggml_numerics", False):
        raise PipelineError("--ggml-numerics runs in one process (no --pipeline)")
    n = int(a.pipeline)
    if "RANK" not in os.environ:
        raise PipelineError(f"--pipeline {n} runs one process per stage: start it under torchrun --nproc-per-node {n}")
    link = init(device=a.device)
    try:
        m = start(a.model, n, link, fast=a.fast, n_ctx=getattr(a, "ctx", None),
                  kv_dtype=getattr(a, "cache_type", None), context_shift=getattr(a, "context_shift", False))
        if m is None:
            return 0
        try:
            return body(m)
        finally:
            m.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
