"""The server as one FastAPI app: `create_app(llm)`, then run it with uvicorn.

    app = create_app(tinyinfer.load(), api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `tinyinfer serve` does

What it holds, outside in:

    APIKeyCheck       /v1/... needs `Authorization: Bearer KEY` (when there is a key)   middleware.py
    BodySizeLimit     a body over max_body_bytes is refused with 413                     middleware.py
    routes            /v1/models, /v1/completions, /v1/chat/completions            openai_routes.py
                      /health, /metrics                                                  here
                      /  the chat page (static/index.html, loading /static/...)          here
    EngineLoop        the one thread that runs llm.engine, started and stopped
                      with the app (its lifespan)                                    engine_loop.py
"""

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from tinyinfer.errors import TokenizerMissingError
from tinyinfer.server.engine_loop import EngineLoop
from tinyinfer.server.errors import install_error_handlers
from tinyinfer.server.metrics import ServerMetrics
from tinyinfer.server.middleware import APIKeyCheck, BodySizeLimit
from tinyinfer.server.openai_routes import openai_routes

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the chat page: index.html and what it loads


@dataclass
class ServedModel:
    """What the routes need: the model, the name clients call it by, and the engine thread."""

    llm: object
    name: str
    engine_loop: EngineLoop
    metrics: ServerMetrics
    created: int  # when the server started (Unix seconds), the "created" of /v1/models


def create_app(llm, *, model_name: str | None = None, api_key: str | None = None, max_waiting: int = 256,
               max_body_bytes: int = 1_000_000, chunk_interval: float = 0.02) -> FastAPI:
    """An OpenAI-compatible server for `llm`, a tinyinfer.LLM with a tokenizer.

    model_name: what clients must pass as "model" (default: llm.name, "bard" for the bundled
    model). api_key: the key /v1/... requires (None: no key). max_waiting: how many requests may
    wait for their first token before new ones get 503 with Retry-After. max_body_bytes: the
    largest request body accepted (413 past it). chunk_interval: how often, in seconds, the tokens
    held back go out, each stream's as one chunk (a request's first text and its last token go
    at once): each chunk costs the server the same whatever it holds, and 20 ms (50 updates a
    second, under a screen's refresh rate) costs bard's streams little and saves the server
    much; 0 sends every token alone (engine_loop.EngineLoop).

    The app serves llm.engine from a thread of its own while it runs (its lifespan), so nothing
    else may step that engine meanwhile; to change its settings, replace it first:
    llm.engine = llm.new_engine(EngineConfig(max_num_seqs=...))."""
    if llm.tokenizer is None:
        raise TokenizerMissingError("Serving text over HTTP")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string, or None for no key")
    for name, value in (("max_waiting", max_waiting), ("max_body_bytes", max_body_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(chunk_interval, bool) or not isinstance(chunk_interval, (int, float)) or not 0 <= chunk_interval < 10:
        raise ValueError(f"chunk_interval must be a number of seconds from 0 to 10, got {chunk_interval!r}")
    metrics = ServerMetrics()
    engine_loop = EngineLoop(llm.engine, metrics, max_waiting, chunk_interval)
    served = ServedModel(llm, model_name or llm.name, engine_loop, metrics, int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            served.engine_loop.stop()

    app = FastAPI(title="tinyinfer", summary=f"OpenAI-compatible API for {served.name}", lifespan=lifespan)
    app.state.served = served
    install_error_handlers(app)
    app.include_router(openai_routes(served))

    @app.get("/health")
    async def health():
        """200 while the engine thread runs; 503 once it has stopped (a failed step)."""
        if served.engine_loop.running:
            return {"status": "ok", "model": served.name}
        return JSONResponse({"status": "engine stopped", "error": str(served.engine_loop.error)}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC_DIR / "index.html")

    # what the page loads (chat.js, chat.css), under /static/ so that no other path falls to it:
    # GET /v1/completions is a 405, not a missing file
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # the middleware added last runs first: the key is checked before the body is read
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(APIKeyCheck, api_key=api_key)
    return app
