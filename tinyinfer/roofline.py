"""Where a forward pass spends its work: the FLOPs and bytes of every op, prefill vs decode.

Prefill multiplies each weight by every prompt token (many FLOPs per byte: compute-bound);
decode multiplies it by one token (about one multiply-add per weight read: memory-bound).
`forward_costs` runs the model once each way with a `CostCounter` in place of its backend and
returns the totals, ready to be placed on a roofline against a machine's peak FLOP/s and
memory bandwidth.
"""

from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer
from tinyinfer.ops.cost import CostCounter, OpCost


def forward_costs(llm, token_ids: list[int]) -> dict[str, dict[str, OpCost]]:
    """Cost of each op in a prefill of `token_ids` and then in one decode step after it:
    {"prefill": {op: OpCost}, "decode": {op: OpCost}}. The model runs for real (on the LLM's
    backend), so the shapes are exactly those of generation."""
    counter = CostCounter(llm.ops)
    model = Transformer(llm.config, llm.model.weights, counter, llm.dtype)
    cache = KVCache(llm.config, len(token_ids) + 1, counter, llm.dtype)  # its attention is counted too
    model.forward(ForwardBatch.build([list(token_ids)], [cache]))
    prefill, counter.totals = counter.totals, {}
    model.forward(ForwardBatch.build([[int(token_ids[-1])]], [cache]))
    return {"prefill": prefill, "decode": counter.totals}


def total(costs: dict[str, OpCost]) -> OpCost:
    """The sum over ops of one phase's costs."""
    return sum(costs.values(), start=OpCost())
