"""Choosing the next token from the logits: greedy, or sampled with the usual knobs.

The order is the one Hugging Face and vLLM use: repetition penalty on the raw logits, then
temperature, then the filters that cut the tail (top-k, top-p, min-p), then a draw from what
is left. Each request owns a random generator seeded from its `seed`, so the same seed gives
the same text whatever else is running.
"""

import math
import reprlib
from dataclasses import dataclass, field, fields
from numbers import Integral, Real

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
        self.check()

    def check(self):
        """Refuse a setting of the wrong type or out of range, naming it: "top_p must be in
        (0, 1] (1 disables it), got 1.5". Numbers are stored as Python ints and floats, and a
        single stop string as a list of one (as OpenAI's API takes it)."""
        for setting in fields(self):
            value = getattr(self, setting.name)
            problem = setting_problem(setting.name, value)
            if problem:
                raise ValueError(f"{setting.name} {problem}, got {reprlib.repr(value)}")
            setattr(self, setting.name, normalized(setting.name, value))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# setting: (whether a value of the right kind is in range, the range in words)
NUMBER_RULES = {
    "temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 disables it)"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0 disables it)"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 disables it)"),
}
INTEGER_RULES = {
    "top_k": (lambda v: v >= 0, ">= 0 (0 disables it)"),
    "max_tokens": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v >= 0, ">= 0"),
}


def is_integer(value) -> bool:
    """An int or NumPy integer; True and False are not numbers here."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A finite int or float (NumPy's too), not a bool."""
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def setting_problem(name: str, value) -> str | None:
    """What is wrong with `value` for the SamplingParams setting `name` ("must be ..."), or
    None when it is allowed. The one place the rules live: SamplingParams and the batch file's
    lines (tinyinfer/batch_file.py) both ask here."""
    if name in NUMBER_RULES:
        allowed, words = NUMBER_RULES[name]
        if not is_number(value):
            return f"must be a {'finite ' if isinstance(value, (float, np.floating)) else ''}number {words}"
        return None if allowed(value) else f"must be {words}"
    if name == "seed" and value is None:
        return None  # a fresh random seed
    if name in INTEGER_RULES:
        allowed, words = INTEGER_RULES[name]
        unset = ", or unset (None) for a random seed" if name == "seed" else ""
        if not is_integer(value):
            return f"must be an integer {words}{unset}"
        return None if allowed(value) else f"must be {words}{unset}"
    if name == "stop":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            return "must be a list of strings (or one string)"
        return None if all(value) else "strings must not be empty"
    if name == "stop_token_ids":
        if not isinstance(value, (list, tuple)) or not all(is_integer(t) and t >= 0 for t in value):
            return "must be a list of token ids (integers >= 0)"
        return None
    if name == "ignore_eos":
        return None if isinstance(value, (bool, np.bool_)) else "must be a boolean (true or false)"
    raise KeyError(f"SamplingParams has no setting {name!r}")


def normalized(name: str, value):
    """A checked setting as plain Python values (JSON-ready, as the batch file writes them)."""
    if name in NUMBER_RULES:
        return float(value)
    if name in INTEGER_RULES:
        return None if value is None else int(value)
    if name == "stop":
        return [value] if isinstance(value, str) else list(value)
    if name == "stop_token_ids":
        return [int(t) for t in value]
    return bool(value)


def as_sampling_params(params) -> "SamplingParams":
    """The params argument of generate, stream and add_request: a SamplingParams (checked
    again, in case a field was changed after it was made), or None for the defaults."""
    if params is None:
        return SamplingParams()
    if isinstance(params, dict):
        raise TypeError("params must be a SamplingParams, not a dict; pass SamplingParams(**settings)")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams (tinyinfer.SamplingParams(...)), "
                        f"got {type(params).__name__}")
    params.check()
    return params


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
