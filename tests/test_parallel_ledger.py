"""What each device holds and sends: the layout, the link model, the ledger, and `tinyinfer plan`.

The ledger records what the devices really did; the plan predicts it from the config alone.
They must agree exactly: bytes per kind of transfer for a forward pass, weight bytes per device.
"""

import json
import threading

import numpy as np
import pytest

import tinyinfer
from tiny_models import FIXTURES
from tinyinfer.cli import main
from tinyinfer.engine import EngineConfig
from tinyinfer.loading import load_config
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.parallel import ParallelLayout
from tinyinfer.parallel.link import LINKS, bytes_per_device
from tinyinfer.parallel.plan import ParallelPlan
from tinyinfer.parallel.simulated import SimulatedWorld
from tinyinfer.roofline import ROOFLINES

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False, "hidden_act": "silu"}


# ---- layout and link model --------------------------------------------------------------------------
def test_ranks_are_laid_out_as_megatron_does():
    layout = ParallelLayout(tp=2, pp=2, dp=2)
    assert [tuple(vars(layout.position(r)).values()) for r in (0, 1, 2, 5)] == [(0, 0, 0), (1, 0, 0), (0, 1, 0),
                                                                                (1, 0, 1)]
    assert layout.tensor_group(3) == [2, 3]
    assert layout.pipeline_group(5) == [5, 7]
    assert layout.replica_group(6) == [4, 5, 6, 7]
    assert layout.drivers() == [0, 4]


def test_ring_collectives_move_the_textbook_bytes():
    assert bytes_per_device("all_reduce", 1000, 4) == 1500  # 2 (p-1) / p
    assert bytes_per_device("all_gather", 1000, 4) == 750  # (p-1) / p of the gathered result
    assert bytes_per_device("send", 1000, 2) == 1000
    assert bytes_per_device("all_reduce", 1000, 1) == 0


def test_a_transfer_costs_its_latencies_and_its_bytes_over_the_bandwidth():
    link = LINKS["pcie"]
    assert link.seconds("all_reduce", 64e9, 2) == pytest.approx(2 * link.latency + 64e9 / 64e9)
    assert link.seconds("send", 12.5e9, 2) == pytest.approx(link.latency + 12.5e9 / 64e9)
    assert LINKS["nvlink"].bandwidth == 900e9 and LINKS["ethernet"].bandwidth == 12.5e9


