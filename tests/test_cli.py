"""The tinyinfer command line: generate, chat, info, bench, and its errors."""

import subprocess
import sys

import pytest

from tinyinfer.cli import main
from tiny_models import FIXTURES, SHARED_MODELS

LLAMA = str(FIXTURES / "models" / "llama")


def test_generate_streams_the_prompt_and_its_continuation(capsys):
    assert main(["generate", "--model", LLAMA, "--temperature", "0", "--max-tokens", "5", "To be"]) == 0
    import tinyinfer

    expected = tinyinfer.load(LLAMA).generate("To be", tinyinfer.SamplingParams(temperature=0, max_tokens=5)).text
    assert capsys.readouterr().out == "To be" + expected + "\n"


def test_generate_with_token_ids_prints_ids(tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt-ids", "5,6,7", "--temperature", "0",
                 "--max-tokens", "4", "--ignore-eos"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_same_seed_same_text_from_the_command_line(capsys):
    args = ["generate", "--model", LLAMA, "--temperature", "1.0", "--seed", "3", "--max-tokens", "12", "To be"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_impossible_setting_is_an_error_message_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit:  # argparse refuses it, before the model loads
        main(["generate", "--model", LLAMA, "--top-p", "1.5", "hi"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyinfer generate: error: argument --top-p: expected a number above 0 and at most 1")
    assert "Traceback" not in err


def test_bad_model_path_is_an_error_message(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_info_reports_shape_parameters_and_sizes(capsys):
    assert main(["info", LLAMA]) == 0
    out = capsys.readouterr().out
    for field in ("architecture: LlamaForCausalLM", "parameters:", "bytes on disk:", "bytes in memory:",
                  "stored dtype: F32", "context length: 128", "vocab size:"):
        assert field in out


@pytest.mark.skipif(not (SHARED_MODELS / "stories260K").exists(), reason="../shared absent")
def test_info_on_a_llama2c_checkpoint(capsys):
    assert main(["info", str(SHARED_MODELS / "stories260K" / "stories260K.bin")]) == 0
    assert "parameters: 260,032" in capsys.readouterr().out


def test_bench_prints_a_row_per_weight_format_with_prefill_and_decode(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "-p", "8", "-n", "4", "-r", "1", "--weights", "float32,int8"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [(c[1], c[2]) for c in cells] == [("numpy", "float32"), ("numpy", "int8")]
    assert all(float(c[3]) > 0 and float(c[4]) > 0 for c in cells)
    assert float(cells[1][5].split()[0]) < float(cells[0][5].split()[0]) / 2  # int8 reads fewer bytes per token


def test_bench_batch_prints_throughput_per_batch_size(tiny_model_dir, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--batch", "1,3", "-p", "4", "-n", "5"]) == 0
    rows = [[c.strip() for c in row.strip("|").split("|")] for row in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [row[3] for row in rows] == ["1", "3"] and rows[0][7] == "1.00"
    assert all(float(row[4]) > 0 and row[5].endswith(" ms") for row in rows)


def test_generate_with_int8_weights(capsys):
    assert main(["generate", "ROMEO.", "--temperature", "0", "--weights", "int8"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO.\n")


def run_chat(stdin: str, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyinfer.cli", "chat", "--model", LLAMA, "--temperature", "0", "--max-tokens", "6", *extra],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_chat_answers_each_turn_with_tokens_per_second_and_reuses_the_cache():
    result = run_chat("Hello\nAnd you?\n/reset\nHello\n/exit\n")
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stdout.splitlines() if "tokens/s" in line]
    assert len(stats) == 3
    assert ", 0 of" in stats[0] and ", 0 of" not in stats[1]
    assert stats[2].endswith("of 20 prompt tokens reused from the cache]")  # the same first prompt again
    assert "(conversation cleared)" in result.stdout


def test_chat_ends_cleanly_on_ctrl_d():
    result = run_chat("Hello\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr


def test_bench_plot_draws_the_table(tmp_path, capsys):
    path = tmp_path / "bench.png"
    assert main(["bench", "--random", "stories15M", "--backend", "numpy", "-p", "8", "-n", "2", "-r", "1",
                 "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG") and f"plot: {path}" in capsys.readouterr().out
