"""Each transformer layer as two compiled calls: how the Numba backend runs the model.

Transformer.layer calls the op interface from Python, 13 kernels a layer (more with biases
or q/k norms). Each call crosses Numba's dispatcher (it checks the argument types and unboxes
the arrays), and the Python between two kernels runs on caches that decode's stream of
weights has just emptied (~10 µs a call). Measured side by side on the 110M shape
(benchmarks/compiled_layer.py), compiled layers decode 1.06-1.09x as fast with float32
weights and 1.11-1.20x with int8. Here the layer is written once more as two Numba functions,
its attention half and its MLP half, that call the very same kernels of numba_kernels.py, with
the same arguments in the same order, so their numbers are the op-by-op path's bit for bit
(tests/test_numba_layer.py holds them to that for every weight format, both kinds of KV cache,
biases and q/k norms). The residual additions stay in Python between the halves, where a
tensor-parallel device adds its group's partial sums (Transformer.tensor_sum).
It is the CPU counterpart of the CUDA graphs vLLM replays for decode, or of torch.compile.

It runs float32 activations with float32, float16 or int8 weights, on the engine's paged
cache or on one contiguous KVCache, prefill and decode alike. Anything else (float64, a dtype
for checking; float16 activations; several contiguous caches in one batch) runs the model as
written, op by op, and gets the same numbers that way.
"""

from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.extending import overload

from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer
from tinyinfer.model.weights import LayerWeights
from tinyinfer.quantize import BLOCK, Q8Weight

from . import numba_kernels as kernels

# Numba's disk cache keys attention_block and mlp_block on this file's content only, yet its cached code
# holds parts of the kernels it calls: after a change to numba_kernels.py alone, the cached
# layer mixed old and new kernel code and gave NaN (seen once, int8 prefill). This line ties
# the cache to numba_kernels.py's content (which ties in simd.py's): tests/test_numba_layer.py
# checks it and says the new value when numba_kernels.py changes.
KERNELS_SOURCE = "c204f9f97589b605"  # the start of numba_kernels.py's sha256


class CompiledTransformer(Transformer):
    """A Transformer whose layers each run as two compiled calls (`attention_block`, `mlp_block`) when the weights
    and the batch are of a kind it covers, and op by op (Transformer.layer) otherwise."""

    def __init__(self, model: Transformer):
        super().__init__(model.config, model.weights, model.ops, model.dtype, model.tensor_group, model.vocab_start)
        covered = self.dtype == np.float32 and all(_covered(layer) for layer in self.weights.layers)
        # per layer, the weights as attention_block and mlp_block take them; None: every layer op by op
        self.layer_weights = [_layer_weights(layer) for layer in self.weights.layers] if covered else None
        self.kv = None  # where the batch of the current forward pass keeps its keys and values
        if covered:
            self._compile()

    def forward(self, batch: ForwardBatch, all_logits: bool = False) -> np.ndarray:
        self.kv = KVPlacement.of(batch) if self.layer_weights is not None else None
        return super().forward(batch, all_logits)

    def layer(self, layer_index: int, layer: LayerWeights, x, cos, sin, batch: ForwardBatch):
        if self.kv is None:
            return super().layer(layer_index, layer, x, cos, sin, batch)
        kv, weights, eps = self.kv, self.layer_weights[layer_index], self.config.rms_norm_eps
        attended = attention_block(x, cos, sin, weights, kv.keys[layer_index], kv.values[layer_index], kv.slots, eps,
                                   self.config.head_dim)
        x = x + self.tensor_sum(attended)
        return x + self.tensor_sum(mlp_block(x, weights, eps))

    def _compile(self):
        """Compile attention_block and mlp_block for this model's weights (or load it from Numba's disk
        cache) by running layer 0 once on a one-token cache, so no forward pass waits for it."""
        config = self.config
        cache = KVCache(config, 1, self.ops, self.dtype)
        kv = KVPlacement.of(ForwardBatch.build([[0]], [cache]))
        x = np.zeros((1, config.hidden_size), np.float32)
        cos, sin = self.rope_cos[:1].copy(), self.rope_sin[:1].copy()  # as forward passes them: [tokens, head_dim // 2]
        attention_block(x, cos, sin, self.layer_weights[0], kv.keys[0], kv.values[0], kv.slots, config.rms_norm_eps,
                        config.head_dim)
        mlp_block(x, self.layer_weights[0], config.rms_norm_eps)


