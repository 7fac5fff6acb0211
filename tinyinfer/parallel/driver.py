"""The model as the driver of a replica sees it: the calls of a Transformer (forward,
new_kv_cache, new_paged_pool), carried out by every device of the replica.

The LLM and its engine call `ParallelModel` exactly as they call a Transformer: the scheduler,
the block manager and the sampler run once, on the driver. Each call is broadcast to the
replica as a command (tinyinfer/parallel/worker.py) and every device, the driver included,
carries it out on its own shard and caches. A KV cache or pool the driver asks for exists on
every device, each holding its own layers' and heads' keys and values under the same id;
the driver's own copy is what the call returns, so the engine's block tables and the
contiguous caches work unchanged. When the driver drops one, the others drop theirs with the
next command.
"""

import itertools
import weakref
from collections import deque

import numpy as np

from tinyinfer.engine.paged_cache import BlockTable
from tinyinfer.interrupts import defer_interrupts
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.parallel.errors import ParallelError
from tinyinfer.parallel.worker import LOGITS_TAG, NewKVCache, NewPagedPool, Report, Step, Stop, Worker


class ParallelModel:
    def __init__(self, worker: Worker, micro_batches: int):
        self.worker = worker
        self.micro_batches = micro_batches  # how many micro-batches a step's sequences are split into
        self.config = worker.model.config  # the shapes the driver's own device computes
        self.weights = worker.model.weights  # the driver's own shard
        self.ops, self.dtype = worker.model.ops, worker.model.dtype
        self.layout = worker.plan.layout
        self._ids = itertools.count()
        self._steps = itertools.count()
        self._freed = []  # caches and pools the driver dropped; the other devices drop theirs next time
        self.closed = False
        self.failure = None  # why the group stopped, if a device failed
        self._submitted = deque()  # (step index, the driver's logits or None) of passes not yet collected

    # ---- what a Transformer offers ------------------------------------------------------------
    def new_kv_cache(self, capacity: int):
        cache_id = next(self._ids)
        with defer_interrupts():
            cache = self._command(NewKVCache(cache_id, capacity))
        cache.cache_id = cache_id
        weakref.finalize(cache, self._drop, "kv", cache_id)
        return cache

    def new_paged_pool(self, num_blocks: int, block_size: int):
        pool_id = next(self._ids)
        with defer_interrupts():
            pool = self._command(NewPagedPool(pool_id, num_blocks, block_size))
        pool.pool_id = pool_id
        weakref.finalize(pool, self._drop, "pool", pool_id)
        return pool

    def forward(self, batch: ForwardBatch, all_logits: bool = False) -> np.ndarray:
        """The batch's new tokens through every stage; [rows, vocab] float32 logits, as
        Transformer.forward returns them."""
        return self.collect(self.submit(batch, all_logits))

    @property
    def steps_in_flight(self) -> int:
        """How many forward passes the engine keeps started and not yet collected: one per
        pipeline stage, so that while the last stage finishes one step the first has the
        next (vLLM's virtual engines). 1 without a pipeline."""
        return self.layout.pp

    def submit(self, batch: ForwardBatch, all_logits: bool = False) -> int:
        """Start a forward pass: post it to every device and run the driver's own part (the
        first stage). Returns a ticket for `collect`; the next pass may start before this one's
        logits are back, since each device runs its commands in order."""
        chunks = batch.chunks
        paged = isinstance(chunks[0].cache, BlockTable)  # the devices build their own PagedBatch
        if paged:
            widest = max(len(chunk.cache.block_ids) for chunk in chunks)
            block_tables = np.full((len(chunks), widest), -1, np.int64)
            for row, chunk in zip(block_tables, chunks):
                row[: len(chunk.cache.block_ids)] = chunk.cache.block_ids
        for chunk in chunks:  # a user's mistake is refused here, before any device starts on it
            if chunk.start + chunk.num_new > chunk.cache.capacity:
                raise ValueError(f"KV cache is full: {chunk.start + chunk.num_new} tokens do not fit its "
                                 f"{chunk.cache.capacity} rows")
        step = Step(
            index=next(self._steps),
            token_ids=np.asarray(batch.token_ids, np.int64),
            positions=np.asarray(batch.positions, np.int64),
            num_new=np.array([chunk.num_new for chunk in chunks], np.int64),
            block_tables=block_tables if paged else None,
            cache_ids=None if paged else np.array([self._cache_id(chunk.cache) for chunk in chunks], np.int64),
            pool_id=chunks[0].cache.pool.pool_id if paged else None,
            all_logits=all_logits,
            micro_batches=self.micro_batches,
        )
        with defer_interrupts():
            logits = self._command(step)  # None unless the driver is also the last stage
            for chunk in chunks:  # the driver's own caches count the new tokens (the engine reads them)
                chunk.cache.length = chunk.start + chunk.num_new
            self._submitted.append((step.index, logits))
        return step.index

    def collect(self, ticket: int) -> np.ndarray:
        """The [rows, vocab] float32 logits of a submitted pass: the last stage sends them to
        the driver, in the order the passes started. Passes started before `ticket` and never
        collected (an engine replaced mid-run) are received and dropped on the way."""
        if all(index != ticket for index, _ in self._submitted):
            raise RuntimeError(f"step {ticket} was not submitted, or was collected already")
        with defer_interrupts():
            index = None
            while index != ticket:
                index, logits = self._submitted.popleft()
                if logits is None:
                    logits = self._receive_logits(index)
        return logits

    def _receive_logits(self, index: int) -> np.ndarray:
        pipeline = self.worker.pipeline
        self.worker.clock.set_label(f"step {index}")
        try:
            return pipeline.recv(pipeline.size - 1, LOGITS_TAG)
        except BaseException as error:
            self._fail(error)
            raise

    # ---- what only a parallel model offers ----------------------------------------------------
    def ledgers(self, clear: bool = False) -> list:
        """Every device's DeviceLedger (memory, transfers, compute spans), in replica order;
        clear: start a fresh timeline on every device afterwards."""
        with defer_interrupts():
            return self._command(Report(clear))

    def close(self):
        """Stop the replica's other devices (their threads or processes end)."""
        if not self.closed:
            self.closed = True
            self._command(Stop())

    def _drop(self, kind: str, handle: int):
        """The driver no longer uses a cache or pool (it was garbage-collected): the other
        devices drop theirs with the next command."""
        self._freed.append((kind, handle))

    def _cache_id(self, cache) -> int:
        if getattr(cache, "cache_id", None) is None:
            raise ValueError("this KV cache was not made by this parallel model; use llm.model.new_kv_cache(capacity)")
        return cache.cache_id

    def _command(self, command):
        if self.closed and not isinstance(command, Stop):
            raise RuntimeError(f"this parallel group is closed{': ' + self.failure if self.failure else ''}")
        command.frees, self._freed = self._freed, []
        self.worker.replica.broadcast(command, root=0)
        try:
            with self.worker.clock.busy(command.label):
                return self.worker.run(command)
        except BaseException as error:
            self._fail(error)
            raise

    def _fail(self, error: BaseException):
        """The driver failed mid-command, and the devices may be mid-command too: stop them all."""
        self.closed = True
        self.failure = str(error) if isinstance(error, ParallelError) else f"device 0: {type(error).__name__}: {error}"
        self.worker.replica.fail(self.failure)

