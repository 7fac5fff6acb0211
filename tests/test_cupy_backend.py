"""The CuPy backend against the NumPy reference: every op on random shapes, then whole models.

The GPU tests run where CuPy sees a GPU and skip elsewhere with the backend's own reason; the
tests of that reason run everywhere. Float16 inputs are compared with NumPy on the same values
widened to float32: the kernels compute in float32 and round once, at the end, so that is the
result they must match (NumPy's float16 arithmetic rounds at every step and is further off).

Tolerances (float32 / float16):
- elementwise and per-row ops: rtol = atol = 1e-5 / 2e-3. In float32, the GPU and NumPy differ
  by a few roundings of 2^-24 = 6e-8 (other summation orders, fused multiply-adds). A float16
  result is rounded once, half a unit in the last place: 2^-11 = 4.9e-4 of the value, 2e-3 is
  four of those for the O(1) values here.
- dot products (matmul, int8 matmul): error relative to sum_i |x_i w_i|, not to the result,
  which cancellation can make arbitrarily small: float32 sums of n <= 200 terms stay within
  n * 2^-24 = 1.2e-5 of that; 2e-5 / 2e-3. The decode kernels sum n = 2080 terms as 32 lanes
  of n / 32 each, then the lanes pairwise: (2080 / 32 + 5) * 2^-24 = 4e-6.
"""

import sys
import types
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyinfer
from backends import cupy_unavailable_reason
from test_engine import run_all, scattered_batch
from test_hf_parity import MODELS, golden
from tinyinfer.engine import EngineConfig, LLMEngine
from tinyinfer.engine.paged_cache import BlockTable
from tinyinfer.kernels.cupy_backend import DECODE_MAX_ROWS
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.ops import get_backend
from tinyinfer.quantize import BLOCK, Q8Weight, dequantize, quantize_q8_0

REASON = cupy_unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=str(REASON))
gpu = get_backend("cupy") if REASON is None else None
ref = get_backend("numpy")

DTYPES = [np.float32, np.float16]
TOLERANCE = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float16: dict(rtol=2e-3, atol=2e-3)}
DOT_TOLERANCE = {np.float32: 2e-5, np.float16: 2e-3}
EXAMPLES = settings(max_examples=25, deadline=None)


def inputs(rng, dtype, *shapes, scale=1.0):
    """Random normal arrays in `dtype`, and the same values in float32 for the reference."""
    arrays = [(rng.standard_normal(shape) * scale).astype(dtype) for shape in shapes]
    return arrays, [a.astype(np.float32) for a in arrays]


def on_gpu(op, *args):
    """Run a backend op on the GPU, its host arrays moved there (other arguments as they are);
    the result back on the host."""
    args = [gpu.to_device(a) if isinstance(a, (np.ndarray, Q8Weight)) else a for a in args]
    return gpu.to_numpy(getattr(gpu, op)(*args))


def assert_close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want, **TOLERANCE[dtype])


def assert_dot_close(got, want, magnitude, dtype):
    """got, want: products x @ w.T; magnitude: |x| @ |w|.T, the scale of their rounding error."""
    assert got.dtype == dtype and got.shape == want.shape
    assert np.all(np.abs(got.astype(np.float32) - want) <= DOT_TOLERANCE[dtype] * magnitude + 1e-30)


# ---- why the backend is unavailable: checked everywhere -------------------------------------------
def test_without_cupy_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "tinyinfer\[gpu\]"'):
        get_backend("cupy")


def test_without_a_gpu_the_error_says_so(monkeypatch):
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 0, CUDARuntimeError=RuntimeError)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU, and CUDA sees none"):
        get_backend("cupy")


# ---- each op against NumPy ------------------------------------------------------------------------
@needs_gpu
def test_embedding_gathers_the_rows_of_the_tokens():
    table = np.random.default_rng(0).standard_normal((50, 24)).astype(np.float32)
    ids = np.array([3, 0, 49, 3])
    np.testing.assert_array_equal(on_gpu("embedding", ids, table), table[ids])


# token rows: the decode kernels' groups of 8 full, partial, one row, up to DECODE_MAX_ROWS = 64;
# then cuBLAS (float weights) or q8_matmul's tiles (int8)
MATMUL_TOKENS = (1, 2, 3, 8, 9, 16, 33, 64, 65, 100)
# `in`: 1 .. 70 hits every remainder of the 16-byte chunks (4 float32, 8 float16 weights) and the
# one-weight-at-a-time path for the others; 1028 and 2056 (float16 chunks: 257 per row) run the
# lanes' unrolled loop several times and stop part way through it
IN_FEATURES = st.one_of(st.integers(1, 70), st.sampled_from([1028, 2056]))


