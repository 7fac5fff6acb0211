"""The Numba backend's compiled layers (kernels/numba_layer.py) against the same model run op by
op on the same backend. Both call the same kernels with the same arguments in the same order,
so logits and KV caches must agree bit for bit, for every weight format and kind of cache."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

import tinyinfer
from test_hf_parity import golden
from tinyinfer.engine.paged_cache import BlockTable, PagedBatch, PagedKVPool
from tinyinfer.kernels import numba_kernels, numba_layer
from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer

# plain grouped-query Llama; q/k/v biases (Qwen2); q/k norms and heads wider than hidden / heads (Qwen3)
MODELS = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=[(m, w) for m in MODELS for w in ("float32", "float16", "int8")], ids="-".join)
def compiled_and_op_by_op(request):
    name, weights = request.param
    llm = tinyinfer.load(golden(name)[0], backend="numba", weights=weights)
    assert isinstance(llm.model, numba_layer.CompiledTransformer) and llm.model.layer_weights is not None
    return llm.model, Transformer(llm.config, llm.model.weights, llm.ops, llm.dtype)


@pytest.fixture
def compiled_calls(monkeypatch):
    """How many times attention_block ran (tokens each time): the compiled path must really be
    the one tested."""
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])  # tokens
        return original(*args)

    original = numba_layer.attention_block
    monkeypatch.setattr(numba_layer, "attention_block", counted)
    return calls


def test_a_contiguous_cache_gives_the_same_logits_and_keys_bit_for_bit(compiled_and_op_by_op, compiled_calls):
    """A 13-token prefill (the gemm kernels), one-token decode steps (matvec), chunks of 5
    (matvec) and 9 tokens (gemm for float16 and int8 weights, matvec for float32)."""
    compiled, op_by_op = compiled_and_op_by_op
    caches = [KVCache(compiled.config, 32, compiled.ops, np.float32) for _ in range(2)]
    steps = [list(range(3, 16)), [7], [11], [4, 9, 2, 6, 5], list(range(20, 29))]
    for tokens in steps:
        ours, expected = (model.forward(ForwardBatch.build([tokens], [cache]), all_logits=True)
                          for model, cache in zip((compiled, op_by_op), caches))
        np.testing.assert_array_equal(ours, expected)
    for ours, expected in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        np.testing.assert_array_equal(ours, expected)
    assert compiled_calls == [len(tokens) for tokens in steps for _ in range(compiled.config.num_layers)]


def test_the_engines_paged_cache_gives_the_same_logits_and_blocks_bit_for_bit(compiled_and_op_by_op, compiled_calls):
    """Two sequences in scattered blocks of 4: both prefill, then one decodes while the other
    prefills a chunk, then both decode."""
    compiled, op_by_op = compiled_and_op_by_op
    pools = [PagedKVPool(compiled.config, 8, 4, compiled.ops, np.float32) for _ in range(2)]
    tables = [[BlockTable(pool) for _ in range(2)] for pool in pools]
    for pair in tables:
        pair[0].block_ids, pair[1].block_ids = [5, 1, 6], [2, 7]
    for tokens in ([list(range(3, 12)), [4, 5, 6]], [[8], [9, 1, 7, 3]], [[10], [2]]):
        outputs = []
        for model, pool, pair in zip((compiled, op_by_op), pools, tables):
            batch = ForwardBatch.build(tokens, pair)
            batch.paged = PagedBatch(pool, model.ops, batch.chunks)
            outputs.append(model.forward(batch))
        np.testing.assert_array_equal(*outputs)
    for ours, expected in zip(pools[0].keys + pools[0].values, pools[1].keys + pools[1].values):
        np.testing.assert_array_equal(ours, expected)
    assert len(compiled_calls) == 3 * compiled.config.num_layers


def test_several_contiguous_caches_in_one_batch_run_op_by_op(tiny_model_dir, compiled_calls):
    llm = tinyinfer.load(tiny_model_dir, backend="numba")
    compiled_calls.clear()  # the one that compiled it, on loading
    op_by_op = Transformer(llm.config, llm.model.weights, llm.ops, llm.dtype)
    outputs = []
    for model in (llm.model, op_by_op):
        caches = [KVCache(llm.config, 8, llm.ops, np.float32) for _ in range(2)]
        outputs.append(model.forward(ForwardBatch.build([[1, 2, 3], [4, 5]], caches)))
    np.testing.assert_array_equal(*outputs)
    assert compiled_calls == []


def test_the_compiled_layers_cache_is_tied_to_the_kernels():
    """Numba keys the compiled blocks' disk cache on their own file only, and a cached layer kept
    parts of old kernel code after numba_kernels.py changed: KERNELS_SOURCE puts
    numba_kernels.py's content into numba_layer.py's, so a changed kernel recompiles it."""
    actual = hashlib.sha256(Path(numba_kernels.__file__).read_bytes()).hexdigest()[:16]
    assert numba_layer.KERNELS_SOURCE == actual, (
        f'numba_kernels.py changed: set KERNELS_SOURCE = "{actual}" in kernels/numba_layer.py, '
        "or Numba's cache may run old kernel code inside the compiled layer")


def test_a_full_contiguous_cache_is_the_op_by_op_error(tiny_model_dir):
    llm = tinyinfer.load(tiny_model_dir, backend="numba")
    cache = KVCache(llm.config, 2, llm.ops, np.float32)
    with pytest.raises(ValueError, match="KV cache is full: 3 tokens do not fit its 2 rows"):
        llm.model.forward(ForwardBatch.build([[1, 2, 3]], [cache]))


def test_float64_runs_the_model_op_by_op(tiny_model_dir, compiled_calls):
    """float64 is a dtype for checking: the kernels the layer calls are float32's."""
    llm = tinyinfer.load(tiny_model_dir, backend="numba", dtype="float64")
    assert llm.model.layer_weights is None
    reference = tinyinfer.load(tiny_model_dir, dtype="float64")
    np.testing.assert_allclose(llm.logits([1, 2, 3]), reference.logits([1, 2, 3]), rtol=1e-10, atol=1e-12)
    assert compiled_calls == []


def test_enforce_eager_runs_the_model_op_by_op_with_the_same_tokens():
    """load(enforce_eager=True) skips the backend's compiled form: the plain Transformer."""
    compiled = tinyinfer.load(backend="numba")
    eager = tinyinfer.load(backend="numba", enforce_eager=True)
    assert isinstance(compiled.model, numba_layer.CompiledTransformer)
    assert type(eager.model) is Transformer
    greedy = tinyinfer.SamplingParams(temperature=0, max_tokens=12)
    assert eager.generate("ROMEO.", greedy).token_ids == compiled.generate("ROMEO.", greedy).token_ids


def test_enforce_eager_reaches_the_parallel_devices():
    llm = tinyinfer.load(backend="numba", tp=2, enforce_eager=True)
    try:
        assert type(llm.model.worker.model) is Transformer  # the driver's own device
    finally:
        llm.close()
