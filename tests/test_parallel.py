"""Tensor, pipeline and data parallelism on simulated devices: the same answers as one device.

Every layout must give the greedy tokens transformers gave (the golden fixtures of
tests/fixtures/make_golden.py) and logits within 1e-5 of one device's (relative to the largest
logit: summing partial products in another order moves the last bits), on every model family:
grouped-query attention with fewer KV heads than devices, Qwen2's biases, Qwen3's head_dim and
q/k norms, tied and untied heads, a bfloat16 checkpoint, and the real stories260K.
"""

import json
import threading
import time

import numpy as np
import pytest

import tinyinfer
from tiny_models import FIXTURES, SHARED_MODELS, tiny_hf_config, write_hf_model
from tinyinfer.engine import EngineConfig
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.parallel import ParallelConfigError, ParallelError
from tinyinfer.parallel.worker import Worker

GOLDEN = ["llama", "llama3_tied", "llama_linear_rope", "mistral", "qwen2", "qwen3", "llama_bf16"]
LAYOUTS = [dict(tp=2), dict(tp=4), dict(pp=2), dict(tp=2, pp=2), dict(dp=2), dict(tp=2, dp=2)]
STORIES = SHARED_MODELS / "stories260K" / "stories260K.bin"
GREEDY = tinyinfer.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def layout_id(layout: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in layout.items())


def assert_same_logits(ours: np.ndarray, reference: np.ndarray):
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()


@pytest.fixture(scope="module")
def single_device():
    """One device's LLM of each golden model (the reference the layouts must match)."""
    return {name: tinyinfer.load(FIXTURES / "models" / name) for name in GOLDEN}


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("name", GOLDEN)
def test_every_layout_gives_transformers_tokens_and_one_devices_logits(name, layout, single_device):
    directory = FIXTURES / "models" / name
    golden = json.loads((directory / "golden.json").read_text())
    llm = tinyinfer.load(directory, **layout)
    try:
        ids = golden["prompt_ids"] + golden["greedy_ids"]
        assert_same_logits(llm.logits(ids), single_device[name].logits(ids))
        assert np.abs(llm.logits(ids) - np.load(directory / "golden_logits.npy")).max() < 1e-4
        params = tinyinfer.SamplingParams(temperature=0, max_tokens=len(golden["greedy_ids"]), ignore_eos=True)
        assert llm.generate(golden["prompt"], params).token_ids == golden["greedy_ids"]
    finally:
        llm.close()


@pytest.mark.skipif(not STORIES.exists(), reason="../shared/models/stories260K is not present")
@pytest.mark.parametrize("layout", [dict(tp=tp, pp=pp) for tp in (1, 2, 4) for pp in (1, 2, 3) if tp * pp > 1]
                         + [dict(dp=2), dict(tp=2, pp=3, micro_batches=3)], ids=layout_id)
def test_stories260k_on_every_layout(layout):
    reference = tinyinfer.load(STORIES)
    prompts = [[1, 403, 407, 261], [1, 296, 261], [1, 2]]
    llm = tinyinfer.load(STORIES, **layout)
    try:
        assert_same_logits(llm.logits(prompts[0]), reference.logits(prompts[0]))
        ours = [out.token_ids for out in llm.generate(prompts, GREEDY)]
        assert ours == [out.token_ids for out in reference.generate(prompts, GREEDY)]
    finally:
        llm.close()


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2), dict(tp=4)], ids=layout_id)
def test_the_numba_backend_runs_every_device(layout):
    directory = FIXTURES / "models" / "qwen2"
    reference = tinyinfer.load(directory, backend="numba")
    llm = tinyinfer.load(directory, backend="numba", **layout)
    try:
        ids = [1, 5, 9, 17, 33, 2, 7]
        assert_same_logits(llm.logits(ids), reference.logits(ids))
        assert llm.generate(ids, GREEDY).token_ids == reference.generate(ids, GREEDY).token_ids
    finally:
        llm.close()


@pytest.mark.parametrize("weights", ["float16", "int8"])
def test_stored_weights_shard_as_one_device_stores_them(tmp_path, weights):
    """Each device stores its own slices; int8 blocks of 32 never straddle two devices, so the
    quantized model is the one device's, to the last block."""
    directory = write_hf_model(tmp_path / "wide", tiny_hf_config(hidden_size=128, intermediate_size=256,
                                                                  num_attention_heads=4, num_key_value_heads=2))
    reference = tinyinfer.load(directory, weights=weights)
    llm = tinyinfer.load(directory, weights=weights, tp=2, pp=2)
    try:
        ids = [3, 9, 27, 81, 50, 1]
        assert_same_logits(llm.logits(ids), reference.logits(ids))
    finally:
        llm.close()


