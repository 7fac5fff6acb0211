"""The paged KV cache: keys and values in fixed-size blocks, shared by every request.

A contiguous cache (tinyinfer/kv_cache.py) reserves a request's whole length up front, so
memory sits idle for tokens that may never come, and requests of unknown length cannot share
it. Here all KV memory is one pool of blocks per layer; a request owns a list of blocks (its
block table) and gets a new one only when it fills the last. Block i of the table holds its
tokens i*block_size .. (i+1)*block_size - 1, wherever that block sits in the pool. That is what
vLLM's PagedAttention does, and why it can run many requests in the same memory.
"""

import numpy as np

from tinyinfer.config import ModelConfig


class PagedKVPool:
    """All KV memory of the engine. keys[layer], values[layer]:
    [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, backend, dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ops = backend
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.keys = [backend.zeros(shape, dtype) for _ in range(config.num_layers)]
        self.values = [backend.zeros(shape, dtype) for _ in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


class BlockTable:
    """One sequence's view of the pool: the blocks that hold its tokens, in order.

    It has the `length` of the contiguous KVCache, so the model and the scheduler can treat
    either alike; the block manager fills `block_ids`. The forward pass reaches the pool
    through a PagedBatch, which serves every block table of a step at once.
    """

    def __init__(self, pool: PagedKVPool):
        self.pool = pool
        self.block_ids: list[int] = []
        self.length = 0  # tokens whose keys and values are stored

    @property
    def capacity(self) -> int:
        return len(self.block_ids) * self.pool.block_size


class PagedBatch:
    """The paged cache as one forward pass sees it: where each new token's keys and values go,
    and which blocks each sequence's attention reads. Built once per engine step and used by
    every layer, so that a layer stores the whole batch's keys with one write and attends with
    one call, whatever the number of sequences (vLLM's slot mapping and block tables).
    """

    def __init__(self, pool: PagedKVPool, ops, chunks):
        """chunks: the batch's SequenceChunks, in the order of their tokens; each one's cache is
        a BlockTable with room for its new tokens (the scheduler grew it)."""
        self.pool, self.ops = pool, ops
        block_size = pool.block_size
        positions = [np.arange(chunk.start, chunk.start + chunk.num_new) for chunk in chunks]
        for chunk in chunks:
            if chunk.start + chunk.num_new > chunk.cache.capacity:
                raise ValueError(f"KV blocks are full: {chunk.start + chunk.num_new} tokens do not fit "
                                 f"{len(chunk.cache.block_ids)} blocks")
        # where the new tokens go: [tokens] blocks and [tokens] rows within them
        blocks = [np.asarray(chunk.cache.block_ids)[p // block_size] for chunk, p in zip(chunks, positions)]
        self.write_blocks = ops.to_device(np.concatenate(blocks))
        self.write_rows = ops.to_device(np.concatenate(positions) % block_size)
        # [sequences, max_blocks]; a shorter table is padded with block 0, never read (past its length)
        block_tables = np.zeros((len(chunks), max(len(chunk.cache.block_ids) for chunk in chunks)), np.int64)
        for table, chunk in zip(block_tables, chunks):
            table[: len(chunk.cache.block_ids)] = chunk.cache.block_ids
        self.block_tables = ops.to_device(block_tables)
        # host arrays: sequence s has query rows query_starts[s] .. query_starts[s + 1] - 1
        self.query_starts = np.concatenate([[0], np.cumsum([chunk.num_new for chunk in chunks])]).astype(np.int64)
        self.start_positions = np.array([chunk.start for chunk in chunks], np.int64)

    def write(self, layer: int, k, v):
        """Store k, v: [tokens, num_kv_heads, head_dim], every new token of the batch, in its block."""
        self.pool.keys[layer][self.write_blocks, self.write_rows] = k
        self.pool.values[layer][self.write_blocks, self.write_rows] = v

    def attention(self, layer: int, q):
        """Attention of q: [tokens, num_heads, head_dim], every new token of the batch, each over
        its own sequence's keys and values so far (the new ones included)."""
        return self.ops.paged_attention(q, self.pool.keys[layer], self.pool.values[layer], self.block_tables,
                                        self.query_starts, self.start_positions)
