"""Throughput in the style of llama-bench: prefill (pp) and decode (tg) tokens per second.

pp128: one forward pass over a 128-token prompt. tg128: 128 decode steps of one token each,
against a growing KV cache. Each is run several times and the median is reported, because a
shared machine is noisy. Decode reads every weight once per token, so its speed limit is
memory bandwidth: we measure it in the same run and report decode as a fraction of that bound.
Whose memory depends on the backend (memory_bound): on the CPU backends, the CPU's read
bandwidth with every core reading (kernels/bandwidth.py, "CPU read"); on the GPU, the GPU's own
memory, by a device-to-device copy (kernels/gpu_bandwidth.py, "GPU copy", measured once per
process). The bound assumes the weights come from that memory: where they fit in the last-level
cache (the CPU's LLC, or the GPU's L2), decode reads them from there and can pass it, and the
table says so (bound_cells).
"""

import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.kernels.bandwidth import read_bandwidth
from tinyinfer.kernels.gpu_bandwidth import device_memory
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.weights import LayerWeights, ModelWeights
from tinyinfer.plotting import pyplot

# shapes to benchmark without downloading anything: llama2.c's TinyStories models (vocab 32000,
# multi-head attention, an LM head of their own), and Llama 3.2 1B (grouped-query attention with
# 8 KV heads, a 128256-token vocabulary, the LM head tied to the embedding). Keys are
# ModelConfig's; random_model fills in what a shape leaves out (SHAPE_DEFAULTS).
RANDOM_SHAPES = {
    "stories15M": dict(hidden_size=288, num_layers=6, num_heads=6, intermediate_size=768),
    "stories42M": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376),
    "stories110M": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048),
    # meta-llama/Llama-3.2-1B's config.json; its rope_theta, not its long-context rope scaling
    # (which changes no speed): 1.24 B parameters, 4.9 GB in float32
    "llama-3.2-1B": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
}
SHAPE_DEFAULTS = dict(vocab_size=32000, max_context=1024, rms_norm_eps=1e-5)  # and num_kv_heads = num_heads
LARGE_MODEL = 500_000_000  # parameters: random_model says on stderr how long it took to make them


def random_config(shape: str) -> ModelConfig:
    """The ModelConfig of a named shape (no weights: cheap at any size)."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    s = SHAPE_DEFAULTS | RANDOM_SHAPES[shape]
    s.setdefault("num_kv_heads", s["num_heads"])
    s.setdefault("head_dim", s["hidden_size"] // s["num_heads"])
    return ModelConfig(architecture="random", **s)


def random_model(shape: str, dtype=np.float32, seed: int = 0) -> tuple[ModelConfig, ModelWeights]:
    """A Llama of a named shape with random weights (RANDOM_SHAPES): speed does not depend on
    what the weights are, so this measures exactly what the trained model would. The same
    shape and seed give the same weights (benchmarks/torch_peer.py copies them into PyTorch)."""
    config = random_config(shape)
    large = config.num_parameters >= LARGE_MODEL
    if large:
        print(f"making {config.num_parameters / 1e9:.2f} B random parameters ({shape})...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    weights = random_weights(config, dtype, seed)
    if large:
        print(f"made them in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return config, weights


def random_weights(config: ModelConfig, dtype=np.float32, seed: int = 0) -> ModelWeights:
    """Normal weights of standard deviation 0.02, ones for the norms. A small model draws its
    matrices from one stream in a fixed order (the layers, then the embedding, then an untied LM
    head); a large one (LARGE_MODEL parameters or more) gives each matrix a stream of its own
    (SeedSequence.spawn) and draws them on every core, NumPy letting go of the GIL as it fills
    an array: seconds, not half a minute, for the 4.9 GB of Llama-3.2-1B."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer_shapes = {"wq": (q_width, hidden), "wk": (kv_width, hidden), "wv": (kv_width, hidden), "wo": (hidden, q_width),
                    "w_gate": (inner, hidden), "w_up": (inner, hidden), "w_down": (hidden, inner)}
    shapes = [shape for _ in range(config.num_layers) for shape in layer_shapes.values()]
    shapes += [(config.vocab_size, hidden)] * (1 if config.tie_word_embeddings else 2)  # embedding, LM head

    def matrix(rng, shape):
        m = rng.standard_normal(shape, dtype=np.float32)
        m *= 0.02  # in place: a model of 1 B parameters has no memory or time to spare for copies
        return m.astype(dtype, copy=False)

    if config.num_parameters < LARGE_MODEL:
        rng = np.random.default_rng(seed)
        matrices = [matrix(rng, shape) for shape in shapes]
    else:
        streams = np.random.SeedSequence(seed).spawn(len(shapes))
        with ThreadPoolExecutor() as pool:
            matrices = list(pool.map(lambda args: matrix(np.random.default_rng(args[0]), args[1]), zip(streams, shapes)))
    layers = []
    for i in range(config.num_layers):
        drawn = dict(zip(layer_shapes, matrices[i * len(layer_shapes) : (i + 1) * len(layer_shapes)]))
        layers.append(LayerWeights(attention_norm=np.ones(hidden, dtype), mlp_norm=np.ones(hidden, dtype), **drawn))
    embedding = matrices[config.num_layers * len(layer_shapes)]
    lm_head = embedding if config.tie_word_embeddings else matrices[-1]
    return ModelWeights(embedding, layers, np.ones(hidden, dtype), lm_head)


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


