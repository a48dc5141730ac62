"""Mixture-of-experts feed-forward, shared by every MoE architecture (llm_graph_context::build_moe_ffn).

Experts are 3-D GGUF tensors {n_in, n_out, n_expert}. They stay as GGUF blocks: :class:`Experts` holds
one 2-D :class:`QWeight` view per expert (zero-copy slices of the file), so each expert gets the same
per-type kernels as any other matrix, and a token only ever reads the experts it was routed to.

On CPU with the JIT library, :func:`moe` hands the router and the routed experts to one call
(quant/csrc/moe.cpp through model/fastpath.ExpertFFN; the one-call step calls the same function), which
sorts the tokens' (token, slot) rows by expert as ggml_mul_mat_id does; expert biases and gpt-oss's
swiglu_oai included. Traces, other activations and weights without the JIT kernel take the PyTorch
path below.

Routing (:func:`route`) and the expert pass (:func:`moe_ffn`) report llama.cpp's callback names:
``ffn_moe_logits``, ``ffn_moe_probs``, ``ffn_moe_topk``, ``ffn_moe_weights``, ``ffn_moe_weights_norm``,
``ffn_moe_gate``, ``ffn_moe_up``, ``ffn_moe_down``, ``ffn_moe_out`` (with ``-il``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..quant.linear import QWeight, qmatmul
from .fastpath import expert_ffn
from .layers import swiglu_oai

# ggml_clamp(weights_sum, 6.103515625e-5, INF) in build_moe_ffn: the smallest normal F16
_MIN_SUM = 6.103515625e-5


class Experts:
    """A 3-D expert tensor as n_expert [out, in] weights, each a view of its slice of the file."""

    def __init__(self, net, name: str, required: bool = True):
        f = net.file
        ti = f.tensors.get(name)
        self.name = name
        self.w: list[QWeight] = []
        if ti is None:
            if required:
                raise ModelError(f"{f.path}: tensor {name!r} is missing (architecture {net.cfg.arch})")
            return
        if len(ti.shape) != 3:
            raise ModelError(f"{name}: expected a 3-D expert tensor {{n_in, n_out, n_expert}}, found shape {ti.shape}")
        n_in, n_out, n_exp = ti.shape
        if ti.type is None:
            from ..errors import QuantError

            raise QuantError(f"tensor {name!r} has ggml type id {ti.type_id}, unknown to this version of ggtorch")
        raw = torch.from_numpy(f.raw(name))
        per = raw.numel() // n_exp
        for e in range(n_exp):
            w = QWeight(raw[e * per:(e + 1) * per], ti.type, (n_in, n_out), f"{name}[{e}]")
            w.release = (lambda start=0, end=None, e=e: f.release(name, e * per + start, e * per + (per if end is None else end)))
            if net.device.type != "cpu":
                w.to(net.device)
            net._weights[f"{name}[{e}]"] = w  # fast kernels / numerics are installed on these like any weight
            self.w.append(w)
        self.n_in, self.n_out = n_in, n_out

    def __len__(self) -> int:
        return len(self.w)

    def __bool__(self) -> bool:
        return bool(self.w)

    def __getitem__(self, e: int) -> QWeight:
        return self.w[e]


def expert_biases(net, name: str, n_expert: int) -> torch.Tensor | None:
    """An F32 bias {n_out, n_expert} as [n_expert, n_out] (ggml_add_id adds row e to expert e's output)."""
    v = net.vector(name, required=False)
    return None if v is None else v.reshape(n_expert, -1)


def route(logits: torch.Tensor, n_used: int, gating: str = "softmax", norm_w: bool = True, scale: float = 0.0,
          selection_bias: torch.Tensor | None = None, trace=None, il: int = 0):
    """build_moe_ffn's router: probabilities from the router logits [T, n_expert] (softmax, sigmoid, or
    the raw logits for "softmax_weight"), the top-k experts by (optionally biased) probability, their
    weights taken from the unbiased probabilities, then softmax over the k ("softmax_weight"),
    renormalized to sum 1 (norm_w) and scaled. Returns (experts [T, k] long, weights [T, k])."""
    if gating == "softmax":
        probs = torch.softmax(logits, dim=-1)
    elif gating == "sigmoid":
        probs = torch.sigmoid(logits)
    elif gating == "softmax_weight":
        probs = logits
    else:
        raise ModelError(f"unknown expert gating function {gating!r}")
    if trace:
        trace(f"ffn_moe_probs-{il}", probs)
    sel = probs if selection_bias is None else probs + selection_bias
    # ggml_argsort_top_k: largest first; ties (left to std::sort by ggml) go to the lower index, as in moe.cpp
    experts = torch.sort(sel, dim=-1, descending=True, stable=True).indices[..., :n_used]
    weights = probs.gather(-1, experts)
    if trace:
        trace(f"ffn_moe_topk-{il}", experts.to(torch.int32))
        trace(f"ffn_moe_weights-{il}", weights[..., None])  # ggml_get_rows gives [1, k, T]
    if gating == "softmax_weight":
        weights = torch.softmax(weights, dim=-1)
        if trace:
            trace(f"ffn_moe_weights_softmax-{il}", weights[..., None])
    if norm_w:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=_MIN_SUM)
        if trace:
            trace(f"ffn_moe_weights_norm-{il}", weights)
    if scale not in (0.0, 1.0):
        weights = weights * scale
        if trace:
            trace(f"ffn_moe_weights_scaled-{il}", weights[..., None])
    return experts, weights


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def moe_ffn(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, up: Experts, gate: Experts | None,
            down: Experts, act: Callable = silu_glu, up_b=None, gate_b=None, down_b=None,
            fused: dict | None = None, trace=None, il: int = 0) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(act(gate_e(x_t), up_e(x_t))) with e = experts[t, j].

    The tokens routed to one expert are gathered and multiplied together (ggml_mul_mat_id), expert by
    expert, so a token never touches the weights of experts it was not routed to. ``fused`` maps an
    expert to its fast-mode gate|up matrix. Without gate experts the activation takes up alone."""
    if getattr(up, "grouped", None) is not None and trace is None and up_b is None and gate_b is None and down_b is None:
        from ..quant.triton.grouped import moe_ffn as grouped_moe_ffn  # CUDA: one grouped kernel per projection

        return grouped_moe_ffn(x, experts, weights, up, gate, down, act)
    T, k = experts.shape
    keep = {} if trace else None
    if T == 1 and keep is None:  # one decode token: its k experts in slot order, no gather
        out = None
        for j, e in enumerate(experts[0].tolist()):
            y = _expert(x, e, up, gate, down, act, up_b, gate_b, down_b, fused)[0] * weights[0, j]
            out = y if out is None else out + y
        return out
    out = torch.zeros(T, down.n_out, dtype=torch.float32, device=x.device)
    for e in torch.unique(experts).tolist():  # only the experts some token chose
        rows, slots = (experts == e).nonzero(as_tuple=True)
        xe = x[rows]
        y, g, u, y0 = _expert(xe, e, up, gate, down, act, up_b, gate_b, down_b, fused)
        if keep is not None:
            keep[e] = (rows, slots, g, u, y0)
        out.index_add_(0, rows, y * weights[rows, slots, None])
    if keep:
        _trace_experts(trace, il, keep, T, k, x.device)
    return out


_ACT_NAMES = {silu_glu: "silu", swiglu_oai: "swiglu_oai"}  # the activations moe.cpp has (fastpath.GLU)


def load_moe(net, L: dict, p: str) -> None:
    """The router and expert tensors of one layer (create_tensor in the MoE architectures' loaders):
    ffn_gate_inp {n_embd, n_expert} (+ bias), ffn_{up,gate,down}_exps (gate optional) with optional
    per-expert biases, exp_probs_b (a selection bias), and shared experts ffn_{up,gate,down}_shexp."""
    c = net.cfg
    L["ffn_gate_inp"] = net.weight(p + "ffn_gate_inp.weight")
    if L["ffn_gate_inp"].out_features != c.n_expert:
        raise ModelError(f"{p}ffn_gate_inp.weight routes to {L['ffn_gate_inp'].out_features} experts; "
                         f"{c.arch}.expert_count is {c.n_expert}")
    L["ffn_gate_inp.bias"] = net.vector(p + "ffn_gate_inp.bias", required=False)
    L["exp_probs_b"] = net.vector(p + "exp_probs_b.bias", required=False)
    for n in ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps"):
        L[n] = Experts(net, p + n + ".weight", required=n != "ffn_gate_exps")
        if L[n] and len(L[n]) != c.n_expert:
            raise ModelError(f"{p}{n}.weight holds {len(L[n])} experts; {c.arch}.expert_count is {c.n_expert}")
        L[n + ".bias"] = expert_biases(net, p + n + ".bias", c.n_expert)
    for n in ("ffn_up_shexp", "ffn_gate_shexp", "ffn_down_shexp"):
        L[n] = net.weight(p + n + ".weight", required=False)


def moe(net, L: dict, x: torch.Tensor, trace=None, il: int = 0, act: Callable = silu_glu) -> torch.Tensor:
    """build_moe_ffn for one layer with the architecture's gating from the config, plus the shared
    experts where the layer has them (ffn_shexp added to ffn_moe_out)."""
    name = _ACT_NAMES.get(act)
    fast = expert_ffn(net, il, trace, name) if name is not None and not x.requires_grad else None
    if fast is not None:  # router and routed experts in one call (quant/csrc/moe.cpp), as the one-call step
        out, experts = fast(x.reshape(-1, x.shape[-1]))
        out = out.reshape(x.shape)
    else:
        out, experts = _moe_torch(net, L, x, trace, il, act)
    if L.get("ffn_up_shexp") is not None:
        sh = qmatmul(silu_glu(qmatmul(x, L["ffn_gate_shexp"]), qmatmul(x, L["ffn_up_shexp"])), L["ffn_down_shexp"])
        if trace:
            trace(f"ffn_shexp-{il}", sh)
        out = out + sh
    seen = getattr(net, "expert_log", None)  # benchmarks: which experts each forward used
    if seen is not None:
        seen.append((il, experts))
    return out


def _moe_torch(net, L: dict, x: torch.Tensor, trace, il: int, act: Callable):
    """build_moe_ffn in PyTorch operations, expert by expert: (out, chosen experts)."""
    c = net.cfg
    logits = qmatmul(x, L["ffn_gate_inp"])
    if trace:
        trace(f"ffn_moe_logits-{il}", logits)
    if L.get("ffn_gate_inp.bias") is not None:
        logits = logits + L["ffn_gate_inp.bias"]
        if trace:
            trace(f"ffn_moe_logits_biased-{il}", logits)
    experts, weights = route(logits, c.n_expert_used, c.expert_gating, c.expert_norm, c.expert_weights_scale,
                             L.get("exp_probs_b"), trace, il)
    out = moe_ffn(x, experts, weights, L["ffn_up_exps"], L["ffn_gate_exps"], L["ffn_down_exps"], act,
                  L.get("ffn_up_exps.bias"), L.get("ffn_gate_exps.bias"), L.get("ffn_down_exps.bias"),
                  L.get("ffn_gate_up_exps"), trace, il)
    if trace:
        trace(f"ffn_moe_out-{il}", out)
    return out, experts


def _expert(xe, e, up, gate, down, act, up_b, gate_b, down_b, fused):
    """One expert on its gathered tokens: down(act(gate(x) + b, up(x) + b)) + b -> (y, gate, up, down before bias)."""
    if fused is not None and e in fused:
        g, u = qmatmul(xe, fused[e]).split(fused[e].parts, dim=-1)
    else:
        u = qmatmul(xe, up[e])
        g = qmatmul(xe, gate[e]) if gate else None
    raw = (g, u)  # the callbacks ffn_moe_gate/up/down name the products before the biases
    if up_b is not None:
        u = u + up_b[e]
    if g is not None and gate_b is not None:
        g = g + gate_b[e]
    h = act(g, u) if g is not None else act(u, torch.ones_like(u))  # no gate experts: act(up)
    y0 = qmatmul(h, down[e])
    y = y0 + down_b[e] if down_b is not None else y0
    return y, raw[0], raw[1], y0


def _trace_experts(trace, il, keep, T, k, device) -> None:
    """The per-(token, slot) intermediates as llama.cpp lays them out: [T, n_expert_used, n]."""
    for idx, name in ((2, "ffn_moe_gate"), (3, "ffn_moe_up"), (4, "ffn_moe_down")):
        first = next((v[idx] for v in keep.values() if v[idx] is not None), None)
        if first is None:
            continue
        buf = torch.zeros(T, k, first.shape[-1], device=device)
        for rows, slots, *vals in keep.values():
            buf[rows, slots] = vals[idx - 2]
        trace(f"{name}-{il}", buf)


def fuse_experts(gate: Experts, up: Experts) -> dict | None:
    """Fast mode: each expert's gate and up as one matrix (quant.kernels.fuse), when their kernels agree."""
    if not gate or not up:
        return None
    from ..quant.kernels import fuse, int4_kernel

    out = {}
    for e in range(len(up)):
        if gate[e].kernel is int4_kernel and gate[e].out_features % 64:
            continue  # the CPU int4 packing works in blocks of 64 rows: smaller parts do not concatenate
        f = fuse([gate[e], up[e]])
        if f is not None:
            out[e] = f
    return out or None


def _nbytes(w) -> int:
    """Bytes a matmul with ``w`` reads: its kernel's repacked copy, else its float copy, else its GGUF blocks."""
    st = [v for v in getattr(w, "state", {}).values() if torch.is_tensor(v)]
    if st:
        return sum(v.numel() * v.element_size() for v in st)
    if getattr(w, "dense", None) is not None:
        return w.dense.numel() * w.dense.element_size()
    return w.raw.numel()


def expert_nbytes(L: dict, e: int) -> int:
    """Bytes of expert ``e``'s weights in layer dict ``L`` as the forward reads them (fused gate|up
    in fast mode, else gate and up; down)."""
    fused = L.get("ffn_gate_up_exps") or {}
    n = _nbytes(fused[e]) if e in fused else sum(_nbytes(L[k][e]) for k in ("ffn_gate_exps", "ffn_up_exps") if L[k])
    return n + _nbytes(L["ffn_down_exps"][e])


def decode_expert_traffic(net, prompt: list[int], n_gen: int = 16) -> dict:
    """Greedy-decode ``n_gen`` tokens after ``prompt`` and count the expert bytes each decoded token
    reads (the distinct experts it was routed to in every layer), against all expert bytes and against
    the file's bytes of the same experts (``file_bytes_per_token``, what llama.cpp reads for them)."""
    step, net._step = getattr(net, "_step", None), False  # the per-layer path, where moe() logs the experts
    try:
        return _traffic(net, prompt, n_gen)
    finally:
        net._step = step


def _traffic(net, prompt: list[int], n_gen: int) -> dict:
    cache = net.new_cache(len(prompt) + n_gen + 1)
    logits = net.forward(prompt, cache)
    per_token, in_file = [], []
    for _ in range(n_gen):
        net.expert_log = []
        logits = net.forward([int(logits[-1].argmax())], cache)
        used = [(net.layers[il], e) for il, ex in net.expert_log for e in torch.unique(ex).tolist()]
        per_token.append(sum(expert_nbytes(L, e) for L, e in used))
        in_file.append(sum(L[k][e].raw.numel() for L, e in used for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
                           if L[k]))  # the GGUF blocks of the same experts: what llama.cpp reads for them
    net.expert_log = None
    total = sum(expert_nbytes(L, e) for L in net.layers if L.get("ffn_up_exps") for e in range(len(L["ffn_up_exps"])))
    return {"expert_bytes_per_token": sum(per_token) / len(per_token), "expert_bytes_all": total,
            "fraction": sum(per_token) / len(per_token) / total,
            "file_bytes_per_token": sum(in_file) / len(in_file)}
