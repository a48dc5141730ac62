"""Opt-in "llama.cpp numerics": reproduce the roundings ggml's CPU backend makes, for bit-level comparisons.

What ggml does that plain float32 does not (ggml-cpu.c type_traits_cpu, ggml-quants.c, ops.cpp):
- before a quantized dot product the activation row is quantized to the weight type's ``vec_dot_type``:
  Q8_0 blocks of 32 (fp16 scale) for Q4_0/Q5_0/Q8_0/IQ4_NL/MXFP4; Q8_1 (Q8_0 plus an fp16 block sum)
  for Q4_1/Q5_1; Q8_K blocks of 256 (float32 scale) for the K-quants, IQ2/IQ3/IQ1, IQ4_XS and TQ types;
  F16 weights take fp16 activations, BF16 weights bf16;
- the KV cache is F16, so the attention products take Q and the softmax probabilities as fp16
  (without flash attention, llama-cpp-python's default, which made the fixtures).
This is slow (float64 matmuls on dequantized weights) and meant for diffs on small prompts.
"""
from __future__ import annotations

import torch

from ..quant.linear import QWeight

Q8_0_TYPES = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4"}
Q8_1_TYPES = {"Q4_1", "Q5_1"}
Q8_K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
              "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0"}


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // n, n)


def quant_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q8_0 (x86 SIMD form): d = amax/127 stored as fp16, q = round_half_even(x * 127/amax).
    Returns (x_hat, d_unrounded, q) with x_hat = fp16(d) * q."""
    b = _blocks(x, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv)  # torch.round is round-half-to-even, like _MM_ROUND_NEAREST
    dh = d.half().float()
    return (dh * q).reshape(x.shape), d, q


def quant_q8_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K_ref: per 256, iscale = -127/max (max = the value of largest magnitude),
    q = min(127, nearest_int(iscale * x)), d = 1/iscale in float32."""
    b = _blocks(x, 256)
    idx = b.abs().argmax(-1, keepdim=True)
    mx = b.gather(-1, idx)
    iscale = torch.where(mx != 0, -127 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(mx != 0, 1 / iscale, torch.zeros_like(mx))
    return (d * q).reshape(x.shape)


def _q8_1_correction(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """ggml_vec_dot_q4_1_q8_1 adds m_w * s_x with s_x = fp16(d * sum(q)) (unrounded d), where the
    dequantized product has m_w * fp16(d) * sum(q); return the difference, [.., out]."""
    _, d, q = quant_q8_0(x)
    s = (d * q.sum(-1, keepdim=True)).half().float()
    delta = (s - d.half().float() * q.sum(-1, keepdim=True)).squeeze(-1)  # [.., nblocks]
    b = w.raw.reshape(w.out_features, -1, w.type.type_size)
    m = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)  # block mins [out, nblocks]
    return delta.double() @ m.double().T


def activation_for(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    t = w.type.name
    if t in Q8_0_TYPES or t in Q8_1_TYPES:
        return quant_q8_0(x)[0]
    if t in Q8_K_TYPES:
        return quant_q8_k(x)
    if t == "F16":
        return x.half().float()
    if t == "BF16":
        return x.bfloat16().float()
    return x


def ggml_matmul(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x @ W.T with the activation rounded as ggml rounds it for this weight type."""
    y = activation_for(x, w).double() @ w.dequantize().double().T
    if w.type.name in Q8_1_TYPES:
        y = y + _q8_1_correction(x, w)
    return y.float()


def install(w: QWeight) -> None:
    w.kernel = ggml_matmul


def round_kv(t: torch.Tensor) -> torch.Tensor:
    """The F16 KV cache."""
    return t.half().float()


def ggml_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """llm_graph_context::build_attn_mha without flash attention (llama-cpp-python's default), F16
    cache: kq = mul_mat(k, q) takes Q as fp16; soft_max_ext in float32; kqv = mul_mat(v, kq) takes the
    probabilities as fp16. q [H, T, D], k/v [Hkv, S, D] (already fp16-rounded) -> [T, H*Dv]."""
    H, T, D = q.shape
    Hkv, S, Dv = v.shape
    rep = H // Hkv
    qh = q.half().double().reshape(Hkv, rep * T, D)
    kq = torch.bmm(qh, k.double().transpose(1, 2)).float() * scale  # [Hkv, rep*T, S]
    if mask is not None:
        kq = kq.masked_fill(~mask.repeat(rep, 1)[None], float("-inf"))
    # ggml_compute_forward_soft_max_f32: exp(x - max), the sum in double, then a multiply by 1/sum
    e = torch.exp(kq - kq.amax(-1, keepdim=True))
    inv = (1.0 / e.double().sum(-1, keepdim=True)).float()
    p = (e * inv).half().double()
    out = torch.bmm(p, v.double()).float()  # [Hkv, rep*T, Dv]
    return out.reshape(H, T, Dv).transpose(0, 1).reshape(T, H * Dv)


