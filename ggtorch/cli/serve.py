"""`ggtorch serve`: the OpenAI-compatible server (ggtorch.server) over continuous batching."""
from __future__ import annotations

import logging
import os
import sys

from ..errors import GGTorchError
from .common import add_context, add_model, load, lora_specs, show_context


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve one model over an OpenAI-compatible API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models, /health, /tokenize, /detokenize, /apply-template, "
                                   "/lora-adapters). Adapters loaded with --lora/--lora-scaled can be switched per "
                                   "request (the lora field). Up to --parallel requests are decoded together in one batch; more wait in a queue.")
    add_model(p, optional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--parallel", "-np", type=int, default=4, help="sequences decoded together (slots; default 4)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (except /health, /v1/models)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot (default 64); "
                                                         "beyond that: 503 with Retry-After")
    p.add_argument("--max-body", type=int, default=8 << 20, help="largest request body in bytes (default 8 MiB)")
    p.add_argument("--alias", default=None, help="model id reported to clients (default: the MODEL argument)")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="a named template of the file (tokenizer.chat_template.NAME), a built-in (chatml, gemma) "
                        "or a .jinja file, used instead of the file's own; its tool-call format is what the "
                        "server parses (e.g. a Hermes or Qwen template gives a ChatML model <tool_call> calls)")
    g = p.add_argument_group("pipeline (one process per stage, started by torchrun)")
    g.add_argument("--pipeline", type=int, default=None, metavar="N",
                   help="split the layers across N processes started by torchrun --nproc-per-node N; stage 0 serves "
                        "HTTP, batches and samples")
    g.add_argument("--micro-batches", type=int, default=1, metavar="M",
                   help="cut each batched step into M parts that overlap across the stages (default 1)")
    g.add_argument("--pipeline-timeout", type=float, default=None, metavar="S",
                   help="seconds a stage waits for another before the requests in flight fail (default 60)")
    add_context(p, ctx_help="context in tokens, shared equally by the slots as llama-server does (default: the "
                            "model's trained context, capped at 4096); a prompt longer than a slot's share is refused")
    from ..serve_ray import add_arguments

    add_arguments(p)


def cmd_serve(a) -> int:
    if a.parallel < 1 or a.parallel > 256:
        raise GGTorchError(f"--parallel must be in 1..256, got {a.parallel}")
    if a.context_shift:
        raise GGTorchError("serve does not shift the context: a sequence that fills its slot ends with "
                           "finish_reason 'length'")
    if not 0 < a.port < 65536:
        raise GGTorchError(f"--port must be in 1..65535, got {a.port}")
    if a.micro_batches < 1:
        raise GGTorchError(f"--micro-batches must be >= 1, got {a.micro_batches}")
    if a.pipeline is None and a.micro_batches != 1:
        raise GGTorchError("--micro-batches splits a pipeline's steps: it needs --pipeline N")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    template = getattr(a, "chat_template", None)
    replicated = any(getattr(a, k, None) is not None for k in ("replicas", "min_replicas", "max_replicas"))
    if getattr(a, "ray_address", None) and not replicated:
        a.replicas = 1  # --ray-address alone: one replica on that cluster
        replicated = True
    if template is not None:  # a bad --chat-template fails before the weights load (as `chat` does)
        from ..chat import model_template
        from ..gguf.reader import GGUFFile
        from ..packaged import resolve

        with GGUFFile(resolve(a.model)) as f:
            _, label = model_template(f.metadata, template)
        if os.environ.get("RANK", "0") == "0":
            print(f"ggtorch serve: chat template {label}", file=sys.stderr)
    if replicated:
        if a.pipeline:
            raise GGTorchError("--replicas and --pipeline do not combine: a replica is one process")
        return _serve_replicas(a, template)
    if a.pipeline:  # one torchrun process per stage: stage 0 serves, the others run their layers for it
        from ..dist.pipeline import cli

        return cli(a, lambda m: _serve(a, m, template))
    return _serve(a, load(a), template)


def _serve(a, m, template) -> int:
    from ..server import serve

    n_ctx = m.n_ctx
    if n_ctx // a.parallel < 2:
        raise GGTorchError(f"--ctx {n_ctx} leaves fewer than 2 tokens per slot for --parallel {a.parallel}")
    show_context(m)
    for i, (ad, s) in enumerate(m.loras):  # the ids that GET /lora-adapters and a request's lora field use
        print(f"ggtorch serve: LoRA adapter {i}: {ad.path} (scale {s:g})", file=sys.stderr)
    name = a.alias or a.model
    stages = f", {a.pipeline} pipeline stages x {a.micro_batches} micro-batches" if a.pipeline else ""
    print(f"ggtorch serve: {name} on http://{a.host}:{a.port} ({a.parallel} slots x {n_ctx // a.parallel} tokens"
          f"{stages})", file=sys.stderr)
    serve(m, host=a.host, port=a.port, parallel=a.parallel, n_ctx=n_ctx, api_key=a.api_key, max_queue=a.queue,
          max_body=a.max_body, model_name=name, chat_template=template)
    return 0


def _serve_replicas(a, template) -> int:
    """--replicas/--min-replicas/--max-replicas: the same server, N replicas behind Ray Serve (ggtorch.serve_ray)."""
    from ..packaged import resolve
    from ..serve_ray import ReplicaOptions, serve_forever

    path = resolve(a.model)  # a missing file fails here, in one line, not in N replica constructors
    if a.device != "cpu":
        raise GGTorchError("--replicas runs CPU replicas for now (--device cuda is for one process)")
    load_kw = {"kv_dtype": a.cache_type, "cache": a.cache, "ggml_numerics": a.ggml_numerics,
               "lora": lora_specs(a) or None}
    opts = ReplicaOptions(str(path), parallel=a.parallel, n_ctx=a.ctx, threads=a.threads, fast=a.fast,
                          api_key=a.api_key, max_queue=a.queue, max_body=a.max_body, model_name=a.alias or a.model,
                          chat_template=template, load_kw=load_kw)
    serve_forever(opts, replicas=1 if a.replicas is None else a.replicas, min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                  host=a.host, port=a.port, ray_address=a.ray_address, prefix_routing=a.prefix_routing)
    return 0
