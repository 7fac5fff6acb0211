"""Decode speed with the weights on 4 KiB pages against the Numba backend's huge-page arena.

    python3 benchmarks/huge_pages.py                       # 110M shape, float32 and int8
    python3 benchmarks/huge_pages.py --model stories15M --weights float32

Both models live in one process and take turns (64 decode steps each, `--rounds` times:
`tinyinfer.bench.decode_side_by_side`); the medians and their ratio are printed.
"4 KiB pages" loads the weights array by array as the NumPy backend does (each matrix its own
allocation, most too small for NumPy to ask for huge pages), "arena" is `load_weights`.
"""

import argparse
from pathlib import Path

import numpy as np

from tinyinfer.bench import RANDOM_SHAPES, decode_side_by_side, random_model
from tinyinfer.llm import LLM
from tinyinfer.ops import get_backend
from tinyinfer.ops.numpy_backend import NumpyBackend
from tinyinfer.quantize import store_weights

class SmallPagesNumbaBackend(type(get_backend("numba"))):
    """The Numba backend, loading weights as the NumPy backend does (no arena)."""

    load_weights = NumpyBackend.load_weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories110M", choices=sorted(RANDOM_SHAPES))
    parser.add_argument("--weights", default="float32,int8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config, weights = random_model(args.model)
    print(f"| {args.model} weights | 4 KiB pages tok/s | arena tok/s | arena / 4 KiB |")
    print("| --- | ---: | ---: | ---: |")
    for weight_format in args.weights.split(","):
        stored = store_weights(weights, weight_format)
        speeds = decode_side_by_side({"4k": LLM(config, stored, None, SmallPagesNumbaBackend(), np.float32, Path(args.model)),
                                      "arena": LLM(config, stored, None, get_backend("numba"), np.float32, Path(args.model))},
                                     args.rounds)
        small, arena = speeds["4k"], speeds["arena"]
        print(f"| {weight_format} | {small:.1f} | {arena:.1f} | {arena / small:.2f}x |")


if __name__ == "__main__":
    main()
