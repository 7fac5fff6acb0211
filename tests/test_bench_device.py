"""tinyinfer bench on a GPU, tested without one: whose memory bounds decode, the CUDA-graphs
column, the Llama-3.2-1B shape, the PyTorch peer, and the GPU machine's script.

A GPU row's decode is bounded by the GPU's own memory (kernels/gpu_bandwidth.py: a
device-to-device copy timed by CUDA events) and its L2, never by the CPU's read bandwidth. Here a
stand-in for the `cupy` module plays the GPU for the probe, and a NumPy backend that calls itself
"cupy" (and says its model runs as CUDA graphs, as the CuPy backend's compiled model does) plays
it for bench. The 1B shape's weights (4.9 GB in float32) are never made here: its config is
checked, and random_model's per-shape vocabulary and KV heads on a small stand-in shape.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinyinfer import bench, cli
from tinyinfer.cli import main
from tinyinfer.kernels import gpu_bandwidth
from tinyinfer.kernels.gpu_bandwidth import DeviceMemory
from tinyinfer.llm import LLM
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.ops import get_backend
from tinyinfer.ops.numpy_backend import NumpyBackend

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


# ---- the copy probe, on a stand-in for the cupy module -----------------------------------------
class FakeArray:
    def __init__(self, cp, size, dtype):
        self.cp, self.size, self.nbytes = cp, size, size * np.dtype(dtype).itemsize
        self.data = SimpleNamespace(copy_from_device_async=self.memcpy)

    def memcpy(self, src, nbytes):
        self.cp.run("memcpy", nbytes)


class FakeEvent:
    def __init__(self, cp):
        self.cp = cp

    def record(self):
        self.at = len(self.cp.copies)

    def synchronize(self):
        pass


class FakeCupy:
    """What kernels/gpu_bandwidth.py touches of cupy. Each copy takes the next of its method's
    `milliseconds`; an event notes how many copies had run when it was recorded."""

    complex128 = np.complex128

    def __init__(self, free_bytes, milliseconds, props=None, attributes=None):
        self.free_bytes, self.milliseconds = free_bytes, {k: list(v) for k, v in milliseconds.items()}
        self.copies, self.freed = [], False
        device = SimpleNamespace(id=0, mem_info=(free_bytes, 4 * free_bytes), attributes=attributes or {})
        props = props or {"name": b"NVIDIA H200", "l2CacheSize": 60 * MiB, "totalGlobalMem": 140 * 2**30}
        self.cuda = SimpleNamespace(
            Device=lambda: device, Event=lambda: FakeEvent(self),
            runtime=SimpleNamespace(getDeviceProperties=lambda i: props), get_elapsed_time=self.elapsed,
        )

    def run(self, method, nbytes):
        self.copies.append((method, nbytes, self.milliseconds[method].pop(0)))

    def ones(self, size, dtype):
        return FakeArray(self, size, dtype)

    def empty_like(self, a):
        return FakeArray(self, a.size, np.complex128)

    def copyto(self, dst, src):
        assert dst is not src and dst.nbytes == src.nbytes
        self.run("kernel", src.nbytes)

    def elapsed(self, start, end):
        assert end.at == start.at + 1, "one copy between the events"
        return self.copies[start.at][2]

    def get_default_memory_pool(self):
        return SimpleNamespace(free_all_blocks=lambda: setattr(self, "freed", True))


def test_the_copy_probe_counts_each_byte_read_and_written_and_takes_the_fastest_copy():
    # warm-up first (slow, not timed), then 3 timed copies of each method; the kernel's 0.4 ms is the best
    cp = FakeCupy(64 * 2**30, {"memcpy": [9.0, 0.6, 0.5, 0.7], "kernel": [9.0, 0.45, 0.4, 0.9]})
    bandwidth = gpu_bandwidth.copy_bandwidth(cp, repeats=3)
    assert [(m, n) for m, n, _ in cp.copies] == [("memcpy", 2**30)] * 4 + [("kernel", 2**30)] * 4
    assert bandwidth == pytest.approx(2 * 2**30 / 0.4e-3)
    assert cp.freed  # the probe's 2 GiB go back before the model needs them


def test_the_probe_takes_at_most_half_the_free_memory():
    assert gpu_bandwidth.probe_bytes(64 * 2**30) == 2**30
    assert gpu_bandwidth.probe_bytes(1000 * MiB) == 250 * MiB  # two buffers of a quarter each
    assert gpu_bandwidth.probe_bytes(MiB) == gpu_bandwidth.MIN_BYTES
    cp = FakeCupy(400 * MiB, {"memcpy": [1.0] * 11, "kernel": [1.0] * 11})
    assert gpu_bandwidth.copy_bandwidth(cp) == pytest.approx(2 * 100 * MiB / 1e-3)
    assert {n for _, n, _ in cp.copies} == {100 * MiB} and len(cp.copies) == 22  # warm-up + 10, twice


def test_the_device_is_named_and_its_l2_read_from_its_properties():
    cp = FakeCupy(64 * 2**30, {"memcpy": [0.5] * 11, "kernel": [0.5] * 11})
    memory = gpu_bandwidth.device_memory(cp)
    assert memory == DeviceMemory("NVIDIA H200", 2 * 2**30 / 0.5e-3, 60 * MiB, 140 * 2**30)
    # a device whose properties lack the L2 size: the device attribute's
    cp = FakeCupy(MiB, {}, props={"name": b"GPU X\x00", "totalGlobalMem": 1}, attributes={"L2CacheSize": 4 * MiB})
    assert gpu_bandwidth.device_properties(cp) == {"name": "GPU X", "l2_bytes": 4 * MiB, "memory_bytes": 1}


# ---- bench: the bound of a GPU row, and its CUDA graphs --------------------------------------------
class GpuLike(NumpyBackend):
    """NumPy's ops under the CuPy backend's name; its compiled model says it runs as CUDA graphs."""

    name = "cupy"
    cp = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(id=0)))  # what gpu_memory asks of it

    def compile_model(self, model):
        model.cuda_graphs = True
        return model


@pytest.fixture
def gpu_bench(monkeypatch):
    """bench with "cupy" played by GpuLike on a GPU of 4000 GB/s and a 128 MiB L2, the CPU at
    20 GB/s with a tiny last-level cache; the GPU probes made are listed in the fixture's value."""
    probes = []

    def probe(cp):
        probes.append(cp)
        return DeviceMemory("Fake H200", 4000e9, 128 * MiB, 141 * 2**30)

    monkeypatch.setattr(cli, "get_backend", lambda name: GpuLike() if name == "cupy" else get_backend(name))
    monkeypatch.setattr(bench, "device_memory", probe)
    monkeypatch.setattr(bench, "_GPU_MEMORY", {})
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 20e9)
    monkeypatch.setattr(bench, "last_level_cache", lambda: (3, 1024))
    return probes


