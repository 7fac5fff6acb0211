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
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.keys = [backend.zeros(shape, dtype) for _ in range(config.num_layers)]
        self.values = [backend.zeros(shape, dtype) for _ in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


class BlockTable:
    """One sequence's view of the pool: the blocks that hold its tokens, in order.

    It speaks the same protocol as the contiguous KVCache (`length`, `write`, `attention`), so
    the model runs on either without knowing which. The block manager fills `block_ids`.
    """

    def __init__(self, pool: PagedKVPool, ops):
        self.pool, self.ops = pool, ops
        self.block_ids: list[int] = []
        self.length = 0  # tokens whose keys and values are stored

    @property
    def capacity(self) -> int:
        return len(self.block_ids) * self.pool.block_size

    def write(self, layer: int, start: int, k, v):
        """Store k, v: [new_tokens, num_kv_heads, head_dim] for positions start, start+1, ..."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"KV blocks are full: {end} tokens do not fit {len(self.block_ids)} blocks")
        positions = np.arange(start, end)
        blocks = self.ops.to_device(np.asarray(self.block_ids)[positions // self.pool.block_size])
        offsets = self.ops.to_device(positions % self.pool.block_size)
        self.pool.keys[layer][blocks, offsets] = k
        self.pool.values[layer][blocks, offsets] = v

    def attention(self, layer: int, q, start: int):
        """Attention of q: [new_tokens, num_heads, head_dim] (positions start, ...) over this
        sequence's keys and values, read through its block table."""
        table = self.ops.to_device(np.asarray(self.block_ids, dtype=np.int64))
        return self.ops.paged_attention(q, self.pool.keys[layer], self.pool.values[layer], table, start)
