"""The serving engine: many requests, one forward pass per step (continuous batching).

    engine = LLMEngine(llm)
    a = engine.add_request("ROMEO.", SamplingParams(max_tokens=40))
    b = engine.add_request("JULIET.", SamplingParams(max_tokens=40, temperature=0.8, seed=1))
    while engine.has_unfinished():
        for update in engine.step():      # one forward pass over every scheduled sequence
            print(update.request_id, update.new_text)

Each step the scheduler picks the work (decode tokens and prefill chunks, within the token
budget and the free KV blocks), the model runs it as one batch, and every sequence whose
prompt is fully computed samples its next token. Finished requests leave at once; waiting ones
join the next step. The KV cache is paged (tinyinfer/engine/paged_cache.py) and full blocks are
shared between requests with the same prefix.
"""

import time
from collections import deque
from dataclasses import dataclass, field

from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.engine.paged_cache import BlockTable
from tinyinfer.engine.scheduler import Scheduler, SchedulerConfig
from tinyinfer.errors import KVCacheTooSmallError
from tinyinfer.interrupts import defer_interrupts
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.outputs import GenerationOutput
from tinyinfer.sampling import SamplingParams, as_sampling_params, sample
from tinyinfer.sequence import Sequence


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: room for max_num_seqs full contexts, within kv_cache_bytes
    kv_cache_bytes: int = 256 * 2**20  # the most memory the KV pool may take when num_blocks is None
    max_num_seqs: int = 16  # sequences in one forward pass at most
    max_num_batched_tokens: int = 512  # tokens in one forward pass at most
    prefix_caching: bool = True


@dataclass
class RequestUpdate:
    """What one step did for one request."""

    request_id: int
    new_token_ids: list[int]
    new_text: str | None  # None without a tokenizer
    finished: bool
    output: GenerationOutput | None = None  # the whole result, once finished


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (prefix-cache hits are not)
    decode_tokens: int = 0  # tokens generated
    preemptions: int = 0
    max_blocks_in_use: int = 0
    busy_seconds: float = 0.0  # time spent inside step()
    batch_sizes: list[int] = field(default_factory=list)  # sequences per step

    def summary(self, block_manager: BlockManager) -> dict:
        return {
            "steps": self.steps,
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.decode_tokens,
            "output_tokens_per_s": self.decode_tokens / self.busy_seconds if self.busy_seconds else 0.0,
            "preemptions": self.preemptions,
            "max_blocks_in_use": self.max_blocks_in_use,
            "prefix_cache_hit_rate": block_manager.hit_rate,
        }


