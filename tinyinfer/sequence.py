"""One request's state while it generates: its tokens, its text, its cache, when it must stop."""

import time

import numpy as np

from tinyinfer.detokenizer import IncrementalDetokenizer
from tinyinfer.kv_cache import KVCache
from tinyinfer.outputs import GenerationOutput
from tinyinfer.sampling import SamplingParams


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, cache: KVCache, tokenizer, eos_token_ids,
                 max_context: int, model_stop_strings=()):
        self.request_id: int | None = None  # given by the engine
        self.virtual_engine = 0  # which of the engine's in-flight step streams it belongs to (scheduler.py)
        self.prompt_ids = list(prompt_ids)
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.output_ids: list[int] = []
        self.params = params
        self.cache = cache
        self.max_context = max_context
        self.rng = np.random.default_rng(params.seed)
        # the model's own end markers (EOS ids, generation_config.json's stop strings) unless
        # ignore_eos; the caller's stop ids and strings always
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.stop_strings = list(params.stop) + ([] if params.ignore_eos else list(model_stop_strings))
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids) if tokenizer else None
        self.text = ""  # the decoded output, cut before a stop string when one appears
        self.streamed = 0  # characters of text already handed to the caller
        self.finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length" or "abort"
        self.start_time = time.perf_counter()
        self.token_times: list[float] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cut_by_context(self) -> bool:
        """Whether the context window ended the output: finish_reason "length" with fewer than
        max_tokens generated, because prompt and output filled max_context."""
        return self.finish_reason == "length" and len(self.output_ids) < self.params.max_tokens

    @property
    def token_ids(self) -> list[int]:
        """Every token so far: the prompt, then the output."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens_to_feed(self) -> list[int]:
        """The tokens the next forward pass must run: the uncached part of the prompt at first
        (prefill), then the one token sampled last (decode)."""
        return self.token_ids[self.cache.length :]

    def append(self, token_id: int):
        """Record a sampled token and decide whether the sequence is done."""
        self.token_times.append(time.perf_counter())
        self.output_ids.append(token_id)
        hit_stop_token = token_id in self.stop_ids
        if self.detokenizer is not None and not hit_stop_token:
            self._add_text(self.detokenizer.add(token_id))  # may end it on a stop string
        out_of_room = (
            len(self.output_ids) >= self.params.max_tokens
            or len(self.prompt_ids) + len(self.output_ids) >= self.max_context
        )
        if not self.finished and (hit_stop_token or out_of_room):
            if self.detokenizer is not None:
                self._add_text(self.detokenizer.flush())
            if not self.finished:
                self.finish_reason = "stop" if hit_stop_token else "length"

    def _add_text(self, piece: str):
        if not piece or self.finished:
            return
        search_from = max(0, len(self.text) - self._longest_stop() + 1)
        self.text += piece
        for stop in self.stop_strings:
            index = self.text.find(stop, search_from)
            if index >= 0:
                self.text = self.text[:index]
                self.finish_reason = "stop"
                return

    def _longest_stop(self) -> int:
        return max((len(s) for s in self.stop_strings), default=0)

    def take_new_text(self) -> str:
        """Text not yet streamed. While running, the last characters that could still be the
        start of a stop string are held back, so a stop string is never half-printed."""
        hold = 0 if self.finished else max(0, self._longest_stop() - 1)
        end = max(self.streamed, len(self.text) - hold)
        piece = self.text[self.streamed : end]
        self.streamed = end
        return piece

    def output(self, has_tokenizer: bool) -> GenerationOutput:
        first = self.token_times[0] - self.start_time if self.token_times else None
        gaps = np.diff(self.token_times)
        return GenerationOutput(
            prompt_token_ids=self.prompt_ids,
            token_ids=self.output_ids,
            finish_reason=self.finish_reason,
            time_to_first_token=first,
            time_per_output_token=float(gaps.mean()) if gaps.size else None,
            total_time=(self.token_times[-1] - self.start_time) if self.token_times else 0.0,
            cut_by_context=self.cut_by_context,
            _text=self.text if has_tokenizer else None,
        )
