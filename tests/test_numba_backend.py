"""The Numba backend against the NumPy reference: every op on random shapes and dtypes, then
whole models against the golden outputs of transformers and against the NumPy backend."""

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

import tinyinfer
from test_engine import scattered_batch
from test_hf_parity import golden
from tinyinfer.kernels import numba_kernels, simd
from tinyinfer.kernels import huge_pages
from tinyinfer.kernels.huge_pages import ALIGNMENT, HugePageArena
from tinyinfer.kernels.numba_backend import CompileProgress
from tinyinfer.ops import get_backend
from tinyinfer.quantize import BLOCK, Q8Weight, dequantize, quantize_q8_0, store_weights

ops = get_backend("numba")
reference = get_backend("numpy")

DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**16)
# Rounding: the unit roundoff u (half the machine epsilon) of each dtype.
U = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}


def random(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def assert_same_sum(ours, ref, x, w, extra=0.0):
    """Both backends add the same in_features products, in different orders (SIMD lanes and
    register tiles here, OpenBLAS's blocking there). Any order's rounding error is at most
    in_features * u * sum|x_i * w_i|, so two orders differ by at most twice that: this bound,
    element by element, is the tolerance, tight at every size. `extra` (in units of that sum)
    covers rounding the two do not share (int8 blocks: where the scale is applied)."""
    bound = (2 * (x.shape[-1] + 1) * U[x.dtype] + extra) * (np.abs(x) @ np.abs(w).T)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.all(np.abs(ours - ref) <= bound), np.max(np.abs(ours - ref) - bound)


# ---- matmul -------------------------------------------------------------------------------------
# Up to 11 token rows take the decode kernels (7 with float16 or int8 weights), more the
# prefill ones, whose tiles take 8 weight rows by 16 or 32 token rows; more than 32 output rows
# split into several panels; sizes that are not multiples of those leave ragged tiles.
TOKENS = st.one_of(st.integers(1, 20), st.integers(28, 70))
OUT_FEATURES = st.one_of(st.integers(1, 9), st.integers(60, 140))


@njit
def _simd_round_trip(x, out, count):
    """2 * x[0, 1:17] as one vector, its first `count` lanes written down out[1:, 2]."""
    doubled = simd.multiply_add(np.float32(2), simd.load(x, 0, 1), simd.zeros())
    simd.store_column(out, 1, 2, doubled, count)


@pytest.mark.parametrize("count", [0, 5, 16])
def test_simd_vector_writes_only_its_lanes(count):
    """The prefill tiles store padded vectors with a lane count; a lane past it must not be
    written (it would land past the output's last row, outside the array)."""
    x = np.arange(40, dtype=np.float32).reshape(2, 20)
    out = np.full((18, 4), -1, np.float32)
    _simd_round_trip(x, out, count)
    expected = np.full((18, 4), -1, np.float32)
    expected[1 : 1 + count, 2] = 2 * x[0, 1 : 1 + count]
    assert np.array_equal(out, expected)


@settings(max_examples=40, deadline=None)
@given(tokens=TOKENS, out_features=OUT_FEATURES, in_features=st.integers(1, 80), with_bias=st.booleans(),
       dtype=DTYPES, seed=SEEDS)
def test_matmul_matches_numpy(tokens, out_features, in_features, with_bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x, w = random(rng, (tokens, in_features), dtype), random(rng, (out_features, in_features), dtype)
    bias = random(rng, out_features, dtype) if with_bias else None
    assert_same_sum(ops.matmul(x, w, bias), reference.matmul(x, w, bias), x, w)


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
def test_long_prefill_crosses_token_blocks(storage):
    """More token rows than a prefill task's TOKEN_BLOCK (and not a multiple of 16), with
    ragged weight rows: every block and every padded lane must land in the right place."""
    rng = np.random.default_rng(7)
    tokens = numba_kernels.TOKEN_BLOCK + 45
    x, w = random(rng, (tokens, 64), np.float32), random(rng, (37, 64), np.float32)
    weight = {"float32": w, "float16": w.astype(np.float16), "int8": quantize_q8_0(w)}[storage]
    widened = dequantize(weight) if storage == "int8" else np.asarray(weight, np.float32)
    assert_same_sum(ops.matmul(x, weight), reference.matmul(x, weight), x, widened, 2 * U[np.dtype(np.float32)])


@settings(max_examples=30, deadline=None)
@given(tokens=TOKENS, out_features=OUT_FEATURES, in_features=st.integers(1, 80), dtype=DTYPES, seed=SEEDS)
def test_float16_stored_matmul_matches_numpy(tokens, out_features, in_features, dtype, seed):
    """Widening float16 to float32 is exact in both backends: the same products, reordered."""
    rng = np.random.default_rng(seed)
    x, w = random(rng, (tokens, in_features), dtype), random(rng, (out_features, in_features), np.float16)
    assert_same_sum(ops.matmul(x, w), reference.matmul(x, w), x, w.astype(dtype))


@settings(max_examples=30, deadline=None)
@given(tokens=TOKENS, out_features=OUT_FEATURES, blocks=st.integers(1, 4), dtype=DTYPES, seed=SEEDS)
def test_int8_matmul_matches_numpy(tokens, out_features, blocks, dtype, seed):
    """The reference multiplies x by value * scale rounded to float32; decode here sums each
    block's x * value and then multiplies that by the scale, and prefill rebuilds the
    reference's very weights. Beyond the reordering, that is at most one float32 rounding of
    each weight and one of each scaled block sum: extra = 2 u(float32)."""
    rng = np.random.default_rng(seed)
    x = random(rng, (tokens, blocks * BLOCK), dtype)
    w = quantize_q8_0(random(rng, (out_features, blocks * BLOCK), np.float32))
    extra = 2 * U[np.dtype(np.float32)]
    assert_same_sum(ops.matmul(x, w), reference.matmul(x, w), x, dequantize(w).astype(dtype), extra)


def test_matmul_of_mismatched_shapes_is_an_error_in_both_backends():
    x, w = np.ones((2, 3), np.float32), np.ones((4, 5), np.float32)
    for backend in (ops, reference):
        with pytest.raises(ValueError):
            backend.matmul(x, w)
    q8 = quantize_q8_0(np.ones((4, 2 * BLOCK), np.float32))
    with pytest.raises(ValueError, match="needs scales"):  # the kernels trust the scales' shape
        ops.matmul(np.ones((1, 2 * BLOCK), np.float32), Q8Weight(q8.values, q8.scales[:, :1]))


# ---- attention ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(new_tokens=st.one_of(st.just(1), st.integers(2, 9)), start_pos=st.integers(0, 12), num_kv_heads=st.integers(1, 3),
       group=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 6, 8, 16]), dtype=DTYPES, seed=SEEDS)
