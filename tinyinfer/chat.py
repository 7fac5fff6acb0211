"""A multi-turn conversation that keeps its KV cache between turns.

Each turn the whole conversation is rendered again (with the model's chat template, or as
plain running text when it has none) and tokenized. Everything up to the first token that
differs from what the cache already holds is reused; only the rest is prefilled. So turn n
costs the tokens of turn n, not the whole history.
"""

from collections.abc import Iterator

from tinyinfer.errors import ContextLengthError, TokenizerMissingError
from tinyinfer.kv_cache import KVCache
from tinyinfer.sampling import SamplingParams


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, llm, system_prompt: str | None = None):
        if llm.tokenizer is None:
            raise TokenizerMissingError("Chat")
        self.llm = llm
        self.system_prompt = system_prompt
        self.cache = KVCache(llm.config, 0, llm.ops, llm.dtype)  # grows as the conversation does
        self.reset()

    def reset(self):
        """Forget the conversation (the cache's memory is kept for the next one)."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.transcript_ids: list[int] = []  # plain-text mode: every token so far
        self.cached_ids: list[int] = []  # the tokens whose keys and values the cache holds
        self.cache.truncate(0)
        self.last_sequence = None
        self.reused_tokens = 0

    @property
    def uses_template(self) -> bool:
        return self.llm.tokenizer.chat_template is not None

    def _prompt_ids(self, user_text: str) -> list[int]:
        if self.uses_template:
            messages = self.messages + [{"role": "user", "content": user_text}]
            text = self.llm.tokenizer.chat_template.render(messages, add_generation_prompt=True)
            return self.llm.encode(text, add_special_tokens=False)
        # no template: the conversation is one running text that the model continues
        return self.transcript_ids + self.llm.encode(user_text, add_special_tokens=not self.transcript_ids)

    def send(self, user_text: str, params: SamplingParams) -> Iterator[str]:
        """Stream the answer to one user turn; the turn joins the history once it is done."""
        prompt_ids = self._prompt_ids(user_text)
        if len(prompt_ids) >= self.llm.config.max_context:
            raise ContextLengthError(
                f"the conversation has grown to {len(prompt_ids)} tokens, past the model's context window "
                f"of {self.llm.config.max_context}; start a new one with /reset"
            )
        # keep the shared prefix, but leave at least one prompt token to run (its logits start the answer)
        reuse = min(common_prefix_length(self.cached_ids, prompt_ids), len(prompt_ids) - 1)
        self.cache.truncate(reuse)
        self.cache.reserve(min(self.llm.config.max_context, len(prompt_ids) + params.max_tokens))
        sequence = self.llm.new_sequence(prompt_ids, params, cache=self.cache)
        self.last_sequence = sequence
        self.reused_tokens = reuse
        try:
            yield from self.llm.stream_sequence(sequence)
        finally:  # also when interrupted: what was generated stays part of the conversation
            generated = sequence.prompt_ids + sequence.output_ids
            self.cached_ids = generated[: self.cache.length]
            self.transcript_ids = generated
            self.messages += [
                {"role": "user", "content": user_text},
                {"role": "assistant", "content": sequence.text},
            ]
