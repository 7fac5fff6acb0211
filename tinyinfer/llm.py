"""The library's front door: `tinyinfer.load(path)` gives an `LLM` that generates, streams and scores.

For now one call runs its prompts together as one batch: a single prefill pass over every
prompt, then decode steps for all running sequences at once, each with its own KV cache.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.default_model import default_model_path
from tinyinfer.errors import ContextLengthError, TokenizerMissingError
from tinyinfer.kv_cache import KVCache
from tinyinfer.loading import load_checkpoint
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer
from tinyinfer.ops import get_backend
from tinyinfer.perplexity import Perplexity, perplexity
from tinyinfer.quantize import store_weights
from tinyinfer.sampling import SamplingParams, sample
from tinyinfer.sequence import Sequence

COMPUTE_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def load(path=None, backend: str = "numpy", dtype: str = "float32", tokenizer=None, weights: str | None = None) -> "LLM":
    """Load a model for inference.

    path: a Hugging Face model directory (config.json, safetensors, tokenizer.json) or a
    llama2.c `.bin` checkpoint; None loads the bundled default model, bard. backend: "numpy" (the reference). dtype: the compute dtype,
    "float32" (default), "float64" (for checking) or "float16" (half the memory; slow in NumPy,
    which has no half-precision matrix kernels). tokenizer: a tokenizer path, needed for text
    with a llama2.c checkpoint (its tokenizer.bin). weights: how the matrices are stored,
    "float32", "float16" or "int8" (blocks of 32 with a scale each, as llama.cpp's Q8_0);
    None keeps them in the compute dtype. Smaller weights make decode faster (it reads every
    weight per token) at a small cost in accuracy.
    """
    if dtype not in COMPUTE_DTYPES:
        hint = " (NumPy has no bfloat16; bf16 checkpoints are widened exactly to float32)" if dtype == "bfloat16" else ""
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(COMPUTE_DTYPES)}{hint}")
    ops = get_backend(backend)
    path = default_model_path() if path is None else path
    config, model_weights, tokenizer = load_checkpoint(path, COMPUTE_DTYPES[dtype], tokenizer)
    if weights is not None:
        model_weights = store_weights(model_weights, weights)
    return LLM(config, model_weights, tokenizer, ops, COMPUTE_DTYPES[dtype], Path(path))


class LLM:
    def __init__(self, config: ModelConfig, weights, tokenizer, ops, dtype, path: Path):
        self.config = config
        self.tokenizer = tokenizer
        self.ops = ops
        self.dtype = np.dtype(dtype)
        self.path = path
        device_weights = weights.map(ops.to_device)  # onto the backend's device
        self.model = Transformer(config, device_weights, ops, dtype)
        eos = list(config.eos_token_ids) + (tokenizer.eos_token_ids if tokenizer else [])
        self.eos_token_ids = sorted(set(eos))

    # ---- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerMissingError("Encoding text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            raise TokenizerMissingError("Decoding to text")
        return self.tokenizer.decode(token_ids)

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt as token ids: text is encoded (with the tokenizer's BOS), ids are checked."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_context:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, but the model's context window is "
                f"{self.config.max_context} tokens (prompt and output together); shorten the prompt"
            )
        return ids

    # ---- generation ----------------------------------------------------------------------
    def new_sequence(self, prompt, params: SamplingParams, cache: KVCache | None = None) -> Sequence:
        """A request ready to run. `cache` may already hold a prefix of the prompt (chat turns)."""
        ids = self.prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise TokenizerMissingError("Stop strings")
        if cache is None:
            capacity = min(self.config.max_context, len(ids) + params.max_tokens)
            cache = KVCache(self.config, capacity, self.ops, self.dtype)
        stop_strings = self.config.stop_strings if self.tokenizer else []
        return Sequence(ids, params, cache, self.tokenizer, self.eos_token_ids, self.config.max_context, stop_strings)

    def run(self, sequences: list[Sequence]) -> Iterator[None]:
        """Step all sequences to the end, yielding after each step (so callers can stream).

        The first step prefills every prompt in one forward pass; each later step decodes one
        token for every sequence still running, all in one forward pass."""
        running = [s for s in sequences if not s.finished]
        while running:
            batch = ForwardBatch.build([s.tokens_to_feed() for s in running], [s.cache for s in running])
            logits = self.model.forward(batch)  # [len(running), vocab]
            for sequence, row in zip(running, logits):
                seen = sequence.prompt_ids + sequence.output_ids
                sequence.append(sample(row, sequence.params, sequence.rng, seen))
            yield
            running = [s for s in running if not s.finished]

    def generate(self, prompts, params: SamplingParams | None = None):
        """Generate for one prompt (text or a list of token ids) or a list of them.

        One prompt in gives one GenerationOutput; a list of prompts gives a list, in order."""
        params = params or SamplingParams()
        single = isinstance(prompts, str) or (len(prompts) > 0 and not isinstance(prompts[0], (str, list, tuple)))
        batch = [prompts] if single else list(prompts)
        sequences = [self.new_sequence(p, params) for p in batch]
        for _ in self.run(sequences):
            pass
        outputs = [s.output(self.tokenizer is not None) for s in sequences]
        return outputs[0] if single else outputs

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as soon as they are decoded."""
        if self.tokenizer is None:
            raise TokenizerMissingError("Streaming text")
        sequence = self.new_sequence(prompt, params or SamplingParams())
        yield from self.stream_sequence(sequence)

    def stream_sequence(self, sequence: Sequence) -> Iterator[str]:
        for _ in self.run([sequence]):
            piece = sequence.take_new_text()
            if piece:
                yield piece

    # ---- scoring -------------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[len(token_ids), vocab] float32: the next-token logits at every position, from one
        prefill pass (row i predicts token i + 1)."""
        ids = [int(t) for t in token_ids]
        if len(ids) > self.config.max_context:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context window of {self.config.max_context}")
        self.prompt_ids(ids[:1])  # range-checks come from the same place as for prompts
        cache = KVCache(self.config, len(ids), self.ops, self.dtype)
        return self.model.forward(ForwardBatch.build([ids], [cache]), all_logits=True)

    def perplexity(self, text, context: int | None = None, max_chunks: int | None = None,
                   progress: bool = False) -> Perplexity:
        """How well the model predicts a text (or a list of token ids): the mean next-token
        cross-entropy over non-overlapping windows of `context` tokens (default: the model's
        context window), and its exponential. See tinyinfer/perplexity.py."""
        return perplexity(self, text, context, max_chunks, progress)

