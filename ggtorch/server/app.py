"""The HTTP front: FastAPI routes over one BatchEngine. The model runs on the engine's thread (the main
thread under `ggtorch serve`, the event loop in another); the
routes only parse, tokenize, queue and format, so requests never wait for each other here.

Every client mistake is answered with an OpenAI error object and a 4xx; an unexpected failure is a
500 for that one request, logged, and the server goes on.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..batch import BatchEngine, QueueFullError
from ..errors import GGTorchError, LoRAError
from ..lora.slots import parse_scales
from . import schema
from ..toolcall import template_takes_tools, with_tools_prompt
from .jobs import ClientGone, Job, ToolPlan
from .schema import APIError, bad

log = logging.getLogger("ggtorch.server")

OPEN_PATHS = ("/health", "/v1/models", "/models")


class Server:
    """The state behind the routes: the model, its engine, the settings."""

    def __init__(self, model, parallel: int = 4, n_ctx: int = 4096, api_key: str | None = None,
                 max_queue: int = 64, max_body: int = 8 << 20, model_name: str | None = None,
                 chat_template: str | None = None):
        self.model, self.api_key, self.max_body = model, api_key, max_body
        # --chat-template: a variant, built-in or file used instead of the file's template (checked now)
        self.chat_template = chat_template
        self.template_source = model.chat_template(chat_template)[0] if hasattr(model, "chat_template") else ""
        # like llama-server: the context is shared out equally between the slots
        self.engine = BatchEngine(model, n_slots=parallel, n_ctx=max(n_ctx // parallel, 2), max_queue=max_queue)
        self.model_name = model_name or Path(str(model.path)).stem
        self.fingerprint = f"fp_ggtorch_{__version__}"
        self.started = int(time.time())

    def failure(self) -> str | None:
        """Why the model can no longer run (a pipeline whose stage was lost: ggtorch.dist), or None."""
        return getattr(self.model, "failure", None)

    def available(self) -> None:
        why = self.failure()
        if why is not None:
            raise APIError(503, f"the model is unavailable: {why}", type="unavailable_error", code="model_unavailable")

    # ---- request parts ---------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not self.api_key or request.url.path in OPEN_PATHS:
            return
        h = request.headers.get("authorization", "")
        key = h[7:].strip() if h[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    async def body(self, request: Request, want: type = dict) -> dict | list:
        self.authorize(request)
        n = request.headers.get("content-length", "")
        if n.isdigit() and int(n) > self.max_body:
            raise APIError(413, f"the request body has {n} bytes, more than the limit of {self.max_body}",
                           code="request_too_large")
        chunks, size = [], 0
        async for c in request.stream():
            size += len(c)
            if size > self.max_body:
                raise APIError(413, f"the request body is larger than the limit of {self.max_body} bytes",
                               code="request_too_large")
            chunks.append(c)
        return schema.parse_json(b"".join(chunks), want)

    def tokens_fit(self, ids: list[int]) -> None:
        n_ctx = self.engine.n_ctx
        if len(ids) >= n_ctx:
            raise APIError(400, f"the request ({len(ids)} prompt tokens) exceeds the available context size "
                                f"({n_ctx} tokens per slot); raise --ctx or shorten the prompt",
                           type="exceed_context_size_error", code="exceed_context_size_error",
                           extra={"n_prompt_tokens": len(ids), "n_ctx": n_ctx})

    def render(self, body: dict, tokenize: bool, tools=None):
        msgs = schema.messages(body)
        tools = tools or schema.tools(body)  # tool_choice none: the template sees no tools
        kw = body.get("chat_template_kwargs") or {}
        if not isinstance(kw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kw):
            raise bad("chat_template_kwargs", "chat_template_kwargs must be an object of named values", "invalid_type")
        fn = getattr(self.model, "apply_chat_template", None)
        if fn is None:
            raise APIError(501, "this build of ggtorch has no chat templates", type="not_supported_error")
        try:
            tpl = {"template": self.chat_template} if self.chat_template else {}
            if tools.render_tools and self.template_source and not template_takes_tools(self.template_source):
                msgs = with_tools_prompt(msgs, tools.render_tools)  # the template ignores tools: say them
            out = fn(msgs, tools=tools.render_tools, add_generation_prompt=True, tokenize=tokenize, **tpl, **kw)
        except GGTorchError:
            raise
        except Exception as e:  # the template refused these messages (raise_exception, a type it expects...)
            raise bad("messages", f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
        if tokenize and isinstance(out, str):
            out = self.model.tokenize(out, special=True, bos=False)
        return out

    def tool_plan(self, tools, prompt: str) -> ToolPlan | None:
        """How the answer is parsed (tool calls, reasoning) and, for a forced call (tool_choice required
        or named), the grammar that enforces it; None when there is nothing to parse."""
        src = self.template_source
        fmt_reasoning = "<think>" in src or "<|channel|>" in src
        if not (tools.parse_calls or fmt_reasoning):
            return None
        grammar = None
        lark = tools.grammar(src, prompt)
        if lark is not None:
            try:
                from ..constrain import compile_constraint
            except ImportError:
                raise APIError(501, "forced tool calls need ggtorch.constrain (structured outputs)",
                               type="not_supported_error") from None
            grammar = compile_constraint(self.model.tokenizer, lark=lark)  # ConstraintError -> 400
        return ToolPlan(src, prompt, tools.parse_calls, self.model.tokenizer, grammar)

    async def compile(self, kw: dict, param: str):
        """The request's schema/grammar compiled off the event loop (time-limited, cached by text); one
        the library rejects is a 400 naming the parameter."""
        from ..constrain import compile_constraint
        from ..errors import ConstraintError

        try:
            return await run_in_threadpool(lambda: compile_constraint(self.model.tokenizer, **kw))
        except ConstraintError as e:
            raise bad(param, str(e), "invalid_value") from None

    def tokenize_prompt(self, p) -> list[int]:
        return self.model.tokenize(p, special=True, bos=True) if isinstance(p, str) else list(p)

    # ---- completions -------------------------------------------------------------------------------
    async def complete(self, request: Request, chat: bool):
        body = await self.body(request)
        lora = self.engine.lora
        spec = schema.gen_spec(body, self.model.n_vocab, self.engine.n_ctx, chat, len(lora.adapters) if lora else 0)
        plan = None
        structured = schema.structured_output(body)
        if structured is not None:
            spec.constraint = await self.compile(*structured)
        if chat:
            tools = schema.tools(body)
            text = await run_in_threadpool(self.render, body, False, tools)
            prompts = [await run_in_threadpool(self.model.tokenizer.tokenize, text, True, True, True)]
            if tools.forced and structured is not None:
                raise bad("tool_choice", "a forced tool call (tool_choice required or named) cannot be combined "
                          f"with {structured[1]}", "invalid_value")
            plan = await run_in_threadpool(self.tool_plan, tools, text)
        else:
            items = schema.completion_prompts(body, self.model.n_vocab)
            prompts = await run_in_threadpool(lambda: [self.tokenize_prompt(p) for p in items])
        for ids in prompts:
            if not ids:
                raise bad("prompt", "the prompt is empty (no tokens)", "invalid_value")
            self.tokens_fit(ids)
        self.available()
        job = Job(chat, spec, prompts, self.model_name, self.fingerprint, self.model.tokenizer, plan)
        try:
            self.engine.submit_many(job.reqs)
        except QueueFullError as e:
            raise APIError(503, f"the server is busy: {e}; retry shortly", type="unavailable_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        info = request.scope.get("ggtorch_log")
        if spec.stream:
            return StreamingResponse(_logged(job.sse(), job, info), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            async for _ in job.events(gone):
                pass
        except ClientGone:
            job.cancel()
            _note(info, job, "client disconnected")
            return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=499)
        finally:
            gone.cancel()
            job.cancel()
        _note(info, job)
        err = next((c.error for c in job.choices if c.error), None)
        if err:
            self.available()  # the model went down under this request (a pipeline stage lost): 503, not 500
            raise RuntimeError(err)
        return JSONResponse(job.response())


async def _disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _note(info, job: Job, extra: str = "") -> None:
    if info is not None:
        u = job.usage()
        info["msg"] = (f"prompt={u['prompt_tokens']} cached={u['prompt_tokens_details']['cached_tokens']} "
                       f"completion={u['completion_tokens']} n={len(job.choices)}"
                       f"{' stream' if job.spec.stream else ''}{' ' + extra if extra else ''}")


async def _logged(gen, job: Job, info):
    finished = False
    try:
        async for chunk in gen:
            yield chunk
        finished = True
    finally:
        _note(info, job, "" if finished else "client disconnected")


class RequestLog:
    """One log line per request: client, method, path, status, seconds, and what the route noted."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, info = time.perf_counter(), [0], {}
        scope["ggtorch_log"] = info

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %s %.3fs %s", client[0], scope["method"], scope["path"], status[0] or "-",
                     time.perf_counter() - t0, info.get("msg", ""))


