"""What running each layer as one compiled call saves the Numba backend, measured.

    python3 benchmarks/compiled_layer.py                        # 110M shape, float32 and int8
    python3 benchmarks/compiled_layer.py --model stories15M --weights float32,float16,int8 --rounds 8

The Numba backend runs each layer as one call of kernels/numba_layer.py's transformer_layer,
which calls the kernels from compiled code. Here the same model on the same weights also runs
as written in tinyinfer/model/transformer.py, each op called from Python (what the NumPy and
CuPy backends do): 13 trips a layer through Numba's dispatcher, each on caches that the weight
stream has just emptied. The two take turns in one process, 64 decode steps each, `--rounds`
times (`tinyinfer.bench.decode_side_by_side`); the medians and their ratio are printed.
"""

import argparse
import copy
from pathlib import Path

import numpy as np

from tinyinfer.bench import RANDOM_SHAPES, decode_side_by_side, random_model
from tinyinfer.llm import LLM
from tinyinfer.model.transformer import Transformer
from tinyinfer.ops import get_backend
from tinyinfer.quantize import store_weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories110M", choices=sorted(RANDOM_SHAPES))
    parser.add_argument("--weights", default="float32,int8")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    config, weights = random_model(args.model)
    print(f"| {args.model} weights | op by op from Python, tok/s | a compiled call a layer, tok/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for weight_format in args.weights.split(","):
        compiled = LLM(config, store_weights(weights, weight_format), None, get_backend("numba"), np.float32,
                       Path(args.model))
        op_by_op = copy.copy(compiled)  # the same weights in the same memory, run as written
        op_by_op.model = Transformer(config, compiled.model.weights, compiled.ops, np.float32)
        speeds = decode_side_by_side({"op by op": op_by_op, "compiled": compiled}, args.rounds)
        slow, fast = speeds["op by op"], speeds["compiled"]
        print(f"| {weight_format} | {slow:.1f} | {fast:.1f} | {fast / slow:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
