"""Weight-only quantization: store the matrices in fewer bytes, compute in float32.

Decode reads every weight once per token, so its speed is set by how many bytes the weights
take. Storing them as float16 halves that; int8 with a scale per block of 32 weights (the
Q8_0 format of llama.cpp) nearly quarters it. Activations, norms, the KV cache and the
embedding table stay in the compute dtype: only the matrices that matmul reads shrink.
"""

from dataclasses import dataclass, replace

import numpy as np

BLOCK = 32  # weights per int8 block, as llama.cpp's Q8_0
WEIGHT_FORMATS = ("float32", "float16", "int8")


@dataclass
class Q8Weight:
    """A [out, in] matrix as int8 values and one float32 scale per block of 32 along `in`:
    w[o, i] ~= values[o, i] * scales[o, i // 32]. (llama.cpp keeps the scale in float16, 34
    bytes per block; float32 makes it 36 bytes, 1.125 bytes per weight instead of 4.)"""

    values: np.ndarray  # [out, in] int8
    scales: np.ndarray  # [out, in // 32] float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


def quantize_q8_0(w: np.ndarray) -> Q8Weight:
    """w: [out, in] float, in a multiple of 32 -> Q8Weight. Each block's largest magnitude
    maps to 127; the rounding error of any weight is at most half its block's scale."""
    out_features, in_features = w.shape
    blocks = w.astype(np.float32).reshape(out_features, in_features // BLOCK, BLOCK)
    scales = np.abs(blocks).max(axis=-1) / 127.0  # [out, in // 32]
    safe = np.where(scales == 0, 1.0, scales)[..., None]  # an all-zero block stays zero
    values = np.rint(blocks / safe).astype(np.int8).reshape(out_features, in_features)
    return Q8Weight(values, scales.astype(np.float32))


def dequantize(w: Q8Weight) -> np.ndarray:
    """Q8Weight -> [out, in] float32: each int8 value times its block's scale."""
    out_features, in_features = w.shape
    blocks = w.values.reshape(out_features, in_features // BLOCK, BLOCK).astype(np.float32)
    return (blocks * w.scales[..., None]).reshape(out_features, in_features)


def store_matrix(w: np.ndarray, weight_format: str):
    """One weight matrix [out, in] in the chosen storage format. A matrix whose `in` is not a
    multiple of 32 cannot be cut into Q8_0 blocks and stays in float32 (llama.cpp has the same
    rule); tiny test models meet it, real models do not."""
    if weight_format == "float16":
        return w.astype(np.float16)
    if weight_format == "int8" and w.shape[1] % BLOCK == 0:
        return quantize_q8_0(w)
    return w


MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def store_weights(weights, weight_format: str):
    """ModelWeights with every matmul weight (the layers' matrices and the LM head) stored in
    `weight_format`. The embedding stays as it is: a lookup reads one row per token. With tied
    embeddings the LM head becomes its own stored copy of the embedding."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weights {weight_format!r} is not supported; choose one of {', '.join(WEIGHT_FORMATS)}")
    layers = [replace(layer, **{name: store_matrix(getattr(layer, name), weight_format) for name in MATRICES})
              for layer in weights.layers]
    lm_head = None if weights.lm_head is None else store_matrix(weights.lm_head, weight_format)  # None: a pipeline stage without it
    return replace(weights, layers=layers, lm_head=lm_head)