@needs_gpu
@pytest.mark.parametrize("tokens", MATMUL_TOKENS)
@EXAMPLES
@given(in_features=IN_FEATURES, out_features=st.integers(1, 70), bias=st.booleans(),
       dtypes=st.sampled_from([(np.float32, np.float32), (np.float32, np.float16), (np.float16, np.float16),
                               (np.float16, np.float32)]),
       seed=st.integers(0, 2**32 - 1))
def test_float_matmul_matches_numpy(tokens, in_features, out_features, bias, dtypes, seed):
    """matvec.cu for up to 64 token rows (decode), float32 or float16 weights read as stored,
    float32 or float16 activations; cuBLAS for more (prefill), float16 weights widened."""
    x_dtype, w_dtype = dtypes
    rng = np.random.default_rng(seed)
    (x, b), (x32, b32) = inputs(rng, x_dtype, (tokens, in_features), (out_features,))
    (w,), (w32,) = inputs(rng, w_dtype, (out_features, in_features))
    got = on_gpu("matmul", x, w, b if bias else None)
    want = ref.matmul(x32, w32, b32 if bias else None)
    assert_dot_close(got, want, np.abs(x32) @ np.abs(w32).T + (np.abs(b32) if bias else 0), x_dtype)


@needs_gpu
@pytest.mark.parametrize("tokens", MATMUL_TOKENS)
@EXAMPLES
@given(blocks=st.one_of(st.integers(1, 6), st.sampled_from([40, 65])), out_features=st.integers(1, 70),
       bias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_int8_matmul_matches_numpy(tokens, blocks, out_features, bias, dtype, seed):
    """q8_matvec for up to 64 tokens (decode), q8_matmul's 16 x 16 tiles for more; sizes that do
    not fill a tile or a block of warps, and rows (65 Q8 blocks) that stop part way through the
    lanes' unrolled loop."""
    rng = np.random.default_rng(seed)
    in_features = blocks * BLOCK
    (x, b), (x32, b32) = inputs(rng, dtype, (tokens, in_features), (out_features,))
    w = quantize_q8_0(rng.standard_normal((out_features, in_features)).astype(np.float32))
    got = on_gpu("matmul", x, w, b if bias else None)
    want = ref.matmul(x32, dequantize(w), b32 if bias else None)
    assert_dot_close(got, want, np.abs(x32) @ np.abs(dequantize(w)).T + (np.abs(b32) if bias else 0), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights, in_features", [
    ("float32", 256), ("float32", 37),  # 16-byte chunks; one weight at a time
    ("float16", 2056), ("float16", 100),  # 8 weights a chunk; 100 is not a whole number of them
    ("int8", 2080),
])
def test_a_decode_matmul_row_does_not_depend_on_the_other_rows(weights, in_features, dtype):
    """A decode step captured as a CUDA graph for 4 sequences is replayed for 3 (the 4th a
    padding row) and must give the logits of the step run op by op, bit for bit: so row t of a
    call of 64 rows equals, bitwise, the same row computed in a call of 1 row and of 3, wherever
    it lies in its group of 8 rows that share each weight load, and across two groups."""
    rng = np.random.default_rng(0)
    (x,), _ = inputs(rng, dtype, (DECODE_MAX_ROWS, in_features))
    (w,), _ = inputs(rng, np.float32, (43, in_features))
    w = quantize_q8_0(w) if weights == "int8" else w.astype(weights)
    everything = on_gpu("matmul", x, w)
    for first, rows in [(0, 1), (5, 1), (63, 1), (0, 3), (6, 3), (61, 3)]:
        np.testing.assert_array_equal(on_gpu("matmul", x[first: first + rows], w), everything[first: first + rows])


