"""generate / stream / logits on a tiny random model: batching, stopping, errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyinfer
from tinyinfer import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@settings(max_examples=15, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(3, 96), min_size=1, max_size=12), min_size=2, max_size=5))
def test_a_batch_of_different_length_prompts_gives_each_its_tokens_alone(tiny_llm, prompts):
    together = tiny_llm.generate(prompts, GREEDY)
    alone = [tiny_llm.generate(p, GREEDY) for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_greedy_generation_follows_the_argmax_of_full_logits(tiny_llm):
    out = tiny_llm.generate([5, 17, 33], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = [5, 17, 33] + out.token_ids
    assert tiny_llm.logits(tokens)[2:-1].argmax(-1).tolist() == out.token_ids


def test_the_same_seed_gives_the_same_tokens_and_another_seed_differs(tiny_llm):
    params = dict(temperature=1.5, max_tokens=12, ignore_eos=True)
    a = tiny_llm.generate([5, 6], SamplingParams(seed=1, **params)).token_ids
    b = tiny_llm.generate([5, 6], SamplingParams(seed=1, **params)).token_ids
    c = tiny_llm.generate([5, 6], SamplingParams(seed=2, **params)).token_ids
    assert a == b and a != c


def test_max_tokens_ends_with_finish_reason_length(tiny_llm):
    out = tiny_llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_eos_ends_generation_with_finish_reason_stop(tiny_llm):
    first = tiny_llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=1)).token_ids[0]
    out = tiny_llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[first]))
    assert out.token_ids == [first] and out.finish_reason == "stop"


def test_generation_stops_at_the_context_window(tiny_llm):
    window = tiny_llm.config.max_context
    out = tiny_llm.generate(list(range(3, window - 2)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == window


def test_a_prompt_longer_than_the_context_is_an_error_with_both_lengths(tiny_llm):
    with pytest.raises(tinyinfer.ContextLengthError, match="the prompt has 70 tokens, but the model's context window is 64"):
        tiny_llm.generate([5] * 70, GREEDY)


def test_token_ids_outside_the_vocabulary_are_an_error(tiny_llm):
    with pytest.raises(ValueError, match=r"token ids \[97\] are outside the vocabulary \[0, 97\)"):
        tiny_llm.generate([5, 97], GREEDY)


def test_an_empty_prompt_is_an_error(tiny_llm):
    with pytest.raises(ValueError, match="the prompt is empty"):
        tiny_llm.generate([[]], GREEDY)


def test_text_needs_a_tokenizer_and_says_to_pass_one(tiny_llm):
    out = tiny_llm.generate([5, 6], GREEDY)
    with pytest.raises(tinyinfer.TokenizerMissingError, match="Pass tokenizer="):
        out.text
    with pytest.raises(tinyinfer.TokenizerMissingError, match="Pass tokenizer="):
        tiny_llm.generate("hello", GREEDY)
    with pytest.raises(tinyinfer.TokenizerMissingError, match="Pass tokenizer="):
        list(tiny_llm.stream([5, 6], GREEDY))


def test_logits_have_one_row_per_token_in_float32(tiny_llm):
    logits = tiny_llm.logits([5, 6, 7])
    assert logits.shape == (3, 97) and logits.dtype == np.float32


def test_timings_are_reported(tiny_llm):
    out = tiny_llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out.time_to_first_token > 0 and out.time_per_output_token > 0
    assert out.total_time >= out.time_to_first_token


def test_float64_compute_agrees_with_float32(tiny_model_dir, tiny_llm):
    llm64 = tinyinfer.load(tiny_model_dir, dtype="float64")
    np.testing.assert_allclose(llm64.logits([5, 6, 7, 8]), tiny_llm.logits([5, 6, 7, 8]), atol=1e-4)


def test_float16_compute_stays_close_to_float32(tiny_model_dir, tiny_llm):
    llm16 = tinyinfer.load(tiny_model_dir, dtype="float16")
    # float16 keeps ~3 decimal digits; through 2 layers the logits (magnitude ~5) move by < 0.1
    np.testing.assert_allclose(llm16.logits([5, 6, 7, 8]), tiny_llm.logits([5, 6, 7, 8]), atol=0.1)


def test_unsupported_compute_dtype_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="NumPy has no bfloat16"):
        tinyinfer.load(tiny_model_dir, dtype="bfloat16")
