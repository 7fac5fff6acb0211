"""The NumPy reference ops against slow, obviously-correct loops over single vectors."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinfer.ops import get_backend

ops = get_backend("numpy")


def loop_attention(q, k, v, start_pos):
    """One query head, one query position at a time: softmax(q.k / sqrt(d)) over allowed keys."""
    new_tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    out = np.zeros_like(q)
    for t in range(new_tokens):
        visible = start_pos + t + 1
        for h in range(num_heads):
            kv = h // group
            scores = [q[t, h] @ k[j, kv] / math.sqrt(head_dim) for j in range(visible)]
            weights = np.exp(np.array(scores) - max(scores))
            weights /= weights.sum()
            out[t, h] = sum(weights[j] * v[j, kv] for j in range(visible))
    return out


@settings(max_examples=30, deadline=None)
@given(
    new_tokens=st.integers(1, 6),
    start_pos=st.integers(0, 5),
    num_kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 6]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_a_loop_over_heads_and_positions(new_tokens, start_pos, num_kv_heads, group, head_dim, seed):
    rng = np.random.default_rng(seed)
    num_heads = num_kv_heads * group
    q = rng.standard_normal((new_tokens, num_heads, head_dim))
    k = rng.standard_normal((start_pos + new_tokens, num_kv_heads, head_dim))
    v = rng.standard_normal((start_pos + new_tokens, num_kv_heads, head_dim))
    np.testing.assert_allclose(ops.attention(q, k, v, start_pos), loop_attention(q, k, v, start_pos), atol=1e-12)


def test_attention_computes_in_the_dtype_of_its_inputs():
    """A float32 model's attention stays float32 (a NumPy float64 scalar would promote it)."""
    q, k = np.ones((2, 4, 8), np.float32), np.ones((3, 2, 8), np.float32)
    assert ops.attention(q, k, k, 1).dtype == np.float32


def test_rotary_is_a_complex_rotation_of_pairs_i_and_i_plus_half():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8))
    angles = rng.standard_normal((3, 4))
    out = ops.rotary(x, np.cos(angles), np.sin(angles))
    as_complex = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * angles)[:, None, :]
    np.testing.assert_allclose(out, np.concatenate([as_complex.real, as_complex.imag], axis=-1), atol=1e-12)


def test_rotary_keeps_dot_products_depending_only_on_distance():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 1, 8)), rng.standard_normal((1, 1, 8))
    inv_freq = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)

    def rotated_dot(q_pos, k_pos):
        rq = ops.rotary(q, np.cos([q_pos * inv_freq]), np.sin([q_pos * inv_freq]))
        rk = ops.rotary(k, np.cos([k_pos * inv_freq]), np.sin([k_pos * inv_freq]))
        return float(np.sum(rq * rk))

    assert math.isclose(rotated_dot(7, 3), rotated_dot(104, 100), rel_tol=1e-9)


def test_rms_norm_gives_unit_root_mean_square_times_weight():
    x = np.array([[3.0, 4.0], [1.0, -1.0]])
    out = ops.rms_norm(x, np.array([1.0, 2.0]), eps=0.0)
    np.testing.assert_allclose(out, [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)], [1.0, -2.0]])


def test_rms_norm_in_float16_does_not_overflow():
    x = np.full((1, 64), 1000.0, dtype=np.float16)  # x*x = 1e6 overflows float16
    out = ops.rms_norm(x, np.ones(64, np.float16), eps=1e-6)
    assert out.dtype == np.float16 and np.allclose(out, 1.0)


def test_softmax_is_stable_for_large_logits_and_sums_to_one():
    out = ops.softmax(np.array([[1000.0, 1000.0, -np.inf]]))
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0]])


def test_silu_mul_matches_its_definition_and_handles_very_negative_gates():
    gate = np.array([-1000.0, -1.0, 0.0, 2.0])
    up = np.array([1.0, 2.0, 3.0, 4.0])
    expected = [0.0, -1 / (1 + math.e) * 2, 0.0, 2 / (1 + math.exp(-2)) * 4]
    np.testing.assert_allclose(ops.silu_mul(gate, up), expected)


def test_matmul_uses_weights_stored_out_by_in_and_adds_bias():
    x = np.array([[1.0, 2.0]])
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # [out=3, in=2]
    np.testing.assert_allclose(ops.matmul(x, w, np.array([0.0, 0.0, 10.0])), [[1.0, 2.0, 13.0]])


def test_unknown_backend_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown backend 'tpu'; available backends: numpy"):
        get_backend("tpu")
