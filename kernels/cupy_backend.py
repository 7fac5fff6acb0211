"""The CuPy backend: the op interface on an NVIDIA GPU.

Arrays are CuPy arrays in GPU memory, so the weights and the KV cache (made by `zeros`) stay on
the GPU and only token ids go in and logits come out. Every op is one of our CUDA kernels in
kernels/cuda/, which NVRTC compiles at first use (CuPy caches the result on disk), except the
matrix products of prefill with float weights, which go to cuBLAS through `cupy.matmul`. Each
kernel exists for float32 and float16 activations (`name_f32`, `name_f16`) and computes in float32.

A decode step (up to DECODE_MAX_ROWS tokens) can be captured as a CUDA graph
(kernels/cuda_graphs.py): its ops (`matmul`, `write_kv`, `decode_attention` and the elementwise
ones) launch only our kernels, never wait for the host, and allocate only from CuPy's memory
pool; and a row's numbers do not depend on how many rows the call has, so a graph captured for 4
rows and replayed for 3 gives what the ops give run one by one.

CuPy is imported only when this backend is created, so nothing else in tinyinfer needs it.
"""

import math
from pathlib import Path

import numpy as np

from tinyinfer.quantize import BLOCK, Q8Weight

CUDA_DIR = Path(__file__).parent / "cuda"
# the kernels each source file defines, each as name_f32 and name_f16
KERNELS = {
    "norms.cu": ("rms_norm",),
    "rotary.cu": ("rotary",),
    "activations.cu": ("silu_mul", "softmax"),
    "attention.cu": ("attention_decode", "attention_prefill", "attention_decode_batch", "kv_write"),
    "matvec.cu": ("matvec_wf32", "matvec_wf16"),
    "quantized.cu": ("q8_matvec", "q8_matmul"),
}
SUFFIXES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
MATVEC_KERNELS = {np.dtype(np.float32): "matvec_wf32", np.dtype(np.float16): "matvec_wf16"}  # by weight dtype

# Constants the kernels are written for (tests/test_cuda_sources.py checks they match the .cu files).
MAX_HEAD_DIM = 256  # attention.cu: a warp's 32 lanes keep head_dim / 32 accumulators each
Q8_TILE = 16  # quantized.cu: q8_matmul computes 16 tokens x 16 outputs per block of 16 x 16 threads
DECODE_MAX_ROWS = 64  # matvec.cu: the most token rows that go to the decode kernels (more: cuBLAS, q8_matmul)
MATVEC_ROWS = 8  # common.cuh: the decode matrix products keep 8 token rows' sums per warp; grid: groups of 8

THREADS = 256  # per block, for the elementwise kernels and the most a row kernel takes
DECODE_WARPS = 8  # decode attention: warps splitting one head's keys
PREFILL_WARPS = 4  # prefill attention: query tokens per block, sharing each tile of keys
MATVEC_WARPS = 8  # matvec.cu and q8_matvec: output rows per block, one per warp
ALIGN = 16  # bytes: the decode matrix products read x and w with 16-byte loads


