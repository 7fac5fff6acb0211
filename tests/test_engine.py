"""The serving engine: batch invariance, block accounting, prefix caching, preemption, errors."""

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import tinyinfer
from backends import backend_params
from tiny_models import FIXTURES, tiny_hf_config, write_hf_model
from tinyinfer import SamplingParams
from tinyinfer.engine import EngineConfig, LLMEngine
from tinyinfer.errors import KVCacheTooSmallError
from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.ops import get_backend


def greedy_alone(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference: one request, a contiguous KV cache, a plain prefill-then-decode loop."""
    cache = KVCache(llm.config, len(prompt) + new_tokens, llm.ops, llm.dtype)
    output, feed = [], prompt
    for _ in range(new_tokens):
        logits = llm.model.forward(ForwardBatch.build([feed], [cache]))
        output.append(int(np.argmax(logits[0])))
        feed = output[-1:]
    return output


def run_all(engine: LLMEngine, requests) -> dict[int, list[int]]:
    ids = {engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)): i
           for i, (prompt, n) in enumerate(requests)}
    outputs = {}
    while engine.has_unfinished():
        for update in engine.step():
            if update.finished:
                outputs[ids[update.request_id]] = update.output.token_ids
    return outputs


prompts = st.lists(st.integers(3, 96), min_size=1, max_size=40)
requests = st.lists(st.tuples(prompts, st.integers(1, 12)), min_size=1, max_size=6)


@given(
    requests=requests,
    shared_prefix=st.lists(st.integers(3, 96), max_size=24),
    block_size=st.sampled_from([4, 16]),
    num_blocks=st.integers(13, 40),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_each_request_gets_the_tokens_it_gets_alone(tiny_llm, requests, shared_prefix, block_size, num_blocks,
                                                   budget, max_num_seqs, prefix_caching):
    """Whatever runs beside it, however its prompt is chunked, whether its blocks are shared or
    it is preempted and recomputed: greedy tokens equal those of the contiguous reference."""
    requests = [(shared_prefix + prompt, n) for prompt, n in requests]  # some share a prefix
    needed = max(-(-(len(p) + n) // block_size) for p, n in requests)
    config = EngineConfig(block_size=block_size, num_blocks=max(num_blocks // (block_size // 4), needed),
                          max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, prefix_caching=prefix_caching)
    engine = LLMEngine(tiny_llm, config)
    outputs = run_all(engine, requests)
    for i, (prompt, n) in enumerate(requests):
        assert outputs[i] == greedy_alone(tiny_llm, prompt, n)
    assert engine.block_manager.num_free == engine.pool.num_blocks  # everything given back


@pytest.mark.parametrize("backend", backend_params())
def test_every_backend_serves_a_mixed_batch_as_each_request_alone(tiny_model_dir, backend):
    """The engine's one paged-attention call per layer for the whole batch, on each backend:
    prompts chunked beside decoding sequences, tokens equal to the contiguous reference."""
    llm = tinyinfer.load(tiny_model_dir, backend=backend)
    rng = np.random.default_rng(1)
    requests = [(rng.integers(3, 96, length).tolist(), 9) for length in (5, 23, 2, 17, 40)]
    engine = LLMEngine(llm, EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=4))
    outputs = run_all(engine, requests)
    assert max(engine.stats.batch_sizes) > 1  # sequences did share forward passes
    assert [outputs[i] for i in range(len(requests))] == [greedy_alone(llm, p, n) for p, n in requests]


def test_a_small_pool_preempts_and_still_gives_the_same_tokens(tiny_llm):
    rng = np.random.default_rng(0)
    requests = [(rng.integers(3, 96, 10).tolist(), 30) for _ in range(4)]
    engine = LLMEngine(tiny_llm, EngineConfig(block_size=4, num_blocks=12))  # 40 tokens fit; 4 x 40 do not
    outputs = run_all(engine, requests)
    assert engine.stats.preemptions > 0
    assert [outputs[i] for i in range(4)] == [greedy_alone(tiny_llm, p, n) for p, n in requests]


def test_a_prefix_cache_hit_computes_fewer_prefill_tokens_and_gives_the_same_output(tiny_llm):
    system = list(range(10, 50))  # a 40-token "system prompt"
    first, second = system + [60, 61, 62], system + [70, 71]
    engine = LLMEngine(tiny_llm, EngineConfig(block_size=8))
    run_all(engine, [(first, 5)])
    before = engine.stats.prefill_tokens
    out = run_all(engine, [(second, 5)])[0]
    assert engine.stats.prefill_tokens - before == len(second) - 40  # five full blocks came from the cache
    assert out == greedy_alone(tiny_llm, second, 5)
    assert engine.block_manager.hit_rate == pytest.approx(40 / (len(first) + len(second)))

    no_cache = LLMEngine(tiny_llm, EngineConfig(block_size=8, prefix_caching=False))
    run_all(no_cache, [(first, 5)])
    assert run_all(no_cache, [(second, 5)])[0] == out and no_cache.stats.prefill_tokens == len(first) + len(second)


def test_an_identical_prompt_still_computes_its_last_token():
    """Its logits are needed to sample: the block holding it is never taken from the cache."""
    from tinyinfer.engine.block_manager import BlockManager
    from tinyinfer.engine.paged_cache import BlockTable

    manager = BlockManager(num_blocks=8, block_size=4)
    first, second = BlockTable(None), BlockTable(None)
    manager.allocate(first, list(range(8)))
    first.length = 8
    manager.register_full_blocks(first, list(range(8)))
    manager.allocate(second, list(range(8)))
    assert second.length == 4 and second.block_ids[0] == first.block_ids[0] != second.block_ids[1]


def test_a_block_is_reused_only_after_the_same_prefix(tiny_llm):
    """A token's KV depends on its position and everything before it, so the same four tokens
    at the start of a prompt are not the block they made after another prefix."""
    engine = LLMEngine(tiny_llm, EngineConfig(block_size=4))
    run_all(engine, [([10, 11, 12, 13, 40, 41, 42, 43, 50], 2)])
    before = engine.stats.prefill_tokens
    out = run_all(engine, [([40, 41, 42, 43, 50, 51], 2)])[0]
    assert engine.stats.prefill_tokens - before == 6 and engine.block_manager.cache_hits == 0
    assert out == greedy_alone(tiny_llm, [40, 41, 42, 43, 50, 51], 2)


def test_a_request_that_can_never_fit_is_rejected_with_the_numbers(tiny_llm):
    engine = LLMEngine(tiny_llm, EngineConfig(block_size=16, num_blocks=2))
    with pytest.raises(KVCacheTooSmallError, match=r"needs up to 40 tokens \(10 prompt \+ 30 new\), 3 KV blocks of 16, "
                                                   r"but the KV cache has only 2 blocks; lower max_tokens"):
        engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=30))
    assert not engine.has_unfinished()


def test_abort_ends_a_request_and_frees_its_blocks(tiny_llm):
    engine = LLMEngine(tiny_llm, EngineConfig(block_size=4, num_blocks=20))
    keep = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    drop = engine.add_request([8, 9, 10, 11, 12], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    engine.abort(drop)
    assert [len(s.cache.block_ids) for s in engine.scheduler.running] == [1]
    finished = {}
    while engine.has_unfinished():
        finished |= {u.request_id: u.output for u in engine.step() if u.finished}
    assert list(finished) == [keep] and finished[keep].token_ids == greedy_alone(tiny_llm, [5, 6, 7], 8)
    assert engine.block_manager.num_free == 20


def test_generate_of_a_list_with_a_bad_prompt_runs_none_of_it(tiny_llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_llm.generate([[5, 6], [500]], SamplingParams(max_tokens=3))
    assert not tiny_llm.engine.has_unfinished()


def test_stream_closed_early_aborts_its_request():
    llm = tinyinfer.load(FIXTURES / "models" / "llama")
    pieces = llm.stream("To be", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    next(pieces)
    pieces.close()
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_free == llm.engine.pool.num_blocks


def test_stats_report_the_run(tiny_llm):
    engine = LLMEngine(tiny_llm, EngineConfig(block_size=4))
    run_all(engine, [([5, 6, 7, 8], 3), ([9, 10], 3)])
    summary = engine.stats.summary(engine.block_manager)
    assert summary["prefill_tokens"] == 6 and summary["generated_tokens"] == 6
    assert summary["steps"] == 3 and engine.stats.batch_sizes == [2, 2, 2]
    # the last sampled token is never fed back: 4 + 2 tokens (2 blocks) and 2 + 2 tokens (1 block)
    assert summary["max_blocks_in_use"] == 2 + 1 and summary["output_tokens_per_s"] > 0


def scattered_batch(rng, sequences, block_size, num_heads, num_kv_heads, head_dim=8, dtype=np.float32):
    """A batch of sequences (new tokens, start position) whose keys and values lie in blocks
    scattered over one shared pool. -> (q, pools, block_tables, query_starts, start_positions)
    and each sequence's contiguous (q, k, v, start) for reference."""
    blocks_each = [-(-(start + new) // block_size) for new, start in sequences]
    placement = rng.permutation(sum(blocks_each) + 3)  # a larger pool, shuffled
    key_pool = rng.standard_normal((sum(blocks_each) + 3, block_size, num_kv_heads, head_dim)).astype(dtype)
    value_pool = rng.standard_normal(key_pool.shape).astype(dtype)
    block_tables = np.full((len(sequences), max(blocks_each)), -1, np.int64)  # padding is never read
    contiguous, used = [], 0
    for s, ((new, start), blocks) in enumerate(zip(sequences, blocks_each)):
        block_tables[s, :blocks] = placement[used: used + blocks]
        used += blocks
        q = rng.standard_normal((new, num_heads, head_dim)).astype(dtype)
        k, v = (rng.standard_normal((start + new, num_kv_heads, head_dim)).astype(dtype) for _ in range(2))
        for position in range(start + new):
            block, row = block_tables[s, position // block_size], position % block_size
            key_pool[block, row], value_pool[block, row] = k[position], v[position]
        contiguous.append((q, k, v, start))
    query_starts = np.cumsum([0] + [new for new, _ in sequences])
    q = np.concatenate([c[0] for c in contiguous])
    return (q, key_pool, value_pool, block_tables, query_starts, np.array([start for _, start in sequences])), contiguous


@given(sequences=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 30)), min_size=1, max_size=4),
       block_size=st.sampled_from([1, 4, 16]), heads=st.sampled_from([(4, 1), (4, 2), (4, 4)]),
       seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_paged_attention_reads_the_same_keys_as_contiguous_attention(sequences, block_size, heads, seed):
    """A batch of sequences in one call, each over its own scattered blocks, gives exactly what
    each sequence gets from contiguous attention alone."""
    ops = get_backend("numpy")
    paged_args, contiguous = scattered_batch(np.random.default_rng(seed), sequences, block_size, *heads)
    expected = np.concatenate([ops.attention(q, k, v, start) for q, k, v, start in contiguous])
    np.testing.assert_array_equal(ops.paged_attention(*paged_args), expected)


@functools.cache
def state_machine_llm():
    return tinyinfer.load(write_hf_model(Path(tempfile.mkdtemp()) / "model", tiny_hf_config()))


class BlockAccounting(RuleBasedStateMachine):
    """Any sequence of add / step / abort: every block is free, or owned by live sequences with
    exactly the right reference count, and nothing is both."""

    def __init__(self):
        super().__init__()
        self.engine = LLMEngine(state_machine_llm(), EngineConfig(block_size=4, num_blocks=16,
                                                                           max_num_batched_tokens=12, max_num_seqs=3))
        self.ids = []

    @rule(prompt=st.lists(st.integers(3, 20), min_size=1, max_size=20), new_tokens=st.integers(1, 20))
    def add(self, prompt, new_tokens):
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        self.ids.append(self.engine.add_request(prompt, params))

    @rule()
    def step(self):
        self.engine.step()

    @rule(data=st.data())
    def abort(self, data):
        if self.ids:
            self.engine.abort(data.draw(st.sampled_from(self.ids)))

    @invariant()
    def blocks_are_accounted_for(self):
        manager = self.engine.block_manager
        holders = [s.cache.block_ids for s in self.engine.sequences.values()]
        for block in manager.blocks:
            owners = sum(ids.count(block.block_id) for ids in holders)
            assert block.ref_count == owners
            assert (block.block_id in manager.free_ids) == (owners == 0)
        for key, block_id in manager.cached.items():
            assert manager.blocks[block_id].key == key


TestBlockAccounting = BlockAccounting.TestCase
TestBlockAccounting.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)


def test_generate_returns_its_own_results_while_other_requests_finish(tiny_llm):
    """A request added to the engine by someone else, finishing first, is not mistaken for
    one of generate's."""
    engine = tiny_llm.engine
    other = engine.add_request([5, 6], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    out = tiny_llm.generate([7, 8, 9], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.prompt_token_ids == [7, 8, 9]
    assert other not in engine.sequences
