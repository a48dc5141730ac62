"""Replica scaling under Ray Serve (ggtorch.serve_ray): 1 vs N replicas, aggregate tok/s, with chat clients.

    python benchmarks/replicas.py [MODEL] [--replicas 1,2] [--clients 16] [--duration 30] [--max-tokens 32]
                                  [--parallel 4] [--routers prefix,pow2] [--kill-at SECONDS] [--json OUT]

For each replica count (and router: Ray Serve's prefix-cache router or its default power-of-two
choices), a local Ray serves MODEL and C clients (the official openai client, one thread each) hold
multi-turn greedy chats for --duration seconds: each conversation opens with its own long user turn,
then asks 3 short follow-ups that carry the whole conversation, as a chat UI does. Reported: aggregate
completion tok/s, requests, failures, p50 latency, and the cached-token share (prompt tokens the
replicas found in a slot's KV cache / all prompt tokens, from usage.prompt_tokens_details.cached_tokens):
what prefix-aware routing buys. The replicas share this host's cores (threads = cores / replicas).
--kill-at T kills one replica (ray.kill on its actor) T seconds in and classifies every failure: in
flight on the killed replica (expected: a clean 503 / stream error) or lost (none should be).
Figures from one run are comparable with each other only; on a 2-core host more replicas split the
same cores, so this shows Ray Serve's overhead, not scaling (a host with cores to spare shows scaling).
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

OPENINGS = ["Tell me about the history of the city you like most, its streets, its food and its people.",
            "I am planning a garden with tomatoes, beans and herbs on a small balcony facing south.",
            "Explain how a bicycle stays upright when it moves, and why it falls when it stops.",
            "Write a short story about a lighthouse keeper who finds a message in a bottle.",
            "What should I pack for a week of hiking in the mountains in early autumn?",
            "Describe the rules of chess to someone who has only played checkers before."]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Can you give an example?"]


def replica_actor(replica_id: str):
    """The Ray actor of one replica of ggtorch.serve_ray's application (for ray.kill)."""
    import ray
    from ggtorch.serve_ray import APP_NAME

    return ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#Replica#{replica_id}", namespace="serve")


def replica_ids() -> set:
    """The ids of the live replica actors of ggtorch.serve_ray's application (a killed one's name goes)."""
    import ray
    from ggtorch.serve_ray import APP_NAME

    prefix = f"SERVE_REPLICA::{APP_NAME}#Replica#"
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def running_replicas() -> int:
    from ray import serve
    from ggtorch.serve_ray import APP_NAME

    st = serve.status().applications[APP_NAME].deployments["Replica"]
    return {str(getattr(k, "value", k)): v for k, v in st.replica_states.items()}.get("RUNNING", 0)


class Record:
    def __init__(self, client, t0):
        self.client, self.t0 = client, t0
        self.t1 = None
        self.ok, self.error, self.replica = False, None, None
        self.prompt = self.cached = self.completion = 0


