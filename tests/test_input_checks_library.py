"""Every value that comes in through the library is checked at the door: a batch file's lines,
the Python API's arguments, SamplingParams. A wrong value is refused with one message that
names it and says what to pass; the context window ends output with notice; chat drops its
oldest turns instead of refusing to go on."""

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tinyinfer
from tiny_models import FIXTURES
from tinyinfer import SamplingParams
from tinyinfer.batch_file import parse_request, run_batch_file
from tinyinfer.chat import ChatSession
from tinyinfer.engine import LLMEngine

LLAMA = FIXTURES / "models" / "llama"  # a tokenizer, a chat template, a context of 128
GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def llm():
    return tinyinfer.load(LLAMA)


@pytest.fixture(scope="module")
def bard():
    return tinyinfer.load()  # the bundled model: context 256


# ---- the batch file ----------------------------------------------------------------------
BAD_LINES = [
    ('{"prompt": 5}', "prompt: must be text (a string) or a list of token ids (integers), got 5"),
    ('{"prompt": null}', "prompt: must be text (a string) or a list of token ids (integers), got null"),
    ('{"prompt": [1, "a"]}', 'prompt: must be text (a string) or a list of token ids (integers), got [1, "a"]'),
    ('{"prompt": ""}', "prompt: must not be empty"),
    ('{"prompt": []}', "prompt: must not be empty"),
    ('{"prompt": "ROMEO.", "seed": "x"}', 'seed: must be an integer >= 0, or unset (None) for a random seed, got "x"'),
    ('{"prompt": "ROMEO.", "seed": -1}', "seed: must be >= 0"),
    ('{"prompt": "ROMEO.", "max_tokens": "ten"}', 'max_tokens: must be an integer >= 1, got "ten"'),
    ('{"prompt": "ROMEO.", "max_tokens": true}', "max_tokens: must be an integer >= 1, got true"),
    ('{"prompt": "ROMEO.", "max_tokens": 2.5}', "max_tokens: must be an integer >= 1, got 2.5"),
    ('{"prompt": "ROMEO.", "max_tokens": 0}', "max_tokens: must be >= 1, got 0"),
    ('{"prompt": "ROMEO.", "max_tokens": -3}', "max_tokens: must be >= 1, got -3"),
    ('{"prompt": "ROMEO.", "temperature": -1}', "temperature: must be >= 0 (0 is greedy), got -1"),
    ('{"prompt": "ROMEO.", "temperature": "hot"}', 'temperature: must be a number >= 0 (0 is greedy), got "hot"'),
    ('{"prompt": "ROMEO.", "temperature": false}', "temperature: must be a number >= 0"),
    ('{"prompt": "ROMEO.", "top_p": 0}', "top_p: must be in (0, 1] (1 disables it), got 0"),
    ('{"prompt": "ROMEO.", "top_p": 1.5}', "top_p: must be in (0, 1]"),
    ('{"prompt": "ROMEO.", "top_p": NaN}', "top_p: must be a finite number in (0, 1]"),
    ('{"prompt": "ROMEO.", "top_k": -1}', "top_k: must be >= 0 (0 disables it), got -1"),
    ('{"prompt": "ROMEO.", "top_k": 1.5}', "top_k: must be an integer >= 0"),
    ('{"prompt": "ROMEO.", "min_p": 2}', "min_p: must be in [0, 1]"),
    ('{"prompt": "ROMEO.", "repetition_penalty": 0}', "repetition_penalty: must be > 0"),
    ('{"prompt": "ROMEO.", "stop": 5}', "stop: must be a list of strings (or one string), got 5"),
    ('{"prompt": "ROMEO.", "stop": [""]}', "stop: strings must not be empty"),
    ('{"prompt": "ROMEO.", "stop_token_ids": [1, "2"]}', "stop_token_ids: must be a list of token ids (integers >= 0)"),
    ('{"prompt": "ROMEO.", "ignore_eos": "yes"}', 'ignore_eos: must be a boolean (true or false), got "yes"'),
    ('{"prompt": "ROMEO.", "id": [1]}', "id: must be a string or a number, got [1]"),
    ('{"prompt": "ROMEO.", "seed": "x", "top_p": 2}', 'seed: must be an integer >= 0, or unset (None) for a random '
                                                      'seed, got "x"; top_p: must be in (0, 1] (1 disables it), got 2'),
    ('{"messages": "hi"}', 'messages: must be a non-empty list of {"role": ..., "content": ...} objects, got "hi"'),
    ('{"messages": []}', "messages: must be a non-empty list"),
    ('{"messages": ["hi"]}', 'messages[0]: must be an object {"role": ..., "content": ...}, got "hi"'),
    ('{"messages": [{"role": "user"}]}', "messages[0]: missing content"),
    ('{"messages": [{"content": "hi"}]}', "messages[0]: missing role"),
    ('{"messages": [{"role": "user", "content": "hi", "name": "x"}]}', "messages[0]: unknown keys ['name']"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hi"}]}',
     'messages[1].role: must be one of system, user, assistant, got "bot"'),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content: must be a string, got 5"),
    ('["ROMEO."]', 'each line must be a JSON object {...}, got ["ROMEO."]'),
    ('"ROMEO."', "each line must be a JSON object"),
    ('{"prompt": "ROMEO.", "colour": "blue"}', "unknown keys ['colour']"),
    ('{"prompt": "ROMEO.", "messages": []}', 'give exactly one of "prompt" (text) or "messages" (a chat)'),
    ('{"prompt": [100000]}', "outside the vocabulary"),
    ("{not json", "not valid JSON"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_batch_line_is_refused_naming_the_field_and_what_it_must_be(llm, line, message):
    with pytest.raises(ValueError) as error:
        parse_request(llm, line, {})
    assert message in str(error.value)


def test_a_batch_mixing_good_lines_with_every_kind_of_bad_one_writes_every_result_in_order(llm, tmp_path):
    good = [json.dumps({"prompt": "To be", "max_tokens": 6, "temperature": 0, "id": "a"}),
            json.dumps({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0}),
            json.dumps({"prompt": [1, 5, 9], "max_tokens": 4, "temperature": 0, "stop": "xyz"})]
    lines = [good[0]] + [line for line, _ in BAD_LINES] + [good[1], good[2]]
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text("\n".join(lines) + "\n", encoding="utf-8")

    report = run_batch_file(llm, requests, out, {}, progress=False)

    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))  # every line, in order
    bad_numbers = range(2, 2 + len(BAD_LINES))
    assert sorted(report["errors"]) == list(bad_numbers) and report["run"] == 3
    for number, (_, message) in zip(bad_numbers, BAD_LINES):
        assert message in records[number - 1]["error"]
    assert records[0]["id"] == "a" and records[0]["text"] == llm.generate("To be", GREEDY).text
    assert "error" not in records[-2] and records[-1]["token_ids"] == llm.generate([1, 5, 9], SamplingParams(
        temperature=0, max_tokens=4, stop=["xyz"])).token_ids


