"""The library's front door: `tinyinfer.load(path)` gives an `LLM` that generates, streams and scores.

Generation goes through the serving engine (tinyinfer/engine/): the prompts of a call, and any
other requests in flight, are batched together step by step over a paged KV cache. Scoring
(`logits`, `perplexity`) runs one prefill pass over a contiguous KV cache.
"""

import os
import reprlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.default_model import CANDIDATES, DEFAULT_MODEL_NAME, default_model_path
from tinyinfer.engine import EngineConfig, LLMEngine
from tinyinfer.errors import ContextLengthError, TokenizerMissingError
from tinyinfer.loading import load_checkpoint
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.transformer import Transformer
from tinyinfer.ops import BACKENDS, get_backend
from tinyinfer.parallel.launch import CheckpointSource, ParallelOptions, launch
from tinyinfer.parallel.router import DataParallelEngine
from tinyinfer.perplexity import Perplexity, perplexity
from tinyinfer.quantize import WEIGHT_FORMATS, store_weights
from tinyinfer.sampling import SamplingParams, as_sampling_params, is_integer
from tinyinfer.sequence import Sequence

COMPUTE_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def load(path=None, backend: str = "numpy", dtype: str = "float32", tokenizer=None, weights: str | None = None,
         threads: int | str = "auto", enforce_eager: bool = False, tp: int = 1, pp: int = 1, dp: int = 1,
         **parallel) -> "LLM":
    """Load a model for inference.

    path: a Hugging Face model directory (config.json, safetensors, tokenizer.json) or a
    llama2.c `.bin` checkpoint; None loads the bundled default model, bard. backend: "numpy"
    (the reference), "numba" or "cupy". dtype: the compute dtype,
    "float32" (default), "float64" (for checking) or "float16" (half the memory; slow in NumPy,
    which has no half-precision matrix kernels). tokenizer: a tokenizer path, needed for text
    with a llama2.c checkpoint (its tokenizer.bin). weights: how the matrices are stored,
    "float32", "float16" or "int8" (blocks of 32 with a scale each, as llama.cpp's Q8_0);
    None keeps them in the compute dtype. Smaller weights make decode faster (it reads every
    weight per token) at a small cost in accuracy. threads: how many CPU threads the kernels
    use, or "auto": the cores other programs leave free, looked at before each forward pass
    (tinyinfer/threads.py; many threads on a busy machine wait for each other). enforce_eager:
    run the model op by op as tinyinfer/model/transformer.py writes it, without the backend's
    compiled form (the Numba backend's compiled layers, the CuPy backend's CUDA graphs of
    decode steps): the same numbers, to compare or to debug (vLLM's name for the switch).

    tp, pp, dp: run on tp x pp x dp devices (tensor parallel, pipeline stages, data-parallel
    replicas; tinyinfer/parallel/). Simulated devices in this process by default; one process
    per device when started under mpiexec. More settings of tinyinfer.parallel.ParallelOptions
    go in **parallel: pp_layers, micro_batches, link, routing, timeout.
    """
    check_load_arguments(path, backend, dtype, tokenizer, weights)
    if dtype not in COMPUTE_DTYPES:
        hint = " (NumPy has no bfloat16; bf16 checkpoints are widened exactly to float32)" if dtype == "bfloat16" else ""
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(COMPUTE_DTYPES)}{hint}")
    path = default_model_path() if path is None else path
    options = ParallelOptions(tp=tp, pp=pp, dp=dp, threads=threads, enforce_eager=enforce_eager, **parallel)
    if options.wanted():
        source = CheckpointSource(path, COMPUTE_DTYPES[dtype], tokenizer)
        return LLM.on_parallel_group(source, options, backend, COMPUTE_DTYPES[dtype], weights, Path(path))
    # the checkpoint first: a bad path is said at once, not after a backend compiles its kernels
    config, model_weights, tokenizer = load_checkpoint(path, COMPUTE_DTYPES[dtype], tokenizer)
    ops = get_backend(backend)
    if weights is not None:
        model_weights = store_weights(model_weights, weights)
    return LLM(config, model_weights, tokenizer, ops, COMPUTE_DTYPES[dtype], Path(path), threads, enforce_eager)


def check_load_arguments(path, backend, dtype, tokenizer, weights):
    """Refuse arguments of the wrong type before anything is read, saying what to pass."""
    for name, value, what in (
        ("path", path, "a model directory or a llama2.c .bin file, or None for the bundled model"),
        ("tokenizer", tokenizer, "a tokenizer.json or llama2.c tokenizer.bin, or None"),
    ):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be {what} (a str or Path), got {described(value)}")
        if value == "":
            raise ValueError(f"{name} is empty: give {what}")
    for name, value, choices in (("backend", backend, BACKENDS), ("dtype", dtype, COMPUTE_DTYPES),
                                 ("weights", weights, WEIGHT_FORMATS)):
        if not (isinstance(value, str) or (name == "weights" and value is None)):
            raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))} (a str), got {described(value)}")


