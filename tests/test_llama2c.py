"""llama2.c checkpoints: the legacy .bin reader, its rotary pairing, and a real trained model."""

import json

import numpy as np
import pytest

import tinyinfer
from tiny_models import FIXTURES, SHARED_MODELS, random_hf_tensors, tiny_hf_config, write_hf_model, write_llama2c_model

STORIES260K = SHARED_MODELS / "stories260K" / "stories260K.bin"
needs_stories260k = pytest.mark.skipif(not STORIES260K.exists(), reason="../shared/models/stories260K is absent")


def llama2c_hf_config(**overrides):
    # llama2.c's run.c uses RMSNorm eps 1e-5 and rope theta 10000: the HF twin must match
    return tiny_hf_config(rms_norm_eps=1e-5, rope_theta=10000.0, **overrides)


@pytest.mark.parametrize("shared_classifier", [True, False])
def test_llama2c_bin_gives_the_logits_of_the_same_weights_in_hf_layout(tmp_path, shared_classifier):
    config = llama2c_hf_config(tie_word_embeddings=shared_classifier)
    tensors = random_hf_tensors(config, seed=3)
    hf = tinyinfer.load(write_hf_model(tmp_path / "hf", config, tensors))
    bin_path = write_llama2c_model(tmp_path / "model.bin", config, tensors, shared_classifier)
    llama2c = tinyinfer.load(bin_path)
    tokens = [1, 5, 9, 13, 40, 41, 42, 7]
    np.testing.assert_allclose(llama2c.logits(tokens), hf.logits(tokens), atol=1e-4)


def test_reading_llama2c_rotary_pairs_as_hf_pairs_would_be_wrong(tmp_path):
    """The point of the permutation: without it the numbers differ. Load the .bin's rows as they
    are (interleaved pairs) into the HF layout and the logits must change."""
    config = llama2c_hf_config()
    tensors = random_hf_tensors(config, seed=3)
    bin_model = tinyinfer.load(write_llama2c_model(tmp_path / "m.bin", config, tensors, False))
    from tiny_models import half_to_interleaved_rotary

    unpermuted = dict(tensors)
    for i in range(config["num_hidden_layers"]):
        for name, heads in (("q_proj", 4), ("k_proj", 2)):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            unpermuted[key] = half_to_interleaved_rotary(tensors[key], heads)
    wrong = tinyinfer.load(write_hf_model(tmp_path / "wrong", config, unpermuted))
    tokens = [1, 5, 9, 13]
    assert np.abs(wrong.logits(tokens) - bin_model.logits(tokens)).max() > 1e-2


@needs_stories260k
def test_stories260k_matches_transformers_logits_and_greedy_tokens():
    """Golden logits recorded by tests/fixtures/make_golden.py: transformers running the same
    weights, converted to HF layout independently (and checked there against run.c's math)."""
    golden = np.load(FIXTURES / "stories260K_golden.npz")
    llm = tinyinfer.load(STORIES260K)
    prompt, greedy = golden["prompt_ids"].tolist(), golden["greedy_ids"].tolist()
    np.testing.assert_allclose(llm.logits(prompt + greedy), golden["logits"], atol=1e-4)
    out = llm.generate(prompt, tinyinfer.SamplingParams(temperature=0, max_tokens=len(greedy), ignore_eos=True))
    assert out.token_ids == greedy


