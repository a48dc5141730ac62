"""Decode steps and prompts through the JIT library (quant/csrc/ops.cpp and step.cpp).

Decoding one token costs each layer about twenty small PyTorch operations around its matrix products:
splitting the fused Q/K/V product, per-head norms, RoPE, writing K and V into the float16 cache and
reading the cache back as float32, attention, reshapes. Each is cheap, but their dispatch cost was
half of SmolLM2's decode step (4.9 of 9.3 ms, measured). ``attend`` does the same arithmetic in one
foreign call, and ``Step`` runs every layer of the step in one. They are taken for a batched step
(a :class:`BatchView`) and for one sequence's tokens (a :class:`SlotView`: up to MAX_TOKENS on the
per-layer path, any number where ``Step`` applies), with no tracer (a trace reports the intermediate
tensors under llama.cpp's names), no ggml-numerics mode, no fault injection, on CPU with the library
built.

What is guaranteed (batch invariance). On the default kernels (a model loaded with fast mode, its
weights on the JIT matrix kernel) of an architecture with a ``step_spec`` (llama with or without
Mixtral-style experts, qwen3, qwen3moe, smollm3, gemma3 files without biases, shared experts or
attention temperature), every forward takes ``Step``, whose matrix products compute each row on its
own, whose attention (ops.cpp's qdot_attend) gives each (token, head) one fixed arithmetic, and whose
routed experts (moe.cpp) route each token on its own and group rows by expert without changing any. A token's logits and its keys and values in the cache are then a
function of the token and its history only, to the bit: the same whether the prompt is evaluated alone
or beside other sequences in a batched step, in one forward or in any chunking (the server's
prefill_chunk, a ride along a decode step, the ubatch), and after a cached prefix. A greedy request
gets the same tokens at any load. Not covered: the exact path (``fast=False``/``--exact``: PyTorch's
matrix products and SDPA for prompts over MAX_TOKENS tokens), architectures without a ``step_spec``
(the per-layer path, SDPA over MAX_TOKENS tokens), the ggml-numerics mode, a context shift (re-rotated
keys differ from freshly computed ones), other devices, and other machines or builds (the arithmetic
is fixed per build of the library). llama.cpp's server does not have this property: its answers change
with --parallel and the batch's composition.
"""
from __future__ import annotations

import ctypes

import torch

from ..quant import jit
from ..quant.linear import qmatmul
from .layers import BatchView, SlotView

ENABLED = True  # tests compare with the PyTorch path by turning this off
KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ops.cpp's load_kv/store_kv


# A single sequence's forward of up to this many tokens takes the per-token attention even where the
# one-call step does not apply (the per-layer path: biases, the exact weights): the server's prompts of
# up to batch.BatchEngine.mixed_chunk (32) tokens ride along with other sequences' decode step through
# it, so a short prompt gets the same arithmetic served alone or in a batch. Where the one-call step
# applies (the default kernels of llama/qwen3/qwen3moe/smollm3/gemma3 files), prompts of every length take it:
# a token's logits then never depend on the chunk it is prefilled in, on a cached prefix or on the
# other sequences of a batch (ops.cpp's qdot_attend and the matrix kernel compute each row on its own).
MAX_TOKENS = 32


def usable(model, n_tokens: int, cache, trace) -> bool:
    """Whether this forward may take the JIT attention (see the module's docstring)."""
    if getattr(model, "lora_training", False):  # LoRA training: autograd and packed masks need PyTorch ops
        return False
    if not (isinstance(cache, (SlotView, BatchView)) and ENABLED and trace is None and not model.numerics
            and not model.faults and model.device.type == "cpu" and cache.pool.dtype in KV_TYPES and jit.available()):
        return False
    return isinstance(cache, BatchView) or n_tokens <= MAX_TOKENS or step_of(model) is not None


def rows(cache, start, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, position) of each token as int64 tensors, made once per forward for all layers."""
    if isinstance(cache, BatchView):
        return cache.idx.contiguous(), cache.pos.to(torch.int64).contiguous()
    start = int(start)
    return (torch.full((n_tokens,), cache.slot, dtype=torch.int64),
            torch.arange(start, start + n_tokens, dtype=torch.int64))


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.is_contiguous(), "the JIT library takes contiguous float32 tensors"
    return t.data_ptr()


def qkv_row(model, L: dict, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The tokens' Q, K and V side by side, [T, nq + nk + nv] (biases added), and the widths:
    the fused product itself when there is one (no split), else the three concatenated."""
    f = L.get("attn_qkv")
    if f is not None and all(L.get(n + ".bias") is None for n in ("attn_q", "attn_k", "attn_v")):
        return qmatmul(x, f), list(f.parts)
    q, k, v = model.qkv(L, x, reshape=False)
    return torch.cat((q, k, v), dim=-1), [q.shape[-1], k.shape[-1], v.shape[-1]]


