"""Train a LoRA adapter on a GGUF model whose weights stay frozen and quantized (``ggtorch finetune``).

The base runs on the exact path: each product dequantizes its GGUF blocks on the fly, and its backward
(quant.linear.QProduct) dequantizes them again instead of keeping a float copy. Only the adapter's A and
B are parameters (AdamW). A is initialised as PEFT does (uniform in +-1/sqrt(in)), B as zeros, so step 0
is the base model; the scale is alpha / rank. Data: JSONL, one example a line: ``{"messages": [...]}``
(chat: rendered through the model's template, the loss on the assistant turns' tokens), ``{"prompt",
"completion"}`` (loss on the completion) or ``{"text"}`` (loss on every token). Output: llama.cpp's
adapter GGUF, and PEFT's directory format with ``peft_dir``.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import LoRAError
from .adapter import HF_GLOBAL, HF_TO_GGUF, PERMUTE_QK, Adapter

DEFAULT_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GGUF_TO_HF = {v: k for k, v in HF_TO_GGUF.items() if k != "mlp.gate_up_proj"}


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[i]: token i is predicted (counts in the loss)


@dataclass
class TrainResult:
    adapter: Adapter
    train_loss: list[float] = field(default_factory=list)  # per optimizer step
    val_loss: list[float] = field(default_factory=list)  # before training, after each epoch and at a max_steps stop
    tokens_per_s: float = 0.0
    steps: int = 0
    peak_rss_mb: float = 0.0


# ---- data ------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise LoRAError(f"{path}:{n}: not JSON ({e.msg})") from None
    except OSError as e:
        raise LoRAError(f"cannot read {path}: {e.strerror}") from None
    if not rows:
        raise LoRAError(f"{path}: no examples")
    return rows


def encode(model, row: dict, chat: bool | None, ctx: int) -> Example:
    """Token ids and loss mask of one example, cut to ``ctx`` tokens."""
    if not isinstance(row, dict):
        raise LoRAError(f"each line must be a JSON object, got {type(row).__name__}")
    if "messages" in row and chat is not False:
        msgs = row["messages"]
        ids = model.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True)
        mask = [False] * len(ids)
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            lo = len(model.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=True))
            hi = len(model.apply_chat_template(msgs[:i + 1], add_generation_prompt=False, tokenize=True))
            for j in range(lo, min(hi, len(ids))):
                mask[j] = True
    elif "prompt" in row and "completion" in row:
        p = model.tokenize(str(row["prompt"]), special=True, bos=model.tokenizer.add_bos)
        c = model.tokenize(str(row["completion"]), special=True, bos=False)
        eos = model.tokenizer.eos_id
        ids = p + c + ([eos] if eos is not None else [])
        mask = [False] * len(p) + [True] * (len(ids) - len(p))
    elif "text" in row:
        ids = model.tokenize(str(row["text"]), special=True, bos=model.tokenizer.add_bos)
        mask = [True] * len(ids)
    else:
        raise LoRAError(f"an example needs 'messages', 'prompt'+'completion' or 'text'; got keys {sorted(row)}")
    return Example(ids[:ctx], mask[:ctx])


# ---- the adapter being trained -----------------------------------------------------------------------
def new_adapter(net, targets, rank: int, alpha: float, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for il, L in enumerate(net.layers):
        for t in targets:
            w = L.get(t)
            if w is None:
                raise LoRAError(f"--targets: layer {il} has no {t!r} (this architecture: {net.cfg.arch})")
            bound = 1.0 / math.sqrt(w.in_features)
            a = (torch.rand(rank, w.in_features, generator=g) * 2 - 1) * bound
            b = torch.zeros(w.out_features, rank)
            pairs[f"blk.{il}.{t}.weight"] = (torch.nn.Parameter(a), torch.nn.Parameter(b))
    return Adapter("(training)", net.cfg.arch, float(alpha), pairs)


def forward_packed(net, seqs: list[list[int]]) -> torch.Tensor:
    """Logits [sum of lengths, n_vocab] of several sequences in one forward (so each frozen weight is
    dequantized once per batch, not once per example): the tokens are packed into one row with RoPE
    positions restarting at each sequence and a block-diagonal causal mask (the model's ``mask``
    shadowed for the call); autograd on, a fresh float32 cache."""
    from ..model.layers import SlotView

    dev = net.device
    x = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=dev)
    pos = torch.cat([torch.arange(len(s), device=dev) for s in seqs])
    seg = torch.cat([torch.full((len(s),), i, device=dev) for i, s in enumerate(seqs)])
    T = x.numel()

    def mask(p, n_kv, window=0):
        ok = (seg[None, :] == seg[:, None]) & (pos[None, :] <= pos[:, None])
        if window > 0:
            ok &= (pos[:, None] - pos[None, :]) < window
        return ok

    cache = net.new_cache(T, dtype=torch.float32)
    cache.reserve(T)
    # lora_training keeps the forward off the JIT attention (fastpath.usable), which would attend over
    # the whole packed row and ignore the block-diagonal mask: set for every caller (evaluate() outside
    # finetune too), not only inside the training loop
    was = getattr(net, "lora_training", False)
    net.mask, net.lora_training = mask, True
    try:
        h = net._run(x, pos, T, SlotView(cache, 0), 0, None)
        return net._head(h, None)
    finally:
        del net.mask
        net.lora_training = was


def batch_loss(net, exs: list[Example]) -> tuple[torch.Tensor, int]:
    """(sum of the masked next-token losses over the examples, their count)."""
    lg = forward_packed(net, [e.ids[:-1] for e in exs])
    tgt = torch.tensor([t for e in exs for t in e.ids[1:]], dtype=torch.long, device=lg.device)
    m = torch.tensor([k for e in exs for k in e.mask[1:]], dtype=torch.bool, device=lg.device)
    n = int(m.sum())
    if n == 0:
        return lg.sum() * 0.0, 0
    return torch.nn.functional.cross_entropy(lg[m].float(), tgt[m], reduction="sum"), n


def evaluate(net, data: list[Example]) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), 8):
            l, k = batch_loss(net, data[i:i + 8])
            tot, n = tot + float(l), n + k
    return tot / max(n, 1)


# ---- output -----------------------------------------------------------------------------------------
def save_gguf(ad: Adapter, path: str, name: str = "ggtorch-lora") -> None:
    """llama.cpp's adapter GGUF (what convert_lora_to_gguf.py writes): F32 lora_a [r, in], lora_b [out, r]."""
    from ..gguf.writer import GGUFWriter
    from ..gguf.constants import ValueType

    w = GGUFWriter()
    w.add("general.architecture", ad.arch)
    w.add("general.type", "adapter")
    w.add("general.name", name)
    w.add("adapter.type", "lora")
    w.add("adapter.lora.alpha", float(ad.alpha), ValueType.FLOAT32)
    for n, (a, b) in ad.pairs.items():
        w.add_tensor(n + ".lora_a", a.detach().float().contiguous().numpy())
        w.add_tensor(n + ".lora_b", b.detach().float().contiguous().numpy())
    w.write(path)


