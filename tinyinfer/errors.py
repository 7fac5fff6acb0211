"""The errors tinyinfer raises for bad input. Each message says what is wrong and what to do."""


class CheckpointError(ValueError):
    """A model file or directory that cannot be loaded: which file, which key, what was expected."""


class ContextLengthError(ValueError):
    """A prompt (or conversation) that does not fit the model's context window."""


class TokenizerMissingError(RuntimeError):
    """Text was asked of a model loaded without a tokenizer (it works on token ids only)."""

    def __init__(self, what: str):
        super().__init__(
            f"{what} needs a tokenizer, and this model was loaded without one. "
            "Pass tokenizer=PATH to tinyinfer.load (a tokenizer.json, or a llama2.c "
            "tokenizer.bin), or work with token ids: generate([1, 2, 3], ...)."
        )


class KVCacheTooSmallError(ValueError):
    """A request that could never fit the engine's KV cache, even running alone."""
