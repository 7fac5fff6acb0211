"""`tinyinfer plan`: what a tp x pp layout puts on each device, what crosses each link, and how
long a step takes, worked out from the model's config alone. No weight is read, so it plans
models far too big for this machine (a Llama-3-8B config.json is enough).

For each device of a replica (Megatron's layout, tinyinfer/parallel/layout.py):
- its weight bytes: its shard (tinyinfer/parallel/sharding.py) in the chosen storage, plus the
  norms every device keeps whole; exactly what its ledger counts once it is loaded;
- its KV bytes per token of context: its layers times its KV heads (copies included when
  there are fewer KV heads than tensor-parallel devices);
- the bytes it sends in a forward pass, by kind of transfer, exactly as the devices do them
  (tinyinfer/parallel/worker.py) and as the ledger counts them (link.bytes_per_device);
- the modelled time of a step: each op of each device on the device's roofline
  (tinyinfer/roofline.py: max(FLOPs / peak, bytes / bandwidth), op by op, with the op costs of
  tinyinfer/ops/cost.py), each transfer on the link model, micro-batches through the stages as
  GPipe runs them; and what bounds it: compute, memory, the links, or the pipeline's idle time.
"""

from dataclasses import dataclass

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.ops import cost
from tinyinfer.parallel.layout import ParallelLayout
from tinyinfer.parallel.link import Link, bytes_per_device
from tinyinfer.parallel.sharding import ShardPlan, check_int8_blocks, split, stage_layers
from tinyinfer.quantize import BLOCK
from tinyinfer.roofline import Roofline


class ArraySpec:
    """An array that is never made, standing in for one in the cost formulas of ops/cost.py:
    its shape, dtype and bytes (an int8 matrix's bytes include its scales)."""

    def __init__(self, shape, dtype, nbytes: int | None = None):
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize if nbytes is None else int(nbytes)

    def __len__(self):
        return self.shape[0]