def table(out: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return cells[0], [dict(zip(cells[0], row)) for row in cells[2:]]


BENCH = ["bench", "--random", "stories15M", "-p", "4", "-n", "2", "-r", "1"]


def test_a_gpu_row_is_bounded_by_the_gpu_copy_and_its_l2_a_cpu_row_by_the_cpu_read(gpu_bench, capsys):
    assert main([*BENCH, "--backend", "numpy,cupy", "--weights", "float32,int8"]) == 0
    header, rows = table(capsys.readouterr().out)
    assert header[6:9] == ["bandwidth", "bound from", "CUDA graphs"]
    assert [(r["backend"], r["weights"]) for r in rows] == [("numpy", "float32"), ("cupy", "float32"),
                                                             ("numpy", "int8"), ("cupy", "int8")]
    cpu, gpu = rows[0], rows[1]
    assert (cpu["bandwidth"], cpu["bound from"], cpu["CUDA graphs"]) == ("20.0 GB/s", "CPU read", "-")
    assert (gpu["bandwidth"], gpu["bound from"], gpu["CUDA graphs"]) == ("4000.0 GB/s", "GPU copy, Fake H200", "on")
    assert float(cpu["decode bound tok/s"]) > 0  # the CPU's cache is tiny: a DRAM bound
    # stories15M's 61 MB (float32) fit in the GPU's 128 MiB L2: no memory bound, and the cache is the GPU's
    assert gpu["decode bound tok/s"] == "n/a: fits in L2 (128 MiB)" and gpu["tg / bound"] == "n/a"
    assert gpu_bench == [GpuLike.cp]  # probed once, with the backend's cupy


def test_the_gpu_bound_is_the_copy_bandwidth_over_the_bytes_read_per_token(gpu_bench, capsys):
    bench._GPU_MEMORY[0] = DeviceMemory("Fake H200", 4000e9, 1 * MiB, 141 * 2**30)  # an L2 far smaller than the weights
    config, weights = bench.random_model("stories15M")
    llm = LLM(config, weights, None, GpuLike(), np.float32, Path("stories15M"))
    r = bench.run_bench(llm, 4, 2, 1)
    assert r["bandwidth_source"] == "GPU copy, Fake H200" and r["cuda_graphs"] is True
    assert r["decode_bound_tokens_per_s"] == pytest.approx(4000e9 / weights.decode_read_bytes)
    assert r["last_level_cache"] == (2, MiB) and r["cached_share"] == pytest.approx(MiB / weights.decode_read_bytes)
    assert gpu_bench == []  # the cached figure: no second probe in this process


def test_enforce_eager_turns_the_cuda_graphs_off(gpu_bench, capsys):
    assert main([*BENCH, "--backend", "cupy", "--enforce-eager"]) == 0
    _, rows = table(capsys.readouterr().out)
    assert [r["CUDA graphs"] for r in rows] == ["off"]


def test_a_cpu_only_table_keeps_its_columns(gpu_bench, capsys):
    assert main([*BENCH, "--backend", "numpy"]) == 0
    header, rows = table(capsys.readouterr().out)
    assert header == ["model", "backend", "weights", "pp4 tok/s", "tg2 tok/s", "weights read/token", "read bandwidth",
                      "decode bound tok/s", "tg / bound"]
    assert rows[0]["read bandwidth"] == "20.0 GB/s" and gpu_bench == []


def test_the_batch_table_says_whether_a_gpu_row_ran_as_cuda_graphs(gpu_bench, capsys):
    assert main([*BENCH, "--backend", "numpy,cupy", "--batch", "1,2"]) == 0
    header, rows = table(capsys.readouterr().out)
    assert header[:5] == ["model", "backend", "weights", "CUDA graphs", "batch"]
    assert [(r["backend"], r["CUDA graphs"], r["batch"]) for r in rows] == [
        ("numpy", "-", "1"), ("numpy", "-", "2"), ("cupy", "on", "1"), ("cupy", "on", "2")]
    assert main([*BENCH, "--backend", "cupy", "--batch", "1", "--enforce-eager"]) == 0
    assert [r["CUDA graphs"] for r in table(capsys.readouterr().out)[1]] == ["off"]
    assert main([*BENCH, "--backend", "numpy", "--batch", "1"]) == 0
    assert "CUDA graphs" not in capsys.readouterr().out


def test_a_model_on_cuda_graphs_captures_before_the_clock_starts(monkeypatch):
    """Its decode runs share one KV cache, on which a short untimed run captured the graph (a
    new cache would be a new address: a capture inside every timed run); an eager model's runs
    each take a new cache, as always. Through the engine, a graphed model first serves as many
    2-token requests, untimed, on the engine it is then timed on."""
    config, weights = bench.random_model("stories15M")
    calls = []
    real_time_decode = bench.time_decode
    monkeypatch.setattr(bench, "time_decode",
                        lambda llm, n, rng, cache=None: calls.append((n, cache)) or real_time_decode(llm, n, rng, cache))
    for enforce_eager in (False, True):
        calls.clear()
        llm = LLM(config, weights, None, GpuLike(), np.float32, Path("stories15M"), enforce_eager=enforce_eager)
        monkeypatch.setattr(bench, "memory_bound", lambda llm: (4000e9, "GPU copy, Fake", None))
        bench.run_bench(llm, 4, 3, 2)
        if enforce_eager:
            assert calls == [(3, None), (3, None)]
        else:
            assert [n for n, _ in calls] == [2, 3, 3] and calls[0][1] is not None
            assert all(cache is calls[0][1] for _, cache in calls)
        engines = []
        real_new_engine = llm.new_engine
        monkeypatch.setattr(llm, "new_engine", lambda config: engines.append(real_new_engine(config)) or engines[-1])
        r = bench.run_batch_bench(llm, 3, 4, 5)
        assert len(engines) == 1 and r["cuda_graphs"] is (not enforce_eager) and r["output_tokens_per_s"] > 0
        assert engines[0].next_request_id == (3 if enforce_eager else 6)  # 3 timed, and 3 warm-up ones before them
        assert engines[0].stats.decode_tokens == 3 * 5 + (0 if enforce_eager else 3 * 2)


# ---- the Llama-3.2-1B shape, and random_model's per-shape vocabulary and KV heads ---------------------
def test_the_llama_3_2_1b_shape_is_the_real_models():
    config = bench.random_config("llama-3.2-1B")
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.intermediate_size) == (128256, 2048, 16, 8192)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 8, 64)
    assert config.tie_word_embeddings and config.rope_theta == 500000.0
    assert config.num_parameters == 1_235_814_400  # meta-llama/Llama-3.2-1B: 1.24 B
    assert "llama-3.2-1B" in cli.build_parser().parse_args(["bench", "--random", "llama-3.2-1B"]).random


