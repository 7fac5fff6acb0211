"""Where the model's weights live once loaded, named for what they do (not for any file format).

Every loader (Hugging Face safetensors, llama2.c .bin) fills these, so the forward pass reads
one layout. All matrices are [out_features, in_features], as checkpoints store them.

A device of a parallel group holds only its part (tinyinfer/parallel/sharding.py): the rows or
columns of each matrix that its tensor-parallel rank computes, the layers of its pipeline
stage, and the embedding or the LM head only on the first or the last stage (None elsewhere).
"""

from dataclasses import dataclass, replace

import numpy as np


@dataclass
class LayerWeights:
    attention_norm: np.ndarray  # [hidden]
    wq: np.ndarray  # [num_heads * head_dim, hidden]
    wk: np.ndarray  # [num_kv_heads * head_dim, hidden]
    wv: np.ndarray  # [num_kv_heads * head_dim, hidden]
    wo: np.ndarray  # [hidden, num_heads * head_dim]
    mlp_norm: np.ndarray  # [hidden]
    w_gate: np.ndarray  # [intermediate, hidden]
    w_up: np.ndarray  # [intermediate, hidden]
    w_down: np.ndarray  # [hidden, intermediate]
    bq: np.ndarray | None = None  # [num_heads * head_dim]     (Qwen2)
    bk: np.ndarray | None = None  # [num_kv_heads * head_dim]  (Qwen2)
    bv: np.ndarray | None = None  # [num_kv_heads * head_dim]  (Qwen2)
    q_norm: np.ndarray | None = None  # [head_dim]  (Qwen3)
    k_norm: np.ndarray | None = None  # [head_dim]  (Qwen3)


@dataclass
class ModelWeights:
    embedding: np.ndarray | None  # [vocab, hidden]; None on a pipeline stage that does not embed
    layers: list[LayerWeights]
    final_norm: np.ndarray | None  # [hidden]; None on a pipeline stage before the last
    lm_head: np.ndarray | None  # [vocab, hidden]; the embedding itself when tied; None before the last stage

    def arrays(self):
        """Every distinct weight array once (a tied LM head is the embedding)."""
        seen = {}
        for array in [self.embedding, self.final_norm, self.lm_head]:
            if array is not None:
                seen[id(array)] = array
        for layer in self.layers:
            for array in vars(layer).values():
                if array is not None:
                    seen[id(array)] = array
        return list(seen.values())

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays())

    @property
    def decode_read_bytes(self) -> int:
        """Bytes one decode token reads: every matrix once, in its stored format, except that
        an embedding table gives up only one row (an LM head, even when tied, is read whole)."""
        total = self.nbytes
        if self.embedding is not None and self.lm_head is not self.embedding:
            total -= self.embedding.nbytes - self.embedding[0].nbytes
        return total

    def map(self, function) -> "ModelWeights":
        """The same weights with `function` applied to every array (to move them to a device);
        a tied LM head stays the very same array as the embedding."""
        moved = {id(array): function(array) for array in self.arrays()}

        def move(array):
            return None if array is None else moved[id(array)]

        return ModelWeights(
            embedding=move(self.embedding),
            layers=[replace(layer, **{k: move(v) for k, v in vars(layer).items()}) for layer in self.layers],
            final_norm=move(self.final_norm),
            lm_head=move(self.lm_head),
        )
