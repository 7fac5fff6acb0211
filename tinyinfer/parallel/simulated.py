"""Simulated parallelism: N virtual devices in one process, each a thread running its rank's
code (SPMD), each with its own backend, weight shard, KV cache, ledger and clock.

Every collective really moves the data: each device gets its own copy of the result, built
from the other devices' arrays, never a view of them. Every collective is also priced by the
link model and recorded (tinyinfer/parallel/ledger.py), and the devices' clocks
(tinyinfer/parallel/clock.py, VirtualClock) advance as real devices' would: a collective
starts when the last member arrives and ends the link model's time later, a message arrives
the link model's time after it was sent. The timeline of a run is therefore what the same
devices would do on that link, with each compute span measured on this machine.

A device that fails stops the world: every other device's wait ends with a ParallelError
naming it. A wait inside a command ends with an error after `timeout` seconds; a device
waiting for its next command waits as long as it takes.
"""

import copy
import threading
from collections import defaultdict, deque

import numpy as np

from tinyinfer.parallel.clock import VirtualClock
from tinyinfer.parallel.communicator import DEFAULT_TIMEOUT, Communicator, payload_bytes
from tinyinfer.parallel.errors import ParallelError
from tinyinfer.parallel.ledger import DeviceLedger
from tinyinfer.parallel.link import LINKS, Link

BROADCAST_TAG = -1  # the mailbox a broadcast's copies go to


class SimulatedWorld:
    """The shared state of N virtual devices: their ledgers and clocks, the meeting points of
    their groups, their mailboxes, and whether one of them has failed."""

    def __init__(self, size: int, link: Link = LINKS["nvlink"], timeout: float = DEFAULT_TIMEOUT):
        self.size, self.link, self.timeout = size, link, timeout
        self.compute_slot = threading.Lock()  # one device computes at a time (see clock.py)
        self.ledgers = [DeviceLedger(rank) for rank in range(size)]
        self.clocks = [VirtualClock(ledger, self.compute_slot, timeout) for ledger in self.ledgers]
        self.state = threading.Condition()  # guards the meetings, the mailboxes and `failure`
        self.meetings: dict[tuple, _Meeting] = {}
        self.mailboxes: dict[tuple, deque] = defaultdict(deque)  # (group, source, dest, tag) -> messages
        self.failure: str | None = None

    def communicator(self, rank: int, ranks) -> "SimulatedCommunicator":
        """Device `rank`'s communicator for the group of `ranks` (world ranks, in group order)."""
        ranks = tuple(ranks)
        with self.state:
            self.meetings.setdefault(ranks, _Meeting(len(ranks)))
        return SimulatedCommunicator(self, ranks.index(rank), ranks)

    def fail(self, message: str):
        """A device failed: every wait of every other device ends with `message`."""
        with self.state:
            if self.failure is None:
                self.failure = message
            for meeting in self.meetings.values():
                meeting.barrier.abort()
            self.state.notify_all()


