"""What one device holds and what it sends: its memory ledger and its timeline.

Every device of a parallel group (simulated or a real process) keeps one `DeviceLedger`:
- memory: the bytes of its weight shard, of its KV caches, and the peak of its activations;
- transfers: every collective and message it took part in (kind, bytes it sent, who took
  part, the link model's time for it, and when it started and ended on the device's clock);
- compute: the spans of time it spent computing, each labelled (which step, which micro-batch).
The timeline keeps the latest TIMELINE_LENGTH transfers and spans (a long chat or batch stays
bounded); the byte totals by kind count every transfer.

The driver gathers the ledgers after a run (`ParallelModel.ledgers()`), so a notebook can
show exactly what each device held, computed and sent, draw the timeline
(tinyinfer/parallel/timeline.py) and compare the bytes with `tinyinfer plan`'s prediction.
"""

from collections import defaultdict, deque
from dataclasses import dataclass, field

TIMELINE_LENGTH = 50_000  # transfers (and compute spans) a ledger keeps: the latest, so a long run stays bounded


@dataclass
class Transfer:
    kind: str  # all_reduce, all_gather, broadcast, gather, send, recv, barrier
    bytes: int  # what this device sent (recv: what it received), as link.bytes_per_device counts it
    participants: tuple  # global ranks that took part (send / recv: sender, receiver)
    modelled_seconds: float  # the link model's time for it
    start: float  # on the device's clock: when the data began to move ...
    end: float  # ... and when this device had its result
    arrived: float  # when this device reached the call (start - arrived is time spent waiting)
    label: str = ""  # what the device was doing (the step and micro-batch)


@dataclass
class ComputeSpan:
    start: float
    end: float
    label: str


@dataclass
class DeviceLedger:
    rank: int
    role: str = ""  # e.g. "tp 1/2, stage 0/2 (layers 0-5), replica 0"
    weight_bytes: int = 0  # its shard of the weights, plus what every device keeps whole
    decode_read_bytes: int = 0  # what a decode token reads of them (one row of the embedding)
    kv_bytes: int = 0  # its KV caches and pools, as allocated
    peak_activation_bytes: int = 0  # the widest point of a layer, for the most tokens of any pass
    transfers: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_LENGTH))  # of Transfer
    compute: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_LENGTH))  # of ComputeSpan
    sent: dict = field(default_factory=lambda: defaultdict(int))  # kind -> bytes, every transfer counted

    def note_activations(self, nbytes: int):
        self.peak_activation_bytes = max(self.peak_activation_bytes, int(nbytes))

    def add_transfer(self, transfer: Transfer):
        self.transfers.append(transfer)
        self.sent[transfer.kind] += transfer.bytes

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes this device sent (recv: received), summed by kind of transfer, since the
        ledger was last cleared (all of them, even past the timeline's length)."""
        return dict(self.sent)

    def clear_timeline(self):
        """Forget transfers, compute spans and byte totals (memory figures stay): to measure
        one run alone."""
        self.transfers.clear()
        self.compute.clear()
        self.sent.clear()
