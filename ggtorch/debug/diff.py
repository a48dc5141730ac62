"""Differential comparison of two traces: where do the numbers first leave the reference?

For every tensor both traces hold (in side A's graph order) we report cosine similarity, relative L2
error ||a - b|| / ||b|| (side B is the reference) and max |a - b|. The first tensor whose relative L2
error exceeds the tolerance, or whose shape or NaN/Inf pattern differs, is the first divergence.
Relative L2 is the criterion rather than cosine alone because a wrong scale (say, a wrong RMS eps)
leaves the direction, and so the cosine, untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import GGTorchError
from .trace import Trace, split_name


class DiffError(GGTorchError):
    """Two traces that cannot be compared (different tokens, nothing in common)."""


@dataclass
class Row:
    name: str
    shape_a: list[int]
    shape_b: list[int]
    cosine: float
    rel_l2: float
    max_abs: float
    status: str  # ok | diverged | shape | nonfinite

    def as_dict(self) -> dict:
        f = lambda v: None if isinstance(v, float) and math.isnan(v) else v
        return {"tensor": self.name, "shape_a": self.shape_a, "shape_b": self.shape_b, "cosine": f(self.cosine),
                "rel_l2": f(self.rel_l2), "max_abs": f(self.max_abs), "status": self.status}


@dataclass
class DiffReport:
    rows: list[Row]
    tol: float
    min_cosine: float
    only_a: list[str]
    only_b: list[str]

    @property
    def first_divergence(self) -> str | None:
        return next((r.name for r in self.rows if r.status != "ok"), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def as_dict(self) -> dict:
        return {"first_divergence": self.first_divergence, "tol": self.tol, "min_cosine": self.min_cosine, "ok": self.ok,
                "tensors": [r.as_dict() for r in self.rows], "only_in_a": self.only_a, "only_in_b": self.only_b}


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(cosine, relative L2 error vs b, max abs difference) of two same-size tensors, in float64."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    d = a - b
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    rel = float(d.norm()) / nb if nb > 0 else (0.0 if float(d.norm()) == 0 else math.inf)
    return cos, rel, float(d.abs().max()) if d.numel() else 0.0


def _align(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows are tokens. A side that kept fewer tokens (llama.cpp keeps only the output rows in its last
    layer) is compared on the last rows; per-token features must have the same size."""
    if a.dim() == 0 or b.dim() == 0:
        return (a, b) if a.numel() == b.numel() else None
    n = min(a.shape[0], b.shape[0])
    a, b = a[a.shape[0] - n:].reshape(n, -1), b[b.shape[0] - n:].reshape(n, -1)
    return (a, b) if a.shape == b.shape else None


TOL, MIN_COSINE = 0.15, 0.99


def diff(a: Trace, b: Trace, tol: float = TOL, min_cosine: float = MIN_COSINE) -> DiffReport:
    """A tensor diverges when its relative L2 error exceeds ``tol`` or its cosine falls below
    ``min_cosine``. The defaults leave room for llama.cpp's 8-bit activation rounding on quantized
    models (SmolLM2 Q4_1: rel_l2 <= 0.09, cosine >= 0.996 on every tensor) and catch real bugs,
    which move a tensor by 0.3 and more."""
    if not a.tensors or not b.tensors:
        raise DiffError("both traces must keep their tensors")
    if a.tokens and b.tokens and a.tokens != b.tokens:
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))
        raise DiffError(f"the traces ran different tokens (first difference at position {n}: "
                        f"{a.tokens[n:n + 3]} vs {b.tokens[n:n + 3]})")
    common = [n for n in a.tensors if n in b.tensors]
    if not common:
        raise DiffError(f"the traces share no tensor names (A has {a.names[:3]}..., B has {b.names[:3]}...)")
    rows = []
    for n in common:
        ta, tb = a.tensors[n], b.tensors[n]
        al = _align(ta, tb)
        if al is None:
            rows.append(Row(n, list(ta.shape), list(tb.shape), math.nan, math.nan, math.nan, "shape"))
            continue
        xa, xb = al
        fa, fb = torch.isfinite(xa), torch.isfinite(xb)
        if not (fa.all() and fb.all()):
            same = torch.equal(fa, fb) and torch.equal(xa[~fa].nan_to_num(), xb[~fb].nan_to_num())
            xa, xb = xa[fa & fb], xb[fa & fb]
            cos, rel, mx = compare_tensors(xa, xb)
            good = same and rel <= tol and cos >= min_cosine
            rows.append(Row(n, list(ta.shape), list(tb.shape), cos, rel, mx, "ok" if good else "nonfinite"))
            continue
        cos, rel, mx = compare_tensors(xa, xb)
        good = rel <= tol and cos >= min_cosine
        rows.append(Row(n, list(ta.shape), list(tb.shape), cos, rel, mx, "ok" if good else "diverged"))
    only_a = [n for n in a.tensors if n not in b.tensors]
    only_b = [n for n in b.tensors if n not in a.tensors]
    return DiffReport(rows, tol, min_cosine, only_a, only_b)


def format_report(r: DiffReport, label_a: str = "A", label_b: str = "B") -> str:
    w = max(len(x.name) for x in r.rows)
    out = [f"{'tensor'.ljust(w)}  {'cosine':>10}  {'rel_l2':>10}  {'max_abs':>10}  status"]
    for x in r.rows:
        f = lambda v: "-" if math.isnan(v) else f"{v:.6f}" if abs(v) < 1e4 else f"{v:.3e}"
        mark = "" if x.status == "ok" else ("  <-- first divergence" if x.name == r.first_divergence else "")
        out.append(f"{x.name.ljust(w)}  {f(x.cosine):>10}  {f(x.rel_l2):>10}  {f(x.max_abs):>10}  {x.status}{mark}")
    if r.only_a or r.only_b:
        out.append(f"not compared: {len(r.only_a)} tensors only in {label_a}, {len(r.only_b)} only in {label_b}")
    worst = max(r.rows, key=lambda x: -1 if math.isnan(x.rel_l2) else x.rel_l2)
    out.append(f"first divergence: {r.first_divergence or 'none'} (tolerance rel_l2 <= {r.tol:g}, "
               f"cosine >= {r.min_cosine:g}; "
               f"largest rel_l2 {worst.rel_l2:.4g} at {worst.name})")
    return "\n".join(out)


def layer_errors(r: DiffReport, base: str = "l_out") -> list[tuple[int, float, float]]:
    """(layer, rel_l2, cosine) of one tensor kind by layer, for plots and notes."""
    out = [(split_name(x.name)[1], x.rel_l2, x.cosine) for x in r.rows if split_name(x.name)[0] == base]
    return sorted(out)
