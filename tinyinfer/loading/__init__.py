"""Finding out what a path holds and loading it: a Hugging Face directory or a llama2.c .bin.

Whatever the format, the result is the same three things: a ModelConfig, the ModelWeights and
a tokenizer (or None, for a checkpoint that works on token ids only).
"""

from pathlib import Path

from tinyinfer.config import ModelConfig
from tinyinfer.errors import CheckpointError
from tinyinfer.loading.hf_checkpoint import load_hf_weights
from tinyinfer.loading.hf_tokenizer import HFTokenizer
from tinyinfer.loading.llama2c_checkpoint import load_llama2c, read_llama2c_config
from tinyinfer.loading.llama2c_tokenizer import Llama2cTokenizer
from tinyinfer.model.weights import ModelWeights

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive of pickles
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save before 1.6: a pickle starting with a magic number


def _refuse_pickle(path: Path):
    raise CheckpointError(
        f"{path} is a pickled PyTorch checkpoint, and tinyinfer never unpickles (loading a pickle can "
        "run arbitrary code). Convert it to safetensors first, e.g. "
        "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
    )


def load_checkpoint(path, dtype, tokenizer=None, select=None) -> tuple[ModelConfig, ModelWeights, object]:
    """(config, weights in the compute dtype, tokenizer or None) for a model path.

    path: a Hugging Face model directory (config.json + safetensors), or a llama2.c `.bin`.
    tokenizer: a path to override or supply the tokenizer (tokenizer.json, llama2.c tokenizer.bin,
    or a directory holding tokenizer.json); by default a model directory's own tokenizer.json.
    select: config -> WeightSelection, the part of the weights to read (one device's, in a
    parallel group); by default all of them.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        config = ModelConfig.from_hf_config(path / "config.json")
        weights = load_hf_weights(path, config, dtype, select(config) if select else None)
        if tokenizer is None and (path / "tokenizer.json").exists():
            tokenizer = path / "tokenizer.json"
    else:
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic in (ZIP_MAGIC, LEGACY_TORCH_MAGIC):
            _refuse_pickle(path)
        if path.suffix == ".safetensors" or path.name == "config.json":
            raise CheckpointError(f"{path}: pass the model's directory (with config.json), not one file in it")
        config = read_llama2c_config(path)[0]
        config, weights = load_llama2c(path, dtype, select(config) if select else None)
    return config, weights, load_tokenizer(tokenizer, config) if tokenizer is not None else None


def load_config(path) -> ModelConfig:
    """Only the config of a model path (nothing else is read): to check a parallel layout
    before any device loads, or to plan one for a model too big to load here."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return ModelConfig.from_hf_config(path / "config.json")
    if path.name == "config.json":
        return ModelConfig.from_hf_config(path)
    return read_llama2c_config(path)[0]


def load_tokenizer(path, config: ModelConfig):
    """A tokenizer.json (Hugging Face), a tokenizer.bin (llama2.c), or a directory with tokenizer.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer file not found")
    if path.suffix == ".json":
        tokenizer = HFTokenizer(path)
    elif path.suffix == ".bin":
        tokenizer = Llama2cTokenizer(path, config.vocab_size)
    else:
        raise CheckpointError(f"{path}: expected a tokenizer.json or a llama2.c tokenizer.bin")
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}; "
            "is it the tokenizer of this model?"
        )
    return tokenizer
