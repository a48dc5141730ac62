"""`ggtorch serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    from ggtorch.server import create_app
    app = create_app(ggtorch.load("smollm2-135m"), parallel=4)   # any ASGI server can run it

or ``ggtorch serve smollm2-135m --port 8080``. Endpoints: /v1/chat/completions, /v1/completions,
/v1/models, /health, /tokenize, /detokenize, /apply-template.
"""
from __future__ import annotations

from .app import create_app


def serve(model, host: str = "127.0.0.1", port: int = 8080, **kw) -> None:
    """Run the server until interrupted (uvicorn, one process, one model)."""
    import uvicorn

    app = create_app(model, **kw)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info", timeout_graceful_shutdown=2)


__all__ = ["create_app", "serve"]
