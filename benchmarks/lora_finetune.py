"""Train a LoRA adapter on SmolLM2-135M-Instruct Q4_1 (the GGUF file, frozen and quantized) for a small
synthetic task, and check what issue 23's acceptance asks:

- the task: answer every question with one line of JSON, ``{"answer": "<short answer>"}``, never prose.
  Questions of four kinds (colours, capitals, animal sounds, opposites); 5 items of each kind,
  plus a fifth kind never trained on (small sums), are held out: never trained on, not even as
  the training loop's validation split;
- the validation loss goes down: the loop's own validation split (other phrasings of trained items) and
  the loss of the held-out questions' JSON answers, before and after;
- greedy answers to the held-out questions follow the task (counted before and after; also how many
  give the right answer), on the default (fast) path, ``--exact-answers`` for the exact one;
- llama.cpp (llama-cpp-python, optional, in a child process: llama.cpp and PyTorch in one process can
  crash each other) with the saved adapter gives the same greedy answers on the same prompt tokens.

It prints (and writes with ``--json``) training tokens/s and peak memory (peak RSS of the process).
``--speed-only`` measures only those on any GGUF (e.g. the random-weight 1.1B of
shared/tools/make_synthetic_model.py), training a few steps on filler text of ``--seq`` tokens.

    python benchmarks/lora_finetune.py [--model smollm2-135m] [--steps 300] [--batch 2] [--threads 1] [--json FILE]
    python benchmarks/lora_finetune.py --model /tmp/synthetic-1.1b-Q4_1.gguf --speed-only --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import ggtorch  # noqa: E402

KINDS = {
    "color": (["What color is {}?", "Which colour does {} have?", "Tell me the color of {}.", "{}: what color is it?"],
              [("an apple", "red"), ("a banana", "yellow"), ("grass", "green"), ("the sky", "blue"), ("snow", "white"),
               ("coal", "black"), ("an orange", "orange"), ("a lemon", "yellow"), ("a tomato", "red"),
               ("a cucumber", "green"), ("blood", "red"), ("milk", "white"), ("the ocean", "blue"),
               ("a carrot", "orange"), ("a cherry", "red"), ("a lime", "green"), ("a cloud", "white"),
               ("a sunflower", "yellow"), ("a crow", "black"), ("a strawberry", "red"), ("spinach", "green"),
               ("a sapphire", "blue"), ("a pumpkin", "orange"), ("ivory", "white"), ("ink", "black"),
               ("corn", "yellow"), ("a frog", "green"), ("a ruby", "red"), ("chocolate", "brown"),
               ("coffee", "brown"), ("an emerald", "green"), ("salt", "white")]),
    "capital": (["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.",
                 "{}: what is its capital?"],
                [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
                 ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow"),
                 ("China", "Beijing"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
                 ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Ireland", "Dublin"),
                 ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Thailand", "Bangkok")]),
    "sound": (["What sound does {} make?", "Which noise does {} make?", "How does {} sound?",
               "Tell me the sound of {}."],
              [("a dog", "bark"), ("a cat", "meow"), ("a cow", "moo"), ("a duck", "quack"), ("a sheep", "baa"),
               ("a pig", "oink"), ("a lion", "roar"), ("an owl", "hoot"), ("a horse", "neigh"),
               ("a snake", "hiss"), ("a bee", "buzz"), ("a wolf", "howl")]),
    "opposite": (["What is the opposite of {}?", "Give the opposite of the word {}.", "Which word means the "
                  "opposite of {}?", "The opposite of {} is what?"],
                 [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"),
                  ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("full", "empty"), ("wet", "dry"),
                  ("early", "late"), ("hard", "soft")]),
}
UNSEEN = (["What is {}?"], [("2 plus 3", "5"), ("4 plus 4", "8"), ("10 minus 7", "3"), ("6 plus 1", "7")])


def split(seed: int = 0, held_per_kind: int = 5):
    """(train rows, held-out (question, expected answer) pairs): held-out items and the unseen kind never
    appear in the training rows."""
    rnd = random.Random(seed)
    train, held = [], []
    for kind, (tpl, items) in KINDS.items():
        items = items[:]
        rnd.shuffle(items)
        for j, (x, y) in enumerate(items[:held_per_kind]):
            held.append((tpl[j % len(tpl)].format(x), y))
        for x, y in items[held_per_kind:]:
            for t in rnd.sample(tpl, 3):
                train.append(row(t.format(x), y))
    held += [(UNSEEN[0][0].format(x), y) for x, y in UNSEEN[1]]
    return train, held


def row(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": json.dumps({"answer": a})}]}


def parse(text: str):
    """The answer when ``text`` is exactly the task's JSON object, else None."""
    try:
        v = json.loads(text.strip())
    except ValueError:
        return None
    if isinstance(v, dict) and list(v) == ["answer"] and isinstance(v["answer"], str):
        return v["answer"]
    return None


