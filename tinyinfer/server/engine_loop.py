"""One thread owns the engine; the HTTP handlers talk to it through queues.

The engine (llm.engine) is not thread-safe, and each of its steps is one forward pass over
every running request. So one background thread runs it, and nothing else touches it:

    handlers (event loop thread)                 the engine thread
    submit(prompt_ids, params) -- add -->  commands  --> engine.add_request   (or the error)
                                                         engine.step()        one pass for all
    stream.updates  <-- loop.call_soon_threadsafe -----  each request's RequestUpdates
    abort(stream)   -- abort -->           commands  --> engine.abort         (blocks freed)

Between two steps the thread takes every command that has come in; while there is work it
steps, and when there is none it sleeps on the command queue (no polling). A request that
arrives while others run joins the next step: requests from all clients share forward passes,
which is continuous batching over HTTP. The handlers never wait for the engine to be free, and
a slow client only lets its own queue grow.

What a step produced for all requests goes to the event loop in one call_soon_threadsafe (one
wake-up of the loop per step, not one per token), and the engine thread waits, a bounded
time, for the handlers to have sent it on before it steps again (`_send_outbox` says why).
Tokens are held back and released together every `chunk_interval`, each request's as one
chunk of its stream, so the engine waits for the event loop once per interval rather than
once per step; a handler that fell behind also merges what piled up in its queue (`merged`).

With data parallelism llm.engine is the router (tinyinfer/parallel/router.py), with the same
calls; the step and block metrics are then those of replica 0, the engine in this process.
"""

import asyncio
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

from tinyinfer.engine import RequestUpdate
from tinyinfer.sampling import SamplingParams

logger = logging.getLogger("tinyinfer.server")

HANDOVER_TIMEOUT = 0.05  # seconds the engine waits for the handlers to take a step's updates, at most

_served_engines = weakref.WeakSet()  # engines a running EngineLoop owns: never two loops on one engine


class QueueFullError(Exception):
    """Too many requests are waiting for their first token; the client should retry later."""


class EngineStoppedError(Exception):
    """The engine thread has stopped (the server is shutting down, or a step failed)."""


@dataclass(eq=False)
class RequestStream:
    """The handler's end of one request: its updates arrive on `updates`, an asyncio.Queue
    filled on the event loop's thread. `async for update in stream` gives them until the last
    (update.finished), each the merge of whatever piled up since the previous one."""

    prompt_ids: list[int]
    params: SamplingParams
    updates: asyncio.Queue
    accepted: asyncio.Future  # the engine's request id, or the error that refused the request
    arrival_time: float = field(default_factory=time.perf_counter)
    finished: bool = False  # the handler has seen its last update
    # kept by the engine thread
    request_id: int | None = None
    first_token_time: float | None = None
    num_tokens: int = 0
    held: list = field(default_factory=list)  # updates not yet handed over (chunk_interval)
    text_shown: bool = False  # some text has gone (a token may show none until the next completes a word)

    on_sent: object = None  # EngineLoop._sent: called when the handler comes back for more

    async def __aiter__(self):
        while not self.finished:
            pieces = [await self.updates.get()]
            while not self.updates.empty():
                pieces.append(self.updates.get_nowait())
            for piece in pieces:
                if isinstance(piece, BaseException):
                    raise piece
            update = merged(pieces)
            self.finished = update.finished
            yield update
            self.on_sent(self)  # the handler asks for the next: it has sent this one on


def merged(updates: list[RequestUpdate]) -> RequestUpdate:
    """Several updates of one request as one: their tokens and text joined, the last one's state."""
    if len(updates) == 1:
        return updates[0]
    last = updates[-1]
    text = None if last.new_text is None else "".join(u.new_text or "" for u in updates)
    return RequestUpdate(last.request_id, [t for u in updates for t in u.new_token_ids], text, last.finished,
                         last.output)