@needs_gpu
@EXAMPLES
@given(rows=st.tuples(st.integers(1, 9), st.integers(1, 3)), dim=st.integers(1, 600), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_rms_norm_matches_numpy(rows, dim, dtype, seed):
    """[tokens, heads, dim] as Qwen3's per-head norm; dims below and above a block's 256 threads."""
    rng = np.random.default_rng(seed)
    (x, w), (x32, w32) = inputs(rng, dtype, (*rows, dim), (dim,))
    assert_close(on_gpu("rms_norm", x, w, 1e-5), ref.rms_norm(x32, w32, 1e-5), dtype)


@needs_gpu
@EXAMPLES
@given(tokens=st.integers(1, 9), heads=st.integers(1, 5), half=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_rotary_matches_numpy(tokens, heads, half, dtype, seed):
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-100, 100, (tokens, half))
    (x,), (x32,) = inputs(rng, dtype, (tokens, heads, 2 * half))
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    want = ref.rotary(x32, cos.astype(np.float32), sin.astype(np.float32))
    assert_close(on_gpu("rotary", x, cos, sin), want, dtype)


attention_shapes = dict(
    new_tokens=st.one_of(st.just(1), st.integers(2, 40)),  # the decode kernel, the prefill kernel
    start_pos=st.one_of(st.just(0), st.integers(1, 70)),  # a prompt, a later chunk or decode step
    heads=st.tuples(st.integers(1, 3), st.integers(1, 4)),  # (num_kv_heads, query heads per kv head)
    head_dim=st.sampled_from([1, 7, 16, 33, 64, 128, 256]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)


@needs_gpu
@EXAMPLES
@given(extra=st.integers(0, 3), **attention_shapes)
def test_attention_matches_numpy(new_tokens, start_pos, heads, head_dim, dtype, seed, extra):
    """Causal GQA with the cache's later rows (`extra`, not yet written) masked as the future."""
    num_kv_heads, group = heads
    rng = np.random.default_rng(seed)
    context = start_pos + new_tokens + extra
    (q, k, v), (q32, k32, v32) = inputs(rng, dtype, (new_tokens, num_kv_heads * group, head_dim),
                                         (context, num_kv_heads, head_dim), (context, num_kv_heads, head_dim))
    assert_close(on_gpu("attention", q, k, v, start_pos), ref.attention(q32, k32, v32, start_pos), dtype)


@needs_gpu
@EXAMPLES
@given(block_size=st.sampled_from([1, 4, 16]), more=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 40)), max_size=3),
       **attention_shapes)
def test_paged_attention_matches_numpy(new_tokens, start_pos, heads, head_dim, dtype, seed, block_size, more):
    """A batch of sequences, keys and values read in place through block tables scattered over
    a larger pool."""
    num_kv_heads, group = heads
    rng = np.random.default_rng(seed)
    sequences = [(new_tokens, start_pos), *more]
    args, _ = scattered_batch(rng, sequences, block_size, num_kv_heads * group, num_kv_heads, head_dim, dtype)
    q, keys, values, tables, query_starts, start_positions = args
    want = ref.paged_attention(q.astype(np.float32), keys.astype(np.float32), values.astype(np.float32), tables,
                               query_starts, start_positions)
    assert_close(on_gpu("paged_attention", *args), want, dtype)


decode_shapes = dict(
    starts=st.lists(st.integers(0, 70), min_size=1, max_size=5),  # each sequence's position: its keys - 1
    block_size=st.sampled_from([1, 4, 16]),
    heads=attention_shapes["heads"], head_dim=attention_shapes["head_dim"], dtype=attention_shapes["dtype"],
    seed=attention_shapes["seed"],
)


@needs_gpu
@EXAMPLES
@given(lengths_dtype=st.sampled_from([np.int32, np.int64]), **decode_shapes)
def test_decode_attention_matches_numpy(starts, block_size, heads, head_dim, dtype, seed, lengths_dtype):
    """One new token per sequence, each with its own number of keys, in blocks scattered over a
    pool; GQA; the lengths and block tables read from the device."""
    num_kv_heads, group = heads
    rng = np.random.default_rng(seed)
    args, _ = scattered_batch(rng, [(1, start) for start in starts], block_size, num_kv_heads * group, num_kv_heads,
                              head_dim, dtype)
    q, keys, values, tables, query_starts, start_positions = args
    want = ref.paged_attention(q.astype(np.float32), keys.astype(np.float32), values.astype(np.float32), tables,
                               query_starts, start_positions)
    got = on_gpu("decode_attention", q, keys, values, tables, (start_positions + 1).astype(lengths_dtype))
    assert_close(got, want, dtype)


