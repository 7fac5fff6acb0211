"""The communicator: the only way devices of a parallel group talk.

One interface, two implementations that the model, the engine and the CLI cannot tell apart:
`SimulatedCommunicator` (tinyinfer/parallel/simulated.py: virtual devices as threads of one
process) and `MPICommunicator` (tinyinfer/parallel/mpi.py: one process per rank, over mpi4py).
A communicator spans one group of ranks (a tensor-parallel group, a pipeline, a replica);
`rank` and `size` are within that group, `ranks` are the members' ranks in the whole world.

The calls (every member of the group makes the same collective call in the same order):
- `all_reduce(array)`: the element-wise sum over the group, on every member (tensor
  parallelism's partial sums);
- `all_gather(array, axis)`: every member's array side by side along `axis`, rank order
  (the LM head's vocabulary slices);
- `broadcast(value, root)`: root's value (an array or any picklable object) on every member
  (the driver's step: token ids, positions, block tables);
- `gather(value, root)`: every member's value as a list, on root only;
- `send(value, dest, tag)` / `recv(source, tag)`: one message between two members (pipeline
  activations); send returns at once, recv waits; `poll(source, tag)`: whether recv would not;
- `barrier()`;
- `fail(message)`: this device cannot go on; every other device stops with `message` (a
  simulated world ends every wait; MPI aborts the job).

A wait inside a command gives up with a ParallelError after the world's timeout (a device
died or hangs); the waits that may last as long as the user takes (`wait_forever=True`: a
device waiting for its next command) have no limit.

Every call is recorded in the device's ledger (tinyinfer/parallel/ledger.py) with the bytes
the device sent, counted as the link model counts them (tinyinfer/parallel/link.py). Arrays
are NumPy arrays on the host; the model moves them from and to its backend's device.
"""

import numpy as np

from tinyinfer.parallel.ledger import Transfer
from tinyinfer.parallel.link import bytes_per_device

DEFAULT_TIMEOUT = 120.0  # seconds a device waits for the others inside a command


def payload_bytes(value) -> int:
    """The bytes of the arrays in a message (in a dataclass, dict, list or tuple, at any
    depth): what the ledger counts for a broadcast or a send. Python scalars and strings are
    control information and count nothing; a message with no arrays counts 0."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(payload_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


class Communicator:
    """What both implementations share: the group's shape, and recording each call."""

    def __init__(self, rank: int, ranks, clock, link):
        self.rank = rank  # this member's index in the group
        self.ranks = tuple(ranks)  # the members' ranks in the world, in group order
        self.size = len(self.ranks)
        self.clock = clock  # the device's clock (tinyinfer/parallel/clock.py); its ledger records
        self.link = link  # the link model that prices each transfer

    @property
    def ledger(self):
        return self.clock.ledger

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    def record(self, kind: str, buffer_bytes: int, participants, arrived: float, start: float,
               end: float | None = None) -> float:
        """Log one transfer that this device reached at `arrived`, whose data began to move at
        `start` and was there at `end` (by default start + the link model's time, as in a
        simulation); returns `end`. A recv is priced as the send it matches; a group of one
        moves nothing."""
        priced_as = "send" if kind == "recv" else kind
        devices = len(participants)
        seconds = self.link.seconds(priced_as, buffer_bytes, devices)
        sent = bytes_per_device(priced_as, buffer_bytes, devices)
        end = start + seconds if end is None else end
        self.ledger.add_transfer(Transfer(kind, sent, tuple(participants), seconds, start, end, arrived,
                                          self.clock.label))
        return end
