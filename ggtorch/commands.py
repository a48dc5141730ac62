"""Implementations of the CLI subcommands (argparse namespace in, exit code out)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from .errors import GGTorchError, GGUFError
from .gguf.reader import GGUFFile
from .progress import Progress


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


def cmd_inspect(a) -> int:
    from .gguf.inspect import format_text, report

    with GGUFFile(a.file) as f:
        if a.json:
            r = report(f)
            _print_json({"metadata": r["metadata"], "tensors": r["tensors"],
                         **{k: v for k, v in r.items() if k not in ("metadata", "tensors")}})
        else:
            print(format_text(f))
    return 0


def cmd_dequant(a) -> int:
    from .quant.dequant import dequantize

    with GGUFFile(a.file) as f:
        names = a.tensor or list(f.tensors)
        for n in names:
            f.info(n)  # fail before any work on an unknown name
        arrays = {}
        with Progress(len(names), "dequant") as bar:
            for n in names:
                ti = f.info(n)
                arrays[n] = dequantize(f.raw(n), ti.type, ti.shape).numpy()
                bar.update(1, n)
        out = a.out if a.out.endswith(".npz") else a.out + ".npz"
        tmp = out + ".part.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    print(f"wrote {len(arrays)} tensors to {out}", file=sys.stderr)
    return 0
