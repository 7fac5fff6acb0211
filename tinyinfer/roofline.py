"""Where a forward pass spends its work: the FLOPs and bytes of every op, prefill vs decode.

Prefill multiplies each weight by every prompt token (many FLOPs per byte: compute-bound);
decode multiplies it by one token (about one multiply-add per weight read: memory-bound).
`forward_costs` runs the model once each way with a `CostCounter` in place of its backend and
returns the totals, ready to be placed on a roofline against a machine's peak FLOP/s and
memory bandwidth: a `Roofline` (presets for some GPUs, or `this_machine()`, measured).
"""

from dataclasses import dataclass

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


# ---- a device's roofline: its peak FLOP/s and memory bandwidth -------------------------------
@dataclass(frozen=True)
class Roofline:
    """A device's two limits. An op that moves `bytes` and does `flops` takes at least
    max(flops / peak_flops, bytes / bandwidth): below the balance point peak_flops / bandwidth
    FLOPs per byte it waits on memory (decode), above it on arithmetic (prefill)."""

    name: str
    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s

    def seconds(self, cost: OpCost) -> float:
        return max(cost.flops / self.peak_flops, cost.bytes / self.bandwidth)

    def bound(self, cost: OpCost) -> str:
        return "compute" if cost.flops / self.peak_flops > cost.bytes / self.bandwidth else "memory"


# datasheet peaks (dense, no sparsity): 16-bit tensor-core FLOP/s and HBM bandwidth
ROOFLINES = {
    "h100": Roofline("H100 SXM (bf16 tensor cores)", 989e12, 3.35e12),
    "h200": Roofline("H200 SXM (bf16 tensor cores)", 989e12, 4.8e12),
    "a100": Roofline("A100 SXM 80GB (bf16 tensor cores)", 312e12, 2.04e12),
}


def this_machine() -> Roofline:
    """This machine's roofline, measured: read bandwidth with every core (kernels/bandwidth.py)
    and float32 FLOP/s of a 1024 x 1024 x 1024 NumPy (BLAS) matrix product, the best of 20
    (a shared machine slows some of them; the best is the closest to what it can do)."""
    import time

    import numpy as np

    from tinyinfer.kernels.bandwidth import read_bandwidth

    a = np.ones((1024, 1024), np.float32)
    a @ a
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return Roofline("this machine (measured, float32)", 2 * 1024**3 / best, read_bandwidth())
