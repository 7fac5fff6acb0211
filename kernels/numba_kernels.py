"""Numba CPU kernels: the ops of `tinyinfer/ops/numpy_backend.py` as compiled loops.

Each kernel writes into an output array the backend allocates, and works on float32 or
float64 (Numba has no float16 arithmetic; the backend leaves float16 to NumPy). Two habits
run through the file:
- `acc = np.float32(0)`: Numba gives a variable one type, unifying everything assigned to
  it, so this sum is float32 when the inputs are float32 and float64 when they are float64;
- `fastmath=FASTMATH` on loops that add up a sum, so LLVM may vectorise it.

The matrix product has two shapes. Decode (a few token rows) reads every weight once per
step and is bound by memory bandwidth: the `matvec*` kernels stream each weight row once,
for all token rows, widening float16 or int8 weights on the fly. Prefill (many token rows)
does many multiply-adds per weight and is bound by arithmetic: the `gemm*` kernels cut the
weights into panels that stay in cache and multiply 4 x 4 register tiles.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyinfer.quantize import BLOCK

# "reassoc" lets LLVM add a long sum in several SIMD lanes at once (another summation
# order, as BLAS uses); "contract" lets it fuse a * b + c into one FMA instruction. The
# other fastmath flags assume no inf or NaN, so we leave them out: those still propagate.
FASTMATH = {"reassoc", "contract"}
PREFETCH_BYTES = 4096  # how far ahead of its reads int8 and float16 decode asks for weights
TILE = 4  # a prefill register tile: 4 token rows x 4 weight rows, 16 running sums
PANEL = 32  # weight (and token) rows per prefill task: 32 x 768 float32 is 96 KiB, kept in L2


# ---- float16 weights -----------------------------------------------------------------------
@intrinsic
def half_to_float(typingctx, bits):
    """uint16 bits of a float16 -> that number as float32, exactly.

    Numba has no float16 type, but LLVM does: reinterpret the bits as `half` and widen it.
    In a loop LLVM turns this into one vcvtph2ps instruction per 8 weights (x86 F16C).
    Measured in float16 decode: ~2.5x the speed of a 65536-entry float32 lookup table (a
    gather per 8 weights) and ~3x that of rebuilding the float32 bits with integer ops."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


# ---- decode: a few token rows, memory-bound ------------------------------------------------
@intrinsic
def _prefetch(typingctx, array, row, column):
    """Ask the CPU to start loading the cache line that holds array[row, column] (LLVM's
    llvm.prefetch, on x86 prefetcht0); it returns at once and never changes a result."""
    if not isinstance(array, types.Array) or array.ndim != 2:
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        address = cgutils.get_item_pointer(context, builder, array_type, data, args[1:])
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch")
        # read (0), keep in all cache levels (3), data not instructions (1)
        builder.call(function, [builder.bitcast(address, byte_pointer), int32(0), int32(3), int32(1)])
        return context.get_dummy_value()

    return types.void(array, row, column), codegen


