"""LoRA adapters: llama.cpp's adapter GGUF and PEFT's directory format, read into float32 pairs.

An adapter is a set of pairs (A, B) keyed by the GGUF name of the base weight they modify
(``blk.3.attn_q.weight``). For a base weight W [out, in] (PyTorch order), A is [r, in] and B is
[out, r], and the layer computes ``W x + s * B (A x)`` (llm_graph_context::build_lora_mm). The scale is
``s = user_scale * alpha / r`` with r the rank of that pair, and ``alpha = 0`` (or absent) meaning
``s = user_scale`` (llama_adapter_lora_weight::get_scale). ``token_embd.weight`` is the exception:
as in llm_build_inp_embd, its A is stored transposed, [n_vocab, r], and the term is ``A[ids] @ B.T``.

GGUF (llama_adapter_lora_init_impl): ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha`` (float32), tensors ``<base name>.lora_a`` / ``.lora_b`` in F32/F16/BF16/Q8_0;
``*_norm.weight`` tensors are skipped as llama.cpp skips them.

PEFT (``adapter_config.json`` + ``adapter_model.safetensors``): names are mapped to GGUF names as
convert_lora_to_gguf.py does (HF module name -> GGUF tensor name), and for the architectures whose
converter permutes Q/K rows for the "normal" RoPE layout (LlamaModel.permute), B's rows of q_proj
and k_proj get the same permutation; A is unchanged (a row permutation of W = B A moves only B's rows).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import LoRAError

FLOAT_ADAPTER_TYPES = ("F32", "F16", "BF16", "Q8_0")
# HF module name (inside model.layers.N.) -> GGUF tensor name (inside blk.N.), as the converters map them
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "mlp.gate_up_proj": "ffn_up"}
HF_GLOBAL = {"model.embed_tokens": "token_embd", "lm_head": "output"}
# architectures whose HF->GGUF converter permutes q_proj/k_proj rows (LlamaModel.undo_permute)
PERMUTE_QK = {"llama", "smollm3", "granite", "mistral3"}


@dataclass
class Adapter:
    """A loaded adapter: ``pairs[name] = (A, B)`` in float32, ``alpha`` (0 = no alpha/rank scaling)."""

    path: str
    arch: str | None
    alpha: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    rslora: bool = False  # PEFT's use_rslora: alpha / sqrt(r)

    def rank(self, name: str) -> int:
        return int(self.pairs[name][1].shape[1])

    def scale(self, name: str, user_scale: float = 1.0) -> float:
        """get_scale: user_scale * alpha / rank, or user_scale when alpha is 0."""
        return self.scale_for_rank(self.rank(name), user_scale)

    def scale_for_rank(self, r: int, user_scale: float = 1.0) -> float:
        """:meth:`scale` for a pair of rank r (the one formula, so per-sequence scales round alike)."""
        if not self.alpha:
            return float(user_scale)
        return float(user_scale) * self.alpha / (r ** 0.5 if self.rslora else r)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def load_adapter(path, base=None) -> Adapter:
    """An adapter from a ``.gguf`` file or a PEFT directory (``base``: the model it is for, a
    :class:`ggtorch.model.base.Transformer`, needed to map and permute PEFT's names)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        if base is None:
            raise LoRAError(f"{p}: a PEFT adapter directory needs its base model to map tensor names")
        return load_peft(p, base.cfg)
    if not os.path.exists(p):
        raise LoRAError(f"{p}: no such adapter file or directory")
    return load_gguf(p)


def load_gguf(path: str) -> Adapter:
    from ..errors import GGUFError
    from ..gguf.reader import GGUFFile
    from ..quant.dequant import dequantize

    try:
        f = GGUFFile(path)
    except GGUFError as e:
        raise LoRAError(f"{path}: not a readable GGUF adapter ({e})") from None
    try:
        md = f.metadata
        if md.get("general.type") != "adapter":
            raise LoRAError(f"{path}: general.type must be 'adapter', got {md.get('general.type')!r} "
                            "(is this a model rather than a LoRA adapter?)")
        if md.get("adapter.type") != "lora":
            raise LoRAError(f"{path}: adapter.type must be 'lora', got {md.get('adapter.type')!r}")
        alpha = float(md.get("adapter.lora.alpha", 0.0) or 0.0)
        ad = Adapter(path, md.get("general.architecture"), alpha, metadata=dict(md))
        half: dict[str, dict[str, torch.Tensor]] = {}
        for ti in f:
            n = ti.name
            if n.endswith("_norm.weight"):  # llama.cpp skips norm vectors ("TODO: add support")
                continue
            m = re.fullmatch(r"(.+)\.lora_([ab])", n)
            if m is None:
                raise LoRAError(f"{path}: tensor {n!r} has an unexpected suffix (want .lora_a / .lora_b)")
            if ti.type is None or ti.type_name not in FLOAT_ADAPTER_TYPES:
                raise LoRAError(f"{path}: tensor {n!r} has type {ti.type_name}; adapters are "
                                f"{'/'.join(FLOAT_ADAPTER_TYPES)}")
            if len(ti.shape) != 2:
                raise LoRAError(f"{path}: tensor {n!r} has shape {list(ti.shape)}; expected 2 dimensions")
            t = dequantize(f.raw(n), ti.type).reshape(ti.numpy_shape).clone()
            half.setdefault(m.group(1), {})[m.group(2)] = t
        for name, ab in half.items():
            if set(ab) != {"a", "b"}:
                raise LoRAError(f"{path}: LoRA pair for {name!r} is missing lora_{'a' if 'a' not in ab else 'b'}")
            a, b = ab["a"], ab["b"]
            if name != "token_embd.weight" and a.shape[0] != b.shape[1]:
                raise LoRAError(f"{path}: {name}.lora_a is {list(a.shape)[::-1]} and lora_b {list(b.shape)[::-1]} "
                                "(GGUF order): their ranks differ (lora_a not transposed?)")
            ad.pairs[name] = (a, b)
    finally:
        f.close()
    return ad


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute along the rows: per head, rows [0, 2, 4, ... | 1, 3, 5, ...] become interleaved
    pairs, which turns HF's half-split RoPE layout into llama.cpp's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, n_layer: int) -> str | None:
    """GGUF base-tensor name for a PEFT module name (``model.layers.3.self_attn.q_proj``), None if unknown."""
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(.+)", hf_name)
    if m is not None:
        il, mod = int(m.group(1)), m.group(2)
        if mod in HF_TO_GGUF and il < n_layer:
            return f"blk.{il}.{HF_TO_GGUF[mod]}.weight"
        return None
    return HF_GLOBAL[hf_name] + ".weight" if hf_name in HF_GLOBAL else None