@dataclass
class KVPlacement:
    """Where a forward pass stores each layer's new keys and values and which ones each query
    reads, in the paged cache's terms (as NumbaBackend.paged_attention passes them to its
    kernel). A single contiguous KVCache fits them too: one block that holds all its rows.

    keys[layer], values[layer]: [num_blocks, block_size, num_kv_heads, head_dim].
    slots: (write_blocks, write_rows, block_tables, row_sequence, row_position): new token t
    is stored at row write_rows[t] of block write_blocks[t], and query row r, of sequence
    row_sequence[r] (a row of block_tables [sequences, max_blocks]), sits at row_position[r].
    """

    keys: list
    values: list
    slots: tuple

    @classmethod
    def of(cls, batch: ForwardBatch) -> "KVPlacement | None":
        """The batch's placement, or None for what the compiled blocks do not cover: several
        contiguous caches, or a cache that is not float32. A contiguous cache too small for
        the new tokens is left to the op-by-op path, which says so."""
        if batch.paged is not None:
            paged = batch.paged
            keys, values = paged.pool.keys, paged.pool.values
            row_sequence, row_position = query_rows(paged.query_starts, paged.start_positions)
            slots = (paged.write_blocks, paged.write_rows, paged.block_tables, row_sequence, row_position)
        elif len(batch.chunks) == 1 and isinstance(batch.chunks[0].cache, KVCache):
            (chunk,) = batch.chunks
            if chunk.start + chunk.num_new > chunk.cache.capacity:
                return None
            keys, values = [k[None] for k in chunk.cache.keys], [v[None] for v in chunk.cache.values]
            positions = np.arange(chunk.start, chunk.start + chunk.num_new)
            no_block = np.zeros(chunk.num_new, np.int64)
            slots = (no_block, positions, np.zeros((1, 1), np.int64), no_block, positions)
        else:
            return None
        if keys[0].dtype != np.float32 or values[0].dtype != np.float32:
            return None
        return cls(keys, values, tuple(np.asarray(array, np.int64) for array in slots))


