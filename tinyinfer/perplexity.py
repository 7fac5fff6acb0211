"""Perplexity: how surprised a model is by a text, on average, per token.

The text is tokenized and cut into non-overlapping windows of `context` tokens. Each window is
one prefill pass; at every position the logits predict the next token, and the loss there is
the cross-entropy  -log softmax(logits)[next token]  in nats. The mean loss over all
predictions is the figure a training script reports as its validation loss; perplexity is
exp(mean loss), "as unsure as a uniform choice among that many tokens".

Where the tokenizer has a BOS token, each window starts with it (as llama.cpp's perplexity
does), so every token of the text is predicted; without one, the first token of each window
has nothing to be predicted from and is not scored. Windows share no context, which is
exactly how weights/train.py measures its validation loss.
"""

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm


@dataclass
class Perplexity:
    mean_loss: float  # nats per predicted token
    predicted_tokens: int
    windows: int

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_loss))


def token_losses(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """[n] cross-entropy of each target under its row of logits [n, vocab], in float64."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_normalizer = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))  # logsumexp, stably
    return log_normalizer - logits[np.arange(len(targets)), targets]


def windows_of(ids: list[int], context: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of at most `context` tokens, each led by BOS when there is one."""
    step = context - 1 if bos is not None else context
    windows = [([bos] if bos is not None else []) + ids[i : i + step] for i in range(0, len(ids), step)]
    return [w for w in windows if len(w) >= 2]  # one token alone predicts nothing


def perplexity(llm, text, context: int | None = None, max_chunks: int | None = None, progress: bool = False) -> Perplexity:
    """Mean loss over `text` (a str, or a list of token ids used as given) in windows of
    `context` tokens; `max_chunks` stops after that many windows (as llama.cpp's --chunks)."""
    context = context or llm.config.max_context
    if not 2 <= context <= llm.config.max_context:
        raise ValueError(f"context must be between 2 and the model's context window ({llm.config.max_context}), got {context}")
    if isinstance(text, str):
        ids, bos = llm.encode(text, add_special_tokens=False), llm.tokenizer.bos_token_id
    else:
        ids, bos = [int(t) for t in text], None
    windows = windows_of(ids, context, bos)[:max_chunks]
    if not windows:
        raise ValueError(f"the text is {len(ids)} token(s) long; perplexity needs at least two")
    losses = []
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        logits = llm.logits(window)  # [len(window), vocab]
        losses.append(token_losses(logits[:-1], window[1:]))
    all_losses = np.concatenate(losses)
    return Perplexity(float(all_losses.mean()), len(all_losses), len(windows))