def load_peft(path: str, cfg) -> Adapter:
    """PEFT's adapter directory, its names mapped and Q/K rows permuted for ``cfg`` (a model Config)."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "adapter_config.json")
    st_path = os.path.join(path, "adapter_model.safetensors")
    for need in (cfg_path, st_path):
        if not os.path.exists(need):
            raise LoRAError(f"{path}: a PEFT adapter directory needs {os.path.basename(need)}")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            lp = json.load(fh)
    except (OSError, ValueError) as e:
        raise LoRAError(f"{cfg_path}: not valid JSON ({e})") from None
    if str(lp.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{cfg_path}: peft_type must be LORA, got {lp.get('peft_type')!r}")
    if lp.get("alpha_pattern"):
        raise LoRAError(f"{cfg_path}: alpha_pattern (per-module alpha) is not supported "
                        "(llama.cpp's adapters have one alpha)")
    if "lora_alpha" not in lp:
        raise LoRAError(f"{cfg_path}: lora_alpha is missing")
    try:
        tensors = load_file(st_path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise LoRAError(f"{st_path}: not a readable safetensors file ({e})") from None
    ad = Adapter(path, cfg.arch, float(lp["lora_alpha"]), metadata=lp, rslora=bool(lp.get("use_rslora")))
    half: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight", key) \
            or re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(embedding_A|embedding_B)(?:\.[^.]+)?", key)
        if m is None:
            if key.endswith(".base_layer.weight"):
                continue
            raise LoRAError(f"{st_path}: tensor {key!r} is not a lora_A/lora_B tensor")
        mod = m.group(1)
        if mod.startswith("model.text_model."):
            mod = "model." + mod[len("model.text_model."):]
        name = gguf_name(mod, cfg.n_layer)
        if name is None:
            raise LoRAError(f"{st_path}: tensor {key!r}: module {mod!r} has no GGUF tensor for architecture {cfg.arch}")
        half.setdefault(name, {})["a" if m.group(2).endswith("A") else "b"] = t.float()
    for name, ab in half.items():
        if set(ab) != {"a", "b"}:
            raise LoRAError(f"{st_path}: LoRA pair for {name!r} is missing one of lora_A / lora_B")
        a, b = ab["a"], ab["b"]
        if name == "token_embd.weight":
            a = a.T.contiguous()  # convert_lora_to_gguf: token_embd's lora_a is stored transposed
        elif cfg.arch in PERMUTE_QK and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = cfg.n_head if name.endswith("attn_q.weight") else cfg.n_head_kv
            b = _permute_rows(b, heads).contiguous()
        ad.pairs[name] = (a, b)
    if not ad.pairs:
        raise LoRAError(f"{st_path}: no LoRA tensors")
    return ad


def check(adapter: Adapter, net) -> None:
    """The adapter fits ``net`` (llama_adapter_lora_init_impl's checks): the same architecture, every
    pair names a base tensor, and the shapes agree. One line naming the first tensor that does not."""
    arch = net.cfg.arch
    if adapter.arch and adapter.arch != arch:
        raise LoRAError(f"{adapter.path}: adapter is for architecture {adapter.arch!r}, the model is {arch!r}")
    tensors = net.file.tensors
    for name, (a, b) in adapter.pairs.items():
        ti = tensors.get(name)
        if ti is None:
            raise LoRAError(f"{adapter.path}: LoRA tensor {name!r} does not exist in the base model (wrong base model?)")
        if len(ti.shape) != 2:
            raise LoRAError(f"{adapter.path}: LoRA on {name!r} ({len(ti.shape)}-D, e.g. MoE experts) is not supported")
        n_in, n_out = ti.shape[0], ti.shape[1]
        if name == "token_embd.weight":
            ok = a.shape[0] == n_out and b.shape[0] == n_in and a.shape[1] == b.shape[1]
            want = f"lora_a [{n_out}, r], lora_b [{n_in}, r]"
        else:
            ok = a.shape[1] == n_in and b.shape[0] == n_out
            want = f"lora_a [r, {n_in}], lora_b [{n_out}, r]"
        if not ok:
            raise LoRAError(f"{adapter.path}: tensor {name!r} has lora_a {list(a.shape)}, lora_b {list(b.shape)}; "
                            f"the base weight [{n_out}, {n_in}] needs {want} (wrong base model?)")