PROMPT_KINDS = "text (a str) or token ids (a list of ints)"


def is_token_ids(value) -> bool:
    """A list or tuple of integers, or a 1-D integer array: a prompt already tokenized."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind in "iu"
    return isinstance(value, (list, tuple)) and all(is_integer(t) for t in value)


def described(value) -> str:
    """A wrong value for an error message: its type and a short repr, "list [1, 'a']"."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def prompt_list(prompts) -> tuple[list, bool]:
    """generate's first argument as a list of prompts, and whether it was a single prompt.
    One prompt is text or a list of token ids; a list of prompts holds either, never both mixed
    in one flat list (["a", 5] is neither)."""
    if isinstance(prompts, str) or (is_token_ids(prompts) and len(prompts) > 0):
        return [prompts], True
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"generate takes a prompt, {PROMPT_KINDS}, or a list of prompts; got {described(prompts)}")
    if any(isinstance(p, str) for p in prompts) and any(is_integer(p) for p in prompts):
        raise TypeError(f"this list mixes text and token ids: {reprlib.repr(prompts)}; pass one prompt, {PROMPT_KINDS}, "
                        "or a list of prompts, each one of those")
    if prompts and not any(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompts):  # meant as ids
        raise TypeError(f"token ids must be integers, got {described(prompts)}")
    for i, prompt in enumerate(prompts):
        if not (isinstance(prompt, str) or is_token_ids(prompt)):
            raise TypeError(f"prompt {i} of the list is {described(prompt)}; each prompt must be {PROMPT_KINDS}")
    return list(prompts), False


