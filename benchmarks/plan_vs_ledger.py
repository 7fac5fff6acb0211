"""`tinyinfer plan`'s prediction against what the devices did: bytes by kind, and step time.

    python3 benchmarks/plan_vs_ledger.py                  # stories110M shape, tp=2 x pp=2, simulated
    python3 benchmarks/plan_vs_ledger.py --tp 4 --pp 1 --link pcie

A random-weight model runs on simulated devices (each device's compute timed alone on this
machine, each transfer priced on the link model: tinyinfer/parallel/clock.py). Two passes:
a prefill of one prompt, and a decode step of a batch (after a prefill of each sequence).
For each, the bytes every device sent, by kind, from its ledger, next to ParallelPlan's
prediction from the config alone; then the step's time on the devices' clocks next to the
plan's model of it, with each device on this machine's measured roofline
(tinyinfer.roofline.this_machine()). The roofline is a lower bound: it counts each op's FLOPs
and bytes at the machine's peak, and nothing of the time between ops.
"""

import argparse
from pathlib import Path

import numpy as np

from tinyinfer.bench import random_model
from tinyinfer.llm import LLM
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.parallel.launch import InMemorySource, ParallelOptions
from tinyinfer.parallel.link import LINKS
from tinyinfer.parallel.plan import ParallelPlan
from tinyinfer.roofline import this_machine


def last_step(ledgers) -> str:
    """The label of the latest step in the driver's transfers: "step 7"."""
    steps = [int(t.label.split()[1].rstrip(",")) for t in ledgers[0].transfers if t.label.startswith("step ")]
    return f"step {max(steps)}"


def step_bytes(ledgers, label: str) -> list[dict[str, int]]:
    totals = []
    for ledger in ledgers:
        kinds = {}
        for transfer in ledger.transfers:
            if transfer.label == label or transfer.label.startswith(label + ","):
                kinds[transfer.kind] = kinds.get(transfer.kind, 0) + transfer.bytes
        totals.append(kinds)
    return totals


def step_seconds(ledgers, label: str) -> float:
    """From the step's broadcast to its logits at the driver, on the driver's clock."""
    driver = ledgers[0]
    times = [t.arrived for t in driver.transfers if t.label == label] + [t.end for t in driver.transfers
                                                                        if t.label == label]
    return max(times) - min(times)


def compare(title: str, plan_bytes, measured, plan_time, measured_time):
    print(f"\n{title}\n")
    print("| device | kind | plan | ledger |")
    print("| ---: | --- | ---: | ---: |")
    for device, (predicted, seen) in enumerate(zip(plan_bytes, measured)):
        for kind in sorted(set(predicted) | set(seen)):
            print(f"| {device} | {kind} | {predicted.get(kind, 0):,} | {seen.get(kind, 0):,} |")
    print(f"\nstep time: plan {1000 * plan_time.seconds:.1f} ms (bound by {plan_time.bound}), "
          f"devices' clocks {1000 * measured_time:.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="stories110M")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--link", default="nvlink", choices=sorted(LINKS))
    parser.add_argument("--backend", default="numba", choices=["numpy", "numba"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences in the decode step")
    args = parser.parse_args()

    config, weights = random_model(args.shape)
    options = ParallelOptions(tp=args.tp, pp=args.pp, link=args.link, micro_batches=1)
    llm = LLM.on_parallel_group(InMemorySource(config, weights), options, args.backend, np.float32, None,
                                Path(args.shape))
    plan = ParallelPlan(config, llm.parallel.layout, LINKS[args.link], this_machine())
    model, rng = llm.model, np.random.default_rng(0)
    print(f"{args.shape}, {args.backend}, {llm.parallel.layout.describe()}, simulated on {LINKS[args.link].name}; "
          f"devices: {plan.roofline.name}, {plan.roofline.peak_flops / 1e9:.0f} GFLOP/s, "
          f"{plan.roofline.bandwidth / 1e9:.1f} GB/s")

    prompt = rng.integers(0, config.vocab_size, args.prompt_tokens).tolist()
    for _ in range(2):  # the second pass is measured (the first warms the caches)
        cache = model.new_kv_cache(args.prompt_tokens)
        model.ledgers(clear=True)
        model.forward(ForwardBatch.build([prompt], [cache]))
    ledgers = model.ledgers()
    label = last_step(ledgers)
    compare(f"prefill of {args.prompt_tokens} tokens", plan.forward_transfers([args.prompt_tokens]),
            step_bytes(ledgers, label), plan.step_time([(0, args.prompt_tokens)]), step_seconds(ledgers, label))

    context = 64
    caches = [model.new_kv_cache(context + 2) for _ in range(args.batch)]
    model.forward(ForwardBatch.build([rng.integers(0, config.vocab_size, context).tolist()
                                      for _ in caches], caches))
    for token in range(2):
        model.ledgers(clear=True)
        model.forward(ForwardBatch.build([[token]] * args.batch, caches))
    ledgers = model.ledgers()
    label = last_step(ledgers)
    compare(f"decode step, batch {args.batch} at context {context}", plan.forward_transfers([1] * args.batch),
            step_bytes(ledgers, label), plan.step_time([(context + 1, 1)] * args.batch), step_seconds(ledgers, label))
    llm.close()


if __name__ == "__main__":
    main()