def test_attention_matches_numpy(new_tokens, start_pos, num_kv_heads, group, head_dim, dtype, seed):
    """Decode (one new token), prefill (start_pos 0) and chunked prefill (several new tokens
    after a cached past), grouped-query ratios 1, 2, 4. The reference works in float64 even
    for float32 inputs (np.sqrt(head_dim) is a float64 scalar); here float32 inputs give
    float32 scores and outputs, whose running sum over at most 21 keys, each rounded once,
    stays within 1e-5 of values of size ~1."""
    rng = np.random.default_rng(seed)
    q = random(rng, (new_tokens, num_kv_heads * group, head_dim), dtype)
    k, v = (random(rng, (start_pos + new_tokens, num_kv_heads, head_dim), dtype) for _ in range(2))
    ours = ops.attention(q, k, v, start_pos)
    assert ours.dtype == q.dtype
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(ours, reference.attention(q, k, v, start_pos), rtol=tolerance, atol=tolerance)


@settings(max_examples=40, deadline=None)
@given(sequences=st.lists(st.tuples(st.one_of(st.just(1), st.integers(2, 9)), st.integers(0, 30)), min_size=1, max_size=5),
       block_size=st.sampled_from([1, 4, 16]), group=st.sampled_from([1, 2, 4]), dtype=DTYPES, seed=SEEDS)
