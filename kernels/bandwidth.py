"""A memory read-bandwidth probe: sum a large array with every core.

Decode reads each weight once per token and writes almost nothing, so its speed limit is
how fast the cores together can *read* memory. A single-threaded `np.sum` measures one core
(about two thirds of the machine's figure here); this sums disjoint slices in parallel.
"""

import numba
import numpy as np
from numba import prange


@numba.njit(parallel=True, fastmath=True, cache=True)
def parallel_sum(data):
    """data: [n] float64 -> its sum. prange splits the loop across the threads, each keeping
    its own partial sum; fastmath lets LLVM reorder the additions into SIMD lanes, without
    which the loop waits on each add's latency and measures the adder, not the memory."""
    total = 0.0
    for i in prange(data.size):
        total += data[i]
    return total


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second read by `parallel_sum` over a `megabytes` array, best of `repeats`
    (after one warm-up that compiles the kernel and faults the pages in)."""
    import time

    data = np.ones(megabytes * 2**20 // 8)
    parallel_sum(data)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        parallel_sum(data)
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best
