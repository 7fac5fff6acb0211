"""The bundled default model, bard: it loads with no path, ships in the wheel, and agrees with
the training script (transformers) on loss and on greedy text."""

import json
import sys

import numpy as np
import pytest

import tinyinfer
from backends import backend_params
from tinyinfer.chat import ChatSession
from tinyinfer.cli import main
from tinyinfer.default_model import default_model_path
from tinyinfer.perplexity import token_losses, windows_of

BARD = default_model_path()
REPO = BARD.parents[1]
TRAINING = json.loads((BARD / "training_summary.json").read_text())
HELDOUT = json.loads((BARD / "heldout_loss.json").read_text())


@pytest.fixture(scope="module")
def bard():
    return tinyinfer.load()


def test_the_default_model_loads_without_a_path(bard):
    assert bard.path == BARD and BARD.name == "bard"
    # counted by torch in the training script, by tinyinfer from the shapes here
    assert bard.config.num_parameters == TRAINING["parameters"]
    assert bard.config.num_kv_heads < bard.config.num_heads  # exercises grouped-query attention
    assert bard.config.stop_strings == ["\n\n"]


def test_perplexity_matches_the_training_scripts_loss_on_the_heldout_excerpt(bard):
    """Two implementations (transformers in weights/train.py, tinyinfer here) on the same text.
    The issue asks for 1 %; both run float32, so they agree far closer than that."""
    text = (BARD / "heldout_excerpt.txt").read_text(encoding="utf-8")
    result = bard.perplexity(text)
    assert result.predicted_tokens == HELDOUT["tokens"] - 1 and result.windows == 1
    assert result.mean_loss == pytest.approx(HELDOUT["mean_loss"], rel=1e-5)
    assert result.perplexity == pytest.approx(HELDOUT["perplexity"], rel=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_greedy_continuations_are_those_of_transformers_on_every_backend(backend):
    """The training script recorded transformers' greedy text for a few prompts (60 tokens)."""
    llm = tinyinfer.load(backend=backend)
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    greedy = [s for s in TRAINING["samples"] if s["mode"] == "greedy"]
    assert len(greedy) == 3
    for sample in greedy:
        first = llm.generate(sample["prompt"], params)
        assert first.text == sample["text"]
        assert llm.generate(sample["prompt"], params).token_ids == first.token_ids  # stable across runs


def test_the_models_stop_string_ends_a_speech_unless_ignore_eos(bard):
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=60)
    speech = bard.generate("ROMEO.", params)
    assert speech.finish_reason == "stop" and speech.text == "\nI have a daughter to her."
    longer = bard.generate("ROMEO.", tinyinfer.SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    assert longer.text.startswith(speech.text + "\n\n") and longer.finish_reason == "length"


def test_chat_answers_as_ariel_in_one_speech(bard):
    session = ChatSession(bard)
    answer = "".join(session.send("What news, my spirit?", tinyinfer.SamplingParams(temperature=0, max_tokens=60)))
    assert answer and "\n\n" not in answer and session.last_sequence.finish_reason == "stop"
    rendered = bard.tokenizer.chat_template.render(session.messages, add_generation_prompt=True)
    assert rendered == f"PROSPERO.\nWhat news, my spirit?\n\nARIEL.\n{answer.strip()}\n\nARIEL.\n"


def test_perplexity_windows_are_non_overlapping_and_led_by_bos_when_there_is_one():
    ids = list(range(10))
    assert windows_of(ids, 4, bos=None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows_of(ids, 4, bos=99) == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8], [99, 9]]
    assert windows_of([0, 1, 2, 3, 4], 4, bos=None) == [[0, 1, 2, 3]]  # a lone last token predicts nothing


def test_token_losses_are_the_cross_entropy_of_softmax():
    logits = np.array([[0.0, 1.0, 2.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    expected = [np.log(1 + np.e + np.e**2) - 1.0, 0.0]  # -log softmax: row 0 target 1, row 1 target 0
    np.testing.assert_allclose(token_losses(logits, [1, 0]), expected, atol=1e-12)


def test_perplexity_over_several_windows_is_the_mean_of_each_windows_losses(bard):
    text = (BARD / "heldout_excerpt.txt").read_text(encoding="utf-8")
    ids = bard.encode(text, add_special_tokens=False)
    whole = bard.perplexity(text, context=100)
    assert whole.windows == 3 and whole.predicted_tokens == len(ids) - 3
    per_window = [token_losses(bard.logits(w)[:-1], w[1:]) for w in windows_of(ids, 100, None)]
    assert whole.mean_loss == pytest.approx(np.concatenate(per_window).mean(), rel=1e-12)
    assert bard.perplexity(text, context=100, max_chunks=1).predicted_tokens == 99


def test_impossible_perplexity_settings_are_clear_errors(bard):
    with pytest.raises(ValueError, match="context must be between 2 and the model's context window \\(256\\)"):
        bard.perplexity("To be or not to be", context=1000)
    with pytest.raises(ValueError, match="needs at least two"):
        bard.perplexity("a")


def test_cli_generate_and_eval_use_the_default_model(capsys):
    assert main(["generate", "ROMEO.", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "ROMEO.\nI have a daughter to her.\n"
    assert main(["eval", str(BARD / "heldout_excerpt.txt")]) == 0
    out = capsys.readouterr().out
    assert f"{HELDOUT['tokens'] - 1} tokens predicted in 1 windows" in out
    assert f"mean loss {HELDOUT['mean_loss']:.4f} nats/token" in out


def test_eval_of_a_missing_file_is_an_error_message(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.txt")]) == 2
    assert "No such file" in capsys.readouterr().err


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is new in Python 3.11")
def test_the_wheel_lists_every_package_and_carries_the_model_files():
    """pyproject.toml names its packages one by one (the bundled model needs a package-dir
    mapping); a subpackage missing from that list would be missing from the wheel."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tinyinfer").rglob("__init__.py")}
    assert on_disk | set(setuptools["package-dir"]) == set(setuptools["packages"])  # + kernels, bundled model
    assert REPO / setuptools["package-dir"]["tinyinfer.bundled_model"] == BARD
    patterns = setuptools["package-data"]["tinyinfer.bundled_model"]
    shipped = {p.name for pattern in patterns for p in BARD.glob(pattern)}
    needed = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert needed <= shipped
