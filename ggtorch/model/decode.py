"""One token of one sequence, from its id to its logits, in one foreign call (csrc/step.cpp's qdot_decode).

A decode step of a small model spends most of its time in Python, not in arithmetic: on the 2-layer
fixtures the C step (fastpath.Step) takes about 38 us and the rest of ``Transformer.forward`` about
115 us (the embedding row through dequant.py, the RoPE rows, the slot/position tensors, the output
norm and head, the dispatch between them), where llama.cpp's whole step takes about 100 us. Here the
embedding row is read with pread and dequantized in C (csrc/rows.cpp), the RoPE rows are pointers into
the model's position tables (Transformer.rope_tables), and the output norm and head run in the same
call, so a step costs one ctypes call and a few attribute reads.

The arithmetic is that of the per-operation path, function for function, so the logits are equal to
the bit to ``forward`` with this path off (tests/test_decode_one.py). It is taken exactly where
fastpath.Step is taken for a one-token forward (same conditions: CPU, JIT library, no tracer, no
ggml-numerics mode, no faults, no LoRA training or per-request adapter scales), and also needs the
RoPE position inside the tables' reach (ROPE_TABLE_MAX). Heads with final scalings (granite's
logit_scale, gemma2's soft cap), an adapter or no JIT kernel are multiplied in Python after the call;
embedding types rows.cpp does not decode, or an adapter on token_embd, are looked up in Python before it.
"""
from __future__ import annotations

import ctypes

import torch

from ..quant import jit
from . import fastpath
from .fastpath import KV_TYPES


class _Decode(ctypes.Structure):
    """csrc/step.cpp's struct Decode, field by field."""
    _fields_ = [("m", ctypes.c_void_p), ("embd_type", ctypes.c_int32), ("fd", ctypes.c_int32),
                ("embd", ctypes.c_void_p), ("embd_off", ctypes.c_int64), ("row_bytes", ctypes.c_int64),
                ("n_vocab", ctypes.c_int64), ("embd_scale", ctypes.c_float), ("out_norm", ctypes.c_void_p),
                ("out", ctypes.c_void_p)]


ENABLED = True  # tests compare with the general path by turning this off

ROW_TYPES = jit.ROW_TYPES  # the token_embd types whose rows the call reads itself (csrc/rows.cpp)


class OneToken:
    """A model's one-token step, built once per fastpath.Step (a new one when the kernels change)."""

    def __init__(self, model, step: fastpath.Step):
        from ..quant.qdot import qdot_kernel, qdot_linear

        c = model.cfg
        self.step, self.keep = step, []
        self.E, self.V = c.n_embd, c.n_vocab
        w = model.tok_embd
        d = _Decode()
        d.m, d.n_vocab, d.embd_scale = ctypes.addressof(step.model), c.n_vocab, float(c.embed_scale)
        d.fd, d.embd_type, self.row_bytes = -1, -1, 0
        src = model.file.row_source("token_embd.weight") if hasattr(model.file, "row_source") else None
        T = _base()
        if getattr(model, "lora_embd", None) or type(model).embed is not T.embed or type(model).inputs is not T.inputs:
            pass  # an adapter on token_embd: the Python lookup (ggtorch.lora.apply.embed_delta)
        elif model._embd_file_ptr is not None and w.dense is None and w.raw.data_ptr() == model._embd_file_ptr:
            if w.type.id in ROW_TYPES and src is not None:  # rows read from the file (Transformer.embed)
                d.fd, d.embd_off = src
                d.embd_type, d.row_bytes = w.type.id, w.row_bytes
                self.row_bytes = w.row_bytes
        elif w.dense is not None and w.dense.dtype == torch.float32 and w.dense.is_contiguous():
            self.keep.append(w.dense)
            d.embd_type, d.embd, d.row_bytes = 0, w.dense.data_ptr(), 4 * self.E
        self.python_embed = d.embd_type < 0
        self.out_norm = model.output_norm.float().contiguous()
        d.out_norm = self.out_norm.data_ptr()
        o = model.output
        plain_head = type(model).head is T.head and not c.logit_scale and not c.final_softcap
        if plain_head and getattr(o, "kernel", None) is qdot_kernel and getattr(o, "lora", None) is None:
            lin = qdot_linear(o)
            self.keep.append(lin)
            d.out, self.N = lin.ref, lin.N
        else:
            d.out, self.N = None, 0
        self.d = d
        self.ref = ctypes.addressof(d)
        self.keys = model.step_rope()
        self.half = c.n_rot // 2 * 4  # bytes of one RoPE table row (cos or sin)

    def tables(self, model, pos: int) -> list[int | None] | None:
        """Pointers to row ``pos`` of the step's (cos, sin, local cos, local sin) tables, or None where
        the position is beyond ROPE_TABLE_MAX (the caller takes the general path)."""
        out = []
        for key in self.keys:
            if key is None:
                out += [None, None]
                continue
            tab = model._rope_memo.get(key)
            if tab is None or tab[0].shape[0] <= pos:
                model.rope_tables(torch.tensor([pos]), *key)  # grows the table (or computes directly past the cap)
                tab = model._rope_memo.get(key)
                if tab is None or tab[0].shape[0] <= pos:
                    return None
            cs, sn = tab
            assert cs.dtype == torch.float32 and cs.is_contiguous() and sn.is_contiguous()
            out += [cs.data_ptr() + pos * self.half, sn.data_ptr() + pos * self.half]
        return out

    def __call__(self, model, tok: int, cache, slot: int, pos: int) -> torch.Tensor | None:
        """Logits [1, n_vocab] of token ``tok`` at position ``pos`` of ``slot`` (its K/V stored), or None
        where this path does not apply (nothing was done)."""
        tabs = self.tables(model, pos)
        if tabs is None:
            return None
        # the hidden state and the pread buffer are this call's own: two threads may decode with one model
        x = model.inputs(torch.tensor([tok])).float().clone() if self.python_embed else torch.empty(1, self.E)
        row = torch.empty(self.row_bytes, dtype=torch.uint8) if self.row_bytes else None
        self.step.scales(None, 1)  # the terms' attached scalars (a batch before may have set per-row ones)
        kp, vp = self.step._pointers(cache)
        self.step.model.kv_type = KV_TYPES[cache.dtype]
        logits = torch.empty(1, self.N) if self.N else None
        lib = jit.library()
        if lib.qdot_decode(self.ref, tok, x.data_ptr(), None if row is None else row.data_ptr(), kp, vp,
                           cache.k[0].shape[2], slot, pos, *tabs, None if logits is None else logits.data_ptr()):
            return None
        if logits is None:
            return model.head(x)
        return logits if self.N == self.V else logits[:, :self.V]


def _base():
    from .base import Transformer

    return Transformer


def one_token(model, cache) -> OneToken | None:
    """The model's OneToken where a one-token forward would take fastpath.Step, else None."""
    if not (ENABLED and fastpath.ENABLED and not model.numerics and not model.faults and model.device.type == "cpu"
            and cache.dtype in KV_TYPES and not getattr(model, "lora_training", False) and jit.available()):
        return None
    T = _base()
    if type(model)._head is not T._head:  # an architecture's own output stage
        return None
    rows = getattr(model, "lora_rows", None)
    if rows is not None and rows.table is not None:
        return None  # per-sequence adapter scales: the slot's row scales are set by Transformer._run's path
    step = fastpath.step_of(model)
    if step is None:
        return None
    one = getattr(step, "one", None)
    if one is None:
        one = step.one = OneToken(model, step)
    return one
