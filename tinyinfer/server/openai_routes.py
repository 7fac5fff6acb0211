"""The OpenAI endpoints: /v1/models, /v1/completions and /v1/chat/completions.

A generation request goes through the same steps on both endpoints:

1. the model named must be the one served (404 otherwise), and no parameter may ask for what
   tinyinfer does not do (400, schemas.py);
2. the prompt becomes token ids here, on the event loop (chat: the model's chat template, then
   the tokenizer without special tokens, as `tinyinfer batch` does), checked by the library
   (400: empty, past the context window), and the settings become SamplingParams (400);
3. the engine thread accepts it (engine_loop.py; 400 if the engine refuses it, 503 if too many
   requests wait);
4. its updates come back as they are generated: sent on as server-sent events (stream=true), or
   gathered into one response.

A client that goes away aborts its request at once, so its KV blocks go back to the pool: a
stream's generator is closed when its connection drops, and a plain request watches its
connection while it waits.
"""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tinyinfer.server import responses
from tinyinfer.server.engine_loop import EngineStoppedError, QueueFullError, RequestStream
from tinyinfer.server.errors import APIError, bad_request, refused_request
from tinyinfer.server.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest

RETRY_AFTER_SECONDS = 1  # what a client told "the queue is full" should wait before trying again
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold the events back


def openai_routes(served) -> APIRouter:
    """The /v1 routes of one served model (app.ServedModel: llm, name, engine_loop, created)."""
    router = APIRouter(prefix="/v1")
    llm = served.llm

    @router.get("/models")
    async def list_models():
        return {"object": "list", "data": [responses.model_card(served.name, served.created, llm.config.max_context)]}

    @router.get("/models/{model:path}")
    async def retrieve_model(model: str):
        check_model(served, model)
        return responses.model_card(served.name, served.created, llm.config.max_context)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(served, body.model)
        body.refuse_unsupported()
        prompt = body.single_prompt()
        try:
            prompt_ids = llm.prompt_ids(prompt)
        except (ValueError, TypeError) as error:
            raise refused_request(error, "prompt") from None
        return await generate(served, request, body, prompt_ids, "prompt", chat=False)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(served, body.model)
        body.refuse_unsupported()
        template = llm.tokenizer.chat_template
        if template is None:
            raise bad_request(f"{served.name} has no chat template, so it cannot lay out a conversation; "
                              "use /v1/completions with a prompt", "messages")
        try:
            text = template.render(body.conversation(), add_generation_prompt=True)
            prompt_ids = llm.prompt_ids(llm.encode(text, add_special_tokens=False))
        except (ValueError, TypeError) as error:
            raise refused_request(error, "messages") from None
        return await generate(served, request, body, prompt_ids, "messages", chat=True)

    return router


def check_model(served, model: str):
    if model != served.name:
        raise APIError(404, f"the model {model!r} does not exist here; this server serves {served.name!r}",
                       param="model", code="model_not_found")


