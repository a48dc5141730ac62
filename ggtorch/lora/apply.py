"""The low-rank term beside the quantized product: ``y = W x + s * B (A x)`` (build_lora_mm).

The base weight is never touched: each adapted weight gets a :class:`LowRank` as its ``lora``
attribute, which :func:`ggtorch.quant.linear.qmatmul` calls on the kernel's output. Fast mode fuses
Q/K/V and gate/up into one matrix at load (model/repack.py); an adapter on ``attn_q`` is then also
attached to the fused matrix, on the column range that holds Q, so the fused product and the separate
products both carry it. Several adapters add their terms, each with its own scale, in the order
given (llama.cpp loops over the context's adapters the same way).

The one-call decode step (model/fastpath.py + quant/csrc/step.cpp) computes whole layers in C++ and
cannot see these terms: a model with active adapters takes the per-layer path (``fastpath.step_of``
returns None while ``net.loras`` is non-empty).
"""
from __future__ import annotations

import torch

from ..errors import LoRAError
from ..quant import jit
from .adapter import Adapter, check

FUSIONS = (("attn_qkv", ("attn_q", "attn_k", "attn_v")), ("ffn_gate_up", ("ffn_gate", "ffn_up")))


class SlotScales:
    """Per-sequence adapter scales, for one batch that mixes requests with different adapters (the
    server's per-request ``lora`` field, ggtorch.lora.slots): ``table[slot][k]`` is the user scale of
    adapter k for the sequence in that KV slot, and ``slots`` the slot of each row of the current
    forward (set by Transformer._run / run_layers / forward_batch). The base products stay shared; each
    row adds its own adapters' terms. ``table`` None: every row takes the scales the terms were
    attached with (the plain path, one scalar per term).

    A row's effective scale is computed by :meth:`Adapter.scale_for_rank`, the formula behind the
    attached scalar, and rounded to float32 as PyTorch rounds a scalar factor, so a row whose scales
    equal the attached ones gets bit for bit the plain path's numbers. The vectors are built once per
    forward and (adapter, rank, rows) and reused by every layer."""

    def __init__(self, adapters: list | None = None):
        self.adapters = list(adapters or [])  # the Adapter objects of net.loras, in order
        self.table: list[tuple[float, ...]] | None = None
        self.device = torch.device("cpu")
        self._slots: torch.Tensor | None = None
        self._rows: list[int] | None = None
        self._memo: dict = {}

    @property
    def slots(self) -> torch.Tensor | None:
        return self._slots

    @slots.setter
    def slots(self, v: torch.Tensor | None) -> None:
        self._slots, self._rows, self._memo = v, None, {}

    def row_scales(self, k: int, r: int, n: int):
        """The effective scales [n, 1] (float32) of adapter k's rank-r pairs for the n rows of this forward;
        None: no per-row table (use the attached scalar); False: no row uses adapter k (skip the term)."""
        if self.table is None or self._slots is None:
            return None
        key = (k, r, n)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if self._rows is None:
            self._rows = self._slots.tolist()  # once per forward (a host copy of the slot ids)
        rows = self._rows
        if len(rows) != n:  # the last position only (forward's head), or one sequence's run
            if rows and all(s == rows[0] for s in rows):
                rows = rows[:1] * n
            else:
                raise LoRAError(f"per-sequence LoRA scales: {n} rows do not line up with {len(rows)} slots")
        ad = self.adapters[k]
        by_slot = {s: ad.scale_for_rank(r, self.table[s][k]) for s in set(rows)}
        vals = [by_slot[s] for s in rows]
        out = torch.tensor(vals, dtype=torch.float32, device=self.device)[:, None] if any(vals) else False
        self._memo[key] = out
        return out


class LowRank:
    """The terms on one weight: (A [r, in], B [n, r], scale, lo, hi, k, r) adds ``scale * B (A x)`` to
    the output columns lo..hi (the whole output for a plain weight, a part of a fused matrix); k is
    the adapter's index in ``net.loras`` and r its rank here (for per-sequence scales, see
    :class:`SlotScales`)."""

    def __init__(self, rows: SlotScales | None = None):
        self.terms: list[tuple] = []
        self.rows = rows
        self._bt: dict[int, tuple] = {}

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (y.requires_grad or any(t[0].requires_grad for t in self.terms))
        if y.dtype != torch.float32:
            y = y.float()
        n = x.numel() // x.shape[-1]
        flat = None
        for a, b, s, lo, hi, k, r in self.terms:
            per = self.rows.row_scales(k, r, n) if self.rows is not None else None
            if per is False:
                continue  # no row of this batch uses adapter k
            if not grad:  # inference: each row alone (jit.lowrank), so a batch's rows equal the same rows alone
                if flat is None:
                    y = y.contiguous()
                    flat = (x.reshape(n, x.shape[-1]), y.view(n, y.shape[-1]))
                bt = self._bt.get(id(b))
                if bt is None or bt[0] is not b or bt[1] != b._version:  # B transposed (lowrank.cpp's layout),
                    bt = self._bt[id(b)] = (b, b._version, b.T.contiguous())  # again after training updates b
                if jit.lowrank(flat[0], a, bt[2], per, s, flat[1], lo):
                    continue
            d = (x.to(a.dtype) @ a.T) @ b.T  # two thin products: r is small, never B A formed
            if per is not None:  # in place on the 2-D inference product: ~10 us less a term than a new tensor
                d = d.mul_(per) if d.dim() == 2 and not grad else d * per.reshape(*x.shape[:-1], 1)
            elif s != 1.0:
                d = d * s
            if lo == 0 and hi == y.shape[-1]:
                y = y + d if grad else y.add_(d)
            elif grad:
                y = torch.cat((y[..., :lo], y[..., lo:hi] + d, y[..., hi:]), dim=-1)
            else:
                y[..., lo:hi].add_(d)
        return y


