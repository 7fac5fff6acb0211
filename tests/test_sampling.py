"""SamplingParams validation and what each sampling setting does to the distribution."""

import numpy as np
import pytest

from tinyinfer import SamplingParams
from tinyinfer.sampling import sample


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0 \\(0 is greedy\\), got -0.5"),
        ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ({"top_p": 1.5}, "top_p must be in \\(0, 1\\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"min_p": 2.0}, "min_p must be in \\[0, 1\\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"stop": [""]}, "stop strings must not be empty"),
    ],
)
def test_impossible_settings_raise_value_error_naming_the_setting(setting, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**setting)


def draws(logits, params, n=2000, seen=()):
    rng = np.random.default_rng(0)
    return np.array([sample(np.asarray(logits, np.float32), params, rng, list(seen)) for _ in range(n)])


def test_greedy_takes_the_largest_logit():
    assert sample(np.array([0.1, 3.0, 2.9], np.float32), SamplingParams(temperature=0), None, []) == 1


def test_top_k_keeps_only_the_k_most_likely_tokens():
    assert set(draws([1.0, 2.0, 3.0, 4.0], SamplingParams(top_k=2))) == {2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 needs the first two
    logits = np.log([0.5, 0.3, 0.2])
    assert set(draws(logits, SamplingParams(top_p=0.6))) == {0, 1}
    assert set(draws(logits, SamplingParams(top_p=0.5))) == {0}


def test_min_p_drops_tokens_far_less_likely_than_the_best():
    logits = np.log([0.6, 0.3, 0.1])  # 0.1 < 0.25 * 0.6
    assert set(draws(logits, SamplingParams(min_p=0.25))) == {0, 1}


def test_temperature_sharpens_or_flattens_the_distribution():
    logits = np.log([0.7, 0.3])
    cold = np.mean(draws(logits, SamplingParams(temperature=0.25)) == 0)
    hot = np.mean(draws(logits, SamplingParams(temperature=4.0)) == 0)
    assert cold > 0.9 and 0.5 < hot < 0.65  # 0.7^4/(0.7^4+0.3^4) = 0.97; 0.7^.25 ... = 0.55


def test_sampling_follows_the_softmax_probabilities():
    counts = np.bincount(draws(np.log([0.2, 0.8]), SamplingParams(), n=4000), minlength=2)
    assert abs(counts[1] / 4000 - 0.8) < 0.03


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # token 0 (logit 2.0, seen) becomes 1.0 < token 1's 1.5; token 2 (-1, seen) goes to -2
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(np.array([2.0, 1.5, -1.0], np.float32), params, None, [0, 2]) == 1
    assert sample(np.array([-1.0, -1.5, -3.0], np.float32), params, None, [0]) == 1


def test_the_same_seed_gives_the_same_draws():
    logits = np.zeros(50, np.float32)
    a = [sample(logits, SamplingParams(), np.random.default_rng(7), []) for _ in range(1)]
    b = [sample(logits, SamplingParams(), np.random.default_rng(7), []) for _ in range(1)]
    assert a == b