def attend(model, il: int, qkv: torch.Tensor, parts: list[int], cache, where: tuple[torch.Tensor, torch.Tensor],
           rope: tuple[torch.Tensor, torch.Tensor] | None, neox: bool, window: int, q_norm: torch.Tensor | None,
           k_norm: torch.Tensor | None, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, H*D + Hkv*D + Hkv*Dv] (each token's projections, see qkv_row) -> attention output
    [T, H*Dv]; each token's K/V is now in its slot of the cache at its position (``where``, from
    :func:`rows`). ``rope``: the tokens' (cos, sin) tables, None for a layer without RoPE; ``window``
    > 0: sliding-window attention (is_masked_swa: keys within ``window`` positions);
    ``q_norm``/``k_norm``: per-head RMS norms before RoPE; ``sinks`` [H]: gpt-oss's attention sinks."""
    c, pool = model.cfg, cache.pool
    K, V = pool.k[il], pool.v[il]
    H, Hkv, D, Dv = c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v
    assert parts == [H * D, Hkv * D, Hkv * Dv], "Q/K/V widths"
    assert qkv.dtype == torch.float32 and qkv.stride(-1) == 1
    T = qkv.shape[0]
    out = torch.empty(T, H * Dv)
    cs, sn = rope if rope is not None else (None, None)
    n_rot = 0 if rope is None else cs.shape[-1] * 2
    slot, pos = where
    jit.library().qdot_attend(qkv.data_ptr(), T, qkv.stride(0), H, Hkv, D, Dv, _ptr(q_norm), _ptr(k_norm),
                              model.eps(), _ptr(cs), _ptr(sn), n_rot, int(neox), K.data_ptr(), V.data_ptr(),
                              KV_TYPES[pool.dtype], K.shape[2], slot.data_ptr(), pos.data_ptr(), window, scale,
                              out.data_ptr(), _ptr(sinks))
    return out


GLU = {"silu": 0, "gelu": 1, "swiglu_oai": 2}  # ops.cpp qdot_glu's kinds


