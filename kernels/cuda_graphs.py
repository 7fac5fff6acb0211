"""Decode steps as CUDA graphs: how the CuPy backend runs the model.

A decode step of the 110M shape is some 200 kernel launches, and from Python each launch costs
a few microseconds more than its kernel takes on an H200: the step is bound by launches, not by
reading the weights (4.4 ms a step, where the weights take a tenth of a millisecond to read).
A CUDA graph records every launch of one step once, with its arguments, and replays them all
with one call. That is what vLLM does for decode, and this file does it the same way:

- One graph per capture size (1, 2, 4, 8, 16, 32, 64 sequences, vLLM's sizes): a step of n
  sequences replays the graph of the smallest size >= n, its extra rows padding (a token 0
  whose key and value are not stored and whose logits are dropped).
- A graph bakes in the address of every array it touches, so its inputs live in static
  buffers (StaticInputs: token ids, positions, where each new key and value goes, block tables,
  context lengths), written in place (one host-to-device copy) before each replay. The KV
  cache's addresses are baked in too: when the engine gets a new block pool, or a contiguous
  cache another place, the graphs are captured again for it.
- What a step computes in between comes from a memory pool of the graphs' own (the backend's
  capture_graph), so no other allocation can land on memory a graph writes.
- Prefill, steps that mix prefill with decode, steps of more than 64 sequences, logits of
  every token, and a tensor-parallel device run eagerly, op by op, as tinyinfer/model writes
  them. Both paths call the same kernels, each row computed alike whatever the number of
  rows, so a replayed step gives the eager step's logits.

Inside a captured step nothing may wait for the host: the attention reads each sequence's
length from the device (ops.decode_attention), the new keys and values go where `slots` says
(ops.write_kv), and the matrix products are the backend's own decode kernels (CuPy cannot
call cuBLAS while it captures).
"""

from dataclasses import dataclass

import numpy as np

from tinyinfer.engine.paged_cache import BlockTable
from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64)  # sequences in a captured decode step


def capture_size(sequences: int) -> int | None:
    """The smallest capture size that holds `sequences`; None past the largest (run eagerly)."""
    return next((size for size in CAPTURE_SIZES if size >= sequences), None)


def address(array) -> int:
    """Where an array's data starts in memory: a CuPy array's device pointer, or (the tests'
    stand-in backend) a NumPy array's."""
    data = array.data
    return data.ptr if hasattr(data, "ptr") else array.__array_interface__["data"][0]


