"""The pipeline's timeline: GPipe's bubble, the bubble measured from the devices' ledgers, the
Gantt chart, and `tinyinfer bench --timeline`.

Hand-made ledgers give exact numbers; a simulated pp=2 run checks that the virtual clocks give
GPipe's bubble when the stages and micro-batches are equal.
"""

import pytest

import tinyinfer
from tiny_models import tiny_hf_config, write_hf_model
from tinyinfer.cli import main
from tinyinfer.parallel.ledger import ComputeSpan, DeviceLedger, Transfer
from tinyinfer.parallel.timeline import gpipe_bubble, measure_bubble, plot_timeline, prefill_timeline

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def gpipe_ledgers(stage_seconds: list[float], micro_batches: int, step: int = 1, tp: int = 1) -> list[DeviceLedger]:
    """The ledgers of an ideal GPipe step: stage s takes stage_seconds[s] per micro-batch and
    starts micro-batch i when it has finished i - 1 and stage s - 1 has finished i; free sends.
    Around the step, spans of other commands that the measurement must ignore."""
    ledgers, done = [], [0.0] * micro_batches  # when the stage before finished each micro-batch
    for stage, seconds in enumerate(stage_seconds):
        spans, free = [], 0.0
        for index in range(micro_batches):
            start = max(free, done[index])
            spans.append(ComputeSpan(start, start + seconds, f"step {step}, micro-batch {index}"))
            free = done[index] = start + seconds
        for tp_rank in range(tp):
            ledger = DeviceLedger(stage * tp + tp_rank, role=f"stage {stage}/{len(stage_seconds)}")
            ledger.compute = [ComputeSpan(-5, -4, "new KV cache"), ComputeSpan(-3, -2, f"step {step - 1}"),
                              *spans, ComputeSpan(free + 1, free + 2, f"step {step + 10}, micro-batch 0"),
                              ComputeSpan(free + 3, free + 4, "report")]
            ledgers.append(ledger)
    return ledgers


# ---- GPipe's formula ----------------------------------------------------------------------------
def test_gpipe_bubble_is_p_minus_1_over_m_plus_p_minus_1():
    assert gpipe_bubble(2, 1) == 0.5
    assert gpipe_bubble(2, 8) == pytest.approx(1 / 9)
    assert gpipe_bubble(4, 4) == pytest.approx(3 / 7)
    assert gpipe_bubble(1, 8) == 0.0  # one stage never waits for another


# ---- measured on hand-made ledgers --------------------------------------------------------------
def test_equal_stages_measure_exactly_the_formula():
    bubble = measure_bubble(gpipe_ledgers([1.0, 1.0], micro_batches=3), stages=2, step=1)
    assert (bubble.start, bubble.end) == (0.0, 4.0)  # (m + p - 1) micro-batch times
    assert bubble.stage_idle == [0.25, 0.25]  # each computes 3 of the 4 seconds
    assert bubble.micro_batches == 3
    assert bubble.measured == pytest.approx(gpipe_bubble(2, 3))


def test_a_slower_last_stage_makes_the_first_wait_at_the_end():
    """Stage 0 takes 1 s per micro-batch, stage 1 takes 2 s: the step lasts 1 + 4 * 2 = 9 s;
    stage 0 computes 4 of them, stage 1 8 of them."""
    bubble = measure_bubble(gpipe_ledgers([1.0, 2.0], micro_batches=4), stages=2, step=1)
    assert bubble.end - bubble.start == 9.0
    assert bubble.stage_idle == pytest.approx([5 / 9, 1 / 9])
    assert bubble.measured == pytest.approx(3 / 9)
    assert bubble.measured > bubble.formula == pytest.approx(1 / 5)


def test_the_last_step_is_measured_unless_one_is_named():
    ledgers = gpipe_ledgers([1.0, 1.0], micro_batches=2, step=1)  # also holds spans of "step 11"
    assert measure_bubble(ledgers, stages=2).step == 11
    assert measure_bubble(ledgers, stages=2, step=1).micro_batches == 2  # "step 11" is not "step 1"