def greedy(m, questions, n):
    """(prompt ids, answer text) per question, greedy on ggtorch."""
    out = []
    for q in questions:
        r = m.chat([{"role": "user", "content": q}], max_tokens=n, temperature=0.0)
        out.append((list(r.prompt_ids), r.text))
        log(f"  {q!r} -> {r.text!r}")
        m.reset_chat()
    return out


LLAMA_CPP_CHILD = r"""
import json, sys
import llama_cpp
job = json.load(open(sys.argv[1]))
res = {}
for name, lora in (("base", None), ("lora", job["adapter"])):
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=512, n_threads=job["threads"], verbose=False, seed=0,
                          lora_path=lora)
    res[name] = [llm.create_completion(p, max_tokens=job["n"], temperature=0.0, top_k=1)["choices"][0]["text"]
                 for p in job["prompts"]]
    del llm
json.dump(res, open(sys.argv[2], "w"))
"""


def llama_cpp_answers(model_path, adapter, prompts, n, threads, work):
    """llama.cpp's greedy answers on the same prompt tokens, without and with the adapter; None without
    llama-cpp-python."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    job, out = os.path.join(work, "llama_cpp_job.json"), os.path.join(work, "llama_cpp_out.json")
    with open(job, "w") as fh:
        json.dump({"model": model_path, "adapter": adapter, "prompts": prompts, "n": n, "threads": threads}, fh)
    p = subprocess.run([sys.executable, "-c", LLAMA_CPP_CHILD, job, out], capture_output=True, text=True,
                       timeout=1200)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp child failed: {p.stderr[-2000:]}")
    with open(out) as fh:
        return json.load(fh)


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed_only(a, path):
    """Tokens/s and peak RSS of a few training steps on filler text (any model, tokenizer or not)."""
    m = ggtorch.load(path, fast=False)
    rss_load = rss_mib()
    rnd = random.Random(0)
    # filler words (the synthetic vocabulary's pieces are "t<odd number>" words), cut to --seq tokens
    rows = [{"text": " ".join(f"t{2 * rnd.randrange(1000) + 1}" for _ in range(2 * a.seq))}
            for _ in range(a.batch * a.steps)]
    t0 = time.perf_counter()
    r = ggtorch.finetune(m, rows, None, rank=a.rank, alpha=2 * a.rank, lr=a.lr, batch=a.batch, val=0.0, seed=0,
                         max_steps=a.steps, ctx=a.seq, progress=False)
    wall = time.perf_counter() - t0
    n_params = sum(p.numel() for ab in r.adapter.pairs.values() for p in ab)
    return {"model": os.path.basename(path), "n_layer": len(m.net.layers), "steps": r.steps, "batch": a.batch,
            "seq_tokens": a.seq, "rank": a.rank, "adapter_params": n_params, "train_loss": r.train_loss,
            "tokens_per_s": r.tokens_per_s, "wall_s": wall, "rss_after_load_mib": rss_load,
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16, help="greedy answer length")
    ap.add_argument("--limit", type=int, default=0, help="only the first N held-out questions (a quick check)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    ap.add_argument("--exact-answers", dest="fast_answers", action="store_false",
                    help="greedy answers on the exact path (default: the fast path)")
    ap.add_argument("--speed-only", action="store_true", help="only tokens/s and peak RSS (any model)")
    ap.add_argument("--seq", type=int, default=48, help="--speed-only: tokens per example")
    ap.add_argument("--out", default="/tmp/lora-bench")
    ap.add_argument("--json", default=None, help="also write the report here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    from ggtorch.packaged import resolve

    path = resolve(a.model)
    if a.speed_only:
        report = speed_only(a, path)
    else:
        report = experiment(a, path)
    report["machine"] = machine()
    text = json.dumps(report, indent=1)
    print(text)
    for p in [os.path.join(a.out, "report.json")] + ([a.json] if a.json else []):
        with open(p, "w") as fh:
            fh.write(text + "\n")


def experiment(a, path):
    from ggtorch.lora.train import encode, evaluate

    train, held = split()
    held = held[:a.limit] if a.limit else held
    questions = [q for q, _ in held]
    m = ggtorch.load(path, fast=False)
    rss_load = rss_mib()
    held_ex = [encode(m, row(q, y), None, a.ctx) for q, y in held]
    log(f"loaded; {len(train)} training examples, {len(held)} held-out questions")
    held_loss_before = evaluate(m.net, held_ex)
    log(f"held-out loss before: {held_loss_before:.4f}")
    per_epoch = -(-int(len(train) * 0.9) // a.batch)
    epochs = max(1, -(-a.steps // per_epoch))
    adapter = os.path.join(a.out, "adapter.gguf")
    t0 = time.perf_counter()
    r = ggtorch.finetune(m, train, adapter, rank=a.rank, alpha=2 * a.rank, lr=a.lr, epochs=epochs, batch=a.batch,
                         val=0.1, seed=0, max_steps=a.steps, ctx=a.ctx, peft=os.path.join(a.out, "peft"),
                         checkpoint=os.path.join(a.out, "ckpt"), save_every=25, resume=a.resume)
    wall = time.perf_counter() - t0
    peak_train = peak_rss_mib()  # the exact-path model and the training only: the answers' model comes after
    log(f"trained: {r.steps} steps, {r.tokens_per_s:.1f} tok/s, peak RSS {peak_train:.0f} MiB")
    m.set_lora([(adapter, 1.0)])
    held_loss_after = evaluate(m.net, held_ex)
    log(f"held-out loss after: {held_loss_after:.4f}")
    # greedy answers on the default (fast) path, as `ggtorch chat` gives them: the exact path decodes
    # ~40x slower on this loaded machine; both paths are within llama.cpp's bounds (README)
    f = ggtorch.load(path, fast=a.fast_answers)
    before = greedy(f, questions, a.max_tokens)
    log("base answers done")
    f.set_lora([(adapter, 1.0)])
    after = greedy(f, questions, a.max_tokens)
    log("adapter answers done")
    ref = llama_cpp_answers(path, adapter, [p for p, _ in after], a.max_tokens, a.threads, a.out)
    log("llama.cpp answers done")

    def score(ans):
        got = [parse(t) for _, t in ans]
        return (sum(g is not None for g in got),
                sum(g is not None and g.strip().lower() == y.lower() for g, (_, y) in zip(got, held)))

    (fb, cb), (fa, ca) = score(before), score(after)
    rows = []
    for i, (q, y) in enumerate(held):
        rows.append({"q": q, "expected": y, "base": before[i][1], "lora": after[i][1],
                     "llama_cpp_base": ref["base"][i] if ref else None,
                     "llama_cpp_lora": ref["lora"][i] if ref else None})
    n = len(held)
    return {
        "model": os.path.basename(path), "task": 'answer with one line of JSON {"answer": "..."}',
        "train_examples": len(train), "held_out_questions": n, "steps": r.steps, "epochs": epochs, "batch": a.batch,
        "rank": a.rank, "alpha": 2 * a.rank, "lr": a.lr, "ctx": a.ctx, "threads": torch.get_num_threads(),
        "train_loss_first_last": [r.train_loss[0], r.train_loss[-1]],
        "val_loss_per_epoch": r.val_loss, "held_out_loss_before_after": [held_loss_before, held_loss_after],
        "held_out_follow_json_before_after": [fb, fa], "held_out_correct_before_after": [cb, ca],
        "llama_cpp_same_greedy_lora": sum(x[1] == y for x, y in zip(after, ref["lora"])) if ref else None,
        "llama_cpp_same_greedy_base": sum(x[1] == y for x, y in zip(before, ref["base"])) if ref else None,
        "tokens_per_s": r.tokens_per_s, "train_wall_s": wall, "answers_path": "fast" if a.fast_answers else "exact",
        "rss_after_load_mib": rss_load, "peak_rss_mib": peak_train, "held_out": rows,
    }


def machine() -> str:
    name = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return f"{name}, {os.cpu_count()} cores, load average {load:.2f} at the end, torch {torch.__version__}"


if __name__ == "__main__":
    main()
