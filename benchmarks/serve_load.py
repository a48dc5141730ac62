"""Load on `ggtorch serve`: C concurrent streaming clients (the official openai client) on loopback.

    python benchmarks/serve_load.py [MODEL] [--clients 1,8,32] [--duration 30] [--max-tokens 64]
                                    [--temperature 0,0.8] [--parallel 8] [--threads 2] [--llama-cpp]
                                    [--constrained] [--chat 64] [--overhead] [--json OUT]

For each temperature T and client count C, C clients send streaming completions back to back for
--duration seconds (then finish what is in flight) to one server started in a subprocess; with T > 0
they sample with top_k 40, top_p 0.95, min_p 0.05 (llama.cpp's defaults). Reported per run: aggregate
completion tok/s, time to first token p50/p99, requests, errors (HTTP errors, broken or garbled
streams: more than one id, no or several finish_reasons, usage that disagrees with what came, text
after the finish) and how many greedy answers differ from the same prompt served alone (batched
numerics may flip a token where the top-2 margin is small; informational, not an error).

--constrained runs each client count again with every completion constrained to a JSON schema
(llama.cpp's `json_schema` field), long enough that the answers run to --max-tokens like the free ones,
and prints constrained / unconstrained tok/s. --chat N sends N greedy chat requests at once and then
the same N one at a time, and counts the answers that differ (none should: see "The same answer under
load" in the README).
--overhead compares one request through the server with Model.generate in this process.
--llama-cpp adds llama.cpp's batched decode of 1 and --parallel sequences (llama-cpp-python's low-level
batch API, as llama-batched-bench does), for each T: at T > 0 every sequence samples through its own
llama.cpp sampler chain (top_k, typical, top_p, min_p, temp, dist with the same parameters, as
llama.cpp's batched example); skipped with a message when llama-cpp-python is missing.
All figures come from one run on the same machine: compare ratios, not absolute numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3,",
           "My favourite food is", "In 1969, the first", "The best way to learn a language is",
           "Dear diary, today"]

LLAMA_CPP_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp as L
path, n_seq, n_prompt, n_gen, threads = sys.argv[1], *map(int, sys.argv[2:6])
temp, top_k, top_p, min_p = map(float, sys.argv[6:10])
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_ctx = n_seq * (n_prompt + n_gen + 16)
cp.n_batch = cp.n_ubatch = max(512, n_seq * n_prompt)
cp.n_seq_max = n_seq
cp.n_threads = cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
batch = L.llama_batch_init(n_seq * n_prompt, 0, n_seq)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, n_vocab, n_prompt).tolist() for _ in range(n_seq)]

def put(i, tok, pos, seq, out):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
    batch.seq_id[i][0] = seq

i = 0
for s, p in enumerate(prompts):
    for j, t in enumerate(p):
        put(i, t, j, s, j == n_prompt - 1); i += 1
batch.n_tokens = i
assert L.llama_decode(ctx, batch) == 0
chains = []
for s in range(n_seq if temp > 0 else 0):  # one sampler chain per sequence (examples/batched)
    c = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for smpl in (L.llama_sampler_init_top_k(int(top_k)), L.llama_sampler_init_typical(1.0, 1),
                 L.llama_sampler_init_top_p(top_p, 1), L.llama_sampler_init_min_p(min_p, 1),
                 L.llama_sampler_init_temp(temp), L.llama_sampler_init_dist(1234 + s)):
        L.llama_sampler_chain_add(c, smpl)
    chains.append(c)

def pick(s, k):
    if chains:  # llama_sampler_sample applies the chain to output k's logits and accepts the token
        return int(L.llama_sampler_sample(chains[s], ctx, k))
    return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, k), shape=(n_vocab,))))
nxt = [pick(s, (s + 1) * n_prompt - 1) for s in range(n_seq)]
t = time.perf_counter()
for step in range(n_gen):
    for s in range(n_seq):
        put(s, nxt[s], n_prompt + step, s, True)
    batch.n_tokens = n_seq
    assert L.llama_decode(ctx, batch) == 0
    nxt = [pick(s, s) for s in range(n_seq)]
dt = time.perf_counter() - t
print(json.dumps({"n_seq": n_seq, "temperature": temp, "tok_s": n_seq * n_gen / dt}))
"""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start_server(a, port: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "ggtorch", "serve", a.model, "--port", str(port), "--parallel", str(a.parallel),
           "--threads", str(a.threads), "--ctx", str(a.parallel * 1024), "--queue", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


SAMPLER = {"top_k": 40, "top_p": 0.95, "min_p": 0.05}  # sent with temperature > 0 (llama.cpp's defaults)


# --constrained: every completion must follow this schema (llama.cpp's `json_schema` body field); it is long
# enough that a constrained answer, like an ignore_eos one, runs to max_tokens, so the two compare token for token
SCHEMA = {"type": "object", "properties": {"numbers": {"type": "array", "minItems": 200, "maxItems": 200,
                                                        "items": {"type": "integer", "minimum": 0, "maximum": 99999}}},
          "required": ["numbers"]}


async def load(url: str, model: str, clients: int, duration: float, max_tokens: int, alone: dict,
               temperature: float = 0.0, constrained: bool = False) -> dict:
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8)))
    ttft, tokens, errors, differ, done = [], [0], [], [0], [0]
    sampler = {"top_p": SAMPLER["top_p"]} if temperature > 0 else {}
    extra = {"ignore_eos": True, **({"top_k": SAMPLER["top_k"], "min_p": SAMPLER["min_p"]} if temperature > 0 else {}),
             **({"json_schema": SCHEMA} if constrained else {})}
    t_start = time.perf_counter()
    t_end = [t_start]

    async def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        t0 = time.perf_counter()
        first, ids, finishes, text, usage, after_finish = None, set(), 0, [], None, False
        try:
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, stream=True,
                stream_options={"include_usage": True}, extra_body=extra, **sampler)
            async for ch in stream:
                ids.add(ch.id)
                for c in ch.choices:
                    if c.text:
                        first = first or time.perf_counter()
                        after_finish |= finishes > 0
                        text.append(c.text)
                    finishes += c.finish_reason is not None
                if ch.usage:
                    usage = ch.usage
        except Exception as e:  # noqa: BLE001 - every failure is counted, the run goes on
            errors.append(f"{type(e).__name__}: {str(e)[:120]}")
            return
        bad = []
        if len(ids) != 1:
            bad.append(f"{len(ids)} ids")
        if finishes != 1 or after_finish:
            bad.append(f"{finishes} finish_reasons{' and text after it' if after_finish else ''}")
        if usage is None or usage.completion_tokens != max_tokens or len(text) > max_tokens:
            bad.append(f"usage {usage and usage.completion_tokens} for {len(text)} text chunks")
        if bad:
            errors.append("garbled stream: " + ", ".join(bad))
            return
        ttft.append(first - t0)
        tokens[0] += usage.completion_tokens
        done[0] += 1
        if temperature <= 0 and not constrained:  # sampled (or constrained) answers differ by design
            differ[0] += alone.get(prompt, "".join(text)) != "".join(text)
        t_end[0] = max(t_end[0], time.perf_counter())

    async def worker(w: int) -> None:
        k = 0
        while time.perf_counter() - t_start < duration:
            await one(w + k * clients)
            k += 1

    await asyncio.gather(*(worker(w) for w in range(clients)))
    await client.close()
    wall = t_end[0] - t_start
    return {"clients": clients, "temperature": temperature, "constrained": constrained, "requests": done[0],
            "errors": len(errors),
            "error_samples": errors[:5],
            "completion_tokens": tokens[0], "wall_s": wall, "tok_s": tokens[0] / wall if wall > 0 else 0.0,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "greedy_differs_from_alone": differ[0]}


