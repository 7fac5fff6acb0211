"""Which part of the model each device holds: tensor-parallel slices and pipeline stages.

Tensor parallelism (Megatron-LM) splits every layer over the tp devices of a stage:
- column-parallel: q, k, v (by heads) and gate, up (by MLP columns) keep some rows of
  [out, in]; each device computes its heads' attention and its columns of the MLP, no talking;
- row-parallel: o_proj and down_proj keep the matching columns (input features), so each
  device's product is a partial sum of the full output: one all-reduce adds them up (two a
  layer);
- the embedding and the LM head keep a slice of the vocabulary (rows): each device looks up
  the tokens it has (an all-reduce fills in the rest) and computes its slice of the logits (an
  all-gather puts them side by side).
Norms (and Qwen3's per-head q/k norms) are small and every device keeps them whole.

Grouped-query attention: with fewer KV heads than devices, a KV head cannot be split, so each
device keeps the one KV head its query heads read, and tp / num_kv_heads devices hold copies of
it (their k/v weights and KV cache are that many times what an even split would give). tp
must divide the query heads, and either divide the KV heads or be a multiple of them (as in
vLLM); the error lists the values that work.

Pipeline parallelism gives each stage a range of layers (balanced by default); the first
stage also holds the embedding, the last the final norm and the LM head (with tied
embeddings, its own copy of the embedding's rows).
"""

from dataclasses import replace

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.loading.selection import WeightSelection
from tinyinfer.model.weights import LayerWeights, ModelWeights
from tinyinfer.parallel.errors import ParallelConfigError
from tinyinfer.parallel.layout import ParallelLayout
from tinyinfer.quantize import BLOCK

ROW_BY_HEADS = ("wq", "bq")  # query heads' rows
ROW_BY_KV_HEADS = ("wk", "bk", "wv", "bv")  # key/value heads' rows
ROW_BY_COLUMNS = ("w_gate", "w_up")  # MLP columns' rows
ROW_BY_VOCAB = ("embedding", "lm_head")  # vocabulary rows
COLUMN_BY_HEADS = ("wo",)  # query heads' input columns
COLUMN_BY_COLUMNS = ("w_down",)  # MLP columns' input columns


def split(n: int, parts: int, index: int) -> range:
    """Part `index` of range(n) cut into `parts` contiguous pieces as equal as they can be
    (the first n % parts pieces one longer)."""
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    """The tensor-parallel sizes this model can be split into."""
    return [t for t in range(1, config.num_heads + 1)
            if config.num_heads % t == 0 and (config.num_kv_heads % t == 0 or t % config.num_kv_heads == 0)
            and t <= config.intermediate_size and t <= config.vocab_size]


def check_tensor_parallel(config: ModelConfig, tp: int):
    if tp not in valid_tp_sizes(config):
        raise ParallelConfigError(
            f"tp={tp} does not split this model ({config.num_heads} query heads, {config.num_kv_heads} key/value "
            f"heads): tp must divide the query heads and divide or be a multiple of the key/value heads; "
            f"choose tp in {valid_tp_sizes(config)}")