# ---- the engine on a parallel group ------------------------------------------------------------
def run_engine(llm, config: EngineConfig, requests) -> list[list[int]]:
    engine = llm.new_engine(config)
    ids = [engine.add_request(prompt, tinyinfer.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
           for prompt, n in requests]
    outputs = {}
    while engine.has_unfinished():
        for update in engine.step():
            if update.finished:
                outputs[update.request_id] = update.output.token_ids
    return [outputs[i] for i in ids]


REQUESTS = [([1, 5, 9, 17, 33, 2, 7, 40, 41, 42, 43], 12), ([1, 5, 9, 17], 9), ([60, 61, 62, 63, 64, 65, 66], 14),
            ([1, 5, 9, 17, 33, 2, 7, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], 6), ([88], 10)]


@pytest.mark.parametrize("config", [
    EngineConfig(block_size=4, num_blocks=64, max_num_seqs=5),  # batched, prefix-cache hits
    EngineConfig(block_size=4, num_blocks=64, max_num_seqs=5, max_num_batched_tokens=6),  # chunked prefill
    EngineConfig(block_size=4, num_blocks=9, max_num_seqs=5, prefix_caching=False),  # preemption
], ids=["batched", "chunked", "preempted"])
@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(tp=2, pp=2, micro_batches=3)], ids=layout_id)
def test_the_engine_runs_unchanged_on_a_parallel_group(layout, config):
    directory = FIXTURES / "models" / "llama3_tied"
    reference = run_engine(tinyinfer.load(directory), config, REQUESTS)
    llm = tinyinfer.load(directory, **layout)
    try:
        assert run_engine(llm, config, REQUESTS) == reference
    finally:
        llm.close()