async def generate(served, request: Request, body: GenerationRequest, prompt_ids: list[int], prompt_param: str,
                   chat: bool) -> Response:
    """Hand the request to the engine thread; stream its answer or return it whole."""
    params = body.sampling_params(len(prompt_ids), served.llm.config.max_context)
    try:
        stream = await served.engine_loop.submit(prompt_ids, params)
    except QueueFullError as error:
        raise APIError(503, str(error), type="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except EngineStoppedError as error:
        raise APIError(503, str(error), type="server_error", code="engine_stopped") from None
    except Exception as error:  # noqa: BLE001 - what the engine refused: a 400 (anything else re-raised as a 500)
        raise refused_request(error, prompt_param) from None

    answer = Answer(served.name, "chatcmpl" if chat else "cmpl", chat)
    if body.stream:
        # the BackgroundTask aborts a request whose client left before the first event was sent
        # (the generator's own `finally` cannot: it never started)
        return StreamingResponse(answer.events(served.engine_loop, stream, body.include_usage()),
                                 media_type="text/event-stream", headers=STREAM_HEADERS,
                                 background=BackgroundTask(abort_request, served.engine_loop, stream))
    last = await last_update_unless_disconnected(served.engine_loop, stream, request)
    if last is None:
        return Response(status_code=499)  # nobody is listening; nginx's code for "client closed request"
    return JSONResponse(answer.whole(last.output))


class Answer:
    """One request's response, in the endpoint's shapes (responses.py)."""

    def __init__(self, model: str, id_prefix: str, chat: bool):
        self.model, self.chat = model, chat
        self.id, self.created = responses.new_id(id_prefix), responses.now()
        if chat:
            self.text_chunk = responses.TextChunks(lambda text: responses.chat_chunk(
                self.id, self.created, self.model, {"content": text}))
        else:
            self.text_chunk = responses.TextChunks(lambda text: responses.completion_chunk(
                self.id, self.created, self.model, text))

    def whole(self, output) -> dict:
        counts = responses.usage(len(output.prompt_token_ids), len(output.token_ids))
        build = responses.chat_completion if self.chat else responses.completion
        return build(self.id, self.created, self.model, output.text, output.finish_reason, counts)

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> bytes:
        """A chunk of the stream: a new piece of text (the common case, from the template), the
        first of a chat (the role), or the last (the finish reason)."""
        if finish_reason is None and not first:
            return self.text_chunk(text)
        if not self.chat:
            return responses.sse(responses.completion_chunk(self.id, self.created, self.model, text, finish_reason))
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return responses.sse(responses.chat_chunk(self.id, self.created, self.model, delta, finish_reason))

    async def events(self, engine_loop, stream: RequestStream, include_usage: bool):
        """The server-sent events of a streamed answer: a chunk per update (per token, or what
        came within the chunk interval), the finish reason on the last, the usage if asked, and
        [DONE]; those three in one write."""
        try:
            if self.chat:
                yield self.chunk("", first=True)  # OpenAI's first chat chunk: the role
            async for update in stream:
                if not update.finished:
                    if update.new_text:
                        yield self.chunk(update.new_text)
                    continue
                output = update.output
                ending = self.chunk(update.new_text or "", output.finish_reason)
                if include_usage:
                    counts = responses.usage(len(output.prompt_token_ids), len(output.token_ids))
                    object_name = "chat.completion.chunk" if self.chat else "text_completion"
                    usage = responses.usage_chunk(self.id, self.created, self.model, object_name, counts)
                    ending += responses.sse(usage)
                yield ending + responses.DONE
        except EngineStoppedError as error:  # the status line is gone already: the error is an event
            yield responses.sse({"error": {"message": str(error), "type": "server_error", "param": None,
                                           "code": "engine_stopped"}})
        finally:
            engine_loop.abort(stream)  # the client went away (or the server stops): free its blocks


async def abort_request(engine_loop, stream: RequestStream):
    """engine_loop.abort, as a coroutine: Starlette runs a plain function given as a
    BackgroundTask on a worker thread, a thread switch per request for a call of a microsecond."""
    engine_loop.abort(stream)


async def last_update_unless_disconnected(engine_loop, stream: RequestStream, request: Request):
    """Wait for the request's last update while watching its connection: if the client goes
    first, abort the request and return None."""

    async def gather():
        async for update in stream:
            if update.finished:
                return update

    gathering = asyncio.ensure_future(gather())
    disconnected = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({gathering, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (the server shutting down)
        disconnected.cancel()
        if not gathering.done():
            gathering.cancel()
            engine_loop.abort(stream)
    if not gathering.done() or gathering.cancelled():
        return None
    try:
        return gathering.result()
    except EngineStoppedError as error:
        raise APIError(503, str(error), type="server_error", code="engine_stopped") from None


async def client_gone(request: Request):
    """Return once the client has closed its connection. The body has been read, so the
    next message the server passes on is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
