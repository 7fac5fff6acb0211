"""Real parallelism: one process per rank, talking over MPI (mpi4py).

    mpiexec -n 4 tinyinfer generate --tp 2 --pp 2 "ROMEO."

Every process runs the same program; rank 0 drives (it runs the engine and prints), the others
load their shards and carry out its commands (tinyinfer/parallel/worker.py), then exit. The
calls are those of the simulated communicator (tinyinfer/parallel/communicator.py), recorded in
the same ledger, on the wall clock (clock.py, WallClock). Arrays travel as buffers
(Iallreduce, Iallgatherv); commands (broadcast) and activations (send) as pickled messages.

No wait is unbounded inside a command: each call polls its request and gives up with a
ParallelError after `timeout` seconds (a rank that died or hangs), and the process then aborts
the whole job, so nothing hangs. (mpiexec also ends the job when a process dies.) Waiting for
the next command has no limit: the driver may be waiting for its user.

MPI comes from PyPI: `pip install "tinyinfer[mpi]"` installs mpi4py and the MPICH wheel, whose
`mpiexec` starts the processes.
"""

import os
import sys
import time

import numpy as np

from tinyinfer.parallel.clock import WallClock
from tinyinfer.parallel.communicator import DEFAULT_TIMEOUT, Communicator, payload_bytes
from tinyinfer.parallel.errors import ParallelConfigError, ParallelError
from tinyinfer.parallel.ledger import DeviceLedger
from tinyinfer.parallel.link import LINKS, Link

BROADCAST_TAG = 30001  # the tag a broadcast's copies travel under
GATHER_TAG = 30002  # the tag a gather's values travel under
SPIN_SECONDS = 0.002  # how long a wait polls without sleeping
# variables that mpiexec (MPICH's hydra, Open MPI, Slurm's PMI) sets in each process it starts
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def under_mpiexec() -> bool:
    """Whether this process was started by mpiexec (so a parallel load uses MPI)."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def launched_rank() -> int:
    """This process's rank as mpiexec set it in the environment (0 outside mpiexec): known
    before MPI starts, so a mistake found that early is said by rank 0 alone."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def import_mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        if launched_rank() != 0:
            sys.exit(2)  # rank 0 says it, once
        raise ParallelConfigError('running over MPI needs mpi4py and an MPI library: pip install "tinyinfer[mpi]" '
                                  "(mpi4py and the MPICH wheel, which brings mpiexec)") from None
    return MPI


class MPIWorld:
    """This process's view of the job: its rank, its ledger and clock, and its groups."""

    def __init__(self, link: Link = LINKS["nvlink"], timeout: float = DEFAULT_TIMEOUT):
        self.MPI = import_mpi()
        self.comm = self.MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.link, self.timeout = link, timeout
        self.ledger = DeviceLedger(self.rank)
        self.clock = WallClock(self.ledger)

    def communicator(self, rank: int, ranks) -> "MPICommunicator":
        """This process's communicator for the group of `ranks` (world ranks, in group order);
        every member calls it (MPI_Comm_create_group)."""
        assert rank == self.rank
        ranks = tuple(ranks)
        group = self.comm.Get_group().Incl(list(ranks))
        return MPICommunicator(self, self.comm.Create_group(group), ranks)

    def fail(self, message: str):
        """This rank cannot go on: say why and end the whole job (every other rank stops too)."""
        print(f"tinyinfer: error on rank {self.rank}: {message}", file=sys.stderr, flush=True)
        self.comm.Abort(1)
        os._exit(1)  # MPICH's Abort can return while another rank is stopped; this rank must not go on