def test_the_stories_shapes_keep_their_vocabulary_and_heads():
    config = bench.random_config("stories110M")
    assert (config.vocab_size, config.num_kv_heads, config.head_dim, config.tie_word_embeddings) == (32000, 12, 64, False)
    with pytest.raises(ValueError, match="unknown shape"):
        bench.random_config("stories1B")


TINY_GQA = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                vocab_size=300, tie_word_embeddings=True, rope_theta=500000.0)


def test_random_model_makes_each_shapes_vocabulary_kv_heads_and_tied_head(monkeypatch):
    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny-gqa", TINY_GQA)
    config, weights = bench.random_model("tiny-gqa")
    assert weights.embedding.shape == (300, 64) and weights.lm_head is weights.embedding
    layer = weights.layers[0]
    assert layer.wq.shape == (64, 64) and layer.wk.shape == layer.wv.shape == (2 * 16, 64) and layer.wo.shape == (64, 64)
    assert sum(a.size for a in weights.arrays()) == config.num_parameters
    assert weights.decode_read_bytes == weights.nbytes  # tied: the whole table is read, as the LM head
    again = bench.random_model("tiny-gqa")[1]
    assert all(np.array_equal(a, b) for a, b in zip(weights.arrays(), again.arrays()))  # the same seed, the same weights
    llm = LLM(config, weights, None, get_backend("numpy"), np.float32, Path("tiny-gqa"))
    logits = llm.model.forward(ForwardBatch.build([[1, 299]], [llm.model.new_kv_cache(2)]))
    assert logits.shape[-1] == 300 and np.isfinite(logits).all()