def test_preemption_really_happens_in_the_parallel_engine():
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2)
    try:
        engine = llm.new_engine(EngineConfig(block_size=4, num_blocks=9, max_num_seqs=5, prefix_caching=False))
        for prompt, n in REQUESTS:
            engine.add_request(prompt, tinyinfer.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        assert engine.stats.preemptions > 0
    finally:
        llm.close()


def test_sampling_happens_once_on_the_driver_with_the_requests_seed():
    directory = FIXTURES / "models" / "llama"
    params = tinyinfer.SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    reference = tinyinfer.load(directory).generate("To be", params).token_ids
    llm = tinyinfer.load(directory, tp=2, pp=2)
    try:
        assert llm.generate("To be", params).token_ids == reference
    finally:
        llm.close()


# ---- what each device holds ----------------------------------------------------------------------
def test_each_device_holds_its_share_and_no_device_the_whole_model():
    """tp=2: each device has half of every matrix and of the vocabulary; the norms are kept
    whole by both (their sum is the one device's bytes plus one more copy of the norms)."""
    directory = FIXTURES / "models" / "llama"
    whole = tinyinfer.load(directory).model.weights
    llm = tinyinfer.load(directory, tp=2)
    try:
        ledgers = llm.model.ledgers()
        norms = sum(a.nbytes for layer in whole.layers for a in (layer.attention_norm, layer.mlp_norm))
        norms += whole.final_norm.nbytes
        assert [ledger.weight_bytes for ledger in ledgers] == [(whole.nbytes + norms) // 2] * 2
        layer = llm.model.weights.layers[0]
        assert layer.wq.shape == (whole.layers[0].wq.shape[0] // 2, whole.layers[0].wq.shape[1])
        assert layer.wo.shape == (whole.layers[0].wo.shape[0], whole.layers[0].wo.shape[1] // 2)
        assert llm.model.weights.embedding.shape[0] == whole.embedding.shape[0] // 2
    finally:
        llm.close()


def test_a_device_reads_its_rows_straight_from_the_memory_map():
    """Row slices of a float32 checkpoint stay views of the mapped file (no copy); column
    slices are copied, but only their own bytes."""
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2)
    try:
        layer = llm.model.weights.layers[0]

        def mapped(array):
            while array is not None and not isinstance(array, np.memmap):
                array = array.base
            return array is not None

        assert mapped(layer.wq) and mapped(layer.w_gate) and mapped(llm.model.weights.embedding)
        assert not mapped(layer.wo) and layer.wo.flags.c_contiguous
    finally:
        llm.close()


def test_a_pipeline_stage_holds_only_its_layers_and_ends():
    llm = tinyinfer.load(STORIES if STORIES.exists() else FIXTURES / "models" / "llama", pp=2)
    try:
        first, last = llm.model.ledgers()
        weights = llm.model.weights  # the driver: the first stage
        assert weights.embedding is not None and weights.lm_head is None and weights.final_norm is None
        assert len(weights.layers) == -(-llm.config.num_layers // 2)
        assert "stage 0/2" in first.role and "stage 1/2" in last.role
    finally:
        llm.close()


def test_fewer_kv_heads_than_devices_keeps_one_kv_head_per_device():
    """llama_linear_rope has 1 KV head: with tp=4 every device keeps it (its KV cache is the
    whole model's per token), 4 copies in all."""
    directory = FIXTURES / "models" / "llama_linear_rope"
    llm = tinyinfer.load(directory, tp=4)
    try:
        assert llm.model.config.num_kv_heads == 1
        assert llm.model.worker.plan.kv_copies == 4
        cache = llm.model.new_kv_cache(8)
        one = tinyinfer.load(directory)
        assert cache.nbytes == one.model.new_kv_cache(8).nbytes
    finally:
        llm.close()


def test_kv_caches_the_driver_drops_are_dropped_on_every_device():
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2)
    try:
        cache = llm.model.new_kv_cache(32)
        assert llm.model.ledgers()[1].kv_bytes == cache.nbytes
        del cache
        llm.logits([1, 2, 3])  # the next command carries the drop
        assert llm.model.ledgers()[1].kv_bytes == llm.model.ledgers()[0].kv_bytes
    finally:
        llm.close()


# ---- bad input -------------------------------------------------------------------------------------
def test_a_tp_that_does_not_divide_the_heads_lists_the_values_that_work():
    with pytest.raises(ParallelConfigError, match=r"tp=3 .* choose tp in \[1, 2, 4\]"):
        tinyinfer.load(FIXTURES / "models" / "llama", tp=3)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ParallelConfigError, match="pp=3 stages need at least 3 layers, and this model has 2"):
        tinyinfer.load(FIXTURES / "models" / "llama", pp=3)


def test_pp_layers_must_add_up_to_the_model():
    with pytest.raises(ParallelConfigError, match="e.g. 1,1"):
        tinyinfer.load(FIXTURES / "models" / "llama", pp=2, pp_layers=[2, 1])


def test_pp_layers_choose_the_split():
    directory = write_hf_model_with_layers(4)
    llm = tinyinfer.load(directory, pp=2, pp_layers=[3, 1])
    try:
        assert [ledger.role for ledger in llm.model.ledgers()] == ["stage 0/2 (layers 0-2)", "stage 1/2 (layers 3-3)"]
        assert_same_logits(llm.logits([4, 5, 6]), tinyinfer.load(directory).logits([4, 5, 6]))
    finally:
        llm.close()


def write_hf_model_with_layers(layers: int):
    import tempfile
    from pathlib import Path

    return write_hf_model(Path(tempfile.mkdtemp()) / "model", tiny_hf_config(num_hidden_layers=layers))


def test_an_int8_block_that_would_straddle_two_devices_is_refused():
    """o_proj's 64 input columns over tp=4 are 16 a device: half an int8 block each."""
    with pytest.raises(ParallelConfigError, match=r"o_proj's 64 input columns .* cut int8 blocks .* choose tp in \[1, 2\]"):
        tinyinfer.load(FIXTURES / "models" / "llama", tp=4, weights="int8")


@pytest.mark.parametrize("bad", [dict(tp=0), dict(pp=-1), dict(dp=1.5), dict(tp="2"), dict(tp=2, micro_batches=0),
                                 dict(tp=2, micro_batches="2"), dict(pp=2, pp_layers=[1, "a"]),
                                 dict(tp=2, routing="random"), dict(tp=2, link="wifi"), dict(tp=2, timeout=-1)])
def test_impossible_parallel_settings_say_what_is_wrong(bad):
    with pytest.raises(ParallelConfigError, match="|".join(bad)):
        tinyinfer.load(FIXTURES / "models" / "llama", **bad)


@pytest.mark.parametrize("argument", [["--tp", "0"], ["--pp", "x"], ["--micro-batches", "0"], ["--timeout", "-1"],
                                      ["--pp-layers", "1,a"]])
def test_parallel_options_are_checked_before_anything_loads(argument, capsys):
    from tinyinfer.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", str(FIXTURES / "models" / "llama"), "hello"] + argument)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert argument[0] in error and "Traceback" not in error


def test_a_device_that_fails_stops_the_group_with_its_error(monkeypatch):
    forward = Worker.forward

    def fails_on_device_1(self, step):
        if self.replica.global_rank == 1:
            raise MemoryError("device 1 ran out of memory")
        return forward(self, step)

    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2, timeout=30)
    monkeypatch.setattr(Worker, "forward", fails_on_device_1)
    start = time.perf_counter()
    with pytest.raises(ParallelError, match="device 1: MemoryError: device 1 ran out of memory"):
        llm.logits([1, 2, 3])
    assert time.perf_counter() - start < 10
    llm.close()


def test_a_device_that_hangs_times_out_instead_of_hanging_everyone(monkeypatch):
    forward = Worker.forward
    release = threading.Event()

    def hangs_on_device_1(self, step):
        if self.replica.global_rank == 1:
            release.wait(30)
        return forward(self, step)

    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2, timeout=1.0)
    monkeypatch.setattr(Worker, "forward", hangs_on_device_1)
    start = time.perf_counter()
    with pytest.raises(ParallelError, match=r"waited 1 s"):
        llm.logits([1, 2, 3])
    assert time.perf_counter() - start < 5
    release.set()
    llm.close()


