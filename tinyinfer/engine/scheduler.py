"""The scheduler: which sequences run in the next forward pass, and how many tokens of each.

Each step has a budget of tokens (`max_num_batched_tokens`) and a cap on sequences
(`max_num_seqs`). Running sequences go first, oldest first: one token each in decode, or the
next chunk of a prompt still being prefilled. Then waiting sequences join while budget, the
cap and free blocks allow; a prompt longer than what is left of the budget is prefilled in
chunks over several steps (chunked prefill), so one long prompt cannot stall everyone's
decode. A finished sequence leaves at once and the next step can admit another (continuous
batching).

When a running sequence needs a new block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
later (its tokens so far become its prompt). The oldest sequence therefore always progresses.
"""

from collections import deque
from dataclasses import dataclass

from tinyinfer.engine.block_manager import BlockManager
from tinyinfer.sequence import Sequence


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # sequences in one forward pass at most
    max_num_batched_tokens: int = 512  # tokens in one forward pass at most (prefill chunks + decodes)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission: the last is the newest
        self.num_preemptions = 0

    def add(self, sequence: Sequence):
        self.waiting.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's work: (sequence, number of its tokens to compute) pairs."""
        budget = self.config.max_num_batched_tokens
        scheduled = []
        for sequence in list(self.running):
            if budget == 0:
                break
            if sequence not in self.running:  # preempted to make room for an older one
                continue
            num_new = min(sequence.num_tokens - sequence.cache.length, budget)
            if not self._make_room(sequence, sequence.cache.length + num_new):
                continue  # it was the newest, and preempted itself
            scheduled.append((sequence, num_new))
            budget -= num_new

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            sequence = self.waiting[0]
            if not self.block_manager.can_allocate(sequence.num_tokens):
                break  # first come, first served: nobody overtakes the head of the queue
            self.block_manager.allocate(sequence.cache, sequence.token_ids)
            sequence.num_cached_tokens = sequence.cache.length  # prefix-cache hits
            self.waiting.popleft()
            self.running.append(sequence)
            num_new = min(sequence.num_tokens - sequence.cache.length, budget)
            scheduled.append((sequence, num_new))
            budget -= num_new
        return scheduled

    def _make_room(self, sequence: Sequence, num_tokens: int) -> bool:
        """Give `sequence` blocks for num_tokens, preempting the newest sequences as needed.
        False if `sequence` itself had to be preempted."""
        while not self.block_manager.can_grow(sequence.cache, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is sequence:
                return False
        self.block_manager.grow(sequence.cache, num_tokens)
        return True

    def preempt(self, sequence: Sequence):
        """Free a running sequence's blocks and queue it first, to be recomputed."""
        self.running.remove(sequence)
        self.block_manager.free(sequence.cache)
        self.waiting.appendleft(sequence)
        self.num_preemptions += 1

    def finish(self, sequence: Sequence):
        """A sequence is done (or aborted): it leaves, and its blocks go back to the pool."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.block_manager.free(sequence.cache)
