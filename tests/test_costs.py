"""Op costs: FLOPs and bytes from shapes, counted per forward pass (prefill vs decode)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyinfer
from tinyinfer.bench import decode_bytes_per_token, decode_side_by_side
from tinyinfer.ops import get_backend
from tinyinfer.ops.cost import CostCounter, attention_cost, matmul_cost
from tinyinfer.quantize import quantize_q8_0
from tinyinfer.roofline import forward_costs, total


def test_matmul_cost_counts_two_flops_per_multiply_add_and_each_array_once():
    x, w, bias = np.zeros((3, 64), np.float32), np.zeros((10, 64), np.float32), np.zeros(10, np.float32)
    cost = matmul_cost(x, w, bias)
    assert cost.flops == 2 * 3 * 64 * 10 + 3 * 10
    assert cost.bytes_read == (3 * 64 + 10 * 64 + 10) * 4 and cost.bytes_written == 3 * 10 * 4
    assert matmul_cost(x, quantize_q8_0(w)).bytes_read == 3 * 64 * 4 + 10 * 64 + 10 * 2 * 4  # int8 + scales


@given(new=st.integers(1, 12), start=st.integers(0, 20))
@settings(max_examples=30, deadline=None)
def test_attention_cost_counts_exactly_the_unmasked_query_key_pairs(new, start):
    q = np.zeros((new, 2, 8), np.float32)
    k = v = np.zeros((start + new, 1, 8), np.float32)
    visible = (np.arange(start + new)[None, :] <= start + np.arange(new)[:, None]).sum()  # the causal mask
    assert attention_cost(q, k, v, start).flops == 2 * visible * (4 * 8 + 3)


def test_the_counter_changes_no_result_and_counts_every_call():
    numpy_ops = get_backend("numpy")
    counter = CostCounter(numpy_ops)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    w = np.ones((8, 32), np.float32)
    assert np.array_equal(counter.matmul(x, w), numpy_ops.matmul(x, w))
    counter.matmul(x, w)
    assert counter.totals["matmul"].calls == 2 and counter.totals["matmul"].flops == 2 * 2 * 4 * 32 * 8


def test_a_model_loads_and_runs_on_a_counter_wrapping_any_backend(tiny_model_dir):
    """The counter is a whole backend: LLM puts its weights through it and every op is counted."""
    for name in ("numpy", "numba"):
        counter = CostCounter(get_backend(name))
        llm = tinyinfer.load(tiny_model_dir)
        counted = tinyinfer.LLM(llm.config, llm.model.weights, None, counter, np.float32, llm.path)
        np.testing.assert_allclose(counted.logits([1, 2, 3]), llm.logits([1, 2, 3]), rtol=1e-4, atol=1e-5)
        assert counter.totals["matmul"].calls == llm.config.num_layers * 7 + 1


def test_decode_reads_every_weight_and_prefill_reuses_them():
    bard = tinyinfer.load()
    costs = forward_costs(bard, list(range(1, 129)))
    prefill, decode = total(costs["prefill"]), total(costs["decode"])
    config = bard.config
    assert costs["decode"]["matmul"].calls == config.num_layers * 7 + 1  # q k v o gate up down, LM head
    # decode moves about the bytes of the weights (plus a little of activations and cache)
    assert decode_bytes_per_token(bard) <= decode.bytes_read < 1.05 * decode_bytes_per_token(bard)
    # FLOPs ~ 2 per parameter per token, both ways
    matrices = config.num_parameters - config.vocab_size * config.hidden_size  # the embedding is a lookup
    assert costs["decode"]["matmul"].flops == pytest.approx(2 * (matrices + config.vocab_size * config.hidden_size), rel=0.01)
    lm_head = 2 * config.vocab_size * config.hidden_size  # prefill needs logits of its last token only
    assert costs["prefill"]["matmul"].flops == 128 * (costs["decode"]["matmul"].flops - lm_head) + lm_head
    # the lesson: prefill does far more work per byte than decode
    assert prefill.intensity > 20 * decode.intensity and decode.intensity < 1


def test_side_by_side_decode_gives_each_named_model_its_median_speed(tiny_model_dir, monkeypatch):
    """The A/B helper of benchmarks/: every model decodes in every round, and each gets the
    median of its own rounds (here: 10, 30 and 20 tokens/s give 20)."""
    llm = tinyinfer.load(tiny_model_dir)
    elapsed = iter([1.0, 1.0] + [0.4, 1.0, 0.133, 1.0, 0.2, 1.0])  # warm-ups, then 3 rounds of (a, b)
    monkeypatch.setattr("tinyinfer.bench.time_decode", lambda llm, tokens, rng: next(elapsed))
    speeds = decode_side_by_side({"a": llm, "b": llm}, rounds=3, new_tokens=4)
    assert speeds["a"] == pytest.approx(20.0) and speeds["b"] == pytest.approx(4.0)
