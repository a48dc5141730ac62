"""Commands that read files and run models: inspect, dequant, run, tokenize, logits, perplexity, bench."""
from __future__ import annotations

import os
import sys

import numpy as np

from ..errors import GGTorchError
from ..gguf.reader import GGUFFile
from tqdm import tqdm

from .common import (add_context, add_model, add_sampling, add_structured, load, parse_ids, print_json,
                     sampling_kwargs, show_context, written_atomically)


def cmd_inspect(a) -> int:
    from ..gguf.inspect import format_text, report

    from ..packaged import resolve

    with GGUFFile(resolve(a.file)) as f:
        model = _model_summary(f)
        if a.json:
            r = report(f)
            print_json({"metadata": r["metadata"], "tensors": r["tensors"], "model": model,
                         **{k: v for k, v in r.items() if k not in ("metadata", "tensors")}})
        else:
            text = format_text(f)
            lines = [f"  {k} = {v}" for k, v in model.items()] if isinstance(model, dict) else [f"  {model}"]
            head, sep, rest = text.partition("\n\nmetadata:")
            print(head + "\n\nmodel (as ggtorch runs it):\n" + "\n".join(lines) + sep + rest)
    return 0


def _model_summary(f):
    """The architecture's graph-shaping hyper-parameters (model.config.describe), or why it cannot run."""
    from ..errors import ModelError
    from ..model.config import SUPPORTED, Config, describe

    if f.architecture not in SUPPORTED:
        return f"architecture {f.architecture!r} is not supported; supported: {', '.join(SUPPORTED)}"
    try:
        return describe(Config.from_gguf(f))
    except ModelError as e:
        return str(e)


def cmd_dequant(a) -> int:
    from ..quant.dequant import dequantize

    with GGUFFile(a.file) as f:
        names = a.tensor or list(f.tensors)
        for n in names:
            f.info(n)  # fail before any work on an unknown name
        arrays = {}
        with tqdm(total=len(names), desc="dequant", disable=None) as bar:  # shown on a terminal only
            for n in names:
                ti = f.info(n)
                arrays[n] = dequantize(f.raw(n), ti.type, ti.shape).numpy()
                bar.set_postfix_str(n, refresh=False)
                bar.update(1)
        out = a.out if a.out.endswith(".npz") else a.out + ".npz"
        with written_atomically(out) as tmp:
            np.savez(tmp, **arrays)
    print(f"wrote {len(arrays)} tensors to {out}", file=sys.stderr)
    return 0






def cmd_run(a) -> int:
    if getattr(a, "pipeline", None):  # one torchrun process per stage (ggtorch.dist.pipeline)
        from ..dist.pipeline import cli

        return cli(a, lambda m: _run(a, m))
    return _run(a, load(a))


def _run(a, m) -> int:
    ids, timings, steps = m.steps(a.prompt, **sampling_kwargs(a))
    show_context(m)
    out, text = [], []
    for step in steps:
        out.append(step.token)
        text.append(step.piece)
        if not a.json and step.piece:
            sys.stdout.write(step.piece)
            sys.stdout.flush()
    if a.json:
        print_json({"prompt_ids": ids, "ids": out, "text": "".join(text), "timings": timings.as_dict()})
    else:
        sys.stdout.write("\n")
        t = timings.as_dict()
        print(f"[prompt {t['prompt_tokens']} tok {t['prompt_ms']:.0f} ms | generated {t['gen_tokens']} tok "
              f"{t['gen_ms']:.0f} ms" + (f", {t['gen_tok_s']:.1f} tok/s" if t["gen_tok_s"] else "") + "]",
              file=sys.stderr)
    return 0


def cmd_tokenize(a) -> int:
    m = load(a)
    ids = m.tokenize(a.text, special=a.special, bos=a.bos)
    if a.json:
        print_json({"ids": ids, "pieces": [m.tokenizer.tokens[i] for i in ids]})
    else:
        for i in ids:
            print(f"{i:>8} {m.tokenizer.tokens[i]!r}")
    return 0




def cmd_logits(a) -> int:
    ids = parse_ids(a.tokens)
    m = load(a)
    lg = m.logits(ids).numpy().astype(np.float32)
    with written_atomically(a.out if a.out.endswith(".npy") else a.out + ".npy") as tmp:  # numpy's naming
        np.save(tmp, lg)
    print(f"wrote logits {list(lg.shape)} to {a.out}", file=sys.stderr)
    return 0


