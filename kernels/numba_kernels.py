"""Numba CPU kernels: the ops of `tinyinfer/ops/numpy_backend.py` as compiled loops.

Each kernel writes into an output array the backend allocates, and works on float32 or
float64 (Numba has no float16 arithmetic; the backend leaves float16 to NumPy). Three habits
run through the file:
- `acc = np.float32(0)`: Numba gives a variable one type, unifying everything assigned to
  it, so this sum is float32 when the inputs are float32 and float64 when they are float64;
- `fastmath=FASTMATH` on loops that add up a sum, so LLVM may vectorise it;
- `nogil=True`: a kernel touches no Python object, so it lets go of the GIL while it runs
  and other Python threads go on meanwhile (the server's event loop beside its engine
  thread, tinyinfer/server/engine_loop.py), as NumPy's own loops do.

The matrix product has two shapes. Decode (a few token rows) reads every weight once per
step and is bound by memory bandwidth: the `matvec*` kernels stream each weight row once,
for all token rows, widening float16 or int8 weights on the fly. Prefill (many token rows)
does many multiply-adds per weight and is bound by arithmetic: the `gemm*` kernels cut the
weights into panels that stay in cache and multiply register tiles of 8 weight rows by 32
token rows, written with the explicit SIMD vectors of simd.py (float32 only).
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyinfer.quantize import BLOCK

from . import simd

# Numba's disk cache keys each function on the content of its own file only, and these
# kernels inline simd.py's code: this line ties their cache to simd.py's content too, so a
# change there cannot leave a stale kernel in the cache. tests/test_numba_backend.py checks
# it against simd.py and says the new value when simd.py changes. (numba_layer.py holds this
# file's own stamp the same way, for the compiled layer.)
SIMD_SOURCE = "4330380b1fdbe60b"  # the start of simd.py's sha256

# "reassoc" lets LLVM add a long sum in several SIMD lanes at once (another summation
# order, as BLAS uses); "contract" lets it fuse a * b + c into one FMA instruction. The
# other fastmath flags assume no inf or NaN, so we leave them out: those still propagate.
FASTMATH = {"reassoc", "contract"}
PREFETCH_BYTES = 4096  # how far ahead of its reads int8 and float16 decode asks for weights
# Token rows from which a matrix product takes the prefill (gemm) kernels instead of matvec.
# Measured (float32, 2 threads): matvec is faster up to 8 rows and even at 12; the gemm, whose
# 16-lane vectors are then mostly padding below 16 rows, wins from 16 (16 rows of a
# [768, 288] matrix: 46 against 79 µs). float16 and int8 matvec spend longer widening each
# weight for each row, so the gemm (which widens each weight once) wins from 8 rows.
GEMM_MIN_ROWS = 12
GEMM_MIN_ROWS_WIDENED = 8
TILE_ROWS = 8  # weight rows in a prefill register tile (x 32 token rows: 16 SIMD running sums)
PANEL = 32  # weight rows per prefill task: 4 tiles; a 288-row matrix is 9 tasks, 5:4 on 2 threads
TOKEN_BLOCK = 256  # token rows a prefill task multiplies a tile by, while they stay in L2
assert BLOCK == 2 * simd.LANES  # matvec_q8 takes each int8 block as two vectors of 16 weights


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


@njit(nogil=True, cache=True)
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


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _dot(a, b):
    """a, b: [n] -> sum of a * b, accumulated in their dtype."""
    acc = np.float32(0)
    for i in range(a.size):
        acc += a[i] * b[i]
    return acc


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _dot2(a, b0, b1):
    """a, b0, b1: [n] -> (sum of a * b0, sum of a * b1): one pass over a feeds both."""
    acc0 = acc1 = np.float32(0)
    for i in range(a.size):
        acc0 += a[i] * b0[i]
        acc1 += a[i] * b1[i]
    return acc0, acc1


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def matvec(x, w, out):
    """out = x @ w.T for few rows. x: [tokens, in], w: [out, in] -> out: [tokens, out].
    The threads split the weight rows, two at a time; each row is read from memory once, and
    stays in L1 while every token row is multiplied by it. The two rows of a pass lie half
    the matrix apart, so each thread reads two separate sequential streams, which keeps more
    reads in flight than one: measured, 78-97 % of the read probe for two neighbouring rows
    against 71-90 % one row at a time, and two rows half a matrix apart 0-6 % more again."""
    rows = w.shape[0]
    half = (rows + 1) // 2
    for o in prange(half):
        p = o + half
        for t in range(x.shape[0]):
            if p < rows:
                out[t, o], out[t, p] = _dot2(x[t], w[o], w[p])
            else:  # the middle row of an odd count
                out[t, o] = _dot(x[t], w[o])


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def matvec_f16(x, w_bits, out):
    """matvec with float16 weights, passed as their bits w_bits: [out, in] uint16 and
    widened as they are read: half the bytes of float32 for the same products. Two rows half
    the matrix apart per pass, as in `matvec`: 10-35 % more GB/s than one row at a time
    (matrices streamed from memory), since widening leaves one stream's memory reads idle."""
    rows = w_bits.shape[0]
    half = (rows + 1) // 2
    for o in prange(half):
        p = min(o + half, rows - 1)  # the second row (with an odd count, one row is done twice)
        _prefetch_ahead(w_bits, o)
        _prefetch_ahead(w_bits, p)
        for t in range(x.shape[0]):
            acc_o = acc_p = np.float32(0)
            for i in range(x.shape[1]):
                acc_o += x[t, i] * half_to_float(w_bits[o, i])
                acc_p += x[t, i] * half_to_float(w_bits[p, i])
            out[t, o] = acc_o
            out[t, p] = acc_p


