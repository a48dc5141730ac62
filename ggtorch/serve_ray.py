"""Replicas of the OpenAI server behind one endpoint, with Ray Serve (the optional extra ``ggtorch[ray]``).

    ggtorch serve smollm2-135m --replicas 2                     # a local Ray, started on demand
    ggtorch serve smollm2-135m --min-replicas 1 --max-replicas 4 --ray-address auto   # an existing cluster
    python -m ggtorch.serve_ray smollm2-135m --replicas 2

Two Ray Serve deployments in one application:

- ``Replica`` (N of them, or autoscaled between --min/--max on queue length): each loads the model and
  runs the server package's own FastAPI app (``ggtorch.server.create_app``) with its own engine and
  continuous batching. Requests reach that app in-process as ASGI calls, so every route, parameter
  and error of ``ggtorch serve`` is the same here.
- ``Front`` (one, no CPU reserved): the HTTP ingress behind Ray Serve's proxy. It reads the body,
  lifts the chat's ``messages`` (or the completion's ``prompt``) onto the argument it passes through
  its deployment handle, and streams the replica's answer back.

Routing is Ray Serve's: the Replica deployment's request router is Ray Serve's
``PrefixCacheAffinityRouter`` (ray.serve.llm), which keeps a prefix tree of the prompts each replica has
seen and sends a request to the replica that matched most of it (a chat's next turn finds the slot
that holds its conversation) while the replicas' queues differ by less than ``parallel``; otherwise,
and when nothing matches, Ray's power-of-two-choices picks the less loaded of two. Ray's HTTP proxy
hands the replica only a serialized ASGI scope, with the body still to be read, so a router in front
of an ``@serve.ingress`` replica never sees the prompt: that is why the Front reads it first (the same
split as Ray Serve LLM's OpenAI ingress and its LLM server deployments).

A replica that dies (killed, out of memory) fails the requests it had in flight: a request not yet
answered gets a 503 OpenAI error object, a stream already under way ends with an SSE ``error`` event
(the ``openai`` client raises it); Ray Serve's controller starts a new replica and its router sends new
requests to the live ones meanwhile.
"""
# no `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request) at definition

import asyncio
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GGTorchError

log = logging.getLogger("ggtorch.serve_ray")

APP_NAME = "ggtorch"
REPLICA_HEADER = "x-ggtorch-replica"  # which replica answered (its Ray Serve replica id)
_local = False  # this process started the Ray it is connected to (shutdown() then stops it)
_PROMPT_PATHS = ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions")


class RayServeError(GGTorchError):
    """Ray Serve is missing, or the replicas could not be deployed."""


def _require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise RayServeError("replicas need Ray Serve: pip install 'ggtorch[ray]' (ray[serve]==2.60.0)") from None


@dataclass
class Forwarded:
    """One HTTP request as the Front passes it to a replica through the deployment handle.

    ``messages`` / ``prompt`` are the attributes Ray Serve's PrefixCacheAffinityRouter reads from a
    request's arguments (its _extract_text_from_request); they are None outside the two completion routes."""
    method: str
    path: str
    query: bytes
    headers: list
    body: bytes
    client: tuple | None = None
    messages: list | None = None
    prompt: object = None


@dataclass
class ReplicaOptions:
    """What each replica loads and how its server is set (the options of ``ggtorch serve``)."""
    model: str
    parallel: int = 4
    n_ctx: int | None = None
    threads: int | None = None
    fast: bool = True
    api_key: str | None = None
    max_queue: int = 64
    max_body: int = 8 << 20
    model_name: str | None = None
    chat_template: str | None = None
    load_kw: dict = field(default_factory=dict)  # further ggtorch.load arguments (kv_dtype, lora...)


# ---- the router ---------------------------------------------------------------------------------------
def _router_class():
    try:  # the public name, ray.serve.llm.request_router, imports all of ray[llm] (pyarrow...) first: the
        # class itself needs none of it, so it is taken from where it is defined
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
    except ImportError:
        from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    class PromptAffinityRouter(PrefixCacheAffinityRouter):
        """Ray Serve's prefix-cache router, told that requests without a prompt (/health, /v1/models,
        /tokenize...) have no text to match: they go to power-of-two choices instead of failing (the
        library raises ValueError on an argument that has neither ``messages`` nor ``prompt``)."""

        def _extract_text_from_request(self, pending_request):
            for arg in pending_request.args or ():
                value = getattr(arg, "messages", None)
                if value is None:
                    value = getattr(arg, "prompt", None)
                if value is not None:
                    text = self._normalize_prompt_to_string(value)
                    return text or None  # token-id prompts normalise to "": nothing to match
            return None

    PromptAffinityRouter.__module__ = __name__
    PromptAffinityRouter.__qualname__ = "PromptAffinityRouter"
    return PromptAffinityRouter


