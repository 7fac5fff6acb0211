"""What each op costs: floating-point operations and bytes moved, from the shapes it is given.

An op's arithmetic intensity (FLOPs per byte) against the machine's balance point (peak FLOP/s
per byte/s of memory bandwidth) says which limit it hits: a matmul over 128 prefill tokens
does 128 multiply-adds per weight it reads and is compute-bound; the same matmul for one
decode token does 1 and waits on memory. `CostCounter` wraps any backend and adds up the cost
of every op the model calls, so `tinyinfer.roofline.forward_costs` can total a prefill and a decode step and a
notebook can place each op on a roofline (see tinyinfer/roofline.py).

Counts are the textbook ones (a multiply-add is 2 FLOPs; exp and division count 1), and bytes
are each input read once and each output written once: what an ideal kernel moves.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class OpCost:
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    calls: int = 0

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(self.flops + other.flops, self.bytes_read + other.bytes_read,
                      self.bytes_written + other.bytes_written, self.calls + other.calls)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0


def _bytes(*arrays) -> int:
    """Bytes of arrays (NumPy, CuPy or Q8Weight), None counting 0."""
    return sum(int(a.nbytes) for a in arrays if a is not None)


def _item(x) -> int:
    return np.dtype(x.dtype).itemsize


def embedding_cost(token_ids, table) -> OpCost:
    row_bytes = table.shape[1] * _item(table)
    return OpCost(0, _bytes(token_ids) + len(token_ids) * row_bytes, len(token_ids) * row_bytes, 1)


def matmul_cost(x, w, bias=None) -> OpCost:
    tokens, in_features = x.shape
    out_features = w.shape[0]
    flops = 2 * tokens * in_features * out_features + (tokens * out_features if bias is not None else 0)
    return OpCost(flops, _bytes(x, w, bias), tokens * out_features * _item(x), 1)


def rms_norm_cost(x, weight, eps) -> OpCost:
    return OpCost(4 * x.size, _bytes(x, weight), _bytes(x), 1)  # square, add, scale, gain


def rotary_cost(x, cos, sin) -> OpCost:
    return OpCost(3 * x.size, _bytes(x, cos, sin), _bytes(x), 1)  # per pair: 4 mul + 2 add


def _attention_flops(num_heads: int, head_dim: int, new_tokens: int, start_pos: int) -> int:
    """Each query i (at position start_pos + i) scores and mixes start_pos + i + 1 keys."""
    pairs = new_tokens * start_pos + new_tokens * (new_tokens + 1) // 2  # causal (query, key) pairs
    return num_heads * pairs * (4 * head_dim + 3)  # q.k and p*v (2 FLOPs each per dim), softmax


def attention_cost(q, k, v, start_pos) -> OpCost:
    new_tokens, num_heads, head_dim = q.shape
    return OpCost(_attention_flops(num_heads, head_dim, new_tokens, start_pos), _bytes(q, k, v), _bytes(q), 1)


def paged_attention_cost(q, key_pool, value_pool, block_tables, query_starts, start_positions) -> OpCost:
    """As attention_cost for each sequence, reading only its tokens of the pools (and the tables)."""
    _, num_heads, head_dim = q.shape
    token_bytes = int(np.prod(key_pool.shape[2:])) * _item(key_pool)  # one token's keys (or values)
    flops, kv_bytes = 0, 0
    for s, start_pos in enumerate(start_positions):
        new_tokens = int(query_starts[s + 1] - query_starts[s])
        flops += _attention_flops(num_heads, head_dim, new_tokens, int(start_pos))
        kv_bytes += 2 * (int(start_pos) + new_tokens) * token_bytes
    return OpCost(flops, _bytes(q, block_tables, query_starts, start_positions) + kv_bytes, _bytes(q), 1)


def silu_mul_cost(gate, up) -> OpCost:
    return OpCost(5 * gate.size, _bytes(gate, up), _bytes(gate), 1)  # exp, add, divide, 2 mul


def softmax_cost(x) -> OpCost:
    return OpCost(4 * x.size, _bytes(x), _bytes(x), 1)  # subtract max, exp, sum, divide


COSTS = {
    "embedding": embedding_cost,
    "matmul": matmul_cost,
    "rms_norm": rms_norm_cost,
    "rotary": rotary_cost,
    "attention": attention_cost,
    "paged_attention": paged_attention_cost,
    "silu_mul": silu_mul_cost,
    "softmax": softmax_cost,
}


class CostCounter:
    """A backend that runs every op on `backend` and adds up each op's cost by name."""

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name
        self.totals: dict[str, OpCost] = {}

    def _run(self, op: str, *args):
        self.totals[op] = self.totals.get(op, OpCost()) + COSTS[op](*args)
        return getattr(self.backend, op)(*args)

    def to_device(self, array, dtype=None):
        return self.backend.to_device(array, dtype)

    def load_weights(self, weights):
        return self.backend.load_weights(weights)

    def compile_model(self, model):
        return model  # op by op, so that every op is counted

    def set_threads(self, threads):
        self.backend.set_threads(threads)

    def begin_pass(self):
        self.backend.begin_pass()

    def to_numpy(self, array):
        return self.backend.to_numpy(array)

    def zeros(self, shape, dtype):
        return self.backend.zeros(shape, dtype)

    def embedding(self, token_ids, table):
        return self._run("embedding", token_ids, table)

    def matmul(self, x, w, bias=None):
        return self._run("matmul", x, w, bias)

    def rms_norm(self, x, weight, eps):
        return self._run("rms_norm", x, weight, eps)

    def rotary(self, x, cos, sin):
        return self._run("rotary", x, cos, sin)

    def attention(self, q, k, v, start_pos):
        return self._run("attention", q, k, v, start_pos)

    def paged_attention(self, q, key_pool, value_pool, block_tables, query_starts, start_positions):
        return self._run("paged_attention", q, key_pool, value_pool, block_tables, query_starts, start_positions)

    def silu_mul(self, gate, up):
        return self._run("silu_mul", gate, up)

    def softmax(self, x):
        return self._run("softmax", x)

