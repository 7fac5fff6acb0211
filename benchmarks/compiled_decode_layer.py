"""How much of a decode step is the cost of calling kernels from Python? An experiment.

    python3 benchmarks/compiled_decode_layer.py                 # 110M shape, float32 and int8
    python3 benchmarks/compiled_decode_layer.py --weights int8 --rounds 8

The model (tinyinfer/model/transformer.py) calls the op interface from Python: 13 kernel
calls a layer, each through Numba's dispatcher (argument types checked, arrays unboxed) and
each on caches that the weight stream has just emptied. Here one decode layer is written as a
single Numba function that calls the very same kernels from compiled code, on a contiguous
KV cache (llama2.c's layout). It must give the same logits bit for bit (checked before timing),
so the difference in speed is only the cost of crossing from Python into the kernels: the
CPU counterpart of what CUDA graphs save vLLM on a GPU. Both forward passes take turns in one
process, 64 decode steps each, `--rounds` times (`tinyinfer.bench.decode_side_by_side`);
the medians are printed.

This is a measurement, not a second forward pass for the engine: it handles only the random
Llama shapes of `tinyinfer bench` (no biases, no q/k norms) with float32 or int8 weights.
"""

import argparse
from functools import partial
from pathlib import Path

import numpy as np
from numba import njit, types
from numba.extending import overload

from tinyinfer.bench import RANDOM_SHAPES, decode_side_by_side, random_model
from tinyinfer.kernels import numba_kernels as kernels
from tinyinfer.llm import LLM
from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer
from tinyinfer.ops import get_backend
from tinyinfer.quantize import Q8Weight, store_weights

def project(x, w, out):
    """out = x @ w.T, inside compiled code: w a float32 matrix or an int8 (values, scales) pair."""


@overload(project)
def _project(x, w, out):
    if isinstance(w, types.BaseTuple):
        return lambda x, w, out: kernels.matvec_q8(x, w[0], w[1], out)
    return lambda x, w, out: kernels.matvec(x, w, out)


def rows_of(w):
    """Output rows of a float32 matrix or an int8 (values, scales) pair, inside compiled code."""


@overload(rows_of)
def _rows_of(w):
    if isinstance(w, types.BaseTuple):
        return lambda w: w[0].shape[0]
    return lambda w: w.shape[0]


@njit
def decode_layer(x, attention_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down, keys, values, position, cos, sin,
                 eps, head_dim):
    """One layer of one decode step, as Transformer.forward computes it, with the same kernels.
    x: [1, hidden]; keys, values: the layer's contiguous cache [capacity, num_kv_heads,
    head_dim], written at `position` -> the new x: [1, hidden]."""
    h = np.empty_like(x)
    kernels.rms_norm(x, attention_norm, eps, h)
    q = np.empty((1, rows_of(wq)), np.float32)
    k = np.empty((1, rows_of(wk)), np.float32)
    v = np.empty((1, rows_of(wv)), np.float32)
    project(h, wq, q)
    project(h, wk, k)
    project(h, wv, v)
    q = q.reshape(1, -1, head_dim)
    k = k.reshape(1, -1, head_dim)
    q_rotated, k_rotated = np.empty_like(q), np.empty_like(k)
    kernels.rotary(q, cos, sin, q_rotated)
    kernels.rotary(k, cos, sin, k_rotated)
    keys[position] = k_rotated[0]
    values[position] = v.reshape(-1, head_dim)
    attended = np.empty_like(q_rotated)
    seen = position + 1  # the cache as one sequence in one block, as NumbaBackend.attention passes it
    kernels.paged_attention(q_rotated, keys[:seen].reshape(1, seen, keys.shape[1], head_dim),
                            values[:seen].reshape(1, seen, values.shape[1], head_dim), np.zeros((1, 1), np.int64),
                            np.zeros(1, np.int64), np.full(1, position, np.int64), attended)
    o = np.empty_like(x)
    project(attended.reshape(1, -1), wo, o)
    x = x + o
    kernels.rms_norm(x, mlp_norm, eps, h)
    gate, up = np.empty((1, rows_of(w_gate)), np.float32), np.empty((1, rows_of(w_up)), np.float32)
    project(h, w_gate, gate)
    project(h, w_up, up)
    activated = np.empty_like(gate)
    kernels.silu_mul(gate.reshape(-1), up.reshape(-1), activated.reshape(-1))
    down = np.empty_like(x)
    project(activated, w_down, down)
    return x + down


def compiled_forward(model: Transformer, batch, all_logits=False):
    """Transformer.forward for one decode token on a contiguous KVCache, a compiled call a layer."""
    ops, weights, config = model.ops, model.weights, model.config
    (chunk,) = batch.chunks
    position = chunk.start
    cos, sin = model.rope_cos[position : position + 1], model.rope_sin[position : position + 1]
    x = ops.embedding(batch.token_ids, weights.embedding)
    for index, layer in enumerate(weights.layers):
        x = decode_layer(x, layer.attention_norm, *(as_pair(getattr(layer, name)) for name in ("wq", "wk", "wv", "wo")),
                         layer.mlp_norm, *(as_pair(getattr(layer, name)) for name in ("w_gate", "w_up", "w_down")),
                         chunk.cache.keys[index], chunk.cache.values[index], position, cos, sin, config.rms_norm_eps,
                         config.head_dim)
    chunk.cache.length = position + 1
    logits = ops.matmul(ops.rms_norm(x, weights.final_norm, config.rms_norm_eps), weights.lm_head)
    return ops.to_numpy(logits)


def as_pair(w):
    """A weight as decode_layer takes it: a float32 matrix, or an int8 one as (values, scales)."""
    return (w.values, w.scales) if isinstance(w, Q8Weight) else w


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
        eager = LLM(config, store_weights(weights, weight_format), None, get_backend("numba"), np.float32, Path(args.model))
        compiled = LLM(config, store_weights(weights, weight_format), None, get_backend("numba"), np.float32, Path(args.model))
        compiled.model.forward = partial(compiled_forward, compiled.model)
        check_same_logits(eager, compiled)
        speeds = decode_side_by_side({"eager": eager, "compiled": compiled}, args.rounds)
        slow, fast = speeds["eager"], speeds["compiled"]
        print(f"| {weight_format} | {slow:.1f} | {fast:.1f} | {fast / slow:.2f}x |", flush=True)


def check_same_logits(eager: LLM, compiled: LLM):
    """Three decode steps from an empty cache: the same logits, bit for bit (and it compiles)."""
    caches = [KVCache(eager.config, 4, eager.ops, np.float32) for _ in range(2)]
    for token in (5, 7, 9):
        a, b = (llm.model.forward(ForwardBatch.build([[token]], [cache])) for llm, cache in zip((eager, compiled), caches))
        if not np.array_equal(a, b):
            raise SystemExit(f"the compiled layers give other logits (max difference {np.abs(a - b).max()})")


if __name__ == "__main__":
    main()