class EngineLoop:
    """Runs llm.engine on a thread of its own; handlers submit requests and read their updates.

    max_waiting: how many requests may wait for their first token (queued in the engine, or
    with their prompt still being computed) before submit refuses new ones (QueueFullError:
    the server answers 503 with Retry-After). metrics: a ServerMetrics to record into, or None.

    chunk_interval: how often, in seconds, the tokens held back go to the handlers, every
    request's at once (each request's become one chunk of its stream); a request's first text
    and its last token go at once. Every chunk costs the event loop the same (a task switch, a
    JSON event, a socket write) whatever it holds, and every handover makes the engine wait for
    the event loop (_send_outbox): with a model as quick as bard (a step of 16 sequences in
    2.5 ms), releasing every 20 ms served about 10 % more tokens per second than a chunk per token
    (benchmarks/serve_load.py), while a slower model, whose steps take longer than that, still
    sends each token alone. 0 sends every token as it comes.
    """

    def __init__(self, engine, metrics=None, max_waiting: int = 256, chunk_interval: float = 0.0):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.chunk_interval = chunk_interval
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None  # why the engine thread stopped, if a step failed
        # owned by the engine thread
        self.live: dict[int, RequestStream] = {}  # request id -> stream, for requests in the engine
        self.num_waiting = 0  # live requests without a token yet
        self.holding: dict[RequestStream, None] = {}  # streams with updates held back (chunk_interval)
        self.released_at = 0.0  # when the held updates last went to the handlers (or began to be held)
        self.outbox: list = []  # (function, argument) pairs for the event loop, sent once per turn
        self.delivered = threading.Event()  # set by the event loop once the handlers have sent the outbox on
        self.unsent: set[RequestStream] = set()  # (event loop thread) streams the engine waits for, this turn

    # ---- the handlers' side (event loop thread) ------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop):
        """Start the engine thread; its results go to `loop`, the event loop of the handlers."""
        if self.engine in _served_engines:
            raise RuntimeError("this engine is already served by another EngineLoop; give each app its own LLM "
                               "(or llm.engine = llm.new_engine(...))")
        _served_engines.add(self.engine)
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="tinyinfer-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None):
        """Finish the step in progress, abort every request left, and end the thread. Called on
        the event loop's thread (the app's lifespan), like submit and abort."""
        if self.thread is None:
            return
        self.commands.put(("stop", None))
        self.thread.join(timeout)
        _served_engines.discard(self.engine)
        while True:  # a request submitted as the thread ended: refused here, so no handler waits forever
            try:
                kind, stream = self.commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                _settle((stream.accepted, EngineStoppedError("the server is shutting down")))

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request for the engine; returns its stream once the engine has accepted it.
        Raises what engine.add_request raised (ContextLengthError, KVCacheTooSmallError, ...),
        QueueFullError, or EngineStoppedError."""
        if not self.running:
            raise EngineStoppedError(f"the engine is not running{f': {self.error}' if self.error else ''}")
        stream = RequestStream(prompt_ids, params, asyncio.Queue(), self.loop.create_future(), on_sent=self._sent)
        self.commands.put(("add", stream))
        try:
            await stream.accepted
        except asyncio.CancelledError:  # the handler was cancelled while the engine looked at it
            self.abort(stream)
            raise
        return stream

    def abort(self, stream: RequestStream):
        """Stop a request (its client went away); its KV blocks go back to the pool. A no-op
        for a request that has finished."""
        self._sent(stream)  # nothing more to wait for
        if not stream.finished:
            stream.finished = True
            self.commands.put(("abort", stream))

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self):
        try:
            while self._take_commands(wait=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                self._record_state()
                self._send_outbox()
        except BaseException as error:  # noqa: BLE001 - a failed step: every request must hear of it
            logger.exception("the engine failed; no more requests are served")
            self.error = error
        finally:
            self._end_all(EngineStoppedError(f"the engine stopped{f': {self.error}' if self.error else ''}"))

    def _take_commands(self, wait: bool) -> bool:
        """Carry out every command waiting (first waiting for one, when there is no work);
        False once told to stop."""
        try:
            command = self.commands.get(block=wait)
        except queue.Empty:
            return True
        while True:
            kind, stream = command
            if kind == "stop":
                return False
            if kind == "add":
                self._add(stream)
            else:
                self._abort(stream)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, stream: RequestStream):
        if self.num_waiting >= self.max_waiting:
            self._refuse(stream, QueueFullError(f"{self.num_waiting} requests are waiting already "
                                                f"(the server's limit is {self.max_waiting}); retry later"))
            return
        try:
            stream.request_id = self.engine.add_request(stream.prompt_ids, stream.params)
        except Exception as error:  # noqa: BLE001 - the request's fault (bad prompt, too long): the handler says so
            self._refuse(stream, error)
            return
        self.live[stream.request_id] = stream
        self.num_waiting += 1
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(stream.prompt_ids))
        self.outbox.append((_settle, (stream.accepted, stream.request_id)))

    def _refuse(self, stream: RequestStream, error: Exception):
        if self.metrics:
            self.metrics.requests_refused.labels("queue_full" if isinstance(error, QueueFullError) else "bad").inc()
        self.outbox.append((_settle, (stream.accepted, error)))

    def _abort(self, stream: RequestStream):
        if self.live.pop(stream.request_id, None) is None:
            return  # refused, or finished before the abort came
        self.engine.abort(stream.request_id)
        self.holding.pop(stream, None)
        if stream.first_token_time is None:
            self.num_waiting -= 1
        if self.metrics:
            self.metrics.requests_finished.labels("abort").inc()

    def _step(self):
        """One engine step; each update goes to its request's stream: at once (a first text,
        a last token), or held until the next release, every chunk_interval."""
        updates = self.engine.step()
        now = time.perf_counter()
        for update in updates:
            stream = self.live.get(update.request_id)
            if stream is None:
                continue  # aborted while its step ran
            if stream.first_token_time is None:
                stream.first_token_time = now
                self.num_waiting -= 1
                if self.metrics:
                    self.metrics.time_to_first_token.observe(now - stream.arrival_time)
            stream.num_tokens += len(update.new_token_ids)
            if update.finished:
                del self.live[update.request_id]
                self._record_finished(stream, update, now)
            stream.held.append(update)
            if update.finished or not stream.text_shown:  # its last, or up to its first text
                stream.text_shown = bool(update.new_text)
                self._hand_over(stream)
            else:
                if not self.holding:
                    self.released_at = now  # the interval runs from the first token held
                self.holding[stream] = None
        if self.holding and now - self.released_at >= self.chunk_interval:  # all held tokens, together
            for stream in list(self.holding):
                self._hand_over(stream)
            self.released_at = now

    def _hand_over(self, stream: RequestStream):
        self.outbox.append((self._pass_on, (stream, merged(stream.held))))
        stream.held = []
        self.holding.pop(stream, None)

    def _record_finished(self, stream: RequestStream, update: RequestUpdate, now: float):
        if not self.metrics:
            return
        self.metrics.generation_tokens.inc(stream.num_tokens)
        self.metrics.e2e_request_latency.observe(now - stream.arrival_time)
        if stream.num_tokens > 1:
            self.metrics.time_per_output_token.observe((now - stream.first_token_time) / (stream.num_tokens - 1))
        self.metrics.requests_finished.labels(update.output.finish_reason).inc()

    def _record_state(self):
        """The gauges, and the batch size of every step since the last look."""
        if not self.metrics:
            return
        local = getattr(self.engine, "local", self.engine)  # the router's replica 0, or the engine itself
        batch_sizes = local.stats.batch_sizes
        for size in batch_sizes:
            self.metrics.batch_size.observe(size)
        batch_sizes.clear()  # the histogram keeps them now; the list would grow as long as the server runs
        self.metrics.requests_waiting.set(self.num_waiting)
        self.metrics.requests_running.set(len(self.live) - self.num_waiting)
        self.metrics.kv_blocks_total.set(local.pool.num_blocks)
        self.metrics.kv_blocks_in_use.set(local.pool.num_blocks - local.block_manager.num_free)
        self.metrics.prefix_cache_hit_rate.set(local.block_manager.hit_rate)

    def _send_outbox(self):
        """Hand this turn's results to the event loop (one wake-up for all of them), and wait
        until the handlers have sent them on before the next step.

        Why wait: under the GIL this thread and the event loop never run Python at the same
        time anyway, the step's kernels included. If the next step started at once, every
        socket write of a handler (which lets go of the GIL) would hand the GIL to this thread,
        and the handler would get it back only when this thread is made to let go (the switch
        interval, 5 ms): the chunks would trickle out between kernel calls, the two threads
        taking the GIL from each other dozens of times a step, and a response that has not
        started yet (its headers take the event loop several turns) would wait for the whole
        answer. Taking turns explicitly served 8 % more tokens per second
        (benchmarks/serve_load.py). The wait is bounded, and a handler that has fallen behind
        (its client reads slowly) is not waited for, so a slow client can only slow itself."""
        if not self.outbox:
            return
        items, self.outbox = self.outbox, []
        self.delivered.clear()
        try:
            self.loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            return
        self.delivered.wait(HANDOVER_TIMEOUT)

    def _deliver(self, items: list):
        """On the event loop: put each result where its handler waits. `delivered` is set once
        every handler given a token has sent it on and come back for the next (_sent)."""
        self.unsent.clear()
        for function, argument in items:
            function(argument)
        if not self.unsent:
            self.delivered.set()

    def _pass_on(self, stream_and_update: tuple):
        """On the event loop: one update to its handler, which the engine waits for unless the
        handler is behind (updates still unread) or the request has finished."""
        stream, update = stream_and_update
        if not update.finished and stream.updates.empty():
            self.unsent.add(stream)
        stream.updates.put_nowait(update)

    def _sent(self, stream: RequestStream):
        """On the event loop: the handler of `stream` has sent what it was given (or left)."""
        if stream in self.unsent:
            self.unsent.discard(stream)
            if not self.unsent:
                self.delivered.set()

    def _end_all(self, error: EngineStoppedError):
        """The thread is ending: abort what still runs, and tell every waiting handler."""
        for request_id, stream in list(self.live.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - a failed engine may fail here too; the handlers must still hear
                pass
            self.outbox.append((stream.updates.put_nowait, error))
        self.live.clear()
        while True:  # requests that came in after the stop: refused
            try:
                kind, stream = self.commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self.outbox.append((_settle, (stream.accepted, error)))
        self._send_outbox()


def _settle(future_and_result: tuple):
    """Resolve a submit(): the request id, or the error that refused it (unless the handler
    has given up waiting)."""
    future, result = future_and_result
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