def test_a_closed_group_refuses_more_work():
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2)
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.logits([1, 2])
    assert not any(thread.is_alive() for thread in llm.parallel.threads)


def test_a_cache_from_elsewhere_is_refused_with_advice():
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2)
    try:
        foreign = tinyinfer.load(FIXTURES / "models" / "llama").model.new_kv_cache(4)
        with pytest.raises(ValueError, match="new_kv_cache"):
            llm.model.forward(ForwardBatch.build([[1, 2]], [foreign]))
    finally:
        llm.close()


# ---- data parallelism --------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["round_robin", "least_tokens"])
def test_replicas_share_the_requests_and_results_come_back_in_order(routing):
    directory = FIXTURES / "models" / "llama"
    prompts = [[1, 5, 9], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8], [9], [10, 11, 12], [13, 14]]
    reference = [out.token_ids for out in tinyinfer.load(directory).generate(prompts, GREEDY)]
    llm = tinyinfer.load(directory, dp=3, routing=routing)
    try:
        assert [out.token_ids for out in llm.generate(prompts, GREEDY)] == reference
        assert sorted(llm.engine.routed) == [2, 2, 2]
    finally:
        llm.close()


def test_least_tokens_routing_sends_work_where_there_is_least():
    llm = tinyinfer.load(FIXTURES / "models" / "llama", dp=2, routing="least_tokens")
    try:
        engine = llm.engine
        engine.add_request([1] * 20, tinyinfer.SamplingParams(max_tokens=30))  # 50 tokens on replica 0
        engine.add_request([1, 2], tinyinfer.SamplingParams(max_tokens=5))  # replica 1: 7
        engine.add_request([1, 2], tinyinfer.SamplingParams(max_tokens=5))  # replica 1 again: 14 < 50
        assert [replica for replica, _ in engine.placement.values()] == [0, 1, 1]
        while engine.has_unfinished():
            engine.step()
        assert engine.outstanding == [0, 0]
    finally:
        llm.close()


def test_streaming_runs_on_another_replica():
    directory = FIXTURES / "models" / "llama"
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=10)
    expected = tinyinfer.load(directory).generate("To be", params).text
    llm = tinyinfer.load(directory, dp=2)
    try:
        llm.generate("warm up replica 0", tinyinfer.SamplingParams(max_tokens=1))  # the next request goes to replica 1
        assert "".join(llm.stream("To be", params)) == expected
        assert llm.engine.routed == [1, 1]
    finally:
        llm.close()


def test_a_chat_keeps_its_history_across_replicas():
    from tinyinfer.chat import ChatSession

    directory = FIXTURES / "models" / "llama"
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=6)

    def conversation(llm):
        session = ChatSession(llm)
        return ["".join(session.send(text, params)) for text in ("Hello", "And then?", "Why?")]

    expected = conversation(tinyinfer.load(directory))
    llm = tinyinfer.load(directory, dp=2)
    try:
        assert conversation(llm) == expected
        assert llm.engine.routed == [2, 1]
    finally:
        llm.close()


