"""CLI subcommands that look inside a model: trace, diff, lens, check, plant."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import GGTorchError
from tqdm import tqdm
from .common import add_inject, add_input, add_model, load, parse_ids, print_json, written_atomically


def _ids(a, m) -> list[int]:
    if a.tokens:
        ids = parse_ids(a.tokens)
        if max(ids) >= m.n_vocab or min(ids) < 0:
            raise GGTorchError(f"--tokens must lie in 0..{m.n_vocab - 1}")
        return ids
    if a.prompt is None:
        raise GGTorchError("give a prompt (-p TEXT) or token ids (--tokens 1,2,3)")
    ids = m.tokenize(a.prompt, special=True, bos=True)
    if not ids:
        raise GGTorchError("the prompt gives no tokens")
    return ids


def _record(a, m, ids, label, keep=True):
    from ..debug.faults import parse_runtime
    from ..debug.trace import injected, record

    kw = {}
    for spec in a.inject or []:
        kw.update(parse_runtime(spec))
    with injected(m.net, **kw):
        return record(m.net, ids, keep=keep, source=label + (f" with {', '.join(a.inject)}" if a.inject else ""))


def cmd_trace(a) -> int:
    from ..debug.trace import format_table

    m = load(a)
    tr = _record(a, m, _ids(a, m), str(m.path), keep=bool(a.save))  # statistics alone unless saving
    if a.save:
        tr.save(a.save)
        print(f"wrote {len(tr.tensors)} tensors to {a.save}", file=sys.stderr)
    if a.plot:
        from ..debug.plot import plot_trace

        plot_trace(tr, a.plot, f"{Path(m.path).name}: per-layer RMS ({len(tr.tokens)} tokens)")
        print(f"wrote {a.plot}", file=sys.stderr)
    if a.json:
        print_json({"model": str(m.path), "tokens": tr.tokens,
                     "tensors": [{"tensor": n, **s} for n, s in tr.stats.items()]})
    else:
        print(format_table(tr))
    return 0


def cmd_diff(a) -> int:
    from ..debug.diff import diff, format_report
    from ..debug.trace import Trace

    sides = sum(bool(x) for x in (a.model_b, a.trace, a.llama_cpp))
    if sides != 1:
        raise GGTorchError("compare against exactly one of: MODEL_B, --trace FILE, --llama-cpp")
    m = load(a)
    if a.trace:
        ref = Trace.load(a.trace)
        ids = ref.tokens if (ref.tokens and not a.prompt and not a.tokens) else _ids(a, m)
        label_b = a.trace
    elif a.llama_cpp:
        from ..debug.llamacpp import capture

        ids = _ids(a, m)
        label_b = "llama.cpp"
    else:
        from ..api import load as load_model

        mb = load_model(a.model_b, device=a.device, threads=a.threads, fast=a.fast, ggml_numerics=a.ggml_numerics)
        ids = _ids(a, m)
        if max(ids) >= mb.n_vocab:
            raise GGTorchError(f"{a.model_b} has {mb.n_vocab} tokens; the prompt uses id {max(ids)}")
        label_b = str(mb.path)
    tr_a = _record(a, m, ids, str(m.path))
    if a.llama_cpp:
        ref = capture(str(m.path), ids, set(tr_a.names), threads=a.threads)
    elif not a.trace:
        from ..debug.trace import record

        ref = record(mb.net, ids, keep=True, source=label_b)
    r = diff(tr_a, ref, tol=a.tol, min_cosine=a.min_cosine)
    if a.plot:
        from ..debug.plot import plot_diff

        plot_diff(r, a.plot, f"{Path(tr_a.source.split(' with ')[0]).name} vs {Path(label_b).name}: "
                              f"first divergence {r.first_divergence or 'none'}")
        print(f"wrote {a.plot}", file=sys.stderr)
    if a.json:
        print_json({"a": tr_a.source, "b": label_b, "tokens": ids, **r.as_dict()})
    else:
        print(f"A: {tr_a.source}\nB: {label_b}\ntokens: {len(ids)}")
        print(format_report(r, "A", "B"))
    return 0 if r.ok else 1


def cmd_lens(a) -> int:
    from ..debug.lens import format_lens, logit_lens

    if a.top_k < 1:
        raise GGTorchError("-k must be at least 1")
    m = load(a)
    rows = logit_lens(m, _ids(a, m), k=min(a.top_k, m.n_vocab))
    if a.json:
        print_json({"model": str(m.path), "layers": rows})
    else:
        print(format_lens(rows))
    return 0


def cmd_check(a) -> int:
    from ..debug.check import check, format_check
    from ..packaged import resolve

    bar = tqdm(total=1, desc="check", disable=None)  # shown on a terminal only

    def prog(done, total, name):
        bar.total = total
        bar.set_postfix_str(name, refresh=False)
        bar.update(done - bar.n)

    r = check(str(resolve(a.file)), compare=not a.no_compare, progress=prog)
    bar.close()
    if a.json:
        print_json(r)
    else:
        print(format_check(r))
    return 0 if r["ok"] else 1


def cmd_plant(a) -> int:
    from ..debug.faults import entry_point, plant

    from ..packaged import resolve

    with written_atomically(a.out) as tmp:
        changed = plant(str(resolve(a.src)), tmp, a.fault, a.tensor)
    print(f"wrote {a.out}: {a.fault} in {', '.join(changed)} (diff should name {entry_point(changed[0])} "
          f"or an earlier tensor of the same layer)", file=sys.stderr)
    return 0


def register(sub) -> None:
    # trace and diff compare numbers, so they default to the exact float32 path (--fast to trace the kernels)
    p = sub.add_parser("trace", help="per-layer table of named intermediate tensors (llama.cpp names)")
    add_model(p)
    p.set_defaults(fast=False)
    add_input(p)
    add_inject(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", default=None, metavar="FILE.safetensors", help="save the full tensors")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot per-layer RMS")

    p = sub.add_parser("diff", help="compare traces with another GGUF, a saved trace or llama.cpp; "
                                    "exit 1 on divergence")
    add_model(p)
    p.set_defaults(fast=False)
    p.add_argument("model_b", nargs="?", default=None, help="another GGUF of the same model (reference side)")
    p.add_argument("--trace", default=None, metavar="FILE", help="a saved trace (safetensors) as the reference")
    p.add_argument("--llama-cpp", action="store_true", help="llama.cpp (llama-cpp-python) on MODEL as the reference")
    add_input(p)
    add_inject(p)
    p.add_argument("--tol", type=float, default=0.15, help="largest relative L2 error (default 0.15)")
    p.add_argument("--min-cosine", type=float, default=0.99, help="smallest cosine similarity (default 0.99)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot the error by layer")

    p = sub.add_parser("lens", help="logit lens: top-k next tokens after every layer")
    add_model(p)
    add_input(p)
    p.add_argument("-k", "--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check", help="scan every tensor (NaN/Inf, gguf-py equality) and the metadata")
    p.add_argument("file", help="a .gguf path or a packaged model name")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with gguf-py")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plant", help="write a copy of a GGUF carrying a classic porting bug (for diff demos)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--fault", required=True, help="q6k-sequential, transpose or unpermute-qk")
    p.add_argument("--tensor", default=None, help="tensor to break (default: a suitable one)")