def query_rows(query_starts: np.ndarray, start_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paged attention kernel's terms for a batch whose sequence s has query rows
    query_starts[s] .. query_starts[s + 1] - 1 from position start_positions[s]: for every
    query row, its sequence (row_sequence) and its position (row_position), both [tokens]."""
    new_tokens = np.diff(query_starts)
    row_sequence = np.repeat(np.arange(len(new_tokens)), new_tokens)
    row_position = np.arange(len(row_sequence)) - query_starts[row_sequence] + start_positions[row_sequence]
    return row_sequence, row_position


def has_block_scales(w: Q8Weight) -> bool:
    """One scale per block of BLOCK weights: scales [out, in // BLOCK], `in` a multiple of BLOCK.
    The kernels trust this shape, so it is checked before any of them runs."""
    return w.scales.shape == (w.shape[0], w.shape[1] // BLOCK) and w.shape[1] % BLOCK == 0


# ---- the layer, compiled -------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def attention_block(x, cos, sin, weights, key_pool, value_pool, slots, eps, head_dim):
    """The attention half of Transformer.layer for float32 x: [tokens, hidden] -> o_proj's
    output [tokens, hidden] (what the residual stream adds; under tensor parallelism, this
    device's partial sum), with the kernels NumbaBackend's ops call. cos, sin: [tokens,
    head_dim // 2]; weights: this layer's, as _layer_weights arranges them; key_pool,
    value_pool and slots: as in KVPlacement."""
    attention_norm, wq, bq, wk, bk, wv, bv, q_norm, k_norm, wo, mlp_norm, w_gate, w_up, w_down = weights
    write_blocks, write_rows, block_tables, row_sequence, row_position = slots
    tokens = x.shape[0]

    # q, k, v of every new token, rotated; k and v stored; each query over its sequence
    h = _rms_norm(x, attention_norm, eps)
    q = _linear(h, wq, bq).reshape(tokens, -1, head_dim)
    k = _linear(h, wk, bk).reshape(tokens, -1, head_dim)
    v = _linear(h, wv, bv).reshape(tokens, -1, head_dim)
    q, k = _head_norm(q, q_norm, eps), _head_norm(k, k_norm, eps)
    q_rotated, k_rotated = np.empty_like(q), np.empty_like(k)
    kernels.rotary(q, cos, sin, q_rotated)
    kernels.rotary(k, cos, sin, k_rotated)
    for t in range(tokens):
        key_pool[write_blocks[t], write_rows[t]] = k_rotated[t]
        value_pool[write_blocks[t], write_rows[t]] = v[t]
    attended = np.empty_like(q_rotated)
    kernels.paged_attention(q_rotated, key_pool, value_pool, block_tables, row_sequence, row_position, attended)
    return _linear(attended.reshape(tokens, -1), wo, None)


@njit(nogil=True, cache=True)
def mlp_block(x, weights, eps):
    """The MLP half of Transformer.layer: x: [tokens, hidden] -> down_proj's output [tokens,
    hidden] of the SwiGLU MLP on the RMSNorm of x."""
    attention_norm, wq, bq, wk, bk, wv, bv, q_norm, k_norm, wo, mlp_norm, w_gate, w_up, w_down = weights
    h = _rms_norm(x, mlp_norm, eps)
    gate, up = _linear(h, w_gate, None), _linear(h, w_up, None)
    activated = np.empty_like(gate)
    kernels.silu_mul(gate.reshape(-1), up.reshape(-1), activated.reshape(-1))
    return _linear(activated, w_down, None)


@njit(nogil=True, cache=True)
def _rms_norm(x, weight, eps):
    """x: [rows, dim] -> [rows, dim], as NumbaBackend.rms_norm."""
    out = np.empty_like(x)
    kernels.rms_norm(x, weight, eps, out)
    return out


def _head_norm(x, weight, eps):
    """Qwen3's RMSNorm of each head, x: [tokens, heads, head_dim]; x itself when weight is None."""


@overload(_head_norm)
def _head_norm_typed(x, weight, eps):
    if isinstance(weight, types.NoneType):
        return lambda x, weight, eps: x
    return lambda x, weight, eps: _rms_norm(x.reshape(-1, x.shape[2]), weight, eps).reshape(x.shape)


def _linear(x, w, bias):
    """x: [tokens, in] @ w.T (+ bias) -> [tokens, out] float32, with the kernel NumbaBackend.matmul
    picks: w float32, float16 (as its uint16 bits) or int8 (a (values, scales) pair); matvec for
    few tokens, gemm for many (the same thresholds)."""


@overload(_linear)
def _linear_typed(x, w, bias):
    if isinstance(w, types.BaseTuple):
        def int8(x, w, bias):
            out = np.empty((x.shape[0], w[0].shape[0]), np.float32)
            if x.shape[0] < kernels.GEMM_MIN_ROWS_WIDENED:
                kernels.matvec_q8(x, w[0], w[1], out)
            else:
                kernels.gemm_q8(x, w[0], w[1], out)
            return _add_bias(out, bias)
        return int8
    if w.dtype == types.uint16:  # float16, as its bits
        decode, prefill, prefill_rows = kernels.matvec_f16, kernels.gemm_f16, kernels.GEMM_MIN_ROWS_WIDENED
    else:
        decode, prefill, prefill_rows = kernels.matvec, kernels.gemm, kernels.GEMM_MIN_ROWS

    def float_weights(x, w, bias):
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        if x.shape[0] < prefill_rows:
            decode(x, w, out)
        else:
            prefill(x, w, out)
        return _add_bias(out, bias)
    return float_weights


def _add_bias(out, bias):
    """out + bias (Qwen2's q, k, v), or out itself when bias is None."""


@overload(_add_bias)
def _add_bias_typed(out, bias):
    if isinstance(bias, types.NoneType):
        return lambda out, bias: out
    return lambda out, bias: out + bias


# ---- which weights it takes, and how -------------------------------------------------------------
def _covered(layer: LayerWeights) -> bool:
    """Whether the compiled blocks take this layer's weights: float32 vectors, and matrices in
    float32, float16 or int8 with one float32 scale per block, all C-contiguous."""
    vectors = [layer.attention_norm, layer.mlp_norm, layer.bq, layer.bk, layer.bv, layer.q_norm, layer.k_norm]
    matrices = [layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down]
    return (all(v is None or (v.dtype == np.float32 and v.flags.c_contiguous) for v in vectors)
            and all(_covered_matrix(w) for w in matrices))


def _covered_matrix(w) -> bool:
    if isinstance(w, Q8Weight):
        return (w.values.dtype == np.int8 and w.scales.dtype == np.float32 and w.values.flags.c_contiguous
                and w.scales.flags.c_contiguous and has_block_scales(w))
    return isinstance(w, np.ndarray) and w.dtype in (np.float32, np.float16) and w.flags.c_contiguous


def _layer_weights(layer: LayerWeights) -> tuple:
    """The layer's weights as attention_block and mlp_block unpack them, each matrix as its kernel reads it."""
    def matrix(w):
        if isinstance(w, Q8Weight):
            return w.values, w.scales
        return w.view(np.uint16) if w.dtype == np.float16 else w

    return (layer.attention_norm, matrix(layer.wq), layer.bq, matrix(layer.wk), layer.bk, matrix(layer.wv), layer.bv,
            layer.q_norm, layer.k_norm, matrix(layer.wo), layer.mlp_norm, matrix(layer.w_gate), matrix(layer.w_up),
            matrix(layer.w_down))
