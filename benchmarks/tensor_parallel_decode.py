"""Tensor-parallel decode over MPI against one process: what splitting the weights buys.

    python3 benchmarks/tensor_parallel_decode.py                    # 110M shape, float32, tp=2
    python3 benchmarks/tensor_parallel_decode.py --weights int8 --rounds 5

Decode reads every weight once per token. With tp=2 each process reads half of them (its
heads, its MLP columns, its half of the vocabulary), so on a machine whose cores each get
their own share of memory bandwidth two processes can decode nearly twice as fast, minus the
two all-reduces a layer (and the embedding's and the logits' collectives) they wait on.

Each round runs, one after the other, a single process with one thread and `mpiexec -n 2`
with one thread per rank (NUMBA_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1), on the same random
weights (tinyinfer.bench.random_model, seed 0) and the same backend; each measures tg tokens/s
(tinyinfer.bench.time_decode: one token at a time against a growing KV cache) as the median of
`--repetitions` runs after a warm-up. Taking turns this way, a slow stretch of a shared machine
slows both. The table gives every round and the median ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure(args):
    """Run inside one process, or in each rank under mpiexec: decode and print tokens/s (rank 0)."""
    from tinyinfer.bench import random_model, time_decode
    from tinyinfer.llm import LLM
    from tinyinfer.ops import get_backend
    from tinyinfer.parallel.launch import InMemorySource, ParallelOptions
    from tinyinfer.quantize import store_weights

    config, weights = random_model(args.shape)
    if args.tp > 1:  # under mpiexec only rank 0 returns: the other rank serves it, then exits
        llm = LLM.on_parallel_group(InMemorySource(config, weights), ParallelOptions(tp=args.tp), args.backend,
                                    np.float32, args.weights, Path(args.shape))
    else:
        llm = LLM(config, store_weights(weights, args.weights), None, get_backend(args.backend), np.float32,
                  Path(args.shape))
    rng = np.random.default_rng(0)
    time_decode(llm, 8, rng)  # warm-up: first touch of the weights
    speeds = [args.new_tokens / time_decode(llm, args.new_tokens, rng) for _ in range(args.repetitions)]
    print(json.dumps({"tokens_per_s": statistics.median(speeds)}), flush=True)
    llm.close()


def run(command: list[str]) -> float:
    result = subprocess.run(command, env=os.environ | ONE_THREAD, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="stories110M")
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--weights", default="float32", choices=["float32", "float16", "int8"])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("-n", "--new-tokens", type=int, default=64)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times the two take turns")
    parser.add_argument("--measure", action="store_true", help="(internal) run one measurement in this process")
    args = parser.parse_args()
    if args.measure:
        return measure(args)

    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else "mpiexec"
    common = [__file__, "--measure", "--shape", args.shape, "--backend", args.backend, "--weights", args.weights,
              "-n", str(args.new_tokens), "-r", str(args.repetitions)]
    print(f"{args.shape}, {args.backend}, {args.weights} weights, tg{args.new_tokens}, one thread per process\n")
    print(f"| round | 1 process tok/s | tp={args.tp} over MPI tok/s | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    ratios = []
    for round_index in range(1, args.rounds + 1):
        alone = run([sys.executable] + common + ["--tp", "1"])
        split = run([mpiexec, "-n", str(args.tp), sys.executable] + common + ["--tp", str(args.tp)])
        ratios.append(split / alone)
        print(f"| {round_index} | {alone:.1f} | {split:.1f} | {split / alone:.2f}x |", flush=True)
    print(f"\nmedian speed-up: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