def stored_matrix(rows: int, cols: int, weight_format: str | None, dtype) -> ArraySpec:
    """A [rows, cols] weight as quantize.store_matrix keeps it: float16; int8 blocks of 32 with
    a float32 scale each (when cols is a multiple of 32); otherwise the compute dtype."""
    if weight_format == "float16":
        return ArraySpec((rows, cols), np.float16)
    if weight_format == "int8" and cols % BLOCK == 0:
        return ArraySpec((rows, cols), np.int8, rows * cols + rows * (cols // BLOCK) * 4)
    return ArraySpec((rows, cols), dtype)


@dataclass
class DevicePlan:
    rank: int
    shard: ShardPlan
    weight_bytes: int
    kv_bytes_per_token: int


@dataclass
class StepTime:
    seconds: float  # the step, end to end
    compute: float  # on the busiest device: its ops bound by arithmetic ...
    memory: float  # ... its ops bound by memory bandwidth ...
    link: float  # ... and its transfers
    idle: float  # the busiest device's time waiting on the pipeline (fill and drain)

    @property
    def bound(self) -> str:
        parts = {"compute": self.compute, "memory bandwidth": self.memory, "the links": self.link,
                 "pipeline idle time": self.idle}
        return max(parts, key=parts.get)


class ParallelPlan:
    def __init__(self, config: ModelConfig, layout: ParallelLayout, link: Link, roofline: Roofline,
                 weight_format: str | None = None, dtype=np.float32, pp_layers: list[int] | None = None):
        self.config, self.layout, self.link, self.roofline = config, layout, link, roofline
        self.weight_format, self.dtype = weight_format, np.dtype(dtype)
        stage_layers(config.num_layers, layout.pp, pp_layers)  # the same errors as a real load
        if weight_format == "int8":
            check_int8_blocks(config, layout.tp)
        self.devices = []
        for rank in range(layout.replica_size):  # every replica is the same
            shard = ShardPlan(config, layout, rank, pp_layers)
            self.devices.append(DevicePlan(rank, shard, self._weight_bytes(shard), self._kv_bytes_per_token(shard)))

    # ---- what each device holds ----------------------------------------------------------------
    def _matrix(self, rows, cols) -> ArraySpec:
        return stored_matrix(rows, cols, self.weight_format, self.dtype)

    def _layer_matrices(self, shard: ShardPlan) -> dict[str, ArraySpec]:
        c = shard.local_config()
        q, kv, hidden = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size
        return {"wq": self._matrix(q, hidden), "wk": self._matrix(kv, hidden), "wv": self._matrix(kv, hidden),
                "wo": self._matrix(hidden, q), "w_gate": self._matrix(c.intermediate_size, hidden),
                "w_up": self._matrix(c.intermediate_size, hidden), "w_down": self._matrix(hidden, c.intermediate_size)}

    def _weight_bytes(self, shard: ShardPlan) -> int:
        c, item = shard.local_config(), self.dtype.itemsize
        vectors = 2 * c.hidden_size  # the two norms
        if c.attention_bias:
            vectors += (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        if c.qk_norm:
            vectors += 2 * c.head_dim
        per_layer = vectors * item + sum(m.nbytes for m in self._layer_matrices(shard).values())
        total = per_layer * c.num_layers
        vocab_rows = len(shard.vocab)
        if shard.embedding:
            total += vocab_rows * c.hidden_size * item
        if shard.head:
            total += c.hidden_size * item  # final norm
            # a tied head stays the embedding itself unless it is stored differently or lives elsewhere
            shared = c.tie_word_embeddings and shard.embedding and self.weight_format in (None, "float32")
            if not shared:
                total += self._matrix(vocab_rows, c.hidden_size).nbytes
        return total

    def _kv_bytes_per_token(self, shard: ShardPlan) -> int:
        c = shard.local_config()
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    # ---- what each device sends --------------------------------------------------------------
    def forward_transfers(self, new_tokens: list[int], micro_batches: int = 1, all_logits: bool = False,
                          blocks_per_sequence: list[int] | None = None) -> list[dict[str, int]]:
        """Bytes each device of the replica sends (recv: receives) in one forward pass, by kind,
        as its ledger counts them. new_tokens: each sequence's new tokens (a prefill chunk, or 1
        in decode); blocks_per_sequence: each sequence's block table length (the engine's paged
        cache) or None (contiguous caches)."""
        layout, c, item = self.layout, self.config, self.dtype.itemsize
        sequences, tokens = len(new_tokens), sum(new_tokens)
        m = min(micro_batches, sequences)
        # the driver's Step: token ids and positions, num_new, block tables or cache ids (int64)
        tables = sequences * max(blocks_per_sequence) if blocks_per_sequence else sequences
        step_bytes = 8 * (2 * tokens + sequences + tables)
        rows_total = tokens if all_logits else sequences
        result = []
        for device in self.devices:
            shard, sent = device.shard, {}

            def add(kind, buffer_bytes, devices):
                if devices > 1:  # a recv counts what the matching send moves
                    moved = bytes_per_device("send" if kind == "recv" else kind, buffer_bytes, devices)
                    sent[kind] = sent.get(kind, 0) + moved

            add("broadcast", step_bytes, layout.replica_size)
            for index in range(m):
                chosen = split(sequences, m, index)
                batch_tokens = sum(new_tokens[s] for s in chosen)
                rows = batch_tokens if all_logits else len(chosen)
                activations = batch_tokens * c.hidden_size * item
                if shard.embedding:
                    add("all_reduce", activations, layout.tp)
                for _ in shard.layers:
                    add("all_reduce", activations, layout.tp)
                    add("all_reduce", activations, layout.tp)
                if shard.head:
                    add("all_gather", rows * c.vocab_size * item, layout.tp)
                else:
                    add("send", activations, 2)
                if not shard.embedding:
                    add("recv", activations, 2)
            if layout.pp > 1 and shard.head and shard.position.tp_rank == 0:
                add("send", rows_total * c.vocab_size * 4, 2)  # float32 logits to the driver
            if layout.pp > 1 and device.rank == 0:
                add("recv", rows_total * c.vocab_size * 4, 2)
            result.append(sent)
        return result

    # ---- how long a step takes ---------------------------------------------------------------
    def _micro_batch_costs(self, shard: ShardPlan, chunks: list[tuple[int, int]], all_logits: bool):
        """(memory-bound seconds, compute-bound seconds, link seconds) of one device for one
        micro-batch whose sequences have (start, new_tokens) chunks."""
        c, dtype, tp = shard.local_config(), self.dtype, self.layout.tp
        tokens = sum(new for _, new in chunks)
        hidden, hd = c.hidden_size, c.head_dim
        q_width, kv_width = c.num_heads * hd, c.num_kv_heads * hd
        x, norm = ArraySpec((tokens, hidden), dtype), ArraySpec((hidden,), dtype)
        matrices = self._layer_matrices(shard)
        angles = ArraySpec((tokens, hd // 2), dtype)
        bias = (lambda width: ArraySpec((width,), dtype)) if c.attention_bias else (lambda width: None)
        ops = []
        if shard.embedding:
            ops.append(cost.embedding_cost(ArraySpec((tokens,), np.int64), ArraySpec((len(shard.vocab), hidden), dtype)))
        layer = [cost.rms_norm_cost(x, norm, 0),
                 cost.matmul_cost(x, matrices["wq"], bias(q_width)),
                 cost.matmul_cost(x, matrices["wk"], bias(kv_width)),
                 cost.matmul_cost(x, matrices["wv"], bias(kv_width)),
                 cost.rotary_cost(ArraySpec((tokens, c.num_heads, hd), dtype), angles, angles),
                 cost.rotary_cost(ArraySpec((tokens, c.num_kv_heads, hd), dtype), angles, angles),
                 cost.matmul_cost(ArraySpec((tokens, q_width), dtype), matrices["wo"]),
                 cost.rms_norm_cost(x, norm, 0),
                 cost.matmul_cost(x, matrices["w_gate"]), cost.matmul_cost(x, matrices["w_up"]),
                 cost.silu_mul_cost(ArraySpec((tokens, c.intermediate_size), dtype),
                                    ArraySpec((tokens, c.intermediate_size), dtype)),
                 cost.matmul_cost(ArraySpec((tokens, c.intermediate_size), dtype), matrices["w_down"])]
        if c.qk_norm:
            layer += [cost.rms_norm_cost(ArraySpec((tokens, c.num_heads, hd), dtype), ArraySpec((hd,), dtype), 0),
                      cost.rms_norm_cost(ArraySpec((tokens, c.num_kv_heads, hd), dtype), ArraySpec((hd,), dtype), 0)]
        for start, new in chunks:
            past = ArraySpec((start + new, c.num_kv_heads, hd), dtype)
            layer.append(cost.attention_cost(ArraySpec((new, c.num_heads, hd), dtype), past, past, start))
        ops += layer * c.num_layers
        rows = tokens if all_logits else len(chunks)
        if shard.head:
            lm_head = self._matrix(len(shard.vocab), hidden)
            ops += [cost.rms_norm_cost(ArraySpec((rows, hidden), dtype), norm, 0),
                    cost.matmul_cost(ArraySpec((rows, hidden), dtype), lm_head)]
        memory = sum(self.roofline.seconds(op) for op in ops if self.roofline.bound(op) == "memory")
        compute = sum(self.roofline.seconds(op) for op in ops if self.roofline.bound(op) == "compute")
        activations = tokens * hidden * dtype.itemsize
        reduces = (2 * c.num_layers + shard.embedding) if tp > 1 else 0
        link = reduces * self.link.seconds("all_reduce", activations, tp)
        if shard.head and tp > 1:
            link += self.link.seconds("all_gather", rows * self.config.vocab_size * dtype.itemsize, tp)
        return memory, compute, link

    def step_time(self, chunks: list[tuple[int, int]], micro_batches: int = 1, all_logits: bool = False) -> StepTime:
        """The modelled time of one forward pass over sequences with (start, new_tokens) chunks,
        split into micro-batches that flow through the stages as GPipe runs them: a stage
        starts micro-batch i when it has finished i - 1 and the stage before has sent it i."""
        layout, c, item = self.layout, self.config, self.dtype.itemsize
        m = min(micro_batches, len(chunks))
        stages = [self.devices[s * layout.tp] for s in range(layout.pp)]  # tp rank 0 of each stage
        parts = [[self._micro_batch_costs(d.shard, [chunks[i] for i in split(len(chunks), m, b)], all_logits)
                  for b in range(m)] for d in stages]
        finish = np.zeros((layout.pp, m))
        for s in range(layout.pp):
            for b in range(m):
                busy = sum(parts[s][b])
                tokens = sum(chunks[i][1] for i in split(len(chunks), m, b))
                ready = 0.0 if s == 0 else finish[s - 1, b] + self.link.seconds("send", tokens * c.hidden_size * item, 2)
                finish[s, b] = max(finish[s, b - 1] if b else 0.0, ready) + busy
        total = finish[-1, -1]
        if layout.pp > 1:
            rows = sum(n for _, n in chunks) if all_logits else len(chunks)
            total += self.link.seconds("send", rows * c.vocab_size * 4, 2)
        busiest = max(range(layout.pp), key=lambda s: sum(sum(p) for p in parts[s]))
        memory, compute, link = (sum(p[k] for p in parts[busiest]) for k in range(3))
        return StepTime(total, compute, memory, link, total - (memory + compute + link))


def format_plan(plan: ParallelPlan, prompt_tokens: int = 512, batch: int = 1, context: int = 512,
                micro_batches: int | None = None) -> str:
    """The `tinyinfer plan` report: a table of devices, then the modelled prefill and decode."""
    c, layout = plan.config, plan.layout
    m = micro_batches or layout.pp
    lines = [
        f"{c.architecture}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} query / {c.num_kv_heads} "
        f"key/value heads of {c.head_dim}, MLP {c.intermediate_size}, vocab {c.vocab_size}",
        f"{layout.describe()}; weights {plan.weight_format or plan.dtype.name}, compute {plan.dtype.name}; link "
        f"{plan.link.name} ({plan.link.bandwidth / 1e9:g} GB/s, {plan.link.latency * 1e6:g} µs); device "
        f"{plan.roofline.name} ({plan.roofline.peak_flops / 1e12:.3g} TFLOP/s, {plan.roofline.bandwidth / 1e9:.4g} GB/s)",
        "",
        f"| device | holds | weights | KV per token | sends per prefill token | sends per decode step (batch {batch}) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    prefill = plan.forward_transfers([prompt_tokens])
    decode = plan.forward_transfers([1] * batch, micro_batches=m)
    for device, pre, dec in zip(plan.devices, prefill, decode):
        sends = lambda kinds: sum(v for k, v in kinds.items() if k != "recv")  # noqa: E731
        lines.append(f"| {device.rank} | {device.shard.describe()} | {_size(device.weight_bytes)} | "
                     f"{_size(device.kv_bytes_per_token)} | {_size(sends(pre) / prompt_tokens)} | {_size(sends(dec))} |")
    copies = plan.devices[0].shard.kv_copies
    if copies > 1:
        lines.append(f"\n{c.num_kv_heads} KV heads over tp={layout.tp}: each KV head (its k/v weights and cache) is "
                     f"kept by {copies} devices, {copies}x the KV memory of an even split.")
    if layout.dp > 1:
        lines.append(f"\nx {layout.dp} replicas: each device of every replica holds the same; replicas exchange only "
                     "requests and results.")
    prefill_time = plan.step_time([(0, prompt_tokens)])
    decode_time = plan.step_time([(context, 1)] * batch, micro_batches=m)
    lines += ["", _describe_step(f"prefill of {prompt_tokens} tokens", prefill_time),
              _describe_step(f"decode step, batch {batch} at context {context}, {min(m, batch)} micro-batch"
                             f"{'es' if min(m, batch) > 1 else ''}", decode_time)]
    return "\n".join(lines)


def _describe_step(title: str, t: StepTime) -> str:
    return (f"{title}: {t.seconds * 1e3:.3g} ms, bound by {t.bound} (busiest device: compute "
            f"{t.compute * 1e3:.3g} ms, memory {t.memory * 1e3:.3g} ms, links {t.link * 1e3:.3g} ms, pipeline idle "
            f"{t.idle * 1e3:.3g} ms)")


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"
