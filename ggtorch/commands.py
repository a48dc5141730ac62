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

    from .packaged import resolve

    with GGUFFile(resolve(a.file)) as f:
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


def _load(a):
    from .api import load

    return load(a.model, device=a.device, threads=a.threads, fast=a.fast,
                ggml_numerics=getattr(a, "ggml_numerics", False))


def _sampling_kwargs(a) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                typical_p=a.typical_p, repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n,
                presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty, seed=a.seed,
                stop=a.stop, ignore_eos=a.ignore_eos)


def cmd_run(a) -> int:
    m = _load(a)
    ids, timings, steps = m.steps(a.prompt, **_sampling_kwargs(a))
    out, text = [], []
    for step in steps:
        out.append(step.token)
        text.append(step.piece)
        if not a.json and step.piece:
            sys.stdout.write(step.piece)
            sys.stdout.flush()
    if a.json:
        _print_json({"prompt_ids": ids, "ids": out, "text": "".join(text), "timings": timings.as_dict()})
    else:
        sys.stdout.write("\n")
        t = timings.as_dict()
        print(f"[prompt {t['prompt_tokens']} tok {t['prompt_ms']:.0f} ms | generated {t['gen_tokens']} tok "
              f"{t['gen_ms']:.0f} ms" + (f", {t['gen_tok_s']:.1f} tok/s" if t["gen_tok_s"] else "") + "]",
              file=sys.stderr)
    return 0


def cmd_tokenize(a) -> int:
    m = _load(a)
    ids = m.tokenize(a.text, special=a.special, bos=a.bos)
    if a.json:
        _print_json({"ids": ids, "pieces": [m.tokenizer.tokens[i] for i in ids]})
    else:
        for i in ids:
            print(f"{i:>8} {m.tokenizer.tokens[i]!r}")
    return 0


def _parse_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise GGTorchError(f"--tokens must be comma-separated integers, got {s!r}") from None
    if not ids:
        raise GGTorchError("--tokens is empty")
    return ids


def cmd_logits(a) -> int:
    ids = _parse_ids(a.tokens)
    m = _load(a)
    lg = m.logits(ids).numpy().astype(np.float32)
    np.save(a.out, lg)
    print(f"wrote logits {list(lg.shape)} to {a.out}", file=sys.stderr)
    return 0


def cmd_perplexity(a) -> int:
    from .perplexity import kl_stats

    try:
        text = open(a.file, encoding="utf-8").read()
    except OSError as e:
        raise GGTorchError(f"cannot read {a.file}: {e.strerror}") from None
    m = _load(a)
    bar = Progress(1, "perplexity")

    def prog(done, total, ppl):
        bar.total = total
        bar.update(done - bar.n, f"ppl {ppl:.4f}")

    keep = bool(a.save_logits or a.kl_base)
    r = m.perplexity(text, ctx=a.ctx, chunks=a.chunks, progress=prog, keep_logprobs=keep)
    bar.close()
    out = {k: v for k, v in r.items() if k not in ("logprobs", "targets")}
    if a.save_logits:
        np.savez_compressed(a.save_logits, logprobs=r["logprobs"].astype(np.float16), targets=r["targets"])
    if a.kl_base:
        try:
            base = np.load(a.kl_base)
            out["kl"] = kl_stats(base["logprobs"].astype(np.float32), r["logprobs"], r["targets"])
        except (OSError, KeyError, ValueError) as e:
            raise GGTorchError(f"cannot use --kl-base {a.kl_base}: {e}") from None
    if a.json:
        _print_json(out)
    else:
        print(f"perplexity: {out['ppl']:.4f} over {out['tokens_scored']} tokens ({out['chunks']} chunks of {out['n_ctx']})")
        if "kl" in out:
            k = out["kl"]
            print(f"KL mean {k['kl_mean']:.6f} max {k['kl_max']:.4f}, top-1 agreement {100 * k['top1_agreement']:.2f}%, "
                  f"delta-p mean {k['delta_p_mean']:+.5f} rms {k['delta_p_rms']:.5f}")
    return 0


def cmd_bench(a) -> int:
    from .bench import bench, format_table

    r = bench(a.model, n_prompt=a.n_prompt, n_gen=a.n_gen, reps=a.repetitions, device=a.device, threads=a.threads,
              fast=a.fast)
    if a.json:
        _print_json(r)
    else:
        print(format_table([r]))
    return 0
