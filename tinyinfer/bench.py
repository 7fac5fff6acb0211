"""Throughput in the style of llama-bench: prefill (pp) and decode (tg) tokens per second.

pp128: one forward pass over a 128-token prompt. tg128: 128 decode steps of one token each,
against a growing KV cache. Each is run several times and the median is reported, because a
shared machine is noisy. Decode reads every weight once per token, so its speed limit is
memory read bandwidth: we measure it in the same run, with every core reading
(kernels/bandwidth.py), and report decode as a fraction of that bound. The bound assumes the
weights come from memory (DRAM): where they fit in the last-level cache, decode reads them from
there and can pass it, and the table says so (last_level_cache, bound_cells).
"""

import re
import statistics
import time
from pathlib import Path

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.kernels.bandwidth import read_bandwidth
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.weights import LayerWeights, ModelWeights
from tinyinfer.plotting import pyplot

# shapes of llama2.c's TinyStories models, for benchmarking without downloading anything
RANDOM_SHAPES = {
    "stories15M": dict(hidden_size=288, num_layers=6, num_heads=6, intermediate_size=768),
    "stories42M": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376),
    "stories110M": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048),
}


def random_model(shape: str, dtype=np.float32, seed: int = 0) -> tuple[ModelConfig, ModelWeights]:
    """A Llama of a named shape with random weights (vocab 32000, context 1024): speed does not
    depend on what the weights are, so this measures exactly what the trained model would."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    s = RANDOM_SHAPES[shape]
    config = ModelConfig(
        architecture="random", vocab_size=32000, num_kv_heads=s["num_heads"], head_dim=s["hidden_size"] // s["num_heads"],
        max_context=1024, rms_norm_eps=1e-5, **s,
    )
    rng = np.random.default_rng(seed)
    hidden, inner = config.hidden_size, config.intermediate_size

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)

    layers = [
        LayerWeights(
            attention_norm=np.ones(hidden, dtype), wq=matrix(hidden, hidden), wk=matrix(hidden, hidden),
            wv=matrix(hidden, hidden), wo=matrix(hidden, hidden), mlp_norm=np.ones(hidden, dtype),
            w_gate=matrix(inner, hidden), w_up=matrix(inner, hidden), w_down=matrix(hidden, inner),
        )
        for _ in range(config.num_layers)
    ]
    weights = ModelWeights(matrix(config.vocab_size, hidden), layers, np.ones(hidden, dtype), matrix(config.vocab_size, hidden))
    return config, weights


def decode_bytes_per_token(llm) -> int:
    """Bytes of weights one decode step reads: every matrix once, in its stored format, except
    that the embedding table gives up only one row (the LM head, even when tied, is read whole).
    On a parallel group, what its slowest path reads: each pipeline stage after the other, the
    tensor-parallel devices of a stage side by side (the one that reads most)."""
    if llm.parallel is None:
        return llm.model.weights.decode_read_bytes
    layout, ledgers = llm.parallel.layout, llm.model.ledgers()
    stages = [ledgers[stage * layout.tp : (stage + 1) * layout.tp] for stage in range(layout.pp)]
    return sum(max(ledger.decode_read_bytes for ledger in stage) for stage in stages)


def clock(llm):
    """The clock a benchmark of `llm` reads: the wall clock, except on simulated devices, whose
    drivers' virtual clocks say how long the devices would have taken (each device's compute
    measured alone on this machine, each transfer on the link model: tinyinfer/parallel/clock.py);
    with several replicas, the latest of their drivers' clocks."""
    group = llm.parallel
    if group is not None and group.simulated:
        drivers = [group.world.clocks[rank] for rank in group.layout.drivers()]
        return lambda: max(driver.now() for driver in drivers)
    return time.perf_counter


def time_prefill(llm, prompt_tokens: int, rng) -> float:
    ids = rng.integers(0, llm.config.vocab_size, prompt_tokens).tolist()
    cache = llm.model.new_kv_cache(prompt_tokens)
    now = clock(llm)
    start = now()
    llm.model.forward(ForwardBatch.build([ids], [cache]))
    return now() - start