class LLMEngine:
    def __init__(self, llm, config: EngineConfig | None = None):
        self.llm = llm
        self.config = config = config or EngineConfig()
        num_blocks = config.num_blocks or self._default_num_blocks()
        self.pool = llm.model.new_paged_pool(num_blocks, config.block_size)  # on every device of a parallel group
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        # a pipeline keeps one step in flight per stage, so each stage has work (vLLM's virtual engines)
        self.steps_in_flight = llm.model.steps_in_flight
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.block_manager,
                                   self.steps_in_flight)
        self.in_flight: deque = deque()  # (virtual engine, ticket, scheduled) of steps started, oldest first
        self.next_virtual_engine = 0
        self.sequences: dict[int, Sequence] = {}  # live requests by id
        self.next_request_id = 0
        self.stats = EngineStats()

    def _default_num_blocks(self) -> int:
        c = self.llm.config
        bytes_per_block = 2 * c.num_layers * self.config.block_size * c.num_kv_heads * c.head_dim * self.llm.dtype.itemsize
        wanted = self.config.max_num_seqs * -(-c.max_context // self.config.block_size)
        return max(1, min(wanted, self.config.kv_cache_bytes // bytes_per_block))

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue a prompt (text or token ids); returns its request id."""
        params = as_sampling_params(params)  # a dict or a changed field is refused here, not mid-step
        sequence = self.llm.new_sequence(prompt, params, BlockTable(self.pool))
        self.check_fits(sequence.num_tokens, params)
        request_id = self.next_request_id
        self.next_request_id += 1
        sequence.request_id = request_id
        self.sequences[request_id] = sequence
        self.scheduler.add(sequence)
        return request_id

    def check_fits(self, prompt_tokens: int, params: SamplingParams):
        """Refuse a request that could never fit the KV pool, even running alone."""
        longest = min(prompt_tokens + params.max_tokens, self.llm.config.max_context)
        needed = self.block_manager.blocks_for(longest)
        if needed > self.pool.num_blocks:
            raise KVCacheTooSmallError(
                f"this request needs up to {longest} tokens ({prompt_tokens} prompt + {params.max_tokens} "
                f"new), {needed} KV blocks of {self.config.block_size}, but the KV cache has only "
                f"{self.pool.num_blocks} blocks; lower max_tokens or give the engine more blocks "
                "(EngineConfig(num_blocks=...) or kv_cache_bytes)"
            )

    def abort(self, request_id: int):
        """Stop a request now; its blocks go back to the pool. Unknown or finished ids are ignored."""
        sequence = self.sequences.pop(request_id, None)
        if sequence is not None:
            sequence.finish_reason = "abort"
            self.scheduler.finish(sequence)

    def has_unfinished(self) -> bool:
        """Whether a request still runs or waits, or a step's logits are still to come back
        (an aborted request's step is collected all the same)."""
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    # ---- the step loop -------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        """Run one forward pass over the scheduled work; report each request that got a token.

        On a pipeline (steps_in_flight > 1) a call starts the next virtual engine's pass and,
        once every stage has one in flight, finishes the oldest: the updates it returns are
        that pass's. The calls between go on until has_unfinished() is False, as always."""
        start = time.perf_counter()
        preemptions_before = self.scheduler.num_preemptions
        with defer_interrupts():  # Ctrl-C takes effect between steps, never inside one
            scheduled = self._start_step()
            updates = []
            if self.in_flight and (len(self.in_flight) == self.steps_in_flight or not scheduled):
                updates = self._finish_step()
            elif not self.in_flight and not scheduled and self.has_unfinished():
                # cannot happen while blocks are accounted for; never hang on it
                raise RuntimeError(f"the engine cannot make progress: {self.scheduler.num_waiting} requests wait, "
                                   f"{self.block_manager.num_free} KV blocks are free and nothing runs")
        self.stats.preemptions += self.scheduler.num_preemptions - preemptions_before
        in_use = self.pool.num_blocks - self.block_manager.num_free
        self.stats.max_blocks_in_use = max(self.stats.max_blocks_in_use, in_use)
        self.stats.busy_seconds += time.perf_counter() - start
        return updates

    def _start_step(self) -> list:
        """Start the forward pass of the next virtual engine (in turn) whose last step is back
        and that has work; the (sequence, tokens) pairs it runs, or [] if none has."""
        busy = {sequence for _, _, scheduled in self.in_flight for sequence, _ in scheduled}
        waiting_for = {engine for engine, _, _ in self.in_flight}
        for turn in range(self.steps_in_flight):
            virtual_engine = (self.next_virtual_engine + turn) % self.steps_in_flight
            if virtual_engine in waiting_for:
                continue
            scheduled = self.scheduler.schedule(virtual_engine, busy)
            if scheduled:
                self.next_virtual_engine = (virtual_engine + 1) % self.steps_in_flight
                break
        else:
            return []
        batch = ForwardBatch.build(
            [sequence.tokens_to_feed()[:num_new] for sequence, num_new in scheduled],
            [sequence.cache for sequence, _ in scheduled],
        )
        # a decode step feeds the one token sampled last; everything else is (re)computing a prompt
        self.stats.prefill_tokens += sum(n for seq, n in scheduled if not (n == 1 and seq.output_ids))
        ticket = self.llm.model.submit(batch)  # its logits come back in _finish_step
        self.in_flight.append((virtual_engine, ticket, scheduled))
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(scheduled))
        return scheduled

    def _finish_step(self) -> list[RequestUpdate]:
        """The oldest step's logits: sample a token for every sequence whose prompt is done."""
        _, ticket, scheduled = self.in_flight.popleft()
        logits = self.llm.model.collect(ticket)  # [len(scheduled), vocab]: each sequence's last new token
        updates = []
        for (sequence, num_new), row in zip(scheduled, logits):
            if sequence.finished:
                continue  # aborted while its step was in flight
            self.block_manager.register_full_blocks(sequence.cache, sequence.token_ids)
            if sequence.cache.length < sequence.num_tokens:
                continue  # a prompt chunk: the prompt's last token has not been computed yet
            sequence.append(sample(row, sequence.params, sequence.rng, sequence.token_ids))
            self.stats.decode_tokens += 1
            updates.append(self._update(sequence))
        return updates

    def _update(self, sequence: Sequence) -> RequestUpdate:
        has_text = self.llm.tokenizer is not None
        update = RequestUpdate(sequence.request_id, sequence.output_ids[-1:], sequence.take_new_text() if has_text else None,
                               sequence.finished)
        if sequence.finished:
            self.scheduler.finish(sequence)
            del self.sequences[sequence.request_id]
            update.output = sequence.output(has_text)
        return update
