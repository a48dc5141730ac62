"""The `ggtorch` command: thin front ends over the library, one module per command group.

Each group module has ``register(sub)``, which adds its subparsers, and ``cmd_<name>(args)`` functions.
Bad input prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import GGTorchError

GROUPS = ("run", "chat", "serve", "debug", "lora")  # modules of this package, in the order their commands are listed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ggtorch", description="Run, inspect and debug GGUF models on PyTorch.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for g in GROUPS:
        importlib.import_module(f"{__name__}.{g}").register(sub)
    return ap


def _command(name: str):
    for g in GROUPS:
        fn = getattr(importlib.import_module(f"{__name__}.{g}"), "cmd_" + name.replace("-", "_"), None)
        if fn is not None:
            return fn
    raise AssertionError(f"no function for command {name}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_command(args.cmd)(args) or 0)
    except GGTorchError as e:
        print(f"ggtorch {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"ggtorch {args.cmd}: error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