def save_peft(ad: Adapter, cfg, path: str) -> None:
    """PEFT's directory format; Q/K rows of B un-permuted back to HF's layout for llama-family files."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    inv_global = {v + ".weight": k for k, v in HF_GLOBAL.items()}
    tensors, mods = {}, set()
    for n, (a, b) in ad.pairs.items():
        a, b = a.detach().float(), b.detach().float()
        if n in inv_global:
            hf = inv_global[n]
        else:
            il, t = n.split(".")[1], n.split(".")[2]
            hf = f"model.layers.{il}.{GGUF_TO_HF[t]}"
            if cfg.arch in PERMUTE_QK and t in ("attn_q", "attn_k"):
                h = cfg.n_head if t == "attn_q" else cfg.n_head_kv
                b = b.reshape(h, b.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(b.shape)
        mods.add(hf.split(".")[-1])
        tensors[f"base_model.model.{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = b.contiguous()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    r = int(next(iter(ad.pairs.values()))[1].shape[1])
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": ad.alpha, "lora_dropout": 0.0,
            "target_modules": sorted(mods), "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
            "base_model_name_or_path": None, "inference_mode": True}
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump(conf, fh, indent=1)


def _rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # not on every platform
        return 0.0


# ---- the loop ---------------------------------------------------------------------------------------
def finetune(model, data, out: str | None = None, *, chat: bool | None = None, rank: int = 16, alpha: float = 32.0,
             targets=DEFAULT_TARGETS, epochs: int = 1, lr: float = 1e-4, batch: int = 4, ctx: int = 512,
             val: float = 0.1, seed: int = 0, peft: str | None = None, checkpoint: str | None = None,
             save_every: int = 0, resume: bool = False, max_steps: int | None = None, weight_decay: float = 0.0,
             progress: bool = True, threads: int | None = None) -> TrainResult:
    """Train a LoRA adapter on ``model`` (a .gguf path, a packaged name or a loaded ggtorch Model on the
    exact path) with ``data`` (a JSONL path or a list of example dicts). Returns a :class:`TrainResult`;
    writes ``out`` (llama.cpp adapter GGUF) and ``peft`` (PEFT directory) when given. ``checkpoint``:
    a file written every ``save_every`` steps and at the end of each epoch; ``resume`` continues from it."""
    from ..api import Model, load
    from .apply import attach

    if rank < 1 or batch < 1 or epochs < 1 or ctx < 2 or not lr > 0:
        raise LoRAError("finetune needs rank >= 1, batch >= 1, epochs >= 1, ctx >= 2 and lr > 0")
    if not 0 <= val < 1:
        raise LoRAError(f"the validation fraction must lie in [0, 1), got {val}")
    targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    bad = [t for t in targets if t not in GGUF_TO_HF]
    if bad:
        raise LoRAError(f"--targets: unknown {bad}; choose from {', '.join(GGUF_TO_HF)}")
    if threads:
        torch.set_num_threads(int(threads))
    m = model if isinstance(model, Model) else load(model, fast=False)
    if m.fast:
        raise LoRAError("finetune needs the model loaded with fast=False (the exact path has the backward pass)")
    net = m.net
    rows = read_jsonl(data) if isinstance(data, (str, os.PathLike)) else list(data)
    exs = [encode(m, r, chat, ctx) for r in rows]
    exs = [e for e in exs if len(e.ids) >= 2 and any(e.mask[1:])]
    if not exs:
        raise LoRAError("no example has a token to learn (empty texts, or no assistant turn)")
    order = list(range(len(exs)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(exs) * val)) if len(exs) > 1 else 0
    val_set = [exs[i] for i in order[:n_val]]
    train_set = [exs[i] for i in order[n_val:]]

    ad = new_adapter(net, targets, rank, alpha, seed)
    params = [p for ab in ad.pairs.values() for p in ab]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start_epoch, step, val_at = 0, 0, -1
    res = TrainResult(ad)
    if resume and checkpoint and os.path.exists(checkpoint):
        st = torch.load(checkpoint, weights_only=False)
        if sorted(st["pairs"]) != sorted(ad.pairs) or st["rank"] != rank:
            raise LoRAError(f"{checkpoint}: the checkpoint is for other targets or another rank")
        with torch.no_grad():
            for n, (a, b) in ad.pairs.items():
                a.copy_(st["pairs"][n][0])
                b.copy_(st["pairs"][n][1])
        opt.load_state_dict(st["opt"])
        start_epoch, step = st["epoch"], st["step"]
        res.train_loss, res.val_loss = st["train_loss"], st["val_loss"]
        val_at = st.get("val_at", -1)
    saved_loras = list(getattr(net, "loras", []))
    attach(net, [(ad, 1.0)])
    net.lora_training = True

    def save_ckpt(epoch):
        if checkpoint:
            tmp = checkpoint + ".tmp"
            torch.save({"pairs": {n: (a.detach(), b.detach()) for n, (a, b) in ad.pairs.items()}, "opt": opt.state_dict(),
                        "epoch": epoch, "step": step, "rank": rank, "train_loss": res.train_loss,
                        "val_loss": res.val_loss, "val_at": evaluated_at}, tmp)
            os.replace(tmp, checkpoint)

    from tqdm import tqdm

    per_epoch = math.ceil(len(train_set) / batch)
    total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
    bar = tqdm(total=total, initial=min(step, total), desc="finetune", disable=not progress or None, file=sys.stderr)
    n_tok, t_train = 0, 0.0
    evaluated_at = val_at  # the step whose adapter the last val_loss entry measured

    def validate(label):
        nonlocal evaluated_at
        if val_set and evaluated_at != step:
            res.val_loss.append(evaluate(net, val_set))
            evaluated_at = step
            if label:
                bar.write(f"{label}: validation loss {res.val_loss[-1]:.4f}", file=sys.stderr)

    try:
        if not res.val_loss:  # a resumed run has it already
            validate(None)
        for epoch in range(start_epoch, epochs):
            ep_order = list(range(len(train_set)))
            random.Random(seed * 1000003 + epoch).shuffle(ep_order)
            first = step - epoch * per_epoch if epoch == start_epoch else 0  # resumed mid-epoch
            stopped = False
            for bi in range(max(first, 0), per_epoch):
                if max_steps is not None and step >= max_steps:
                    stopped = True  # mid-epoch: the checkpoint resumes here
                    break
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                group = [train_set[i] for i in ep_order[bi * batch:(bi + 1) * batch]]
                count = sum(sum(e.mask[1:]) for e in group)
                with torch.enable_grad():
                    loss, _ = batch_loss(net, group)
                    (loss / count).backward()
                tot = loss.item()
                opt.step()
                step += 1
                dt = time.perf_counter() - t0
                t_train += dt
                n_tok += sum(len(e.ids) - 1 for e in group)
                res.train_loss.append(tot / count)
                bar.set_postfix(loss=f"{tot / count:.4f}", tok_s=f"{n_tok / max(t_train, 1e-9):.0f}", refresh=False)
                bar.update(1)
                if save_every and step % save_every == 0:
                    save_ckpt(epoch)
            if stopped:
                # the adapter handed back is this one: measure it (once), not only the last epoch's end
                validate(f"step {step}")
                save_ckpt(epoch)
                break
            validate(f"epoch {epoch + 1}")
            save_ckpt(epoch + 1)
    finally:
        bar.close()
        net.lora_training = False
        attach(net, saved_loras)
    res.steps, res.tokens_per_s, res.peak_rss_mb = step, n_tok / max(t_train, 1e-9), _rss_mb()
    final = Adapter(out or "(trained)", ad.arch, ad.alpha,
                    {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in ad.pairs.items()})
    res.adapter = final
    if out:
        save_gguf(final, out)
    if peft:
        save_peft(final, net.cfg, peft)
    return res


# ---- command line -------------------------------------------------------------------------------------
def register_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA adapter on a GGUF model (the base stays quantized and frozen)")
    p.add_argument("model", help="a .gguf path or a packaged model name")
    p.add_argument("--data", required=True, help="JSONL: {\"messages\": [...]}, {\"prompt\", \"completion\"} or {\"text\"}")
    p.add_argument("--chat", action="store_true", default=None,
                   help="render 'messages' through the model's chat template (the default when a line has them)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated GGUF weight names")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=4, help="examples per optimizer step")
    p.add_argument("--ctx", type=int, default=512, help="tokens per example (longer ones are cut)")
    p.add_argument("--val", type=float, default=0.1, help="fraction of examples held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--out", required=True, help="the adapter, llama.cpp's LoRA GGUF")
    p.add_argument("--peft", default=None, metavar="DIR", help="also write PEFT's adapter directory")


def cmd(a) -> int:
    r = finetune(a.model, a.data, a.out, chat=a.chat, rank=a.rank, alpha=a.alpha, targets=a.targets, epochs=a.epochs,
                 lr=a.lr, batch=a.batch, ctx=a.ctx, val=a.val, seed=a.seed, peft=a.peft,
                 checkpoint=a.checkpoint or a.out + ".ckpt", save_every=a.save_every, resume=a.resume,
                 max_steps=a.max_steps, threads=a.threads)
    vl = f", validation loss {r.val_loss[0]:.4f} -> {r.val_loss[-1]:.4f}" if r.val_loss else ""
    print(f"{r.steps} steps, {r.tokens_per_s:.0f} tok/s, peak RSS {r.peak_rss_mb:.0f} MiB{vl}; wrote {a.out}"
          + (f" and {a.peft}" if a.peft else ""), file=sys.stderr)
    return 0