def alone_answers(url: str, model: str, max_tokens: int) -> dict:
    from openai import OpenAI

    c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    return {p: c.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS}


async def chat_invariance(url: str, model: str, n: int, max_tokens: int = 16) -> dict:
    """n greedy chat requests sent at once (they share the slots, ride along, wait in the queue, reuse
    each other's cached prefixes) against the same requests sent one at a time: how many answers differ.
    The prompts run through the file's chat template (~40 tokens for SmolLM2), longer than the 32 tokens
    that ride along with a decode step, so they are prefilled in chunks beside other sequences."""
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=n + 8)))

    async def ask(i: int) -> str:
        r = await client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": f"Write one sentence about the number {i}."}])
        return r.choices[0].message.content or ""

    together = await asyncio.gather(*(ask(i) for i in range(n)))
    alone = [await ask(i) for i in range(n)]
    await client.close()
    return {"requests": n, "differ": sum(a != b for a, b in zip(together, alone))}


def overhead(url: str, a, reps: int = 5) -> dict:
    """One request through the server (non-streaming, end to end) vs Model.generate in this process,
    called from the main thread and from a worker thread (the server's engine runs in one: with
    OpenMP, a busy machine treats the two very differently, so both are reported)."""
    import threading

    import ggtorch
    from openai import OpenAI

    m = ggtorch.load(a.model, threads=a.threads)
    c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    prompt, n = PROMPTS[0], a.max_tokens
    m.generate(prompt, max_tokens=4)
    srv, main_t, worker_t = [], [], []

    def lib(out):
        t = time.perf_counter()
        r = m.generate(prompt, max_tokens=n, ignore_eos=True)
        out.append(time.perf_counter() - t)
        assert len(r.ids) == n

    for _ in range(reps):
        lib(main_t)
        th = threading.Thread(target=lib, args=(worker_t,))
        th.start()
        th.join()
        t = time.perf_counter()
        r = c.completions.create(model=a.model, prompt=prompt, max_tokens=n, temperature=0,
                                 extra_body={"ignore_eos": True})
        srv.append(time.perf_counter() - t)
        assert r.usage.completion_tokens == n
    s, g, w = statistics.median(srv), statistics.median(main_t), statistics.median(worker_t)
    return {"server_s": s, "generate_main_thread_s": g, "generate_worker_thread_s": w,
            "overhead_vs_worker_thread": s / w - 1, "overhead_vs_main_thread": s / g - 1}