class _Meeting:
    """Where the members of one group meet for a collective: each leaves its value in its slot,
    all wait until everyone has, each reads what it needs, all wait until everyone has read."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size


class SimulatedCommunicator(Communicator):
    def __init__(self, world: SimulatedWorld, rank: int, ranks: tuple):
        super().__init__(rank, ranks, world.clocks[ranks[rank]], world.link)
        self.world = world
        self.meeting = world.meetings[ranks]

    def fail(self, message: str):
        """This device cannot go on: every other device's wait ends with `message`."""
        self.world.fail(message)

    # ---- collectives -------------------------------------------------------------------------
    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        def reduce(arrays):
            total = arrays[0].copy()
            for other in arrays[1:]:  # in rank order, so every member gets the same bits
                total += other
            return total

        return self._collective("all_reduce", array, array.nbytes, reduce)

    def all_gather(self, array: np.ndarray, axis: int = 0) -> np.ndarray:
        return self._collective("all_gather", array, None, lambda arrays: np.concatenate(arrays, axis=axis),
                                size_of=lambda arrays: sum(a.nbytes for a in arrays))  # priced on the gathered result

    def broadcast(self, value=None, root: int = 0, wait_forever: bool = False):
        """The root posts a copy to every other member and goes on at once (as MPI allows a
        broadcast's root to); a member waits for it. The driver's commands travel this way, so
        it can post the next step while later stages still work on the last one."""
        arrived = self.clock.pause()
        if self.rank == root:
            self.record("broadcast", payload_bytes(value), self.ranks, arrived, arrived)
            for member in range(self.size):
                if member != root:
                    self._post(member, BROADCAST_TAG, value, arrived)
            self.clock.resume(arrived)
            return value
        value, sent_at = self._take(root, BROADCAST_TAG, wait_forever)
        end = self.record("broadcast", payload_bytes(value), self.ranks, arrived, sent_at)
        self.clock.resume(end)
        return value

    def gather(self, value, root: int = 0):
        values = self._collective("gather", value, payload_bytes(value), lambda values: copy.deepcopy(values))
        return values if self.rank == root else None

    def barrier(self, wait_forever: bool = False):
        self._collective("barrier", None, 0, lambda values: None, wait_forever=wait_forever)

    def _collective(self, kind, value, buffer_bytes, combine, size_of=None, wait_forever=False):
        """Meet the group: leave `value`, wait for all, `combine` every member's values (in rank
        order) into this device's result, wait until all have read. The transfer starts when
        the last member arrives. buffer_bytes: what the link model prices, or size_of(values)."""
        arrived = self.clock.pause()
        meeting = self.meeting
        meeting.slots[self.rank] = (value, arrived)
        self._wait(meeting.barrier, kind, wait_forever)
        values = [slot[0] for slot in meeting.slots]
        start = max(slot[1] for slot in meeting.slots)
        result = combine(values)
        nbytes = size_of(values) if size_of else buffer_bytes
        self._wait(meeting.barrier, kind, wait_forever)
        end = self.record(kind, nbytes, self.ranks, arrived, start)
        self.clock.resume(end)
        return result

    def _wait(self, barrier: threading.Barrier, kind: str, wait_forever: bool):
        try:
            barrier.wait(None if wait_forever else self.world.timeout)
        except threading.BrokenBarrierError:
            if self.world.failure is None:
                self.world.fail(f"device {self.global_rank} waited {self.world.timeout:g} s in {kind} for devices "
                                f"{list(self.ranks)}; one of them is stuck")
            raise ParallelError(self.world.failure) from None

    # ---- messages ----------------------------------------------------------------------------
    def send(self, value, dest: int, tag: int = 0):
        """Post a copy of `value` to group member `dest`; returns at once (as MPI's isend)."""
        sent_at = self.clock.pause()
        end = self.record("send", payload_bytes(value), (self.global_rank, self.ranks[dest]), sent_at, sent_at)
        self._post(dest, tag, value, end)
        self.clock.resume(sent_at)

    def poll(self, source: int, tag: int = 0) -> bool:
        """Whether a message from group member `source` with `tag` is waiting (recv would not wait)."""
        with self.world.state:
            return bool(self.world.mailboxes[(self.ranks, source, self.rank, tag)]) or self.world.failure is not None

    def recv(self, source: int, tag: int = 0, wait_forever: bool = False):
        """Wait for the next message from group member `source` with `tag`."""
        arrived = self.clock.pause()
        value, delivered = self._take(source, tag, wait_forever)
        nbytes = payload_bytes(value)
        start = delivered - self.link.seconds("send", nbytes, 2)
        self.record("recv", nbytes, (self.ranks[source], self.global_rank), arrived, start)
        self.clock.resume(delivered)
        return value

    def _post(self, dest: int, tag: int, value, time: float):
        """Leave a copy of `value` in member `dest`'s mailbox for (this member, tag), stamped
        with `time` on this device's clock."""
        with self.world.state:
            self.world.mailboxes[(self.ranks, self.rank, dest, tag)].append((copy.deepcopy(value), time))
            self.world.state.notify_all()

    def _take(self, source: int, tag: int, wait_forever: bool):
        """The oldest message from `source` with `tag`, and its time stamp; waits for one."""
        box = (self.ranks, source, self.rank, tag)
        with self.world.state:
            if not self.world.state.wait_for(lambda: self.world.mailboxes[box] or self.world.failure,
                                             None if wait_forever else self.world.timeout):
                self.world.fail(f"device {self.global_rank} waited {self.world.timeout:g} s for a message from "
                                f"device {self.ranks[source]}; it is stuck")
            if self.world.failure is not None:
                raise ParallelError(self.world.failure)
            return self.world.mailboxes[box].popleft()
