"""The pipeline bubble of a prefill, measured against GPipe's (p-1)/(m+p-1).

    python3 benchmarks/pipeline_bubble.py                          # simulated pp=2, stories15M shape
    python3 benchmarks/pipeline_bubble.py --timeline bubble-m8.png # and the Gantt chart of m=8
    mpiexec -n 2 python3 benchmarks/pipeline_bubble.py --mpi       # two processes, wall clocks

A random-weight model (tinyinfer.bench.random_model) on `--pp` stages prefills `--sequences`
prompts of `--prompt-tokens` each, cut into m micro-batches for each m of `--micro-batches`
(the same group, its `micro_batches` changed between passes). Each pass runs alone on a fresh
timeline (tinyinfer/parallel/timeline.py, prefill_timeline); its bubble is the stages' mean
idle fraction between the step's first and last compute. Simulated devices take turns on this
machine's cores but keep virtual clocks, so the timeline is that of p devices running side by
side; under mpiexec each stage is a process and the clocks are the wall clock. The table gives
the median of `--repetitions` passes for each m, and each stage's compute time in it.

The formula assumes equal stages. An even split of the layers is not: the last stage also runs
the final norm and the LM head (stories15M's is 32000 x 288, read whole for every micro-batch),
so it is the slower one, the first stage waits for it at the end of the step and the bubble
comes out above the formula. Give the first stage more layers to balance them:

    python3 benchmarks/pipeline_bubble.py --pp-layers 4,2
"""

import argparse
from pathlib import Path

from tinyinfer.bench import RANDOM_SHAPES, random_model
from tinyinfer.llm import LLM
from tinyinfer.parallel.launch import InMemorySource, ParallelOptions
from tinyinfer.parallel.link import LINKS
from tinyinfer.parallel.mpi import under_mpiexec
from tinyinfer.parallel.timeline import measure_bubble, plot_timeline, prefill_timeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="stories15M", choices=sorted(RANDOM_SHAPES))
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages")
    parser.add_argument("--pp-layers", help="layers of each stage, e.g. 4,2 (default: as even as they can be)")
    parser.add_argument("--micro-batches", default="1,2,4,8,16", help="the values of m, comma-separated")
    parser.add_argument("--sequences", type=int, default=16, help="prompts in the prefill (at least the largest m)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens of each prompt")
    parser.add_argument("--repetitions", type=int, default=5, help="passes for each m; the fastest is reported")
    parser.add_argument("--link", default="nvlink", choices=sorted(LINKS), help="link model of simulated devices")
    parser.add_argument("--timeline", help="save the Gantt chart of the m=8 pass (or the largest m) as this PNG")
    parser.add_argument("--mpi", action="store_true", help="run under mpiexec, one process per stage")
    args = parser.parse_args()
    counts = [int(m) for m in args.micro_batches.split(",")]
    if args.mpi and not under_mpiexec():
        parser.error(f"--mpi: start it with `mpiexec -n {args.pp} python3 {parser.prog} --mpi`")
    if max(counts) > args.sequences:
        parser.error(f"m={max(counts)} needs at least that many --sequences, got {args.sequences}")

    config, weights = random_model(args.shape)
    layers = [int(n) for n in args.pp_layers.split(",")] if args.pp_layers else None
    options = ParallelOptions(pp=args.pp, pp_layers=layers, link=args.link)
    # under mpiexec only rank 0 returns from here: the other ranks serve it, then exit
    llm = LLM.on_parallel_group(InMemorySource(config, weights), options, "numpy", weights.embedding.dtype, None,
                                Path(args.shape))
    clocks = f"simulated, virtual clocks, {args.link}" if llm.parallel.simulated else "MPI, wall clocks"
    print(f"{args.shape}, pp={args.pp} (layers {args.pp_layers or 'even'}), prefill of {args.sequences} x "
          f"{args.prompt_tokens} tokens ({clocks})\n")
    print("| m | measured bubble | GPipe (p-1)/(m+p-1) | difference | step | each stage computes |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    drawn = 8 if 8 in counts else max(counts)
    for m in counts:
        llm.model.micro_batches = m  # read by the next forward pass
        runs = []
        for repetition in range(args.repetitions):
            ledgers = prefill_timeline(llm.model, args.sequences, args.prompt_tokens, seed=repetition)
            runs.append((measure_bubble(ledgers, args.pp), ledgers))
        bubble, ledgers = min(runs, key=lambda run: run[0].end - run[0].start)
        window = bubble.end - bubble.start
        busy = " / ".join(f"{1000 * (1 - idle) * window:.1f}" for idle in bubble.stage_idle)
        print(f"| {m} | {100 * bubble.measured:.1f} % | {100 * bubble.formula:.1f} % | "
              f"{100 * (bubble.measured - bubble.formula):+.1f} | {1000 * window:.1f} ms | {busy} ms |", flush=True)
        if args.timeline and m == drawn:
            plot_timeline(ledgers, args.timeline, title=f"{args.shape}, pp={args.pp}: {bubble.describe()}")
    if args.timeline:
        print(f"\ntimeline of m={drawn}: {args.timeline}")
    llm.close()


if __name__ == "__main__":
    main()
