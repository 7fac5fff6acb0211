"""What one forward pass runs on: a batch of sequences, their new tokens flattened into one axis.

Prefill and decode are the same call. A prompt of 7 tokens contributes 7 tokens starting at
position 0; a sequence in decode contributes 1 token at its current length. Mixing both in one
batch is what the serving engine does (as nano-vllm and vLLM do).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tinyinfer.kv_cache import KVCache

if TYPE_CHECKING:
    from tinyinfer.engine.paged_cache import PagedBatch


@dataclass
class SequenceChunk:
    """One sequence's part of the batch: `num_new` tokens written to `cache` from row `start`."""

    cache: KVCache  # or an engine BlockTable: anything with `length`
    start: int  # tokens of this sequence already in the cache = position of its first new token
    num_new: int


@dataclass
class ForwardBatch:
    token_ids: np.ndarray  # [tokens] int64, every sequence's new tokens, one after another
    positions: np.ndarray  # [tokens] int64, each token's position within its own sequence
    chunks: list[SequenceChunk]  # in the order their tokens appear in token_ids
    _paged: "PagedBatch | None" = None

    @classmethod
    def build(cls, token_lists: list[list[int]], caches: list) -> "ForwardBatch":
        """Each cache (a KVCache, or an engine BlockTable) continues with its token list (its
        cache.length tokens are already in)."""
        chunks = [SequenceChunk(cache, cache.length, len(tokens)) for tokens, cache in zip(token_lists, caches)]
        token_ids = np.array([t for tokens in token_lists for t in tokens], dtype=np.int64)
        positions = np.concatenate([np.arange(c.start, c.start + c.num_new) for c in chunks])
        return cls(token_ids, positions.astype(np.int64), chunks)

    @property
    def paged(self) -> "PagedBatch | None":
        """Where the layers of this pass write and read keys and values when every cache is a
        block table of one pool (the engine's): made on first use and reused by every layer.
        None for contiguous caches."""
        from tinyinfer.engine.paged_cache import BlockTable, PagedBatch  # the engine's layer imports this one

        if self._paged is None and all(isinstance(chunk.cache, BlockTable) for chunk in self.chunks):
            pool = self.chunks[0].cache.pool
            self._paged = PagedBatch(pool, pool.ops, self.chunks)
        return self._paged

    @paged.setter
    def paged(self, paged: "PagedBatch"):
        self._paged = paged

    @property
    def last_token_rows(self) -> np.ndarray:
        """[num_sequences]: the row of each sequence's last new token (whose logits predict next)."""
        return np.cumsum([c.num_new for c in self.chunks]) - 1