@needs_gpu
def test_decode_attention_gives_zeros_for_no_keys_and_cuts_a_length_to_its_table():
    """Lengths the host cannot check (they stay on the device): a sequence of 0 keys gets zeros,
    one longer than its table gets the whole table, and neither changes the other rows."""
    rng = np.random.default_rng(0)
    args, _ = scattered_batch(rng, [(1, 5), (1, 7), (1, 2)], 4, 4, 2, 16, np.float32)
    q, keys, values, tables, _, start_positions = args  # tables: [3, 2] blocks of 4 keys
    lengths = start_positions + 1
    want = on_gpu("decode_attention", q, keys, values, tables, lengths)
    got = on_gpu("decode_attention", q, keys, values, tables, np.array([0, 8 + 5, 3]))
    np.testing.assert_array_equal(got[0], np.zeros_like(got[0]))
    np.testing.assert_array_equal(got[1:], want[1:])  # sequence 1 has 8 keys: its table's capacity


@needs_gpu
@EXAMPLES
@given(**decode_shapes)
def test_a_decode_step_of_paged_attention_is_one_launch_with_the_numbers_of_one_per_sequence(
        starts, block_size, heads, head_dim, dtype, seed):
    """paged_attention with one new token in every sequence runs decode_attention (one launch for
    the batch, never the per-sequence path), and gets what the per-sequence kernel gets, bit for
    bit: both run attention.cu's one attention_decode."""
    num_kv_heads, group = heads
    rng = np.random.default_rng(seed)
    args, _ = scattered_batch(rng, [(1, start) for start in starts], block_size, num_kv_heads * group, num_kv_heads,
                              head_dim, dtype)
    q, keys, values, tables, query_starts, start_positions = args
    q, keys, values, tables = (gpu.to_device(a) for a in (q, keys, values, tables))
    with mock.patch.object(gpu, "_attention", wraps=gpu._attention) as per_sequence:
        batch = gpu.to_numpy(gpu.paged_attention(q, keys, values, tables, query_starts, start_positions))
    assert per_sequence.call_count == 0
    one_by_one = [gpu.to_numpy(gpu._attention(q[s: s + 1], keys, values, tables[s], int(start)))
                  for s, start in enumerate(start_positions)]
    np.testing.assert_array_equal(batch, np.concatenate(one_by_one))


