"""Fast mode's load step: give every weight its kernel, fuse Q/K/V and gate/up, and keep the result
in the repack cache (ggtorch.quant.cache) so the next load of the same file only maps it back in."""
from __future__ import annotations

from ..quant import cache as repack_cache
from ..quant.kernels import KERNEL_NAMES, KERNELS_BY_NAME, REFINE_TOP, Fused, fuse, install, repack_format, trim_heap
from ..quant.qdot import qdot_fused, qdot_kernel

# Two int4 planes (exact block scales) for Q8_0/Q5_x: everywhere, or only for the output matrix, whose
# rounding reaches the logits directly; elsewhere int8 rows read fewer bytes (8 vs 10 bits a weight).
PLANES_EVERYWHERE = False
FUSIONS = (("attn_qkv", ("attn_q", "attn_k", "attn_v")), ("ffn_gate_up", ("ffn_gate", "ffn_up")))


def install_fast(net, use_cache: bool = True) -> str:
    """Fast kernels for ``net``'s weights; returns "hit", "miss" (repacked and stored) or "off"."""
    how = _install(net, use_cache)
    # PyTorch's kernels round the logits to bf16: their largest values are recomputed in float32
    # (quant.kernels._finish). The JIT kernel's logits are float32 and already rounded as llama.cpp's are.
    if net.output.kernel is not None and net.output.kernel is not qdot_kernel:
        net.output.refine_top = REFINE_TOP
    return how


def _install(net, use_cache: bool) -> str:
    from ..quant import triton as qtriton

    if qtriton.wanted(net.device):  # CUDA (or CPU under Triton's interpreter): the Triton kernels
        return qtriton.install_net(net)
    if net.device.type != "cpu":
        use_cache = False
    key = None
    if use_cache:
        try:
            key = repack_cache.file_key(net.file.path, repack_format())
        except OSError:
            key = None
        got = repack_cache.load(key) if key else None
        if got is not None and _apply(net, *got):
            return "hit"
    _repack(net)
    if key is not None:
        tensors, manifest = _collect(net)
        repack_cache.save_in_background(key, tensors, manifest)
        return "miss"
    return "off"


def _repack(net) -> None:
    done = set()  # weights repacked straight into a fused matrix
    for L in getattr(net, "layers", []):
        for key, names in FUSIONS:
            f = qdot_fused([L.get(n) for n in names])
            if f is not None:
                L[key] = f
                done.update(id(L[n]) for n in names)
        if L.get("ffn_up_exps") and L.get("ffn_gate_exps"):  # MoE: each expert's gate|up, straight
            gate, up = L["ffn_gate_exps"], L["ffn_up_exps"]  # (packing each and concatenating copied 2/3
            fused = {}                                        # of the expert bytes once more on a cold load)
            for e in range(len(up)):
                f = qdot_fused([gate[e], up[e]])
                if f is not None:
                    fused[e] = f
                    done.update((id(gate[e]), id(up[e])))
            if fused:
                L["ffn_gate_up_exps"] = fused
    for i, w in enumerate(net._weights.values()):
        if id(w) not in done:
            install(w, planes=PLANES_EVERYWHERE or w is net.output)
        if i % 8 == 7:
            trim_heap()  # repacking frees multi-MB temporaries; hand them back so they don't add to the peak
    for L in getattr(net, "layers", []):
        for key, names in FUSIONS:
            if isinstance(L.get(key), Fused):
                continue
            f = fuse([L.get(n) for n in names])
            if f is not None:
                L[key] = f
        if L.get("ffn_up_exps") and not L.get("ffn_gate_up_exps"):  # MoE: each expert's gate|up as one matrix
            from .moe import fuse_experts

            L["ffn_gate_up_exps"] = fuse_experts(L["ffn_gate_exps"], L["ffn_up_exps"])
    trim_heap()


def _collect(net) -> tuple[dict, dict]:
    """The repacked state as named tensors plus a JSON manifest saying where each belongs."""
    tensors, weights, fused = {}, {}, {}
    for name, w in net._weights.items():
        if w.kernel in KERNEL_NAMES:
            weights[name] = [KERNEL_NAMES[w.kernel], sorted(w.state)]
            for k, t in w.state.items():
                tensors[f"{name}/{k}"] = t
    for il, L in enumerate(getattr(net, "layers", [])):
        for key, names in FUSIONS:
            f = L.get(key)
            if isinstance(f, Fused):
                fused[f"{il}/{key}"] = [KERNEL_NAMES[f.kernel], sorted(f.state), f.parts, f.in_features]
                for k, t in f.state.items():
                    tensors[f"{il}/{key}/{k}"] = t
        for e, f in (L.get("ffn_gate_up_exps") or {}).items():  # MoE experts' fused gate|up
            fused[f"{il}/ffn_gate_up_exps/{e}"] = [KERNEL_NAMES[f.kernel], sorted(f.state), f.parts, f.in_features]
            for k, t in f.state.items():
                tensors[f"{il}/ffn_gate_up_exps/{e}/{k}"] = t
    return tensors, {"weights": weights, "fused": fused}


def _apply(net, tensors: dict, manifest: dict) -> bool:
    """Install the cached state; False (nothing changed) when it does not fit this model."""
    try:
        plan = []
        for name, (kname, keys) in manifest["weights"].items():
            w = net.weight(name, required=False)
            if w is None or w.kernel is not None:
                return False
            plan.append((w, KERNELS_BY_NAME[kname], {k: tensors[f"{name}/{k}"] for k in keys}))
        layers = getattr(net, "layers", [])
        fplan = []
        for fk, (kname, keys, parts, n_in) in manifest["fused"].items():
            il, key, *expert = fk.split("/")
            il = int(il)
            if il >= len(layers):
                return False
            f = Fused.from_state(KERNELS_BY_NAME[kname], {k: tensors[f"{fk}/{k}"] for k in keys}, parts, n_in)
            fplan.append((layers[il], key, int(expert[0]) if expert else None, f))
    except (KeyError, ValueError, TypeError):
        return False
    for w, kernel, state in plan:
        w.kernel, w.state = kernel, state
    for L, key, e, f in fplan:
        if e is None:
            L[key] = f
        else:
            if not L.get(key):
                L[key] = {}
            L[key][e] = f
    return True
