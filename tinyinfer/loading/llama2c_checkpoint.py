"""Loading llama2.c checkpoints: the legacy `.bin` layout that llama2.c's run.c reads.

The file is a header of seven int32 numbers (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len) followed by float32 weights in a fixed order. A negative vocab_size means
the classifier is stored separately at the end instead of reusing the token embedding.

One real difference from Hugging Face checkpoints: llama2.c rotates neighbouring dimensions
(2i, 2i+1) of each head, while Hugging Face rotates i with i + head_dim/2. We reorder the rows
of wq and wk once at load (the inverse of what llama2.c's export does), after which the single
`rotary` op gives exactly run.c's numbers.
"""

from pathlib import Path

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.errors import CheckpointError
from tinyinfer.loading.selection import WeightSelection
from tinyinfer.model.weights import LayerWeights, ModelWeights

HEADER_INTS = 7
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export formats (--version 1 or 2)


def read_llama2c_config(path: Path) -> tuple[ModelConfig, bool]:
    """(config, shared_classifier) from the header, checked against the file's size."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header.size < HEADER_INTS:
        raise CheckpointError(f"{path}: too short for a llama2.c checkpoint header (7 int32)")
    if header[0] == VERSIONED_MAGIC:
        raise CheckpointError(
            f"{path}: this is llama2.c's versioned export format (magic 'ak42'); tinyinfer reads the "
            "legacy format that run.c reads. Re-export with `python export.py --version 0 ...`."
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = (int(v) for v in header)
    shared_classifier = vocab_size > 0
    vocab_size = abs(vocab_size)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise CheckpointError(
            f"{path}: header (dim={dim}, hidden_dim={hidden_dim}, n_layers={n_layers}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv_heads}, vocab_size={vocab_size}, seq_len={seq_len}) is not a valid llama2.c "
            "model; is this a llama2.c .bin checkpoint?"
        )
    config = ModelConfig(
        architecture="llama2.c",
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv_heads,
        head_dim=dim // n_heads,
        max_context=seq_len,
        rms_norm_eps=1e-5,  # run.c's rmsnorm
        rope_theta=10000.0,
        tie_word_embeddings=shared_classifier,
        bos_token_id=1,
        eos_token_ids=[2],
    )
    expected = 4 * (HEADER_INTS + _float_count(config, shared_classifier))
    actual = path.stat().st_size
    if actual != expected:
        raise CheckpointError(
            f"{path}: {actual} bytes, but its header describes a model of {expected} bytes; "
            "the file is truncated or not a legacy llama2.c checkpoint"
        )
    return config, shared_classifier


def _float_count(config: ModelConfig, shared_classifier: bool) -> int:
    dim, hidden, layers = config.hidden_size, config.intermediate_size, config.num_layers
    kv_dim = config.num_kv_heads * config.head_dim
    per_layer = 2 * dim + 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden
    old_rope_tables = config.max_context * config.head_dim  # freq_cis_real + freq_cis_imag, unused
    classifier = 0 if shared_classifier else config.vocab_size * dim
    return config.vocab_size * dim + layers * per_layer + dim + old_rope_tables + classifier


def interleaved_to_half_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection [num_heads * head_dim, dim] so that the rotary
    pair (2i, 2i+1) of each head becomes the pair (i, i + head_dim/2)."""
    rows, dim = w.shape
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def load_llama2c(path: Path, dtype, selection: WeightSelection | None = None) -> tuple[ModelConfig, ModelWeights]:
    """(config, weights) of a legacy llama2.c checkpoint; selection: the part to read (one
    device's, in a parallel group), by default all of it."""
    path = Path(path)
    config, shared_classifier = read_llama2c_config(path)
    selection = selection or WeightSelection(config.num_layers)
    floats = np.memmap(path, dtype=np.float32, mode="r", offset=4 * HEADER_INTS)
    dim, hidden, layers = config.hidden_size, config.intermediate_size, config.num_layers
    kv_dim = config.num_kv_heads * config.head_dim
    offset = 0

    def take(*shape):
        """The next tensor of this shape from the file, in the order run.c maps them."""
        nonlocal offset
        count = int(np.prod(shape))
        array = floats[offset : offset + count].reshape(shape)
        offset += count
        return array

    embedding = take(config.vocab_size, dim)
    attention_norm = take(layers, dim)
    wq, wk, wv = take(layers, dim, dim), take(layers, kv_dim, dim), take(layers, kv_dim, dim)
    wo = take(layers, dim, dim)
    mlp_norm = take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    final_norm = take(dim)
    take(config.max_context * config.head_dim)  # skip the old freq_cis tables
    lm_head = embedding if shared_classifier else take(config.vocab_size, dim)

    def read(field, array):
        """This device's part of a stored tensor, in the compute dtype."""
        return selection.pick(field, array).astype(dtype, copy=False)

    def read_rotary(field, array):
        """q or k rows of whole heads, reordered head by head to the half-split rotary pairing."""
        picked = selection.pick(field, array)
        return interleaved_to_half_rotary(picked, picked.shape[0] // config.head_dim).astype(dtype, copy=False)

    model_layers = [
        LayerWeights(
            attention_norm=read("attention_norm", attention_norm[i]),
            wq=read_rotary("wq", wq[i]),
            wk=read_rotary("wk", wk[i]),
            wv=read("wv", wv[i]),
            wo=read("wo", wo[i]),
            mlp_norm=read("mlp_norm", mlp_norm[i]),
            w_gate=read("w_gate", w1[i]),
            w_up=read("w_up", w3[i]),
            w_down=read("w_down", w2[i]),
        )
        for i in selection.layers
    ]
    embedding_read = read("embedding", embedding) if selection.embedding else None
    final_norm_read, lm_head_read = None, None
    if selection.head:
        final_norm_read = read("final_norm", final_norm)
        if shared_classifier and embedding_read is not None:
            lm_head_read = embedding_read  # tied: the embedding itself
        else:
            lm_head_read = read("lm_head", lm_head)
    weights = ModelWeights(embedding=embedding_read, layers=model_layers, final_norm=final_norm_read,
                           lm_head=lm_head_read)
    return config, weights