@needs_gpu
@EXAMPLES
@given(tokens=st.integers(1, 12), block_size=st.sampled_from([1, 4, 16]), num_kv_heads=st.integers(1, 3),
       head_dim=st.sampled_from([1, 7, 64]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_write_kv_stores_each_token_at_its_slot_and_skips_padding(tokens, block_size, num_kv_heads, head_dim, dtype,
                                                                    seed):
    """Keys and values land where NumPy's fancy-index assignment puts them; a slot < 0 (the
    padding rows of a captured batch) or past the pool writes nothing, not even in a guard
    block on either side of the pools nor in the pool's last slot (where NumPy's -1 would
    go)."""
    rng = np.random.default_rng(seed)
    num_blocks = -(-12 // block_size) + 1
    num_slots = num_blocks * block_size
    slots = rng.permutation(num_slots - 1)[:tokens]  # distinct; never the last slot
    padding = rng.random(tokens) < 0.3
    padding[-1] = True  # as a captured batch pads its last rows
    slots[padding] = rng.choice([-1, -2, -num_slots, num_slots], padding.sum())
    (k, v), _ = inputs(rng, dtype, (tokens, num_kv_heads, head_dim), (tokens, num_kv_heads, head_dim))
    # the pools between two guard blocks, all random
    (keys, values), _ = inputs(rng, dtype, *[(num_blocks + 2, block_size, num_kv_heads, head_dim)] * 2)
    want_keys, want_values = keys.copy(), values.copy()
    stored = (slots >= 0) & (slots < num_slots)
    want_keys[1:-1].reshape(num_slots, num_kv_heads, head_dim)[slots[stored]] = k[stored]
    want_values[1:-1].reshape(num_slots, num_kv_heads, head_dim)[slots[stored]] = v[stored]
    keys, values = gpu.to_device(keys), gpu.to_device(values)
    assert gpu.write_kv(keys[1:-1], values[1:-1], gpu.to_device(k), gpu.to_device(v), gpu.to_device(slots)) is None
    np.testing.assert_array_equal(gpu.to_numpy(keys), want_keys)
    np.testing.assert_array_equal(gpu.to_numpy(values), want_values)


@needs_gpu
@EXAMPLES
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 300)), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_silu_mul_matches_numpy(shape, dtype, seed):
    """Gates out to +-30, where exp(-g) overflows float16 (and, past 88, float32)."""
    rng = np.random.default_rng(seed)
    (gate, up), (gate32, up32) = inputs(rng, dtype, shape, shape, scale=10.0)
    assert_close(on_gpu("silu_mul", gate, up), ref.silu_mul(gate32, up32), dtype)


@needs_gpu
@EXAMPLES
@given(rows=st.tuples(st.integers(1, 5), st.integers(1, 3)), width=st.integers(1, 600),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_softmax_matches_numpy(rows, width, dtype, seed):
    rng = np.random.default_rng(seed)
    (x,), (x32,) = inputs(rng, dtype, (*rows, width), scale=10.0)
    assert_close(on_gpu("softmax", x), ref.softmax(x32), dtype)


@needs_gpu
def test_inputs_the_kernels_cannot_take_are_refused_with_the_reason():
    x = np.ones((2, 4, 8), np.float32)
    with pytest.raises(TypeError, match="float32 or float16, not float64"):
        on_gpu("softmax", x.astype(np.float64))
    with pytest.raises(ValueError, match="head_dim up to 256; got 258"):
        on_gpu("attention", np.ones((1, 1, 258), np.float32), np.ones((1, 1, 258), np.float32),
               np.ones((1, 1, 258), np.float32), 0)
    with pytest.raises(ValueError, match="need 3 keys; the cache holds 2"):
        on_gpu("attention", x, x, x, 1)
    with pytest.raises(ValueError, match="head_dim must be even; got 7"):
        on_gpu("rotary", np.ones((2, 4, 7), np.float32), np.ones((2, 3), np.float32), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"w must be \[out, in\] with in = x's last dimension"):
        on_gpu("matmul", np.ones((2, 8), np.float32), np.ones((3, 9), np.float32))
    pool, tables = np.ones((4, 2, 2, 8), np.float32), np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match=r"block_tables must be \[3, max_blocks\] and context_lens \[3\]"):
        on_gpu("decode_attention", np.ones((3, 4, 8), np.float32), pool, pool, tables, np.ones(3, np.int32))
    with pytest.raises(ValueError, match=r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)"):
        on_gpu("decode_attention", np.ones((2, 3, 8), np.float32), pool, pool, tables, np.ones(2, np.int32))
    keys, slots = gpu.zeros((4, 2, 2, 8), np.float32), gpu.to_device(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"k and v must be \[tokens, 2, 8\]"):
        gpu.write_kv(keys, keys, gpu.zeros((3, 2, 7), np.float32), gpu.zeros((3, 2, 7), np.float32), slots)
    with pytest.raises(ValueError, match="must be contiguous"):
        gpu.write_kv(keys[:, ::2], keys[:, ::2], gpu.zeros((3, 2, 8), np.float32), gpu.zeros((3, 2, 8), np.float32),
                     slots)


# ---- whole models ---------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("name", MODELS)
def test_golden_models_give_numpys_logits_and_greedy_tokens(name):
    """The Hugging Face fixtures of tests/test_hf_parity.py (NumPy reproduces transformers there)."""
    directory, expected = golden(name)
    llm, reference = tinyinfer.load(directory, backend="cupy"), tinyinfer.load(directory)
    ids = expected["prompt_ids"] + expected["greedy_ids"]
    assert np.abs(llm.logits(ids) - reference.logits(ids)).max() < 1e-4
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=len(expected["greedy_ids"]), ignore_eos=True)
    assert llm.generate(expected["prompt"], params).token_ids == expected["greedy_ids"]


@needs_gpu
@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
def test_the_bundled_model_generates_numpys_greedy_tokens(weights):
    """bard in each weight format: cuBLAS (float32, widened float16) and the int8 kernels, in
    prefill and decode, through the engine's paged cache."""
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = "ROMEO.\nWhat light through yonder window breaks?"
    got = tinyinfer.load(backend="cupy", weights=weights).generate(prompt, params)
    want = tinyinfer.load(weights=weights).generate(prompt, params)
    assert got.token_ids == want.token_ids