class LLM:
    def __init__(self, config: ModelConfig, weights, tokenizer, ops, dtype, path: Path, threads: int | str = "auto",
                 enforce_eager: bool = False):
        ops.set_threads(threads)
        device_weights = ops.load_weights(weights)  # onto the backend's device
        model = Transformer(config, device_weights, ops, dtype)
        if not enforce_eager:
            model = ops.compile_model(model)
        self._attach(config, model, tokenizer, ops, dtype, path)

    @classmethod
    def on_model(cls, config: ModelConfig, model, tokenizer, ops, dtype, path) -> "LLM":
        """An LLM over a model that is already built (a ParallelModel: the driver's view of a
        parallel group). config: the whole model's."""
        llm = cls.__new__(cls)
        llm._attach(config, model, tokenizer, ops, dtype, path)
        return llm

    @classmethod
    def on_parallel_group(cls, source, options, backend: str, dtype, weights: str | None, path) -> "LLM":
        """Start a parallel group (tinyinfer/parallel/launch.py) and return the LLM its driver
        runs. source: a CheckpointSource or InMemorySource."""
        config, model, tokenizer, group = launch(source, options, backend, dtype, weights)
        llm = cls.on_model(config, model, tokenizer, model.ops, dtype, path)
        llm.parallel = group
        return llm

    def _attach(self, config: ModelConfig, model, tokenizer, ops, dtype, path):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.ops = ops
        self.dtype = np.dtype(dtype)
        self.path = path
        eos = list(config.eos_token_ids) + (tokenizer.eos_token_ids if tokenizer else [])
        self.eos_token_ids = sorted(set(eos))
        self.parallel = None  # the ParallelGroup when the model runs on several devices
        self._engine = None

    @property
    def name(self) -> str:
        """What to call the model in banners and tables: "bard" for the bundled model (wherever
        it is installed; a wheel puts it in tinyinfer/bundled_model/), else the name of its
        directory or .bin file."""
        if self.path is None:
            return "model"
        if os.path.realpath(self.path) in {os.path.realpath(candidate) for candidate in CANDIDATES}:
            return DEFAULT_MODEL_NAME
        return Path(os.path.abspath(self.path)).name

    def close(self):
        """Stop the other devices of a parallel group (a no-op on one device)."""
        if self.parallel is not None:
            self.parallel.close()

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
        if isinstance(prompt, str):
            ids = self.encode(prompt) if prompt else []
        elif is_token_ids(prompt):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"a prompt must be {PROMPT_KINDS}, got {described(prompt)}")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        self.check_vocabulary(ids)
        if len(ids) >= self.config.max_context:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, but the model's context window is "
                f"{self.config.max_context} tokens (prompt and output together); shorten the prompt"
            )
        return ids

    def check_vocabulary(self, ids: list[int]):
        """Token ids must index the embedding table: [0, vocab_size)."""
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")

    # ---- generation ----------------------------------------------------------------------
    def new_sequence(self, prompt, params: SamplingParams, cache) -> Sequence:
        """A request ready to run, its keys and values going to `cache` (an engine BlockTable,
        or a contiguous KVCache)."""
        params = as_sampling_params(params)
        ids = self.prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise TokenizerMissingError("Stop strings")
        stop_strings = self.config.stop_strings if self.tokenizer else []
        return Sequence(ids, params, cache, self.tokenizer, self.eos_token_ids, self.config.max_context, stop_strings)

    @property
    def engine(self) -> LLMEngine:
        """The serving engine behind generate, stream and chat, made on first use (its KV block
        pool takes memory). Change its settings with llm.engine = llm.new_engine(EngineConfig(...))."""
        if self._engine is None:
            self._engine = self.new_engine()
        return self._engine

    def new_engine(self, config: EngineConfig | None = None):
        """A serving engine for this model: an LLMEngine, or with dp > 1 replicas the router
        that hands requests to their engines (tinyinfer/parallel/router.py), with the same calls."""
        if self.parallel is not None and self.parallel.data_group is not None:
            if self.parallel.router is None:
                self.parallel.router = DataParallelEngine(self, self.parallel.data_group, self.parallel.routing, config)
            else:
                self.parallel.router.configure(config or EngineConfig())
            return self.parallel.router
        return LLMEngine(self, config)

    @engine.setter
    def engine(self, engine: LLMEngine):
        self._engine = engine

    def generate(self, prompts, params: SamplingParams | None = None):
        """Generate for one prompt (text or a list of token ids) or a list of them, all served
        together by the engine (continuous batching).

        One prompt in gives one GenerationOutput; a list of prompts gives a list, in order."""
        params = as_sampling_params(params)
        prompts, single = prompt_list(prompts)
        request_ids = []
        try:
            for prompt in prompts:
                request_ids.append(self.engine.add_request(prompt, params))
        except Exception:
            for request_id in request_ids:  # a bad prompt in the list: the others do not run
                self.engine.abort(request_id)
            raise
        outputs, mine = {}, set(request_ids)
        try:
            while len(outputs) < len(request_ids):
                for update in self.engine.step():  # other requests in flight may finish too
                    if update.finished and update.request_id in mine:
                        outputs[update.request_id] = update.output
        except BaseException:  # Ctrl-C (between steps) or a failure: these requests stop here
            for request_id in mine - outputs.keys():
                self.engine.abort(request_id)
            raise
        results = [outputs[i] for i in request_ids]
        return results[0] if single else results

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as soon as they are decoded."""
        if self.tokenizer is None:
            raise TokenizerMissingError("Streaming text")
        yield from self.stream_request(self.engine.add_request(prompt, as_sampling_params(params)))

    def stream_request(self, request_id: int) -> Iterator[str]:
        """Step the engine, yielding the text pieces of one request until it is done. Stopping
        early (closing the generator, Ctrl-C) aborts the request."""
        try:
            while True:
                for update in self.engine.step():
                    if update.request_id != request_id:
                        continue
                    if update.new_text:
                        yield update.new_text
                    if update.finished:
                        return
        finally:
            self.engine.abort(request_id)  # a no-op once it has finished

    # ---- scoring -------------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[len(token_ids), vocab] float32: the next-token logits at every position, from one
        prefill pass (row i predicts token i + 1)."""
        if isinstance(token_ids, str):
            raise TypeError("logits takes token ids; encode text with llm.encode(text)")
        if not is_token_ids(token_ids):
            raise TypeError(f"logits takes token ids (a list of ints), got {described(token_ids)}")
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("logits needs at least one token id")
        if len(ids) > self.config.max_context:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context window of {self.config.max_context}")
        self.check_vocabulary(ids)
        cache = self.model.new_kv_cache(len(ids))
        return self.model.forward(ForwardBatch.build([ids], [cache]), all_logits=True)

    def perplexity(self, text, context: int | None = None, max_chunks: int | None = None,
                   progress: bool = False) -> Perplexity:
        """How well the model predicts a text (or a list of token ids): the mean next-token
        cross-entropy over non-overlapping windows of `context` tokens (default: the model's
        context window), and its exponential. See tinyinfer/perplexity.py."""
        if not (isinstance(text, str) or is_token_ids(text)):
            raise TypeError(f"perplexity takes {PROMPT_KINDS}, got {described(text)}")
        if context is not None and not is_integer(context):
            raise TypeError(f"context must be a number of tokens (an int), or None for the model's window; "
                            f"got {described(context)}")
        if context is not None and not 2 <= context <= self.config.max_context:  # 0 must not mean "the default"
            raise ValueError(f"context must be between 2 and the model's context window ({self.config.max_context}), "
                             f"got {context}")
        if max_chunks is not None and not (is_integer(max_chunks) and max_chunks >= 1):
            raise ValueError(f"max_chunks must be an int >= 1, or None for every window; got {described(max_chunks)}")
        return perplexity(self, text, context, max_chunks, progress)