@njit(cache=True)
def _prefetch_ahead(w, row):
    """Request, one cache line at a time, the weight row about PREFETCH_BYTES after row `row`.

    Measured on the project's 2-core machine: a float32 row is consumed fast enough for the
    hardware prefetcher, which then keeps up by itself (asking here made it slower), but
    widening float16 or int8 weights takes longer per cache line, and without this the reads
    stall: int8 decode ran at ~20 % of the read bandwidth, 50-65 % with it. Asking 4096 bytes
    ahead ran 3-8 % faster than 2048 in int8 decode on the 110M shape (alternating runs)."""
    ahead = row + max(1, PREFETCH_BYTES // (w.shape[1] * w.itemsize))
    if ahead < w.shape[0]:
        for column in range(0, w.shape[1], 64 // w.itemsize):
            _prefetch(w, ahead, column)


@njit(fastmath=FASTMATH, cache=True)
def _dot(a, b):
    """a, b: [n] -> sum of a * b, accumulated in their dtype."""
    acc = np.float32(0)
    for i in range(a.size):
        acc += a[i] * b[i]
    return acc


@njit(fastmath=FASTMATH, cache=True)
def _dot2(a, b0, b1):
    """a, b0, b1: [n] -> (sum of a * b0, sum of a * b1): one pass over a feeds both."""
    acc0 = acc1 = np.float32(0)
    for i in range(a.size):
        acc0 += a[i] * b0[i]
        acc1 += a[i] * b1[i]
    return acc0, acc1


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec(x, w, out):
    """out = x @ w.T for few rows. x: [tokens, in], w: [out, in] -> out: [tokens, out].
    The threads split the weight rows, two at a time; each row is read from memory once, and
    stays in L1 while every token row is multiplied by it. Two rows per pass are two streams
    of loads in flight: measured, 78-97 % of the read probe against 71-90 % one at a time."""
    rows = w.shape[0]
    for pair in prange((rows + 1) // 2):
        o = 2 * pair
        for t in range(x.shape[0]):
            if o + 1 < rows:
                out[t, o], out[t, o + 1] = _dot2(x[t], w[o], w[o + 1])
            else:  # an odd last row
                out[t, o] = _dot(x[t], w[o])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_f16(x, w_bits, out):
    """matvec with float16 weights, passed as their bits w_bits: [out, in] uint16 and
    widened as they are read: half the bytes of float32 for the same products."""
    for o in prange(w_bits.shape[0]):
        _prefetch_ahead(w_bits, o)
        for t in range(x.shape[0]):
            acc = np.float32(0)
            for i in range(x.shape[1]):
                acc += x[t, i] * half_to_float(w_bits[o, i])
            out[t, o] = acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_q8(x, values, scales, out):
    """matvec with int8 blocks: values [out, in] int8, scales [out, in // BLOCK] float32.
    1.125 bytes are read per weight instead of 4. Each weight, value * its block's scale, is
    formed in a register as it is used; the float matrix is never rebuilt in memory.

    Summing x * value over a block and scaling that sum once would save multiplies, but
    each block then ends in a horizontal sum of the SIMD lanes; measured, that ran at
    2.1-2.7x float32's speed, this at 2.4-3x."""
    for o in prange(values.shape[0]):
        _prefetch_ahead(values, o)
        for t in range(x.shape[0]):
            acc = np.float32(0)
            for i in range(values.shape[1]):
                acc += x[t, i] * values[o, i] * scales[o, i // BLOCK]
            out[t, o] = acc


# ---- prefill: many token rows, compute-bound -----------------------------------------------
@njit(fastmath=FASTMATH, cache=True)
def _tile(x, t, w, r, out, o):
    """out[t:t+4, o:o+4] = x[t:t+4] @ w[r:r+4].T, the 16 sums held in registers.

    A plain dot product loads two numbers per multiply-add; here each loaded x and w value
    feeds four, so the loop runs at the speed of the FMA units, not of the loads. LLVM
    vectorises the loop over i, each sum becoming one SIMD register."""
    zero = np.float32(0)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
    for i in range(x.shape[1]):
        x0, x1, x2, x3 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i]
        w0, w1, w2, w3 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
        s00 += x0 * w0; s01 += x0 * w1; s02 += x0 * w2; s03 += x0 * w3  # noqa: E702
        s10 += x1 * w0; s11 += x1 * w1; s12 += x1 * w2; s13 += x1 * w3  # noqa: E702
        s20 += x2 * w0; s21 += x2 * w1; s22 += x2 * w2; s23 += x2 * w3  # noqa: E702
        s30 += x3 * w0; s31 += x3 * w1; s32 += x3 * w2; s33 += x3 * w3  # noqa: E702
    out[t, o], out[t, o + 1], out[t, o + 2], out[t, o + 3] = s00, s01, s02, s03
    out[t + 1, o], out[t + 1, o + 1], out[t + 1, o + 2], out[t + 1, o + 3] = s10, s11, s12, s13
    out[t + 2, o], out[t + 2, o + 1], out[t + 2, o + 2], out[t + 2, o + 3] = s20, s21, s22, s23
    out[t + 3, o], out[t + 3, o + 1], out[t + 3, o + 2], out[t + 3, o + 3] = s30, s31, s32, s33


@njit(fastmath=FASTMATH, cache=True)
def _panel_product(x, panel, out, o_start):
    """out[:, o_start : o_start + rows] = x @ panel.T. x: [tokens, in], panel: [rows, in].
    Whole 4 x 4 tiles go through `_tile`; the ragged last rows and columns are plain dots.

    Token rows go in blocks of PANEL, so the block and the panel both stay in L2. Within a
    block the weight rows are the outer loop: 4 rows just read serve every token row of the
    block at once, while the next 4 are prefetched. With 16 token rows and weights coming
    from memory, that ran at ~105 GFLOP/s against ~80 with the token rows outside."""
    tokens, rows = x.shape[0], panel.shape[0]
    full_t, full_r = tokens - tokens % TILE, rows - rows % TILE
    for block in range(0, full_t, PANEL):
        for r in range(0, full_r, TILE):
            for ahead in range(r + TILE, min(r + 2 * TILE, rows)):
                for column in range(0, panel.shape[1], 64 // panel.itemsize):
                    _prefetch(panel, ahead, column)
            for t in range(block, min(block + PANEL, full_t), TILE):
                _tile(x, t, panel, r, out, o_start + r)
    for t in range(tokens):
        for r in range(rows):
            if t >= full_t or r >= full_r:
                out[t, o_start + r] = _dot(x[t], panel[r])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemm(x, w, out):
    """out = x @ w.T for many rows. x: [tokens, in], w: [out, in] -> out: [tokens, out].
    The threads split the weight rows into panels of PANEL rows; a panel is read from memory
    once and reused from cache by every token row. Small panels keep two threads even: a
    288-row matrix is 9 panels of 32 (5 and 4 per thread), where panels of 64 made 5 (192 and
    96 rows); measured on the 15M shape, batch-16 serving ran ~4 % and pp128 3-7 % faster."""
    for p in prange((w.shape[0] + PANEL - 1) // PANEL):
        start = p * PANEL
        _panel_product(x, w[start : start + PANEL], out, start)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemm_f16(x, w_bits, out):
    """gemm with float16 weights (bits [out, in] uint16): each panel is widened to float32
    once, into a buffer of its own, then multiplied by every token row."""
    rows, columns = w_bits.shape
    for p in prange((rows + PANEL - 1) // PANEL):
        start, stop = p * PANEL, min((p + 1) * PANEL, rows)
        panel = np.empty((stop - start, columns), np.float32)
        for r in range(stop - start):
            for i in range(columns):
                panel[r, i] = half_to_float(w_bits[start + r, i])
        _panel_product(x, panel, out, start)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemm_q8(x, values, scales, out):
    """gemm with int8 blocks: each panel is rebuilt in float32 (value * its block's scale,
    the very products of `dequantize`) into a buffer of its own, then multiplied by every
    token row. Only PANEL rows are ever rebuilt at once, never the whole matrix."""
    rows, columns = values.shape
    for p in prange((rows + PANEL - 1) // PANEL):
        start, stop = p * PANEL, min((p + 1) * PANEL, rows)
        panel = np.empty((stop - start, columns), np.float32)
        for r in range(stop - start):
            for i in range(columns):
                panel[r, i] = values[start + r, i] * scales[start + r, i // BLOCK]
        _panel_product(x, panel, out, start)


# ---- the other ops -----------------------------------------------------------------------------
@njit(cache=True, boundscheck=True)
def embedding(token_ids, table, out):
    """out[t] = table[token_ids[t]]. token_ids: [tokens] int64, table: [vocab, dim].
    Bounds are checked: an id outside the vocabulary raises IndexError, as in NumPy (an
    exception cannot leave a parallel loop, and copying a few rows needs no threads)."""
    for t in range(token_ids.size):
        out[t] = table[token_ids[t]]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def rms_norm(x, weight, eps, out):
    """x: [rows, dim], weight: [dim] -> out: [rows, dim]. One pass adds up the squares
    (float32 or wider), one scales: x / sqrt(mean(x * x) + eps) * weight."""
    for r in prange(x.shape[0]):
        squares = np.float32(0)
        for i in range(x.shape[1]):
            squares += x[r, i] * x[r, i]
        inv_rms = 1.0 / math.sqrt(squares / x.shape[1] + eps)
        for i in range(x.shape[1]):
            out[r, i] = x[r, i] * inv_rms * weight[i]


@njit(parallel=True, cache=True)
def rotary(x, cos, sin, out):
    """x: [tokens, heads, head_dim], cos, sin: [tokens, head_dim // 2] -> out, same shape as
    x. Hugging Face pairing: dimension i turns with i + head_dim / 2 by its token's angle."""
    half = x.shape[2] // 2
    for t in prange(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                x1, x2 = x[t, h, i], x[t, h, i + half]
                out[t, h, i] = x1 * cos[t, i] - x2 * sin[t, i]
                out[t, h, i + half] = x2 * cos[t, i] + x1 * sin[t, i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def paged_attention(q, key_pool, value_pool, block_tables, row_sequence, row_position, out):
    """Causal grouped-query attention for every new token of a batch of sequences in one call,
    reading the keys and values in place.

    q: [rows, num_heads, head_dim], the new tokens of all sequences; row r belongs to sequence
    row_sequence[r] and sits at position row_position[r], so it sees that sequence's keys
    0 .. row_position[r]. key_pool, value_pool: [num_blocks, block_size, num_kv_heads,
    head_dim]; block_tables: [sequences, max_blocks] int, so key j of sequence s is
    key_pool[block_tables[s, j // block_size], j % block_size]. -> out: like q. (A contiguous
    cache is one sequence with one block holding every key: the backend passes k[None].)

    Threads split the (row, head) pairs: a decode batch of 16 sequences x 12 heads is 192
    independent tasks. Each task makes two passes: the scores of its keys (into a small buffer
    of its own) and their max, then exp(score - max) weights the values. That is one exp per
    key. The online softmax of the CUDA kernel (one pass, rescaling whenever the max grows)
    saves the buffer but measured slower here: 0.35 against 0.31 ms for 16 sequences x 6 heads
    x 200 keys, 13.4 against 10 ms for a prefill of 16 x 128 tokens. Walking each block's rows
    in order, instead of dividing every position by block_size, then made those 0.26 and 8 ms."""
    rows, num_heads, head_dim = q.shape
    block_size = key_pool.shape[1]
    group = num_heads // key_pool.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    for pair in prange(rows * num_heads):
        r, h = pair // num_heads, pair % num_heads
        table, kv, visible = block_tables[row_sequence[r]], h // group, row_position[r] + 1
        query = q[r, h]
        scores = np.empty(visible, q.dtype)
        largest = -np.inf
        for b in range((visible + block_size - 1) // block_size):  # the sequence's blocks in order
            keys = key_pool[table[b]]
            for offset in range(min(block_size, visible - b * block_size)):
                score = _dot(query, keys[offset, kv]) * scale
                scores[b * block_size + offset] = score
                largest = max(largest, score)
        acc = out[r, h]
        acc[:] = 0
        total = 0.0
        for b in range((visible + block_size - 1) // block_size):
            values = value_pool[table[b]]
            for offset in range(min(block_size, visible - b * block_size)):
                p = math.exp(scores[b * block_size + offset] - largest)
                total += p
                for d in range(head_dim):
                    acc[d] += p * values[offset, kv, d]
        for d in range(head_dim):
            acc[d] /= total


@njit(parallel=True, cache=True)
def silu_mul(gate, up, out):
    """gate, up, out: [n] flat. silu(g) * u = g / (1 + exp(-g)) * u; a very negative g makes
    exp(-g) inf and the quotient the right limit, 0."""
    for i in prange(gate.size):
        out[i] = gate[i] / (1.0 + np.exp(-gate[i])) * up[i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def softmax(x, out):
    """x: [rows, n] -> out: [rows, n], each row exp(x - max) / sum, so exp cannot overflow."""
    for r in prange(x.shape[0]):
        largest = x[r, 0]
        for i in range(1, x.shape[1]):
            largest = max(largest, x[r, i])
        total = np.float32(0)
        for i in range(x.shape[1]):
            out[r, i] = np.exp(x[r, i] - largest)
            total += out[r, i]
        for i in range(x.shape[1]):
            out[r, i] /= total