# ---- the Python API ----------------------------------------------------------------------
API_MISTAKES = [
    (lambda llm: llm.logits("ROMEO."), TypeError, "logits takes token ids; encode text with llm.encode(text)"),
    (lambda llm: llm.logits([1, 2.5]), TypeError, "logits takes token ids (a list of ints)"),
    (lambda llm: llm.logits([1, 100000]), ValueError, r"token ids [100000] are outside the vocabulary"),
    (lambda llm: llm.logits([]), ValueError, "at least one token id"),
    (lambda llm: llm.generate(None), TypeError, "generate takes a prompt, text (a str) or token ids (a list of ints), "
                                                "or a list of prompts; got NoneType None"),
    (lambda llm: llm.generate(5), TypeError, "generate takes a prompt"),
    (lambda llm: llm.generate(""), ValueError, "the prompt is empty"),
    (lambda llm: llm.generate(["ROMEO.", 5]), TypeError, "this list mixes text and token ids"),
    (lambda llm: llm.generate([1, "a"]), TypeError, "this list mixes text and token ids"),
    (lambda llm: llm.generate([1.0, 2.0]), TypeError, "token ids must be integers"),
    (lambda llm: llm.generate(["ROMEO.", None]), TypeError, "prompt 1 of the list is NoneType None"),
    (lambda llm: llm.generate("x", {"max_tokens": 5}), TypeError, "pass SamplingParams(**settings)"),
    (lambda llm: llm.generate("x", 5), TypeError, "params must be a SamplingParams"),
    (lambda llm: list(llm.stream("x", {"max_tokens": 5})), TypeError, "pass SamplingParams(**settings)"),
    (lambda llm: list(llm.stream(None)), TypeError, "a prompt must be text (a str) or token ids"),
    (lambda llm: llm.engine.add_request("x", {"max_tokens": 5}), TypeError, "pass SamplingParams(**settings)"),
    (lambda llm: llm.engine.add_request(7), TypeError,
     "a prompt must be text (a str) or token ids (a list of ints), got int 7"),
    (lambda llm: llm.perplexity(5), TypeError, "perplexity takes text (a str) or token ids"),
    (lambda llm: llm.perplexity("To be or not", context=0), ValueError, "context must be between 2"),
    (lambda llm: llm.perplexity("To be or not", context=8.5), TypeError, "context must be a number of tokens (an int)"),
    (lambda llm: llm.perplexity("To be or not", max_chunks=0), ValueError, "max_chunks must be an int >= 1"),
    (lambda llm: llm.perplexity("To be or not", max_chunks=-1), ValueError, "max_chunks must be an int >= 1"),
    (lambda llm: ChatSession(llm).send(None), TypeError, "send takes the user's message as text"),
    (lambda llm: tinyinfer.load(path=5), TypeError, "path must be a model directory or a llama2.c .bin file, or None "
                                                    "for the bundled model (a str or Path), got int 5"),
    (lambda llm: tinyinfer.load(path=""), ValueError, "path is empty"),
    (lambda llm: tinyinfer.load(LLAMA, backend=3), TypeError, "backend must be one of 'numpy', 'numba', 'cupy'"),
    (lambda llm: tinyinfer.load(LLAMA, dtype=np.float32), TypeError, "dtype must be one of 'float32'"),
    (lambda llm: tinyinfer.load(LLAMA, weights=8), TypeError, "weights must be one of 'float32', 'float16', 'int8'"),
    (lambda llm: tinyinfer.load(LLAMA, tokenizer=1), TypeError, "tokenizer must be a tokenizer.json"),
]