def cmd_perplexity(a) -> int:
    from ..perplexity import kl_stats

    try:
        text = open(a.file, encoding="utf-8").read()
    except OSError as e:
        raise GGTorchError(f"cannot read {a.file}: {e.strerror}") from None
    m = load(a)
    bar = tqdm(total=1, desc="perplexity", disable=None)

    def prog(done, total, ppl):
        bar.total = total
        bar.set_postfix_str(f"ppl {ppl:.4f}", refresh=False)
        bar.update(done - bar.n)

    keep = bool(a.save_logits or a.kl_base)
    r = m.perplexity(text, ctx=a.ctx, chunks=a.chunks, progress=prog, keep_logprobs=keep)
    bar.close()
    out = {k: v for k, v in r.items() if k not in ("logprobs", "targets")}
    if a.save_logits:
        name = a.save_logits if a.save_logits.endswith(".npz") else a.save_logits + ".npz"  # numpy's naming
        with written_atomically(name) as tmp:
            np.savez_compressed(tmp, logprobs=r["logprobs"].astype(np.float16), targets=r["targets"])
    if a.kl_base:
        try:
            base = np.load(a.kl_base)
            out["kl"] = kl_stats(base["logprobs"].astype(np.float32), r["logprobs"], r["targets"])
        except (OSError, KeyError, ValueError) as e:
            raise GGTorchError(f"cannot use --kl-base {a.kl_base}: {e}") from None
    if a.json:
        print_json(out)
    else:
        print(f"perplexity: {out['ppl']:.4f} over {out['tokens_scored']} tokens ({out['chunks']} chunks of {out['n_ctx']})")
        if "kl" in out:
            k = out["kl"]
            print(f"KL mean {k['kl_mean']:.6f} max {k['kl_max']:.4f}, top-1 agreement {100 * k['top1_agreement']:.2f}%, "
                  f"delta-p mean {k['delta_p_mean']:+.5f} rms {k['delta_p_rms']:.5f}")
    return 0


def cmd_bench(a) -> int:
    from ..bench import bench, format_table

    r = bench(a.model, n_prompt=a.n_prompt, n_gen=a.n_gen, reps=a.repetitions, device=a.device, threads=a.threads,
              fast=a.fast, kv_dtype=a.cache_type, cache=getattr(a, "cache", True), bound=a.bound)
    if a.json:
        print_json(r)
    else:
        print(format_table([r]))
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="metadata, tensor table and type histogram of a GGUF file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("dequant", help="dequantize tensors to float32 arrays in an .npz")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--tensor", action="append", default=[], help="tensor name (repeatable); default all")

    p = sub.add_parser("run", help="raw completion of a prompt (no chat template; `chat` applies the model's template)")
    add_model(p, optional=True)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--json", action="store_true")
    add_sampling(p)
    add_structured(p)
    add_context(p)
    p.add_argument("--pipeline", type=int, default=None, metavar="N",
                   help="split the layers across N processes started by torchrun --nproc-per-node N")
    p.add_argument("--pipeline-timeout", type=float, default=None, metavar="S",
                   help="with --pipeline: seconds a stage waits for another before the run fails (default 60)")

    p = sub.add_parser("tokenize", help="token ids of a text")
    add_model(p)
    p.add_argument("text")
    p.add_argument("--special", action="store_true", help="parse special/control tokens in the text")
    p.add_argument("--bos", action="store_true", help="add BOS (as the metadata's add_bos_token would)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("logits", help="logits of a token sequence (float32, all positions) to .npy")
    add_model(p)
    p.add_argument("--tokens", required=True, help="comma-separated ids, e.g. 1,2,3")
    p.add_argument("--out", required=True)

    p = sub.add_parser("perplexity", help="perplexity of a text file, llama-perplexity's method")
    add_model(p)
    p.add_argument("--file", required=True)
    p.add_argument("--ctx", type=int, default=256, help="tokens per chunk, also the context n_ctx (default 256)")
    p.add_argument("--cache-type", default=None, choices=["f16", "bf16", "f32"], help="KV cache type (default f16)")
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save-logits", default=None, help="save the scored logits' log-probs to an .npz for --kl-base")
    p.add_argument("--kl-base", default=None, help="compare against a --save-logits file: KL, top-1 agreement")

    p = sub.add_parser("bench", help="prefill/decode speed, load time, peak RSS")
    add_model(p, optional=True)
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--cache-type", default=None, choices=["f16", "bf16", "f32"], help="KV cache type (default f16)")
    p.add_argument("--bound", action="store_true",
                   help="also measure memory bandwidth (a 1 GiB read in a child process) and print decode's "
                        "bound: the weight bytes a token reads / bandwidth, and the share of it reached")
    p.add_argument("--json", action="store_true")
