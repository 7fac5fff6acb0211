"""The block manager: who owns which KV block, and which blocks can be shared.

Every block of the pool is either free or owned by one or more live sequences; its reference
count says by how many. A sequence gets blocks as its tokens need them and gives them all back
when it finishes, is aborted or is preempted.

Prefix caching: a block that is full is keyed by a hash of its tokens *and of every token
before it* (the hash of the previous block goes into this one's), because a token's key and
value depend on everything before it. A new sequence whose first blocks' tokens hash the same
reuses those blocks instead of computing them again: a shared system prompt or a chat's
history is prefilled once. A freed block keeps its key until it is handed out again, so the
history of a finished chat turn is still there for the next turn.
"""

from dataclasses import dataclass

from tinyinfer.engine.paged_cache import BlockTable


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # hash of its tokens and its prefix, once full
    token_ids: tuple = ()  # the tokens behind `key` (compared, so a hash collision cannot mix texts)


def block_key(previous_key: int | None, token_ids: tuple) -> int:
    return hash((previous_key, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in the order they were freed: handing out the oldest first keeps recently
        # freed ones (likely to be asked for again, as a chat's last turn) cached longest
        self.free_ids: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # key -> block id, for full blocks
        self.cache_hits = 0  # tokens whose KV came from the prefix cache
        self.cache_queries = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- giving blocks out ---------------------------------------------------------------
    def _take_free(self) -> int:
        block_id = next(iter(self.free_ids))
        del self.free_ids[block_id]
        block = self.blocks[block_id]
        if block.key is not None and self.cached.get(block.key) == block_id:
            del self.cached[block.key]  # its old contents are about to be overwritten
        block.key, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _reuse(self, block_id: int):
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _cached_block(self, key: int, token_ids: tuple) -> int | None:
        block_id = self.cached.get(key) if self.prefix_caching else None
        if block_id is not None and self.blocks[block_id].token_ids == token_ids:
            return block_id
        return None

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of num_tokens could get its blocks now (not counting prefix
        hits, which only make it cheaper)."""
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, table: BlockTable, token_ids: list[int]):
        """Give a new sequence blocks for token_ids, reusing cached full blocks for as long as
        its prefix matches. Sets table.length to the tokens whose KV is already there. The block
        holding the last token is never reused: its logits are needed, so it is computed."""
        assert not table.block_ids, "allocate() is for a sequence that holds no blocks"
        key, matching = None, True
        reusable = (len(token_ids) - 1) // self.block_size  # full blocks before the last token
        for i in range(self.blocks_for(len(token_ids))):
            chunk = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = block_key(key, chunk)
            hit = self._cached_block(key, chunk) if matching and i < reusable else None
            if hit is None:
                matching = False
                table.block_ids.append(self._take_free())
            else:
                self._reuse(hit)
                table.block_ids.append(hit)
                table.length += self.block_size
        self.cache_queries += len(token_ids)
        self.cache_hits += table.length

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table.block_ids) <= self.num_free

    def grow(self, table: BlockTable, num_tokens: int):
        """Make room in `table` for num_tokens tokens in all (decode needs a new block every
        block_size tokens)."""
        while len(table.block_ids) < self.blocks_for(num_tokens):
            table.block_ids.append(self._take_free())

    def register_full_blocks(self, table: BlockTable, token_ids: list[int]):
        """Key every block of `table` that its computed tokens have filled, so later sequences
        with the same prefix can reuse it."""
        if not self.prefix_caching:
            return
        key = None
        for i in range(table.length // self.block_size):
            block = self.blocks[table.block_ids[i]]
            chunk = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = block_key(key, chunk)
            if block.key is None:
                block.key, block.token_ids = key, chunk
                self.cached.setdefault(key, block.block_id)

    # ---- taking them back ----------------------------------------------------------------
    def free(self, table: BlockTable):
        """Return a sequence's blocks; a block shared with others stays theirs. Freed blocks
        keep their key (and stay findable) until they are handed out again."""
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        table.block_ids.clear()
        table.length = 0

    @property
    def hit_rate(self) -> float:
        """The fraction of looked-up prompt tokens found in the prefix cache."""
        return self.cache_hits / self.cache_queries if self.cache_queries else 0.0