def __getattr__(name):  # the router class needs ray at import: made on first use (Ray imports it by path)
    if name == "PromptAffinityRouter":
        cls = _router_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# ---- the replica --------------------------------------------------------------------------------------
class ReplicaServer:
    """One engine and the server app over it, driven in-process with ASGI calls.

    The model is loaded on a thread of its own, which then runs the engine loop: the decode loop is
    fastest on the thread that loaded the model (BatchEngine.run_forever says why), and the replica's
    event loop stays free for the app's routes."""

    def __init__(self, opts: ReplicaOptions):
        ready, failed = threading.Event(), []

        def engine_thread():
            try:
                import ggtorch
                from .server import create_app

                m = ggtorch.load(opts.model, threads=opts.threads, fast=opts.fast, n_ctx=opts.n_ctx, **opts.load_kw)
                n_ctx = m.n_ctx
                if n_ctx // opts.parallel < 2:
                    raise GGTorchError(f"--ctx {n_ctx} leaves fewer than 2 tokens per slot for --parallel {opts.parallel}")
                self.app = create_app(m, parallel=opts.parallel, n_ctx=n_ctx, api_key=opts.api_key,
                                      max_queue=opts.max_queue, max_body=opts.max_body,
                                      model_name=opts.model_name or opts.model, engine_thread=False,
                                      chat_template=opts.chat_template)
                self.engine = self.app.state.server.engine
            except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
                failed.append(e)
                ready.set()
                return
            ready.set()
            self.engine.run_forever()

        self._thread = threading.Thread(target=engine_thread, name="ggtorch-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        self._tasks: set = set()
        try:
            from ray import serve

            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Ray Serve (unit use): no id
            self.replica_id = str(os.getpid())

    async def forward(self, req: Forwarded):
        """The app's answer to ``req``: first ("start", status, headers), then the body's chunks."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await gone.wait()  # the app listens for a disconnect: it comes when the caller goes away
            return {"type": "http.disconnect"}

        async def send(msg):
            out.put_nowait(msg)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
                 "root_path": "", "query_string": req.query, "headers": [tuple(h) for h in req.headers],
                 "client": tuple(req.client) if req.client else None, "server": ("ggtorch-replica", 0),
                 "state": {}}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), out.put_nowait(None)))
        try:
            while True:
                msg = await out.get()
                if msg is None:
                    break
                if msg["type"] == "http.response.start":
                    headers = list(msg.get("headers") or []) + [(REPLICA_HEADER.encode(), self.replica_id.encode())]
                    yield ("start", msg["status"], headers)
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body", False):
                        break
        finally:
            gone.set()  # a cancelled call (the client left) cancels the request in the engine

    async def check_health(self):
        """Ray Serve's health check: the engine thread must be alive."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


# ---- the front --------------------------------------------------------------------------------------
def _front_app(replicas, max_body: int):
    """The ingress app: every path goes to a replica; /health also reports the deployment's replicas."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def error(status: int, message: str, code: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "unavailable_error", "param": None,
                                       "code": code}}, status_code=status,
                            headers={"Retry-After": "1"} if status == 503 else None)

    async def call(request: Request, path: str, body: bytes):
        fwd = Forwarded(request.method, path, request.scope.get("query_string", b""),
                        list(request.scope.get("headers") or []), body, request.scope.get("client"))
        if request.method == "POST" and path in _PROMPT_PATHS:
            try:  # only to route by; the replica parses the body properly and answers a bad one with a 400
                doc = json.loads(body)
                if isinstance(doc, dict):
                    fwd.messages = doc.get("messages") if isinstance(doc.get("messages"), list) else None
                    fwd.prompt = doc.get("prompt") if isinstance(doc.get("prompt"), (str, list)) else None
            except ValueError:
                pass
        gen = replicas.options(stream=True).forward.remote(fwd)
        try:
            first = await gen.__anext__()
        except BaseException as e:
            gen.cancel()
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return None, gen, e
        return first, gen, None

    async def health_of_replicas():
        from ray import serve
        from starlette.concurrency import run_in_threadpool

        st = await run_in_threadpool(serve.status)
        dep = st.applications[APP_NAME].deployments["Replica"]
        states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
        return {"status": str(getattr(dep.status, "value", dep.status)), "replica_states": states}

    @app.get("/health")
    async def health(request: Request):
        try:
            replicas_info = await health_of_replicas()
        except Exception as e:  # noqa: BLE001 - the controller is unreachable: say so, still answer
            replicas_info = {"status": "UNKNOWN", "error": f"{type(e).__name__}: {e}"}
        first, gen, err = await call(request, "/health", b"")
        engine = None
        if err is None:
            chunks = [c async for c in gen]
            try:
                engine = json.loads(b"".join(chunks))
            except ValueError:
                engine = None
            engine = dict(engine or {}, replica=dict((k.decode(), v.decode()) for k, v in first[2]).get(REPLICA_HEADER))
        running = replicas_info.get("replica_states", {}).get("RUNNING", 0)
        ok = engine is not None
        body = {"status": "ok" if ok else "unavailable", "replicas_running": running, "deployment": replicas_info,
                "one_replica": engine if ok else {"error": f"{type(err).__name__}: {err}"}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS", "PUT", "DELETE", "PATCH"])
    async def proxy(request: Request, path: str):
        chunks, size = [], 0
        async for c in request.stream():  # the replica refuses an oversize body (413); read no more than that
            chunks.append(c)
            size += len(c)
            if size > max_body:
                break
        first, gen, err = await call(request, "/" + path, b"".join(chunks))
        if err is not None:
            from ray.serve.exceptions import BackPressureError

            if isinstance(err, BackPressureError):
                return error(503, f"the replicas are busy: {err}; retry shortly", "queue_full")
            log.warning("replica failed before answering: %s: %s", type(err).__name__, err)
            return error(503, f"the replica serving this request failed ({type(err).__name__}); retry",
                         "replica_failed")
        _, status, headers = first
        streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

        async def rest():
            try:
                async for c in gen:
                    yield c
            except Exception as e:  # noqa: BLE001 - the replica died mid-answer: a clean end the client sees
                log.warning("replica failed mid-answer: %s: %s", type(e).__name__, e)
                if streaming:
                    msg = {"error": {"message": f"the replica serving this stream failed ({type(e).__name__})",
                                     "type": "server_error", "param": None, "code": "replica_failed"}}
                    yield f"data: {json.dumps(msg)}\n\n".encode()
                else:
                    raise
            finally:
                gen.cancel()

        resp = StreamingResponse(rest(), status_code=status)
        resp.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length" or not streaming]
        return resp

    return app


# ---- deployment -----------------------------------------------------------------------------------------
def replica_counts(replicas: int, min_replicas: int | None, max_replicas: int | None) -> tuple[bool, int, int]:
    """(autoscaled?, lowest, highest) replica counts; bad counts fail here, before Ray starts."""
    if min_replicas is None and max_replicas is None:
        if replicas < 1:
            raise RayServeError(f"--replicas must be at least 1, got {replicas}")
        return False, replicas, replicas
    lo = min_replicas if min_replicas is not None else 1
    hi = max_replicas if max_replicas is not None else max(lo, replicas)
    if not 0 <= lo <= hi or hi < 1:
        raise RayServeError(f"--min-replicas {lo} / --max-replicas {hi}: need 0 <= min <= max and max >= 1")
    return True, lo, hi


def build(opts: ReplicaOptions, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
          prefix_routing: bool = True, cpus_per_replica: float = 1.0):
    """The Ray Serve application: Front -> Replica (fixed count, or autoscaled on queue length)."""
    _require_ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    autoscale, lo, hi = replica_counts(replicas, min_replicas, max_replicas)
    dep = dict(ray_actor_options={"num_cpus": cpus_per_replica},
               # a replica takes twice its slots; more wait in Ray's router, to go to whichever frees first
               max_ongoing_requests=2 * opts.parallel, max_queued_requests=opts.max_queue,
               health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    if autoscale:
        # Ray Serve scales on ongoing requests per replica (running + queued on it): above `parallel`
        # the slots are full and requests wait, so that is the target
        dep["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                     "initial_replicas": min(max(replicas, lo), hi),
                                     "target_ongoing_requests": opts.parallel,
                                     "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        dep["num_replicas"] = replicas
    if prefix_routing:
        dep["request_router_config"] = RequestRouterConfig(
            request_router_class=f"{__name__}.PromptAffinityRouter",
            request_router_kwargs={"imbalanced_threshold": opts.parallel})

    replica_cls = serve.deployment(name="Replica", **dep)(ReplicaServer)

    @serve.deployment(name="Front", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    @serve.ingress()
    class Front:
        def __init__(self, replicas, max_body):
            self._replicas, self._max_body = replicas, max_body

        def __serve_build_asgi_app__(self):
            return _front_app(self._replicas, self._max_body)

    return Front.bind(replica_cls.bind(opts), opts.max_body)


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (a Ray cluster, "auto"), or start a light local Ray: no dashboard, the
    CPUs it is told. Workers of a local Ray import this same ggtorch (its directory on PYTHONPATH)."""
    _require_ray()
    import ray

    global _local
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    _local = True
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    # address="local": a new Ray of our own, never one that another process on this host started (a bare
    # ray.init() joins the last local Ray it finds)
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, logging_level=logging.WARNING)


