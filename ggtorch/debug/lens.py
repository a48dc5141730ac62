"""The logit lens: what each layer's residual stream would predict through the final norm and head."""
from __future__ import annotations

import torch

from ..model.layers import rms_norm
from ..quant.linear import qmatmul
from .trace import split_name


def logit_lens(model, ids, k: int = 5) -> list[dict]:
    """For the last position, after every layer (``l_out-N``): top-k tokens, their probabilities, and
    the rank of the final top-1 token. ``model`` is a ggtorch.api.Model."""
    net, layers = model.net, {}

    def tracer(name, t):
        base, il = split_name(name)
        if base == "l_out":
            layers[il] = t[-1:].detach().clone()

    final = net.forward(ids, net.new_cache(len(ids)), start=0, trace=tracer)[-1].float()
    top_final = int(final.argmax())
    out = []
    with torch.inference_mode():
        for il in sorted(layers):
            x = rms_norm(layers[il], net.output_norm, net.eps())
            logits = qmatmul(x, net.output)[-1].float()
            p = torch.softmax(logits.double(), -1)
            val, idx = p.topk(k)
            out.append({"layer": il, "top": [{"id": int(i), "piece": model.detokenize([int(i)]), "p": float(v)}
                                             for v, i in zip(val, idx)],
                        "final_top1_rank": int((logits > logits[top_final]).sum())})
    return out


def format_lens(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        tops = "  ".join(f"{t['piece']!r} {t['p']:.2f}" for t in r["top"])
        lines.append(f"layer {r['layer']:>3}  rank(final)={r['final_top1_rank']:<6} {tops}")
    return "\n".join(lines)
