"""One device of a parallel group: its shard of the model, its KV caches, and how it runs the
commands of its replica's driver.

Every device runs the same code (SPMD). The driver (tp rank 0 of the first stage) runs the
engine; for each forward pass it broadcasts a `Step` to its replica (token ids, positions,
and each sequence's block table or cache id, as vLLM's driver worker does), and every device,
the driver too, runs `Worker.forward` on it:

    for each micro-batch of the step's sequences:
        x = embed its tokens                 (first stage)   or  receive x from the stage before
        x = this device's layers (x)         (tensor-parallel devices all-reduce twice a layer)
        logits = final norm + LM head (x)    (last stage)    or  send x to the stage after

A stage works on micro-batch i + 1 while the next stage works on micro-batch i: GPipe's fill,
steady state and drain, for prefill and for a step of decodes alike. The last stage's logits go
to the driver, which samples (once, for everyone).
"""

import weakref
from dataclasses import dataclass, field

import numpy as np

from tinyinfer.engine.paged_cache import BlockTable
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.parallel.sharding import ShardPlan, split

LOGITS_TAG = 30000  # (an MPI tag) the last stage's logits, sent to the driver


# ---- the driver's commands -------------------------------------------------------------------
@dataclass
class Step:
    """One forward pass. Sequence s has num_new[s] tokens (token_ids and positions, one after
    another) and its keys and values in pool `pool_id` at block_tables[s] (padded with -1), or
    in contiguous cache cache_ids[s]."""

    index: int  # the driver's count of forward passes (labels the timeline)
    token_ids: np.ndarray  # [tokens] int64
    positions: np.ndarray  # [tokens] int64
    num_new: np.ndarray  # [sequences] int64
    block_tables: np.ndarray | None  # [sequences, max_blocks] int64, paged caches
    cache_ids: np.ndarray | None  # [sequences] int64, contiguous caches
    pool_id: int | None
    all_logits: bool
    micro_batches: int
    frees: list = field(default_factory=list)  # ("kv" | "pool", id) the driver no longer uses

    @property
    def label(self) -> str:
        return f"step {self.index}"


@dataclass
class NewKVCache:
    cache_id: int
    capacity: int
    frees: list = field(default_factory=list)
    label: str = "new KV cache"


@dataclass
class NewPagedPool:
    pool_id: int
    num_blocks: int
    block_size: int
    frees: list = field(default_factory=list)
    label: str = "new KV pool"


@dataclass
class Report:
    """Every device sends its ledger to the driver (clear: then starts a fresh timeline)."""

    clear: bool = False
    frees: list = field(default_factory=list)
    label: str = "report"


@dataclass
class Stop:
    frees: list = field(default_factory=list)
    label: str = "stop"


