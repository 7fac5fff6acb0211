"""NumPy against the Numba kernels on the matrices of two model sizes: decode and prefill.

    python3 benchmarks/numba_kernels.py            # stories15M and 110M shapes
    python3 benchmarks/numba_kernels.py --models 110M

Decode multiplies one token row by each weight matrix; it must read the whole matrix, so its
limit is memory bandwidth. To measure reads from memory (not from a cache that happens to
hold one small matrix), each decode figure cycles through copies of the matrix filling
512 MiB, as large as the read-bandwidth probe's array, and reports the matrix's bytes over
the time per product as a fraction of that probe. Prefill multiplies 128 token rows: compute-
bound, so it is reported in GFLOP/s (2 FLOPs per multiply-add). Every figure is the best of
several runs, because other work on a shared machine only ever makes a run slower.
"""

import argparse
import time

import numba
import numpy as np

from tinyinfer.kernels.bandwidth import read_bandwidth
from tinyinfer.ops import get_backend
from tinyinfer.quantize import quantize_q8_0

SHAPES = {  # [out, in] of a layer's matrices and the LM head
    "stories15M": {"wq": (288, 288), "w_up": (768, 288), "w_down": (288, 768), "lm_head": (32000, 288)},
    "110M": {"wq": (768, 768), "w_up": (2048, 768), "w_down": (768, 2048), "lm_head": (32000, 768)},
}
STORAGES = ("float32", "float16", "int8")
SWEEP_BYTES = 512 * 2**20
PREFILL_TOKENS = 128


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


def copied(weight):
    return type(weight)(weight.values.copy(), weight.scales.copy()) if hasattr(weight, "scales") else weight.copy()


def decode_seconds(ops, x, weights) -> float:
    """Time of one matvec, averaged over a sweep through every copy in `weights`."""
    return best_time(lambda: [ops.matmul(x, w) for w in weights], repeats=3) / len(weights)


def measure(ops_numpy, ops_numba, shape, storage, rng):
    out_features, in_features = shape
    weight = stored(rng.standard_normal(shape, dtype=np.float32), storage)
    copies = [weight] + [copied(weight) for _ in range(SWEEP_BYTES // weight.nbytes)]
    x1 = rng.standard_normal((1, in_features), dtype=np.float32)
    decode = [decode_seconds(ops, x1, copies) for ops in (ops_numpy, ops_numba)]
    del copies
    x128 = rng.standard_normal((PREFILL_TOKENS, in_features), dtype=np.float32)
    repeats = max(3, min(30, int(3e9 / (2 * PREFILL_TOKENS * out_features * in_features))))
    prefill = [best_time(lambda: ops.matmul(x128, weight), repeats) for ops in (ops_numpy, ops_numba)]
    return weight.nbytes, decode, prefill


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    ops_numpy, ops_numba = get_backend("numpy"), get_backend("numba")
    bandwidth = read_bandwidth()
    print(f"threads: {numba.get_num_threads()}; read bandwidth (parallel Numba sum over 512 MiB): "
          f"{bandwidth / 1e9:.1f} GB/s\n")
    print("| model | matrix [out, in] | weights | decode NumPy µs | decode Numba µs | Numba GB/s | of bound "
          "| prefill NumPy GFLOP/s | prefill Numba GFLOP/s | Numba / NumPy |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for model in args.models:
        for storage in STORAGES:
            for name, shape in SHAPES[model].items():
                nbytes, decode, prefill = measure(ops_numpy, ops_numba, shape, storage, rng)
                flops = 2 * PREFILL_TOKENS * shape[0] * shape[1]
                print(f"| {model} | {name} {list(shape)} | {storage} | {decode[0] * 1e6:.0f} | {decode[1] * 1e6:.0f} "
                      f"| {nbytes / decode[1] / 1e9:.1f} | {nbytes / decode[1] / bandwidth:.0%} "
                      f"| {flops / prefill[0] / 1e9:.0f} | {flops / prefill[1] / 1e9:.0f} "
                      f"| {prefill[0] / prefill[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