def llama_cpp_batched(a, temps: list[float]) -> list[dict] | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp batched decode skipped", file=sys.stderr)
        return None
    from ggtorch.packaged import resolve

    out = []
    for t in temps:
        for n_seq in (1, a.parallel):
            r = subprocess.run([sys.executable, "-c", LLAMA_CPP_CHILD, resolve(a.model), str(n_seq), "16",
                                str(a.max_tokens), str(a.threads), str(t), str(SAMPLER["top_k"]),
                                str(SAMPLER["top_p"]), str(SAMPLER["min_p"])], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"llama.cpp child failed: {r.stderr[-500:]}", file=sys.stderr)
                return None
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--clients", default="1,8", help="comma-separated client counts (default 1,8)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of new requests per client count")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", default="0",
                    help="comma-separated temperatures (default 0: greedy); > 0 samples with top_k 40, "
                         "top_p 0.95, min_p 0.05")
    ap.add_argument("--parallel", type=int, default=8, help="server slots")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overhead", action="store_true", help="server vs Model.generate for one request")
    ap.add_argument("--llama-cpp", action="store_true", help="llama.cpp's batched decode for comparison")
    ap.add_argument("--constrained", action="store_true",
                    help="also run each client count with a JSON schema (llama.cpp's json_schema field)")
    ap.add_argument("--chat", type=int, default=0, metavar="N",
                    help="N greedy chat requests at once vs the same alone: how many answers differ")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    temps = [float(x) for x in a.temperature.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(a, port)
    res = {"model": a.model, "threads": a.threads, "parallel": a.parallel, "max_tokens": a.max_tokens,
           "duration_s": a.duration, "sampler": SAMPLER, "runs": []}
    try:
        alone = alone_answers(url, a.model, a.max_tokens)
        modes = [False, True] if a.constrained else [False]
        for t, c, k in ((t, int(x), k) for t in temps for x in a.clients.split(",") for k in modes):
            r = asyncio.run(load(url, a.model, c, a.duration, a.max_tokens, alone, t, k))
            res["runs"].append(r)
            print(f"T={t:g} {c:3d} clients{' json_schema' if k else ''}: {r['tok_s']:7.1f} tok/s  "
                  f"TTFT p50 {r['ttft_p50_s'] or 0:.3f}s "
                  f"p99 {r['ttft_p99_s'] or 0:.3f}s  {r['requests']} requests, {r['errors']} errors, "
                  f"{r['greedy_differs_from_alone']} greedy answers differ from alone", flush=True)
            for e in r["error_samples"]:
                print("    ", e)
        if a.chat:
            res["chat_invariance"] = ci = asyncio.run(chat_invariance(url, a.model, a.chat))
            print(f"{ci['requests']} concurrent greedy chat requests: {ci['differ']} answers differ from the "
                  f"same requests sent alone", flush=True)
        if a.overhead:
            res["overhead"] = o = overhead(url, a)
            print(f"one request: server {o['server_s']:.3f}s vs Model.generate {o['generate_worker_thread_s']:.3f}s "
                  f"in a worker thread -> overhead {100 * o['overhead_vs_worker_thread']:+.1f}% "
                  f"(Model.generate in the main thread {o['generate_main_thread_s']:.3f}s)", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    if a.llama_cpp:
        lc = llama_cpp_batched(a, temps)
        if lc:
            res["llama_cpp"] = lc
            for x in lc:
                print(f"llama.cpp batched decode, T={x['temperature']:g}, {x['n_seq']} sequences: "
                      f"{x['tok_s']:.1f} tok/s")
    runs = {(r["temperature"], r["clients"]): r for r in res["runs"] if not r["constrained"]}
    for r in res["runs"]:
        free = runs.get((r["temperature"], r["clients"]))
        if r["constrained"] and free and free["tok_s"]:
            print(f"ratio T={r['temperature']:g} {r['clients']} clients: json_schema / unconstrained: "
                  f"{r['tok_s'] / free['tok_s']:.2f}x")
    for (t, c), r in runs.items():
        one = runs.get((t, 1))
        if c != 1 and one and one["tok_s"]:
            print(f"ratio T={t:g}: {c} clients / 1 client: {r['tok_s'] / one['tok_s']:.2f}x")
        greedy = runs.get((0.0, c))
        if t > 0 and greedy and greedy["tok_s"]:
            print(f"ratio {c} clients: T={t:g} / greedy: {r['tok_s'] / greedy['tok_s']:.2f}x")
    for x in res.get("llama_cpp") or []:
        r = runs.get((x["temperature"], x["n_seq"]))
        if x["n_seq"] == a.parallel and r:
            print(f"ratio T={x['temperature']:g}: {a.parallel} clients / llama.cpp batched {a.parallel}: "
                  f"{r['tok_s'] / x['tok_s']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
