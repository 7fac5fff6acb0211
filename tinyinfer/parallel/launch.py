"""Starting a parallel group: every device loads its own part, then the driver gets an LLM.

`tinyinfer.load(path, tp=2, pp=2)` calls `launch`. Outside mpiexec the devices are simulated:
threads of this process (tinyinfer/parallel/simulated.py). Under mpiexec each process is one
rank (tinyinfer/parallel/mpi.py): rank 0 gets the LLM; every other rank serves its driver until
the driver closes the group, then its process exits (so one script serves every rank).

Each device reads only its part of the checkpoint (its layers, and of each matrix its rows or
columns), quantizes it if asked, puts it on its own backend, and builds the Transformer of its
shard. The driver of each replica gets a ParallelModel over its replica; with dp > 1 the
drivers of the other replicas run their engines behind the router (router.py).
"""

import sys
import threading
import weakref
from dataclasses import dataclass

from tinyinfer.config import ModelConfig
from tinyinfer.loading import load_checkpoint, load_config
from tinyinfer.model.transformer import Transformer
from tinyinfer.ops import get_backend
from tinyinfer.parallel.driver import ParallelModel
from tinyinfer.parallel.errors import ParallelConfigError, ParallelError
from tinyinfer.parallel.layout import ParallelLayout
from tinyinfer.parallel.link import get_link
from tinyinfer.parallel.communicator import DEFAULT_TIMEOUT
from tinyinfer.parallel.mpi import MPIWorld, under_mpiexec
from tinyinfer.parallel.router import REQUESTS, ROUTING, serve_replica
from tinyinfer.parallel.sharding import ShardPlan, check_int8_blocks, check_tensor_parallel, select_weights, stage_layers
from tinyinfer.parallel.simulated import SimulatedWorld
from tinyinfer.parallel.worker import Worker, serve
from tinyinfer.quantize import store_weights
from tinyinfer.threads import check_threads


@dataclass
class ParallelOptions:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    pp_layers: list[int] | None = None  # layers of each stage (default: balanced)
    micro_batches: int | None = None  # a step's sequences split into this many (default: pp)
    link: str = "nvlink"  # the link model of a simulated group: nvlink, pcie, ethernet
    routing: str = "round_robin"  # how the data-parallel router picks a replica: round_robin, least_tokens
    timeout: float = DEFAULT_TIMEOUT  # seconds a device waits for another inside a command
    threads: int | str = "auto"  # each device's CPU threads (tinyinfer/threads.py)
    enforce_eager: bool = False  # each device runs its model op by op, not the backend's compiled form

    def __post_init__(self):
        """What can be checked without the model, checked even when only one device runs (a
        setting that would be silently ignored is a mistake too)."""
        layout = self.layout  # positive integers
        m = self.micro_batches
        if m is not None and not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
            raise ParallelConfigError(f"micro_batches must be a positive integer, got {m!r}")
        if self.pp_layers is not None and (not isinstance(self.pp_layers, (list, tuple))
                                           or len(self.pp_layers) != layout.pp):
            raise ParallelConfigError(f"pp_layers {self.pp_layers!r} must give the layers of each of the {layout.pp} "
                                      "stages (pp), e.g. [6, 6] with pp=2")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ParallelConfigError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.routing not in ROUTING:
            raise ParallelConfigError(f"routing {self.routing!r} is not supported; choose one of {', '.join(ROUTING)}")
        get_link(self.link)
        check_threads(self.threads)
        if not isinstance(self.enforce_eager, bool):
            raise ParallelConfigError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.tp, self.pp, self.dp)

    def wanted(self) -> bool:
        """Whether this load is parallel: more than one device, or started by mpiexec."""
        return self.layout.world_size > 1 or under_mpiexec()


def check_options(config: ModelConfig, options: ParallelOptions, weight_format: str | None):
    """Every mistake of tp, pp and their layers for this model, with what works, before any
    device starts (the rest ParallelOptions checks itself)."""
    layout = options.layout
    check_tensor_parallel(config, layout.tp)
    stage_layers(config.num_layers, layout.pp, options.pp_layers)
    if weight_format == "int8":
        check_int8_blocks(config, layout.tp)


class CheckpointSource:
    """A checkpoint on disk: each device reads its own part of it."""

    def __init__(self, path, dtype, tokenizer=None):
        self.path, self.dtype, self.tokenizer = path, dtype, tokenizer

    def config(self) -> ModelConfig:
        return load_config(self.path)

    def read(self, select):
        return load_checkpoint(self.path, self.dtype, self.tokenizer, select)


class InMemorySource:
    """A model already in memory (a random benchmark model): each device keeps its own part."""

    def __init__(self, config: ModelConfig, weights, tokenizer=None):
        self.model_config, self.weights, self.tokenizer = config, weights, tokenizer

    def config(self) -> ModelConfig:
        return self.model_config

    def read(self, select):
        return self.model_config, select_weights(self.weights, select(self.model_config)), self.tokenizer


class ParallelGroup:
    """The driver's handle on its group: the layout, the world, and closing it all down (on
    close(), when the group is garbage-collected, or when the interpreter exits)."""

    def __init__(self, layout: ParallelLayout, world, model: ParallelModel, data_group, routing: str, threads=()):
        self.layout, self.world, self.model = layout, world, model
        self.data_group, self.routing, self.threads = data_group, routing, list(threads)
        self.router = None  # the DataParallelEngine, once the LLM makes it
        self._closer = weakref.finalize(self, _close_group, model, data_group, self.threads)

    @property
    def simulated(self) -> bool:
        return isinstance(self.world, SimulatedWorld)

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def close(self):
        """Stop every other device (threads end; MPI ranks exit). Safe to call twice."""
        self._closer()