def gated(model, L: dict, x: torch.Tensor, act: str) -> torch.Tensor | None:
    """act(x @ ffn_gate^T) * (x @ ffn_up^T) for x [M, n_embd] (build_ffn's LLM_FFN_PAR without biases),
    the activation in one call on the fused gate/up product; None where the JIT library cannot do it
    (the caller then uses PyTorch)."""
    if x.device.type != "cpu" or any(L.get(n + ".bias") is not None for n in ("ffn_gate", "ffn_up")):
        return None
    if torch.is_grad_enabled() and x.requires_grad:  # LoRA training: the C++ activation has no backward
        return None
    lib = jit.library()
    if lib is None:
        return None
    f = L.get("ffn_gate_up")
    if f is not None:
        y = qmatmul(x, f).reshape(-1, f.out_features)
        F = f.parts[0]
        if y.dtype != torch.float32 or not y.is_contiguous() or f.parts != [F, F]:
            return None
        g, u, ld = y.data_ptr(), y.data_ptr() + 4 * F, y.stride(0)
        ldu, keep = ld, y
    else:
        gate, up = qmatmul(x, L["ffn_gate"]), qmatmul(x, L["ffn_up"])
        if gate.dtype != torch.float32 or up.dtype != torch.float32:
            return None
        gate, up = gate.reshape(-1, gate.shape[-1]).contiguous(), up.reshape(-1, up.shape[-1]).contiguous()
        F, keep = gate.shape[-1], (gate, up)
        g, u, ld, ldu = gate.data_ptr(), up.data_ptr(), F, F
    out = torch.empty(*x.shape[:-1], F)
    lib.qdot_glu(g, u, out.numel() // F, F, ld, ldu, GLU[act], out.data_ptr())
    del keep
    return out


# ---- every layer of a decode step in one call (quant/csrc/step.cpp) ----------------------------------
_WEIGHTS = ("qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down")
_VECTORS = ("attn_norm", "q_norm", "k_norm", "post_attn_norm", "ffn_norm", "post_ffw_norm", "qkv_b", "o_b", "sinks")


class _Term(ctypes.Structure):
    """csrc/step.cpp's struct Term: one LoRA term on a product (lora/apply.py's LowRank)."""
    _fields_ = [("a", ctypes.c_void_p), ("bt", ctypes.c_void_p), ("r", ctypes.c_int64), ("N", ctypes.c_int64),
                ("lo", ctypes.c_int64), ("scale", ctypes.c_float), ("rows", ctypes.c_void_p), ("skip", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    """csrc/step.cpp's struct Layer, field by field (lora/n_lora: per product of _WEIGHTS, in that order)."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("attn_norm", "qkv", "q", "k", "v", "q_norm", "k_norm", "o",
                                               "post_attn_norm", "ffn_norm", "gate_up", "gate", "up", "down",
                                               "post_ffw_norm", "moe", "qkv_b", "o_b", "sinks")] + \
               [("rope", ctypes.c_int32), ("window", ctypes.c_int32),
                ("lora", ctypes.c_void_p * len(_WEIGHTS)), ("n_lora", ctypes.c_int32 * len(_WEIGHTS))]


class _Model(ctypes.Structure):
    """csrc/step.cpp's struct Model."""
    _fields_ = [(n, ctypes.c_int32) for n in ("n_layer", "E", "H", "Hkv", "D", "Dv", "F", "n_rot", "neox", "act",
                                              "kv_type")] + [("eps", ctypes.c_float), ("scale", ctypes.c_float),
                                                             ("layers", ctypes.c_void_p)]


class _Unsupported(Exception):
    pass


class Step:
    """A model's layers as qdot_step takes them, built once from the architecture's ``step_spec()``:
    per layer a dict of its weights and norms by the names of csrc/step.cpp's struct Layer, plus ``rope``
    (0 none, 1 global tables, 2 local tables) and ``window``; and the FFN activation."""

    def __init__(self, model, layers: list[dict], act: str):
        from ..quant.qdot import qdot_kernel, qdot_linear

        c = model.cfg
        self.keep = []  # what the structs point into
        self.lora_b = []  # (B, its version) of every LoRA term: a term trained in place makes this Step stale
        self.lora_k = []  # (its _Term, adapter index k, rank r) of every LoRA term, for per-row scales
        self.per_row = False  # some term holds per-row scales (or a skip) from the last call
        self._row_keep = []  # the per-row scale tensors the terms point into, for the current call

        def terms(w):
            """w's LoRA terms (lora/apply.py's LowRank, the attached scalar scales) as a _Term array."""
            low = getattr(w, "lora", None)
            if not low:
                return None, 0
            arr = (_Term * len(low.terms))()
            for t, (a, b, sc, lo, hi, k, r) in zip(arr, low.terms):
                if (a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu"
                        or not a.is_contiguous() or r > jit.MAX_LORA_RANK or b.shape != (hi - lo, r)):
                    raise _Unsupported  # what jit.lowrank would not take (the per-layer path then uses PyTorch)
                bt = b.T.contiguous()
                self.keep += [a, bt]
                self.lora_b.append((b, b._version))
                t.a, t.bt, t.r, t.N, t.lo, t.scale = a.data_ptr(), bt.data_ptr(), r, hi - lo, lo, float(sc)
                self.lora_k.append((t, k, r))
            self.keep.append(arr)
            return ctypes.addressof(arr), len(low.terms)

        def weight(w):
            if w is None:
                return None
            if getattr(w, "kernel", None) is not qdot_kernel or w.out_features % 16:
                raise _Unsupported  # a type without the JIT kernel, or padded rows
            lin = qdot_linear(w)
            self.keep.append(lin)
            return lin.ref

        def vector(t):
            if t is None:
                return None
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise _Unsupported
            self.keep.append(t)
            return t.data_ptr()

        ffs = {L["down"].in_features for L in layers if L.get("moe") is None}
        if len(ffs) > 1:
            raise _Unsupported  # one FFN width for every dense layer
        self.layers = (_Layer * len(layers))()
        for s, L in zip(self.layers, layers):
            for i, name in enumerate(_WEIGHTS):
                setattr(s, name, weight(L.get(name)))
                s.lora[i], s.n_lora[i] = terms(L.get(name)) if L.get(name) is not None else (None, 0)
            for name in _VECTORS:
                setattr(s, name, vector(L.get(name)))
            if L.get("moe") is not None:  # routed experts (moe.cpp) instead of the dense FFN
                self.keep.append(L["moe"])
                s.moe = L["moe"].ref
            s.rope, s.window = int(L["rope"]), int(L["window"])
        n_rot = c.n_rot if any(L["rope"] for L in layers) else 0
        self.model = _Model(len(layers), c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v, ffs.pop() if ffs else 0, n_rot,
                            int(c.rope_type == "neox"), GLU[act], 0, model.eps(), c.attn_scale,
                            ctypes.addressof(self.layers))
        self.ref = ctypes.addressof(self.model)
        self._kv = (None, None, None)

    def _pointers(self, pool):
        """Per-layer cache pointers, rebuilt when the pool grew (reserve reallocates every layer)."""
        kv = self._kv  # one read: another thread decoding another pool may replace self._kv meanwhile
        if kv[0] is not pool.k[0]:
            n = len(pool.k)
            kv = self._kv = (pool.k[0], (ctypes.c_void_p * n)(*[t.data_ptr() for t in pool.k]),
                             (ctypes.c_void_p * n)(*[t.data_ptr() for t in pool.v]))
        return kv[1], kv[2]

    def scales(self, lora_rows, T: int) -> None:
        """Point the LoRA terms at this call's per-row scales (lora_rows: lora/apply.py's SlotScales with a
        table, for the T rows whose slots it holds), or back at their attached scalars (None). The same
        vectors, from the same SlotScales.row_scales, as the per-layer path's LowRank uses."""
        table = lora_rows is not None and lora_rows.table is not None
        if not table and not self.per_row:
            return
        self._row_keep = []
        for t, k, r in self.lora_k:
            per = lora_rows.row_scales(k, r, T) if table else None
            t.skip = int(per is False)
            if per is None or per is False:
                t.rows = None
            else:
                per = per.contiguous()
                self._row_keep.append(per)
                t.rows = per.data_ptr()
        self.per_row = table

    def run(self, x: torch.Tensor, cache, where, tables, lora_rows=None) -> torch.Tensor:
        """Embeddings x [T, n_embd] through every layer (x is overwritten and returned); lora_rows: the
        model's per-sequence adapter scales, if any (their slots set for these rows)."""
        self.scales(lora_rows, x.shape[0])
        pool = cache.pool
        kp, vp = self._pointers(pool)
        self.model.kv_type = KV_TYPES[pool.dtype]
        cs, sn, csl, snl = tables
        x = x.contiguous()
        slot, pos = where
        jit.library().qdot_step(self.ref, _ptr(x), x.shape[0], kp, vp, pool.k[0].shape[2], slot.data_ptr(),
                                pos.data_ptr(), _ptr(cs), _ptr(sn), _ptr(csl), _ptr(snl))
        return x


def step_of(model) -> Step | None:
    """The model's Step, built on first use; None where its architecture or weights do not qualify.
    LoRA adapters are in it (step.cpp's Term, lowrank.cpp: the per-layer path's calls) with their attached
    scales, or per row where a server batch mixes adapters (lora_rows.table: Step.scales); a Step whose
    adapter weights were trained since it was built is built again."""
    st = getattr(model, "_step", None)
    if st and st.lora_b and any(b._version != v for b, v in st.lora_b):
        st = model._step = None  # built again from the trained terms
    if st is None:
        spec = model.step_spec()
        try:
            st = Step(model, *spec) if spec is not None else False
        except _Unsupported:
            st = False
        model._step = st
    return st or None


# ---- a layer's routed experts in one call (quant/csrc/moe.cpp) -----------------------------------------
class _MoE(ctypes.Structure):
    """csrc/qdot.h's struct MoE, field by field."""
    _fields_ = [(n, ctypes.c_void_p) for n in ("router", "router_q", "router_b", "sel_b", "gate_up", "gate", "up",
                                               "down", "gate_b", "up_b", "down_b")] + \
               [(n, ctypes.c_int32) for n in ("n_expert", "n_used", "F", "gating", "norm_w", "act")] + \
               [("scale", ctypes.c_float)]


GATING = {"softmax": 0, "sigmoid": 1, "softmax_weight": 2}  # moe.cpp's route()


class ExpertFFN:
    """One layer's router and routed experts as moe.cpp's struct MoE (build_moe_ffn, expert biases
    included; shared experts stay with the caller): ``self(x)`` -> (out [T, n_embd], chosen experts [T, k]).
    ``act``: the activation's name in GLU (gpt-oss: "swiglu_oai"). Raises _Unsupported where moe.cpp
    cannot compute it: an expert without the JIT kernel (exact mode, a type without it), no gate experts,
    rows not a multiple of 16, LoRA adapters."""

    def __init__(self, model, L: dict, act: str = "silu"):
        from ..quant.qdot import qdot_kernel, qdot_linear

        c = model.cfg
        self.keep = []
        up, gate, down, router = L.get("ffn_up_exps"), L.get("ffn_gate_exps"), L.get("ffn_down_exps"), L.get("ffn_gate_inp")
        if c.expert_gating not in GATING or act not in GLU or not up or not gate or not down or router is None:
            raise _Unsupported
        self.F, self.E, self.k = up.n_out, down.n_out, c.n_expert_used
        if self.F % 16 or self.E % 16 or down.n_in != self.F or self.E != c.n_embd:
            raise _Unsupported

        def ref(w, pad_ok=False):
            if (w is None or getattr(w, "kernel", None) is not qdot_kernel or getattr(w, "lora", None) is not None
                    or (w.out_features % 16 and not pad_ok)):
                raise _Unsupported
            lin = qdot_linear(w)
            self.keep.append(lin)
            return lin.ref

        def array(refs):
            a = (ctypes.c_void_p * len(refs))(*refs)
            self.keep.append(a)
            return ctypes.addressof(a)

        def vector(t):
            if t is None:
                return None
            t = t.float().contiguous()
            if t.device.type != "cpu":
                raise _Unsupported
            self.keep.append(t)
            return t.data_ptr()

        n = c.n_expert
        fused = L.get("ffn_gate_up_exps") or {}
        if len(fused) == n and all(list(fused[e].parts) == [self.F, self.F] for e in range(n)):
            gu, g, u = array([ref(fused[e]) for e in range(n)]), None, None
        else:
            gu, g, u = None, array([ref(gate[e]) for e in range(n)]), array([ref(up[e]) for e in range(n)])
        d = array([ref(down[e]) for e in range(n)])
        if getattr(router, "lora", None) is not None:
            raise _Unsupported
        if router.kernel is qdot_kernel:
            rf, rq = None, ref(router, pad_ok=True)
        elif router.kernel is None and router.dense is not None:
            rf, rq = vector(router.dense), None
        else:
            raise _Unsupported
        biases = [vector(L.get(f"ffn_{p}_exps.bias")) for p in ("gate", "up", "down")]  # [n_expert, F or E]
        self.model = _MoE(rf, rq, vector(L.get("ffn_gate_inp.bias")), vector(L.get("exp_probs_b")), gu, g, u, d,
                          *biases, n, self.k, self.F, GATING[c.expert_gating], int(bool(c.expert_norm)), GLU[act],
                          float(c.expert_weights_scale or 0.0))
        self.ref = ctypes.addressof(self.model)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, self.E)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        T = x.shape[0]
        out = torch.empty(T, self.E)
        sel = torch.empty(T, self.k, dtype=torch.int32)
        jit.library().qdot_moe(self.ref, x.data_ptr(), T, self.E, out.data_ptr(), sel.data_ptr())
        return out, sel


def expert_ffn(model, il: int, trace=None, act: str = "silu") -> ExpertFFN | None:
    """Layer il's ExpertFFN with activation ``act`` (built on first use; one activation per model), or None
    where the per-layer PyTorch experts must run:
    a tracer (it reports each expert's products), ggml-numerics mode, fault injection, LoRA training, not
    CPU, no JIT library, or weights moe.cpp does not take."""
    if (not ENABLED or trace is not None or model.numerics or model.faults or getattr(model, "lora_training", False)
            or getattr(model, "loras", None) or model.device.type != "cpu" or not jit.available()):
        return None
    cache = getattr(model, "_experts", None)
    if cache is None:
        cache = model._experts = {}
    f = cache.get(il)
    if f is None:
        try:
            f = ExpertFFN(model, model.layers[il], act)
        except _Unsupported:
            f = False
        cache[il] = f
    return f or None