def create_app(model, parallel: int = 4, n_ctx: int = 4096, api_key: str | None = None, max_queue: int = 64,
               max_body: int = 8 << 20, model_name: str | None = None, engine_thread: bool = True,
               chat_template: str | None = None) -> FastAPI:
    """engine_thread=False leaves running the engine to the caller: app.state.server.engine.run_forever()
    on the thread that loaded the model is faster than a thread of its own (see BatchEngine.run_forever).
    ``chat_template``: a template to use instead of the file's (a variant name, chatml, gemma or a file),
    e.g. a Hermes or Qwen template for tool calls on a ChatML model."""
    srv = Server(model, parallel, n_ctx, api_key, max_queue, max_body, model_name, chat_template)

    @asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            srv.engine.start()
        yield
        if engine_thread:
            srv.engine.stop()

    app = FastAPI(title="ggtorch", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.server = srv
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                       expose_headers=["Retry-After"])
    app.add_middleware(RequestLog)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(GGTorchError)
    async def _ggtorch_error(request, e: GGTorchError):  # bad input found below the server (template, tokens)
        return JSONResponse(bad(None, str(e)).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return JSONResponse(bad(None, f"invalid request: {e.errors()[:3]}").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        why = srv.failure()
        if why is not None:
            return JSONResponse({"status": "error", "error": why, **srv.engine.stats()}, status_code=503)
        return {"status": "ok", **srv.engine.stats()}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        m = srv.model
        return {"object": "list", "data": [{
            "id": srv.model_name, "object": "model", "created": srv.started, "owned_by": "ggtorch",
            "meta": {"n_vocab": m.n_vocab, "n_ctx_train": m.cfg.n_ctx_train, "n_ctx_slot": srv.engine.n_ctx,
                     "n_slots": srv.engine.n_slots, "arch": m.cfg.arch}}]}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        return await srv.complete(request, chat=True)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        return await srv.complete(request, chat=False)

    @app.get("/lora-adapters")
    async def lora_adapters(request: Request):
        srv.authorize(request)
        return srv.engine.lora.info() if srv.engine.lora is not None else []

    @app.post("/lora-adapters")
    async def set_lora_adapters(request: Request):
        entries = await srv.body(request, list)
        lora = srv.engine.lora
        try:
            if lora is not None:
                lora.set_scales(entries)
            else:
                parse_scales(entries, 0, "body")  # only [] fits: there is nothing to scale
        except LoRAError as e:
            raise bad(None, str(e), "invalid_value") from None
        return {"success": True}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await srv.body(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise bad("content", "content must be a string", "invalid_type")
        add_special = schema._bool(body, "add_special", False)
        parse_special = schema._bool(body, "parse_special", True)
        ids = await run_in_threadpool(srv.model.tokenize, content, parse_special, add_special)
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await srv.body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad("tokens", "tokens must be a list of token ids", "invalid_type")
        if not all(0 <= t < srv.model.n_vocab for t in ids):
            raise bad("tokens", f"token ids must lie in 0..{srv.model.n_vocab - 1}", "invalid_value")
        return {"content": srv.model.detokenize(ids)}

    @app.post("/apply-template")
    async def apply_template(request: Request):
        body = await srv.body(request)
        return {"prompt": await run_in_threadpool(srv.render, body, False)}

    return app
