"""What two ranks can read at once: one tp=2 shard's weights streamed by the matvec kernel.

    NUMBA_NUM_THREADS=1 python3 benchmarks/concurrent_streams.py              # one process alone
    NUMBA_NUM_THREADS=1 mpiexec -n 2 python3 benchmarks/concurrent_streams.py # two side by side

The matrices of one device of the stories110M shape split tp=2 (12 layers of q, k, v, o,
gate, up, down, and half the LM head: 219 MB of float32) go through the Numba decode kernel
(`matvec`, one token) once per pass, with no model, no MPI traffic and no Python between
kernels beyond the loop. Under mpiexec both ranks start together (a barrier) and each prints
its median pass. If two of them take no longer than one alone, the machine gives each core its
own memory bandwidth and tensor-parallel decode can approach 2x; if they take longer, that is
the ceiling, whatever the communication costs.
"""

import os
import statistics
import time

import numpy as np

from tinyinfer.kernels import numba_kernels as kernels

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, TP = 768, 2048, 12, 32000, 2


def shard_matrices() -> list[np.ndarray]:
    """One tp=2 device's matrices, [out, in] float32, random."""
    rng = np.random.default_rng(0)
    half, columns = HIDDEN // TP, INTERMEDIATE // TP
    layer = [(half, HIDDEN)] * 3 + [(HIDDEN, half), (columns, HIDDEN), (columns, HIDDEN), (HIDDEN, columns)]
    shapes = layer * LAYERS + [(VOCAB // TP, HIDDEN)]
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def main():
    matrices = shard_matrices()
    outputs = [np.empty((1, m.shape[0]), np.float32) for m in matrices]
    inputs = {m.shape[1]: np.ones((1, m.shape[1]), np.float32) for m in matrices}

    def one_pass():
        for matrix, out in zip(matrices, outputs):
            kernels.matvec(inputs[matrix.shape[1]], matrix, out)

    one_pass()  # compiles (or loads) the kernel, touches the pages
    if "PMI_RANK" in os.environ:
        from mpi4py import MPI

        MPI.COMM_WORLD.Barrier()
    times = []
    for _ in range(40):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    total = sum(m.nbytes for m in matrices)
    rank = os.environ.get("PMI_RANK", "alone")
    print(f"rank {rank}: {total / 1e6:.0f} MB a pass, median {1e3 * median:.2f} ms, {total / median / 1e9:.1f} GB/s",
          flush=True)


if __name__ == "__main__":
    main()
