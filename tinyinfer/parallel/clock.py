"""A device's clock: when it computes, when it waits, and what its timeline records.

The model code never reads a clock. The communicators do: every call first closes the device's
current compute span (`pause`, which returns the time the device reached the call), waits for
its data, then lets the device go on from the time the data was there (`resume`).

- `WallClock`: a real device, one process per rank (MPI). Time is the machine's monotonic
  clock, which every process on a machine shares, so the timelines of its ranks line up.
- `VirtualClock`: a simulated device, a thread of one process. The threads take turns (one
  computes at a time, holding the world's `compute_slot`), so each compute span is timed as
  if the device had the machine to itself; the device's clock advances by those spans and by
  the link model's time for each transfer, never by the time it waited for its turn. Two
  simulated devices therefore overlap on their clocks as two real ones would, even on a
  laptop with two cores.
"""

import threading
import time
from contextlib import contextmanager

from tinyinfer.parallel.errors import ParallelError
from tinyinfer.parallel.ledger import ComputeSpan, DeviceLedger


class WallClock:
    def __init__(self, ledger: DeviceLedger):
        self.ledger = ledger
        self.label = ""
        self.active = False  # inside `busy`: the device is running a command
        self.span_start = None  # when the current compute span began (None while waiting)

    def now(self) -> float:
        return time.perf_counter()

    @contextmanager
    def busy(self, label: str = ""):
        """The device computes in this block (one command from its driver)."""
        self.active, self.label = True, label
        self.resume(self.now())
        try:
            yield
        finally:
            self.pause()
            self.active = False

    def set_label(self, label: str):
        """Name what the device does from here on; its current span closes under the old name."""
        if self.span_start is not None:
            self.resume(self.pause())
        self.label = label

    def pause(self) -> float:
        """The device stops computing (to wait for data): its span is recorded. Returns the
        time it stopped."""
        now = self.now()
        if self.span_start is not None:
            self.ledger.compute.append(ComputeSpan(self.span_start, now, self.label))
            self.span_start = None
        return now

    def resume(self, at: float):
        """The device goes on once its data is there, at time `at` (on a wall clock, now)."""
        if self.active:
            self.span_start = self.now()


class VirtualClock(WallClock):
    def __init__(self, ledger: DeviceLedger, compute_slot: threading.Lock, timeout: float):
        super().__init__(ledger)
        self.compute_slot = compute_slot  # one lock for the whole simulated world
        self.timeout = timeout  # a device that computes this long without talking is stuck
        self.time = 0.0  # the device's own clock, in seconds
        self.wall_start = None  # perf_counter() when the current compute span began

    def now(self) -> float:
        start, elapsed = self.wall_start, self.time  # read once: another thread may be asking
        return elapsed if start is None else elapsed + time.perf_counter() - start

    def pause(self) -> float:
        if self.wall_start is not None:
            end = self.now()
            self.ledger.compute.append(ComputeSpan(self.span_start, end, self.label))
            self.time, self.span_start, self.wall_start = end, None, None
            self.compute_slot.release()
        return self.time

    def resume(self, at: float):
        self.time = max(self.time, at)
        if self.active:
            if not self.compute_slot.acquire(timeout=self.timeout):
                raise ParallelError(f"device {self.ledger.rank} waited {self.timeout:g} s for its turn to compute: "
                                    "another device has computed that long without reaching a transfer; it is stuck")
            self.span_start, self.wall_start = self.time, time.perf_counter()