@njit(nogil=True, parallel=True, cache=True)
def matvec_q8(x, values, scales, out):
    """matvec with int8 blocks, float32: values [out, in] int8, scales [out, in // BLOCK]
    float32. 1.125 bytes are read per weight instead of 4. Each weight, value * its block's
    scale, is formed in a register as it is used; the float matrix is never rebuilt in memory.

    Written with simd.py's vectors. Per block of 32 weights and row: two vectors of 16 int8
    values are widened, multiplied by x's two vectors and added (one multiply, one fused
    multiply-add), and that block sum, times the block's scale, joins the row's running sums
    (one more fused multiply-add), added across lanes once per row. Two weight rows per pass,
    as in `matvec`. Widening makes this kernel nearly as busy computing as reading: on one
    core, with its matrix in cache, it reached only ~16 GB/s. Summing each block before
    scaling it (3 vector operations per 16 weights became 2.5) made that ~18, and whole-model
    int8 decode 127 -> 134 tokens/s (alternating runs, 110M shape). Before that, the
    scalar version, which LLVM vectorised with a block index and a scale lookup per weight,
    decoded at 108-120 tokens/s.

    The two rows of a pass lie half the matrix apart, so each thread reads two separate
    sequential streams rather than one: with this much work per cache line, one stream
    leaves memory idle, and two kept more reads in flight. Measured on matrices streamed from
    memory: 18-25 % more GB/s than two neighbouring rows (four streams: less than two)."""
    rows = values.shape[0]
    half = (rows + 1) // 2
    for o in prange(half):
        p = min(o + half, rows - 1)  # the second row (with an odd count, one row is done twice)
        _prefetch_ahead(values, o)
        _prefetch_ahead(values, p)
        for t in range(x.shape[0]):
            acc_o = acc_p = simd.zeros()
            for block in range(values.shape[1] // BLOCK):
                i = block * BLOCK
                low, high = simd.load(x, t, i), simd.load(x, t, i + simd.LANES)
                block_o = simd.multiply_add_lanes(high, simd.load_int8(values, o, i + simd.LANES),
                                                  simd.multiply(low, simd.load_int8(values, o, i)))
                block_p = simd.multiply_add_lanes(high, simd.load_int8(values, p, i + simd.LANES),
                                                  simd.multiply(low, simd.load_int8(values, p, i)))
                acc_o = simd.multiply_add(scales[o, block], block_o, acc_o)
                acc_p = simd.multiply_add(scales[p, block], block_p, acc_p)
            out[t, o] = simd.sum_lanes(acc_o)
            out[t, p] = simd.sum_lanes(acc_p)


# ---- prefill: many token rows, compute-bound -----------------------------------------------
@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _tile(x_t, t, w, r, out, o, tokens, ahead):
    """out[t : t+32, o : o+8] = x[t : t+32] @ w[r : r+8].T, from x_t: [in, padded tokens], the
    token rows transposed (one block of `_token_columns`), so that x_t[i, t : t+16] is one
    SIMD vector.

    An outer product (see simd.py): 16 vectors of running sums, 8 weight rows x 2 vectors of 16
    token rows, stay in registers. Each step over `in` loads 2 vectors of x and 8 weights and
    does 16 vector multiply-adds: 256 multiply-adds for 10 loads. When 16 or fewer token rows
    are left, the second vector is skipped (LLVM makes the loop twice, with and without it).
    Rows past `tokens` are padding: computed, never stored. With `ahead` >= 0, the loop also
    asks for the 8 weight rows from `ahead` on, one cache line of each per 16 steps, so the
    next tile's weights are on their way from memory while this one computes (as BLAS kernels
    do); -1 when they are already in cache or there is no next tile.

    It replaced a 4 x 4 tile of scalar sums, which LLVM vectorised the other way (each sum a
    256-bit vector of partial sums over `in`): measured side by side on [2048, 768] and
    [768, 768] matrices, 128 token rows went from ~170-190 to ~210-250 GFLOP/s (OpenBLAS:
    ~210-240), 16 token rows from ~115 to ~140-160. Asking for the next tile's weights made a
    decode step of 16 sequences on the 15M shape, weights coming from memory, ~20 % faster
    (matrix products 6.8-7.1 -> 5.3 ms; batch-16 serving 2.95 -> 3.2-3.4x batch 1)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = simd.zeros()
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = simd.zeros()
    both = tokens - t > simd.LANES
    for i in range(w.shape[1]):
        if ahead >= 0 and i % 16 == 0:  # 16 float32 weights: one 64-byte cache line
            for j in range(TILE_ROWS):
                _prefetch(w, ahead + j, i)
        w0, w1, w2, w3 = w[r, i], w[r + 1, i], w[r + 2, i], w[r + 3, i]
        w4, w5, w6, w7 = w[r + 4, i], w[r + 5, i], w[r + 6, i], w[r + 7, i]
        x0 = simd.load(x_t, i, t)
        a0, a1 = simd.multiply_add(w0, x0, a0), simd.multiply_add(w1, x0, a1)
        a2, a3 = simd.multiply_add(w2, x0, a2), simd.multiply_add(w3, x0, a3)
        a4, a5 = simd.multiply_add(w4, x0, a4), simd.multiply_add(w5, x0, a5)
        a6, a7 = simd.multiply_add(w6, x0, a6), simd.multiply_add(w7, x0, a7)
        if both:
            x1 = simd.load(x_t, i, t + simd.LANES)
            b0, b1 = simd.multiply_add(w0, x1, b0), simd.multiply_add(w1, x1, b1)
            b2, b3 = simd.multiply_add(w2, x1, b2), simd.multiply_add(w3, x1, b3)
            b4, b5 = simd.multiply_add(w4, x1, b4), simd.multiply_add(w5, x1, b5)
            b6, b7 = simd.multiply_add(w6, x1, b6), simd.multiply_add(w7, x1, b7)
    first, second = min(simd.LANES, tokens - t), min(simd.LANES, tokens - t - simd.LANES)
    for k, acc in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
        simd.store_column(out, t, o + k, acc, first)
    for k, acc in enumerate((b0, b1, b2, b3, b4, b5, b6, b7)):
        simd.store_column(out, t + simd.LANES, o + k, acc, second)


@njit(nogil=True, parallel=True, cache=True)
def _token_columns(x):
    """x: [tokens, in] -> x_t: [blocks, in, width], x transposed one block of TOKEN_BLOCK token
    rows at a time (width: TOKEN_BLOCK, or the tokens rounded up to 32 when there are fewer),
    zero-padded: the layout `_tile` loads 16 token rows at a time from. Each block is one
    contiguous piece of memory, so the block a GEMM works on stays in L2 and in few pages: as
    one [in, tokens] array, 2048 tokens put each row of `in` 8 KiB apart, and a 2048-row
    product with in = 768 took 2.3x as long as 16 products of 128 rows (L2 sets and TLB
    entries ran out). Each task fills one vector's worth of columns (16 token rows, read side
    by side, written 64 bytes at a time): measured 15 µs for 128 x 768 and 0.64 ms for
    2048 x 768, against 47 µs and 2.3 ms going down x's columns one at a time."""
    tokens, columns = x.shape
    width = min(TOKEN_BLOCK, -(-tokens // (2 * simd.LANES)) * 2 * simd.LANES)
    blocks = -(-tokens // width)
    x_t = np.empty((blocks, columns, width), np.float32)
    for vector in prange(blocks * width // simd.LANES):
        block, column = divmod(vector * simd.LANES, width)
        for i in range(columns):
            for lane in range(simd.LANES):
                t = vector * simd.LANES + lane
                x_t[block, i, column + lane] = x[t, i] if t < tokens else 0
    return x_t


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _panel_product(x, x_t, panel, out, o_start, block):
    """out[block's rows, o_start : o_start + rows] = x[block's rows] @ panel.T, for token block
    `block` (rows block * width ...). x: [tokens, in], x_t: the same rows as `_token_columns`
    lays them out, panel: [rows, in]. Whole tiles of 8 weight rows go through `_tile`; ragged
    last rows (rows not a multiple of 8) are plain dot products. 8 weight rows (24 KiB, kept
    in L1) serve every token row of the block before the next 8."""
    width = x_t.shape[2]
    first = block * width
    tokens, rows = min(width, x.shape[0] - first), panel.shape[0]
    block_out = out[first:]  # the block's token rows are its rows 0 .. tokens - 1
    full = rows - rows % TILE_ROWS
    for r in range(0, full, TILE_ROWS):
        for t in range(0, tokens, 2 * simd.LANES):
            ahead = r + TILE_ROWS if t == 0 and r + TILE_ROWS < full else -1  # first pass only
            _tile(x_t[block], t, panel, r, block_out, o_start + r, tokens, ahead)
    for r in range(full, rows):
        for t in range(first, first + tokens):
            out[t, o_start + r] = _dot(x[t], panel[r])


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def gemm(x, w, out):
    """out = x @ w.T for many rows, float32. x: [tokens, in], w: [out, in] -> out: [tokens, out].

    Token rows go in blocks of TOKEN_BLOCK (256 x 768 float32 is 768 KiB, kept in L2), and
    for each block the threads split the weight rows into panels of PANEL rows, each panel
    multiplied by every token row of the block. A long batch reads its activations once and
    the weights once per block. (Panels outermost, a 2048-token prefill read all of x once
    per panel instead: 9 times for a 15M-shape [288, 288] matrix, 64 times for a 110M
    [2048, 768] one, and a batch of 16 prompts of 128 tokens took 1.4-1.6x as long in the
    layers as 16 prompts one at a time.) Small panels keep two threads even: a 288-row matrix
    is 9 panels of 32 (5 and 4 per thread), where panels of 64 made 5 (192 and 96 rows);
    measured on the 15M shape, batch-16 serving ran ~4 % and pp128 3-7 % faster."""
    x_t = _token_columns(x)
    for block in range(x_t.shape[0]):
        for p in prange((w.shape[0] + PANEL - 1) // PANEL):
            start = p * PANEL
            _panel_product(x, x_t, w[start : start + PANEL], out, start, block)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def gemm_f16(x, w_bits, out):
    """gemm with float16 weights (bits [out, in] uint16): each panel is widened to float32
    into a buffer of its own, then multiplied by every token row of the block (once per
    block of TOKEN_BLOCK rows: 1 widening per 256 multiply-adds or more)."""
    rows, columns = w_bits.shape
    x_t = _token_columns(x)
    for block in range(x_t.shape[0]):  # token blocks outermost, as in `gemm`
        for p in prange((rows + PANEL - 1) // PANEL):
            start, stop = p * PANEL, min((p + 1) * PANEL, rows)
            panel = np.empty((stop - start, columns), np.float32)
            for r in range(stop - start):
                for i in range(columns):
                    panel[r, i] = half_to_float(w_bits[start + r, i])
            _panel_product(x, x_t, panel, out, start, block)


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
def gemm_q8(x, values, scales, out):
    """gemm with int8 blocks: each panel is rebuilt in float32 (value * its block's scale,
    the very products of `dequantize`) into a buffer of its own, then multiplied by every
    token row of the block (rebuilt once per block of TOKEN_BLOCK rows). Only PANEL rows are
    ever rebuilt at once, never the whole matrix."""
    rows, columns = values.shape
    x_t = _token_columns(x)
    for block in range(x_t.shape[0]):  # token blocks outermost, as in `gemm`
        for p in prange((rows + PANEL - 1) // PANEL):
            start, stop = p * PANEL, min((p + 1) * PANEL, rows)
            panel = np.empty((stop - start, columns), np.float32)
            for r in range(stop - start):
                for i in range(columns):
                    panel[r, i] = values[start + r, i] * scales[start + r, i // BLOCK]
            _panel_product(x, x_t, panel, out, start, block)


# ---- the other ops -----------------------------------------------------------------------------
@njit(nogil=True, cache=True, boundscheck=True)
def embedding(token_ids, table, out):
    """out[t] = table[token_ids[t]]. token_ids: [tokens] int64, table: [vocab, dim].
    Bounds are checked: an id outside the vocabulary raises IndexError, as in NumPy (an
    exception cannot leave a parallel loop, and copying a few rows needs no threads)."""
    for t in range(token_ids.size):
        out[t] = table[token_ids[t]]


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
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


@njit(nogil=True, parallel=True, cache=True)
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


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
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
    in order, instead of dividing every position by block_size, then made those 0.26 and 8 ms.
    Then, in one later run: turning all the scores into weights first (one float32 exp each,
    where the max had made them float64), before the pass over the values, took 0.37 and
    9.8 ms to 0.31 and 6.9, and a 110M-shape prefill layer (128 tokens, 12 heads) 1.7 to 1.2."""
    rows, num_heads, head_dim = q.shape
    block_size = key_pool.shape[1]
    group = num_heads // key_pool.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    for pair in prange(rows * num_heads):
        r, h = pair // num_heads, pair % num_heads
        table, kv, visible = block_tables[row_sequence[r]], h // group, row_position[r] + 1
        query = q[r, h]
        scores = np.empty(visible, q.dtype)
        for b in range((visible + block_size - 1) // block_size):  # the sequence's blocks in order
            keys = key_pool[table[b]]
            for offset in range(min(block_size, visible - b * block_size)):
                scores[b * block_size + offset] = _dot(query, keys[offset, kv]) * scale
        largest = scores.max()  # in q's dtype, so that exp is float32 for float32 (2x faster)
        total = np.float32(0)
        for j in range(visible):  # the weights, in place of the scores
            scores[j] = math.exp(scores[j] - largest)
            total += scores[j]
        acc = out[r, h]
        acc[:] = 0
        for b in range((visible + block_size - 1) // block_size):
            values = value_pool[table[b]]
            for offset in range(min(block_size, visible - b * block_size)):
                p = scores[b * block_size + offset]
                for d in range(head_dim):
                    acc[d] += p * values[offset, kv, d]
        for d in range(head_dim):
            acc[d] /= total


@intrinsic
def _float_from_bits(typingctx, bits):
    """The low 32 bits of an integer -> the float32 with those bits (how `_exp` builds 2**n)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0],
                               ir.FloatType())

    return types.float32(bits), codegen


@njit(nogil=True, cache=True)
def _exp(x):
    """e**x for float32 x, within ~2 ulps, in plain arithmetic, so that LLVM vectorises a loop
    that calls it (libm's expf is a function call, one number at a time; Numba has no vector
    math library here). Cephes' expf: e**x = 2**n * e**r with n = round(x / ln 2) and
    |r| <= ln(2) / 2, e**r by a degree-7 polynomial, 2**n by writing n into the exponent
    bits. x is clamped to [-87.3, 88.3], where 2**n stays a normal float32: e**x then never
    overflows to inf (88.3 gives 2.1e38) and never reaches 0 (-87.3 gives 1.2e-38)."""
    x = min(max(x, _EXP_LOW), _EXP_HIGH)
    n = np.floor(x * _LOG2_E + _HALF)  # a whole number, as a float32
    r = x - n * _LN2_HIGH - n * _LN2_LOW  # ln 2 in two parts: n * _LN2_HIGH is exact
    p = _EXP_P0
    for c in (_EXP_P1, _EXP_P2, _EXP_P3, _EXP_P4, _EXP_P5):
        p = p * r + c
    return (p * r * r + r + _ONE) * _float_from_bits((np.int32(n) + 127) << 23)


_EXP_LOW, _EXP_HIGH = np.float32(-87.3), np.float32(88.3)
_LOG2_E, _HALF, _ONE = np.float32(1.44269504088896341), np.float32(0.5), np.float32(1)
_LN2_HIGH, _LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_P0, _EXP_P1, _EXP_P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_EXP_P3, _EXP_P4, _EXP_P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@njit(nogil=True, parallel=True, cache=True)
def silu_mul(gate, up, out):
    """gate, up, out: [n] flat float32. silu(g) * u = g / (1 + exp(-g)) * u. With `_exp` the
    loop runs 16 numbers at a time: 128 x 2048 of them (a 110M-shape prefill layer) took
    ~0.55 ms with libm's expf. A very negative g gives exp(-g) = 2.1e38 and the quotient
    (-g / 2.1e38, below 1e-36) the right limit, 0, to within float32's smallest numbers."""
    for i in prange(gate.size):
        out[i] = gate[i] / (_ONE + _exp(-gate[i])) * up[i]


@njit(nogil=True, parallel=True, fastmath=FASTMATH, cache=True)
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