# ---- the device ------------------------------------------------------------------------------
class Worker:
    def __init__(self, plan: ShardPlan, model, replica, pipeline, tensor):
        """plan: what this device holds; model: the Transformer of its shard; replica,
        pipeline, tensor: its communicators (its whole replica with the driver as rank 0; the
        devices holding its slice in every stage, first stage first; its stage's tensor-parallel
        devices)."""
        self.plan, self.model = plan, model
        self.replica, self.pipeline, self.tensor = replica, pipeline, tensor
        self.clock, self.ledger = replica.clock, replica.ledger
        # cache id -> KVCache, pool id -> PagedKVPool, of this device's layers and heads. The
        # driver's own are the ones it hands out: it keeps them only while they are in use.
        self.kv_caches = weakref.WeakValueDictionary() if self.is_driver else {}
        self.pools = weakref.WeakValueDictionary() if self.is_driver else {}
        self.ledger.weight_bytes = model.weights.nbytes
        self.ledger.decode_read_bytes = model.weights.decode_read_bytes
        self.ledger.role = plan.describe()

    @property
    def is_driver(self) -> bool:
        return self.replica.rank == 0

    def run(self, command):
        """Carry out one command of the driver (just broadcast to the replica); the driver gets
        the result."""
        self.ledger.transfers[-1].label = command.label  # the broadcast that brought it
        for kind, handle in command.frees:
            (self.kv_caches if kind == "kv" else self.pools).pop(handle, None)
        result = None
        if isinstance(command, Step):
            result = self.forward(command)
        elif isinstance(command, NewKVCache):
            self.kv_caches[command.cache_id] = result = self.model.new_kv_cache(command.capacity)
        elif isinstance(command, NewPagedPool):
            self.pools[command.pool_id] = result = self.model.new_paged_pool(command.num_blocks, command.block_size)
        self.ledger.kv_bytes = sum(c.nbytes for c in [*self.kv_caches.values(), *self.pools.values()])
        if isinstance(command, Report):
            result = self.replica.gather(self.ledger)
            if command.clear:
                self.ledger.clear_timeline()
        return result  # the driver hands its own new cache or pool out

    def forward(self, step: Step):
        """This device's part of one forward pass. The last stage's logits ([rows, vocab]) go
        to the driver: returned, if the driver is that stage, or sent to it."""
        plan, model, pipeline = self.plan, self.model, self.pipeline
        model.ops.begin_pass()
        caches = self._caches(step)
        bounds = np.concatenate([[0], np.cumsum(step.num_new)])
        logits = []
        micro_batches = min(step.micro_batches, len(caches))
        for index in range(micro_batches):
            sequences = split(len(caches), micro_batches, index)
            self.clock.set_label(f"{step.label}, micro-batch {index}")
            batch = ForwardBatch.build([step.token_ids[bounds[s]:bounds[s + 1]] for s in sequences],
                                       [caches[s] for s in sequences])
            x = model.embed(batch) if plan.embedding else model.ops.to_device(pipeline.recv(pipeline.rank - 1, index))
            x = model.run_layers(x, batch)
            self.ledger.note_activations(self._activation_bytes(len(batch.token_ids)))
            if plan.head:
                logits.append(model.head(x, batch, step.all_logits))
            else:
                pipeline.send(model.ops.to_numpy(x), pipeline.rank + 1, index)
        self.clock.set_label(step.label)
        if not plan.head:
            return None  # the driver collects the logits later (ParallelModel.collect)
        logits = np.concatenate(logits)
        if self.is_driver:
            return logits
        if self.tensor is None or self.tensor.rank == 0:  # one copy goes to the driver
            pipeline.send(logits, 0, LOGITS_TAG)
        return None

    def _caches(self, step: Step) -> list:
        """Each sequence's cache on this device, holding step's start tokens: a contiguous
        KVCache, or a BlockTable over this device's pool with the driver's block ids."""
        starts = step.positions[np.concatenate([[0], np.cumsum(step.num_new)[:-1]])]
        if step.block_tables is None:
            caches = [self.kv_caches[int(cache_id)] for cache_id in step.cache_ids]
        else:
            pool = self.pools[step.pool_id]
            caches = []
            for row in step.block_tables:
                table = BlockTable(pool)
                table.block_ids = [int(b) for b in row if b >= 0]
                caches.append(table)
        for cache, start in zip(caches, starts):
            cache.length = int(start)
        return caches

    def _activation_bytes(self, tokens: int) -> int:
        """A layer at its widest, for `tokens` tokens: the residual stream, its norm, and the
        MLP's gate, up and their product (or attention's q, k, v, rotated q and k and output,
        if wider), on this device."""
        c = self.model.config
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        widest = max(3 * c.intermediate_size, 3 * q_width + 3 * kv_width)
        return tokens * (2 * c.hidden_size + widest) * self.model.dtype.itemsize


def serve(worker: Worker):
    """A device that is not its replica's driver: carry out the driver's commands until Stop."""
    while True:
        command = worker.replica.broadcast(None, root=0, wait_forever=True)
        with worker.clock.busy(command.label):
            worker.run(command)
        if isinstance(command, Stop):
            return
