"""A decode step of fixed shape, replayable as one CUDA graph (no launch overhead, no host sync per layer).

:class:`StaticDecoder` holds B sequences in a KV cache pool allocated once at its full length
(``n_ctx``, F16 as llama.cpp keeps it) and runs one token per sequence through the model's own blocks
with tensors only: the token ids and positions live in device buffers, the keys and values are written
at those positions (an index_put) and every query attends over the whole static cache under a mask
built from the positions, so nothing in the step depends on a host value. On CUDA, :meth:`capture`
records the step once into a ``torch.cuda.CUDAGraph``; each :meth:`step` then copies the new ids and
positions in and replays it. On CPU (tests) the same step runs eagerly and gives the model's logits.

Architectures whose blocks go through ``Transformer.attend`` (llama, qwen2/3, ...) work; prompts are
prefilled through the normal forward (``prefill``).
"""
from __future__ import annotations

import torch

from .layers import attention_mask


class _StaticView:
    """The pool as the step's blocks see it: token b writes slot b at ``pos[b]`` and attends over
    its slot's whole static cache [B, Hkv, n_ctx, D] (the mask hides what lies past pos[b])."""

    def __init__(self, pool, slots: torch.Tensor, pos: torch.Tensor):
        self.pool, self.slots, self.pos = pool, slots, pos

    def update(self, il, start, k, v):
        K, V = self.pool.k[il], self.pool.v[il]
        K[self.slots, :, self.pos] = k.transpose(0, 1).to(K.dtype)
        V[self.slots, :, self.pos] = v.transpose(0, 1).to(V.dtype)
        B = self.slots.shape[0]
        return K[:B].to(k.dtype), V[:B].to(v.dtype)


class StaticDecoder:
    def __init__(self, net, batch: int = 1, n_ctx: int = 1024, dtype=torch.float16):
        self.net, self.B, self.S = net, int(batch), int(n_ctx)
        dev = net.device
        self.pool = net.new_pool(self.B, self.S, dtype=dtype, capacity=self.S)  # never grows: fixed addresses
        self.ids = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.slots = torch.arange(self.B, device=dev)
        self.kpos = torch.arange(self.S, device=dev)
        self.graph = None
        self.out: torch.Tensor | None = None

    def prefill(self, slot: int, ids) -> torch.Tensor:
        """A prompt into ``slot`` through the model's normal forward; its last logits."""
        return self.net.forward(ids, self.pool, slot=slot)

    def _step(self) -> torch.Tensor:
        net = self.net
        ctx = net.prepare(self.pos, self.pos, self.S)
        ctx["mask"] = attention_mask(self.pos, self.kpos)  # [B, S]: each row its own slot's keys
        ctx["rows"] = None
        x = net.embed(self.ids)
        if net.cfg.embed_scale != 1.0:
            x = x * net.cfg.embed_scale
        view = _StaticView(self.pool, self.slots, self.pos)
        for il in range(net.cfg.n_layer):
            x = net.block(il, x, view, self.pos, ctx, None)
        return net._head(x, None)

    def _load(self, tokens) -> None:
        lens = self.pool.lens[:self.B]
        if max(lens) >= self.S:
            from ..errors import ContextError

            raise ContextError(f"static decoder: a sequence reached its n_ctx of {self.S} tokens")
        self.ids.copy_(torch.as_tensor(tokens, dtype=torch.long))
        self.pos.copy_(torch.as_tensor(lens, dtype=torch.long))

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Record the step as a CUDA graph (the kernels are compiled by the warm-up runs, which write
        at the current positions only: the first real step overwrites them)."""
        if self.net.device.type != "cuda":
            return
        self._load([0] * self.B)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    @torch.inference_mode()
    def step(self, tokens) -> torch.Tensor:
        """One token per sequence (``tokens`` [B]) -> logits [B, n_vocab] (a view of the graph's output
        buffer when captured: read it before the next step)."""
        self._load(tokens)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:
            out = self._step()
        for b in range(self.B):
            self.pool.lens[b] += 1
        return out
