"""Traces: the named intermediate tensors of one forward pass, with statistics, saved as safetensors.

Names are llama.cpp's graph names (``inp_embd``, ``attn_norm-3``, ``Qcur-3``, ``ffn_out-3``, ``l_out-3``,
``result_norm``, ``result_output``), so a trace lines up 1:1 with llama.cpp's eval callback.

Trace file format (any framework can write one for ``ggtorch diff --trace``): a safetensors file whose
tensors are float32/float16/bfloat16/float64, named as above, each shaped ``[n_tokens, ...]`` (one row
per prompt token, features last, in PyTorch/numpy row-major order, i.e. llama.cpp's ``ne`` reversed).
Optional string metadata: ``tokens`` (JSON list of token ids), ``order`` (JSON list of tensor names in
graph order), ``source`` (free text).
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import GGTorchError


class TraceFileError(GGTorchError):
    """A trace file that is not a readable safetensors file."""

# The order in which a block's tensors appear in llama.cpp's graphs; used to sort files with no "order".
BLOCK_ORDER = ["attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "attn_post_norm", "ffn_inp",
               "ffn_norm", "ffn_out", "ffn_post_norm", "l_out"]
_LAYERED = re.compile(r"^(.+)-(\d+)$")


def split_name(name: str) -> tuple[str, int | None]:
    m = _LAYERED.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def graph_key(name: str) -> tuple:
    base, il = split_name(name)
    if il is None:
        return ((0 if base == "inp_embd" else 2), 0, 0, base)
    return (1, il, BLOCK_ORDER.index(base) if base in BLOCK_ORDER else len(BLOCK_ORDER), base)


def tensor_stats(t: torch.Tensor) -> dict:
    """shape, mean, RMS, min, max, abs-max over the finite values; NaN and Inf counts."""
    x = t.detach().double().reshape(-1)
    finite = torch.isfinite(x)
    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    f = x[finite]
    if f.numel() == 0:
        mean = rms = mn = mx = amax = math.nan
    else:
        mean, rms = float(f.mean()), float(f.pow(2).mean().sqrt())
        mn, mx = float(f.min()), float(f.max())
        amax = max(abs(mn), abs(mx))
    return {"shape": list(t.shape), "mean": mean, "rms": rms, "min": mn, "max": mx, "absmax": amax,
            "nan": n_nan, "inf": n_inf}


@dataclass
class Trace:
    tokens: list[int]
    stats: dict[str, dict]  # in graph order
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # float32, CPU; empty unless kept
    source: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.stats)

    def layer_names(self, base: str) -> list[str]:
        """``l_out-0``, ``l_out-1``... present in this trace, by layer."""
        return sorted((n for n in self.stats if split_name(n)[0] == base), key=lambda n: split_name(n)[1])

    def save(self, path: str) -> None:
        if not self.tensors:
            raise ValueError("this trace kept no tensors (record with keep=True)")
        meta = {"format": "ggtorch-trace/1", "tokens": json.dumps(self.tokens),
                "order": json.dumps(list(self.tensors)), "source": self.source}
        from safetensors.torch import save_file

        tmp = path + ".part"
        try:
            save_file({n: t.contiguous() for n, t in self.tensors.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:  # Ctrl-C or a full disk: no partial file stays, under either name
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path: str) -> "Trace":
        arrays, meta = _read(path)
        order = _json_list(meta.get("order"), path, "order") or sorted(arrays, key=graph_key)
        missing = [n for n in order if n not in arrays]
        if missing:
            raise TraceFileError(f"{path}: metadata 'order' names tensors not in the file: {missing[:3]}")
        order += [n for n in sorted(arrays, key=graph_key) if n not in order]
        tensors = {n: arrays[n].float() for n in order}
        tokens = [int(t) for t in (_json_list(meta.get("tokens"), path, "tokens") or [])]
        return cls(tokens, {n: tensor_stats(t) for n, t in tensors.items()}, tensors, meta.get("source", path))


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file, through the safetensors package."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            return {n: fh.get_tensor(n) for n in fh.keys()}, dict(meta)
    except Exception as e:  # the package's SafetensorError, or an I/O error
        if isinstance(e, FileNotFoundError):
            raise TraceFileError(f"{path}: no such trace file") from None
        raise TraceFileError(f"{path}: not a readable safetensors file ({e})") from None


def _json_list(s, path, key):
    if s is None:
        return None
    try:
        v = json.loads(s)
    except json.JSONDecodeError:
        v = None
    if not isinstance(v, list):
        raise TraceFileError(f"{path}: metadata {key!r} must be a JSON list")
    return v


@contextmanager
def injected(net, **kw):
    """Temporarily inject runtime faults into a model (see ``Transformer.faults``)."""
    old = dict(net.faults)
    net.faults.update(kw)
    try:
        yield net
    finally:
        net.faults.clear()
        net.faults.update(old)


def record(net, ids, keep: bool = True, source: str = "") -> Trace:
    """Run ``ids`` (positions 0..) through ``net`` and record every named intermediate tensor."""
    ids = [int(i) for i in ids]
    stats, tensors = {}, {}

    def tracer(name, t):
        t = t.detach().float().cpu()
        stats[name] = tensor_stats(t)
        if keep:
            tensors[name] = t.contiguous().clone()

    net.forward(ids, net.new_cache(len(ids)), start=0, all_logits=True, trace=tracer)
    return Trace(ids, stats, tensors, source)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def format_table(tr: Trace) -> str:
    """One block per layer, one line per tensor, like llm.c's check_tensor reports."""
    cols = ["tensor", "shape", "mean", "rms", "min", "max", "absmax", "nan", "inf"]
    rows, last_group = [], object()
    for n, s in tr.stats.items():
        _, il = split_name(n)
        group = "input" if n == "inp_embd" else ("output" if il is None else f"layer {il}")
        if group != last_group:
            rows.append([f"-- {group}"])
            last_group = group
        rows.append([n, "x".join(map(str, s["shape"]))] + [_fmt(s[k]) for k in cols[2:]])
    w = [max(len(r[i]) for r in rows if len(r) > 1) for i in range(len(cols))]
    w = [max(a, len(c)) for a, c in zip(w, cols)]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r))
    out = [line(cols)]
    out += [r[0] if len(r) == 1 else line(r) for r in rows]
    return "\n".join(out)
