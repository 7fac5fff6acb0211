"""How many threads the CPU backends use, and why fewer are faster on a busy machine.

A forward pass calls ~100 parallel kernels (Numba's prange loops, OpenBLAS's products), and
each ends at a barrier: every thread must finish its share before the next kernel starts. On a
quiet machine that costs microseconds. When another program keeps a core busy, the thread that
shares a core with it gets the core only in the scheduler's time slices (milliseconds), and
every barrier waits for it: a pass of 100 kernels waits 100 time slices. Measured on 2 cores
with one busy process, decode fell to 4-20 % of its quiet speed that way (benchmarks/under_load.py),
well below the 50 % fair share that one thread alone would get.

So by default ("auto") the team is sized before each forward pass to the cores that other
programs leave free: the cores' busy time (/proc/stat) minus this process's own, since it last
looked, at most every quarter second of passes; never fewer than one thread. So it follows a
change of load within a quarter second of work (after an idle spell, the first passes see the
average over the spell). A fixed number (`threads=2`, `--threads 2`) turns
that off. On systems without /proc/stat, "auto" uses every core.
"""

import os
import time

SAMPLE_SECONDS = 0.25  # how often "auto" looks at the machine again


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(threads) -> int | str:
    """'auto' or a thread count from 1 to the cores available; anything else is refused."""
    if threads == "auto":
        return threads
    cores = available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise ValueError(f"threads must be 'auto' or a whole number from 1 to {cores} (this machine's cores), "
                         f"got {threads!r}")
    return threads


class ThreadBudget:
    """The thread count of one backend's kernels: fixed, or sized to the free cores ("auto")."""

    def __init__(self, threads: int | str = "auto", numba: bool = False):
        self.setting = check_threads(threads)
        self.numba = numba  # size Numba's team too (set per calling thread), besides BLAS's
        self.cores = available_cores()
        self.current = None  # the count last applied (None before the first pass)
        self.sample = _machine_sample()  # (wall, all cores' busy seconds, this process's CPU seconds)
        self.blas = None  # threadpoolctl's controller, made on first use

    def begin_pass(self):
        """Before a forward pass: apply the thread count for now. Applied every time (a few
        microseconds): BLAS's count is the process's, which another model's budget may have
        changed, and Numba's is the calling thread's."""
        self._apply(self.setting if self.setting != "auto" else self._free_cores())

    def _free_cores(self) -> int:
        """The cores other programs left free over the last sample, rounded, at least one."""
        if self.sample is None:  # no /proc/stat: use them all
            return self.cores
        now = time.monotonic()
        if self.current is not None and now - self.sample[0] < SAMPLE_SECONDS:
            return self.current
        sample = _machine_sample()
        wall, busy, own = (new - old for new, old in zip(sample, self.sample))
        self.sample = sample
        others = max(0.0, (busy - own) / wall) if wall > 0 else 0.0  # cores kept busy by other programs
        return max(1, min(self.cores, round(self.cores - others)))

    def _apply(self, threads: int):
        if self.blas is None:
            from threadpoolctl import ThreadpoolController

            self.blas = ThreadpoolController()
        self.blas.limit(limits=threads, user_api="blas")
        if self.numba:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.current = threads


def _machine_sample() -> tuple[float, float, float] | None:
    """(monotonic seconds, seconds all cores spent busy since boot, this process's CPU seconds),
    from /proc/stat's first line; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.monotonic(), (sum(fields[:8]) - idle) / ticks, own.user + own.system
