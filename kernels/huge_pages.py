"""Weights in memory backed by 2 MiB pages, so that streaming them costs few TLB misses.

Decode reads every weight once per token: 438 MB for the 110M shape in float32. Each load's
address goes through the TLB, a cache of page translations with a few thousand entries (a
few MiB of 4 KiB pages); past that, every new 4 KiB page costs a page-table walk. With 2 MiB
pages the 110M weights are ~220 pages instead of ~107,000. Linux backs anonymous memory with
such transparent huge pages when asked to (madvise MADV_HUGEPAGE; honoured when
/sys/kernel/mm/transparent_hugepage/enabled says "always" or "madvise", ignored if "never").

A memory-mapped checkpoint cannot have them (its pages are the file cache's), and NumPy asks
only for arrays of 4 MiB or more, which leaves out most of a small model's matrices. So the
Numba backend copies all the weights into one arena: one allocation, asked for huge pages,
that small matrices share. Measured on the 110M shape, float32 decode: see the Numba
backend's `load_weights`, which also decides when the copy is not worth it.
"""

import mmap

import numpy as np

ALIGNMENT = 64  # each array starts on its own cache line
HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")  # Linux; elsewhere Python has no way to ask


def available_memory() -> int:
    """Bytes of memory Linux could give without swapping (MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class HugePageArena:
    """One block of `nbytes` bytes; `copy` places arrays in it one after another."""

    def __init__(self, nbytes: int):
        self.memory = _allocate(max(nbytes, 1))  # [nbytes] uint8
        self.used = 0

    @staticmethod
    def bytes_needed(arrays) -> int:
        """Room for `copy`ing each of these arrays, with its alignment padding."""
        return sum(array.nbytes + ALIGNMENT for array in arrays)

    def copy(self, array: np.ndarray) -> np.ndarray:
        """A read-only copy of `array` (same shape and dtype, C order) inside the arena."""
        start = -(-self.used // ALIGNMENT) * ALIGNMENT  # round up to the next cache line
        if start + array.nbytes > self.memory.size:
            raise MemoryError(f"huge-page arena of {self.memory.size} bytes is full; size it with bytes_needed")
        placed = self.memory[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
        placed[...] = array
        placed.flags.writeable = False
        self.used = start + array.nbytes
        return placed


def _allocate(nbytes: int) -> np.ndarray:
    """[nbytes] uint8 of private anonymous memory that the kernel is asked to back with huge
    pages. (Shared memory, mmap's default, would follow a different THP setting.) Other
    systems than Linux have no MADV_HUGEPAGE in Python and get ordinary memory."""
    if not HUGE_PAGES:
        return np.empty(nbytes, np.uint8)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, np.uint8)
