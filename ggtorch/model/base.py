"""What every architecture shares: weights looked up by GGUF name, the KV cache, the outer forward.

An architecture subclasses :class:`Transformer` and writes ``block`` (one layer, ~40 lines), mirroring
that architecture's graph in llama.cpp's llama-model.cpp. Intermediate tensors are reported to an
optional tracer under llama.cpp's names (``attn_norm-3``, ``Qcur-3``, ``ffn_out-3``, ``l_out-3``...).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ContextError, ModelError
from ..gguf.reader import GGUFFile
from ..quant.dequant import dequantize, dequantize_blocks
from ..quant import jit
from ..quant.linear import QWeight, embedding, qmatmul
from . import cuda_graph, decode, fastpath
from .config import Config
from .layers import (BatchView, KVCache, SlotView, attention, attention_ext, attention_mask, rms_norm, rope,
                     rope_cache, rope_cache_yarn, softcap)

Tracer = Callable[[str, torch.Tensor], None]
ROPE_TABLE_MAX = 1 << 15  # positions kept in rope_tables' tables (n_rot/2 x 2 floats each: 16 MB at n_rot 128)


class Transformer:
    def __init__(self, f: GGUFFile, cfg: Config, device: str = "cpu"):
        self.file, self.cfg, self.device = f, cfg, torch.device(device)
        self._weights: dict[str, QWeight] = {}
        self._vectors: dict[str, torch.Tensor] = {}
        self.tok_embd = self.weight("token_embd.weight")
        self.output = self.weight("output.weight", required=False) or self.tok_embd  # tied when absent
        # embedding rows are read from the file with pread while the table is the file's, on CPU
        # (GGUFFile.rows: a lookup then leaves nothing resident)
        self._embd_file_ptr = self.tok_embd.raw.data_ptr() if hasattr(f, "rows") and self.device.type == "cpu" else None
        self.output_norm = self.vector("output_norm.weight")
        ff = self.vector("rope_freqs.weight", required=False)
        self.freq_factors = ff
        self.numerics = False  # llama.cpp's roundings (see model.numerics); use_ggml_numerics() turns it on
        self.ubatch = 256  # tokens per forward slice (measured: as fast as 512 on SmolLM2, 20 MB less peak)
        self.faults: dict = {}  # fault injection for debugging tools (see ggtorch.debug)
        self._rope_memo: dict = {}  # (base, yarn) -> cos/sin tables by position (rope_tables)
        self.force_mask = False  # mask() never answers None (the CUDA-graph step attends over stale rows too)
        self.kv_dtype = torch.float32  # the KV cache's storage type (the API sets it: f16 like llama.cpp)

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
        # a copy read from the file, not the mapping (GGUFFile.copy: no read-ahead window made resident)
        v = dequantize(self.file.copy(name), ti.type).to(self.device)
        self._vectors[name] = v
        return v

    def weights(self) -> dict[str, QWeight]:
        return self._weights

    # ---- running -------------------------------------------------------------------------------
    def new_cache(self, capacity: int = 256, dtype=None) -> KVCache:
        """A one-sequence cache (slot 0) that grows as needed."""
        c = self.cfg
        return KVCache(c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, capacity, self.device,
                       dtype or self.kv_dtype)

    def new_pool(self, n_slots: int, n_ctx: int, dtype=None, capacity: int = 256) -> KVCache:
        """A pool of ``n_slots`` sequences of at most ``n_ctx`` tokens each (memory grows lazily)."""
        c = self.cfg
        return KVCache(c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, capacity, self.device,
                       dtype or self.kv_dtype, n_slots=n_slots, n_ctx=n_ctx)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.tok_embd
        if self._embd_file_ptr is not None and w.dense is None and w.raw.data_ptr() == self._embd_file_ptr:
            x = None
            if w.type.id in jit.ROW_TYPES and hasattr(self.file, "row_source"):  # read and dequantized in C
                fd, off = self.file.row_source("token_embd.weight")
                x = jit.embed_rows(w.type.id, fd, off, w.row_bytes, w.out_features, ids, w.in_features)
            if x is None:
                raw = torch.from_numpy(self.file.rows("token_embd.weight", ids.reshape(-1).numpy(), w.row_bytes))
                x = dequantize_blocks(raw, w.type).reshape(-1, w.in_features)
        else:
            x = embedding(ids, w)
        if getattr(self, "lora_embd", None):  # a LoRA adapter on token_embd (ggtorch.lora.apply)
            from ..lora.apply import embed_delta

            x = embed_delta(self, ids, x)
        return x

    def rope_tables(self, pos: torch.Tensor, base: float, yarn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, 1, n_rot/2] for ggml_rope_ext with the file's scaling (linear or YaRN);
        ``yarn=False``: unscaled (olmo2's sliding-window layers).

        On CPU, rows of a table made once for positions 0..n-1 (n doubling up to ROPE_TABLE_MAX as the
        positions grow): the formulas are elementwise, so a row equals the same position computed alone,
        and a decode step no longer spends ~50 us of small PyTorch operations recomputing it."""
        if self.device.type == "cpu" and pos.numel():
            hi = int(pos) if pos.numel() == 1 else int(pos.max())
            if 0 <= hi < ROPE_TABLE_MAX and (pos.numel() == 1 or int(pos.min()) >= 0):
                key = (base, yarn)
                tab = self._rope_memo.get(key)
                if tab is None or tab[0].shape[0] <= hi:
                    n = min(ROPE_TABLE_MAX, max(256, 1 << hi.bit_length()))
                    cos, sin = self._rope_compute(torch.arange(n, device=self.device), base, yarn)
                    tab = self._rope_memo[key] = (cos, sin)
                return tab[0][pos], tab[1][pos]
        return self._rope_compute(pos, base, yarn)

    def _rope_compute(self, pos: torch.Tensor, base: float, yarn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        if c.yarn_ext_factor and yarn:
            cos, sin = rope_cache_yarn(pos, c.n_rot, base, c.rope_freq_scale, c.yarn_ext_factor,
                                       c.yarn_attn_factor, c.yarn_beta_fast, c.yarn_beta_slow, c.n_ctx_orig,
                                       self.freq_factors)
        else:
            cos, sin = rope_cache(pos, c.n_rot, base, c.rope_freq_scale if yarn else 1.0, self.freq_factors)
            if c.yarn_attn_factor != 1.0 and yarn:
                cos, sin = cos * c.yarn_attn_factor, sin * c.yarn_attn_factor
        return cos[:, None], sin[:, None]  # broadcast over heads of [T, H, D]

    def _check_ids(self, ids) -> torch.Tensor:
        if type(ids) is list and len(ids) <= 16 and all(type(i) is int for i in ids):  # a decode step's few
            if ids and not all(0 <= i < self.cfg.n_vocab for i in ids):  # ids: checked without tensor ops
                raise ModelError(f"token ids must lie in 0..{self.cfg.n_vocab - 1}")
            if ids:
                return torch.tensor(ids, dtype=torch.long, device=self.device)
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            raise ModelError("forward needs at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.n_vocab:
            raise ModelError(f"token ids must lie in 0..{self.cfg.n_vocab - 1}")
        return ids

    @staticmethod
    def _check_room(cache: KVCache, slot: int, end: int) -> None:
        if cache.n_ctx is not None and end > cache.n_ctx:
            raise ContextError(f"{end} tokens do not fit the context of {cache.n_ctx} (slot {slot})")

    @torch.inference_mode()
    def forward(self, ids, cache: KVCache, start: int | None = None, all_logits: bool = False,
                trace: Tracer | None = None, slot: int = 0) -> torch.Tensor:
        """Run tokens ``ids`` at positions start.. (default: the slot's length) of sequence ``slot``;
        returns logits [T, n_vocab] (all positions) or [1, n_vocab] (the last). The slot now holds
        start + T tokens."""
        if trace is None and (type(ids) is list and len(ids) == 1 and type(ids[0]) is int
                              or isinstance(ids, torch.Tensor) and ids.numel() == 1 and not ids.is_floating_point()):
            one = decode.one_token(self, cache)  # a decode step in one foreign call where it applies
            if one is not None:
                tok = ids[0] if type(ids) is list else int(ids)
                if not 0 <= tok < self.cfg.n_vocab:
                    raise ModelError(f"token ids must lie in 0..{self.cfg.n_vocab - 1}")
                start = cache.lens[slot] if start is None else start
                self._check_room(cache, slot, start + 1)
                cache.reserve(start + 1)
                out = one(self, tok, cache, slot, start)
                if out is not None:
                    cache.lens[slot] = start + 1
                    return out
        ids = self._check_ids(ids)
        start = cache.lens[slot] if start is None else start
        T = ids.numel()
        self._check_room(cache, slot, start + T)
        ub = self.ubatch
        if T > ub and trace is None:  # long prompts in slices, like llama.cpp's n_ubatch: less working memory
            outs = [self.forward(ids[i:i + ub], cache, start + i, all_logits, slot=slot) for i in range(0, T, ub)]
            return torch.cat(outs) if all_logits else outs[-1]
        if T == 1 and trace is None and cuda_graph.usable(self, cache):  # a decode step on CUDA: one graph
            try:
                return cuda_graph.decode(self, cache, ids, [slot], [start])
            except cuda_graph.Fallback:
                pass
        cache.reserve(start + T)
        pos = torch.arange(start, start + T, device=self.device)
        x = self._run(ids, pos, start + T, SlotView(cache, slot), start, trace)
        cache.lens[slot] = start + T
        return self._head(x if all_logits else x[-1:], trace)

    @torch.inference_mode()
    def forward_batch(self, tokens, slots, cache: KVCache, rows: list[int] | None = None) -> torch.Tensor:
        """One step over several sequences: token i goes to slot ``slots[i]`` at that slot's next
        position. A slot may appear several times (a prompt chunk riding along with other sequences'
        decode tokens, as llama.cpp's server mixes them in one batch): its tokens take consecutive
        positions in the order given. Per-token RoPE positions and causal masks; attention reads only
        the token's own slot. Returns logits [len(rows), n_vocab] for the token indices ``rows``
        (default: every token); each slot grows by its number of tokens."""
        ids = self._check_ids(tokens)
        slots = [int(s) for s in slots]
        if len(slots) != ids.numel():
            raise ModelError(f"forward_batch got {ids.numel()} tokens for {len(slots)} slots")
        if any(not 0 <= s < cache.n_slots for s in slots):
            raise ModelError(f"forward_batch: slots must lie in 0..{cache.n_slots - 1}, got {slots}")
        if rows is not None and any(not 0 <= r < len(slots) for r in rows):
            raise ModelError(f"forward_batch: rows must lie in 0..{len(slots) - 1}, got {rows}")
        seen: dict[int, int] = {}
        lens = []
        for s in slots:
            lens.append(cache.lens[s] + seen.get(s, 0))
            seen[s] = seen.get(s, 0) + 1
        for s, k in seen.items():
            self._check_room(cache, s, cache.lens[s] + k)
        if self.numerics or len(seen) == 1:  # one sequence: the single-sequence path (no gather, no padding
            # mask; 10% less time per step for a server's lone request); the ggml-numerics attention is
            # single-sequence anyway
            want = list(range(len(slots))) if rows is None else list(rows)
            got, i = {}, 0
            while i < len(slots):  # runs of one slot's consecutive tokens
                j = i
                while j < len(slots) and slots[j] == slots[i]:
                    j += 1
                need = [r for r in want if i <= r < j]
                every = need != [j - 1] and bool(need)  # the last token's logits alone need no all_logits
                lg = self.forward(ids[i:j], cache, slot=slots[i], all_logits=every)
                for r in need:
                    got[r] = lg[r - i:r - i + 1] if every else lg
                i = j
            return torch.cat([got[r] for r in want]) if want else torch.empty(0, self.cfg.n_vocab)
        if len(seen) == len(slots) and cuda_graph.usable(self, cache):  # one token per sequence on CUDA
            try:
                out = cuda_graph.decode(self, cache, ids, slots, lens)
                return out if rows is None else out[rows]
            except cuda_graph.Fallback:
                pass
        end = max(lens) + 1
        cache.reserve(end)
        pos = torch.tensor(lens, dtype=torch.long, device=self.device)
        x = self._run(ids, pos, end, BatchView(cache, slots, pos), pos, None)
        for s, k in seen.items():
            cache.lens[s] += k
        if rows is not None and getattr(self, "lora_rows", None) is not None:
            self.lora_rows.slots = self.lora_rows.slots[rows]
        return self._head(x if rows is None else x[rows], None)

    def _run(self, ids, pos, n_kv, cache, start, trace) -> torch.Tensor:
        """Embeddings through every block: ``pos`` [T] are the tokens' positions, ``cache`` the view
        the blocks write to (one slot, or one slot per token)."""
        self._lora_slots(cache, ids.numel())  # before the embeddings: an adapter may act on token_embd
        return self.run_layers(self.inputs(ids, trace), pos, n_kv, cache, start, trace)

    def _lora_slots(self, cache, T: int) -> None:
        """Each row's sequence, for per-sequence LoRA scales (ggtorch.lora.apply.SlotScales)."""
        if getattr(self, "lora_rows", None) is not None:
            self.lora_rows.slots = cache.idx if isinstance(cache, BatchView) else torch.full(
                (T,), cache.slot, dtype=torch.long, device=self.device)

    def inputs(self, ids: torch.Tensor, trace: Tracer | None = None) -> torch.Tensor:
        """The tokens' embeddings [T, n_embd], scaled as the architecture asks (the first block's input)."""
        x = self.embed(ids)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        if trace:
            trace("inp_embd", x)
        return x

    def run_layers(self, x, pos, n_kv, cache, start, trace=None) -> torch.Tensor:
        """Hidden states x [T, n_embd] through every block of this model (a pipeline stage's model
        holds a range of the file's layers: ggtorch.dist.pipeline)."""
        rope_pos = pos + int(self.faults.get("position_offset", 0))
        ctx = self.prepare(pos, rope_pos, n_kv)
        # a batched step, or a few tokens of one sequence: the JIT library's attention (model/fastpath.py)
        T = x.shape[0]
        ctx["rows"] = fastpath.rows(cache, start, T) if fastpath.usable(self, T, cache, trace) else None
        self._lora_slots(cache, T)
        if ctx["rows"] is not None:  # every layer in one call where the architecture allows (model/fastpath.py)
            step = fastpath.step_of(self)
            if step is not None:
                return step.run(x, cache, ctx["rows"], self.step_tables(ctx), getattr(self, "lora_rows", None))
        for il in range(self.cfg.n_layer):
            x = self.block(il, x, cache, start, ctx, trace)
        return x

    def _head(self, x, trace) -> torch.Tensor:
        x = rms_norm(x, self.output_norm, self.eps())
        if trace:
            trace("result_norm", x)
        logits = self.head(x)
        if trace:
            trace("result_output", logits)
        return logits

    # ---- context shift ---------------------------------------------------------------------------
    @torch.inference_mode()
    def shift_context(self, cache: KVCache, n_keep: int, n_discard: int, slot: int = 0) -> None:
        """Drop tokens n_keep .. n_keep+n_discard-1 of ``slot`` and move the rest down by n_discard,
        re-rotating the moved keys to their new positions (llama.cpp's context shift:
        llama_memory_seq_rm, then seq_add by -n_discard, applied as the K-shift of
        llama_kv_cache::build_graph_shift). RoPE is a rotation, so rotating by -n_discard is exact."""
        n = cache.lens[slot]
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= n):
            raise ModelError(f"context shift: cannot keep {n_keep} and drop {n_discard} of {n} tokens")
        m = n - n_keep - n_discard
        cache.move(slot, n_keep + n_discard, n_keep, m)
        delta = torch.tensor([-n_discard], device=self.device)
        for il in range(self.cfg.n_layer):
            k = cache.k[il][slot, :, n_keep:n_keep + m]
            cache.k[il][slot, :, n_keep:n_keep + m] = self.rope_shift(il, k.float(), delta).to(k.dtype)
        cache.lens[slot] = n_keep + m

    def rope_base(self, il: int) -> float | None:
        """Layer il's RoPE base: rope.freq_base_swa on sliding-window layers (gemma3, gpt-oss, olmo2),
        None where the layer has no RoPE (smollm3's every 4th layer, granite without RoPE)."""
        c = self.cfg
        if not c.has_rope(il):
            return None
        return c.rope_base_local if c.is_swa(il) else c.rope_base

    def rope_yarn(self, il: int) -> bool:
        """Whether layer il's RoPE takes the file's YaRN/linear scaling (olmo2's local layers do not)."""
        return True

    def rope_shift(self, il: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Keys k [n_kv, T, D] of layer il rotated by ``delta`` positions with the layer's own RoPE:
        base, layout (normal/neox), frequency scale and factors, YaRN's per-dimension frequencies
        (build_rope_shift). YaRN's attention factor scales cos and sin, and the stored keys already
        carry it: a shift divides it out, so it is a pure rotation."""
        base = self.rope_base(il)
        if base is None:
            return k
        cos, sin = self.rope_tables(delta, base, self.rope_yarn(il))  # [1, 1, n_rot/2]
        mag = torch.hypot(cos[:, 0], sin[:, 0])
        return rope(k, cos[:, 0] / mag, sin[:, 0] / mag, self.cfg.rope_type == "neox")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection of the normed hidden state, with the architectures' final scalings:
        granite divides by logit_scale, gemma2 soft-caps (cap * tanh(logits / cap))."""
        logits = qmatmul(x, self.output)
        c = self.cfg
        if c.logit_scale:
            logits = logits * (1.0 / c.logit_scale)
        if c.final_softcap:
            logits = softcap(logits, c.final_softcap)
        return logits

    def attn_post(self, il: int, att, res, L: dict, eps: float, trace):
        """Attention output -> attn_output product, post_attention_norm, + the residual ``res`` (the
        sandwich norms of gemma2, gemma3 and olmo2's post-norm blocks: build_norm after the output)."""
        cur = qmatmul(att, L["attn_output"])
        if trace:
            trace(f"attn_out-{il}", cur)
        return self._post_norm(il, cur, res, L["post_attention_norm"], ("attn_post_norm", "ffn_inp"), eps, trace)

    def ffn_post(self, il: int, cur, res, L: dict, eps: float, trace):
        """The FFN's output -> post_ffw_norm, + the residual ``res``: the layer's output (as attn_post)."""
        if trace:
            trace(f"ffn_out-{il}", cur)
        return self._post_norm(il, cur, res, L["post_ffw_norm"], ("ffn_post_norm", "l_out"), eps, trace)

    @staticmethod
    def _post_norm(il: int, cur, res, w, names: tuple[str, str], eps: float, trace):
        cur = rms_norm(cur, w, eps)
        if trace:
            trace(f"{names[0]}-{il}", cur)
        out = cur + res
        if trace:
            trace(f"{names[1]}-{il}", out)
        return out

    def eps(self) -> float:
        return self.faults.get("rms_eps", self.cfg.rms_eps)

    def mask(self, pos: torch.Tensor, n_kv: int, window: int = 0) -> torch.Tensor | None:
        """Boolean [T, n_kv] or None when nothing is masked (one new token that sees the whole cache)."""
        if self.faults.get("no_causal_mask") or (pos.numel() == 1 and (window == 0 or n_kv <= window)
                                                 and not self.force_mask):
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

    def attend(self, il, q, k, v, cache, start, mask, scale, softcap: float = 0.0, sinks=None):
        """Store k/v in the cache and attend; q [H, T, D], k/v [Hkv, T, D] -> [T, H*Dv].
        ``softcap``: gemma2's tanh cap on the scores; ``sinks`` [H]: gpt-oss's attention sinks."""
        if self.numerics:
            from . import numerics

            kk, vv = cache.update(il, start, numerics.round_kv(k), numerics.round_kv(v))
            if softcap or sinks is not None:  # F16 K/V as ggml has them; the products in float32
                return attention_ext(q.half().float(), kk, vv, mask, scale, softcap, sinks)
            return numerics.ggml_attention(q, kk, vv, mask, scale)
        kk, vv = cache.update(il, start, k, v)
        if softcap or sinks is not None:
            return attention_ext(q, kk, vv, mask, scale, softcap, sinks)
        return attention(q, kk, vv, mask, scale)

    def install_fast(self, cache: bool = True) -> str:
        """Fast kernels for every weight, and fused Q/K/V and gate/up matrices (see quant.kernels),
        read from / stored in the repack cache unless ``cache`` is False (see model.repack)."""
        from .repack import install_fast

        self.reset_steps()
        return install_fast(self, cache)

    def reset_steps(self) -> None:
        """Forget the one-call step and the layers' routed experts (fastpath.step_of, expert_ffn): they are
        built again, from the weights and adapters as they are then, on the next forward."""
        self._step = None
        self._experts = None

    def step_spec(self) -> tuple[list[dict], str] | None:
        """This model's layers for fastpath.Step (one call per decode step), or None: the architecture
        or these weights need the per-operation path."""
        return None

    def step_rope(self) -> tuple:
        """The (base, yarn) keys of rope_tables() behind step_tables()'s (global, local) pairs, None for a
        pair the step does not take: model/decode.py reads the same rows by position."""
        return (self.cfg.rope_base, True), None

    def step_tables(self, ctx: dict) -> tuple:
        """(cos, sin, local cos, local sin) from prepare()'s ctx for fastpath.Step."""
        return ctx["cos"], ctx["sin"], None, None

    def prepare(self, pos: torch.Tensor, rope_pos: torch.Tensor, n_kv: int) -> dict:
        """Per-forward tables shared by all layers (RoPE, masks)."""
        raise NotImplementedError

    def block(self, il: int, x: torch.Tensor, cache: KVCache, start: int, ctx: dict, trace) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared by the architectures (issue 12) -------------------------------------------------
    def load_qkv(self, L: dict, p: str, n_q: int, n_k: int, n_v: int, required: bool = True) -> None:
        """llama_model_base::create_tensor_qkv: a fused ``attn_qkv`` (rows [Q; K; V], optional fused
        bias or separate Q/K/V biases), or separate ``attn_q/k/v`` with optional biases."""
        qkv = self.weight(p + "attn_qkv.weight", required=False)
        if qkv is not None:
            if qkv.out_features != n_q + n_k + n_v:
                raise ModelError(f"{p}attn_qkv.weight has {qkv.out_features} rows; expected {n_q} + {n_k} + {n_v}")
            qkv.parts = [n_q, n_k, n_v]  # project() splits the product like the fused fast-mode matrices
            L["attn_qkv"] = qkv
            b = self.vector(p + "attn_qkv.bias", required=False)
            if b is not None:
                b = tuple(b.split([n_q, n_k, n_v]))
            for i, n in enumerate(("attn_q", "attn_k", "attn_v")):
                L[n] = None
                L[n + ".bias"] = b[i] if b is not None else self.vector(p + n + ".bias", required=False)
            return
        for n in ("attn_q", "attn_k", "attn_v"):
            L[n] = self.weight(p + n + ".weight", required=required)
            L[n + ".bias"] = self.vector(p + n + ".bias", required=False)

    def qkv(self, L: dict, x: torch.Tensor, hd_q: int | None = None, reshape: bool = True):
        """llm_graph_context::build_qkv: Q, K, V [T, heads, head_dim] (or [T, width] with reshape=False)."""
        c, T = self.cfg, x.shape[0]
        q, k, v = self.project(x, L, ("attn_q", "attn_k", "attn_v"), "attn_qkv")
        if L.get("attn_q.bias") is not None:
            q = q + L["attn_q.bias"]
        if L.get("attn_k.bias") is not None:
            k = k + L["attn_k.bias"]
        if L.get("attn_v.bias") is not None:
            v = v + L["attn_v.bias"]
        if not reshape:
            return q, k, v
        hd = hd_q or c.head_dim
        return (q.reshape(T, c.n_head, hd), k.reshape(T, c.n_head_kv, hd),
                v.reshape(T, c.n_head_kv, c.head_dim_v if hd_q is None else hd))

    def qkv_neox(self, il: int, L: dict, x: torch.Tensor, cos, sin, trace, eps: float | None = None,
                 hd_q: int | None = None):
        """Q, K, V of x with NEOX RoPE on Q and K (after their per-head norms where eps is given: gemma3),
        traced under llama.cpp's names Qcur-N, Kcur-N, Vcur-N (gemma2, gemma3, gpt-oss, phi3)."""
        q, k, v = self.qkv(L, x, hd_q=hd_q)
        if eps is not None:
            q, k = rms_norm(q, L["attn_q_norm"], eps), rms_norm(k, L["attn_k_norm"], eps)
        q, k = rope(q, cos, sin, True), rope(k, cos, sin, True)
        if trace:
            trace(f"Qcur-{il}", q)
            trace(f"Kcur-{il}", k)
            trace(f"Vcur-{il}", v)
        return q, k, v
