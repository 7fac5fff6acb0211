"""The pipeline's timeline: what each device computed and sent during one step, how much of
the step each stage sat idle (the pipeline bubble), and a Gantt chart of it.

GPipe runs m micro-batches through p stages: stage s starts micro-batch 0 only after stages
0..s-1 have, and finishes micro-batch m-1 while the stages before it have nothing left to do.
With equal stages that each take t per micro-batch, a step lasts (m + p - 1) t, of which each
stage computes m t, so the fraction of the step a stage sits idle is

    bubble = (p - 1) / (m + p - 1)          p=2: m=1 50 %, m=2 33 %, m=8 11 %

More micro-batches shrink the bubble; smaller micro-batches make each pass less efficient.
`measure_bubble` reads the same fraction off the devices' ledgers (tinyinfer/parallel/ledger.py),
so the formula can be checked against a run, simulated (virtual clocks) or under mpiexec
(wall clocks).
"""

import re
import textwrap
from dataclasses import dataclass

import numpy as np

from tinyinfer.model.batch import ForwardBatch
from tinyinfer.parallel.ledger import ComputeSpan, DeviceLedger
from tinyinfer.plotting import pyplot

# a compute span's label while a Step runs (worker.py): "step 3" or "step 3, micro-batch 1"
STEP_LABEL = re.compile(r"step (\d+)(?:, micro-batch (\d+))?$")


