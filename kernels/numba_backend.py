"""The Numba backend: the op interface run by the compiled CPU kernels of numba_kernels.py.

Arrays stay plain NumPy arrays on the host, so moving them (`to_device`, `to_numpy`, `zeros`)
is inherited from the NumPy reference. Each op checks its inputs, allocates the output and
calls a kernel. Numba has no float16 arithmetic, so float16 compute (and any mix of dtypes
the kernels were not compiled for) falls back to the reference, which defines the answer. So
does float64 for the ops whose kernels are written with simd.py's float32 vectors (the
prefill GEMMs, int8 matmuls, silu_mul): float64 is a dtype for checking, not for speed.
"""

import sys

import numpy as np
from numba.core import event
from tqdm import tqdm

from tinyinfer.ops.numpy_backend import NumpyBackend
from tinyinfer.quantize import BLOCK, Q8Weight, quantize_q8_0

from . import numba_kernels as kernels
from . import huge_pages
from .numba_layer import CompiledTransformer, has_block_scales, query_rows

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# the kernels called from Python; compiled once per process by `compile_kernels`
ENTRY_POINTS = (kernels.matvec, kernels.matvec_f16, kernels.matvec_q8, kernels.gemm, kernels.gemm_f16,
                kernels.gemm_q8, kernels.embedding, kernels.rms_norm, kernels.rotary, kernels.paged_attention,
                kernels.silu_mul, kernels.softmax)