def time_decode(llm, new_tokens: int, rng) -> float:
    """new_tokens steps of one token each, starting from an empty cache (as llama-bench's tg)."""
    cache = llm.model.new_kv_cache(new_tokens)
    token = int(rng.integers(0, llm.config.vocab_size))
    now = clock(llm)
    start = now()
    for _ in range(new_tokens):
        logits = llm.model.forward(ForwardBatch.build([[token]], [cache]))
        token = int(np.argmax(logits[0]))
    return now() - start


def decode_side_by_side(llms: dict, rounds: int, new_tokens: int = 64) -> dict:
    """Median decode tokens/s of each named LLM, the LLMs taking turns `rounds` times in this
    process (after a short warm-up each), so that a slow stretch of a shared machine slows them
    all alike: how the A/B scripts in benchmarks/ compare two ways of doing the same work."""
    rng = np.random.default_rng(0)
    for llm in llms.values():
        time_decode(llm, 4, rng)
    speeds = {name: [] for name in llms}
    for _ in range(rounds):
        for name, llm in llms.items():
            speeds[name].append(new_tokens / time_decode(llm, new_tokens, rng))
    return {name: statistics.median(values) for name, values in speeds.items()}


def run_bench(llm, prompt_tokens: int = 128, new_tokens: int = 128, repetitions: int = 5) -> dict:
    """Median tokens/s for pp<prompt_tokens> and tg<new_tokens>, and the decode bound, with
    the share of the weights read per token that the last-level cache can hold (cached_share:
    1 when they all fit; 0 where the cache's size is unknown)."""
    rng = np.random.default_rng(0)
    time_prefill(llm, min(prompt_tokens, 8), rng)  # warm-up: first-touch of the weights
    prefill = [prompt_tokens / time_prefill(llm, prompt_tokens, rng) for _ in range(repetitions)]
    decode = [new_tokens / time_decode(llm, new_tokens, rng) for _ in range(repetitions)]
    bandwidth = read_bandwidth()
    bytes_per_token = decode_bytes_per_token(llm)
    bound = bandwidth / bytes_per_token
    cache = last_level_cache() if llm.ops.name in CPU_BACKENDS else None  # a GPU's own caches are not the CPU's
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "bandwidth_gb_per_s": bandwidth / 1e9,
        "weight_mb_per_token": bytes_per_token / 1e6,
        "decode_bound_tokens_per_s": bound,
        "decode_fraction_of_bound": statistics.median(decode) / bound,
        "last_level_cache": cache,
        "cached_share": min(1.0, cache[1] / bytes_per_token) if cache else 0.0,
    }


CPU_BACKENDS = ("numpy", "numba")  # whose weights go through the CPU's caches


