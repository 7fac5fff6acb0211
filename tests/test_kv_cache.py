"""Decoding with the KV cache must give the logits of recomputing the whole sequence."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch


def forward(llm, token_lists, caches, all_logits=False):
    return llm.model.forward(ForwardBatch.build(token_lists, caches), all_logits=all_logits)


@settings(max_examples=25, deadline=None)
@given(prompt_length=st.integers(1, 20), decode_steps=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_decode_with_cache_equals_full_recomputation(tiny_llm, prompt_length, decode_steps, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, tiny_llm.config.vocab_size, prompt_length + decode_steps).tolist()
    cache = KVCache(tiny_llm.config, len(tokens), tiny_llm.ops, tiny_llm.dtype)
    step_logits = [forward(tiny_llm, [tokens[:prompt_length]], [cache])[0]]
    for token in tokens[prompt_length:]:
        step_logits.append(forward(tiny_llm, [[token]], [cache])[0])
    full = tiny_llm.logits(tokens)  # one prefill, no cache reuse
    np.testing.assert_allclose(np.array(step_logits), full[prompt_length - 1 :], atol=1e-4)


def test_cache_length_counts_the_tokens_run(tiny_llm):
    cache = KVCache(tiny_llm.config, 10, tiny_llm.ops, tiny_llm.dtype)
    forward(tiny_llm, [[5, 6, 7]], [cache])
    forward(tiny_llm, [[8]], [cache])
    assert cache.length == 4


def test_a_full_cache_says_so_instead_of_writing_past_its_end(tiny_llm):
    cache = KVCache(tiny_llm.config, 3, tiny_llm.ops, tiny_llm.dtype)
    forward(tiny_llm, [[5, 6, 7]], [cache])
    with pytest.raises(ValueError, match="KV cache is full: 4 tokens do not fit its 3 rows"):
        forward(tiny_llm, [[8]], [cache])


def test_reserve_grows_the_cache_and_keeps_its_contents(tiny_llm):
    tokens = [3, 1, 4, 1, 5, 9]
    cache = KVCache(tiny_llm.config, 2, tiny_llm.ops, tiny_llm.dtype)
    forward(tiny_llm, [tokens[:2]], [cache])
    cache.reserve(6)
    last = forward(tiny_llm, [tokens[2:]], [cache])[0]
    np.testing.assert_allclose(last, tiny_llm.logits(tokens)[-1], atol=1e-4)


def test_truncate_then_rerun_gives_the_same_logits(tiny_llm):
    cache = KVCache(tiny_llm.config, 8, tiny_llm.ops, tiny_llm.dtype)
    forward(tiny_llm, [[3, 1, 4, 1, 5]], [cache])
    cache.truncate(2)
    rerun = forward(tiny_llm, [[7, 7]], [cache])[0]
    np.testing.assert_allclose(rerun, tiny_llm.logits([3, 1, 7, 7])[-1], atol=1e-4)