@needs_stories260k
def test_stories260k_in_hf_layout_gives_the_same_logits(tmp_path):
    """Write the real trained weights out in HF layout (q/k rows permuted as transformers'
    converter does) and load them through the safetensors path."""
    llm = tinyinfer.load(STORIES260K)
    config, weights = llm.config, llm.model.weights
    hf_config = tiny_hf_config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_context,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    raw = np.fromfile(STORIES260K, dtype=np.float32, offset=28)
    dim, hidden, layers, vocab = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
    kv_dim = config.num_kv_heads * config.head_dim
    sizes = [("embed", vocab * dim), ("rms_att", layers * dim), ("wq", layers * dim * dim), ("wk", layers * kv_dim * dim),
             ("wv", layers * kv_dim * dim), ("wo", layers * dim * dim), ("rms_ffn", layers * dim),
             ("w1", layers * hidden * dim), ("w2", layers * dim * hidden), ("w3", layers * hidden * dim), ("rms_final", dim)]
    parts, offset = {}, 0
    for name, size in sizes:
        parts[name], offset = raw[offset : offset + size], offset + size

    def meta_to_hf(w, heads):  # transformers' convert_llama_weights_to_hf.py permute
        return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape)

    tensors = {"model.embed_tokens.weight": parts["embed"].reshape(vocab, dim), "model.norm.weight": parts["rms_final"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": parts["rms_att"].reshape(layers, dim)[i],
            p + "self_attn.q_proj.weight": meta_to_hf(parts["wq"].reshape(layers, dim, dim)[i], config.num_heads),
            p + "self_attn.k_proj.weight": meta_to_hf(parts["wk"].reshape(layers, kv_dim, dim)[i], config.num_kv_heads),
            p + "self_attn.v_proj.weight": parts["wv"].reshape(layers, kv_dim, dim)[i],
            p + "self_attn.o_proj.weight": parts["wo"].reshape(layers, dim, dim)[i],
            p + "post_attention_layernorm.weight": parts["rms_ffn"].reshape(layers, dim)[i],
            p + "mlp.gate_proj.weight": parts["w1"].reshape(layers, hidden, dim)[i],
            p + "mlp.down_proj.weight": parts["w2"].reshape(layers, dim, hidden)[i],
            p + "mlp.up_proj.weight": parts["w3"].reshape(layers, hidden, dim)[i],
        }
    hf = tinyinfer.load(write_hf_model(tmp_path / "hf", hf_config, {k: np.ascontiguousarray(v) for k, v in tensors.items()}))
    tokens = [1, 403, 407, 261, 378, 300, 2, 50]
    np.testing.assert_allclose(llm.logits(tokens), hf.logits(tokens), atol=1e-5)
    assert weights.lm_head is weights.embedding  # shared classifier: one array, not two


def test_truncated_llama2c_file_is_a_clear_error(tmp_path):
    config = llama2c_hf_config()
    path = write_llama2c_model(tmp_path / "m.bin", config, random_hf_tensors(config), True)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(tinyinfer.CheckpointError, match="truncated or not a legacy llama2.c checkpoint"):
        tinyinfer.load(path)


def test_nonsense_header_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_bytes(b"hello, this is not a model at all" * 10)
    with pytest.raises(tinyinfer.CheckpointError, match="is not a valid llama2.c model"):
        tinyinfer.load(path)


def test_versioned_llama2c_export_says_to_reexport_as_version_0(tmp_path):
    path = tmp_path / "v1.bin"
    path.write_bytes(np.array([0x616B3432, 1], np.uint32).tobytes() + bytes(256))
    with pytest.raises(tinyinfer.CheckpointError, match="--version 0"):
        tinyinfer.load(path)


def test_llama2c_tokenizer_encodes_as_sentencepiece_does():
    """Golden ids from sentencepiece itself, for a model exported to tokenizer.bin by
    llama2.c's own export procedure (tests/fixtures/make_golden.py)."""
    from tinyinfer.loading.llama2c_tokenizer import Llama2cTokenizer

    directory = FIXTURES / "llama2c_tokenizer"
    golden = json.loads((directory / "golden.json").read_text())
    tokenizer = Llama2cTokenizer(directory / "tokenizer.bin", golden["vocab_size"])
    for case in golden["cases"]:
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert tokenizer.decode([1] + case["ids"]) == case["text"]


def test_llama2c_tokenizer_file_too_short_for_the_model_is_a_clear_error(tmp_path):
    from tinyinfer.loading.llama2c_tokenizer import Llama2cTokenizer

    directory = FIXTURES / "llama2c_tokenizer"
    golden = json.loads((directory / "golden.json").read_text())
    with pytest.raises(tinyinfer.CheckpointError, match=f"of the model's {golden['vocab_size'] + 5} tokens"):
        Llama2cTokenizer(directory / "tokenizer.bin", golden["vocab_size"] + 5)