class NumbaBackend(NumpyBackend):
    """The op interface on the CPU cores; gives the reference's numbers (see the tests)."""

    name = "numba"

    def __init__(self):
        super().__init__()
        compile_kernels(self)

    # ---- moving arrays -------------------------------------------------------------------
    def load_weights(self, weights):
        """ModelWeights -> the same weights copied into one arena of huge pages (huge_pages.py).
        Decode streams every weight once per token, and on 4 KiB pages it spends part of that
        time on TLB misses. Measured on the 110M shape by benchmarks/huge_pages.py (both ways
        in one process, taking turns), five runs: float32 decode 1.07-1.13x, int8 1.04-1.12x.
        The price: the weights take RAM of their own (a memory-mapped checkpoint's pages are
        only file cache) and loading copies them once. So weights that would take more than
        half the memory available now (/proc/meminfo's MemAvailable) stay as they are,
        memory-mapped and read as they are touched, instead of pushing the system into swap;
        so do they where there are no huge pages to ask for (the copy would buy nothing)."""
        if not huge_pages.HUGE_PAGES:
            return super().load_weights(weights)
        pieces = [piece for array in weights.arrays() for piece in _pieces(array)]
        nbytes, available = huge_pages.HugePageArena.bytes_needed(pieces), huge_pages.available_memory()
        if nbytes > available // 2:
            print(f"tinyinfer: the weights ({nbytes / 1e9:.1f} GB) stay memory-mapped: copying them into huge pages "
                  f"would take more than half of the {available / 1e9:.1f} GB of memory available", file=sys.stderr)
            return super().load_weights(weights)
        arena = huge_pages.HugePageArena(nbytes)

        def copy(array):
            if isinstance(array, Q8Weight):
                return Q8Weight(arena.copy(array.values), arena.copy(array.scales))
            return arena.copy(np.asarray(array))

        return weights.map(copy)

    def compile_model(self, model):
        """Transformer -> the same model with each layer run as two compiled calls where it can
        (numba_layer.py): calling a layer's 13 kernels from Python made decode 6-17 % slower on
        the 110M shape. Compiling them for the model's weights shows its progress like
        compile_kernels: a step for each of the two (attention_block, mlp_block)."""
        with CompileProgress("model layers", steps=2, step_per_function=True):
            return CompiledTransformer(model)

    # ---- the ops -------------------------------------------------------------------------
    def embedding(self, token_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        """token_ids: [tokens] int, table: [vocab, dim] -> [tokens, dim]: one row per token."""
        if table.dtype not in KERNEL_DTYPES:
            return super().embedding(token_ids, table)
        ids = np.asarray(token_ids, dtype=np.int64)
        out = np.empty((ids.size, table.shape[1]), table.dtype)
        kernels.embedding(ids.reshape(-1), np.ascontiguousarray(table), out)
        return out.reshape(*ids.shape, table.shape[1])

    def matmul(self, x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
        """x: [tokens, in], w: [out, in] (x's dtype or float16) or Q8Weight -> [tokens, out].
        A few token rows take the matvec kernels, many the gemm kernels (GEMM_MIN_ROWS says
        where the gemm gets faster). The gemm kernels are float32 only: float64, a dtype for
        checking rather than speed, multiplies many rows with the reference's BLAS."""
        if _is_float32_decode(x, w, bias):  # decode's own cases first, in as few Python steps as they take
            out = np.empty((x.shape[0], w.shape[0]), np.float32)
            kernels.matvec(x, w, out)
            return out
        if _is_int8_decode(x, w, bias):
            out = np.empty((x.shape[0], w.shape[0]), np.float32)
            kernels.matvec_q8(x, w.values, w.scales, out)
            return out
        if isinstance(w, Q8Weight):
            return self.quantized_matmul(x, w, bias)
        if x.dtype not in KERNEL_DTYPES or w.dtype not in (x.dtype, np.float16):
            return super().matmul(x, w, bias)
        rows, out = _rows_and_output(x, w.shape)
        decode = rows.shape[0] < (kernels.GEMM_MIN_ROWS if w.dtype == x.dtype else kernels.GEMM_MIN_ROWS_WIDENED)
        if not decode and x.dtype != np.float32:  # the SIMD prefill kernels are float32 only
            return super().matmul(x, w, bias)
        w = np.ascontiguousarray(w)
        if w.dtype == np.float16:
            (kernels.matvec_f16 if decode else kernels.gemm_f16)(rows, w.view(np.uint16), out)
        else:
            (kernels.matvec if decode else kernels.gemm)(rows, w, out)
        return _finish(out, x, bias)

    def quantized_matmul(self, x: np.ndarray, w: Q8Weight, bias: np.ndarray | None = None) -> np.ndarray:
        """x: [tokens, in] times int8 blocks w (values [out, in], scales [out, in // 32]) ->
        [tokens, out], without ever rebuilding the whole float matrix. float32 only (the
        kernels use simd.py's float32 vectors); float64 takes the reference."""
        if x.dtype != np.float32:
            return super().quantized_matmul(x, w, bias)
        rows, out = _rows_and_output(x, w.shape)
        if not has_block_scales(w):
            raise ValueError(f"int8 weight {w.shape} needs scales of shape [out, in // {BLOCK}], got {w.scales.shape}")
        decode = rows.shape[0] < kernels.GEMM_MIN_ROWS_WIDENED
        values, scales = np.ascontiguousarray(w.values), np.ascontiguousarray(w.scales, dtype=np.float32)
        (kernels.matvec_q8 if decode else kernels.gemm_q8)(rows, values, scales, out)
        return _finish(out, x, bias)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm over the last axis. x: [..., dim], weight: [dim] -> [..., dim]."""
        if x.dtype not in KERNEL_DTYPES:
            return super().rms_norm(x, weight, eps)
        rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        out = np.empty_like(rows)
        kernels.rms_norm(rows, np.ascontiguousarray(weight, dtype=x.dtype), float(eps), out)
        return out.reshape(x.shape)

    def rotary(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim // 2] -> like x."""
        if x.dtype not in KERNEL_DTYPES or not x.dtype == cos.dtype == sin.dtype:
            return super().rotary(x, cos, sin)
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        kernels.rotary(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), out)
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
        """q: [new_tokens, num_heads, head_dim]; k, v: [start_pos + new_tokens, num_kv_heads,
        head_dim] -> [new_tokens, num_heads, head_dim] in q's dtype. Causal, grouped-query."""
        if q.dtype not in KERNEL_DTYPES or not q.dtype == k.dtype == v.dtype:
            return super().attention(q, k, v, start_pos)
        if k.shape[0] != start_pos + q.shape[0] or q.shape[1] % k.shape[1]:
            raise ValueError(f"attention: {q.shape[0]} queries from position {start_pos} with {q.shape[1]} heads "
                             f"need {start_pos + q.shape[0]} keys in a divisor of that many heads, got {k.shape}")
        # a contiguous cache is one sequence whose single block holds every key
        return self._paged_attention(q, np.ascontiguousarray(k)[None], np.ascontiguousarray(v)[None],
                                     np.zeros((1, 1), np.int64), np.zeros(q.shape[0], np.int64),
                                     start_pos + np.arange(q.shape[0]))

    def paged_attention(self, q: np.ndarray, key_pool: np.ndarray, value_pool: np.ndarray,
                        block_tables: np.ndarray, query_starts: np.ndarray, start_positions: np.ndarray) -> np.ndarray:
        """q: [tokens, num_heads, head_dim], sequence s's new tokens in rows query_starts[s] ..
        query_starts[s + 1] - 1 from position start_positions[s]; key_pool, value_pool:
        [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: [seqs, max_blocks] int
        -> like q. One kernel call for the whole batch, reading the keys in place."""
        if q.dtype not in KERNEL_DTYPES or not q.dtype == key_pool.dtype == value_pool.dtype:
            return super().paged_attention(q, key_pool, value_pool, block_tables, query_starts, start_positions)
        query_starts, start_positions = np.asarray(query_starts, np.int64), np.asarray(start_positions, np.int64)
        new_tokens = np.diff(query_starts)
        needed = start_positions + new_tokens  # keys each sequence reads
        if query_starts[-1] != q.shape[0] or (new_tokens < 0).any() or q.shape[1] % key_pool.shape[2]:
            raise ValueError(f"paged attention: query_starts {query_starts.tolist()} must split the {q.shape[0]} "
                             f"query rows, and {q.shape[1]} heads be a multiple of {key_pool.shape[2]} kv heads")
        if (needed > block_tables.shape[1] * key_pool.shape[1]).any():
            raise ValueError(f"paged attention: sequences need {needed.tolist()} keys, but the block tables hold "
                             f"{block_tables.shape[1]} blocks of {key_pool.shape[1]}")
        row_sequence, row_position = query_rows(query_starts, start_positions)
        return self._paged_attention(q, key_pool, value_pool, np.asarray(block_tables, np.int64), row_sequence,
                                     row_position)

    def _paged_attention(self, q, key_pool, value_pool, block_tables, row_sequence, row_position):
        """The kernel's own terms: query row r belongs to sequence row_sequence[r] (a row of
        block_tables) and sits at position row_position[r], seeing keys 0 .. that position."""
        q = np.ascontiguousarray(q)
        out = np.empty_like(q)
        kernels.paged_attention(q, key_pool, value_pool, block_tables, row_sequence, row_position, out)
        return out

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up, elementwise. gate, up: [tokens, hidden]."""
        if gate.dtype != np.float32 or gate.dtype != up.dtype or gate.shape != up.shape:
            return super().silu_mul(gate, up)  # the kernel's exp is float32's
        out = np.empty(gate.shape, gate.dtype)
        kernels.silu_mul(np.ascontiguousarray(gate).reshape(-1), np.ascontiguousarray(up).reshape(-1), out.reshape(-1))
        return out

    def softmax(self, x: np.ndarray) -> np.ndarray:
        """Softmax over the last axis, shifted by the max so exp cannot overflow."""
        if x.dtype not in KERNEL_DTYPES:
            return super().softmax(x)
        rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        out = np.empty_like(rows)
        kernels.softmax(rows, out)
        return out.reshape(x.shape)


# ---- helpers -----------------------------------------------------------------------------------
def _rows_and_output(x: np.ndarray, w_shape) -> tuple[np.ndarray, np.ndarray]:
    """x: [..., in] -> its rows as one contiguous [tokens, in] array, and an empty
    [tokens, out] output of x's dtype. The kernels trust the shapes, so they are checked here."""
    if x.shape[-1] != w_shape[1]:
        raise ValueError(f"matmul: x has {x.shape[-1]} features but the weight [out, in] is {tuple(w_shape)}")
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    return rows, np.empty((rows.shape[0], w_shape[0]), x.dtype)


def _pieces(array) -> list[np.ndarray]:
    """The NumPy arrays a weight is made of: itself, or an int8 weight's values and scales."""
    return [array.values, array.scales] if isinstance(array, Q8Weight) else [np.asarray(array)]


def _few_float32_rows(x, w, bias, limit: int) -> bool:
    """x: [tokens < limit, in] float32, C-contiguous, matching w: [out, in]; no bias."""
    return (bias is None and x.ndim == 2 and x.dtype == np.float32 and x.shape[0] < limit
            and x.shape[1] == w.shape[1] and x.flags.c_contiguous)


def _is_float32_decode(x, w, bias) -> bool:
    """Decode with float32 weights, all arrays as the kernel takes them.

    Float32 decode calls matmul 85 times a token on the 110M shape, and between two kernels
    Python runs on caches the weight stream has just emptied, several times slower than
    usual. Checking this case first, in a few attribute reads, and allocating nothing but the
    output, made the whole decode 2-3 % faster (measured in alternating runs)."""
    return (isinstance(w, np.ndarray) and w.dtype == np.float32 and w.flags.c_contiguous
            and _few_float32_rows(x, w, bias, kernels.GEMM_MIN_ROWS))


def _is_int8_decode(x, w, bias) -> bool:
    """Decode with int8 weights whose values and scales are as the kernel takes them."""
    return (isinstance(w, Q8Weight) and w.values.dtype == np.int8 and w.values.flags.c_contiguous
            and w.scales.dtype == np.float32 and w.scales.flags.c_contiguous
            and has_block_scales(w) and _few_float32_rows(x, w, bias, kernels.GEMM_MIN_ROWS_WIDENED))


def _finish(out: np.ndarray, x: np.ndarray, bias) -> np.ndarray:
    """[tokens, out] -> [..., out] shaped like x, plus the bias (as the reference adds it)."""
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


# ---- compiling ---------------------------------------------------------------------------------
class CompileProgress(event.Listener):
    """What Numba is compiling and how far it has got, on stderr, for one phase of `steps`
    (compile_kernels: each op run once; compile_model: each compiled layer half). A real
    compile takes seconds per function and 20-60 s in all, so the first one opens a tqdm bar
    that counts the steps and names the function being compiled; loading from Numba's disk
    cache fires no compile event, so a warm start prints nothing. The line that says why
    there is a wait comes once per process, above the first bar, however many phases compile.

    Use it as a context manager around the phase (it listens to Numba's "numba:compile"
    events while inside); `step()` after each step, or step_per_function=True to count each
    top-level function compiled as one (the functions it calls are part of its step)."""

    announced = False  # the line above the first bar: once per process

    def __init__(self, what: str, steps: int, step_per_function: bool = False):
        self.what, self.steps, self.step_per_function = what, steps, step_per_function
        self.done = 0  # steps finished, shown or not
        self.depth = 0  # functions being compiled now, each inside the one that called it
        self.bar = None  # the tqdm bar, from the first compile on

    def __enter__(self):
        event.register("numba:compile", self)
        return self

    def __exit__(self, error_type, error, traceback):
        event.unregister("numba:compile", self)
        if self.bar is not None:
            if error_type is None:
                self.bar.update(self.steps - self.bar.n)  # the phase is done, whatever came from the cache
            self.bar.close()

    def on_start(self, compile_event):
        self.depth += 1
        if self.bar is None:
            if not CompileProgress.announced:
                print("tinyinfer: compiling Numba kernels (once; cached for later runs)", file=sys.stderr, flush=True)
                CompileProgress.announced = True
            # no rate or time left: steps take from milliseconds to many seconds each
            self.bar = tqdm(total=self.steps, initial=self.done, desc=self.what, file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                            mininterval=0)  # steps are rare: show each
        function = compile_event.data["dispatcher"].py_func
        # ours, by name: not the helpers Numba compiles for itself, nor the lambdas of an @overload
        if function.__module__.startswith("tinyinfer") and function.__name__.isidentifier():
            self.bar.set_postfix_str(function.__name__)

    def on_end(self, compile_event):
        self.depth -= 1
        if self.step_per_function and self.depth == 0:
            self.step()

    def step(self):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str("", refresh=False)  # until the next compile: this step's are done
            self.bar.update()


def compile_kernels(backend: NumbaBackend):
    """Compile every kernel for float32 and float64, once per process, by running each op on
    tiny read-only inputs. Numba loads them from its disk cache when it can; a real compile
    (the first run, or after the kernels change) takes a while, so its progress is shown.

    Compiling is then switched off. Numba would otherwise compile a new version for any new
    combination of argument types (a writable weight where a read-only one was seen, say),
    silently, in the middle of a generation; now every call uses these versions (a writable
    array is accepted where a read-only one was compiled) or fails loudly."""
    global _compiled
    if _compiled:
        return
    steps = [step for dtype in KERNEL_DTYPES for step in _every_op(backend, dtype)]
    with CompileProgress("kernels", len(steps)) as progress:
        for step in steps:
            step()
            progress.step()
    for kernel in ENTRY_POINTS:
        kernel.disable_compile()
    _compiled = True


_compiled = False


def _every_op(ops: NumbaBackend, dtype) -> list:
    """Calls (functions of no arguments) that run every op once on tiny read-only inputs of
    `dtype`, in the ways the model calls them: matmul with each kind of weight, for decode
    (one row) and prefill (many)."""
    def frozen(array, as_type=dtype):
        array = np.array(array, dtype=as_type)  # a contiguous copy
        array.flags.writeable = False
        return array

    rng = np.random.default_rng(0)
    x = frozen(rng.standard_normal((kernels.GEMM_MIN_ROWS, BLOCK)))
    w = rng.standard_normal((3, BLOCK))
    q8 = quantize_q8_0(w)
    weights = (frozen(w), frozen(w, np.float16), Q8Weight(frozen(q8.values, np.int8), frozen(q8.scales, np.float32)))
    q, kv = frozen(rng.standard_normal((2, 4, 2))), frozen(rng.standard_normal((2, 2, 2)))
    pool = frozen(rng.standard_normal((3, 2, 2, 2)))
    matmuls = [lambda rows=rows, weight=weight: ops.matmul(rows, weight)
               for rows in (x[:1], x) for weight in weights]  # decode, then prefill
    return matmuls + [
        lambda: ops.embedding(frozen([0, 2], np.int64), frozen(w)),
        lambda: ops.rms_norm(x, frozen(np.ones(BLOCK)), 1e-5),
        lambda: ops.rotary(q, frozen(np.ones((2, 1))), frozen(np.zeros((2, 1)))),
        lambda: ops.attention(q, kv, kv, 0),
        lambda: ops.paged_attention(q, pool, pool, frozen([[2, 0]], np.int64), frozen([0, 2], np.int64),
                                    frozen([1], np.int64)),
        lambda: ops.silu_mul(x, x),
        lambda: ops.softmax(x),
    ]
