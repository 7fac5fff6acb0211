"""An OpenAI-compatible HTTP server over the engine: `tinyinfer serve`, or `create_app(llm)`.

Needs the serve extra: pip install "tinyinfer[serve]" (FastAPI, uvicorn, prometheus-client).

    app.py            create_app: the FastAPI app, its routes, middleware and lifespan
    engine_loop.py    the one thread that owns llm.engine; handlers talk to it through queues
    openai_routes.py  /v1/models, /v1/completions, /v1/chat/completions (streamed or whole)
    schemas.py        the request bodies, and their settings as SamplingParams
    responses.py      the response bodies and stream chunks, in OpenAI's shapes
    errors.py         OpenAI-shaped errors for every status the server returns
    middleware.py     the API key and body-size checks, before any route
    metrics.py        the Prometheus metrics of GET /metrics
    static/           the chat page served at /
"""

from tinyinfer.server.app import create_app

__all__ = ["create_app"]