def deploy(opts: ReplicaOptions, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
           host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None, prefix_routing: bool = True,
           cpus_per_replica: float | None = None) -> str:
    """Start (or join) Ray, deploy the application, wait until it answers; returns its base URL."""
    _require_ray()
    if opts.parallel < 1:
        raise RayServeError(f"--parallel must be at least 1, got {opts.parallel}")
    _, _, hi = replica_counts(replicas, min_replicas, max_replicas)
    if opts.threads is None and not ray_address:  # share this host's cores between the replicas
        opts.threads = max(1, (os.cpu_count() or 1) // hi)
    cpus = cpus_per_replica if cpus_per_replica is not None else float(opts.threads or 1)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return _deploy(opts, replicas, min_replicas, max_replicas, host, port, ray_address, prefix_routing, hi, cpus)
    finally:  # Ray Serve gives the caller's root logger a stderr handler at INFO (every httpx request a
        root.handlers[:] = handlers  # line, twice under the CLI's own handler): the caller's set-up is put back
        root.setLevel(level)


def _deploy(opts, replicas, min_replicas, max_replicas, host, port, ray_address, prefix_routing, hi, cpus) -> str:
    start_ray(ray_address, num_cpus=None if ray_address else max(os.cpu_count() or 1, int(hi * cpus + 0.999)))
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build(opts, replicas, min_replicas, max_replicas, prefix_routing, cpus), name=APP_NAME,
                  route_prefix="/")
    except RuntimeError as e:
        raise RayServeError(f"the replicas did not start: {e}") from None
    return f"http://{host}:{port}"


