"""Tensor, pipeline and data parallelism on simulated devices or real MPI processes.

    llm = tinyinfer.load(path, tp=2, pp=2)          # 4 simulated devices in this process
    mpiexec -n 4 tinyinfer generate --tp 2 --pp 2 "ROMEO."   # 4 processes

layout.py (which rank does what), sharding.py (what each device holds), communicator.py (the
calls devices talk with) with simulated.py and mpi.py, clock.py and ledger.py (what each device
computes, sends and holds, and when), link.py (the link model), worker.py (one device), driver.py
(the model as the engine sees it), router.py (data-parallel replicas), launch.py (starting a
group).
"""

from tinyinfer.parallel.errors import ParallelConfigError, ParallelError
from tinyinfer.parallel.launch import ParallelOptions
from tinyinfer.parallel.layout import ParallelLayout

__all__ = ["ParallelOptions", "ParallelLayout", "ParallelConfigError", "ParallelError"]
