"""The CuPy backend: the op interface on an NVIDIA GPU.

Arrays are CuPy arrays in GPU memory, so the weights and the KV cache (made by `zeros`) stay on
the GPU and only token ids go in and logits come out. Matrix products with float weights go to
cuBLAS through `cupy.matmul`; every other op is one of our CUDA kernels in kernels/cuda/, which
NVRTC compiles at first use (CuPy caches the result on disk). Each kernel exists for float32 and
float16 activations (`name_f32`, `name_f16`) and computes in float32.

CuPy is imported only when this backend is created, so nothing else in tinyinfer needs it.
"""

import math
from pathlib import Path

import numpy as np

from tinyinfer.quantize import Q8Weight

CUDA_DIR = Path(__file__).parent / "cuda"
# the kernels each source file defines, each as name_f32 and name_f16
KERNELS = {
    "norms.cu": ("rms_norm",),
    "rotary.cu": ("rotary",),
    "activations.cu": ("silu_mul", "softmax"),
    "attention.cu": ("attention_decode", "attention_prefill"),
    "quantized.cu": ("q8_matvec", "q8_matmul"),
}
SUFFIXES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}

# Constants the kernels are written for (tests/test_cuda_sources.py checks they match the .cu files).
MAX_HEAD_DIM = 256  # attention.cu: a warp's 32 lanes keep head_dim / 32 accumulators each
Q8_TILE = 16  # quantized.cu: q8_matmul computes 16 tokens x 16 outputs per block of 16 x 16 threads

THREADS = 256  # per block, for the elementwise kernels and the most a row kernel takes
DECODE_WARPS = 8  # decode attention: warps splitting one head's keys
PREFILL_WARPS = 4  # prefill attention: query tokens per block, sharing each tile of keys
MATVEC_WARPS = 8  # q8_matvec: output rows per block, one per warp
MATVEC_MAX_TOKENS = 8  # more tokens than this go to q8_matmul, which reads each weight once per 16


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
        """The model runs as written, one kernel launch per op (see NumpyBackend.compile_model)."""
        return model

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

        cuBLAS multiplies two matrices of one dtype, so a float16-stored w meets float32
        activations widened to float32: a temporary copy per call, which keeps the memory that
        float16 storage saves but not its speed (compute in float16 for that).
        """
        if isinstance(w, Q8Weight):
            return self.quantized_matmul(x, w, bias)
        common = np.promote_types(x.dtype, w.dtype)
        y = (x.astype(common, copy=False) @ w.T.astype(common, copy=False)).astype(x.dtype, copy=False)
        if bias is not None:
            y = y + bias
        return y

    def quantized_matmul(self, x, w: Q8Weight, bias=None):
        """x: [tokens, in] times int8 blocks w (values [out, in], scales [out, in // 32]) ->
        [tokens, out], by quantized.cu: one warp per output for a few tokens (decode), tiles of
        16 x 16 in shared memory for many (prefill)."""
        cp = self.cp
        out_features, in_features = w.shape
        if x.shape[-1] != in_features:
            raise ValueError(f"matmul: x has {x.shape[-1]} features but the int8 weight {w.shape} takes {in_features}")
        x2 = cp.ascontiguousarray(x).reshape(-1, in_features)
        values, scales = cp.ascontiguousarray(w.values), cp.ascontiguousarray(w.scales)
        tokens = x2.shape[0]
        y = cp.empty((tokens, out_features), dtype=x.dtype)
        sizes = (np.int32(in_features), np.int32(out_features))
        if tokens <= MATVEC_MAX_TOKENS:
            self._launch("q8_matvec", x.dtype, (blocks(out_features, MATVEC_WARPS), tokens), (32 * MATVEC_WARPS,),
                         (x2, values, scales, y, *sizes))
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
        blocks in block_tables[s]. One kernel launch per sequence (a launch costs microseconds
        on a GPU; one varlen kernel for the batch, as vLLM's, would save those)."""
        tables = self.cp.ascontiguousarray(block_tables, dtype=self.cp.int64)
        starts, positions = self.cp.asnumpy(query_starts).tolist(), self.cp.asnumpy(start_positions).tolist()
        out = self.cp.empty_like(q)
        for s, start_pos in enumerate(positions):
            rows = slice(starts[s], starts[s + 1])
            out[rows] = self._attention(q[rows], key_pool, value_pool, tables[s], start_pos)
        return out

    def _attention(self, q, key_pool, value_pool, block_table, start_pos: int):
        """attention.cu's decode kernel for one new token (one block per query head), its prefill
        kernel for more (one block per 4 query tokens of a head)."""
        cp = self.cp
        new_tokens, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, kv_head_dim = key_pool.shape
        context = start_pos + new_tokens
        if value_pool.shape != key_pool.shape or kv_head_dim != head_dim:
            raise ValueError(f"attention: q {q.shape}, keys {key_pool.shape} and values {value_pool.shape} "
                             "must share head_dim, and keys and values their shape")
        if num_heads % num_kv_heads:
            raise ValueError(f"attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"the CUDA attention kernels take head_dim up to {MAX_HEAD_DIM}; got {head_dim}")
        if block_table.shape[0] * block_size < context:
            raise ValueError(f"attention: {new_tokens} new tokens at start_pos {start_pos} need {context} keys; "
                             f"the cache holds {block_table.shape[0] * block_size}")
        q = cp.ascontiguousarray(q)
        key_pool = cp.ascontiguousarray(key_pool, dtype=q.dtype)
        value_pool = cp.ascontiguousarray(value_pool, dtype=q.dtype)
        out = cp.empty_like(q)
        pools = (q, key_pool, value_pool, block_table, out)
        shape = (np.int32(num_heads), np.int32(num_kv_heads), np.int32(head_dim), np.int32(block_size),
                 np.int32(start_pos), np.float32(1.0 / math.sqrt(head_dim)))
        floats = np.dtype(np.float32).itemsize
        if new_tokens == 1:
            self._launch("attention_decode", q.dtype, (num_heads,), (32 * DECODE_WARPS,), (*pools, *shape),
                         shared_mem=DECODE_WARPS * (head_dim + 2) * floats)
        else:
            self._launch("attention_prefill", q.dtype, (blocks(new_tokens, PREFILL_WARPS), num_heads),
                         (32 * PREFILL_WARPS,), (*pools, np.int32(new_tokens), *shape),
                         shared_mem=(32 * (head_dim + 1) + PREFILL_WARPS * head_dim) * floats)
        return out

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