def test_simulated_devices_really_move_the_data_and_their_clocks_meet():
    """An all-reduce starts when the last device arrives and ends the link model's time later
    on every clock; each device gets its own copy of the sum; a message arrives after its
    transfer time."""
    world = SimulatedWorld(2, LINKS["ethernet"], timeout=10)
    results = {}

    def device(rank):
        comm = world.communicator(rank, [0, 1])
        with comm.clock.busy("test"):
            comm.clock.time += 0.5 * rank  # device 1 reaches the all-reduce half a second later
            mine = np.full(1000, rank + 1.0, np.float32)
            total = comm.all_reduce(mine)
            if rank == 0:
                comm.send(total, 1)
            else:
                results["message"] = comm.recv(0)
        results[rank] = (total, mine)

    threads = [threading.Thread(target=device, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.all(results[0][0] == 3.0) and results[0][0] is not results[1][0]
    assert np.all(results[0][1] == 1.0)  # inputs untouched
    reduce_0, reduce_1 = world.ledgers[0].transfers[0], world.ledgers[1].transfers[0]
    link_time = LINKS["ethernet"].seconds("all_reduce", 4000, 2)
    assert reduce_0.start == reduce_1.start >= 0.5 and reduce_0.end == pytest.approx(reduce_0.start + link_time)
    assert reduce_0.arrived < reduce_1.arrived  # device 0 waited
    received = world.ledgers[1].transfers[1]
    assert received.kind == "recv" and received.end >= world.ledgers[0].transfers[1].start + LINKS["ethernet"].latency


# ---- the ledger against the plan ------------------------------------------------------------------------
def plan_of(llm, weights=None) -> ParallelPlan:
    return ParallelPlan(load_config(llm.path), llm.parallel.layout, LINKS["nvlink"], ROOFLINES["h100"], weights)


def first_step(ledgers) -> str:
    """The label of the first step in the ledgers' transfers: "step 3"."""
    steps = [int(t.label.split()[1].rstrip(",")) for ledger in ledgers for t in ledger.transfers
             if t.label.startswith("step ")]
    return f"step {min(steps)}"


def step_bytes(ledger, step_label: str) -> dict[str, int]:
    """What the device moved during the step labelled `step_label` ("step 3"), by kind."""
    totals = {}
    for transfer in ledger.transfers:
        if transfer.label == step_label or transfer.label.startswith(step_label + ","):
            totals[transfer.kind] = totals.get(transfer.kind, 0) + transfer.bytes
    return totals


CASES = [("all_reduce", dict(tp=2)), ("all_gather", dict(tp=4)), ("send", dict(pp=2, micro_batches=2)),
         ("recv", dict(tp=2, pp=2, micro_batches=3)), ("broadcast", dict(tp=2, pp=2))]


@pytest.mark.parametrize("kind,layout", CASES, ids=[kind for kind, _ in CASES])
@pytest.mark.parametrize("name", ["llama", "qwen2", "llama3_tied"])
def test_a_forward_pass_moves_exactly_the_bytes_the_plan_predicts(name, kind, layout):
    """Prefill chunks of different lengths on contiguous caches (qwen2's vocabulary of 403
    splits unevenly)."""
    llm = tinyinfer.load(FIXTURES / "models" / name, **layout)
    try:
        lengths = [5, 7, 3]
        caches = [llm.model.new_kv_cache(16) for _ in lengths]
        llm.model.ledgers(clear=True)
        llm.model.forward(ForwardBatch.build([list(range(1, n + 1)) for n in lengths], caches))
        ledgers = llm.model.ledgers()
        predicted = plan_of(llm).forward_transfers(lengths, micro_batches=llm.model.micro_batches)
        measured = [step_bytes(ledger, first_step(ledgers)) for ledger in ledgers]
        assert [m.get(kind, 0) for m in measured] == [p.get(kind, 0) for p in predicted]
        assert any(m.get(kind, 0) > 0 for m in measured)
        assert measured == predicted
    finally:
        llm.close()


def test_an_engine_step_on_the_paged_cache_moves_what_the_plan_predicts():
    """The engine's step broadcasts block tables, padded to the longest. On 2 stages the
    engine keeps 2 steps in flight: requests 0 and 2 go to the first virtual engine, request 1
    to the second, so the first step runs prompts of 9 and 5 tokens (3 and 2 blocks of 4)."""
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2, pp=2, micro_batches=2)
    try:
        engine = llm.new_engine(EngineConfig(block_size=4, num_blocks=32, max_num_batched_tokens=64))
        for prompt in [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 5], [7, 8, 9, 10, 11]]:
            engine.add_request(prompt, tinyinfer.SamplingParams(max_tokens=2))
        llm.model.ledgers(clear=True)
        engine.step()  # starts the first virtual engine's step
        engine.step()  # starts the second's, and collects the first's logits
        ledgers = llm.model.ledgers()
        measured = [step_bytes(ledger, first_step(ledgers)) for ledger in ledgers]
        predicted = plan_of(llm).forward_transfers([9, 5], micro_batches=2, blocks_per_sequence=[3, 2])
        assert measured == predicted
    finally:
        llm.close()


LAYOUTS_AND_WEIGHTS = [(layout, weights) for layout in (dict(tp=2), dict(pp=2), dict(tp=2, pp=2), dict(tp=4))
                       for weights in (None, "float16", "int8")
                       if not (weights == "int8" and layout.get("tp") == 4)]  # would cut int8 blocks: refused


@pytest.mark.parametrize("layout,weights", LAYOUTS_AND_WEIGHTS,
                         ids=[f"{'-'.join(f'{k}{v}' for k, v in l.items())}-{w}" for l, w in LAYOUTS_AND_WEIGHTS])
@pytest.mark.parametrize("name", ["llama", "llama3_tied", "qwen2", "qwen3"])
def test_each_devices_weight_bytes_are_what_the_plan_says(name, layout, weights):
    llm = tinyinfer.load(FIXTURES / "models" / name, weights=weights, **layout)
    try:
        measured = [ledger.weight_bytes for ledger in llm.model.ledgers()]
        assert measured == [device.weight_bytes for device in plan_of(llm, weights).devices]
    finally:
        llm.close()