@pytest.mark.parametrize("call, error, message", API_MISTAKES)
def test_a_wrong_argument_is_refused_at_the_public_surface_saying_what_to_pass(llm, call, error, message):
    with pytest.raises(error) as raised:
        call(llm)
    assert message in str(raised.value)


def test_a_refused_call_leaves_nothing_running(llm):
    with pytest.raises(TypeError):
        llm.generate(["ROMEO.", "JULIET.", 5], GREEDY)
    assert not llm.engine.has_unfinished()


def test_prompts_come_as_text_lists_tuples_or_integer_arrays(llm):
    expected = llm.generate([1, 5, 9], GREEDY).token_ids
    assert llm.generate((1, 5, 9), GREEDY).token_ids == expected
    assert llm.generate(np.array([1, 5, 9]), GREEDY).token_ids == expected
    assert [o.token_ids for o in llm.generate([[1, 5, 9], np.array([1, 5, 9], np.int32)], GREEDY)] == [expected] * 2
    assert llm.generate([], GREEDY) == []  # no prompts, no outputs
    np.testing.assert_array_equal(llm.logits(np.array([1, 5, 9])), llm.logits([1, 5, 9]))


SETTINGS_MISTAKES = [
    ({"max_tokens": 2.5}, "max_tokens must be an integer >= 1, got 2.5"),
    ({"max_tokens": True}, "max_tokens must be an integer >= 1, got True"),
    ({"max_tokens": "10"}, "max_tokens must be an integer >= 1, got '10'"),
    ({"seed": -1}, "seed must be >= 0, or unset (None) for a random seed, got -1"),
    ({"seed": "x"}, "seed must be an integer >= 0, or unset (None) for a random seed, got 'x'"),
    ({"seed": 1.0}, "seed must be an integer >= 0"),
    ({"temperature": "hot"}, "temperature must be a number >= 0 (0 is greedy), got 'hot'"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"top_p": None}, "top_p must be a number in (0, 1]"),
    ({"top_k": -2}, "top_k must be >= 0 (0 disables it), got -2"),
    ({"top_k": 5.0}, "top_k must be an integer >= 0"),
    ({"stop": 5}, "stop must be a list of strings (or one string), got 5"),
    ({"stop": ["a", 3]}, "stop must be a list of strings"),
    ({"stop": ""}, "stop strings must not be empty"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a list of token ids (integers >= 0), got 5"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids must be a list of token ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of token ids (integers >= 0)"),
    ({"ignore_eos": "no"}, "ignore_eos must be a boolean (true or false), got 'no'"),
]