def test_a_pipeline_keeps_one_step_in_flight_per_stage():
    """On 2 stages the engine starts the second virtual engine's step before the first's
    logits are back (vLLM's virtual engines): on the devices' clocks, the first stage works on
    one step while the last stage works on the step before."""
    llm = tinyinfer.load(FIXTURES / "models" / "llama", pp=2, micro_batches=1)
    try:
        engine = llm.new_engine(EngineConfig(block_size=4, num_blocks=64))
        for prompt in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [10]):
            engine.add_request(prompt, tinyinfer.SamplingParams(max_tokens=6, ignore_eos=True))
        assert engine.step() == []  # the first step is in flight, nothing to report yet
        assert len(engine.in_flight) == 1
        while engine.has_unfinished():
            engine.step()
        first, last = llm.model.ledgers()

        def busy(ledger):  # step index -> (start, end) of its compute on this device
            spans = {}
            for span in ledger.compute:
                if span.label.startswith("step "):
                    step = int(span.label.split()[1].rstrip(","))
                    start, end = spans.get(step, (span.start, span.end))
                    spans[step] = (min(start, span.start), max(end, span.end))
            return spans

        on_first, on_last = busy(first), busy(last)
        overlapping = [step for step in on_last if step + 1 in on_first
                       and on_first[step + 1][0] < on_last[step][1] and on_last[step][0] < on_first[step + 1][1]]
        assert len(overlapping) >= 3
    finally:
        llm.close()


def test_fewer_requests_than_stages_still_run():
    """One request on 3 stages: two of the three virtual engines have nothing, and the engine
    must go on with the one that has."""
    directory = write_hf_model_with_layers(3)
    expected = tinyinfer.load(directory).generate([5, 6, 7], GREEDY).token_ids
    llm = tinyinfer.load(directory, pp=3)
    try:
        assert llm.generate([5, 6, 7], GREEDY).token_ids == expected
    finally:
        llm.close()


def test_a_group_nobody_holds_any_more_stops_its_devices():
    import gc

    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2, dp=2)
    llm.generate([[1, 2, 3], [4, 5]], GREEDY)  # both replicas and the router at work
    threads = llm.parallel.threads
    del llm
    gc.collect()
    for thread in threads:
        thread.join(timeout=10)
    assert threads and not any(thread.is_alive() for thread in threads)


def test_aborting_a_request_whose_step_is_in_flight_leaves_the_group_working():
    """On 2 stages the engine's first step is still in flight when the request is aborted: the
    engine still collects it, and the next requests get their logits, not that step's."""
    directory = FIXTURES / "models" / "llama"
    expected = tinyinfer.load(directory).generate([9, 8, 7], GREEDY).token_ids
    llm = tinyinfer.load(directory, pp=2)
    try:
        engine = llm.engine
        request = engine.add_request([1, 2, 3], GREEDY)
        engine.step()
        assert len(engine.in_flight) == 1
        engine.abort(request)
        assert engine.has_unfinished()  # its step must still come back
        while engine.has_unfinished():
            assert engine.step() == []
        assert llm.generate([9, 8, 7], GREEDY).token_ids == expected
        llm.engine = llm.new_engine(EngineConfig())  # replacing an engine with a step in flight
        llm.engine.add_request([1, 2, 3], GREEDY)
        llm.engine.step()
        llm.engine = llm.new_engine(EngineConfig())
        assert llm.generate([9, 8, 7], GREEDY).token_ids == expected
    finally:
        llm.close()


def test_ctrl_c_during_a_step_stops_the_caller_not_the_group(monkeypatch):
    import signal

    forward = Worker.forward
    interrupted = []

    def interrupt_once(self, step):
        if self.is_driver and not interrupted:
            interrupted.append(True)
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, half way through the step
        return forward(self, step)

    directory = FIXTURES / "models" / "llama"
    llm = tinyinfer.load(directory, tp=2, pp=2)
    try:
        monkeypatch.setattr(Worker, "forward", interrupt_once)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([1, 2, 3], GREEDY)
        assert interrupted and not llm.parallel.closed
        assert llm.generate([9, 8, 7], GREEDY).token_ids == tinyinfer.load(directory).generate([9, 8, 7], GREEDY).token_ids
    finally:
        llm.close()
