"""Small pure functions the architectures are composed of, and the KV cache.

Shapes: a sequence of T tokens is [T, n_embd]; heads are [n_head, T, head_dim].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quant import jit as _jit


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """ggml_rms_norm then a multiply by the weight (llm_graph_context::build_norm, LLM_NORM_RMS):
    x / sqrt(mean(x^2) + eps) * w. On CPU, the JIT library's loop (ggml's arithmetic: the squares summed
    in double) takes ~2 us where PyTorch's fused op takes 18-40 on a 576-wide row; else PyTorch's."""
    if x.numel() and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):  # LoRA training
        y = _jit.rms_norm(x, weight, eps)
        if y is not None:
            return y
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_cache(positions: torch.Tensor, n_rot: int, base: float, freq_scale: float = 1.0,
               freq_factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, n_rot/2] for absolute positions: theta_i = p * freq_scale * base^(-2i/n_rot) / factor_i."""
    i = torch.arange(0, n_rot // 2, dtype=torch.float64, device=positions.device)
    inv = base ** (-2.0 * i / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors.to(torch.float64)
    theta = positions.to(torch.float64)[:, None] * freq_scale * inv[None, :]
    return torch.cos(theta).float(), torch.sin(theta).float()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool,
         cis: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [..., head_dim] by position (ggml_rope_ext); cos/sin broadcast against x[..., :n_rot/2].
    ``neox`` pairs dimension i with i + n_rot/2; otherwise (llama, whose Q/K the converter permuted)
    adjacent pairs 2i, 2i+1. Dimensions past n_rot pass through unchanged. ``cis`` = cos + i sin,
    when the caller computed it once for all layers."""
    n_rot = cos.shape[-1] * 2
    if not neox and n_rot == x.shape[-1]:  # the common case as one complex multiply: (a + ib)(cos + i sin)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], n_rot // 2, 2))
        return torch.view_as_real(xc * (torch.complex(cos, sin) if cis is None else cis)).flatten(-2)
    xr, rest = x[..., :n_rot], x[..., n_rot:]
    if neox:
        x0, x1 = xr[..., : n_rot // 2], xr[..., n_rot // 2:]
        out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Boolean [T, S], True where query may attend: causal, and within ``window`` positions when set
    (llama_hparams::is_masked_swa, standard: masked when q - k >= window)."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        ok &= (q_pos[:, None] - k_pos[None, :]) < window
    return ok


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with grouped KV heads. q [H, T, D], k/v [Hkv, S, D] -> [T, H*Dv].
    ``mask`` is boolean [T, S] (True = may attend) or None when every query sees every key.

    Batched decode (a :class:`BatchView` cache): k/v are [B, Hkv, S, D], one sequence per row, padded
    to the longest; q [H, B, D] holds one query per sequence and ``mask`` [B, S] says which of its own
    row's keys each query sees. One SDPA call for all B sequences."""
    gqa = q.shape[0] != k.shape[-3]  # grouped KV heads are shared by SDPA itself, no copies
    if k.dim() == 4:
        # one query per sequence: two batched matmuls and a softmax (the heads sharing a KV head side by
        # side) take ~2/3 of SDPA's time here, whose fused kernel is built for long query blocks
        B, Hkv, S, D = k.shape
        qb = q.transpose(0, 1).reshape(B, Hkv, -1, D)  # [B, Hkv, H/Hkv, D]
        s = torch.matmul(qb, k.transpose(-1, -2)) * scale  # [B, Hkv, H/Hkv, S]
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.matmul(torch.softmax(s, dim=-1), v)  # [B, Hkv, H/Hkv, Dv]
        return out.reshape(B, -1)
    # 4-D inputs select PyTorch's fused CPU attention kernel (3-D ones fall back to the math path)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=gqa)[0]
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def silu_ffn(x, gate, up):
    return F.silu(gate) * up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """ggml_gelu: the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class KVCache:
    """A pool of ``n_slots`` sequences' keys and values (llama.cpp's unified KV cache with sequence ids).

    Per layer K is [n_slots, n_kv_head, capacity, head_dim] and V likewise, stored in ``dtype`` (llama.cpp
    keeps F16). A sequence is a slot plus a length: slot s holds its tokens at indices 0..lens[s]-1, and
    index = position. The capacity grows by doubling (all slots together) up to ``n_ctx`` (None:
    unbounded), so a pool sized for a long context costs memory only as its sequences grow.
    Zero-filled, so padding rows in a batched gather are finite (masked, but never NaN)."""

    def __init__(self, n_layer: int, n_kv: int, head_dim: int, head_dim_v: int, capacity: int = 256,
                 device="cpu", dtype=torch.float32, n_slots: int = 1, n_ctx: int | None = None):
        self.n_layer, self.n_kv, self.hd, self.hdv = n_layer, n_kv, head_dim, head_dim_v
        self.device, self.dtype = device, DTYPES.get(dtype, dtype)
        self.n_slots, self.n_ctx = n_slots, n_ctx
        capacity = max(1, capacity if n_ctx is None else min(capacity, n_ctx))
        self.k = [self._alloc(capacity, head_dim) for _ in range(n_layer)]
        self.v = [self._alloc(capacity, head_dim_v) for _ in range(n_layer)]
        self.lens = [0] * n_slots

    def _alloc(self, cap: int, d: int) -> torch.Tensor:
        return torch.zeros(self.n_slots, self.n_kv, cap, d, device=self.device, dtype=self.dtype)

    @property
    def n(self) -> int:
        """Length of slot 0 (the single-sequence cache)."""
        return self.lens[0]

    @n.setter
    def n(self, value: int) -> None:
        self.lens[0] = value

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def bytes_per_token(self) -> int:
        """K and V bytes one token of one sequence takes, all layers."""
        return self.n_layer * self.n_kv * (self.hd + self.hdv) * self.k[0].element_size()

    def nbytes(self) -> int:
        """Bytes allocated now (all slots, all layers)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, total: int) -> None:
        """Room for ``total`` tokens in every slot (the caller checks n_ctx first)."""
        if total <= self.capacity:
            return
        cap = max(total, 2 * self.capacity)
        if self.n_ctx is not None:
            cap = min(cap, max(total, self.n_ctx))
        keep = max(self.lens)
        for lst, d in ((self.k, self.hd), (self.v, self.hdv)):
            for i, t in enumerate(lst):
                new = self._alloc(cap, d)
                new[:, :, :keep] = t[:, :, :keep]
                lst[i] = new

    def view(self, il: int, slot: int, end: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of ``slot``'s first ``end`` tokens in layer il, [n_kv, end, D], in ``dtype``."""
        return self.k[il][slot, :, :end].to(dtype), self.v[il][slot, :, :end].to(dtype)

    def update(self, il: int, start: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0):
        """Write k/v [n_kv, T, D] into ``slot`` at ``start``; return its views [n_kv, start+T, D] in k's dtype."""
        end = start + k.shape[1]
        self.k[il][slot, :, start:end] = k
        self.v[il][slot, :, start:end] = v
        return self.view(il, slot, end, k.dtype)

    def truncate(self, n: int, slot: int = 0) -> None:
        """Keep the first n tokens of ``slot`` (prefix reuse)."""
        self.lens[slot] = max(0, min(self.lens[slot], n))

    def clear(self, slot: int = 0) -> None:
        self.lens[slot] = 0

    def move(self, slot: int, src: int, dst: int, n: int) -> None:
        """Move n tokens of ``slot`` from index src to dst (dst < src; part of a context shift)."""
        for lst in (self.k, self.v):
            for t in lst:
                t[slot, :, dst:dst + n] = t[slot, :, src:src + n].clone()


class SlotView:
    """The cache as one sequence sees it: what ``block``/``attend`` get from ``forward(slot=)``."""

    def __init__(self, pool: KVCache, slot: int):
        self.pool, self.slot = pool, slot

    def update(self, il, start, k, v):
        return self.pool.update(il, start, k, v, self.slot)

    @property
    def n(self) -> int:
        return self.pool.lens[self.slot]


class BatchView:
    """The cache as a batched decode step sees it: token b belongs to ``slots[b]`` at ``pos[b]``.
    ``update`` writes each new key/value into its own slot and returns the B slots' K/V gathered to
    [B, n_kv, max(pos)+1, D] (rows past a sequence's length are padding its mask hides)."""

    def __init__(self, pool: KVCache, slots: list[int], pos: torch.Tensor):
        self.pool, self.slots, self.pos = pool, slots, pos
        self.idx = torch.tensor(slots, dtype=torch.long, device=pos.device)
        self.end = int(pos.max()) + 1
        s0 = slots[0]
        self.contiguous = slots == list(range(s0, s0 + len(slots)))  # a slice instead of a gather

    def update(self, il, start, k, v):
        p, K, V = self.pool, self.pool.k[il], self.pool.v[il]
        # k/v [n_kv, B, D]; K[idx, :, pos] addresses [B, n_kv, D]
        K[self.idx, :, self.pos] = k.transpose(0, 1).to(K.dtype)
        V[self.idx, :, self.pos] = v.transpose(0, 1).to(V.dtype)
        if self.contiguous:
            s = self.slots[0]
            kk, vv = K[s:s + len(self.slots), :, :self.end], V[s:s + len(self.slots), :, :self.end]
        else:
            kk = K[:, :, :self.end].index_select(0, self.idx)
            vv = V[:, :, :self.end].index_select(0, self.idx)
        return kk.to(k.dtype), vv.to(v.dtype)

# ---- pieces of the architectures after llama (issue 12) ------------------------------------------
def rope_cache_yarn(positions: torch.Tensor, n_rot: int, base: float, freq_scale: float, ext_factor: float,
                    attn_factor: float, beta_fast: float, beta_slow: float, n_ctx_orig: int,
                    freq_factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, n_rot/2] of ggml_rope_ext with YaRN (ggml-cpu rope_yarn / ggml_rope_yarn_corr_dims):
    each frequency mixes the interpolated angle (freq_scale * theta) with the extrapolated one by a ramp
    over the dimensions between the two correction dims, and cos/sin are scaled by
    attn_factor * (1 + 0.1 ln(1/freq_scale)). With ext_factor 0 this is plain linear scaling."""
    i = torch.arange(0, n_rot // 2, dtype=torch.float64, device=positions.device)
    inv = base ** (-2.0 * i / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors.to(torch.float64)
    extrap = positions.to(torch.float64)[:, None] * inv[None, :]
    interp = freq_scale * extrap
    mscale = attn_factor
    if ext_factor != 0.0:
        def corr_dim(n_rot_beta):
            return n_rot * math.log(n_ctx_orig / (n_rot_beta * 2 * math.pi)) / (2 * math.log(base))
        low = max(0.0, math.floor(corr_dim(beta_fast)))
        high = min(n_rot - 1.0, math.ceil(corr_dim(beta_slow)))
        y = (i - low) / max(0.001, high - low)
        mix = (1 - y.clamp(0, 1)) * ext_factor
        theta = interp * (1 - mix) + extrap * mix
        mscale = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    else:
        theta = interp
    return (torch.cos(theta) * mscale).float(), (torch.sin(theta) * mscale).float()


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) (gemma2's attention and final logit soft-capping)."""
    return torch.tanh(x / cap) * cap


def attention_ext(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  cap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """build_attn_mha without flash attention, for what SDPA cannot express: kq = k.q, soft-capped
    (cap * tanh(kq / cap)) before the scale, as llm_graph_context::build_attn_mha does; then
    soft_max_ext(kq * scale + mask) with per-head ``sinks``: an extra logit in each head's normalizer
    that takes probability mass but contributes no value (ggml_soft_max_add_sinks).
    q [H, T, D], k/v [Hkv, S, D] -> [T, H*Dv]. A batched decode step (k/v [B, Hkv, S, D], q [H, B, D],
    mask [B, S]) runs each sequence against its own row."""
    if k.dim() == 4:
        return torch.cat([attention_ext(q[:, b:b + 1], k[b], v[b], None if mask is None else mask[b:b + 1],
                                        scale, cap, sinks) for b in range(k.shape[0])])
    H, T, _ = q.shape
    rep = H // k.shape[0]
    kk = k.repeat_interleave(rep, 0) if rep > 1 else k
    vv = v.repeat_interleave(rep, 0) if rep > 1 else v
    kq = torch.matmul(q, kk.transpose(1, 2))  # [H, T, S]
    if cap:
        kq = softcap(kq, cap)
    kq = kq * scale
    if mask is not None:
        kq = kq.masked_fill(~mask[None], float("-inf"))
    if sinks is not None:
        s = sinks.reshape(H, 1, 1).expand(H, T, 1).to(kq.dtype)
        p = torch.softmax(torch.cat((kq, s), dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(kq, dim=-1)
    out = torch.matmul(p, vv)  # [H, T, Dv]
    return out.transpose(0, 1).reshape(T, -1)


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """ggml_swiglu_oai (gpt-oss): x = min(gate, limit), y = clamp(up, -limit, limit),
    x * sigmoid(alpha * x) * (y + 1)."""
    x = gate.clamp(max=limit)
    y = up.clamp(-limit, limit)
    return x * torch.sigmoid(alpha * x) * (y + 1)
