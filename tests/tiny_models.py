"""Tiny random models written to disk in real checkpoint formats, for tests that need weights.

Written with the `safetensors` package and plain NumPy (no torch), in Hugging Face layout or
llama2.c's legacy .bin layout, so the loaders are exercised on real files.
"""

import json
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def tiny_hf_config(**overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(overrides)
    return config


def random_hf_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with the names and shapes transformers' Llama uses."""
    rng = np.random.default_rng(seed)
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(config["vocab_size"], hidden, scale=1.0), "model.norm.weight": 1 + w(hidden, scale=0.1)}
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = w(config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + w(hidden, scale=0.1),
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": 1 + w(hidden, scale=0.1),
            p + "mlp.gate_proj.weight": w(inner, hidden),
            p + "mlp.up_proj.weight": w(inner, hidden),
            p + "mlp.down_proj.weight": w(hidden, inner),
        }
    return tensors


def write_hf_model(directory: Path, config: dict | None = None, tensors: dict | None = None, seed: int = 0) -> Path:
    """A Hugging Face model directory (config.json + model.safetensors) with random weights."""
    config = config or tiny_hf_config()
    tensors = tensors if tensors is not None else random_hf_tensors(config, seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def half_to_interleaved_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama2.c's export (`permute_reverse`): HF rows (i, i + head_dim/2) -> neighbours (2i, 2i+1).
    Written here independently of the loader, which must undo exactly this."""
    rows, dim = w.shape
    return w.reshape(num_heads, 2, rows // num_heads // 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def write_llama2c_model(path: Path, config: dict, tensors: dict, shared_classifier: bool) -> Path:
    """The same weights as an HF model, in llama2.c's legacy .bin layout (as export.py writes it)."""
    layers = range(config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    vocab = config["vocab_size"] if shared_classifier else -config["vocab_size"]
    header = struct.pack(
        "7i", config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
        heads, kv_heads, vocab, config["max_position_embeddings"],
    )

    def per_layer(name, permute_heads=None):
        arrays = [tensors[f"model.layers.{i}.{name}"] for i in layers]
        return [half_to_interleaved_rotary(a, permute_heads) if permute_heads else a for a in arrays]

    parts = [tensors["model.embed_tokens.weight"]]
    parts += per_layer("input_layernorm.weight")
    parts += per_layer("self_attn.q_proj.weight", heads)
    parts += per_layer("self_attn.k_proj.weight", kv_heads)
    parts += per_layer("self_attn.v_proj.weight")
    parts += per_layer("self_attn.o_proj.weight")
    parts += per_layer("post_attention_layernorm.weight")
    parts += per_layer("mlp.gate_proj.weight")  # w1
    parts += per_layer("mlp.down_proj.weight")  # w2
    parts += per_layer("mlp.up_proj.weight")  # w3
    parts += [tensors["model.norm.weight"], np.zeros(config["max_position_embeddings"] * head_dim, np.float32)]
    if not shared_classifier:
        parts.append(tensors["lm_head.weight"])
    path.write_bytes(header + b"".join(np.ascontiguousarray(p, dtype=np.float32).tobytes() for p in parts))
    return path