@pytest.mark.parametrize("settings, message", SETTINGS_MISTAKES)
def test_sampling_params_of_the_wrong_type_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**settings)
    assert message in str(error.value)


def test_sampling_params_take_one_stop_string_as_a_list_of_one_and_numpy_numbers_as_python_ones():
    params = SamplingParams(stop="abc", max_tokens=np.int64(5), temperature=np.float32(0.5),
                            stop_token_ids=(np.int32(3),))
    assert params.stop == ["abc"] and params.stop_token_ids == [3]
    assert type(params.max_tokens) is int and type(params.temperature) is float
    json.dumps(params.__dict__)  # plain values: the batch file and the CLI can print them


def test_a_field_changed_after_checking_is_refused_when_the_params_are_used(llm):
    params = SamplingParams(max_tokens=5)
    params.max_tokens = "five"
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got 'five'"):
        llm.generate("x", params)
    assert not llm.engine.has_unfinished()


# ---- the context window ------------------------------------------------------------------
def test_output_cut_by_the_context_window_says_so(bard):
    text = " ".join(["The king my father's wreck, and the isle full of noises."] * 40)
    prompt = bard.encode(text)[:201]
    out = bard.generate(prompt, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    assert len(out.token_ids) == 55 and out.finish_reason == "length" and out.cut_by_context
    short = bard.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert short.finish_reason == "length" and not short.cut_by_context  # max_tokens ended it
    ended = bard.generate(prompt[:20], SamplingParams(temperature=0, max_tokens=3, stop_token_ids=list(range(4096))))
    assert ended.finish_reason == "stop" and not ended.cut_by_context


def test_a_sequence_reports_being_cut_by_the_context_while_it_is_in_the_engine(bard):
    prompt = bard.encode("ARIEL. " * 200)[:250]
    request_id = bard.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    sequence = bard.engine.sequences[request_id]
    while bard.engine.has_unfinished():
        bard.engine.step()
    assert len(sequence.output_ids) == 6 and sequence.cut_by_context


def chat_for_turns(session, turns: int, params):
    """Send `turns` numbered user messages; return each turn's (dropped_turns, prompt ids,
    reused tokens, answer)."""
    history = []
    for turn in range(turns):
        answer = "".join(session.send(f"Tell me, spirit, of the ship and the {turn} mariners.", params))
        sequence = session.last_sequence
        history.append((session.dropped_turns, sequence.prompt_ids, session.reused_tokens, answer))
    return history


def test_chat_past_the_context_window_drops_the_oldest_turns_and_keeps_answering(bard):
    bard.engine = LLMEngine(bard)  # an empty prefix cache
    session = ChatSession(bard, system_prompt="The isle.")
    params = SamplingParams(temperature=0, max_tokens=40)
    history = chat_for_turns(session, 12, params)

    window = bard.config.max_context
    dropped = [d for d, _, _, _ in history]
    assert sum(dropped) > 0 and dropped[:5] == [0] * 5  # the first turns fit; later ones shift
    for _, prompt_ids, _, answer in history:
        assert answer and len(prompt_ids) + session.answer_room(params) <= window
    prompt = bard.decode(history[-1][1])
    assert prompt.startswith("[The isle.]")  # the system prompt is never dropped
    assert "the 0 mariners" not in prompt and "the 11 mariners" in prompt  # the earliest turns are gone
    assert session.messages[0] == {"role": "system", "content": "The isle."}
    assert (len(session.messages) - 1) // 2 == 12 - sum(dropped)  # dropped_turns counted every turn dropped

    shifted = dropped.index(next(d for d in dropped if d))  # the first turn that dropped
    assert history[shifted + 1][0] == 0 and history[shifted + 1][2] > len(history[shifted][1]) // 2  # then cached again


def test_chat_answers_after_a_shift_as_a_fresh_session_with_the_kept_history_would(bard):
    bard.engine = LLMEngine(bard)
    session = ChatSession(bard)
    params = SamplingParams(temperature=0, max_tokens=40)
    history = chat_for_turns(session, 8, params)
    kept = session.messages[:-2]  # what the last turn was sent with
    fresh = ChatSession(bard)
    fresh.messages = list(kept)
    assert "".join(fresh.send("Tell me, spirit, of the ship and the 7 mariners.", params)) == history[-1][3]


def test_plain_text_chat_drops_the_oldest_turns_at_a_turn_boundary_keeping_bos(llm):
    plain = tinyinfer.load(LLAMA)
    plain.tokenizer.chat_template = None
    session = ChatSession(plain)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    texts = [f" and then the {n} mariners slept" for n in range(12)]
    turns = []
    for text in texts:
        "".join(session.send(text, params))
        turns.append((session.dropped_turns, session.last_sequence))
    assert sum(d for d, _ in turns) > 0
    last = turns[-1][1]
    assert last.prompt_ids[0] == plain.tokenizer.bos_token_id
    first_kept = len(texts) - 1 - (len(session.turn_ends) - 1)  # the oldest turn still in the transcript
    assert last.prompt_ids[1:][: len(plain.encode(texts[first_kept], add_special_tokens=False))] == \
        plain.encode(texts[first_kept], add_special_tokens=False)  # it starts at a turn boundary
    assert len(last.prompt_ids) + session.answer_room(params) <= plain.config.max_context


def test_only_a_message_too_long_alone_is_refused_and_the_conversation_survives_it(bard):
    session = ChatSession(bard, system_prompt="The isle.")
    params = SamplingParams(temperature=0, max_tokens=20)
    "".join(session.send("Where is the king?", params))
    before = list(session.messages)
    with pytest.raises(tinyinfer.ContextLengthError, match="with the system prompt, but the model's context window "
                                                           "is 256 tokens .*; shorten it"):
        session.send("word " * 300, params)
    assert session.messages == before
    "".join(session.send("And the ship?", params))
    assert session.dropped_turns == 0 and len(session.messages) == 5


def test_a_message_that_fills_most_of_the_window_is_answered_until_the_window_ends(bard):
    session = ChatSession(bard)
    "".join(session.send("Where is the king?", SamplingParams(temperature=0, max_tokens=20)))
    long_message = bard.decode(bard.encode("ARIEL. " * 200)[:230])
    answer = "".join(session.send(long_message, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)))
    assert answer and session.dropped_turns == 1 and session.last_sequence.cut_by_context


# ---- names -------------------------------------------------------------------------------
def test_the_bundled_model_is_called_bard_wherever_it_is_installed(bard, tmp_path, monkeypatch):
    assert bard.name == "bard"
    installed = tmp_path / "site-packages" / "tinyinfer" / "bundled_model"  # where a wheel puts it
    shutil.copytree(bard.path, installed)
    monkeypatch.setattr("tinyinfer.llm.CANDIDATES", (installed,))
    assert tinyinfer.load(installed).name == "bard"


def test_another_model_is_called_by_its_directory(llm, monkeypatch):
    assert llm.name == "llama"
    monkeypatch.chdir(LLAMA)
    assert tinyinfer.load(".").name == "llama"


def test_the_version_is_the_installed_one_or_the_checkout_s(tmp_path):
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    in_checkout = tinyinfer._version_in_pyproject(pyproject)
    assert in_checkout.count(".") >= 1 and in_checkout[0].isdigit()
    try:
        assert tinyinfer.__version__ == importlib.metadata.version("tinyinfer")
    except importlib.metadata.PackageNotFoundError:
        assert tinyinfer.__version__ == in_checkout
    assert tinyinfer._version_in_pyproject(tmp_path / "missing.toml") == "unknown"
