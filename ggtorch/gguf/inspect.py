"""`ggtorch inspect`: what is in a GGUF file, as text or one JSON object."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .reader import GGUFFile

LONG = 8  # arrays longer than this are summarized in text output


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return v


def summarize_value(v) -> str:
    if isinstance(v, (np.ndarray, list)) and len(v) > LONG:
        kind = str(v.dtype) if isinstance(v, np.ndarray) else type(v[0]).__name__ if len(v) else "?"
        head = ", ".join(repr(x.item() if hasattr(x, "item") else x) for x in list(v[:4]))
        return f"[{kind} x {len(v)}] {head}, ..."
    if isinstance(v, np.ndarray):
        return repr(v.tolist())
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


def report(f: GGUFFile) -> dict:
    tensors = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "offset": t.offset,
                "nbytes": t.nbytes, "shard": t.shard} for t in f]
    hist = Counter(t.type_name for t in f)
    return {
        "path": f.path,
        "version": f.version,
        "alignment": f.alignment,
        "architecture": f.architecture,
        "n_params": sum(t.n_elements for t in f),
        "total_bytes": sum(t.nbytes or 0 for t in f),
        "type_histogram": dict(hist.most_common()),
        "metadata": {k: _jsonable(v) for k, v in f.metadata.items()},
        "tensors": tensors,
    }


def format_text(f: GGUFFile) -> str:
    r = report(f)
    out = [f"file: {f.path}" + (f" ({len(f.shards)} shards)" if len(f.shards) > 1 else ""),
           f"GGUF v{r['version']}, alignment {r['alignment']}, architecture: {r['architecture']}",
           f"parameters: {r['n_params']:,} ({r['n_params'] / 1e6:.1f} M), tensor data: {r['total_bytes']:,} bytes"
           f" ({r['total_bytes'] / 2**20:.1f} MiB)",
           "", "metadata:"]
    width = max((len(k) for k in f.metadata), default=0)
    out += [f"  {k:<{width}} = {summarize_value(v)}" for k, v in f.metadata.items()]
    out += ["", "types: " + ", ".join(f"{k} x{v}" for k, v in r["type_histogram"].items()), "", "tensors:"]
    nw = max((len(t.name) for t in f), default=4)
    out.append(f"  {'name':<{nw}}  {'type':<10} {'shape (GGUF ne order)':<24} {'bytes':>12}")
    for t in f:
        nb = "?" if t.nbytes is None else f"{t.nbytes:,}"
        out.append(f"  {t.name:<{nw}}  {t.type_name:<10} {str(list(t.shape)):<24} {nb:>12}")
    return "\n".join(out)