def shutdown() -> None:
    """Tear down what deploy() made: a local Ray goes with everything on it; on a cluster, this
    application is deleted (Serve and other applications stay) and the connection closed."""
    import ray

    global _local
    if not ray.is_initialized():
        return
    try:
        if not _local:
            from ray import serve

            serve.delete(APP_NAME)
    finally:
        _local = False
        ray.shutdown()


def serve_forever(opts: ReplicaOptions, **kw) -> None:
    """Deploy, then wait for Ctrl-C/SIGTERM; tear down the application (and a local Ray) on the way out."""
    import signal
    import time

    url = deploy(opts, **kw)
    print(f"ggtorch serve: {opts.model_name or opts.model} on {url} (Ray Serve, "
          f"{_describe(kw)})", file=sys.stderr, flush=True)
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        while not stop.is_set():
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGTERM, old)
        shutdown()


def _describe(kw: dict) -> str:
    if kw.get("min_replicas") is not None or kw.get("max_replicas") is not None:
        return f"{kw.get('min_replicas', 1)}..{kw.get('max_replicas')} replicas, autoscaled on queue length"
    return f"{kw.get('replicas', 1)} replica{'s' if kw.get('replicas', 1) != 1 else ''}"


def add_arguments(p) -> None:
    """The replica options, shared by `ggtorch serve` and `python -m ggtorch.serve_ray`."""
    g = p.add_argument_group("replicas (Ray Serve; pip install 'ggtorch[ray]')")
    g.add_argument("--replicas", type=int, default=None, metavar="N", help="serve N replicas of the model behind Ray Serve's "
                                                              "HTTP proxy (a local Ray is started unless --ray-address)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscale on queue length, down to this many")
    g.add_argument("--max-replicas", type=int, default=None, metavar="N", help="autoscale on queue length, up to this many")
    g.add_argument("--ray-address", default=None, metavar="ADDR", help="a running Ray cluster (e.g. auto, "
                                                                       "ray://head:10001) instead of a local Ray")
    g.add_argument("--no-prefix-routing", dest="prefix_routing", action="store_false",
                   help="Ray Serve's default router (power of two choices) instead of its prefix-cache router")


def main(argv=None) -> int:
    """``python -m ggtorch.serve_ray MODEL --replicas N ...``: the same as ``ggtorch serve ... --replicas N``."""
    from .cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--replicas", "--min-replicas", "--max-replicas") or a.startswith(("--replicas=", "--min-replicas=",
                                                                                    "--max-replicas=")) for a in args):
        args += ["--replicas", "1"]
    return cli_main(["serve"] + args)


if __name__ == "__main__":
    sys.exit(main())
