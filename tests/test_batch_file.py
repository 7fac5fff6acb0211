"""`tinyinfer batch`: a JSONL file of requests in, results out, in order, resumable."""

import json

import tinyinfer
from tiny_models import FIXTURES
from tinyinfer.cli import main

LLAMA = str(FIXTURES / "models" / "llama")
GREEDY = tinyinfer.SamplingParams(temperature=0, max_tokens=6)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_results_come_in_input_order_and_bad_lines_are_reported_without_losing_the_others(tmp_path, capsys):
    requests = tmp_path / "in.jsonl"
    write_lines(requests, [
        json.dumps({"prompt": "To be", "id": "first", "max_tokens": 6}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6}),
        json.dumps({"prompt": "hi", "temperature": -1}),
        json.dumps({"prompt": "hi", "colour": "blue"}),
        "",
        json.dumps({"prompt": "Once upon", "max_tokens": 3, "seed": 7, "temperature": 1.0}),
    ])
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--model", LLAMA, str(requests), "--out", str(out), "--temperature", "0"]) == 1
    records = read_records(out)
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 7]
    assert "not valid JSON" in records[1]["error"]
    assert "temperature: must be >= 0" in records[3]["error"] and "unknown keys ['colour']" in records[4]["error"]
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "line 4: temperature" in err

    llm = tinyinfer.load(LLAMA)
    assert records[0]["id"] == "first" and records[0]["text"] == llm.generate("To be", GREEDY).text
    chat = llm.tokenizer.chat_template.render([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    assert records[2]["token_ids"] == llm.generate(llm.encode(chat, add_special_tokens=False), GREEDY).token_ids
    sampled = tinyinfer.SamplingParams(temperature=1.0, max_tokens=3, seed=7)
    assert records[5]["token_ids"] == llm.generate("Once upon", sampled).token_ids  # its own settings, its seed
    for record in (records[0], records[2], records[5]):
        assert record["finish_reason"] in ("stop", "length") and record["latency"] >= record["time_to_first_token"] > 0


def test_a_rerun_skips_what_is_done_and_retries_fixed_lines(tmp_path, capsys):
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(requests, [json.dumps({"prompt": "To be", "max_tokens": 4}), json.dumps({"prompt": "x", "top_p": 0})])
    main(["batch", "--model", LLAMA, str(requests), "--out", str(out)])
    first = read_records(out)
    capsys.readouterr()

    assert main(["batch", "--model", LLAMA, str(requests), "--out", str(out)]) == 1  # line 2 is still bad
    assert "0 requests run, 1 bad lines, 1 already done" in capsys.readouterr().out
    assert read_records(out) == first

    write_lines(requests, [json.dumps({"prompt": "To be", "max_tokens": 4}), json.dumps({"prompt": "x", "max_tokens": 2})])
    assert main(["batch", "--model", LLAMA, str(requests), "--out", str(out)]) == 0
    records = read_records(out)
    assert [r["line"] for r in records] == [1, 2] and records[0] == first[0] and "error" not in records[1]


def test_an_output_file_that_is_not_results_is_a_clear_error(tmp_path, capsys):
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(requests, [json.dumps({"prompt": "To be"})])
    out.write_text("hello\n")
    assert main(["batch", "--model", LLAMA, str(requests), "--out", str(out)]) == 2
    assert "line 1 is not a tinyinfer result" in capsys.readouterr().err
    assert out.read_text() == "hello\n"  # nothing lost
