"""Loading a Hugging Face model directory: config.json plus safetensors weights.

Tensor names follow transformers' Llama layout (`model.layers.0.self_attn.q_proj.weight`, ...),
shared by Mistral, Qwen2 and Qwen3. Every expected tensor must be present with its expected
shape; anything missing, extra or mis-shaped is reported all at once, by name.
"""

import json
from pathlib import Path


from tinyinfer.config import ModelConfig
from tinyinfer.errors import CheckpointError
from tinyinfer.loading.safetensors_file import SafetensorsFile
from tinyinfer.loading.selection import WeightSelection
from tinyinfer.model.weights import LayerWeights, ModelWeights

PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")
# tensors some checkpoints carry that are recomputed, not learned
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_heads * head_dim, config.num_kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_size, hidden),
            p + "self_attn.k_proj.weight": (kv_size, hidden),
            p + "self_attn.v_proj.weight": (kv_size, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_size),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (config.intermediate_size, hidden),
            p + "mlp.up_proj.weight": (config.intermediate_size, hidden),
            p + "mlp.down_proj.weight": (hidden, config.intermediate_size),
        }
        if config.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_size,),
                p + "self_attn.k_proj.bias": (kv_size,),
                p + "self_attn.v_proj.bias": (kv_size,),
            }
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)}
    return shapes


def find_weight_files(model_dir: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the open file that holds it, from model.safetensors or a sharded index."""
    index_path = model_dir / "model.safetensors.index.json"
    single_path = model_dir / "model.safetensors"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index_path}: expected a JSON object with a 'weight_map'") from None
        files = {}
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).exists():
                raise CheckpointError(f"{index_path}: names shard {shard!r}, which is not in {model_dir}")
            files[shard] = SafetensorsFile(model_dir / shard)
        return {name: files[shard] for name, shard in weight_map.items()}
    if single_path.exists():
        file = SafetensorsFile(single_path)
        return {name: file for name in file.names()}
    pickled = [name for name in PICKLED_WEIGHT_FILES if (model_dir / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{model_dir / pickled[0]} is a pickled PyTorch checkpoint, and tinyinfer never unpickles "
            "(loading a pickle can run arbitrary code). Convert it to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def load_hf_weights(model_dir: Path, config: ModelConfig, dtype, selection: WeightSelection | None = None) -> ModelWeights:
    """Read and check every tensor, converting to the compute dtype (a view, where it matches).
    selection: the part of the model to read (one device's, in a parallel group); default all.
    The whole checkpoint's names and shapes are checked either way."""
    selection = selection or WeightSelection(config.num_layers)
    files = find_weight_files(model_dir)
    expected = expected_shapes(config)
    present = {name for name in files if not name.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing = sorted(expected.keys() - present)
    extra = sorted(present - expected.keys())
    misshaped = [
        f"{name}: {files[name].shape(name)} (expected {expected[name]})"
        for name in sorted(expected.keys() & present)
        if files[name].shape(name) != expected[name]
    ]
    if missing or extra or misshaped:
        problems = []
        for title, items in (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped)):
            if items:
                shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
                problems.append(f"{title} tensors:\n  " + "\n  ".join(shown))
        raise CheckpointError(
            f"{model_dir}: the weights do not match config.json ({config.architecture}, "
            f"{config.num_layers} layers, hidden {config.hidden_size}):\n" + "\n".join(problems)
        )

    def read(name, field):
        return files[name].read(name, dtype, lambda array: selection.pick(field, array))

    def read_if_expected(name, field):  # biases (Qwen2) and q/k norms (Qwen3) exist only in some models
        return read(name, field) if name in expected else None

    layers = []
    for i in selection.layers:
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                attention_norm=read(p + "input_layernorm.weight", "attention_norm"),
                wq=read(p + "self_attn.q_proj.weight", "wq"),
                wk=read(p + "self_attn.k_proj.weight", "wk"),
                wv=read(p + "self_attn.v_proj.weight", "wv"),
                wo=read(p + "self_attn.o_proj.weight", "wo"),
                mlp_norm=read(p + "post_attention_layernorm.weight", "mlp_norm"),
                w_gate=read(p + "mlp.gate_proj.weight", "w_gate"),
                w_up=read(p + "mlp.up_proj.weight", "w_up"),
                w_down=read(p + "mlp.down_proj.weight", "w_down"),
                bq=read_if_expected(p + "self_attn.q_proj.bias", "bq"),
                bk=read_if_expected(p + "self_attn.k_proj.bias", "bk"),
                bv=read_if_expected(p + "self_attn.v_proj.bias", "bv"),
                q_norm=read_if_expected(p + "self_attn.q_norm.weight", "q_norm"),
                k_norm=read_if_expected(p + "self_attn.k_norm.weight", "k_norm"),
            )
        )
    embedding = read("model.embed_tokens.weight", "embedding") if selection.embedding else None
    lm_head, final_norm = None, None
    if selection.head:
        final_norm = read("model.norm.weight", "final_norm")
        if not config.tie_word_embeddings:
            lm_head = read("lm_head.weight", "lm_head")
        else:  # the embedding itself; a last pipeline stage that does not embed reads its own copy
            lm_head = embedding if embedding is not None else read("model.embed_tokens.weight", "lm_head")
    return ModelWeights(embedding=embedding, layers=layers, final_norm=final_norm, lm_head=lm_head)


def stored_dtypes(model_dir: Path) -> list[str]:
    """The dtypes the checkpoint's tensors are stored in, e.g. ["BF16"] (for `tinyinfer info`)."""
    files = find_weight_files(model_dir)
    return sorted({file.stored_dtype(name) for name, file in files.items()})