def test_paged_attention_matches_numpy(sequences, block_size, group, dtype, seed):
    """A batch of sequences (decode and prefill mixed), keys and values scattered over a pool of
    blocks and read in place through the block tables in one call (the reference gathers them
    sequence by sequence). Same sums as attention, so the same tolerance."""
    args, _ = scattered_batch(np.random.default_rng(seed), sequences, block_size, 2 * group, 2, dtype=dtype)
    ours = ops.paged_attention(*args)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    assert ours.dtype == dtype
    np.testing.assert_allclose(ours, reference.paged_attention(*args), rtol=tolerance, atol=tolerance)


# ---- the elementwise and per-row ops -----------------------------------------------------------
SHAPES = st.one_of(st.tuples(st.integers(1, 9), st.integers(1, 100)),
                   st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 33)))  # [tokens, heads, head_dim]


@settings(max_examples=30, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS)
def test_rms_norm_matches_numpy(shape, dtype, seed):
    """A sum of at most 100 squares (all positive: relative error <= 100 u whatever the
    order), a square root and three products: relative 1e-5 in float32, 1e-13 in float64."""
    rng = np.random.default_rng(seed)
    x, weight = random(rng, shape, dtype), random(rng, shape[-1], dtype)
    ours, ref = ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)
    assert ours.dtype == ref.dtype
    np.testing.assert_allclose(ours, ref, rtol=1e-5 if dtype == np.float32 else 1e-13)


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 9), heads=st.integers(1, 4), half=st.integers(1, 16), dtype=DTYPES, seed=SEEDS)
def test_rotary_matches_numpy_exactly(tokens, heads, half, dtype, seed):
    """The same two products and one sum per output, without FMA: bit for bit the same."""
    rng = np.random.default_rng(seed)
    x = random(rng, (tokens, heads, 2 * half), dtype)
    angles = random(rng, (tokens, half), np.float64)
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    ours, ref = ops.rotary(x, cos, sin), reference.rotary(x, cos, sin)
    assert ours.dtype == ref.dtype
    np.testing.assert_array_equal(ours, ref)


@settings(max_examples=20, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS)
def test_silu_mul_matches_numpy(shape, dtype, seed):
    """exp (the kernel's own, within 2 ulps: see the next test; NumPy's SIMD loops there), a
    sum, a quotient, a product: relative 1e-6 in float32 (about 16 ulps), 1e-14 in float64
    (which takes the reference). Large negative gates check the limit 0 (not NaN): exp(-g)
    overflowing to inf there, clamped to 2.1e38 here, a difference under atol."""
    rng = np.random.default_rng(seed)
    gate, up = random(rng, shape, dtype) * 30, random(rng, shape, dtype)
    ours, ref = ops.silu_mul(gate, up), reference.silu_mul(gate, up)
    assert ours.dtype == ref.dtype and not np.isnan(ours).any()
    np.testing.assert_allclose(ours, ref, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-30)


@njit
def _exp_of_each(x, out):
    for i in range(x.size):
        out[i] = numba_kernels._exp(x[i])


def test_the_kernels_exp_is_within_two_ulps_and_never_inf_or_zero():
    """silu_mul's vectorisable exp against float64 exp, on every 2**-16 step of its range:
    within 2 float32 ulps. Outside the range it clamps: finite, never 0."""
    x = np.arange(-87.3, 88.3, 2.0**-16).astype(np.float32)
    ours = np.empty_like(x)
    _exp_of_each(x, ours)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(ours - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 2, ulps.max()
    beyond = np.array([-1e30, -100, 100, 1e30, np.inf, -np.inf], np.float32)
    clamped = np.empty_like(beyond)
    _exp_of_each(beyond, clamped)
    assert np.isfinite(clamped).all() and (clamped > 0).all()


@settings(max_examples=20, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS)
def test_softmax_matches_numpy(shape, dtype, seed):
    """exp of each shifted value and a sum of at most 100 positive terms (relative error
    <= 100 u in any order): relative 1e-5 in float32, 1e-13 in float64. Scaled by 100 so
    that an unshifted exp would overflow, and some weights underflow: below the dtype's
    smallest normal number (tiny) a value has only absolute precision, so there the relative
    bound becomes an absolute one, rtol * tiny."""
    rng = np.random.default_rng(seed)
    x = random(rng, shape, dtype) * 100
    ours, ref = ops.softmax(x), reference.softmax(x)
    assert ours.dtype == ref.dtype
    rtol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.finfo(dtype).tiny)


