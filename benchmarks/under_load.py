"""Decode on a busy machine: tinyinfer beside one and two CPU-bound processes, taking turns.

    python3 benchmarks/under_load.py                       # stories110M shape, numpy and numba, batch 1 and 16
    python3 benchmarks/under_load.py --threads 2           # a fixed thread count instead of the default

A laptop always has other work running. Each round measures, one after the other, decode
tokens/s with the machine otherwise quiet, beside one busy process and beside two (each a
Python loop that never sleeps), for each backend and batch size: batch 1 is
tinyinfer.bench.time_decode (one token at a time against a KV cache), batch 16 is
run_batch_bench's output tokens/s (16 requests through the engine). The table gives the median
over rounds and each loaded figure as a share of the quiet one. On 2 cores, one busy process
leaves a fair share of 50 %. Each phase starts with two short unmeasured passes a quarter
second apart, so that the default "auto" thread count has seen the machine as it now is
(tinyinfer/threads.py looks again every quarter second, over the time since it last looked).
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinyinfer.bench import random_model, run_batch_bench, time_decode
from tinyinfer.llm import LLM
from tinyinfer.ops import get_backend
from tinyinfer import threads
from tinyinfer.quantize import store_weights

BUSY = "while True: pass"


def busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]


def measure(llm, batch: int, new_tokens: int) -> float:
    if batch == 1:
        return new_tokens / time_decode(llm, new_tokens, np.random.default_rng(0))
    return run_batch_bench(llm, batch, prompt_tokens=16, new_tokens=new_tokens)["output_tokens_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="stories110M")
    parser.add_argument("--weights", default="float32")
    parser.add_argument("--backends", default="numpy,numba")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", default="auto", help="the LLM's thread setting (tinyinfer.load(threads=...))")
    parser.add_argument("-n", "--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config, weights = random_model(args.shape)
    stored = store_weights(weights, args.weights)
    setting = args.threads if args.threads == "auto" else int(args.threads)
    llms = {name: LLM(config, stored, None, get_backend(name), np.float32, Path(args.shape), threads=setting)
            for name in args.backends.split(",")}
    batches = [int(b) for b in args.batches.split(",")]
    for llm in llms.values():  # warm-up: compiled code, first touch of the weights
        for batch in batches:
            measure(llm, batch, 4)
    speeds = {(name, batch, busy): [] for name in llms for batch in batches for busy in (0, 1, 2)}
    for _ in range(args.rounds):
        for busy in (0, 1, 2):
            others = busy_processes(busy)
            time.sleep(0.5)  # let them start spinning
            try:
                for llm in llms.values():  # steady state: "auto" has looked at the machine as it is now
                    measure(llm, 1, 2)
                    time.sleep(threads.SAMPLE_SECONDS)
                    measure(llm, 1, 2)
                for name, llm in llms.items():
                    for batch in batches:
                        speeds[(name, batch, busy)].append(measure(llm, batch, args.new_tokens))
            finally:
                for process in others:
                    process.kill()
                    process.wait()
    print(f"{args.shape}, {args.weights} weights, threads={args.threads}, tg{args.new_tokens}, "
          f"median of {args.rounds} rounds\n")
    print("| backend | batch | quiet tok/s | 1 busy process | 2 busy processes |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in llms:
        for batch in batches:
            quiet, one, two = (statistics.median(speeds[(name, batch, busy)]) for busy in (0, 1, 2))
            print(f"| {name} | {batch} | {quiet:.1f} | {one:.1f} ({one / quiet:.0%}) | {two:.1f} ({two / quiet:.0%}) |",
                  flush=True)


if __name__ == "__main__":
    main()
