"""What every architecture shares: weights looked up by GGUF name, the KV cache, the outer forward.

An architecture subclasses :class:`Transformer` and writes ``block`` (one layer, ~40 lines), mirroring
that architecture's graph in llama.cpp's llama-model.cpp. Intermediate tensors are reported to an
optional tracer under llama.cpp's names (``attn_norm-3``, ``Qcur-3``, ``ffn_out-3``, ``l_out-3``...).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ModelError
from ..gguf.reader import GGUFFile
from ..quant.linear import QWeight, embedding, qmatmul
from .config import Config
from .layers import KVCache, attention, attention_mask, rms_norm, rope_cache

Tracer = Callable[[str, torch.Tensor], None]


class Transformer:
    def __init__(self, f: GGUFFile, cfg: Config, device: str = "cpu"):
        self.file, self.cfg, self.device = f, cfg, torch.device(device)
        self._weights: dict[str, QWeight] = {}
        self._vectors: dict[str, torch.Tensor] = {}
        self.tok_embd = self.weight("token_embd.weight")
        self.output = self.weight("output.weight", required=False) or self.tok_embd  # tied when absent
        self.output_norm = self.vector("output_norm.weight")
        ff = self.vector("rope_freqs.weight", required=False)
        self.freq_factors = ff
        self.numerics = False  # llama.cpp's roundings (see model.numerics); use_ggml_numerics() turns it on
        self.ubatch = 256  # tokens per forward slice (measured: as fast as 512 on SmolLM2, 20 MB less peak)
        self.faults: dict = {}  # fault injection for debugging tools (see ggtorch.debug)

    # ---- weights -------------------------------------------------------------------------------
    def weight(self, name: str, required: bool = True) -> QWeight | None:
        if name in self._weights:
            return self._weights[name]
        ti = self.file.tensors.get(name)
        if ti is None:
            if required:
                raise ModelError(f"{self.file.path}: tensor {name!r} is missing (architecture {self.cfg.arch})")
            return None
        from ..errors import QuantError

        if ti.type is None:
            raise QuantError(f"tensor {name!r} has ggml type id {ti.type_id}, unknown to this version of ggtorch")
        raw = torch.from_numpy(self.file.raw(name))
        w = QWeight(raw, ti.type, ti.shape, name)
        w.release = lambda start=0, end=None, f=self.file, n=name: f.release(n, start, end)
        if self.device.type != "cpu":
            w.to(self.device)
        self._weights[name] = w
        return w

    def vector(self, name: str, required: bool = True) -> torch.Tensor | None:
        if name in self._vectors:
            return self._vectors[name]
        ti = self.file.tensors.get(name)
        if ti is None:
            if required:
                raise ModelError(f"{self.file.path}: tensor {name!r} is missing (architecture {self.cfg.arch})")
            return None
        from ..quant.dequant import dequantize

        v = dequantize(self.file.raw(name), ti.type).to(self.device)
        self._vectors[name] = v
        return v

    def weights(self) -> dict[str, QWeight]:
        return self._weights

    # ---- running -------------------------------------------------------------------------------
    def new_cache(self, capacity: int = 256) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, capacity, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.tok_embd)

    def rope_tables(self, pos: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        cos, sin = rope_cache(pos, c.n_rot, base, c.rope_freq_scale, self.freq_factors)
        return cos[:, None], sin[:, None]  # broadcast over heads of [T, H, D]

    @torch.inference_mode()
    def forward(self, ids, cache: KVCache, start: int | None = None, all_logits: bool = False,
                trace: Tracer | None = None) -> torch.Tensor:
        """Run tokens ``ids`` at positions start.. through the model; returns logits [T, n_vocab]
        (all positions) or [1, n_vocab] (the last). The cache is extended by T tokens."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            raise ModelError("forward needs at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.n_vocab:
            raise ModelError(f"token ids must lie in 0..{self.cfg.n_vocab - 1}")
        start = cache.n if start is None else start
        T = ids.numel()
        ub = self.ubatch
        if T > ub and trace is None:  # long prompts in slices, like llama.cpp's n_ubatch: less working memory
            outs = [self.forward(ids[i:i + ub], cache, start + i, all_logits) for i in range(0, T, ub)]
            return torch.cat(outs) if all_logits else outs[-1]
        cache.reserve(start + T)
        pos = torch.arange(start, start + T, device=self.device)
        rope_pos = pos + int(self.faults.get("position_offset", 0))
        ctx = self.prepare(pos, rope_pos, start + T)
        x = self.embed(ids)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        if trace:
            trace("inp_embd", x)
        for il in range(self.cfg.n_layer):
            x = self.block(il, x, cache, start, ctx, trace)
        cache.n = start + T
        if not all_logits:
            x = x[-1:]
        x = rms_norm(x, self.output_norm, self.eps())
        if trace:
            trace("result_norm", x)
        logits = qmatmul(x, self.output)
        if trace:
            trace("result_output", logits)
        return logits

    def eps(self) -> float:
        return self.faults.get("rms_eps", self.cfg.rms_eps)

    def mask(self, pos: torch.Tensor, n_kv: int, window: int = 0) -> torch.Tensor | None:
        """Boolean [T, n_kv] or None when nothing is masked (one new token that sees the whole cache)."""
        if self.faults.get("no_causal_mask") or (pos.numel() == 1 and (window == 0 or n_kv <= window)):
            return None
        return attention_mask(pos, torch.arange(n_kv, device=self.device), window)

    def project(self, x: torch.Tensor, L: dict, names: tuple[str, ...], fused: str) -> list[torch.Tensor]:
        """x through several weights that share it (Q/K/V, gate/up): one call when fast mode fused them."""
        f = L.get(fused)
        if f is not None:
            return list(qmatmul(x, f).split(f.parts, dim=-1))
        return [qmatmul(x, L[n]) for n in names]

    def use_ggml_numerics(self) -> None:
        """Round activations, the KV cache and attention as ggml's CPU backend does (slow; for diffs)."""
        from . import numerics

        for w in self._weights.values():
            numerics.install(w)
        self.numerics = True

    def attend(self, il, q, k, v, cache, start, mask, scale):
        """Store k/v in the cache and attend; q [H, T, D], k/v [Hkv, T, D] -> [T, H*Dv]."""
        if self.numerics:
            from . import numerics

            kk, vv = cache.update(il, start, numerics.round_kv(k), numerics.round_kv(v))
            return numerics.ggml_attention(q, kk, vv, mask, scale)
        kk, vv = cache.update(il, start, k, v)
        return attention(q, kk, vv, mask, scale)

    def install_fast(self, cache: bool = True) -> str:
        """Fast kernels for every weight, and fused Q/K/V and gate/up matrices (see quant.kernels),
        read from / stored in the repack cache unless ``cache`` is False (see model.repack)."""
        from .repack import install_fast

        return install_fast(self, cache)

    def prepare(self, pos: torch.Tensor, rope_pos: torch.Tensor, n_kv: int) -> dict:
        """Per-forward tables shared by all layers (RoPE, masks)."""
        raise NotImplementedError

    def block(self, il: int, x: torch.Tensor, cache: KVCache, start: int, ctx: dict, trace) -> torch.Tensor:
        raise NotImplementedError
