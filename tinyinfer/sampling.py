"""Choosing the next token from the logits: greedy, or sampled with the usual knobs.

The order is the one Hugging Face and vLLM use: repetition penalty on the raw logits, then
temperature, then the filters that cut the tail (top-k, top-p, min-p), then a draw from what
is left. Each request owns a random generator seeded from its `seed`, so the same seed gives
the same text whatever else is running.
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy: always the most likely token
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    max_tokens: int = 128  # new tokens at most
    stop: list[str] = field(default_factory=list)  # strings that end generation (not included)
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end it, besides EOS
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 disables it), got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 disables it), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen_ids) -> int:
    """logits: [vocab] float32 for the next position; seen_ids: the prompt and output so far."""
    if params.greedy and params.repetition_penalty == 1.0:
        return int(np.argmax(logits))  # widening to float64 would change no order: skip the copy
    logits = logits.astype(np.float64)  # float64 so the cumulative sums below are exact enough
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(seen_ids, dtype=np.int64))
        penalised = logits[seen]
        # shrink a positive logit, push a negative one further down: both make it less likely
        logits[seen] = np.where(penalised > 0, penalised / params.repetition_penalty, penalised * params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))

    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size:
        kth_largest = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth_largest] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep a token if the tokens more likely than it sum to less than top_p
        outside = order[cumulative - probs[order] >= params.top_p]
        probs[outside] = 0.0
    if params.min_p > 0.0:
        probs[probs < params.min_p * probs.max()] = 0.0
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