def test_kv_bytes_per_token_are_what_the_plan_says():
    llm = tinyinfer.load(FIXTURES / "models" / "llama_linear_rope", tp=4)
    try:
        cache = llm.model.new_kv_cache(10)
        per_token = [ledger.kv_bytes // 10 for ledger in llm.model.ledgers()]
        assert per_token == [device.kv_bytes_per_token for device in plan_of(llm).devices]
        del cache
    finally:
        llm.close()


# ---- tinyinfer plan -----------------------------------------------------------------------------------------
def test_plan_works_from_a_config_alone_for_a_model_too_big_to_load(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert main(["plan", str(tmp_path), "--tp", "2", "--pp", "2", "--link", "pcie"]) in (0, None)
    out = capsys.readouterr().out
    assert "tp=2 x pp=2 x dp=1 = 4 devices" in out and "PCIe 5 x16" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0 ") or line.startswith("| 3 ")]
    assert len(rows) == 2 and "layers 0-15" in rows[0] and "layers 16-31" in rows[1]
    assert "prefill of 512 tokens" in out and "bound by" in out


def test_the_plan_splits_llama3_8b_as_arithmetic_says():
    """Each of tp=2 devices in a float32 single stage holds half of every matrix: 8.03e9 /
    2 params plus the norms, 4 bytes each; its KV per token is 32 layers x 4 KV heads x 128 x
    2 (k and v) x 4 bytes."""
    from tinyinfer.config import ModelConfig

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                         max_context=8192)
    plan = ParallelPlan(config, ParallelLayout(tp=2), LINKS["nvlink"], ROOFLINES["h100"])
    norms = (2 * 32 + 1) * 4096
    assert plan.devices[0].weight_bytes == 4 * ((config.num_parameters - norms) // 2 + norms)
    assert plan.devices[0].kv_bytes_per_token == 32 * 4 * 128 * 2 * 4


def test_a_pipeline_of_one_sequence_is_bound_by_its_idle_stages_and_micro_batches_help():
    config = load_config(FIXTURES / "models" / "llama")
    plan = ParallelPlan(config, ParallelLayout(pp=2), LINKS["nvlink"], ROOFLINES["h100"])
    one = plan.step_time([(0, 64)])
    assert one.idle > 0 and one.seconds == pytest.approx(one.compute + one.memory + one.link + one.idle)
    eight = plan.step_time([(0, 8)] * 8, micro_batches=8)
    assert eight.idle / eight.seconds < one.idle / one.seconds


def test_the_ledger_keeps_each_devices_peak_activations():
    """A layer at its widest (the residual stream, its norm, and the MLP's gate, up and their
    product, 4-byte floats) for the most tokens of any pass: tp=2 halves the MLP part."""
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2)
    try:
        llm.logits(list(range(1, 11)))  # 10 tokens
        llm.generate([1, 2, 3], tinyinfer.SamplingParams(max_tokens=3))  # fewer tokens a pass
        config = llm.config  # hidden 64, MLP 128: 64 columns a device
        expected = 10 * (2 * config.hidden_size + 3 * config.intermediate_size // 2) * 4
        assert [ledger.peak_activation_bytes for ledger in llm.model.ledgers()] == [expected, expected]
    finally:
        llm.close()


def test_a_long_run_keeps_a_bounded_timeline_and_counts_every_byte(monkeypatch):
    from tinyinfer.parallel import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "TIMELINE_LENGTH", 10)
    llm = tinyinfer.load(FIXTURES / "models" / "llama", tp=2)
    try:
        llm.generate([1, 2, 3], tinyinfer.SamplingParams(max_tokens=20, ignore_eos=True))
        ledger = llm.model.ledgers()[0]
        assert len(ledger.transfers) == 10 and len(ledger.compute) == 10
        kept = sum(t.bytes for t in ledger.transfers if t.kind == "all_reduce")
        assert ledger.bytes_by_kind()["all_reduce"] > kept > 0
    finally:
        llm.close()