def test_embedding_gathers_the_same_rows_and_rejects_ids_outside_the_vocabulary():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([3, 0, 3])
    np.testing.assert_array_equal(ops.embedding(ids, table), reference.embedding(ids, table))
    with pytest.raises(IndexError):
        ops.embedding(np.array([4]), table)


def test_float16_compute_falls_back_to_the_reference():
    """Numba has no float16 arithmetic: float16 activations get the reference's very answer."""
    rng = np.random.default_rng(0)
    x, w = random(rng, (5, 64), np.float16), random(rng, (7, 64), np.float16)
    q8 = quantize_q8_0(w.astype(np.float32))
    for op, args in [("matmul", (x, w)), ("matmul", (x, q8)), ("rms_norm", (x, w[0], 1e-5)),
                     ("silu_mul", (x, x)), ("softmax", (x,))]:
        ours, ref = getattr(ops, op)(*args), getattr(reference, op)(*args)
        assert ours.dtype == ref.dtype == np.float16
        np.testing.assert_array_equal(ours, ref)


# ---- compiling once ---------------------------------------------------------------------------------
def test_kernels_are_compiled_once_and_never_again(capsys):
    """After the first backend, a new one compiles nothing, and a kernel called with types it
    was not compiled for fails loudly instead of compiling mid-generation."""
    get_backend("numba")
    assert capsys.readouterr().err == ""
    x = np.ones((2, 4), np.float32)
    with pytest.raises(TypeError):
        numba_kernels.softmax(x[:, ::2], np.empty((2, 2), np.float32))  # a strided view: not compiled


def test_the_kernels_cache_is_tied_to_simd_py():
    """Numba keys its disk cache on the content of each function's own file, and the kernels
    inline simd.py's LLVM code (measured: a changed simd.py alone left the cached kernels as
    they were). SIMD_SOURCE puts simd.py's content into numba_kernels.py's, so a change to
    simd.py recompiles them (and numba_layer's KERNELS_SOURCE carries it on to the compiled
    layer)."""
    actual = hashlib.sha256(Path(simd.__file__).read_bytes()).hexdigest()[:16]
    assert numba_kernels.SIMD_SOURCE == actual, (
        f'simd.py changed: set SIMD_SOURCE = "{actual}" in kernels/numba_kernels.py, '
        "or Numba's cache serves the kernels compiled with the old simd.py")


def test_the_compile_notice_comes_once_however_many_functions_and_phases_compile(capsys, monkeypatch):
    from numba import njit

    monkeypatch.setattr(CompileProgress, "announced", False)
    with CompileProgress("kernels", 2) as progress:
        njit(lambda a: a + 1)(1)
        progress.step()
        njit(lambda a: a * 2)(1.0)
        progress.step()
    with CompileProgress("model layers", 1, step_per_function=True):
        njit(lambda a: a - 1)(1)
    err = capsys.readouterr().err
    assert err.count("compiling Numba kernels") == 1
    assert "kernels: 100%" in err and "model layers: 100%" in err and "Traceback" not in err


