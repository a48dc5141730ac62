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
    args = None
    try:
        args = build_parser().parse_args(argv)
        rc = int(_command(args.cmd)(args) or 0)
        _finish_writes()  # inside the try: a Ctrl-C while the repack cache is written is handled below
        return rc
    except GGTorchError as e:
        print(f"ggtorch {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"ggtorch {args.cmd}: error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args)
    except BrokenPipeError:
        return 0


def _finish_writes(cancel: bool = False) -> None:
    """Wait for the repack cache's background writes (the interpreter would wait for them at exit,
    where a Ctrl-C prints a traceback and leaves a temporary file); ``cancel``: stop them first, which
    removes their temporary files."""
    cache = sys.modules.get("ggtorch.quant.cache")  # loaded only if a model was
    if cache is not None:
        if cancel:
            cache.cancel_writes()
        cache.flush()


def _interrupted(args) -> int:
    """Ctrl-C: one line, exit status 130 (128 + SIGINT, as shells report it), nothing half-written."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None  # no second Ctrl-C mid-cleanup
    try:
        _finish_writes(cancel=True)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    lead = "\n" if sys.stderr.isatty() else ""  # after the terminal's ^C, on a line of its own
    print(f"{lead}ggtorch{' ' + args.cmd if args else ''}: interrupted", file=sys.stderr, flush=True)
    return 130


if __name__ == "__main__":
    sys.exit(main())