@dataclass
class KVPlacement:
    """Where a decode step keeps its keys and values, as the kernels take them: per layer a pool
    [num_blocks, block_size, num_kv_heads, head_dim] (a contiguous KVCache is one block that
    holds all its rows), and, per sequence, its block table and the slot of its new token
    (block * block_size + row)."""

    keys: list
    values: list
    block_size: int
    max_blocks: int  # the width of the block tables: the most blocks any sequence can have
    block_tables: list[list[int]]
    slots: list[int]

    @property
    def key(self) -> tuple:
        """What a graph bakes in: the pools' addresses and shapes."""
        return tuple((address(array), array.shape) for array in self.keys + self.values)

    @classmethod
    def of(cls, batch: ForwardBatch, max_context: int) -> "KVPlacement | None":
        """The placement of a decode batch on the engine's paged pool or on one contiguous
        cache; None for any other batch. Refuses, as the eager path does, a token past a
        cache's capacity."""
        chunks = batch.chunks
        for chunk in chunks:
            if chunk.start + 1 > chunk.cache.capacity:
                full = (f"KV cache is full: {chunk.start + 1} tokens do not fit its {chunk.cache.capacity} rows"
                        if isinstance(chunk.cache, KVCache) else
                        f"KV blocks are full: {chunk.start + 1} tokens do not fit {len(chunk.cache.block_ids)} blocks")
                raise ValueError(full)
        caches = [chunk.cache for chunk in chunks]
        if all(isinstance(cache, BlockTable) for cache in caches) and len({id(c.pool) for c in caches}) == 1:
            pool = caches[0].pool
            size = pool.block_size
            slots = [c.block_ids[chunk.start // size] * size + chunk.start % size for c, chunk in zip(caches, chunks)]
            return cls(pool.keys, pool.values, size, -(-max_context // size), [c.block_ids for c in caches], slots)
        if len(caches) == 1 and isinstance(caches[0], KVCache):
            cache = caches[0]
            return cls([k[None] for k in cache.keys], [v[None] for v in cache.values], cache.capacity, 1, [[0]],
                       [chunks[0].start])
        return None


class StaticInputs:
    """The buffers every captured step reads, at addresses that never change: one int64 array
    on the device holding, for up to the largest capture size of sequences, the token ids,
    positions, slots and context lengths, then the block tables [sequences, max_blocks]; and
    its twin on the host, filled for each step and copied over in one transfer."""

    FIELDS = ("token_ids", "positions", "slots", "context_lens")

    def __init__(self, ops, max_blocks: int):
        self.ops, self.max_blocks = ops, max_blocks
        rows = CAPTURE_SIZES[-1]
        self.host = np.zeros(rows * (len(self.FIELDS) + max_blocks), np.int64)
        self.device = ops.to_device(self.host)

    def _views(self, packed, size: int) -> dict:
        rows = CAPTURE_SIZES[-1]
        views = {name: packed[i * rows: i * rows + size] for i, name in enumerate(self.FIELDS)}
        start = len(self.FIELDS) * rows
        views["block_tables"] = packed[start:].reshape(rows, self.max_blocks)[:size]
        return views

    def fill(self, batch: ForwardBatch, placement: KVPlacement, size: int):
        """Write this step's inputs (rows 0 .. n-1) and padding (rows n .. size-1: token 0 at
        position 0, its key and value not stored (slot -1), attending to one key), then copy
        them to the device."""
        n = len(batch.chunks)
        views = self._views(self.host, size)
        views["token_ids"][:n], views["token_ids"][n:] = batch.token_ids, 0
        views["positions"][:n], views["positions"][n:] = batch.positions, 0
        views["slots"][:n], views["slots"][n:] = placement.slots, -1
        views["context_lens"][:n], views["context_lens"][n:] = batch.positions + 1, 1
        tables = views["block_tables"]
        tables[:] = 0
        for row, table in enumerate(placement.block_tables):
            tables[row, : len(table)] = table
        self.ops.upload(self.host, self.device)

    def on_device(self, size: int) -> dict:
        """The device views a step of `size` sequences reads."""
        return self._views(self.device, size)


class StaticKV:
    """The paged cache as a captured step sees it (what PagedBatch is to an eager step): every
    new key and value goes to its slot, and each query attends over its sequence's context,
    both read from the static buffers."""

    def __init__(self, ops, placement: KVPlacement, inputs: dict):
        self.ops, self.placement, self.inputs = ops, placement, inputs

    def write(self, layer: int, k, v):
        self.ops.write_kv(self.placement.keys[layer], self.placement.values[layer], k, v, self.inputs["slots"])

    def attention(self, layer: int, q):
        return self.ops.decode_attention(q, self.placement.keys[layer], self.placement.values[layer],
                                         self.inputs["block_tables"], self.inputs["context_lens"])


@dataclass
class CapturedStep:
    graph: object  # has launch(): replays the step
    logits: object  # the device array [size, vocab] each replay writes


class GraphedTransformer(Transformer):
    """A Transformer whose decode steps replay CUDA graphs (see the top of this file); every
    other forward pass runs as written."""

    cuda_graphs = True  # what tinyinfer bench reports

    def __init__(self, model: Transformer):
        super().__init__(model.config, model.weights, model.ops, model.dtype, model.tensor_group, model.vocab_start)
        self.graphs: dict[int, CapturedStep] = {}  # capture size -> its graph
        self.placement: KVPlacement | None = None  # the KV cache the graphs were captured on
        self.inputs: StaticInputs | None = None

    def forward(self, batch: ForwardBatch, all_logits: bool = False) -> np.ndarray:
        chunks = batch.chunks
        decode = (not all_logits and self.tensor_group is None and len(chunks) > 0
                  and all(c.num_new == 1 for c in chunks) and capture_size(len(chunks)) is not None)
        placement = KVPlacement.of(batch, self.config.max_context) if decode else None
        if placement is None:
            return super().forward(batch, all_logits)
        return self._replay(batch, placement)

    def _replay(self, batch: ForwardBatch, placement: KVPlacement) -> np.ndarray:
        """Run a decode step by its graph (captured first, if this size or this cache is new):
        [sequences, vocab] float32 logits on the host."""
        if self.placement is None or placement.key != self.placement.key:  # a new cache: new addresses
            self.graphs.clear()
            self.inputs = StaticInputs(self.ops, placement.max_blocks)
        self.placement = placement  # the same pools; this step's slots and tables
        n = len(batch.chunks)
        size = capture_size(n)
        self.inputs.fill(batch, placement, size)
        step = self.graphs.get(size) or self._capture(size)
        step.graph.launch()
        logits = self.ops.to_numpy(step.logits[:n])
        for chunk in batch.chunks:
            chunk.cache.length = chunk.start + 1
        return logits.astype(np.float32, copy=False)

    def _capture(self, size: int) -> CapturedStep:
        """Record the decode step of `size` sequences: embed, every layer, final norm and LM head,
        all reading the static buffers."""
        inputs = self.inputs.on_device(size)
        static = ForwardBatch(inputs["token_ids"], inputs["positions"], chunks=[])
        static.paged = StaticKV(self.ops, self.placement, inputs)

        def step():
            x = self.run_layers(self.embed(static), static)
            return self.logits_on_device(x)

        logits, graph = self.ops.capture_graph(step)
        self.graphs[size] = captured = CapturedStep(graph, logits)
        return captured
