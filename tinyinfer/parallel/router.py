"""Data parallelism: dp replicas of the model, each a tp x pp group with an engine of its own,
behind one router that hands each request to a replica.

The router is what `llm.engine` is when dp > 1: it has the engine's calls (add_request, step,
abort, has_unfinished), so generate, stream, chat and `tinyinfer batch` run on it unchanged.
It runs on the driver of replica 0 and steps that replica's engine itself; every other
replica's driver runs `serve_replica`, a loop that takes requests from the router, steps its own
engine and sends back each step's updates. Requests are routed as they arrive:
- "round_robin": replica 0, 1, ..., dp - 1, 0, ...;
- "least_tokens": the replica with the fewest outstanding tokens (the prompts and max_tokens
  of its unfinished requests), so long requests do not pile up on one replica.
Results come back by request id, so callers see them in request order however the replicas
interleave.
"""

import time

from tinyinfer.engine import EngineConfig, LLMEngine, RequestUpdate

ROUTING = ("round_robin", "least_tokens")
REQUESTS, UPDATES = 1, 2  # message tags: router -> replica, replica -> router


class RemoteSequence:
    """What the router knows of a request that runs on another replica (what the chat reads of
    a Sequence): its prompt, the tokens and text received so far."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids, self.output_ids, self.text = list(prompt_ids), [], ""
        self.num_cached_tokens = 0
        self.cut_by_context = False  # set from the replica's final output

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class DataParallelEngine:
    def __init__(self, llm, data_group, routing: str = "round_robin", config: EngineConfig | None = None):
        """llm: replica 0's LLM (this process's); data_group: the communicator of the replicas'
        drivers, the router (replica 0) first."""
        if routing not in ROUTING:
            raise ValueError(f"routing {routing!r} is not supported; choose one of {', '.join(ROUTING)}")
        self.llm, self.group, self.routing = llm, data_group, routing
        self.replicas = data_group.size
        self.configure(config or EngineConfig())
        self.next_request_id = 0
        self.local_ids = {}  # replica 0's engine's request id -> the router's
        self.placement = {}  # request id -> (replica, the replica engine's own id)
        self.sequences = {}  # request id -> Sequence (replica 0) or RemoteSequence (the others)
        self.outstanding = [0] * self.replicas  # tokens each replica still has to serve
        self.cost = {}  # request id -> tokens it counts while outstanding
        self.routed = [0] * self.replicas  # requests handed to each replica

    def configure(self, config: EngineConfig):
        """A fresh engine with these settings on every replica (as replacing llm.engine does on
        one device); only while no request is in flight."""
        if getattr(self, "placement", None):
            raise RuntimeError("the engines cannot be replaced while requests are running")
        self.config = config
        self.local = LLMEngine(self.llm, config)
        for replica in range(1, self.replicas):
            self.group.send(("config", config), replica, REQUESTS)

    def add_request(self, prompt, params) -> int:
        """Check the request here (the same errors as one engine gives), then hand it to a replica."""
        sequence = self.llm.new_sequence(prompt, params, None)
        self.local.check_fits(sequence.num_tokens, params)  # every replica's pool is the same size
        longest = min(sequence.num_tokens + params.max_tokens, self.llm.config.max_context)
        replica = self._choose()
        request_id, self.next_request_id = self.next_request_id, self.next_request_id + 1
        if replica == 0:
            local_id = self.local.add_request(sequence.prompt_ids, params)
            self.sequences[request_id] = self.local.sequences[local_id]
            self.local_ids[local_id] = request_id
        else:
            local_id = request_id
            self.group.send(("submit", request_id, sequence.prompt_ids, params), replica, REQUESTS)
            self.sequences[request_id] = RemoteSequence(sequence.prompt_ids)
        self.placement[request_id] = (replica, local_id)
        self.cost[request_id] = longest
        self.outstanding[replica] += longest
        self.routed[replica] += 1
        return request_id

    def _choose(self) -> int:
        if self.routing == "least_tokens":
            return min(range(self.replicas), key=lambda r: (self.outstanding[r], r))
        return self.next_request_id % self.replicas

    def abort(self, request_id: int):
        if request_id not in self.placement:
            return
        replica, local_id = self._done(request_id)
        if replica == 0:
            self.local.abort(local_id)
        else:
            self.group.send(("abort", request_id), replica, REQUESTS)

    def has_unfinished(self) -> bool:
        return bool(self.placement)

    def step(self) -> list[RequestUpdate]:
        """Step replica 0's engine (if it has work) and collect what the other replicas sent;
        with nothing local to do, wait for them."""
        updates = []
        if self.local.has_unfinished():
            for update in self.local.step():
                if update.request_id in self.local_ids:
                    update.request_id = self.local_ids[update.request_id]
                    updates.append(update)
        updates += self._receive(wait=not updates and not self.local.has_unfinished() and bool(self.placement))
        for update in updates:
            if update.finished and update.request_id in self.placement:
                self._done(update.request_id)
        return updates

    def _receive(self, wait: bool) -> list[RequestUpdate]:
        """Every update the other replicas have sent; with wait, block until there is one."""
        pause = 0.0
        while True:
            updates = []
            for replica in range(1, self.replicas):
                while self.group.poll(replica, UPDATES):
                    updates += self.group.recv(replica, UPDATES)
            if updates or not wait:
                break
            time.sleep(pause)
            pause = min(2 * pause + 1e-5, 0.002)
        for update in updates:
            sequence = self.sequences.get(update.request_id)
            if isinstance(sequence, RemoteSequence):
                sequence.output_ids += update.new_token_ids
                sequence.text += update.new_text or ""
                if update.output is not None:
                    sequence.cut_by_context = update.output.cut_by_context
        return updates

    def _done(self, request_id: int) -> tuple[int, int]:
        """Forget a finished or aborted request; (its replica, that replica engine's id)."""
        replica, local_id = self.placement.pop(request_id)
        self.outstanding[replica] -= self.cost.pop(request_id)
        self.sequences.pop(request_id, None)
        if replica == 0:
            del self.local_ids[local_id]
        return replica, local_id


def serve_replica(llm, data_group):
    """The loop of a replica's driver (not the router's): take requests, step the engine, send
    each step's updates back, until the router says stop."""
    engine = None  # made on the router's first message (its settings), so the KV pool is allocated once
    own_ids = {}  # this engine's request id -> the router's
    while True:
        idle = engine is None or not engine.has_unfinished()
        while idle or data_group.poll(0, REQUESTS):
            message = data_group.recv(0, REQUESTS, wait_forever=True)
            kind = message[0]
            if kind == "stop":
                return
            if kind == "config":
                engine = LLMEngine(llm, message[1])
            elif kind == "submit":
                _, request_id, prompt_ids, params = message
                engine = engine or LLMEngine(llm)
                own_ids[engine.add_request(prompt_ids, params)] = request_id
            elif kind == "abort":
                mine = [own for own, theirs in own_ids.items() if theirs == message[1]]
                for own in mine:
                    engine.abort(own)
                    del own_ids[own]
            idle = engine is None or not engine.has_unfinished()
        updates = []
        for update in engine.step():
            if update.request_id in own_ids:
                update.request_id = own_ids[update.request_id] if not update.finished else own_ids.pop(update.request_id)
                updates.append(update)
        if updates:
            data_group.send(updates, 0, UPDATES)
