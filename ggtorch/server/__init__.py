"""`ggtorch serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    from ggtorch.server import create_app
    app = create_app(ggtorch.load("smollm2-135m"), parallel=4)   # any ASGI server can run it

or ``ggtorch serve smollm2-135m --port 8080``. Endpoints: /v1/chat/completions, /v1/completions,
/v1/models, /health, /tokenize, /detokenize, /apply-template, /lora-adapters (GET, POST).
"""
from __future__ import annotations

from .app import create_app


def serve(model, host: str = "127.0.0.1", port: int = 8080, **kw) -> None:
    """Run the server until interrupted (uvicorn, one process, one model).

    The engine runs on the calling thread, the one that loaded the model, and uvicorn's event loop on
    another: a decode loop on a thread other than the loader's runs up to 2x slower with PyTorch's
    OpenMP (BatchEngine.run_forever says why). SIGINT/SIGTERM shut down gracefully; a second one
    forces. After a SIGINT's shutdown it raises KeyboardInterrupt; after a SIGTERM's it returns."""
    import signal
    import threading

    import uvicorn

    from ..errors import GGTorchError

    import sys

    # The engine thread releases the GIL in every torch op and foreign call of a step (~50 for a sampled
    # step) and must take it back from uvicorn's thread, which holds it for up to the switch interval
    # (5 ms by default) while it formats streams. A shorter interval hands it back sooner: measured here
    # (serve_load, 8 clients, same machine minutes apart) greedy 342-393 -> 428-430 tok/s, T 0.8
    # 327-345 -> 378-382.
    sys.setswitchinterval(0.0002)
    app = create_app(model, engine_thread=False, **kw)
    engine = app.state.server.engine
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info",
                                           timeout_graceful_shutdown=2))
    http = threading.Thread(target=server.run, name="uvicorn", daemon=True)

    stopped_by = []

    def _stop(signum, frame):
        stopped_by.append(signum)
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        engine.run_forever(alive=http.is_alive)  # serves in-flight requests until uvicorn has closed
    finally:
        server.should_exit = True
        http.join(10)
        for s, h in old.items():
            signal.signal(s, h)
    if stopped_by and stopped_by[0] == signal.SIGINT:  # Ctrl-C, after the graceful shutdown: the caller sees it
        raise KeyboardInterrupt  # as Python's default handler would have it (the CLI: one line, exit 130)
    if not server.started:
        raise GGTorchError(f"could not serve on {host}:{port} (see the error above; is the port in use?)")


__all__ = ["create_app", "serve"]
