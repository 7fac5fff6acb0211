"""Which device does what: ranks laid out as Megatron-LM lays them out.

A world of tp x pp x dp ranks holds dp replicas of the model; each replica is pp pipeline
stages; each stage is tp tensor-parallel devices. Tensor-parallel ranks are innermost
(neighbouring ranks, so the chatty all-reduces stay on the fastest links), then pipeline
stages, then replicas:

    rank = replica * (pp * tp) + stage * tp + tp_rank

With tp=2, pp=2, dp=2: ranks 0,1 are replica 0's first stage, 2,3 its second stage, 4-7 replica
1. Rank replica * pp * tp (tp_rank 0 of the first stage) drives its replica: it runs the
scheduler and samples.
"""

from dataclasses import dataclass

from tinyinfer.parallel.errors import ParallelConfigError


@dataclass(frozen=True)
class RankPosition:
    tp_rank: int  # which slice of each layer's heads and columns
    stage: int  # which range of layers (pipeline stage)
    replica: int  # which copy of the model (data parallelism)


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # tensor-parallel size: devices that split each layer
    pp: int = 1  # pipeline-parallel size: stages, each a range of layers
    dp: int = 1  # data-parallel size: replicas of the whole model

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelConfigError(f"{name} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_size(self) -> int:
        return self.tp * self.pp

    def position(self, rank: int) -> RankPosition:
        return RankPosition(rank % self.tp, rank // self.tp % self.pp, rank // self.replica_size)

    def rank(self, tp_rank: int = 0, stage: int = 0, replica: int = 0) -> int:
        return replica * self.replica_size + stage * self.tp + tp_rank

    def tensor_group(self, rank: int) -> list[int]:
        """The ranks that split the same layers with `rank`: its stage's tp devices."""
        p = self.position(rank)
        return [self.rank(t, p.stage, p.replica) for t in range(self.tp)]

    def pipeline_group(self, rank: int) -> list[int]:
        """The ranks that hold the same slice of every stage's layers, first stage first."""
        p = self.position(rank)
        return [self.rank(p.tp_rank, s, p.replica) for s in range(self.pp)]

    def replica_group(self, rank: int) -> list[int]:
        """Every rank of `rank`'s replica, its driver first."""
        first = self.position(rank).replica * self.replica_size
        return list(range(first, first + self.replica_size))

    def drivers(self) -> list[int]:
        """The driver rank of each replica: the data-parallel router talks to these."""
        return [self.rank(0, 0, r) for r in range(self.dp)]

    def describe(self) -> str:
        return f"tp={self.tp} x pp={self.pp} x dp={self.dp} = {self.world_size} devices"
