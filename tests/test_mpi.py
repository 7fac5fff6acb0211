"""Real MPI: one process per device under mpiexec, the same answers as one process.

Each test starts a real job (`mpiexec -n N python -m tinyinfer.cli ...`, MPICH's mpiexec from
the dev extra) with a time limit, so no job can hang the suite: 4 processes on a 2-core machine
is fine, MPICH oversubscribes. The answers are compared with the same command run in this
process without mpiexec: greedy token ids of `tinyinfer generate --prompt-ids` and of every
line of `tinyinfer batch`, on the golden fixtures (grouped-query attention with fewer KV heads
than processes, Qwen2's biases, Qwen3's q/k norms, tied heads) and the real stories260K. Then
what goes wrong: a world size that does not match the layout, a layout that does not fit the
model, a rank that dies and a rank that hangs mid-run.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tinyinfer
from tiny_models import FIXTURES, SHARED_MODELS
from tinyinfer.cli import main
from tinyinfer.parallel import ParallelConfigError
from tinyinfer.parallel.mpi import import_mpi

MODELS = FIXTURES / "models"
SOURCE = Path(tinyinfer.__file__).resolve().parents[1]  # the folder that holds the package
STORIES = SHARED_MODELS / "stories260K" / "stories260K.bin"
JOB_LIMIT = 120  # seconds a job may take before the test stops it and fails
GREEDY = ["--temperature", "0", "--ignore-eos"]
PROMPTS = [  # token ids (every model here has a vocabulary of at least 400), lengths and max_tokens all differ
    {"prompt": [1, 5, 9], "max_tokens": 6},
    {"prompt": [1, 20, 30, 40, 50, 60, 70], "max_tokens": 9},
    {"prompt": [1, 7], "max_tokens": 4},
    {"prompt": [1, 100, 101, 102], "max_tokens": 7},
    {"prompt": [1, 3, 3, 3, 3], "max_tokens": 5},
]
TIMINGS = ("time_to_first_token", "time_per_output_token", "latency")


def stories_pp3():
    """stories260K on 3 pipeline stages (its 5 layers as 2, 2, 1) when ../shared is present;
    skipped where it is not."""
    return pytest.param(STORIES, 3, ["--pp", "3"], id="stories260K-pp3",
                        marks=pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} is not present"))


def find_mpiexec() -> str:
    """The mpiexec of this Python's environment (the MPICH wheel puts it beside python), else
    the first on PATH. None is a failure, not a skip: MPI is part of what the suite tests."""
    beside_python = Path(sys.executable).parent / "mpiexec"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail('no mpiexec beside this Python or on PATH: install the dev extra, pip install -e ".[dev]", '
                    "which brings mpi4py and the MPICH wheel (its mpiexec)")
    return found


def run_job(processes: int, *command: str, limit: float = JOB_LIMIT) -> subprocess.CompletedProcess:
    """`mpiexec -n processes command...`; stopped (and the test failed) after `limit` seconds.
    SIGTERM makes mpiexec kill every process it started, even a stopped one."""
    args = [find_mpiexec(), "-n", str(processes), *command]
    # every rank imports the tinyinfer these tests import (mpiexec passes the environment on)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = job.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = job.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            job.kill()
            stdout, stderr = job.communicate()
        pytest.fail(f"{' '.join(args)} did not end within {limit} s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(args, job.returncode, stdout, stderr)


def run_cli(processes: int, *args: str, limit: float = JOB_LIMIT) -> subprocess.CompletedProcess:
    return run_job(processes, sys.executable, "-m", "tinyinfer.cli", *args, limit=limit)


def one_process(capsys, *args: str) -> str:
    """The same command without mpiexec, in this process: its stdout."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def batch_results(path: Path) -> list[dict]:
    """Each result line without its timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in path.read_text().splitlines()]


# ---- the same answers as one process ---------------------------------------------------------------
@pytest.mark.parametrize("model, processes, layout", [
    pytest.param(MODELS / "qwen2", 2, ["--tp", "2"], id="qwen2-tp2"),
    pytest.param(MODELS / "mistral", 2, ["--pp", "2"], id="mistral-pp2"),
    pytest.param(MODELS / "llama", 2, ["--dp", "2"], id="llama-dp2"),
    pytest.param(MODELS / "qwen3", 4, ["--tp", "2", "--pp", "2"], id="qwen3-tp2-pp2"),
    pytest.param(MODELS / "llama_linear_rope", 4, ["--tp", "4"], id="one-kv-head-tp4"),
    stories_pp3(),
])
def test_generate_under_mpiexec_gives_one_process_tokens(model, processes, layout, capsys):
    command = ["generate", "--model", str(model), "--prompt-ids", "1,5,9", "--max-tokens", "8", *GREEDY]
    expected = one_process(capsys, *command)
    job = run_cli(processes, *command, *layout)
    assert job.returncode == 0, job.stderr
    assert job.stdout == expected  # one line of ids: only rank 0 prints
    assert job.stderr == ""


@pytest.mark.parametrize("model, processes, layout", [
    pytest.param(MODELS / "llama3_tied", 2, ["--dp", "2", "--routing", "least_tokens"], id="llama3-dp2-least-tokens"),
    pytest.param(MODELS / "llama", 2, ["--pp", "2"], id="llama-pp2"),
    pytest.param(MODELS / "qwen2", 4, ["--tp", "2", "--pp", "2"], id="qwen2-tp2-pp2"),
    pytest.param(MODELS / "llama3_tied", 4, ["--tp", "4"], id="two-kv-heads-tp4"),
    pytest.param(MODELS / "mistral", 4, ["--tp", "2", "--dp", "2"], id="mistral-tp2-dp2"),
    stories_pp3(),
])
def test_batch_under_mpiexec_gives_one_process_results(model, processes, layout, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    command = ["batch", "--model", str(model), str(prompts), *GREEDY]
    one_process(capsys, *command, "--out", str(tmp_path / "one.jsonl"))
    job = run_cli(processes, *command, "--out", str(tmp_path / "mpi.jsonl"), *layout)
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("requests run") == 1  # only rank 0 reports
    assert batch_results(tmp_path / "mpi.jsonl") == batch_results(tmp_path / "one.jsonl")
    assert len(batch_results(tmp_path / "one.jsonl")) == len(PROMPTS)


def test_the_numba_backend_under_mpiexec_gives_one_process_tokens(capsys):
    """The run in this process compiles the kernels if Numba's disk cache does not have them
    yet, so the ranks load them instead of each compiling its own."""
    command = ["generate", "--model", str(MODELS / "qwen2"), "--prompt-ids", "1,5,9", "--max-tokens", "8",
               "--backend", "numba", *GREEDY]
    expected = one_process(capsys, *command)
    job = run_cli(2, *command, "--tp", "2", limit=300)  # 300: in case the ranks compile after all
    assert job.returncode == 0, job.stderr
    assert job.stdout == expected


# ---- mistakes: one line from rank 0, exit code 2 ---------------------------------------------------
def test_a_world_size_that_does_not_match_the_layout_says_how_many_processes_to_start():
    job = run_cli(3, "generate", "--model", str(MODELS / "llama"), "--prompt-ids", "1,5,9", "--tp", "2", "--pp", "2")
    assert job.returncode == 2
    assert job.stderr.splitlines() == [
        "tinyinfer: error: mpiexec started 3 processes, but tp=2 x pp=2 x dp=1 = 4 devices; start it with "
        "`mpiexec -n 4`, or give --tp, --pp and --dp whose product is 3"]
    assert job.stdout == ""


@pytest.mark.parametrize("layout, message", [
    (["--tp", "3"], "tinyinfer: error: tp=3 does not split this model (4 query heads, 4 key/value heads): tp must "
                    "divide the query heads and divide or be a multiple of the key/value heads; choose tp in [1, 2, 4]"),
    (["--pp", "3"], "tinyinfer: error: pp=3 stages need at least 3 layers, and this model has 2; "
                    "choose pp between 1 and 2"),
], ids=["tp-does-not-divide-the-heads", "more-stages-than-layers"])
def test_a_layout_that_does_not_fit_the_model_is_one_error_from_rank_0(layout, message):
    job = run_cli(3, "generate", "--model", str(MODELS / "llama"), "--prompt-ids", "1,5,9", *layout)
    assert job.returncode == 2
    assert job.stderr.splitlines() == [message]  # once, not once per rank; no traceback


def test_bench_under_mpiexec_prints_one_table_from_rank_0():
    job = run_cli(2, "bench", "--model", str(MODELS / "llama"), "--tp", "2", "-r", "1", "-p", "8", "-n", "4")
    assert job.returncode == 0, job.stderr
    lines = job.stdout.splitlines()
    assert lines[0].startswith("| model |") and lines.count(lines[0]) == 1
    assert len(lines) == 3 and "tp=2 x pp=1 x dp=1 (MPI)" in lines[2]


def test_bench_under_mpiexec_refuses_several_formats_once():
    job = run_cli(2, "bench", "--model", str(MODELS / "llama"), "--tp", "2", "--weights", "float32,float16")
    assert job.returncode == 2
    assert len(job.stderr.splitlines()) == 1 and "one --backend and one --weights per launch" in job.stderr


def test_without_mpi4py_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` now raises ImportError
    with pytest.raises(ParallelConfigError, match=re.escape('pip install "tinyinfer[mpi]"')) as error:
        import_mpi()
    assert "mpiexec" in str(error.value)


# ---- a rank that fails mid-run ends the job ------------------------------------------------------------
FAILING_RANK = '''
"""Rank 1 sends itself a signal (SIGKILL: it dies; SIGSTOP: it hangs) at its third forward
pass; rank 0 generates until the job ends, or for 100 s."""
import os
import signal
import sys
import time

from mpi4py import MPI

import tinyinfer
from tinyinfer.parallel.worker import Worker

model, signal_name, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
if MPI.COMM_WORLD.Get_rank() == 1:
    forward, passes = Worker.forward, []

    def forward_until_the_signal(self, step):
        passes.append(step.index)
        if len(passes) == 3:
            os.kill(os.getpid(), getattr(signal, signal_name))
        return forward(self, step)

    Worker.forward = forward_until_the_signal
llm = tinyinfer.load(model, tp=2, timeout=timeout)  # rank 1 serves inside load, until the end
params = tinyinfer.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
start = time.monotonic()
while time.monotonic() - start < 100:
    llm.generate([1, 5, 9], params)
print("rank 0 generated for 100 s: nothing stopped it")
'''


def run_failing_rank(tmp_path, signal_name: str, timeout: float, limit: float) -> subprocess.CompletedProcess:
    """The script above on 2 ranks with tinyinfer's timeout; the job must end within `limit` seconds."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    return run_job(2, sys.executable, str(script), str(MODELS / "llama"), signal_name, str(timeout), limit=limit)


def test_a_rank_that_dies_mid_run_ends_the_job_at_once(tmp_path):
    """mpiexec notices the death and ends the job, long before tinyinfer's timeout could."""
    job = run_failing_rank(tmp_path, "SIGKILL", timeout=300, limit=60)
    assert job.returncode != 0
    assert "signal 9" in job.stdout + job.stderr  # MPICH: "Killed (signal 9)"; Open MPI: "signal 9 (Killed)"
    assert "nothing stopped it" not in job.stdout


def test_a_rank_that_hangs_mid_run_ends_the_job_after_the_timeout(tmp_path):
    """A stopped process is alive to mpiexec: only rank 0's timeout notices, and it ends the job."""
    job = run_failing_rank(tmp_path, "SIGSTOP", timeout=3, limit=3 + 30)
    assert job.returncode != 0
    assert re.search(r"tinyinfer: error on rank 0: rank 0 waited 3 s for .+? among ranks \[0, 1\]; "
                     r"a rank has died or hangs", job.stderr), job.stderr
    assert "nothing stopped it" not in job.stdout