@needs_gpu
def test_the_bundled_model_computes_in_float16():
    """All kernels in float16 against NumPy in float32: the logits stay within 1 % of their range.
    (Every op rounds its output to float16, 2^-11 relative, and 6 layers add those errors up to
    a fraction of 1 %; a wrong kernel is off by the whole range.)"""
    reference = tinyinfer.load()
    ids = reference.encode("ROMEO.\nWhat light through yonder window breaks?")
    got = tinyinfer.load(backend="cupy", dtype="float16").logits(ids)
    want = reference.logits(ids)
    assert np.abs(got - want).max() < 0.01 * (want.max() - want.min())


# ---- decode steps as CUDA graphs (kernels/cuda_graphs.py; the bookkeeping: tests/test_cuda_graphs.py) ----
def graphed_and_eager(directory=None, **options):
    """The same model on the GPU twice: as compile_model makes it (decode steps as CUDA graphs)
    and op by op (enforce_eager)."""
    graphed = tinyinfer.load(directory, backend="cupy", **options)
    eager = tinyinfer.load(directory, backend="cupy", enforce_eager=True, **options)
    assert graphed.model.cuda_graphs and not getattr(eager.model, "cuda_graphs", False)
    return graphed, eager


@needs_gpu
@pytest.mark.parametrize("name", MODELS)
def test_golden_models_decode_by_graph_the_eager_tokens_and_logits(name):
    """Greedy decode of each Hugging Face fixture replays graphs and gives transformers' ids, and
    one decode step's logits are the eager step's, bit for bit (same kernels, rows independent)."""
    directory, expected = golden(name)
    graphed, eager = graphed_and_eager(directory)
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=len(expected["greedy_ids"]), ignore_eos=True)
    assert graphed.generate(expected["prompt"], params).token_ids == expected["greedy_ids"]
    assert graphed.model.graphs  # decode went through a graph
    ids = expected["prompt_ids"]
    steps = []
    for llm in (graphed, eager):
        cache = llm.model.new_kv_cache(len(ids) + 2)
        llm.model.forward(ForwardBatch.build([ids], [cache]))  # prefill: eager on both
        steps.append(llm.model.forward(ForwardBatch.build([[expected["greedy_ids"][0]]], [cache])))
    assert np.array_equal(steps[0], steps[1])


@needs_gpu
@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
def test_a_padded_graph_step_on_the_paged_pool_gives_the_eager_logits_and_keys_bit_for_bit(weights):
    """Three sequences in scattered blocks, replayed by the graph of four: the padding row writes
    no key, and every real row's logits and keys are the eager step's exactly."""
    graphed, eager = graphed_and_eager(weights=weights)
    results = []
    for llm in (graphed, eager):
        pool = llm.model.new_paged_pool(num_blocks=12, block_size=4)
        tables = []
        for blocks in ([3, 1], [7], [9, 2, 5]):
            table = BlockTable(pool)
            table.block_ids = blocks
            tables.append(table)
        llm.model.forward(ForwardBatch.build([[5, 9, 13, 2, 7], [4, 4], [8, 1, 6, 3, 2, 11, 12, 40, 41]], tables))
        logits = llm.model.forward(ForwardBatch.build([[17], [23], [31]], tables))
        results.append((logits, [gpu.to_numpy(k) for k in pool.keys], [t.length for t in tables]))
    (ours, our_keys, our_lengths), (want, want_keys, want_lengths) = results
    assert list(graphed.model.graphs) == [4]
    assert np.array_equal(ours, want) and our_lengths == want_lengths == [6, 3, 10]
    for k, k_want in zip(our_keys, want_keys):
        assert np.array_equal(k, k_want)


@needs_gpu
def test_the_engine_on_graphs_serves_a_batch_with_the_eager_tokens():
    """Requests of different lengths, more at once than the first capture sizes, a small pool
    (so some are preempted and run again): every request gets the tokens of the eager engine."""
    graphed, eager = graphed_and_eager()
    rng = np.random.default_rng(0)
    requests = [(rng.integers(3, 90, int(rng.integers(2, 30))).tolist(), int(rng.integers(4, 40))) for _ in range(11)]
    outputs = []
    for llm in (graphed, eager):
        engine = LLMEngine(llm, EngineConfig(block_size=4, num_blocks=48))
        outputs.append(run_all(engine, requests))
        assert engine.stats.preemptions > 0
    assert outputs[0] == outputs[1]
    assert len(graphed.model.graphs) > 1  # several capture sizes were used