def test_a_large_shape_draws_each_matrix_from_its_own_stream_the_same_every_time(monkeypatch, capsys):
    """Above LARGE_MODEL parameters (here lowered to the stand-in's size) the matrices are drawn
    in parallel, each from its own seeded stream: still the same weights for the same seed, and
    random_model says on stderr how long they took."""
    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny-gqa", TINY_GQA)
    serial = bench.random_model("tiny-gqa")[1]
    monkeypatch.setattr(bench, "LARGE_MODEL", 1)
    config, weights = bench.random_model("tiny-gqa")
    again = bench.random_model("tiny-gqa")[1]
    assert all(np.array_equal(a, b) for a, b in zip(weights.arrays(), again.arrays()))
    assert [a.shape for a in weights.arrays()] == [a.shape for a in serial.arrays()]
    assert not np.array_equal(weights.layers[0].wq, serial.layers[0].wq)  # other streams, other numbers
    assert weights.lm_head is weights.embedding and abs(float(weights.layers[1].w_down.std()) - 0.02) < 0.002
    err = capsys.readouterr().err
    assert "random parameters (tiny-gqa)" in err and "made them in" in err


# ---- the PyTorch peer --------------------------------------------------------------------------------
def load_torch_peer():
    spec = importlib.util.spec_from_file_location("torch_peer", ROOT / "benchmarks" / "torch_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_torch_peer_says_in_one_line_when_torch_is_missing(tmp_path):
    # a sitecustomize that makes torch and transformers unimportable, wherever they are installed
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "torch_peer.py"), "--random", "stories15M"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not installed" in result.stderr and "pip install torch transformers" in result.stderr


def test_the_torch_peer_runs_tinyinfers_very_weights(monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peer = load_torch_peer()
    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny-gqa", TINY_GQA)
    config, weights = bench.random_model("tiny-gqa")
    model = peer.hf_model(config, weights, torch, transformers, device="cpu")
    ids = [5, 17, 299, 0, 42]
    with torch.inference_mode():
        theirs = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    ours = LLM(config, weights, None, get_backend("numpy"), np.float32, Path("tiny-gqa")).logits(ids)
    assert ours.shape == theirs.shape == (len(ids), 300) and np.abs(ours - theirs).max() < 1e-4


# ---- the GPU machine's script ------------------------------------------------------------------------
def test_the_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
