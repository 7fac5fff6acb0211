import pytest

import tinyinfer
from tiny_models import tiny_hf_config, write_hf_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer GQA Llama in Hugging Face layout, without a tokenizer."""
    return write_hf_model(tmp_path_factory.mktemp("tiny") / "model", tiny_hf_config())


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    return tinyinfer.load(tiny_model_dir)