class MPICommunicator(Communicator):
    def __init__(self, world: MPIWorld, comm, ranks: tuple):
        super().__init__(comm.Get_rank(), ranks, world.clock, world.link)
        self.world, self.comm, self.MPI = world, comm, world.MPI
        self.pending_sends = []  # isend requests (and their buffers) not yet known to be done

    def fail(self, message: str):
        """This rank cannot go on: say why and end the whole job."""
        self.world.fail(message)

    # ---- collectives -------------------------------------------------------------------------
    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(array)
        result = np.empty_like(array)
        return self._collective("all_reduce", array.nbytes, lambda: self.comm.Iallreduce(array, result), result)

    def all_gather(self, array: np.ndarray, axis: int = 0) -> np.ndarray:
        """Each member's array may differ in size along `axis` (uneven vocabulary slices)."""
        moved = np.ascontiguousarray(np.moveaxis(array, axis, 0))  # gathered along the first axis
        sizes = np.zeros(self.size, np.int64)
        self._collective("sizes", 0, lambda: self.comm.Iallgather(np.array([moved.shape[0]], np.int64), sizes), None,
                         record=False)
        row = int(np.prod(moved.shape[1:]))
        counts = [int(n) * row for n in sizes]
        flat = np.empty(sum(counts), array.dtype)
        self._collective("all_gather", flat.nbytes, lambda: self.comm.Iallgatherv(moved, [flat, counts]), None)
        return np.moveaxis(flat.reshape((int(sizes.sum()),) + moved.shape[1:]), 0, axis)

    def broadcast(self, value=None, root: int = 0, wait_forever: bool = False):
        """The root sends every other member a pickled copy and goes on at once (as MPI allows a
        broadcast's root to); a member waits for it. The driver's commands travel this way, so
        it can post the next step while later stages still work on the last one."""
        arrived = self.clock.pause()
        if self.rank == root:
            self.pending_sends = [request for request in self.pending_sends if not request.Test()]
            self.pending_sends += [self.comm.isend(value, member, BROADCAST_TAG)
                                   for member in range(self.size) if member != root]
            now = self.clock.now()
            self.record("broadcast", payload_bytes(value), self.ranks, arrived, arrived, now)
            self.clock.resume(now)
            return value
        self._wait_for(lambda: self.comm.Iprobe(root, BROADCAST_TAG), f"a broadcast from rank {self.ranks[root]}",
                       wait_forever)
        value = self.comm.recv(source=root, tag=BROADCAST_TAG)
        now = self.clock.now()
        self.record("broadcast", payload_bytes(value), self.ranks, arrived, arrived, now)
        self.clock.resume(now)
        return value

    def gather(self, value, root: int = 0):
        """Every member's value, as a list in rank order, on root (None elsewhere): each sends
        its own, root waits for each in turn."""
        arrived = self.clock.pause()
        values = None
        if self.rank == root:
            values = []
            for member in range(self.size):
                if member == root:
                    values.append(value)
                    continue
                self._wait_for(lambda: self.comm.Iprobe(member, GATHER_TAG), f"a report from rank {self.ranks[member]}")
                values.append(self.comm.recv(source=member, tag=GATHER_TAG))
        else:
            self.pending_sends = [request for request in self.pending_sends if not request.Test()]
            self.pending_sends.append(self.comm.isend(value, root, GATHER_TAG))
        now = self.clock.now()
        self.record("gather", payload_bytes(value), self.ranks, arrived, arrived, now)
        self.clock.resume(now)
        return values

    def barrier(self, wait_forever: bool = False):
        self._collective("barrier", 0, self.comm.Ibarrier, None, wait_forever=wait_forever)

    def _collective(self, kind, buffer_bytes, start_request, result, record=True, wait_forever=False):
        arrived = self.clock.pause()
        self._wait(start_request(), kind, wait_forever)
        now = self.clock.now()
        if record:
            self.record(kind, buffer_bytes, self.ranks, arrived, arrived, now)
        self.clock.resume(now)
        return result

    # ---- messages ----------------------------------------------------------------------------
    def send(self, value, dest: int, tag: int = 0):
        sent_at = self.clock.pause()
        self.pending_sends = [request for request in self.pending_sends if not request.Test()]
        self.pending_sends.append(self.comm.isend(value, dest, tag))
        now = self.clock.now()
        self.record("send", payload_bytes(value), (self.global_rank, self.ranks[dest]), sent_at, sent_at, now)
        self.clock.resume(now)

    def poll(self, source: int, tag: int = 0) -> bool:
        """Whether a message from group member `source` with `tag` is waiting."""
        return self.comm.Iprobe(source, tag)

    def recv(self, source: int, tag: int = 0, wait_forever: bool = False):
        arrived = self.clock.pause()
        self._wait_for(lambda: self.comm.Iprobe(source, tag), f"a message from rank {self.ranks[source]}", wait_forever)
        value = self.comm.recv(source=source, tag=tag)
        now = self.clock.now()
        self.record("recv", payload_bytes(value), (self.ranks[source], self.global_rank), arrived, arrived, now)
        self.clock.resume(now)
        return value

    # ---- waiting, never forever inside a command --------------------------------------------------
    def _wait(self, request, what: str, wait_forever: bool = False):
        self._wait_for(request.Test, what, wait_forever)

    def _wait_for(self, done, what: str, wait_forever: bool = False):
        """Poll `done` (it drives MPI's progress) until it is true: first in a tight loop that
        yields the core between polls (a collective between ranks that compute in step is over
        in microseconds, and a sleep, 50 µs at least, would cost more than the transfer), then
        with sleeps that grow to 0.5 ms (5 ms when waiting for the next command)."""
        deadline = None if wait_forever else time.monotonic() + self.world.timeout
        spin_until = time.perf_counter() + SPIN_SECONDS
        pause = 1e-5
        while not done():
            if time.perf_counter() < spin_until:
                os.sched_yield()
                continue
            if deadline is not None and time.monotonic() > deadline:
                raise ParallelError(f"rank {self.global_rank} waited {self.world.timeout:g} s for {what} among ranks "
                                    f"{list(self.ranks)}; a rank has died or hangs")
            time.sleep(pause)
            pause = min(2 * pause, 0.005 if wait_forever else 0.0005)