def _close_group(model: ParallelModel, data_group, threads):
    """Stop the other replicas' loops (each then stops its devices), then this replica's."""
    try:
        if data_group is not None:
            for replica in range(1, data_group.size):
                data_group.send(("stop",), replica, REQUESTS)
        model.close()
    except ParallelError:
        pass  # a device has failed: the others have stopped already
    for thread in threads:
        thread.join(timeout=10)


@dataclass
class Device:
    """One device, loaded: its Worker, and what its driver (if it is one) needs besides."""

    config: ModelConfig  # the whole model's
    tokenizer: object
    worker: Worker
    ops: object  # its backend
    data_group: object  # the drivers' communicator (data parallelism), or None


def launch(source, options: ParallelOptions, backend: str, dtype, weight_format: str | None):
    """(config, ParallelModel of replica 0, tokenizer, ParallelGroup), on the driver.
    source: a CheckpointSource or an InMemorySource."""
    layout = options.layout
    if under_mpiexec():
        return _launch_mpi(source, options, backend, dtype, weight_format)
    check_options(source.config(), options, weight_format)
    world = SimulatedWorld(layout.world_size, get_link(options.link), options.timeout)

    def device(rank: int):
        try:
            device = _build_device(source, options, rank, lambda ranks: world.communicator(rank, ranks), backend,
                                   dtype, weight_format)
            _run_device(device, options)
        except ParallelError:
            pass  # another device failed first; its error is the world's
        except BaseException as error:  # noqa: BLE001 - any failure must stop the others
            world.fail(f"device {rank}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=device, args=(rank,), name=f"tinyinfer-device-{rank}", daemon=True)
               for rank in range(1, layout.world_size)]
    for thread in threads:
        thread.start()
    try:
        device_0 = _build_device(source, options, 0, lambda ranks: world.communicator(0, ranks), backend, dtype,
                                 weight_format)
    except ParallelError:
        raise  # another device failed; the world knows already
    except BaseException as error:
        world.fail(f"device 0: {type(error).__name__}: {error}")
        raise
    return _driver_result(device_0, options, threads, world)


def _launch_mpi(source, options: ParallelOptions, backend, dtype, weight_format):
    layout = options.layout
    world = MPIWorld(get_link(options.link), options.timeout)
    try:
        check_options(source.config(), options, weight_format)
        if world.size != layout.world_size:
            raise ParallelConfigError(
                f"mpiexec started {world.size} processes, but {layout.describe()}; start it with "
                f"`mpiexec -n {layout.world_size}`, or give --tp, --pp and --dp whose product is {world.size}")
    except ValueError:
        if world.rank == 0:
            raise  # the user's mistake: rank 0 says it once
        sys.exit(2)
    try:
        device = _build_device(source, options, world.rank, lambda ranks: world.communicator(world.rank, ranks),
                               backend, dtype, weight_format)
        if world.rank != 0:
            _run_device(device, options)
    except Exception as error:  # noqa: BLE001 - one rank's failure ends the job, so nothing hangs
        world.fail(f"{type(error).__name__}: {error}")
    if world.rank != 0:
        sys.exit(0)  # this rank's work is done: its driver has closed the group
    return _driver_result(device, options, (), world)


def _build_device(source, options: ParallelOptions, rank: int, communicator, backend, dtype,
                  weight_format) -> Device:
    """Load this device's part, make its communicators, and build its Worker."""
    layout = options.layout
    config, weights, tokenizer = source.read(lambda config: ShardPlan(config, layout, rank, options.pp_layers))
    plan = ShardPlan(config, layout, rank, options.pp_layers)
    if weight_format is not None:
        weights = store_weights(weights, weight_format)
    # every device makes its groups in the same order (MPI makes a group with all its members)
    tensor = communicator(layout.tensor_group(rank)) if layout.tp > 1 else None
    pipeline = communicator(layout.pipeline_group(rank))
    replica = communicator(layout.replica_group(rank))
    data = communicator(layout.drivers()) if layout.dp > 1 and rank in layout.drivers() else None
    everyone = communicator(range(layout.world_size))
    if rank != 0:  # device 0 compiles the backend's kernels first (Numba), the others then find them cached
        everyone.barrier(wait_forever=True)
    ops = get_backend(backend)
    ops.set_threads(options.threads)
    model = Transformer(plan.local_config(), ops.load_weights(weights), ops, dtype, tensor, plan.vocab.start)
    if not options.enforce_eager:
        model = ops.compile_model(model)
    if rank == 0:
        everyone.barrier(wait_forever=True)
    worker = Worker(plan, model, replica, pipeline, tensor)
    everyone.barrier(wait_forever=True)  # every device has loaded
    return Device(config, tokenizer, worker, ops, data)


def _run_device(device: Device, options: ParallelOptions):
    """What a device other than the router does until the group closes."""
    if device.data_group is None:
        serve(device.worker)
        return
    from tinyinfer.llm import LLM  # the driver of replica 1, 2, ...: an engine behind the router

    model = ParallelModel(device.worker, options.micro_batches or options.pp)
    llm = LLM.on_model(device.config, model, device.tokenizer, device.ops, device.worker.model.dtype, None)
    serve_replica(llm, device.data_group)
    model.close()


def _driver_result(device: Device, options: ParallelOptions, threads, world):
    model = ParallelModel(device.worker, options.micro_batches or options.pp)
    group = ParallelGroup(options.layout, world, model, device.data_group, options.routing, threads)
    return device.config, model, device.tokenizer, group