def import_cupy():
    """CuPy, or an error that says what is missing: ImportError without CuPy, RuntimeError
    without a GPU that CUDA can see."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError(
            'the "cupy" backend needs CuPy, which is not installed: pip install "tinyinfer[gpu]" '
            "(CuPy for CUDA 12; for CUDA 13, pip install cupy-cuda13x)"
        ) from e
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise RuntimeError(f'the "cupy" backend needs an NVIDIA GPU, and CUDA sees none ({e})') from e
    if devices == 0:
        raise RuntimeError('the "cupy" backend needs an NVIDIA GPU, and CUDA sees none')
    return cupy


def read_source(file: str) -> str:
    """A kernel file's text with its `#include "common.cuh"` replaced by that header. NVRTC
    compiles a string, not a file, and CuPy keys its kernel cache on that string: inlined, an
    edit of the header recompiles the kernels too."""
    common = (CUDA_DIR / "common.cuh").read_text()
    return (CUDA_DIR / file).read_text().replace('#include "common.cuh"', common)


def blocks(n: int, size: int) -> int:
    """How many blocks of `size` cover n items."""
    return -(-n // size)


class CupyBackend:
    """The op interface on a GPU: the ops and signatures of NumpyBackend, the same numbers."""

    name = "cupy"

    def __init__(self):
        self.cp = cp = import_cupy()
        self.modules = {file: cp.RawModule(code=read_source(file)) for file in KERNELS}
        self.kernels = {}  # "rms_norm_f32" -> the compiled function, fetched on first use
        self.one_block = cp.zeros(1, dtype=cp.int64)  # the block table of a contiguous cache
        self.graph_pool = self.capture_stream = None  # capture_graph's, made on first use

    def set_threads(self, threads):
        """The GPU has its own threads: a CPU thread setting changes nothing here."""

    def begin_pass(self):
        """Nothing to prepare: kernels are launched on the device as the pass runs."""

    def _launch(self, name: str, dtype, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0):
        """Run kernel `name` for activations of `dtype`. Sizes go as np.int32 and scalars as
        np.float32, the C types the kernels declare (a bare Python int would be 64 bits)."""
        if dtype not in SUFFIXES:
            raise TypeError(f"the cupy backend computes in float32 or float16, not {dtype}")
        key = f"{name}_{SUFFIXES[dtype]}"
        if key not in self.kernels:
            file = next(file for file, names in KERNELS.items() if name in names)
            self.kernels[key] = self.modules[file].get_function(key)
        if 0 not in grid:  # CUDA refuses an empty grid, and an empty input has nothing to compute
            self.kernels[key](grid, block, args, shared_mem=shared_mem)

    def _row_threads(self, width: int) -> int:
        """Threads for a kernel that gives one block to each row: a multiple of 32, at most THREADS."""
        return min(THREADS, 32 * blocks(width, 32))

    def _aligned(self, array):
        """`array` contiguous and starting at a multiple of ALIGN bytes, for the kernels' 16-byte
        loads: as it is (CuPy's allocations start at multiples of 256 bytes), or, for a view that
        starts elsewhere, a copy. Copying also keeps a row's numbers independent of where its
        array lies: the kernels never need a narrower path for an odd address."""
        array = self.cp.ascontiguousarray(array)
        return array if array.data.ptr % ALIGN == 0 else array.copy()

    def _matvec_grid(self, tokens: int, out_features: int) -> tuple:
        """The decode matrix products' grid (common.cuh's matvec_work): a block of MATVEC_WARPS
        output rows for each group of MATVEC_ROWS token rows."""
        return (blocks(out_features, MATVEC_WARPS) * blocks(tokens, MATVEC_ROWS),)

    # ---- moving arrays -------------------------------------------------------------------
    def to_device(self, array, dtype=None):
        """Host array (or Q8Weight) -> a CuPy array in GPU memory (a Q8Weight of CuPy arrays)."""
        if isinstance(array, Q8Weight):
            return Q8Weight(self.cp.asarray(array.values), self.cp.asarray(array.scales))
        return self.cp.asarray(array, dtype=dtype)

    def load_weights(self, weights):
        """ModelWeights -> the same weights in GPU memory, array by array."""
        return weights.map(self.to_device)

    def compile_model(self, model):
        """The model with its decode steps replayed as CUDA graphs (kernels/cuda_graphs.py);
        prefill and every other pass run as written, one kernel launch per op."""
        from tinyinfer.kernels.cuda_graphs import GraphedTransformer

        return GraphedTransformer(model)

    # ---- CUDA graphs (kernels/cuda_graphs.py) ------------------------------------------------
    def upload(self, host: np.ndarray, device):
        """Copy `host` into the device array of its shape and dtype, in place: the device array
        keeps its address, which a captured graph has baked in."""
        device.set(host)

    def capture_graph(self, run):
        """Record the kernels that run() launches as a CUDA graph. run: () -> a device array.
        -> (that array, the graph): each graph.launch() replays every launch with the same
        arguments, writing the same array.

        run() goes twice on a stream of its own: once as a warm-up, which compiles and loads
        every kernel and fills the memory pool with what a step allocates (nothing may wait for
        the host during a capture), then under capture. Both allocate from a pool kept for the
        graphs alone (vLLM's graph pool): an array freed during the capture goes back to that
        pool, which only later captures draw from, so eager work can never be given memory
        that a replay writes. The graphs replay one after another on one stream, so they can
        share the pool's memory for their intermediates; each capture's output stays alive in
        the CapturedStep that holds it."""
        cp = self.cp
        if self.graph_pool is None:
            self.graph_pool, self.capture_stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
        stream = self.capture_stream
        cp.cuda.Device().synchronize()  # the static inputs, uploaded on another stream, are in place
        with cp.cuda.using_allocator(self.graph_pool.malloc), stream:
            run()
            stream.synchronize()
            stream.begin_capture()
            try:
                output = run()
            except BaseException:
                try:
                    stream.end_capture()  # leave capture mode, so the stream stays usable
                except cp.cuda.runtime.CUDARuntimeError:
                    pass  # the capture was invalidated by what failed: the error that matters is run()'s
                raise
            graph = stream.end_capture()
        return output, graph

    def to_numpy(self, array) -> np.ndarray:
        return self.cp.asnumpy(array)

    def zeros(self, shape, dtype):
        return self.cp.zeros(shape, dtype=dtype)

    # ---- the ops -------------------------------------------------------------------------
    def embedding(self, token_ids, table):
        """token_ids: [tokens] int, table: [vocab, dim] -> [tokens, dim]: a gather, as NumPy's."""
        return table[self.cp.asarray(token_ids)]

    def matmul(self, x, w, bias=None):
        """x: [tokens, in], w: [out, in] (or a Q8Weight), bias: [out] or None -> [tokens, out].

        Decode (up to DECODE_MAX_ROWS token rows, float32 or float16 weights) runs matvec.cu,
        which streams the weights once as they are stored: a float16 w is read at 2 bytes a
        weight. Prefill (more rows) goes to cuBLAS, which multiplies two matrices of one dtype,
        so there a float16-stored w meets float32 activations widened to float32: a temporary
        copy per call, cheap beside a product that is bound by arithmetic, not by reading w.
        """
        if isinstance(w, Q8Weight):
            return self.quantized_matmul(x, w, bias)
        if w.ndim != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"matmul: x {x.shape} times the weight {w.shape}: w must be [out, in] with in = "
                             f"x's last dimension")
        (out_features, in_features), tokens = w.shape, math.prod(x.shape[:-1])
        if tokens <= DECODE_MAX_ROWS and x.dtype in SUFFIXES and w.dtype in MATVEC_KERNELS:
            x2, w = self._aligned(x.reshape(tokens, in_features)), self._aligned(w)
            y = self.cp.empty((tokens, out_features), dtype=x.dtype)
            self._launch(MATVEC_KERNELS[w.dtype], x.dtype, self._matvec_grid(tokens, out_features),
                         (32 * MATVEC_WARPS,), (x2, w, y, np.int32(tokens), np.int32(in_features),
                                                 np.int32(out_features)))
            y = y.reshape(*x.shape[:-1], out_features)
        else:
            common = np.promote_types(x.dtype, w.dtype)
            y = (x.astype(common, copy=False) @ w.T.astype(common, copy=False)).astype(x.dtype, copy=False)
        if bias is not None:
            y = y + bias
        return y

    def quantized_matmul(self, x, w: Q8Weight, bias=None):
        """x: [tokens, in] times int8 blocks w (values [out, in], scales [out, in // 32]) ->
        [tokens, out], by quantized.cu: one warp per output, each weight read once for up to 8
        token rows, for up to DECODE_MAX_ROWS rows (decode); tiles of 16 x 16 in shared memory
        for more (prefill)."""
        cp = self.cp
        out_features, in_features = w.shape
        if x.shape[-1] != in_features:
            raise ValueError(f"matmul: x has {x.shape[-1]} features but the int8 weight {w.shape} takes {in_features}")
        if in_features % BLOCK or w.scales.shape != (out_features, in_features // BLOCK):
            raise ValueError(f"matmul: an int8 weight {w.shape} needs in a multiple of {BLOCK} and scales "
                             f"[out, in // {BLOCK}]; got scales {w.scales.shape}")
        tokens = math.prod(x.shape[:-1])
        x2 = self._aligned(x.reshape(tokens, in_features))
        values, scales = self._aligned(w.values), cp.ascontiguousarray(w.scales)
        y = cp.empty((tokens, out_features), dtype=x.dtype)
        sizes = (np.int32(in_features), np.int32(out_features))
        if tokens <= DECODE_MAX_ROWS:
            self._launch("q8_matvec", x.dtype, self._matvec_grid(tokens, out_features), (32 * MATVEC_WARPS,),
                         (x2, values, scales, y, np.int32(tokens), *sizes))
        else:
            self._launch("q8_matmul", x.dtype, (blocks(out_features, Q8_TILE), blocks(tokens, Q8_TILE)),
                         (Q8_TILE, Q8_TILE), (x2, values, scales, y, np.int32(tokens), *sizes))
        y = y.reshape(*x.shape[:-1], out_features)
        return y if bias is None else y + bias

    def rms_norm(self, x, weight, eps: float):
        """RMSNorm over the last axis. x: [..., dim], weight: [dim] -> [..., dim]; one block per row."""
        cp = self.cp
        dim = x.shape[-1]
        if weight.shape != (dim,):
            raise ValueError(f"rms_norm: weight must be [{dim}] for x {x.shape}; got {weight.shape}")
        x = cp.ascontiguousarray(x)
        weight = cp.ascontiguousarray(weight, dtype=x.dtype)
        out = cp.empty_like(x)
        self._launch("rms_norm", x.dtype, (x.size // dim,), (self._row_threads(dim),),
                     (x, weight, out, np.int32(dim), np.float32(eps)))
        return out

    def rotary(self, x, cos, sin):
        """Rotary embedding, pairs (i, i + head_dim/2). x: [tokens, heads, head_dim]; cos, sin:
        [tokens, head_dim // 2] -> [tokens, heads, head_dim]; one thread per pair."""
        cp = self.cp
        tokens, heads, head_dim = x.shape
        if head_dim % 2:
            raise ValueError(f"rotary pairs dimension i with i + head_dim/2, so head_dim must be even; got {head_dim}")
        half = head_dim // 2
        if cos.shape != (tokens, half) or sin.shape != (tokens, half):
            raise ValueError(f"rotary: cos and sin must be [tokens, head_dim/2] = {(tokens, half)}; "
                             f"got {cos.shape}, {sin.shape}")
        x = cp.ascontiguousarray(x)
        cos, sin = cp.ascontiguousarray(cos, dtype=x.dtype), cp.ascontiguousarray(sin, dtype=x.dtype)
        out = cp.empty_like(x)
        self._launch("rotary", x.dtype, (blocks(tokens * heads * half, THREADS),), (THREADS,),
                     (x, cos, sin, out, np.int32(tokens), np.int32(heads), np.int32(half)))
        return out

    def attention(self, q, k, v, start_pos: int):
        """Causal grouped-query attention. q: [new_tokens, num_heads, head_dim] at positions
        start_pos, ...; k, v: [start_pos + new_tokens, num_kv_heads, head_dim] -> like q. The
        kernels read keys through a block table; a contiguous cache is one block: table [0]."""
        return self._attention(q, k[None], v[None], self.one_block, start_pos)

    def paged_attention(self, q, key_pool, value_pool, block_tables, query_starts, start_positions):
        """The same attention for a batch of sequences, keys and values read in place from pools
        [num_blocks, block_size, num_kv_heads, head_dim]: sequence s has query rows
        query_starts[s] .. query_starts[s + 1] - 1 from position start_positions[s] and its
        blocks in block_tables[s]. A decode step (one new token in every sequence) is one launch
        for the batch (decode_attention); otherwise one launch per sequence (a launch costs
        microseconds on a GPU; one varlen kernel for the batch, as vLLM's, would save those)."""
        cp = self.cp
        tables = cp.ascontiguousarray(block_tables, dtype=cp.int64)
        starts, positions = cp.asnumpy(query_starts), cp.asnumpy(start_positions)
        if len(positions) and starts[0] == 0 and np.all(np.diff(starts) == 1):
            self._check_capacity(1, int(positions.max()), tables.shape[1] * key_pool.shape[1])
            return self.decode_attention(q, key_pool, value_pool, tables, cp.asarray(positions + 1, dtype=cp.int64))
        out = cp.empty_like(q)
        for s, start_pos in enumerate(positions.tolist()):
            rows = slice(int(starts[s]), int(starts[s + 1]))
            out[rows] = self._attention(q[rows], key_pool, value_pool, tables[s], start_pos)
        return out

    def decode_attention(self, q, key_pool, value_pool, block_tables, context_lens):
        """One new token for each sequence of a batch, in one launch, reading what changes from
        step to step from the device (so that a CUDA graph can capture it): q: [num_seqs,
        num_heads, head_dim], sequence s's query at position context_lens[s] - 1, attending to
        its context_lens[s] keys and values (its own included) in blocks block_tables[s] of the
        pools [num_blocks, block_size, num_kv_heads, head_dim] -> [num_seqs, num_heads, head_dim].
        block_tables: [num_seqs, max_blocks], context_lens: [num_seqs], integers on the device
        (int64 as the kernel reads them; another dtype costs a conversion). Nothing waits for the
        host, so nothing here can check the lengths: a length of 0 gives zeros, and one past
        max_blocks * block_size keys is cut to them (the engine never makes either)."""
        cp = self.cp
        block_size = self._check_attention(q, key_pool, value_pool)
        num_seqs, num_heads, head_dim = q.shape
        if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
            raise ValueError(f"decode_attention: q {q.shape} is one token for each of {num_seqs} sequences, so "
                             f"block_tables must be [{num_seqs}, max_blocks] and context_lens [{num_seqs}]; got "
                             f"{block_tables.shape} and {context_lens.shape}")
        q = cp.ascontiguousarray(q)
        key_pool = cp.ascontiguousarray(key_pool, dtype=q.dtype)
        value_pool = cp.ascontiguousarray(value_pool, dtype=q.dtype)
        tables = cp.ascontiguousarray(block_tables, dtype=cp.int64)
        lengths = cp.ascontiguousarray(context_lens, dtype=cp.int64)
        out = cp.empty_like(q)
        num_kv_heads = key_pool.shape[2]
        self._launch("attention_decode_batch", q.dtype, (num_heads, num_seqs), (32 * DECODE_WARPS,),
                     (q, key_pool, value_pool, tables, lengths, out, np.int32(num_heads), np.int32(num_kv_heads),
                      np.int32(head_dim), np.int32(block_size), np.int32(tables.shape[1]),
                      np.float32(1.0 / math.sqrt(head_dim))),
                     shared_mem=self._decode_shared_mem(head_dim))
        return out

    def _check_attention(self, q, key_pool, value_pool) -> int:
        """Refuse what the attention kernels cannot take, with the reason; -> the block size."""
        if q.ndim != 3 or key_pool.ndim != 4:
            raise ValueError(f"attention: q must be [tokens, num_heads, head_dim] and the pools [num_blocks, "
                             f"block_size, num_kv_heads, head_dim]; got {q.shape} and {key_pool.shape}")
        _, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, kv_head_dim = key_pool.shape
        if value_pool.shape != key_pool.shape or kv_head_dim != head_dim:
            raise ValueError(f"attention: q {q.shape}, keys {key_pool.shape} and values {value_pool.shape} "
                             "must share head_dim, and keys and values their shape")
        if num_heads % num_kv_heads:
            raise ValueError(f"attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"the CUDA attention kernels take head_dim up to {MAX_HEAD_DIM}; got {head_dim}")
        return block_size

    @staticmethod
    def _check_capacity(new_tokens: int, start_pos: int, capacity: int):
        context = start_pos + new_tokens
        if capacity < context:
            raise ValueError(f"attention: {new_tokens} new tokens at start_pos {start_pos} need {context} keys; "
                             f"the cache holds {capacity}")

    @staticmethod
    def _decode_shared_mem(head_dim: int) -> int:
        """attention_decode's shared memory: each warp's running max, sum and head_dim accumulators."""
        return DECODE_WARPS * (head_dim + 2) * np.dtype(np.float32).itemsize

    def _attention(self, q, key_pool, value_pool, block_table, start_pos: int):
        """attention.cu's decode kernel for one new token (one block per query head), its prefill
        kernel for more (one block per 4 query tokens of a head)."""
        cp = self.cp
        new_tokens, num_heads, head_dim = q.shape
        block_size = self._check_attention(q, key_pool, value_pool)
        num_kv_heads = key_pool.shape[2]
        self._check_capacity(new_tokens, start_pos, block_table.shape[0] * block_size)
        q = cp.ascontiguousarray(q)
        key_pool = cp.ascontiguousarray(key_pool, dtype=q.dtype)
        value_pool = cp.ascontiguousarray(value_pool, dtype=q.dtype)
        out = cp.empty_like(q)
        pools = (q, key_pool, value_pool, block_table, out)
        shape = (np.int32(num_heads), np.int32(num_kv_heads), np.int32(head_dim), np.int32(block_size),
                 np.int32(start_pos), np.float32(1.0 / math.sqrt(head_dim)))
        if new_tokens == 1:
            self._launch("attention_decode", q.dtype, (num_heads,), (32 * DECODE_WARPS,), (*pools, *shape),
                         shared_mem=self._decode_shared_mem(head_dim))
        else:
            floats = np.dtype(np.float32).itemsize
            self._launch("attention_prefill", q.dtype, (blocks(new_tokens, PREFILL_WARPS), num_heads),
                         (32 * PREFILL_WARPS,), (*pools, np.int32(new_tokens), *shape),
                         shared_mem=(32 * (head_dim + 1) + PREFILL_WARPS * head_dim) * floats)
        return out

    def write_kv(self, key_pool, value_pool, k, v, slots):
        """Store k, v: [tokens, num_kv_heads, head_dim] in place in key_pool, value_pool:
        [num_blocks, block_size, num_kv_heads, head_dim], token t at flat slot slots[t] = block *
        block_size + row (slots: [tokens] integers on the device, int64 as the kernel reads
        them), k and v in one launch. A slot < 0 is skipped: the padding rows of a batch
        captured as a CUDA graph for more tokens than it has. Nothing waits for the host, so
        the slots are not checked here; the kernel skips one past the pools too. -> None."""
        cp = self.cp
        if key_pool.ndim != 4 or value_pool.shape != key_pool.shape or value_pool.dtype != key_pool.dtype:
            raise ValueError(f"write_kv: the pools must be [num_blocks, block_size, num_kv_heads, head_dim], both of "
                             f"one shape and dtype; got {key_pool.shape} {key_pool.dtype} and {value_pool.shape} "
                             f"{value_pool.dtype}")
        if not (key_pool.flags.c_contiguous and value_pool.flags.c_contiguous):
            raise ValueError("write_kv writes the pools in place, so they must be contiguous")
        num_blocks, block_size, num_kv_heads, head_dim = key_pool.shape
        if k.ndim != 3 or k.shape != v.shape or k.shape[1:] != (num_kv_heads, head_dim) or slots.shape != k.shape[:1]:
            raise ValueError(f"write_kv: k and v must be [tokens, {num_kv_heads}, {head_dim}] for pools "
                             f"{key_pool.shape}, and slots [tokens]; got {k.shape}, {v.shape} and {slots.shape}")
        tokens = k.shape[0]
        k = cp.ascontiguousarray(k, dtype=key_pool.dtype)
        v = cp.ascontiguousarray(v, dtype=key_pool.dtype)
        slots = cp.ascontiguousarray(slots, dtype=cp.int64)
        row_size = num_kv_heads * head_dim
        self._launch("kv_write", key_pool.dtype, (blocks(tokens * row_size, THREADS),), (THREADS,),
                     (k, v, key_pool, value_pool, slots, np.int32(tokens), np.int32(row_size),
                      np.int64(num_blocks * block_size)))

    def silu_mul(self, gate, up):
        """silu(gate) * up, elementwise. gate, up: [tokens, hidden]; one thread per element."""
        cp = self.cp
        if gate.shape != up.shape:
            raise ValueError(f"silu_mul: gate {gate.shape} and up {up.shape} must have one shape")
        gate = cp.ascontiguousarray(gate)
        up = cp.ascontiguousarray(up, dtype=gate.dtype)
        out = cp.empty_like(gate)
        self._launch("silu_mul", gate.dtype, (blocks(gate.size, THREADS),), (THREADS,),
                     (gate, up, out, np.uint64(gate.size)))
        return out

    def softmax(self, x):
        """Softmax over the last axis, in float32; one block per row."""
        x = self.cp.ascontiguousarray(x)
        out = self.cp.empty_like(x)
        width = x.shape[-1]
        self._launch("softmax", x.dtype, (x.size // width,), (self._row_threads(width),), (x, out, np.int32(width)))
        return out
