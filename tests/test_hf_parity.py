"""Parity with Hugging Face transformers on tiny random checkpoints of each supported family.

tests/fixtures/make_golden.py built each model with transformers, saved it with
save_pretrained, and recorded transformers' logits and greedy tokens. Our forward pass, on the
NumPy and the Numba backend, must reproduce them: logits within 1e-4 (float32), greedy ids exactly.
"""

import json

import numpy as np
import pytest

import tinyinfer
from tiny_models import FIXTURES

MODELS = ["llama", "llama3_tied", "llama_linear_rope", "mistral", "qwen2", "qwen3", "llama_bf16"]


def golden(name):
    directory = FIXTURES / "models" / name
    return directory, json.loads((directory / "golden.json").read_text())


@pytest.fixture(scope="module", params=[(m, b) for b in ("numpy", "numba") for m in MODELS], ids="-".join)
def model_and_golden(request):
    name, backend = request.param
    directory, expected = golden(name)
    return tinyinfer.load(directory, backend=backend), expected, np.load(directory / "golden_logits.npy")


def test_logits_match_transformers(model_and_golden):
    llm, expected, logits = model_and_golden
    ours = llm.logits(expected["prompt_ids"] + expected["greedy_ids"])
    assert np.abs(ours - logits).max() < 1e-4


def test_greedy_tokens_match_transformers(model_and_golden):
    llm, expected, _ = model_and_golden
    params = tinyinfer.SamplingParams(temperature=0, max_tokens=len(expected["greedy_ids"]), ignore_eos=True)
    assert llm.generate(expected["prompt"], params).token_ids == expected["greedy_ids"]


def test_prompt_encodes_to_the_same_ids(model_and_golden):
    llm, expected, _ = model_and_golden
    assert llm.encode(expected["prompt"]) == expected["prompt_ids"]


def test_tokenizer_encode_and_decode_match_transformers(model_and_golden):
    llm, expected, _ = model_and_golden
    for case in expected["encode_cases"]:
        assert llm.encode(case["text"]) == case["ids"]
        assert llm.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    for case in expected["decode_cases"]:
        assert llm.decode(case["ids"]) == case["text"]


def test_chat_template_renders_as_transformers_does(model_and_golden):
    llm, expected, _ = model_and_golden
    template = llm.tokenizer.chat_template
    assert template.render(expected["messages"], add_generation_prompt=True) == expected["chat_text"]
    assert template.render(expected["messages"], add_generation_prompt=False) == expected["chat_text_no_gen"]


def test_special_tokens_come_from_the_tokenizer_config(model_and_golden):
    llm, expected, _ = model_and_golden
    assert expected["eos_token_id"] in llm.eos_token_ids
    assert llm.tokenizer.bos_token_id == expected["bos_token_id"]


def test_bf16_checkpoint_is_stored_as_bf16():
    from tinyinfer.loading.hf_checkpoint import stored_dtypes

    assert stored_dtypes(FIXTURES / "models" / "llama_bf16") == ["BF16"]


def test_qwen3_head_dim_is_wider_than_hidden_over_heads():
    config = tinyinfer.load(FIXTURES / "models" / "qwen3").config
    assert config.head_dim * config.num_heads > config.hidden_size and config.qk_norm
