"""PNG plots of traces and diffs (matplotlib, optional extra ``ggtorch[plot]``)."""
from __future__ import annotations

from ..errors import GGTorchError
from .trace import Trace, split_name


class PlotError(GGTorchError):
    """Plotting asked for without matplotlib."""


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'ggtorch[plot]'") from None
    return plt


def _by_layer(names_values, base):
    pts = sorted((split_name(n)[1], v) for n, v in names_values if split_name(n)[0] == base)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_trace(tr: Trace, path: str, title: str = "") -> None:
    """RMS of each layer's output and of the attention and FFN contributions, by layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for base, style in (("l_out", "o-"), ("attn_out", "s--"), ("ffn_out", "^--"), ("attn_norm", ".:")):
        x, y = _by_layer(((n, s["rms"]) for n, s in tr.stats.items()), base)
        if x:
            ax.plot(x, y, style, label=base, markersize=4)
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("RMS")
    ax.set_yscale("log")
    ax.set_title(title or f"per-layer RMS ({len(tr.tokens)} tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_diff(report, path: str, title: str = "") -> None:
    """Relative L2 error of every compared tensor in graph order, the tolerance, the first divergence."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    rows = report.rows
    x = list(range(len(rows)))
    y = [max(r.rel_l2, 1e-7) if r.rel_l2 == r.rel_l2 else float("nan") for r in rows]
    ax.plot(x, y, "-", color="0.6", lw=0.8)
    for base, marker in (("l_out", "o"), ("attn_out", "s"), ("ffn_out", "^"), ("Qcur", "x"), ("kqv_out", "d")):
        pts = [(i, y[i]) for i, r in enumerate(rows) if split_name(r.name)[0] == base]
        if pts:
            ax.plot(*zip(*pts), marker, ls="none", label=base, markersize=4)
    ax.axhline(report.tol, color="red", lw=0.8, ls="--", label=f"tol {report.tol:g}")
    fd = report.first_divergence
    if fd:
        i = next(i for i, r in enumerate(rows) if r.name == fd)
        ax.axvline(i, color="red", lw=0.8)
        ax.annotate(fd, (i, report.tol), textcoords="offset points", xytext=(4, 6), color="red")
    ticks = [i for i, r in enumerate(rows) if split_name(r.name)[0] == "l_out"]
    step = max(1, len(ticks) // 16)
    ax.set_xticks(ticks[::step], [rows[i].name for i in ticks[::step]], rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("relative L2 error")
    ax.set_title(title or f"first divergence: {fd or 'none'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
