"""Decode steps as CUDA graphs (kernels/cuda_graphs.py), checked without a GPU: the bookkeeping
around capture and replay, run on a stand-in backend.

The stand-in is the NumPy reference with the four calls the graph path needs from a backend:
`write_kv` and `decode_attention` (the capture-safe decode ops, here in NumPy), `upload` (copy
the host's inputs into the static buffers in place), and `capture_graph`, whose "graph" runs
the recorded Python function again on replay and writes its result into the array the capture
returned, as a real graph writes the same addresses. So these tests check which steps replay a
graph, the capture sizes, the static buffers and their padding, recapture when the KV cache
moves, and that a replayed step gives the eager step's tokens and logits. What only a GPU can
check (that the recorded launches really read their inputs from the static buffers, and the
speed) is in tests/test_cupy_backend.py and benchmarks/gpu_check.sh.
"""

import numpy as np
import pytest

import tinyinfer
from test_engine import run_all
from tinyinfer.engine import EngineConfig, LLMEngine
from tinyinfer.engine.paged_cache import BlockTable
from tinyinfer.kernels.cuda_graphs import CAPTURE_SIZES, GraphedTransformer, KVPlacement, StaticInputs, capture_size
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer
from tinyinfer.ops.numpy_backend import NumpyBackend


class StandInGraph:
    def __init__(self, backend, run, output):
        self.backend, self.run, self.output = backend, run, output

    def launch(self):
        self.backend.launches.append(self.output.shape[0])
        self.output[...] = self.run()


