"""NumPy against the Numba kernels on the matrices of two model sizes: decode and prefill.

    python3 benchmarks/numba_kernels.py            # stories15M and 110M shapes
    python3 benchmarks/numba_kernels.py --models 110M

Decode multiplies one token row by each weight matrix; it must read the whole matrix, so its
limit is memory bandwidth. To measure reads from memory (not from a cache that happens to
hold one small matrix), each decode figure cycles through copies of the matrix filling
512 MiB, as large as the read-bandwidth probe's array (placed in huge pages, as the Numba
backend places a model's weights: kernels/huge_pages.py), and reports the matrix's bytes over
the time per product as a fraction of that probe. Prefill multiplies 128 token rows: compute-
bound, so it is reported in GFLOP/s (2 FLOPs per multiply-add). Every figure is the best of
several runs, because other work on a shared machine only ever makes a run slower.
"""

import argparse
import time

import numba
import numpy as np

from tinyinfer.kernels.bandwidth import read_bandwidth
from tinyinfer.kernels.huge_pages import HugePageArena
from tinyinfer.ops import get_backend
from tinyinfer.quantize import Q8Weight, quantize_q8_0

SHAPES = {  # [out, in] of a layer's matrices and the LM head
    "stories15M": {"wq": (288, 288), "w_up": (768, 288), "w_down": (288, 768), "lm_head": (32000, 288)},
    "110M": {"wq": (768, 768), "w_up": (2048, 768), "w_down": (768, 2048), "lm_head": (32000, 768)},
}
STORAGES = ("float32", "float16", "int8")
SWEEP_BYTES = 512 * 2**20
PREFILL_TOKENS = 128
# OpenBLAS's and Numba's worker threads spin for a while after each call, waiting for more
# work; on 2 cores a pool still spinning made the other library's calls many times slower.
# So each library's measurements start after this pause.
SPIN_DOWN_SECONDS = 0.5


def best_time(run, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of run() (after one warm-up call)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def stored(w: np.ndarray, storage: str):
    return {"float32": w, "float16": w.astype(np.float16), "int8": quantize_q8_0(w)}[storage]


def sweep_copies(weight) -> list:
    """Copies of `weight` filling SWEEP_BYTES, in one huge-page arena, as the Numba backend
    keeps a model's weights (both backends read these same copies)."""
    count = 1 + SWEEP_BYTES // weight.nbytes
    if isinstance(weight, Q8Weight):
        arena = HugePageArena(count * HugePageArena.bytes_needed([weight.values, weight.scales]))
        return [Q8Weight(arena.copy(weight.values), arena.copy(weight.scales)) for _ in range(count)]
    arena = HugePageArena(count * HugePageArena.bytes_needed([weight]))
    return [arena.copy(weight) for _ in range(count)]


def measure(ops, weight, x1, x128, copies) -> tuple[float, float]:
    """(seconds per decode matvec, averaged over a sweep of every copy; seconds per prefill)."""
    time.sleep(SPIN_DOWN_SECONDS)
    decode = best_time(lambda: [ops.matmul(x1, w) for w in copies], repeats=5) / len(copies)
    flops = 2 * x128.shape[0] * weight.shape[0] * weight.shape[1]
    prefill = best_time(lambda: ops.matmul(x128, weight), repeats=max(5, min(30, int(3e9 / flops))))
    return decode, prefill


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    ops_numpy, ops_numba = get_backend("numpy"), get_backend("numba")
    bandwidth = read_bandwidth()
    print(f"threads: {numba.get_num_threads()}; read bandwidth (parallel Numba sum over 512 MiB): "
          f"{bandwidth / 1e9:.1f} GB/s\n")
    print("| model | matrix [out, in] | weights | decode NumPy µs | decode Numba µs | Numba GB/s | of bound "
          "| Numba vs float32 | prefill NumPy GFLOP/s | prefill Numba GFLOP/s | prefill Numba / NumPy |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for model in args.models:
        for name, shape in SHAPES[model].items():
            w = rng.standard_normal(shape, dtype=np.float32)
            x1 = rng.standard_normal((1, shape[1]), dtype=np.float32)
            x128 = rng.standard_normal((PREFILL_TOKENS, shape[1]), dtype=np.float32)
            for storage in STORAGES:
                weight = stored(w, storage)
                copies = sweep_copies(weight)
                (numpy_decode, numpy_prefill), (decode, prefill) = (measure(ops, weight, x1, x128, copies)
                                                                    for ops in (ops_numpy, ops_numba))
                del copies
                if storage == "float32":  # the first storage: what the others are compared with
                    float32_decode = decode
                flops = 2 * PREFILL_TOKENS * shape[0] * shape[1]
                print(f"| {model} | {name} {list(shape)} | {storage} | {numpy_decode * 1e6:.0f} | {decode * 1e6:.0f} "
                      f"| {weight.nbytes / decode / 1e9:.1f} | {weight.nbytes / decode / bandwidth:.0%} "
                      f"| {float32_decode / decode:.2f}x | {flops / numpy_prefill / 1e9:.0f} "
                      f"| {flops / prefill / 1e9:.0f} | {numpy_prefill / prefill:.2f} |", flush=True)


if __name__ == "__main__":
    main()
