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
  n * 2^-24 = 1.2e-5 of that; 2e-5 / 2e-3.
"""

import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyinfer
from backends import cupy_unavailable_reason
from test_engine import scattered_batch
from test_hf_parity import MODELS, golden
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


@needs_gpu
@EXAMPLES
@given(tokens=st.integers(1, 20), sizes=st.tuples(st.integers(1, 70), st.integers(1, 70)), bias=st.booleans(),
       dtypes=st.sampled_from([(np.float32, np.float32), (np.float32, np.float16), (np.float16, np.float16)]),
       seed=st.integers(0, 2**32 - 1))
def test_float_matmul_matches_numpy(tokens, sizes, bias, dtypes, seed):
    """cuBLAS, with float32 or float16 weights; float16 weights meet float32 activations widened."""
    (in_features, out_features), (x_dtype, w_dtype) = sizes, dtypes
    rng = np.random.default_rng(seed)
    (x, b), (x32, b32) = inputs(rng, x_dtype, (tokens, in_features), (out_features,))
    (w,), (w32,) = inputs(rng, w_dtype, (out_features, in_features))
    got = on_gpu("matmul", x, w, b if bias else None)
    want = ref.matmul(x32, w32, b32 if bias else None)
    assert_dot_close(got, want, np.abs(x32) @ np.abs(w32).T + (np.abs(b32) if bias else 0), x_dtype)


@needs_gpu
@EXAMPLES
@given(tokens=st.one_of(st.integers(1, 8), st.integers(9, 40)), blocks=st.integers(1, 6),
       out_features=st.integers(1, 70), bias=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_int8_matmul_matches_numpy(tokens, blocks, out_features, bias, dtype, seed):
    """q8_matvec for up to 8 tokens (decode), q8_matmul's 16 x 16 tiles for more; sizes that do
    not fill a tile or a block of warps."""
    rng = np.random.default_rng(seed)
    in_features = blocks * BLOCK
    (x, b), (x32, b32) = inputs(rng, dtype, (tokens, in_features), (out_features,))
    w = quantize_q8_0(rng.standard_normal((out_features, in_features)).astype(np.float32))
    got = on_gpu("matmul", x, w, b if bias else None)
    want = ref.matmul(x32, dequantize(w), b32 if bias else None)
    assert_dot_close(got, want, np.abs(x32) @ np.abs(dequantize(w)).T + (np.abs(b32) if bias else 0), dtype)


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