def test_a_stage_is_busy_while_any_of_its_tensor_parallel_devices_computes():
    ledgers = gpipe_ledgers([1.0, 1.0], micro_batches=3, tp=2)
    ledgers[1].compute = [ComputeSpan(s.start + 0.5, s.end + 0.5, s.label) for s in ledgers[1].compute]
    bubble = measure_bubble(ledgers, stages=2, step=1)
    assert (bubble.start, bubble.end) == (0.0, 4.0)
    assert bubble.stage_idle == [1 - 3.5 / 4, 0.25]  # device 1 runs on half a second past device 0


def test_ledgers_without_a_step_are_refused():
    with pytest.raises(ValueError, match="no step"):
        measure_bubble([DeviceLedger(0, compute=[ComputeSpan(0, 1, "new KV cache")])], stages=1)
    with pytest.raises(ValueError, match="3 ledgers"):
        measure_bubble(gpipe_ledgers([1.0, 1.0, 1.0], 2), stages=2)


# ---- measured on a simulated pipeline -----------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A 4-layer model wide enough that its layers, not Python, take the time, on pp=2."""
    config = tiny_hf_config(num_hidden_layers=4, hidden_size=128, intermediate_size=256)
    llm = tinyinfer.load(write_hf_model(tmp_path_factory.mktemp("pipeline"), config), pp=2, micro_batches=8)
    yield llm
    llm.close()


def test_a_simulated_pipeline_of_equal_micro_batches_measures_gpipes_bubble(pipeline):
    """8 prompts of 32 tokens in 8 micro-batches on 2 stages of 2 layers. Each compute span is
    timed on this shared machine, so a pass can be disturbed; the fastest of three is the one
    disturbed least (a disturbance lengthens the step and counts as idle)."""
    runs = [measure_bubble(prefill_timeline(pipeline.model, 8, 32, seed), stages=2) for seed in range(3)]
    bubble = min(runs, key=lambda run: run.end - run.start)
    assert (bubble.stages, bubble.micro_batches) == (2, 8)
    assert abs(bubble.measured - gpipe_bubble(2, 8)) < 0.05, bubble.describe()


def test_a_step_has_no_more_micro_batches_than_sequences(pipeline):
    bubble = measure_bubble(prefill_timeline(pipeline.model, 3, 8), stages=2)
    assert bubble.micro_batches == 3
    assert bubble.formula == pytest.approx(1 / 4)


# ---- the Gantt chart ----------------------------------------------------------------------------
def test_the_timeline_is_drawn_as_a_small_png(tmp_path):
    import matplotlib  # noqa: F401 - in the dev extra: a missing one fails here, not skips
    ledgers = gpipe_ledgers([1e-3, 1e-3], micro_batches=4, tp=2)
    send = dict(bytes=64, participants=(0, 2), modelled_seconds=1e-6, arrived=1e-3, label="step 1, micro-batch 0")
    ledgers[0].transfers.append(Transfer("send", start=1e-3, end=1e-3 + 1e-6, **send))
    ledgers[2].transfers.append(Transfer("recv", start=1e-3, end=1e-3 + 1e-6, **send))
    ledgers[0].transfers.append(Transfer("all_reduce", 128, (0, 1), 1e-4, 5e-4, 6e-4, 5e-4, "step 1, micro-batch 0"))
    path = tmp_path / "timeline.png"
    plot_timeline(ledgers, path, title="hand-made", step=1)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert path.stat().st_size < 150_000


# ---- tinyinfer bench --timeline -----------------------------------------------------------------
def test_bench_timeline_prints_the_bubble_and_writes_the_chart(tiny_model_dir, tmp_path, capsys):
    import matplotlib  # noqa: F401 - in the dev extra: a missing one fails here, not skips
    path = tmp_path / "pipeline.png"
    assert main(["bench", "--model", str(tiny_model_dir), "--pp", "2", "--micro-batches", "4", "-p", "8", "-n", "2",
                 "-r", "1", "--timeline", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("pipeline bubble: measured ")
    assert lines[-1].endswith(f"(GPipe (p-1)/(m+p-1) = 20.0 %, p=2, m=4) -> {path}")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_bench_timeline_without_a_pipeline_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "pipeline.png"
    assert main(["bench", "--model", str(tiny_model_dir), "--tp", "2", "--timeline", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "tinyinfer: error: --timeline draws the stages of a pipeline: give --pp 2 or more\n"
    assert captured.out == "" and not path.exists()