def time_decode(llm, new_tokens: int, rng, cache=None) -> float:
    """new_tokens steps of one token each, starting from an empty cache (as llama-bench's tg):
    a new one, or `cache` emptied (a model that runs CUDA graphs keeps the graphs it captured on
    a cache only while the cache stays where it is)."""
    if cache is None:
        cache = llm.model.new_kv_cache(new_tokens)
    else:
        cache.truncate(0)
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
    """Median tokens/s for pp<prompt_tokens> and tg<new_tokens>, and the decode bound (from
    memory_bound: bandwidth_source says whose), with the share of the weights read per token
    that the last-level cache can hold (cached_share: 1 when they all fit; 0 where the cache's
    size is unknown), and whether the model ran as CUDA graphs (cuda_graphs)."""
    rng = np.random.default_rng(0)
    time_prefill(llm, min(prompt_tokens, 8), rng)  # warm-up: first-touch of the weights
    prefill = [prompt_tokens / time_prefill(llm, prompt_tokens, rng) for _ in range(repetitions)]
    kv_cache = None
    if cuda_graphs(llm):  # capture the decode step's graph now, on the cache every run then reuses
        kv_cache = llm.model.new_kv_cache(new_tokens)
        time_decode(llm, 2, np.random.default_rng(1), kv_cache)
    decode = [new_tokens / time_decode(llm, new_tokens, rng, kv_cache) for _ in range(repetitions)]
    bandwidth, source, cache = memory_bound(llm)  # cache: the last-level cache, (level, bytes) or None
    bytes_per_token = decode_bytes_per_token(llm)
    bound = bandwidth / bytes_per_token
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "bandwidth_gb_per_s": bandwidth / 1e9,
        "bandwidth_source": source,
        "cuda_graphs": cuda_graphs(llm),
        "weight_mb_per_token": bytes_per_token / 1e6,
        "decode_bound_tokens_per_s": bound,
        "decode_fraction_of_bound": statistics.median(decode) / bound,
        "last_level_cache": cache,
        "cached_share": min(1.0, cache[1] / bytes_per_token) if cache else 0.0,
    }


def memory_bound(llm) -> tuple[float, str, tuple[int, int] | None]:
    """(bytes/s, where that figure comes from, the last-level cache as (level, bytes) or None)
    for the memory that `llm`'s decode reads its weights from. A GPU backend reads them from the
    GPU's memory: its copy bandwidth and its L2 (gpu_memory). The CPU backends read them from
    DRAM through the CPU's caches: the read bandwidth of every core, and the CPU's last-level
    cache (another backend's weights do not go through the CPU's caches: no cache)."""
    if llm.ops.name in GPU_BACKENDS:
        gpu = gpu_memory(llm.ops)
        return gpu.bandwidth, f"GPU copy, {gpu.name}", (2, gpu.l2_bytes) if gpu.l2_bytes else None
    cache = last_level_cache() if llm.ops.name in CPU_BACKENDS else None
    return read_bandwidth(), "CPU read", cache


_GPU_MEMORY = {}  # device id -> DeviceMemory: the copy probe takes a second, once per process


def gpu_memory(ops):
    """The backend's GPU (DeviceMemory: name, copy bandwidth, L2), probed on first use."""
    cp = getattr(ops, "cp", None)
    if cp is None:
        from tinyinfer.kernels.cupy_backend import import_cupy

        cp = import_cupy()
    device = cp.cuda.Device().id
    if device not in _GPU_MEMORY:
        _GPU_MEMORY[device] = device_memory(cp)
    return _GPU_MEMORY[device]


def cuda_graphs(llm) -> bool:
    """Whether the model runs its decode steps as CUDA graphs: what the model object says it
    does (the CuPy backend's compiled model carries cuda_graphs = True; --enforce-eager, or any
    other backend, runs op by op)."""
    return bool(getattr(llm.model, "cuda_graphs", False))


def bound_source_cells(result: dict, backend: str) -> tuple[str, str]:
    """The "bound from" and "CUDA graphs" cells of a bench row, shown when a GPU is in the table:
    where the bandwidth came from, and, on a GPU, whether the decode steps ran as CUDA graphs."""
    return result["bandwidth_source"], graphs_cell(result, backend)


def graphs_cell(result: dict, backend: str) -> str:
    """A row's "CUDA graphs" cell: "on" or "off" on a GPU, "-" on a CPU backend (no such thing)."""
    if backend not in GPU_BACKENDS:
        return "-"
    return "on" if result["cuda_graphs"] else "off"


CPU_BACKENDS = ("numpy", "numba")  # whose weights go through the CPU's caches
GPU_BACKENDS = ("cupy",)  # whose weights are in the GPU's memory, behind its L2


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
    (clock()), while each request's own times are wall times of the simulation.

    cuda_graphs: whether the model says it runs its decode steps as CUDA graphs (cuda_graphs());
    such a model first serves batch_size requests of 2 tokens on the same engine, untimed, so
    that the graph of a step of batch_size sequences is captured on the engine's KV pool before
    the clock starts (as a server's first requests would)."""
    from tinyinfer.engine import EngineConfig
    from tinyinfer.sampling import SamplingParams

    blocks_each = -(-(prompt_tokens + new_tokens) // 16)
    engine = llm.new_engine(EngineConfig(block_size=16, num_blocks=batch_size * blocks_each, max_num_seqs=batch_size,
                                         max_num_batched_tokens=max(512, batch_size * prompt_tokens),
                                         prefix_caching=False))  # with dp replicas, their router
    if cuda_graphs(llm):  # capture the step of batch_size sequences on this engine's KV pool, untimed
        warm_up = np.random.default_rng(-batch_size % 2**32)
        for _ in range(batch_size):
            engine.add_request(warm_up.integers(0, llm.config.vocab_size, prompt_tokens).tolist(),
                               SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
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
        "cuda_graphs": cuda_graphs(llm),
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

