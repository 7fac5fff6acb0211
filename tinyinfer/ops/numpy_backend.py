"""The NumPy reference backend: every op the model calls, written as the math.

This file is the textbook of tinyinfer. Each function is the plainest NumPy that computes
its op, with the shapes of its arrays in the docstring. The Numba and CuPy backends must
give the same numbers; tests compare them against this file.

Conventions (the same for every backend):
- activations are `[tokens, features]`: a batch of sequences is flattened into one token axis;
- weights are stored `[out_features, in_features]`, the way checkpoints store them, so a
  linear layer is `x @ w.T`; a matrix may be stored in the compute dtype, in float16, or as
  int8 blocks (`Q8Weight`, see tinyinfer/quantize.py), and matmul accepts all three;
- heads live on their own axis: `q: [tokens, num_heads, head_dim]`.
"""

import math

import numpy as np

from tinyinfer.quantize import Q8Weight, dequantize
from tinyinfer.threads import ThreadBudget


class NumpyBackend:
    """The reference implementation of the op interface (see `tinyinfer.ops`)."""

    name = "numpy"

    def __init__(self):
        self.set_threads("auto")

    # ---- threads ---------------------------------------------------------------------------
    def set_threads(self, threads: int | str):
        """How many threads the kernels use: a number, or "auto" (the cores other programs
        leave free, looked at again before each pass: see tinyinfer/threads.py)."""
        self.threads = ThreadBudget(threads, numba=self.name == "numba")

    def begin_pass(self):
        """Called at the start of each forward pass: size the thread team for now."""
        self.threads.begin_pass()

    # ---- moving arrays -------------------------------------------------------------------
    def to_device(self, array, dtype=None):
        """Host array (or Q8Weight) -> this backend's array. NumPy's device is the host, so no
        copy is made when the dtype already matches (a memory-mapped weight stays on disk)."""
        if isinstance(array, Q8Weight):
            return array
        return np.asarray(array, dtype=dtype)

    def load_weights(self, weights):
        """ModelWeights -> the same weights on this backend's device, each array through
        `to_device` (so a memory-mapped checkpoint stays a memory map, read as it is touched)."""
        return weights.map(self.to_device)

    def compile_model(self, model):
        """The backend's chance to run the model (a Transformer) its own way, as torch.compile
        or CUDA graphs do; the Numba backend runs each layer as one compiled call. The
        reference runs the model as written, one op at a time."""
        return model

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    # ---- the ops -------------------------------------------------------------------------
    def embedding(self, token_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        """token_ids: [tokens] int, table: [vocab, dim] -> [tokens, dim]: one row per token."""
        return table[token_ids]

    def matmul(self, x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
        """A linear layer. x: [tokens, in], w: [out, in], bias: [out] or None -> [tokens, out].

        One weight matrix serves every token of the batch: with many tokens (prefill) this is
        a matrix-matrix product and compute-bound; with one token per sequence (decode) it is
        a matrix-vector product that reads every weight once per step, so it is bound by memory.
        w may be stored in float16 (widened here) or as a Q8Weight (see quantized_matmul).
        """
        if isinstance(w, Q8Weight):
            return self.quantized_matmul(x, w, bias)
        y = (x @ w.T).astype(x.dtype, copy=False)
        if bias is not None:
            y = y + bias
        return y

    def quantized_matmul(self, x: np.ndarray, w: Q8Weight, bias: np.ndarray | None = None) -> np.ndarray:
        """x: [tokens, in] times int8 blocks w (values [out, in], scales [out, in // 32]) ->
        [tokens, out]: the same product with each weight rebuilt as value * its block's scale.
        (A fast kernel never rebuilds the matrix: it multiplies int8 values and applies the
        scale once per block; the saving is that it reads 1.125 bytes per weight, not 4.)"""
        return self.matmul(x, dequantize(w).astype(x.dtype, copy=False), bias)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm over the last axis. x: [..., dim], weight: [dim] -> [..., dim].

        Scales each vector to unit root-mean-square, then by a learned gain. The mean of
        squares is taken in float32 at least, so float16 activations cannot overflow it.
        """
        x32 = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
        mean_square = np.mean(x32 * x32, axis=-1, keepdims=True)
        normed = x32 / np.sqrt(mean_square + eps)
        return (normed * weight).astype(x.dtype, copy=False)

    def rotary(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotary position embedding, Hugging Face pairing ("rotate half").

        x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim // 2], the angles
        `position * inv_freq` of each token. Dimension i is paired with i + head_dim/2 and the
        pair is rotated by its angle, so a dot product q.k depends only on the distance between
        their positions. (llama2.c pairs neighbours 2i, 2i+1 instead; its loader permutes the
        q and k weights so that this one op serves both.)
        """
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
        """Causal grouped-query attention of one sequence's new tokens over its whole past.

        q: [new_tokens, num_heads, head_dim], the queries at positions start_pos, start_pos+1, ...
        k, v: [start_pos + new_tokens, num_kv_heads, head_dim], every key and value so far
        (the KV cache plus the new tokens). Returns [new_tokens, num_heads, head_dim].

        Prefill is start_pos = 0 with many new tokens; decode is one new token against the
        cache. With grouped-query attention, num_heads / num_kv_heads query heads share each
        key/value head.
        """
        new_tokens, num_heads, head_dim = q.shape
        context, num_kv_heads, _ = k.shape
        group = num_heads // num_kv_heads
        # [kv_heads, group, new_tokens, head_dim]: query head h reads kv head h // group
        q = q.reshape(new_tokens, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
        keys = k.transpose(1, 2, 0)[:, None]  # [kv_heads, 1, head_dim, context]
        values = v.transpose(1, 0, 2)[:, None]  # [kv_heads, 1, context, head_dim]
        scores = (q @ keys) / math.sqrt(head_dim)  # [kv_heads, group, new_tokens, context], q.dtype
        # causal mask: the query at position start_pos + i sees keys 0 .. start_pos + i
        query_pos = start_pos + np.arange(new_tokens)
        future = np.arange(context)[None, :] > query_pos[:, None]  # [new_tokens, context]
        scores = np.where(future, -np.inf, scores)
        out = self.softmax(scores) @ values  # [kv_heads, group, new_tokens, head_dim]
        return out.transpose(2, 0, 1, 3).reshape(new_tokens, num_heads, head_dim)

    def paged_attention(self, q: np.ndarray, key_pool: np.ndarray, value_pool: np.ndarray,
                        block_tables: np.ndarray, query_starts: np.ndarray, start_positions: np.ndarray) -> np.ndarray:
        """The same attention for a whole batch of sequences, whose keys and values are kept in
        blocks of one shared pool (the paged KV cache).

        q: [tokens, num_heads, head_dim], every sequence's new tokens one after another:
        sequence s has rows query_starts[s] .. query_starts[s + 1] - 1 (query_starts: [seqs + 1]),
        the first of them at position start_positions[s] (start_positions: [seqs]).
        key_pool, value_pool: [num_blocks, block_size, num_kv_heads, head_dim];
        block_tables: [seqs, max_blocks] int, row s listing sequence s's blocks in order (its
        unused tail is padding). Gathering a sequence's blocks gives back its contiguous
        [start_position + new_tokens, num_kv_heads, head_dim] keys and values; a fast kernel
        reads them in place instead of copying, for every sequence in one call.
        """
        _, block_size, num_kv_heads, head_dim = key_pool.shape
        out = np.empty_like(q)
        for s, start_pos in enumerate(start_positions):
            rows = slice(query_starts[s], query_starts[s + 1])
            context = start_pos + rows.stop - rows.start
            table = block_tables[s, : -(-context // block_size)]
            keys = key_pool[table].reshape(-1, num_kv_heads, head_dim)[:context]
            values = value_pool[table].reshape(-1, num_kv_heads, head_dim)[:context]
            out[rows] = self.attention(q[rows], keys, values, start_pos)
        return out

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """SwiGLU's gating: silu(gate) * up, elementwise. gate, up: [tokens, hidden].

        silu(g) = g * sigmoid(g); for very negative g, exp(-g) overflows to inf and the
        quotient is the right limit, 0, so that overflow is expected and silenced."""
        with np.errstate(over="ignore"):
            return gate / (1.0 + np.exp(-gate)) * up

    def softmax(self, x: np.ndarray) -> np.ndarray:
        """Softmax over the last axis, shifted by the max so exp cannot overflow."""
        x32 = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
        e = np.exp(x32 - np.max(x32, axis=-1, keepdims=True))
        return (e / np.sum(e, axis=-1, keepdims=True)).astype(x.dtype, copy=False)