def gpipe_bubble(stages: int, micro_batches: int) -> float:
    """GPipe's bubble: the fraction of a step each of `stages` equal stages sits idle when the
    step's work is cut into `micro_batches`, (p-1)/(m+p-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


@dataclass
class PipelineBubble:
    """How idle the stages of one step were. The window runs from the first compute span of
    the step on any device to the last end on any device (seconds on the devices' clocks)."""

    step: int  # the driver's count of forward passes (Step.index)
    stages: int  # p
    micro_batches: int  # m: how many the step was really cut into (never more than its sequences)
    start: float
    end: float
    stage_idle: list[float]  # [stages]: the fraction of the window in which no device of the stage computed

    @property
    def measured(self) -> float:
        """The pipeline's bubble: the mean over stages of their idle fractions."""
        return sum(self.stage_idle) / self.stages

    @property
    def formula(self) -> float:
        return gpipe_bubble(self.stages, self.micro_batches)

    def describe(self) -> str:
        return (f"measured {100 * self.measured:.1f} % (GPipe (p-1)/(m+p-1) = {100 * self.formula:.1f} %, "
                f"p={self.stages}, m={self.micro_batches})")


def step_spans(ledger: DeviceLedger, step: int) -> list[tuple[ComputeSpan, int | None]]:
    """The device's compute spans during step `step`, each with its micro-batch index (None
    for the step's work outside micro-batches: building the caches, gathering the logits)."""
    spans = []
    for span in ledger.compute:
        match = STEP_LABEL.match(span.label)
        if match and int(match[1]) == step:
            spans.append((span, None if match[2] is None else int(match[2])))
    return spans


def last_step(ledgers: list[DeviceLedger]) -> int:
    """The index of the latest step any device has a compute span of."""
    steps = [int(m[1]) for ledger in ledgers for span in ledger.compute if (m := STEP_LABEL.match(span.label))]
    if not steps:
        raise ValueError("the ledgers hold no step: run a forward pass after clearing them")
    return max(steps)


def step_window(ledgers: list[DeviceLedger], step: int) -> tuple[float, float]:
    """(start, end) of step `step`: its first compute span on any device to its last end."""
    spans = [span for ledger in ledgers for span, _ in step_spans(ledger, step)]
    if not spans:
        raise ValueError(f"no device has a compute span of step {step}")
    return min(span.start for span in spans), max(span.end for span in spans)


def busy_seconds(spans: list[ComputeSpan]) -> float:
    """The length of the union of the spans: time in which at least one of them ran."""
    total, reach = 0.0, -np.inf
    for span in sorted(spans, key=lambda s: s.start):
        if span.end > reach:
            total += span.end - max(span.start, reach)
            reach = span.end
    return total


def measure_bubble(ledgers: list[DeviceLedger], stages: int, step: int | None = None) -> PipelineBubble:
    """The bubble of one step (default: the last), read off one replica's ledgers.

    ledgers: one per device of the replica, in rank order (ParallelModel.ledgers()), so the
    tp devices of stage s are ledgers[s*tp : (s+1)*tp]. A stage counts as busy while any of
    its devices computes: its tensor-parallel devices work on the same layers side by side,
    and the time one of them waits for the other in an all-reduce is tensor-parallel overhead,
    not the pipeline's bubble. Transfers (the sends between stages, the all-reduces) count as
    idle: GPipe's formula assumes they take no time. The bubble is the mean over stages of
    1 - busy / window; with equal stages and free transfers it is (p-1)/(m+p-1) exactly.
    """
    if len(ledgers) % stages:
        raise ValueError(f"{len(ledgers)} ledgers cannot be {stages} stages of equal size")
    step = last_step(ledgers) if step is None else step
    start, end = step_window(ledgers, step)
    tp = len(ledgers) // stages
    stage_idle, micro_batches = [], set()
    for stage in range(stages):
        devices = ledgers[stage * tp:(stage + 1) * tp]
        spans = [(span, index) for ledger in devices for span, index in step_spans(ledger, step)]
        micro_batches |= {index for _, index in spans if index is not None}
        stage_idle.append(1 - busy_seconds([span for span, _ in spans]) / (end - start))
    return PipelineBubble(step, stages, len(micro_batches), start, end, stage_idle)


def prefill_timeline(model, sequences: int, prompt_tokens: int, seed: int = 0) -> list[DeviceLedger]:
    """The ledgers of one prefill, alone on a fresh timeline: `sequences` random prompts of
    prompt_tokens each through a ParallelModel (cut into its micro_batches). The same pass runs
    once before, untimed, so that first touches of weights and caches fall outside it."""
    rng = np.random.default_rng(seed)
    for _ in range(2):
        prompts = [rng.integers(0, model.config.vocab_size, prompt_tokens).tolist() for _ in range(sequences)]
        caches = [model.new_kv_cache(prompt_tokens) for _ in range(sequences)]
        model.ledgers(clear=True)
        model.forward(ForwardBatch.build(prompts, caches))
    return model.ledgers()


def draw_prefill_timeline(model, prompt_tokens: int, path, title: str = "") -> PipelineBubble:
    """One prefill of max(m, p) prompts of prompt_tokens each (every micro-batch gets one or
    more) through a ParallelModel: its bubble, and its Gantt chart saved to `path` (PNG)."""
    stages = model.layout.pp
    ledgers = prefill_timeline(model, max(model.micro_batches, stages), prompt_tokens)
    bubble = measure_bubble(ledgers, stages)
    plot_timeline(ledgers, path, title=f"{title}{': ' if title else ''}pipeline bubble {bubble.describe()}")
    return bubble


# ---- the Gantt chart -------------------------------------------------------------------------
TRANSFER_COLOURS = {"all_reduce": "tab:red", "all_gather": "tab:purple", "broadcast": "tab:gray",
                    "gather": "tab:gray", "barrier": "tab:gray"}


def plot_timeline(ledgers: list[DeviceLedger], path, title: str = "", step: int | None = None):
    """A Gantt chart of one step (default: the last) as a PNG: one row per device, labelled
    with its role; its compute spans as bars coloured by micro-batch (the index written in the
    bars wide enough for it; grey: the step's work outside micro-batches); each message
    between stages as an arrow from when it was sent to when it arrived; each collective as a
    thin bar under the row, from when its data began to move to when the device had it. Time
    in milliseconds from the start of the step."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    step = last_step(ledgers) if step is None else step
    start, end = step_window(ledgers, step)

    def ms(t: float) -> float:  # a device's clock (s) -> the chart's time (ms)
        return 1000 * (t - start)

    row_of = {ledger.rank: row for row, ledger in enumerate(ledgers)}
    colours = plt.get_cmap("tab20")
    figure, axes = plt.subplots(figsize=(9, 1 + 0.6 * len(ledgers)), dpi=100)
    micro_batches, kinds = set(), set()
    for row, ledger in enumerate(ledgers):
        widest = {}  # micro-batch -> its widest span on this device: where its number goes
        for span, index in step_spans(ledger, step):
            colour = "lightgray" if index is None else colours(index % 20)
            axes.barh(row, ms(span.end) - ms(span.start), left=ms(span.start), height=0.6, color=colour)
            if index is not None and span.end - span.start > _width(widest.get(index)):
                widest[index] = span
        for index, span in widest.items():
            if _width(span) > 0.025 * (end - start):
                axes.text(ms((span.start + span.end) / 2), row, str(index), ha="center", va="center", fontsize=7)
        micro_batches |= set(widest)
        for transfer in ledger.transfers:
            if transfer.kind in TRANSFER_COLOURS and start <= transfer.start < end:
                kinds.add(transfer.kind)
                axes.barh(row + 0.38, max(ms(transfer.end) - ms(transfer.start), 0), left=ms(transfer.start),
                          height=0.12, color=TRANSFER_COLOURS[transfer.kind])
    for send, recv in _messages(ledgers):
        if start <= send.start < end:
            sender, receiver = row_of[send.participants[0]], row_of[send.participants[1]]
            axes.annotate("", xy=(ms(recv.end), receiver), xytext=(ms(send.start), sender),
                          arrowprops=dict(arrowstyle="->", color="black", lw=0.6, shrinkA=0, shrinkB=0))
            kinds.add("send")
    handles = [Patch(color=colours(i % 20), label=f"micro-batch {i}") for i in sorted(micro_batches)]
    handles.append(Patch(color="lightgray", label="outside micro-batches"))
    if "send" in kinds:
        handles.append(Line2D([], [], color="black", lw=0.8, marker=">", label="send -> recv"))
    handles += [Patch(color=TRANSFER_COLOURS[k], label=k) for k in TRANSFER_COLOURS if k in kinds]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False,
                ncol=1 + len(handles) // (4 + 2 * len(ledgers)))
    roles = [textwrap.fill(f"{ledger.rank}: {ledger.role}", 40) for ledger in ledgers]
    axes.set_yticks(range(len(ledgers)), roles, fontsize=6)
    axes.set_ylim(len(ledgers) - 0.4, -0.6)  # device 0 on top
    axes.set_xlim(0, ms(end))
    axes.set_xlabel(f"ms from the start of step {step}")
    axes.set_title(title or f"step {step}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _width(span: ComputeSpan | None) -> float:
    return 0.0 if span is None else span.end - span.start


def _messages(ledgers: list[DeviceLedger]):
    """(send, recv) pairs: the k-th send from a to b is the k-th recv at b from a (messages
    between two devices arrive in the order they were sent; every device's timeline is
    cleared at the same point, so the counts line up)."""
    sends, recvs = {}, {}
    for ledger in ledgers:
        for transfer in ledger.transfers:
            if transfer.kind in ("send", "recv"):
                found = sends if transfer.kind == "send" else recvs
                found.setdefault(transfer.participants, []).append(transfer)
    for pair, sent in sends.items():
        yield from zip(sent, recvs.get(pair, []))