class StandInBackend(NumpyBackend):
    """NumPy with the graph path's calls; counts captures (by rows) and replays."""

    def __init__(self):
        super().__init__()
        self.captures, self.launches = [], []

    def write_kv(self, key_pool, value_pool, k, v, slots):
        block_size = key_pool.shape[1]
        for t, slot in enumerate(slots):
            if slot >= 0:
                key_pool[slot // block_size, slot % block_size] = k[t]
                value_pool[slot // block_size, slot % block_size] = v[t]

    def decode_attention(self, q, key_pool, value_pool, block_tables, context_lens):
        out = np.empty_like(q)
        for s, length in enumerate(context_lens):
            keys = key_pool[block_tables[s]].reshape(-1, *key_pool.shape[2:])[:length]
            values = value_pool[block_tables[s]].reshape(-1, *value_pool.shape[2:])[:length]
            out[s] = self.attention(q[s: s + 1], keys, values, int(length) - 1)[0]
        return out

    def upload(self, host, device):
        device[...] = host

    def capture_graph(self, run):
        run()  # the warm-up a real capture needs (kernels loaded, the pool filled)
        output = run()
        self.captures.append(output.shape[0])
        return output, StandInGraph(self, run, output)


@pytest.fixture
def models(tiny_model_dir):
    """The same tiny model twice on one stand-in backend: run eagerly, and with graphs."""
    llm = tinyinfer.load(tiny_model_dir)
    ops = StandInBackend()
    eager = Transformer(llm.config, llm.model.weights, ops, llm.dtype)
    return eager, GraphedTransformer(eager), llm


def run_engine(llm, model, requests, **config):
    """Greedy tokens of each request (test_engine.run_all) through an engine on `model`."""
    llm.model = model
    engine = LLMEngine(llm, EngineConfig(**config))
    return run_all(engine, requests), engine


def test_capture_sizes_are_the_smallest_that_hold_the_batch():
    assert [capture_size(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert capture_size(65) is None and CAPTURE_SIZES[-1] == 64


def test_the_engine_replays_graphs_for_decode_and_gets_the_eager_tokens(models):
    eager, graphed, llm = models
    rng = np.random.default_rng(0)
    requests = [(rng.integers(3, 96, int(rng.integers(2, 9))).tolist(), int(rng.integers(3, 12))) for _ in range(7)]
    expected, _ = run_engine(llm, eager, requests, block_size=4, num_blocks=64)
    ops = graphed.ops
    ops.captures.clear(), ops.launches.clear()
    ours, engine = run_engine(llm, graphed, requests, block_size=4, num_blocks=64)
    assert ours == expected
    assert ops.launches and set(ops.launches) <= set(CAPTURE_SIZES)  # decode steps replayed, padded to a size
    assert sorted(ops.captures) == sorted(set(ops.launches))  # each size captured once, on first use
    assert engine.block_manager.num_free == engine.pool.num_blocks


def test_a_replayed_step_gives_the_eager_logits_and_stores_the_same_keys(models):
    """Three sequences padded to a graph of four: the padding row stores nothing. (Here the
    stand-in's NumPy matrix products sum 3 rows and 4 in other orders, so the logits agree to
    float32 rounding; the CUDA kernels compute each row alike, bit for bit.)"""
    eager, graphed, llm = models
    caches = {}
    for model in (eager, graphed):
        pool = model.new_paged_pool(num_blocks=8, block_size=4)
        tables = []
        for blocks in ([1, 2], [3], [5, 6]):
            table = BlockTable(pool)
            table.block_ids = blocks
            tables.append(table)
        model.forward(ForwardBatch.build([[5, 9, 13, 2, 7], [4, 4], [8, 1, 6, 3, 2, 11]], tables))  # prefill, eager
        keys_before = [k.copy() for k in pool.keys]
        logits = model.forward(ForwardBatch.build([[17], [23], [31]], tables))
        caches[model] = logits, pool, [t.length for t in tables], keys_before
    (eager_logits, eager_pool, eager_lengths, _), (ours, pool, lengths, before) = caches[eager], caches[graphed]
    assert graphed.ops.launches == [4]
    np.testing.assert_allclose(ours, eager_logits, rtol=1e-5, atol=1e-5)
    assert lengths == eager_lengths == [6, 3, 7]
    for ours_k, eager_k, old in zip(pool.keys, eager_pool.keys, before):
        np.testing.assert_allclose(ours_k, eager_k, rtol=1e-5, atol=1e-5)
        assert np.array_equal(ours_k[[0, 4, 7]], old[[0, 4, 7]])  # blocks no sequence owns: untouched


def test_static_inputs_hold_the_step_and_pad_the_rest(models):
    eager, graphed, llm = models
    cache = graphed.new_kv_cache(16)
    graphed.forward(ForwardBatch.build([[3, 4, 5]], [cache]))
    graphed.forward(ForwardBatch.build([[6]], [cache]))
    inputs = graphed.inputs.on_device(1)
    assert inputs["token_ids"].tolist() == [6] and inputs["positions"].tolist() == [3]
    assert inputs["slots"].tolist() == [3] and inputs["context_lens"].tolist() == [4]
    static = StaticInputs(graphed.ops, max_blocks=3)
    placement = KVPlacement([], [], 4, 3, [[7, 2], [5]], [9, 20])
    batch = ForwardBatch(np.array([11, 12]), np.array([5, 0]), chunks=[None, None])
    static.fill(batch, placement, size=4)
    rows = static.on_device(4)
    assert rows["token_ids"].tolist() == [11, 12, 0, 0]
    assert rows["slots"].tolist() == [9, 20, -1, -1]
    assert rows["context_lens"].tolist() == [6, 1, 1, 1]
    assert rows["block_tables"].tolist() == [[7, 2, 0], [5, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_a_new_cache_is_captured_again_and_the_same_cache_is_not(models):
    eager, graphed, llm = models
    ops = graphed.ops

    def decode(cache, steps):
        logits = graphed.forward(ForwardBatch.build([[3, 4]], [cache]))
        for _ in range(steps):
            logits = graphed.forward(ForwardBatch.build([[int(np.argmax(logits[0]))]], [cache]))
        return logits

    first = graphed.new_kv_cache(12)
    decode(first, 5)
    assert ops.captures == [1] and len(ops.launches) == 5
    first.truncate(0)  # the same cache again, from its start (as tinyinfer bench reuses one)
    again = decode(first, 5)
    assert ops.captures == [1] and len(ops.launches) == 10
    second = graphed.new_kv_cache(12)  # elsewhere in memory: the old graph would write the first cache
    assert np.array_equal(decode(second, 5), again)
    assert ops.captures == [1, 1]


def test_other_passes_run_eagerly(models):
    """Prefill, a mixed step, logits of every token, and more sequences than the largest graph."""
    eager, graphed, llm = models
    ops = graphed.ops
    cache = graphed.new_kv_cache(8)
    graphed.forward(ForwardBatch.build([[3, 4, 5]], [cache]))
    graphed.forward(ForwardBatch.build([[6]], [cache]), all_logits=True)
    caches = [graphed.new_kv_cache(4) for _ in range(CAPTURE_SIZES[-1] + 1)]
    graphed.forward(ForwardBatch.build([[7]] * len(caches), caches))  # contiguous caches: several, never a graph
    assert ops.launches == [] and ops.captures == []


def test_a_full_cache_is_refused_as_the_eager_path_refuses_it(models):
    eager, graphed, llm = models
    messages = []
    for model in (eager, graphed):
        cache = model.new_kv_cache(2)
        model.forward(ForwardBatch.build([[3, 4]], [cache]))
        with pytest.raises(ValueError) as refused:
            model.forward(ForwardBatch.build([[5]], [cache]))
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and "full" in messages[0]