def set_slot_scales(net, scales: dict[int, list[float]] | None, n_slots: int | None = None) -> None:
    """Per-sequence adapter scales: ``scales[slot]`` lists a user scale per adapter of ``net.loras`` (in
    that order) for the sequence in KV slot ``slot``; slots not listed take the attached scales. None:
    every sequence takes the attached scales again."""
    rows = getattr(net, "lora_rows", None)
    if rows is None:
        raise LoRAError("per-sequence LoRA scales need adapters loaded on the model")
    if scales is None:
        rows.table = None
        return
    n_ad = len(net.loras)
    size = max([n_slots or 0] + [s + 1 for s in scales])
    table = [tuple(float(u) for _, u in net.loras)] * size
    for s, v in scales.items():
        if len(v) != n_ad:
            raise LoRAError(f"slot {s}: {len(v)} adapter scales for {n_ad} adapters")
        table[s] = tuple(float(u) for u in v)
    rows.table, rows.device = table, net.device


def _clear(net) -> None:
    if hasattr(net, "reset_steps"):  # the one-call step holds the adapters' terms: built again without them
        net.reset_steps()
    for w in net.weights().values():
        w.lora = None
    for L in getattr(net, "layers", []):
        for key, _ in FUSIONS:
            f = L.get(key)
            if f is not None:
                f.lora = None
    net.lora_embd = []
    net.lora_rows = None


def _fused_places(net) -> dict[int, list[tuple[object, int, int]]]:
    """id(part weight) -> [(fused matrix, lo, hi)] for fast mode's fused Q/K/V and gate/up."""
    out: dict[int, list] = {}
    for L in getattr(net, "layers", []):
        for key, names in FUSIONS:
            f = L.get(key)
            parts = getattr(f, "parts", None)
            ws = [L.get(n) for n in names]
            if f is None or parts is None or any(w is None for w in ws) or f in ws:
                continue  # no fusion here, or the file's own attn_qkv (adapters name it directly)
            lo = 0
            for w, n in zip(ws, parts):
                out.setdefault(id(w), []).append((f, lo, lo + n))
                lo += n
    return out


def attach(net, adapters: list[tuple[Adapter, float]]) -> None:
    """Install ``adapters`` [(adapter, user scale), ...] on ``net``, replacing any installed before;
    an empty list leaves the base model. Checks every adapter against the model first."""
    for ad, _ in adapters:
        check(ad, net)
    _clear(net)
    net.loras = [(ad, float(s)) for ad, s in adapters]
    if not net.loras:
        return
    net.lora_rows = rows = SlotScales([ad for ad, _ in net.loras])
    places = _fused_places(net)
    dev = net.device
    for k, (ad, user) in enumerate(net.loras):
        for name, (a, b) in ad.pairs.items():
            s, r = ad.scale(name, user), ad.rank(name)
            a, b = a.to(dev), b.to(dev)
            if name == "token_embd.weight":  # llm_build_inp_embd: rows of the transposed A
                net.lora_embd.append((a, b, s, k, r))
                continue
            w = net.weights().get(name)
            if w is None:
                raise LoRAError(f"{ad.path}: LoRA tensor {name!r} names a base tensor that this model does not use")
            targets = [(w, 0, w.out_features)] + places.get(id(w), [])
            for obj, lo, hi in targets:
                if getattr(obj, "lora", None) is None:
                    obj.lora = LowRank(rows)
                obj.lora.terms.append((a, b, s, lo, hi, k, r))


def embed_delta(net, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x plus the adapters' token-embedding terms (llm_build_inp_embd: scale * B A[ids]), each row with
    its sequence's scale when a per-sequence table is set (see :class:`SlotScales`)."""
    rows = getattr(net, "lora_rows", None)
    for a, b, s, k, r in getattr(net, "lora_embd", ()):
        per = rows.row_scales(k, r, ids.numel()) if rows is not None else None
        if per is False:
            continue
        d = a[ids] @ b.T
        x = x + (d * per if per is not None else d * s)
    return x