def chat_load(url: str, clients: int, duration: float, max_tokens: int = 32, model: str = "m",
              kill_at: float | None = None, stream: bool = False, timeout: float = 120) -> dict:
    """C chat clients for ``duration`` seconds; returns the records and the summary."""
    import openai

    from ggtorch.serve_ray import REPLICA_HEADER

    records, lock = [], threading.Lock()
    start = time.perf_counter()
    deadline = start + duration
    kill = {}

    def one(c, messages):
        cl = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
        r = Record(c, time.perf_counter())
        with lock:
            records.append(r)
        try:
            if stream:
                raw = cl.chat.completions.with_raw_response.create(
                    model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                r.replica = raw.headers.get(REPLICA_HEADER)
                text = []
                for ch in raw.parse():
                    if ch.choices:
                        text.append(ch.choices[0].delta.content or "")
                    if ch.usage:
                        u = ch.usage
                answer = "".join(text)
            else:
                raw = cl.chat.completions.with_raw_response.create(model=model, messages=messages,
                                                                   max_tokens=max_tokens, temperature=0)
                r.replica = raw.headers.get(REPLICA_HEADER)
                resp = raw.parse()
                answer, u = resp.choices[0].message.content, resp.usage
            r.prompt, r.completion = u.prompt_tokens, u.completion_tokens
            r.cached = (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0
            r.ok = True
            return answer
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            r.error = f"{e.status_code} {body.get('code') or (body.get('error') or {}).get('code') or ''}".strip()
        except openai.APIError as e:  # a stream that ended with an error event, a broken connection
            body = e.body if isinstance(getattr(e, "body", None), dict) else {}
            r.error = f"{type(e).__name__} {body.get('code') or ''}".strip()
        finally:
            r.t1 = time.perf_counter()
        return None

    def client(c):
        k = 0
        while time.perf_counter() < deadline:
            messages = [{"role": "user", "content": f"{OPENINGS[(c + k) % len(OPENINGS)]} ({c}/{k})"}]
            k += 1
            for turn in range(1 + len(FOLLOW_UPS)):
                if time.perf_counter() >= deadline:
                    return
                answer = one(c, messages)
                if answer is None:
                    break  # the conversation is gone with its replica: start a new one
                messages += [{"role": "assistant", "content": answer},
                             {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]

    def killer():
        time.sleep(max(0.0, start + kill_at - time.perf_counter()))
        with lock:  # a replica with requests on it: the one that answered last
            victim = next((r.replica for r in reversed(records) if r.replica), None)
        if victim is None:
            return
        import ray

        kill["replica"], kill["t"] = victim, time.perf_counter()
        ray.kill(replica_actor(victim), no_restart=True)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    if kill_at is not None:
        threads.append(threading.Thread(target=killer, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + timeout + 30)
    wall = max(r.t1 or r.t0 for r in records) - start if records else duration
    return summarize(records, wall, kill)


def summarize(records, wall: float, kill: dict) -> dict:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    in_flight, lost = [], []
    for r in failed:
        # in flight on the killed replica: started before the kill (or routed to it before Ray knew), ended
        # after it, and failed with the replica's error (not a client mistake, not a timeout)
        if kill and r.t1 >= kill["t"] and r.t0 <= kill["t"] + 1.0 and ("replica_failed" in (r.error or "")):
            in_flight.append(r)
        else:
            lost.append(r)
    prompt = sum(r.prompt for r in ok)
    cached = sum(r.cached for r in ok)
    tokens = sum(r.completion for r in ok)
    lat = sorted(r.t1 - r.t0 for r in ok)
    return {"requests": len(records), "ok": len(ok), "failed_in_flight_on_killed": len(in_flight),
            "lost": len(lost), "lost_errors": sorted({r.error for r in lost if r.error})[:5],
            "completion_tokens": tokens, "tok_s": tokens / wall if wall > 0 else 0.0,
            "cached_share": cached / prompt if prompt else 0.0, "prompt_tokens": prompt,
            "p50_s": statistics.median(lat) if lat else None, "wall_s": wall,
            "replicas_used": sorted({r.replica for r in ok if r.replica}), "killed": kill.get("replica")}


def direct(a) -> dict:
    """The same load on `ggtorch serve` in a subprocess: one engine, no Ray."""
    import socket
    import subprocess

    import httpx

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    threads = a.threads or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "ggtorch", "serve", a.model, "--port", str(port), "--parallel", str(a.parallel),
           "--threads", str(threads), "--alias", "m"] + (["--ctx", str(a.ctx)] if a.ctx else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise RuntimeError("ggtorch serve did not start")
            time.sleep(0.5)
        chat_load(url, min(a.clients, 2), 3, a.max_tokens)
        s = chat_load(url, a.clients, a.duration, a.max_tokens)
        s.update(replicas=0, router="direct", threads_per_replica=threads)
        return s
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--routers", default="prefix", help="prefix (Ray Serve's PrefixCacheAffinityRouter), pow2 "
                                                        "(its default router), or both: prefix,pow2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="threads per replica (default: cores / replicas)")
    ap.add_argument("--direct", action="store_true", help="first, the same load on one `ggtorch serve` process "
                                                          "without Ray (the overhead of Ray Serve's hops)")
    ap.add_argument("--kill-at", type=float, default=None)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Ray's logging set-up makes every request a line

    from ggtorch.packaged import resolve
    from ggtorch.serve_ray import ReplicaOptions, deploy, shutdown

    results = []
    if a.direct:
        s = direct(a)
        results.append(s)
        print(json.dumps(s), flush=True)
    try:
        for n in [int(x) for x in a.replicas.split(",")]:
            for router in a.routers.split(","):
                opts = ReplicaOptions(str(resolve(a.model)), parallel=a.parallel, n_ctx=a.ctx, model_name="m",
                                      threads=a.threads)
                t = time.perf_counter()
                url = deploy(opts, replicas=n, port=a.port, prefix_routing=router == "prefix")
                ready = time.perf_counter() - t
                chat_load(url, min(a.clients, 2), 3, a.max_tokens)  # warm-up: first forwards, JIT
                s = chat_load(url, a.clients, a.duration, a.max_tokens, kill_at=a.kill_at)
                s.update(replicas=n, router=router, threads_per_replica=opts.threads, deploy_s=ready)
                results.append(s)
                print(json.dumps(s), flush=True)
                from ray import serve

                serve.delete("ggtorch")
    finally:
        shutdown()
    print(f"\n{'replicas':>8} {'router':>6} {'thr':>3} {'tok/s':>7} {'req':>5} {'ok':>5} {'killed-in-flight':>16} "
          f"{'lost':>4} {'cached':>7} {'p50 s':>6}")
    for s in results:
        print(f"{s['replicas'] or 'serve':>8} {s['router']:>6} {s['threads_per_replica']:>3} {s['tok_s']:>7.1f} {s['requests']:>5} {s['ok']:>5} "
              f"{s['failed_in_flight_on_killed']:>16} {s['lost']:>4} {s['cached_share']:>7.1%} "
              f"{s['p50_s'] or 0:>6.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