# ---- loading weights ----------------------------------------------------------------------------
def _allocation(array: np.ndarray):
    """The object that owns an array's memory (an arena's mmap, or the array itself)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array if array.base is None else array.base


def _numpy_arrays(weights):
    return [piece for a in weights.arrays() for piece in ([a.values, a.scales] if isinstance(a, Q8Weight) else [a])]


def test_load_weights_copies_every_weight_once_into_one_aligned_read_only_arena(tiny_llm):
    """Every array (int8 values and scales too) keeps its values, dtype and shape, starts on a
    cache line, cannot be written, and shares one allocation; a tied LM head stays the embedding."""
    stored = store_weights(tiny_llm.model.weights, "int8")
    stored = dataclasses.replace(stored, lm_head=stored.embedding)  # tied
    loaded = ops.load_weights(stored)
    assert loaded.lm_head is loaded.embedding
    before, after = _numpy_arrays(stored), _numpy_arrays(loaded)
    assert len(after) == len(before) > 10
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)
        assert new.dtype == old.dtype and new.flags.c_contiguous and not new.flags.writeable
        assert new.ctypes.data % ALIGNMENT == 0
    assert len({id(_allocation(new)) for new in after}) == 1


@pytest.mark.skipif(not huge_pages.HUGE_PAGES, reason="transparent huge pages are a Linux feature")
def test_weights_too_big_for_half_the_available_memory_stay_memory_mapped(tiny_llm, monkeypatch, capsys):
    stored = tiny_llm.model.weights
    monkeypatch.setattr(huge_pages, "available_memory", lambda: stored.nbytes)  # the copy would take ~all of it
    loaded = ops.load_weights(stored)
    assert np.shares_memory(loaded.layers[0].wq, stored.layers[0].wq)
    assert "stay memory-mapped" in capsys.readouterr().err
    monkeypatch.setattr(huge_pages, "available_memory", lambda: 4 * stored.nbytes)
    assert not np.shares_memory(ops.load_weights(stored).layers[0].wq, stored.layers[0].wq)


@pytest.mark.skipif(not huge_pages.HUGE_PAGES, reason="transparent huge pages are a Linux feature")
def test_the_weight_arena_asks_linux_for_huge_pages():
    """/proc/self/smaps marks memory advised MADV_HUGEPAGE with the VmFlag "hg" (whether the
    kernel grants huge pages also depends on the system's THP setting, so that is not asserted)."""
    arena = HugePageArena(8 << 20)
    address = arena.memory.ctypes.data
    flags = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0] and ":" not in line.split()[0]:
                start, end = (int(a, 16) for a in line.split()[0].split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
                break
    assert flags is not None and "hg" in flags


def test_the_arena_starts_every_array_on_a_cache_line_whatever_came_before():
    odd_sizes = [np.arange(3, dtype=np.float32), np.arange(7, dtype=np.int8), np.arange(5.0)]
    arena = HugePageArena(HugePageArena.bytes_needed(odd_sizes))
    for array in odd_sizes:
        placed = arena.copy(array)
        assert placed.ctypes.data % ALIGNMENT == 0
        np.testing.assert_array_equal(placed, array)


def test_a_full_arena_says_so_instead_of_writing_past_its_end():
    arena = HugePageArena(HugePageArena.bytes_needed([np.zeros(8)]))  # 64 bytes + 64 of padding
    arena.copy(np.zeros(8))
    with pytest.raises(MemoryError, match="arena of 128 bytes is full"):
        arena.copy(np.zeros(9))


# ---- whole models -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weights", ["float16", "int8"])
def test_stored_weights_give_the_numpy_backends_logits(weights, dtype):
    """The same stored weights on both backends: prefill and decode logits agree to float32."""
    directory, expected = golden("qwen2")
    ids = expected["prompt_ids"] + expected["greedy_ids"]
    ours = tinyinfer.load(directory, backend="numba", weights=weights, dtype=dtype)
    ref = tinyinfer.load(directory, weights=weights, dtype=dtype)
    np.testing.assert_allclose(ours.logits(ids), ref.logits(ids), atol=1e-4)
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert ours.generate(expected["prompt"], params).token_ids == ref.generate(expected["prompt"], params).token_ids


def test_the_bundled_model_writes_the_numpy_backends_greedy_text():
    ours, ref = tinyinfer.load(backend="numba"), tinyinfer.load()
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt in ["ROMEO.", "To be, or not to be"]:
        assert ours.generate(prompt, params).text == ref.generate(prompt, params).text
