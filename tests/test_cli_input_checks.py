"""The command line checks every input at the door.

A user's mistake, or an optional dependency that is not installed, is one line on stderr and
exit status 2, never a traceback, and nothing on stdout; options are checked by argparse
before any model loads, and the error names the option. Then what a user meets next: a
closed pipe ends a command quietly, the context window filling up is said, names, versions
and defaults are where one looks for them, Numba's first compile shows its progress, and
bench does not report a memory bound for weights that live in the cache.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import tinyinfer
from tiny_models import FIXTURES
from tinyinfer import bench
from tinyinfer.cli import main
from tinyinfer.default_model import default_model_path
from tinyinfer.kernels.numba_backend import CompileProgress

LLAMA = str(FIXTURES / "models" / "llama")  # has a tokenizer and a chat template; context window 128
SOURCE = Path(tinyinfer.__file__).resolve().parents[1]


def run_cli(*args, stdin: str = "", path_first=(), stdout=subprocess.PIPE, timeout: float = 120):
    """`python -m tinyinfer.cli args...` in a new process: the real entry point, as a user runs
    it. path_first: folders searched before everything else for imports (to hide a module)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([*map(str, path_first), str(SOURCE),
                                                       *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "tinyinfer.cli", *map(str, args)], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def not_installed(tmp_path_factory):
    """A folder that, first on the import path, makes CuPy and matplotlib look not installed."""
    folder = tmp_path_factory.mktemp("not_installed")
    for name in ("cupy", "matplotlib"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Paths the bad invocations name: {tmp} (an empty folder: no config.json), {binary} (not
    text), {tiny} (a model without a tokenizer)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return {"tmp": tmp, "binary": tmp / "binary.txt", "tiny": tiny_model_dir}


# ---- a user's mistake: one line, exit 2, no traceback -------------------------------------------
def options(*args):
    return ["generate", "--model", LLAMA, *args, "hi"]


BENCH = ["bench", "--model", LLAMA, "-p", "2", "-n", "2", "-r", "1"]

# (what is wrong, the command line, words the one line of error must hold)
BAD_INVOCATIONS = [
    # options, refused by argparse before anything loads, naming the option
    ("bench -p 0", ["bench", "-p", "0"], ["--prompt-tokens", "'0'"]),
    ("bench -r 0", ["bench", "-r", "0"], ["--repetitions", "'0'"]),
    ("bench -n 0", ["bench", "-n", "0"], ["--new-tokens", "'0'"]),
    ("bench --batch 0", ["bench", "--batch", "0"], ["--batch", "'0'"]),
    ("bench --batch a", ["bench", "--batch", "a"], ["--batch", "'a'"]),
    ("bench --batch 1,,4", ["bench", "--batch", "1,,4"], ["--batch", "comma-separated"]),
    ("bench --backend numpy,fast", ["bench", "--backend", "numpy,fast"], ["--backend", "'fast'", "numba"]),
    ("bench --weights int4", ["bench", "--weights", "int4"], ["--weights", "'int4'", "int8"]),
    ("eval --chunks 0", ["eval", "--chunks", "0", "README.md"], ["--chunks", "'0'"]),
    ("eval --chunks -1", ["eval", "--chunks", "-1", "README.md"], ["--chunks", "'-1'"]),
    ("eval --context 0", ["eval", "--context", "0", "README.md"], ["--context", "at least 2"]),
    ("--seed -1", options("--seed", "-1"), ["--seed", "'-1'"]),
    ("--seed 1.5", options("--seed", "1.5"), ["--seed", "'1.5'"]),
    ("--max-tokens 0", options("--max-tokens", "0"), ["--max-tokens", "'0'"]),
    ("--temperature -1", options("--temperature", "-1"), ["--temperature", "'-1'"]),
    ("--temperature nan", options("--temperature", "nan"), ["--temperature", "'nan'"]),
    ("--top-p 0", options("--top-p", "0"), ["--top-p", "'0'"]),
    ("--top-p 1.5", options("--top-p", "1.5"), ["--top-p", "'1.5'"]),
    ("--top-k -1", options("--top-k", "-1"), ["--top-k", "'-1'"]),
    ("--min-p 2", options("--min-p", "2"), ["--min-p", "'2'"]),
    ("--repetition-penalty 0", options("--repetition-penalty", "0"), ["--repetition-penalty", "'0'"]),
    ("--stop ''", options("--stop", ""), ["--stop", "non-empty"]),
    ("--prompt-ids a,b", ["generate", "--model", LLAMA, "--prompt-ids", "a,b"], ["--prompt-ids", "'a,b'"]),
    ("no prompt", ["generate", "--model", LLAMA], ["prompt", "--prompt-ids", "required"]),
    ("a prompt and ids", ["generate", "--model", LLAMA, "--prompt-ids", "1,2", "hi"], ["prompt", "--prompt-ids"]),
    ("--max-num-seqs 0", ["batch", "in.jsonl", "--out", "out.jsonl", "--max-num-seqs", "0"], ["--max-num-seqs"]),
    ("--pp-layers 0,2", options("--pp", "2", "--pp-layers", "0,2"), ["--pp-layers", "'0'"]),
    ("plan --context -1", ["plan", "--context", "-1"], ["--context", "'-1'"]),
    ("--backend tpu", options("--backend", "tpu"), ["--backend", "'tpu'"]),
    ("no command", [], ["command"]),
    # inputs only the library can judge, in its words
    ("no such model", ["generate", "--model", "{tmp}/nope", "hi"], ["{tmp}/nope", "no such file"]),
    ("a folder without config.json", ["generate", "--model", "{tmp}", "hi"], ["config.json"]),
    ("info of a folder without config.json", ["info", "{tmp}"], ["config.json"]),
    ("plan of no such model", ["plan", "{tmp}/nope"], ["{tmp}/nope"]),
    ("no such tokenizer", options("--tokenizer", "{tmp}/nope.json"), ["{tmp}/nope.json"]),
    ("eval of no such file", ["eval", "--model", LLAMA, "{tmp}/missing.txt"], ["{tmp}/missing.txt", "No such file"]),
    ("eval of a folder", ["eval", "--model", LLAMA, "{tmp}"], ["{tmp}"]),
    ("eval of a binary file", ["eval", "--model", LLAMA, "{binary}"], ["{binary}", "UTF-8"]),
    ("batch of no such file", ["batch", "--model", LLAMA, "{tmp}/missing.jsonl", "--out", "{tmp}/out.jsonl"],
     ["{tmp}/missing.jsonl"]),
    ("an empty prompt", ["generate", "--model", LLAMA, ""], ["empty"]),
    ("a prompt longer than the window", ["generate", "--model", LLAMA, "to be or not " * 100],
     ["context window", "128"]),
    ("ids outside the vocabulary", ["generate", "--model", LLAMA, "--prompt-ids", "1,99999"], ["99999", "vocabulary"]),
    ("tp that does not split the model", options("--tp", "3"), ["tp=3"]),
    ("text for a model without a tokenizer", ["generate", "--model", "{tiny}", "hi"],
     ["--tokenizer PATH", "--prompt-ids"]),
    ("stop strings without a tokenizer", ["generate", "--model", "{tiny}", "--prompt-ids", "1,2", "--stop", "x"],
     ["--stop", "--tokenizer PATH"]),
    ("chat with a model without a tokenizer", ["chat", "--model", "{tiny}"], ["--tokenizer PATH"]),
    ("eval with a model without a tokenizer", ["eval", "--model", "{tiny}", "README.md"], ["--tokenizer PATH"]),
    ("timeline without a pipeline", [*BENCH, "--timeline", "{tmp}/t.png"], ["--timeline", "--pp 2"]),
    # optional dependencies that are not installed: what to pip install
    ("--backend cupy without CuPy", options("--backend", "cupy"), ["CuPy", "pip install"]),
    ("bench --plot without matplotlib", [*BENCH, "--plot", "{tmp}/b.png"], ["matplotlib", "pip install"]),
    ("bench --batch --plot without matplotlib", [*BENCH, "--batch", "1", "--plot", "{tmp}/b.png"],
     ["matplotlib", "pip install"]),
]


@pytest.mark.parametrize("what, args, words", BAD_INVOCATIONS, ids=[case[0] for case in BAD_INVOCATIONS])
def test_a_mistake_is_one_line_on_stderr_and_exit_status_2(what, args, words, files, not_installed):
    def filled(text):
        return text.format(**files) if "{" in text else text

    result = run_cli(*map(filled, args), path_first=[not_installed])
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # nothing was printed before the error: no echoed prompt, no table header
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tinyinfer")
    for word in map(filled, words):
        assert word in lines[0]


def test_a_bad_option_under_mpiexec_is_said_once_not_by_every_rank():
    from test_mpi import run_cli as run_under_mpiexec

    job = run_under_mpiexec(2, "generate", "--model", LLAMA, "--tp", "0", "hi")
    assert job.returncode == 2 and job.stdout == ""
    assert len(job.stderr.splitlines()) == 1 and "--tp" in job.stderr


def test_a_missing_tokenizer_gets_the_command_lines_advice_not_the_librarys(files):
    error = run_cli("generate", "--model", files["tiny"], "hi").stderr
    assert "--tokenizer PATH" in error and "--prompt-ids" in error
    assert "tokenizer=PATH" not in error and "tinyinfer.load" not in error


def test_generate_checks_a_long_prompt_before_it_echoes_it(capsys):
    prompt = "to be or not to be " * 6000  # 114 KB
    assert main(["generate", "--model", LLAMA, prompt]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tinyinfer: error: the prompt has ") and "context window" in captured.err
    assert len(captured.err) < 300


def test_bench_checks_for_matplotlib_before_it_measures(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main([*BENCH, "--batch", "1,2", "--plot", "chart.png"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "matplotlib" in captured.err


# ---- a closed pipe ------------------------------------------------------------------------------
def closed_pipe_run(*args, stdin: str = ""):
    """Run the command with its stdout a pipe whose reader has already gone (as `| head -1`
    once head has its line)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return run_cli(*args, stdin=stdin, stdout=write_end)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args, stdin", [
    (["generate", "--model", LLAMA, "--max-tokens", "20", "To be"], ""),
    (["generate", "--model", LLAMA, "--max-tokens", "20", "--prompt-ids", "1,5,9"], ""),
    (["chat", "--model", LLAMA, "--max-tokens", "4"], "Hello\n"),
    (["info", LLAMA], ""),
    (["plan", LLAMA, "--tp", "2"], ""),
    (["bench", "--model", LLAMA, "-p", "2", "-n", "2", "-r", "1"], ""),
    (["bench", "--model", LLAMA, "--batch", "1", "-p", "2", "-n", "2"], ""),
], ids=["generate", "generate --prompt-ids", "chat", "info", "plan", "bench", "bench --batch"])
def test_a_closed_pipe_ends_the_command_quietly_as_sigpipe_would(args, stdin):
    result = closed_pipe_run(*args, stdin=stdin)
    assert result.stderr == ""  # no "[Errno 32] Broken pipe", no traceback
    assert result.returncode == 141  # 128 + SIGPIPE, what a shell reports for `cat big | head -1`'s cat


def test_a_closed_pipe_after_a_batch_has_run_keeps_its_results(tmp_path):
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text(json.dumps({"prompt": "To be", "max_tokens": 3}) + "\n")
    result = closed_pipe_run("batch", "--model", LLAMA, requests, "--out", out)
    assert "Broken pipe" not in result.stderr and "Traceback" not in result.stderr  # (its progress bar is there)
    assert result.returncode == 141
    assert len(out.read_text().splitlines()) == 1


# ---- the context window -------------------------------------------------------------------------
def test_generate_says_when_the_context_window_cut_the_output(capsys):
    long_prompt = "to be or not to be " * 11  # 113 of the window's 128 tokens
    assert main(["generate", "--model", LLAMA, "--temperature", "0", "--ignore-eos", "--max-tokens", "100",
                 long_prompt]) == 0
    captured = capsys.readouterr()
    assert captured.err == "[stopped: the context window of 128 tokens is full]\n"
    assert captured.out.startswith(long_prompt)


def test_generate_with_ids_says_when_the_context_window_cut_the_output(capsys):
    ids = ",".join(["5"] * 120)
    assert main(["generate", "--model", LLAMA, "--temperature", "0", "--ignore-eos", "--max-tokens", "50",
                 "--prompt-ids", ids]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 8 and "context window of 128 tokens is full" in captured.err


def test_generate_says_nothing_when_max_tokens_ended_the_output(capsys):
    assert main(["generate", "--model", LLAMA, "--temperature", "0", "--ignore-eos", "--max-tokens", "5", "To be"]) == 0
    assert capsys.readouterr().err == ""


def test_chat_drops_the_oldest_turns_with_a_notice_and_goes_on():
    turn = "tell me once more of the king and the storm at sea\n"
    result = run_cli("chat", "--model", LLAMA, "--temperature", "0", "--max-tokens", "6", stdin=turn * 8)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "error" not in result.stdout
    answers = [line for line in result.stdout.splitlines() if "tokens/s" in line]
    assert len(answers) == 8  # every turn answered
    notices = [line for line in result.stdout.splitlines() if line.startswith("(dropped the")]
    assert notices and all(line.endswith("to fit the context window of 128 tokens)") for line in notices)


# ---- names, versions, defaults ------------------------------------------------------------------
@pytest.fixture
def installed_like_a_wheel(tmp_path, monkeypatch):
    """The bundled model where a wheel puts it, tinyinfer/bundled_model/ (a link to weights/bard)."""
    import tinyinfer.default_model
    import tinyinfer.llm

    bundled = tmp_path / "bundled_model"
    bundled.symlink_to(default_model_path(), target_is_directory=True)
    monkeypatch.setattr(tinyinfer.default_model, "CANDIDATES", (bundled,))
    monkeypatch.setattr(tinyinfer.llm, "CANDIDATES", (bundled,), raising=False)
    return bundled


def test_chat_eval_and_bench_call_the_bundled_model_bard(installed_like_a_wheel, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert main(["chat"]) == 0
    assert capsys.readouterr().out.startswith("tinyinfer chat: bard (")
    assert main(["eval", "--chunks", "1", str(installed_like_a_wheel / "heldout_excerpt.txt")]) == 0
    assert capsys.readouterr().out.startswith("bard on ")
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 20e9)
    assert main(["bench", "-p", "2", "-n", "2", "-r", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| bard | numpy | float32 |")


def test_info_without_a_path_describes_the_bundled_model_and_where_it_lies(capsys):
    assert main(["info"]) == 0
    rows = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert rows["model"] == "bard" and rows["path"] == str(default_model_path())
    assert rows["architecture"] == "LlamaForCausalLM"


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"tinyinfer {tinyinfer.__version__}\n"


def test_help_lists_the_backends():
    text = " ".join(run_cli("--help").stdout.split())  # argparse wraps lines
    for backend in ("numpy: the reference", "numba: compiled CPU kernels", "cupy: an NVIDIA GPU"):
        assert backend in text


@pytest.mark.parametrize("command", ["generate", "chat", "batch", "eval", "bench"])
def test_each_commands_help_lists_the_backends_and_shows_defaults(command):
    text = " ".join(run_cli(command, "--help").stdout.split())
    for backend in ("numpy: the reference", "numba: compiled CPU kernels", "cupy: an NVIDIA GPU"):
        assert backend in text
    assert "(default: numpy)" in text and "(default: float32)" in text and "(default: 1)" in text  # --tp
    if command not in ("bench", "eval"):
        assert "--max-tokens MAX_TOKENS new tokens at most (default: 128)" in text
        assert "(default: None)" not in text and "(default: False)" not in text


# ---- Numba's first compile: what is compiling, how far ------------------------------------------
def compile_event(function: str, module: str = "tinyinfer.kernels.numba_kernels"):
    """What Numba hands a "numba:compile" listener, reduced to what CompileProgress reads."""
    python_function = SimpleNamespace(__name__=function, __module__=module)
    return SimpleNamespace(data={"dispatcher": SimpleNamespace(py_func=python_function)})


@pytest.fixture
def first_compile_of_the_process(monkeypatch):
    monkeypatch.setattr(CompileProgress, "announced", False)


def test_compile_progress_is_silent_when_everything_comes_from_the_cache(first_compile_of_the_process, capsys):
    with CompileProgress("kernels", 3) as progress:
        for _ in range(3):
            progress.step()
    assert capsys.readouterr().err == ""


def test_compile_progress_names_the_function_and_counts_the_steps(first_compile_of_the_process, capsys):
    with CompileProgress("kernels", 26) as progress:
        for _ in range(4):
            progress.step()  # loaded from the cache
        progress.on_start(compile_event("gemm_q8"))
        err = capsys.readouterr().err
        assert err.startswith("tinyinfer: compiling Numba kernels (once; cached for later runs)\n")
        assert "kernels:" in err and "4/26" in err and "gemm_q8" in err
        progress.on_end(compile_event("gemm_q8"))
        progress.on_start(compile_event("_strncpy", module="numba.cpython.unicode"))  # Numba's own helper
        progress.on_end(compile_event("_strncpy", module="numba.cpython.unicode"))
        progress.step()
        err = capsys.readouterr().err
        assert "5/26" in err and "_strncpy" not in err
    assert "26/26" in capsys.readouterr().err  # the phase is done


def test_compile_progress_says_why_once_per_process_over_several_phases(first_compile_of_the_process, capsys):
    with CompileProgress("kernels", 2) as kernels:
        kernels.on_start(compile_event("matvec"))
        kernels.on_end(compile_event("matvec"))
        kernels.step()
    with CompileProgress("model layers", 2, step_per_function=True) as layers:
        layers.on_start(compile_event("attention_block"))
        layers.on_start(compile_event("_rms_norm"))  # called by attention_block: part of its step
        layers.on_end(compile_event("_rms_norm"))
        assert layers.done == 0
        layers.on_end(compile_event("attention_block"))
        assert layers.done == 1
    err = capsys.readouterr().err
    assert err.count("compiling Numba kernels") == 1
    assert "model layers" in err and "_rms_norm" in err and "2/2" in err


# ---- bench: the memory bound and the last-level cache -------------------------------------------
def bench_rows(monkeypatch, capsys, cache, *args):
    monkeypatch.setattr(bench, "last_level_cache", lambda: cache)
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 20e9)
    assert main([*BENCH, *args]) == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in out.splitlines()[2:] if line.startswith("|")]
    return rows, out


def test_bench_gives_no_memory_bound_for_weights_that_fit_in_the_cache(monkeypatch, capsys):
    rows, _ = bench_rows(monkeypatch, capsys, (3, 32 * 2**20))  # the fixture's weights: well under 1 MB
    assert rows[0][7] == "n/a: fits in L3 (32 MiB)" and rows[0][8] == "n/a"


def test_bench_marks_the_bound_when_half_the_weights_fit_in_the_cache(monkeypatch, capsys):
    weight_bytes = tinyinfer.load(LLAMA).model.weights.decode_read_bytes
    rows, out = bench_rows(monkeypatch, capsys, (3, weight_bytes * 2 // 3))
    assert rows[0][7].endswith(" *") and rows[0][8].endswith("% *")
    assert float(rows[0][7].split()[0]) > 0
    assert out.strip().splitlines()[-1] == bench.CACHE_FOOTNOTE


def test_bench_reports_the_memory_bound_for_weights_larger_than_the_cache(monkeypatch, capsys):
    for cache in [(3, 1024), None]:  # a tiny cache, and one whose size is unknown
        rows, out = bench_rows(monkeypatch, capsys, cache)
        assert float(rows[0][7]) > 0 and rows[0][8].endswith("%") and "*" not in out


def write_cache(cpu: Path, index: int, level: int, kind: str, size: str, shared: str):
    folder = cpu / "cache" / f"index{index}"
    folder.mkdir(parents=True)
    for name, value in [("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)]:
        (folder / name).write_text(f"{value}\n")


def test_the_last_level_cache_is_read_from_sysfs_and_summed_over_its_instances(tmp_path):
    for cpu in range(4):  # two L3s of 16 MiB, each shared by two cpus; an L2 of each cpu's own
        write_cache(tmp_path / f"cpu{cpu}", 0, 1, "Data", "48K", str(cpu))
        write_cache(tmp_path / f"cpu{cpu}", 1, 1, "Instruction", "32K", str(cpu))
        write_cache(tmp_path / f"cpu{cpu}", 2, 2, "Unified", "2048K", str(cpu))
        write_cache(tmp_path / f"cpu{cpu}", 3, 3, "Unified", "16384K", "0-1" if cpu < 2 else "2-3")
    assert bench.last_level_cache(tmp_path) == (3, 32 * 2**20)
    assert bench.last_level_cache(tmp_path / "nothing here") is None
