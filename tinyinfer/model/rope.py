"""Rotary position embedding: the rotation frequency of each pair of dimensions.

Pair i of a head turns by angle `position * inv_freq[i]`, with inv_freq falling geometrically
from 1 to about 1/rope_theta. Long-context models stretch the slow frequencies ("rope
scaling") so positions past the training length still map to angles the model has seen.
"""

import numpy as np

from tinyinfer.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float64: the angular frequency of each rotated pair."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = 1.0 / config.rope_theta**exponents
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        # position interpolation: every position is divided by the factor
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope type {scaling['rope_type']!r} is not supported")


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1's scaling: slow frequencies (wavelength longer than the original context /
    low_freq_factor) are divided by `factor`, fast ones (shorter than context /
    high_freq_factor) are kept, and the band between is blended smoothly."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]

    wavelength = 2 * np.pi / inv_freq
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(in_between, blended, scaled)


def rope_tables(config: ModelConfig, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every angle the model can need: two [max_context, head_dim // 2] tables,
    computed once at load; a forward pass picks the rows of its tokens' positions."""
    positions = np.arange(config.max_context, dtype=np.float64)
    angles = np.outer(positions, rope_inv_freq(config))
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
