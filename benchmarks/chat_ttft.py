"""Second-turn time to first token in a chat: the session KV cache (only the new tokens are evaluated)
against recomputing the whole prompt. Both in the same run, alternating, median of --reps.

    .venv/bin/python benchmarks/chat_ttft.py [MODEL] [--history 500] [--reps 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import ggtorch

TOPICS = ["the water cycle", "how bread rises", "why the sky is blue", "what a compiler does", "how bees make honey",
          "the phases of the moon", "how a bicycle stays upright", "why leaves change colour", "how vaccines work",
          "what causes tides", "how a refrigerator cools", "why ice floats"]


def history(m, n_tokens: int) -> list[dict]:
    """A conversation of about n_tokens prompt tokens, with fixed (not generated) answers."""
    msgs = [{"role": "system", "content": "You are a helpful assistant who explains science simply."}]
    for t in TOPICS * 4:
        msgs += [{"role": "user", "content": f"Explain {t} in two sentences."},
                 {"role": "assistant", "content": f"Here is a short explanation of {t}. It comes down to a few "
                                                  "simple physical ideas that work together in everyday life."}]
        if len(m.apply_chat_template(msgs, tokenize=True)) >= n_tokens:
            break
    return msgs


def ttft(m, msgs) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    ids, timings, _, steps = m.chat_steps(msgs, max_tokens=1)
    next(steps)
    dt = time.perf_counter() - t0
    steps.close()
    return dt, timings.prompt_tokens, timings.cached_tokens


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--history", type=int, default=500)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    m = ggtorch.load(a.model, threads=a.threads)
    base = history(m, a.history)
    reuse, full = [], []
    for r in range(a.reps):
        # turn 1 fills the session cache and answers; turn 2 adds that answer and a new question
        m.reset_chat()
        first = m.chat(base, max_tokens=16)
        turn2 = base + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Thanks! And rain?"}]
        reuse.append(ttft(m, turn2))
        m.reset_chat()
        full.append(ttft(m, turn2))
    n_prompt = len(m.apply_chat_template(turn2, tokenize=True))
    med_r, med_f = statistics.median(x[0] for x in reuse), statistics.median(x[0] for x in full)
    print(f"{a.model}: second turn, {n_prompt}-token prompt, threads {a.threads}, median of {a.reps}")
    print(f"  session cache: {med_r * 1e3:8.1f} ms to first token ({reuse[0][1]} tokens evaluated, "
          f"{reuse[0][2]} cached)")
    print(f"  recompute:     {med_f * 1e3:8.1f} ms to first token ({full[0][1]} tokens evaluated)")
    print(f"  speed-up {med_f / med_r:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