def last_level_cache(cpus: Path = Path("/sys/devices/system/cpu")) -> tuple[int, int] | None:
    """(level, bytes) of the machine's last-level cache, read from Linux's sysfs: the highest
    level of data or unified cache, summed over its instances (two sockets, or a chip of
    several core complexes, have an L3 each, and decode's threads each read their share of
    the weights through their own). None where sysfs does not say (another OS)."""
    instances = {}  # (level, the cpus sharing it) -> bytes
    for index in cpus.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            kind, level = (index / "type").read_text().strip(), int((index / "level").read_text())
            size, shared = (index / "size").read_text().strip(), (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        number = re.fullmatch(r"(\d+)([KMG]?)", size)  # "32768K"
        if kind in ("Data", "Unified") and number:
            instances[level, shared] = int(number[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[number[2]]
    if not instances:
        return None
    top = max(level for level, _ in instances)
    return top, sum(size for (level, _), size in instances.items() if level == top)


def bound_cells(result: dict) -> tuple[str, str]:
    """The bench table's "decode bound tok/s" and "tg / bound" cells of one run_bench result.
    Weights that fit in the last-level cache are not read from memory at all: there is no
    memory bound to show. When at least half of them fit, part of each token is read from the
    cache and decode can pass the bound: it is marked (see CACHE_FOOTNOTE)."""
    bound, fraction, share = (result["decode_bound_tokens_per_s"], result["decode_fraction_of_bound"],
                              result["cached_share"])
    if share >= 1:
        level, size = result["last_level_cache"]
        return f"n/a: fits in L{level} ({size / 2**20:.0f} MiB)", "n/a"
    mark = " *" if share >= 0.5 else ""
    return f"{bound:.1f}{mark}", f"{fraction:.0%}{mark}"


CACHE_FOOTNOTE = ("* at least half of the weights read per token fit in the last-level cache: part of each token is "
                  "read from the cache, not memory, so decode can pass this memory bound")


def run_batch_bench(llm, batch_size: int, prompt_tokens: int = 32, new_tokens: int = 64) -> dict:
    """Serve `batch_size` requests at once through the engine (random prompts of prompt_tokens,
    new_tokens each) and report output tokens/s and the median time per output token.

    Decode reads every weight once per step whatever the batch, so until the arithmetic catches
    up with the memory traffic, B sequences cost little more than one: throughput grows with B
    while each request's time per token stays nearly flat. With dp replicas the requests go
    through their router. On simulated devices the throughput is on the devices' virtual clocks
    (clock()), while each request's own times are wall times of the simulation."""
    from tinyinfer.engine import EngineConfig
    from tinyinfer.sampling import SamplingParams

    blocks_each = -(-(prompt_tokens + new_tokens) // 16)
    engine = llm.new_engine(EngineConfig(block_size=16, num_blocks=batch_size * blocks_each, max_num_seqs=batch_size,
                                         max_num_batched_tokens=max(512, batch_size * prompt_tokens),
                                         prefix_caching=False))  # with dp replicas, their router
    rng = np.random.default_rng(batch_size)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for _ in range(batch_size):
        engine.add_request(rng.integers(0, llm.config.vocab_size, prompt_tokens).tolist(), params)
    outputs = []
    now = clock(llm)
    start = now()
    while engine.has_unfinished():
        outputs += [u.output for u in engine.step() if u.finished]
    elapsed = now() - start
    return {
        "batch_size": batch_size,
        "output_tokens_per_s": batch_size * new_tokens / elapsed,
        "median_time_per_output_token_ms": 1000 * statistics.median(o.time_per_output_token for o in outputs),
        "median_time_to_first_token_ms": 1000 * statistics.median(o.time_to_first_token for o in outputs),
    }


def plot_batch_bench(rows: list[dict], path):
    """Throughput against latency, one line per model/backend, each point a batch size (PNG)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        points = [r for r in rows if r["label"] == label]
        x = [p["median_time_per_output_token_ms"] for p in points]
        y = [p["output_tokens_per_s"] for p in points]
        axes.plot(x, y, "o-", label=label)
        for p, xi, yi in zip(points, x, y):
            axes.annotate(f"B={p['batch_size']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("median time per output token (ms): what each user waits")
    axes.set_ylabel("output tokens/s: what the machine serves")
    axes.set_title("Batching: throughput against latency")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_bench(rows: list[dict], path):
    """Prefill and decode tokens/s of each (model, backend, weights) row side by side, and
    decode as a fraction of its memory-bandwidth bound (PNG)."""
    plt = pyplot()
    labels = [row["label"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, key, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_fraction_of_bound"),
                              ("prefill tokens/s", "decode tokens/s", "decode / its bound")):
        # no memory bound for weights that fit in the cache: no bar
        values = [float("nan") if key == "decode_fraction_of_bound" and row.get("cached_share", 0) >= 1 else row[key]
                  for row in rows]
        ax.barh(range(len(rows)), values, color="tab:blue" if "prefill" in key else "tab:orange")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        if key == "decode_fraction_of_bound":
            ax.axvline(1.0, color="grey", linewidth=1)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)