def stage_layers(num_layers: int, pp: int, pp_layers: list[int] | None = None) -> list[range]:
    """The layers of each pipeline stage: balanced, or `pp_layers` (a count per stage)."""
    if pp > num_layers:
        raise ParallelConfigError(f"pp={pp} stages need at least {pp} layers, and this model has {num_layers}; "
                                  f"choose pp between 1 and {num_layers}")
    if pp_layers is None:
        return [split(num_layers, pp, stage) for stage in range(pp)]
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in pp_layers)
    if not whole or len(pp_layers) != pp or sum(pp_layers) != num_layers or min(pp_layers) < 1:
        raise ParallelConfigError(f"--pp-layers {','.join(map(str, pp_layers))} must give each of the {pp} stages at "
                                  f"least one layer, {num_layers} layers in all (e.g. "
                                  f"{','.join(str(len(r)) for r in stage_layers(num_layers, pp))})")
    starts = np.cumsum([0] + list(pp_layers))
    return [range(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


class ShardPlan(WeightSelection):
    """What one device holds and computes: its layers, heads, MLP columns and vocabulary rows.
    As a WeightSelection it tells the loaders which slices to read."""

    def __init__(self, config: ModelConfig, layout: ParallelLayout, rank: int, pp_layers: list[int] | None = None):
        check_tensor_parallel(config, layout.tp)
        self.config, self.layout = config, layout
        self.position = position = layout.position(rank)
        tp, t = layout.tp, position.tp_rank
        stages = stage_layers(config.num_layers, layout.pp, pp_layers)
        self.layers = stages[position.stage]
        self.embedding = position.stage == 0
        self.head = position.stage == layout.pp - 1
        self.heads = split(config.num_heads, tp, t)  # query heads
        if config.num_kv_heads % tp == 0:
            self.kv_heads = split(config.num_kv_heads, tp, t)
        else:  # fewer KV heads than devices: the one KV head this device's query heads read
            group = config.num_heads // config.num_kv_heads
            kv_head = self.heads.start // group
            self.kv_heads = range(kv_head, kv_head + 1)
        self.kv_copies = max(1, tp // config.num_kv_heads)  # devices holding each KV head
        self.columns = split(config.intermediate_size, tp, t)  # MLP columns
        self.vocab = split(config.vocab_size, tp, t)  # vocabulary rows

    def local_config(self) -> ModelConfig:
        """The shapes this device computes, as a ModelConfig (its layers, heads, MLP columns;
        the vocabulary stays whole, since the logits are gathered)."""
        return replace(self.config, num_layers=len(self.layers), num_heads=len(self.heads),
                       num_kv_heads=len(self.kv_heads), intermediate_size=len(self.columns))

    def pick(self, field: str, array):
        """This device's rows or columns of a stored tensor; norms whole. Columns are copied
        into a contiguous array of their own (only those bytes are read)."""
        if self.layout.tp == 1:
            return array
        head_dim = self.config.head_dim
        if field in ROW_BY_HEADS:
            return array[self.heads.start * head_dim : self.heads.stop * head_dim]
        if field in ROW_BY_KV_HEADS:
            return array[self.kv_heads.start * head_dim : self.kv_heads.stop * head_dim]
        if field in ROW_BY_COLUMNS:
            return array[self.columns.start : self.columns.stop]
        if field in ROW_BY_VOCAB:
            return array[self.vocab.start : self.vocab.stop]
        if field in COLUMN_BY_HEADS:
            return np.ascontiguousarray(array[:, self.heads.start * head_dim : self.heads.stop * head_dim])
        if field in COLUMN_BY_COLUMNS:
            return np.ascontiguousarray(array[:, self.columns.start : self.columns.stop])
        return array

    def describe(self) -> str:
        p, layout = self.position, self.layout
        layers = f"layers {self.layers.start}-{self.layers.stop - 1}"
        parts = [f"stage {p.stage}/{layout.pp} ({layers})"]
        if layout.tp > 1:
            parts.insert(0, f"tp {p.tp_rank}/{layout.tp} (heads {_span(self.heads)}, kv heads {_span(self.kv_heads)}, "
                            f"MLP columns {_span(self.columns)}, vocab {_span(self.vocab)})")
        if layout.dp > 1:
            parts.append(f"replica {p.replica}/{layout.dp}")
        return ", ".join(parts)


def _span(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def check_int8_blocks(config: ModelConfig, tp: int):
    """int8 weights keep one scale per block of 32 input features; a row-parallel matrix
    (o_proj, down_proj), split by input columns, must not cut a block in two. (A matrix whose
    input width is not a multiple of 32 stays float32, on one device too.)"""
    cuts = _cut_blocks(config, tp)
    if cuts:
        name, width, pieces = cuts[0]
        working = [t for t in valid_tp_sizes(config) if not _cut_blocks(config, t)]
        raise ParallelConfigError(
            f"int8 weights with tp={tp}: {name}'s {width} input columns split as "
            f"{', '.join(f'{a}-{b - 1}' for a, b in pieces)} would cut int8 blocks of {BLOCK} across devices; "
            f"choose tp in {working}, or --weights float32 / float16")


def _cut_blocks(config: ModelConfig, tp: int) -> list:
    """(matrix, input width, each device's input columns) for every row-parallel matrix whose
    tp split falls inside an int8 block."""
    cut = []
    for name, units, unit in (("o_proj", config.num_heads, config.head_dim), ("down_proj", config.intermediate_size, 1)):
        width = units * unit
        pieces = [(r.start * unit, r.stop * unit) for r in (split(units, tp, t) for t in range(tp))]
        if width % BLOCK == 0 and any(start % BLOCK or stop % BLOCK for start, stop in pieces):
            cut.append((name, width, pieces))
    return cut


def select_weights(weights: ModelWeights, plan: ShardPlan) -> ModelWeights:
    """A device's part of weights already in memory (a random benchmark model), as the loaders
    read it from a checkpoint."""
    def pick(field, array):
        return None if array is None else plan.pick(field, array)

    layers = [LayerWeights(**{field: pick(field, array) for field, array in vars(weights.layers[i]).items()})
              for i in plan.layers]
    embedding = pick("embedding", weights.embedding) if plan.embedding else None
    tied = weights.lm_head is weights.embedding
    lm_head = final_norm = None
    if plan.head:
        final_norm = weights.final_norm
        lm_head = embedding if tied and embedding is not None else pick("lm_head", weights.lm_head)
    return ModelWeights(embedding, layers, final_norm, lm_head)
