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

On a pipeline of p stages the engine keeps p steps in flight, so that every stage has work
(vLLM's virtual engines): each request belongs to one of p `virtual_engines`, given at
arrival to the one with the fewest, and a step schedules the sequences of one of them only.
A sequence whose step is still in flight is never scheduled again nor preempted until its
logits are back. With one virtual engine (one device, or no pipeline) all of this is moot.
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
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, virtual_engines: int = 1):
        self.config = config
        self.block_manager = block_manager
        # one queue and one count of unfinished sequences per virtual engine (pipeline stage)
        self.queues: list[deque[Sequence]] = [deque() for _ in range(virtual_engines)]
        self.unfinished = [0] * virtual_engines
        self.running: list[Sequence] = []  # in order of admission: the last is the newest
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return sum(len(queue) for queue in self.queues)

    def add(self, sequence: Sequence):
        """Queue a new sequence, in the virtual engine with the fewest unfinished sequences."""
        sequence.virtual_engine = self.unfinished.index(min(self.unfinished))
        self.unfinished[sequence.virtual_engine] += 1
        self.queues[sequence.virtual_engine].append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def schedule(self, virtual_engine: int = 0, in_flight=frozenset()) -> list[tuple[Sequence, int]]:
        """This step's work: (sequence, number of its tokens to compute) pairs, among the
        sequences of `virtual_engine`; sequences `in_flight` (in a step not yet collected) are
        neither scheduled nor preempted."""
        budget = self.config.max_num_batched_tokens
        scheduled = []
        for sequence in list(self.running):
            if budget == 0:
                break
            if sequence not in self.running or sequence.virtual_engine != virtual_engine:
                continue  # preempted to make room for an older one, or another engine's
            num_new = min(sequence.num_tokens - sequence.cache.length, budget)
            if not self._make_room(sequence, sequence.cache.length + num_new, in_flight):
                continue  # it was the newest, and preempted itself
            scheduled.append((sequence, num_new))
            budget -= num_new

        waiting = self.queues[virtual_engine]
        running = sum(s.virtual_engine == virtual_engine for s in self.running)
        while waiting and budget > 0 and running < self.config.max_num_seqs:
            sequence = waiting[0]
            if not self.block_manager.can_allocate(sequence.num_tokens):
                break  # first come, first served: nobody overtakes the head of the queue
            self.block_manager.allocate(sequence.cache, sequence.token_ids)
            sequence.num_cached_tokens = sequence.cache.length  # prefix-cache hits
            waiting.popleft()
            self.running.append(sequence)
            running += 1
            num_new = min(sequence.num_tokens - sequence.cache.length, budget)
            scheduled.append((sequence, num_new))
            budget -= num_new
        return scheduled

    def _make_room(self, sequence: Sequence, num_tokens: int, in_flight=frozenset()) -> bool:
        """Give `sequence` blocks for num_tokens, preempting the newest sequences (not in
        flight) as needed. False if `sequence` itself had to be preempted."""
        while not self.block_manager.can_grow(sequence.cache, num_tokens):
            victim = next(s for s in reversed(self.running) if s not in in_flight)
            self.preempt(victim)
            if victim is sequence:
                return False
        self.block_manager.grow(sequence.cache, num_tokens)
        return True

    def preempt(self, sequence: Sequence):
        """Free a running sequence's blocks and queue it first, to be recomputed."""
        self.running.remove(sequence)
        self.block_manager.free(sequence.cache)
        self.queues[sequence.virtual_engine].appendleft(sequence)
        self.num_preemptions += 1

    def finish(self, sequence: Sequence):
        """A sequence is done (or aborted): it leaves, and its blocks go back to the pool."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.queues[sequence.virtual_engine]:
            self.queues[sequence.virtual_engine].remove(sequence)
        else:
            return  # finished already
        self.unfinished[sequence.virtual_engine] -= 1
        self.block_manager.free(sequence.cache)
