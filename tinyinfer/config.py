"""ModelConfig: the numbers that fix a transformer's shape, read from a checkpoint.

Hugging Face keeps them in `config.json`; llama2.c keeps seven of them in the header of its
`.bin` file. Both become the same `ModelConfig`, so the model code never sees where they came
from.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from tinyinfer.errors import CheckpointError

# architecture name in config.json -> what differs from plain Llama
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},  # Qwen2 always has biases on q, k, v
    "Qwen3ForCausalLM": {"qk_norm": True},  # RMSNorm on each head of q and k
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int  # "dim" in llama2.c: width of the residual stream
    intermediate_size: int  # width of the MLP's hidden layer
    num_layers: int
    num_heads: int
    num_kv_heads: int  # fewer than num_heads means grouped-query attention
    head_dim: int
    max_context: int  # the longest sequence (prompt + output) the model can attend over
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False  # the LM head reuses the token embedding matrix
    attention_bias: bool = False  # q, k, v projections have biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)  # generation_config.json's default stops

    @property
    def num_parameters(self) -> int:
        """Parameters counted from the shapes (a tied LM head is counted once)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attention += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attention += 2 * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attention + mlp + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    @classmethod
    def from_hf_config(cls, path: Path) -> "ModelConfig":
        """Read a Hugging Face `config.json`; unknown architectures and missing keys are errors."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json; a Hugging Face model directory needs one") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None

        architectures = raw.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise CheckpointError(
                f"{path}: architectures {architectures} is not supported; "
                f"tinyinfer runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def require(key):
            if key not in raw:
                raise CheckpointError(f"{path}: missing key {key!r}, needed for {architecture}")
            return raw[key]

        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise CheckpointError(f"{path}: hidden_act {hidden_act!r} is not supported; only 'silu' (SwiGLU)")

        num_heads = require("num_attention_heads")
        hidden_size = require("hidden_size")
        rope_theta, rope_scaling = _read_rope(raw, path)
        max_context = raw.get("max_position_embeddings", 2048)
        # Mistral v0.1 attends only to the last `sliding_window` tokens. Within the window that is
        # full attention, so capping the context there is exact (and tinyinfer says so in `info`).
        uses_window = raw.get("use_sliding_window", architecture == "MistralForCausalLM")
        if uses_window and raw.get("sliding_window"):
            max_context = min(max_context, raw["sliding_window"])

        generation = _read_json_if_present(Path(path).parent / "generation_config.json")
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        extra = SUPPORTED_ARCHITECTURES[architecture]
        return cls(
            architecture=architecture,
            vocab_size=require("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=require("intermediate_size"),
            num_layers=require("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden_size // num_heads,
            max_context=max_context,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=extra.get("attention_bias", raw.get("attention_bias", False)),
            qk_norm=extra.get("qk_norm", False),
            bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
            eos_token_ids=_as_list(eos),
            stop_strings=_as_list(generation.get("stop_strings")),
        )


def _read_rope(raw: dict, path) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling, from the keys of transformers 4 (`rope_theta`,
    `rope_scaling`) or transformers 5 (`rope_parameters`, which holds both)."""
    parameters = dict(raw.get("rope_parameters") or {})
    theta = parameters.pop("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = parameters or raw.get("rope_scaling")
    if not scaling:
        return float(theta), None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{path}: rope_scaling type {rope_type!r} is not supported; "
            f"tinyinfer supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def _read_json_if_present(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
