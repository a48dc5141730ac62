"""Train a LoRA adapter on SmolLM2-135M-Instruct Q4_1 (the GGUF file, frozen and quantized) for a small
synthetic task, and check what the issue's acceptance asks:

- the held-out validation loss goes down;
- greedy answers to held-out questions follow the task (answer in a fixed JSON format,
  ``{"answer": "<word>"}``), which the base model does not do;
- llama.cpp (llama-cpp-python, optional) with the saved adapter gives the same greedy answers.

Prints training tokens/s and peak memory (RSS). Usage:

    python benchmarks/lora_finetune.py [--model smollm2-135m] [--steps 200] [--out /tmp/lora-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ggtorch  # noqa: E402

ITEMS = [("apple", "red"), ("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("snow", "white"),
         ("coal", "black"), ("orange", "orange"), ("lemon", "yellow"), ("tomato", "red"), ("cucumber", "green"),
         ("blood", "red"), ("milk", "white"), ("ocean", "blue"), ("carrot", "orange"), ("night", "black"),
         ("cherry", "red"), ("lime", "green"), ("cloud", "white"), ("sunflower", "yellow"), ("crow", "black"),
         ("strawberry", "red"), ("spinach", "green"), ("sapphire", "blue"), ("pumpkin", "orange"),
         ("ivory", "white"), ("ink", "black"), ("corn", "yellow"), ("frog", "green"), ("ruby", "red"),
         ("chocolate", "brown"), ("coffee", "brown"), ("wood", "brown"), ("emerald", "green"), ("salt", "white")]
TEMPLATES = ["What color is {}?", "Which colour does {} have?", "Tell me the color of {}.", "{}: what color is it?"]


def examples(items, seed):
    rnd = random.Random(seed)
    out = []
    for thing, color in items:
        for t in rnd.sample(TEMPLATES, 2):
            out.append({"messages": [{"role": "user", "content": t.format(thing)},
                                     {"role": "assistant", "content": json.dumps({"answer": color})}]})
    return out


def follows(text: str) -> bool:
    try:
        v = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(v, dict) and list(v) == ["answer"] and isinstance(v["answer"], str)


def greedy(m, questions, n=16):
    return [m.chat([{"role": "user", "content": q}], max_tokens=n, temperature=0.0).text for q in questions]


def llama_cpp_answers(path, adapter, questions, n=16):
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=0, lora_path=adapter)
    out = []
    for q in questions:
        r = llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=n, temperature=0.0, top_k=1)
        out.append(r["choices"][0]["message"]["content"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="/tmp/lora-bench")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rnd = random.Random(0)
    items = ITEMS[:]
    rnd.shuffle(items)
    held = items[:6]  # never trained on, not even for validation
    train = examples(items[6:], 1)
    questions = [TEMPLATES[i % len(TEMPLATES)].format(t) for i, (t, _) in enumerate(held)]
    from ggtorch.packaged import resolve

    path = resolve(a.model)
    m = ggtorch.load(path, fast=False)
    before = greedy(m, questions)
    epochs = max(1, -(-a.steps * a.batch // int(len(train) * 0.85)))
    t0 = time.perf_counter()
    r = ggtorch.finetune(m, train, os.path.join(a.out, "adapter.gguf"), rank=a.rank, alpha=2 * a.rank, lr=a.lr,
                         epochs=epochs, batch=a.batch, val=0.15, seed=0, max_steps=a.steps, ctx=128,
                         peft=os.path.join(a.out, "peft"), checkpoint=os.path.join(a.out, "ckpt"), save_every=50)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m.set_lora([(os.path.join(a.out, "adapter.gguf"), 1.0)])
    after = greedy(m, questions)
    ref = llama_cpp_answers(path, os.path.join(a.out, "adapter.gguf"), questions)
    report = {"model": a.model, "steps": r.steps, "train_examples": len(train), "batch": a.batch, "rank": a.rank,
              "train_loss_first_last": [r.train_loss[0], r.train_loss[-1]], "val_loss": r.val_loss,
              "tokens_per_s": r.tokens_per_s, "wall_s": wall, "peak_rss_mib": peak,
              "held_out": [{"q": q, "base": b, "lora": x, "llama_cpp_lora": (ref[i] if ref else None)}
                           for i, (q, b, x) in enumerate(zip(questions, before, after))],
              "follow_rate_base": sum(map(follows, before)) / len(before),
              "follow_rate_lora": sum(map(follows, after)) / len(after),
              "llama_cpp_same_greedy": (sum(x == y for x, y in zip(after, ref)) / len(after)) if ref else None}
    print(json.dumps(report, indent=1))
    with open(os.path.join(a.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
