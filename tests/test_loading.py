"""Loading Hugging Face checkpoints: dtypes, shards, memory mapping, and every bad input."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import tinyinfer
from tinyinfer.loading.safetensors_file import SafetensorsFile, bfloat16_to_float32
from tiny_models import random_hf_tensors, tiny_hf_config, write_hf_model

TOKENS = [1, 5, 9, 13, 40]


def test_bfloat16_widening_is_exact():
    values = np.array([1.0, -2.5, 3.140625, 1e-3, 65280.0], np.float32)
    words = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16
    widened = bfloat16_to_float32(words)
    np.testing.assert_array_equal(widened.view(np.uint32), values.view(np.uint32) & 0xFFFF0000)


def write_bf16_model(directory, config, tensors):
    """Store each float32 tensor as bfloat16 (top 16 bits), the way most real checkpoints ship."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = (array.view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    (directory / "model.safetensors").write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(blobs))
    return directory


def test_bfloat16_checkpoint_loads_as_its_float32_rounding(tmp_path):
    config = tiny_hf_config()
    tensors = random_hf_tensors(config)
    rounded = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in tensors.items()}
    bf16 = tinyinfer.load(write_bf16_model(tmp_path / "bf16", config, tensors))
    f32 = tinyinfer.load(write_hf_model(tmp_path / "f32", config, rounded))
    np.testing.assert_array_equal(bf16.logits(TOKENS), f32.logits(TOKENS))


def test_float16_checkpoint_loads(tmp_path):
    config = tiny_hf_config()
    tensors = {k: v.astype(np.float16) for k, v in random_hf_tensors(config).items()}
    f16 = tinyinfer.load(write_hf_model(tmp_path / "f16", config, tensors))
    f32 = tinyinfer.load(write_hf_model(tmp_path / "f32", config, {k: v.astype(np.float32) for k, v in tensors.items()}))
    np.testing.assert_array_equal(f16.logits(TOKENS), f32.logits(TOKENS))


def test_float32_weights_stay_memory_mapped_not_copied(tiny_llm):
    """The weights are views of the mapped file: loading makes no second copy in RAM."""
    array = tiny_llm.model.weights.layers[0].wq
    assert not array.flags.owndata
    while array.base is not None and not isinstance(array, np.memmap):
        array = array.base
    assert isinstance(array, np.memmap)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tiny_model_dir, tiny_llm):
    tensors = random_hf_tensors(tiny_hf_config())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    np.testing.assert_array_equal(tinyinfer.load(directory).logits(TOKENS), tiny_llm.logits(TOKENS))


def test_unknown_architecture_names_the_file_and_the_supported_ones(tmp_path):
    write_hf_model(tmp_path / "m", tiny_hf_config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(tinyinfer.CheckpointError, match=r"config.json: architectures \['GPT2LMHeadModel'\] is not supported; tinyinfer runs LlamaForCausalLM"):
        tinyinfer.load(tmp_path / "m")


def test_missing_config_key_names_the_key(tmp_path):
    config = tiny_hf_config()
    del config["num_hidden_layers"]
    write_hf_model(tmp_path / "m", config, random_hf_tensors(tiny_hf_config()))
    with pytest.raises(tinyinfer.CheckpointError, match="config.json: missing key 'num_hidden_layers', needed for LlamaForCausalLM"):
        tinyinfer.load(tmp_path / "m")


def test_unsupported_rope_scaling_is_named(tmp_path):
    write_hf_model(tmp_path / "m", tiny_hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(tinyinfer.CheckpointError, match="rope_scaling type 'yarn' is not supported"):
        tinyinfer.load(tmp_path / "m")


def test_missing_extra_and_misshaped_tensors_are_listed_together(tmp_path):
    config = tiny_hf_config()
    tensors = random_hf_tensors(config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # harmless, ignored
    tensors["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
    tensors["model.norm.weight"] = np.zeros(31, np.float32)
    write_hf_model(tmp_path / "m", config, tensors)
    with pytest.raises(tinyinfer.CheckpointError) as error:
        tinyinfer.load(tmp_path / "m")
    message = str(error.value)
    assert "missing tensors:\n  model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors:\n  model.layers.0.mystery.weight" in message
    assert "wrong shape tensors:\n  model.norm.weight: (31,) (expected (32,))" in message
    assert "inv_freq" not in message


def test_truncated_safetensors_file_is_a_clear_error(tmp_path, tiny_model_dir):
    directory = tmp_path / "cut"
    directory.mkdir()
    (directory / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(tinyinfer.CheckpointError, match="lies past the end of the file; is it truncated"):
        tinyinfer.load(directory)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(tinyinfer.CheckpointError, match="no config.json"):
        tinyinfer.load(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(tinyinfer.CheckpointError, match="no such file or directory"):
        tinyinfer.load(tmp_path / "nope")


def test_pickled_pytorch_checkpoints_are_refused_never_unpickled(tmp_path, tiny_model_dir):
    directory = tmp_path / "torch"
    directory.mkdir()
    (directory / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (directory / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(tinyinfer.CheckpointError, match="pickled PyTorch checkpoint.*never unpickles.*safetensors"):
        tinyinfer.load(directory)
    for name, payload in (("model.pt", b"anything"), ("weights.bin", b"PK\x03\x04xx"), ("old.bin", b"\x80\x02\x8a\x0a" + bytes(40))):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(tinyinfer.CheckpointError, match="never unpickles"):
            tinyinfer.load(tmp_path / name)


def test_safetensors_file_reads_shapes_and_dtypes(tiny_model_dir):
    file = SafetensorsFile(tiny_model_dir / "model.safetensors")
    assert file.shape("model.embed_tokens.weight") == (97, 32)
    assert file.stored_dtype("model.embed_tokens.weight") == "F32"


def test_transformers5_rope_parameters_are_read(tmp_path):
    from tinyinfer.config import ModelConfig

    config = tiny_hf_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    del config["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    parsed = ModelConfig.from_hf_config(tmp_path / "config.json")
    assert parsed.rope_theta == 5000.0 and parsed.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_mistral_sliding_window_caps_the_context(tmp_path):
    from tinyinfer.config import ModelConfig

    config = tiny_hf_config(architectures=["MistralForCausalLM"], sliding_window=32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelConfig.from_hf_config(tmp_path / "config.json").max_context == 32
